//! Filter chain selection: the `filter_chain_matcher` (xDS matcher API) when the listener has one,
//! else Envoy's classic `filter_chain_match` search: criteria are applied in Envoy's order
//! (destination port, destination IP, server name, transport protocol, application protocols,
//! direct source IP, source type, source IP, source port), at each step keeping the most specific
//! chains and falling back to chains that leave the criterion empty; `default_filter_chain` last.
//!
//! Both are indexed when the listener is compiled: the matcher's IP ranges are a longest-prefix
//! table and its actions know their chain's position; the classic search starts from the chains the
//! [`ClassicIndex`] leaves after the destination port and IP steps (usually one), so the cost per
//! connection does not grow with the number of services the listener fronts.

use std::net::IpAddr;

use crate::config::{
    listener::{FilterChain, FilterChainMatch, Listener, SourceType},
    matcher::{ClassicIndex, ConnectionInfo},
    matchers::Cidr,
};

/// What a chain is selected by.
pub struct Selector<'a> {
    /// Destination IP and port (after `original_dst`).
    pub destination: Option<(IpAddr, u16)>,
    /// Source IP and port.
    pub source: Option<(IpAddr, u16)>,
    /// The directly connected peer's IP.
    pub direct_source: Option<IpAddr>,
    /// SNI.
    pub server_name: Option<&'a str>,
    /// `tls` or `raw_buffer`.
    pub transport_protocol: &'a str,
    /// From ALPN / `http_inspector`.
    pub application_protocols: &'a [String],
    /// Filter state lookup.
    pub filter_state: &'a dyn Fn(&str) -> Option<String>,
}

const UNSPECIFIED: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

/// The chain for a connection, if any.
pub fn select<'l>(listener: &'l Listener, s: &Selector<'_>) -> Option<&'l FilterChain> {
    if let Some(m) = &listener.chain_matcher {
        let (dip, dport) = s.destination.unwrap_or((UNSPECIFIED, 0));
        let info = ConnectionInfo {
            destination_ip: dip,
            destination_port: dport,
            source_ip: s.source.map(|x| x.0).unwrap_or(UNSPECIFIED),
            server_name: s.server_name,
            transport_protocol: s.transport_protocol,
            application_protocols: s.application_protocols,
            filter_state: s.filter_state,
        };
        return match m.select_chain(&info) {
            Some(c) => match c.index {
                Some(i) => listener.filter_chains.get(i),
                None => listener.chain(&c.name),
            },
            None => listener.default_filter_chain.as_ref(),
        };
    }
    classic(&listener.filter_chains, &listener.chain_index, s)
        .or(listener.default_filter_chain.as_ref())
}

/// Narrows `candidates` (in place, order kept) to those scoring highest; `None` scores drop out,
/// `Some(0)` means "the criterion is empty" (the fallback), higher is more specific.
fn narrow(candidates: &mut Vec<&FilterChain>, score: impl Fn(&FilterChainMatch) -> Option<u32>) {
    let score_of = |c: &FilterChain| match &c.chain_match {
        Some(m) => score(m),
        None => Some(0),
    };
    let best = candidates.iter().filter_map(|c| score_of(c)).max();
    candidates.retain(|c| best.is_some() && score_of(c) == best);
}

/// Longest-prefix score of `ip` in `ranges` (empty ranges: 0; no hit: `None`).
fn prefix_score(ranges: &[Cidr], ip: Option<IpAddr>) -> Option<u32> {
    if ranges.is_empty() {
        return Some(0);
    }
    let ip = ip?;
    ranges
        .iter()
        .filter(|c| c.contains(ip))
        .map(|c| u32::from(c.len) + 1)
        .max()
}

fn server_name_score(names: &[String], sni: Option<&str>) -> Option<u32> {
    if names.is_empty() {
        return Some(0);
    }
    let sni = sni?.to_ascii_lowercase();
    names
        .iter()
        .filter_map(|n| {
            if *n == sni {
                Some(1_000)
            } else if let Some(suffix) = n.strip_prefix('*') {
                sni.ends_with(suffix).then_some(suffix.len() as u32 + 1)
            } else {
                None
            }
        })
        .max()
}

fn is_local(source: Option<(IpAddr, u16)>, destination: Option<(IpAddr, u16)>) -> bool {
    match (source, destination) {
        (Some((s, _)), Some((d, _))) => s.is_loopback() || s == d,
        (Some((s, _)), None) => s.is_loopback(),
        _ => false,
    }
}

fn classic<'l>(
    chains: &'l [FilterChain],
    index: &ClassicIndex,
    s: &Selector<'_>,
) -> Option<&'l FilterChain> {
    // Destination port, then destination IP: done by the index.
    let mut c: Vec<&FilterChain> = index
        .candidates(s.destination)
        .iter()
        .filter_map(|i| chains.get(*i))
        .collect();
    narrow(&mut c, |m| {
        server_name_score(&m.server_names, s.server_name)
    });
    narrow(&mut c, |m| match &m.transport_protocol {
        None => Some(0),
        Some(t) => (t == s.transport_protocol).then_some(1),
    });
    narrow(&mut c, |m| {
        if m.application_protocols.is_empty() {
            Some(0)
        } else {
            m.application_protocols
                .iter()
                .any(|p| s.application_protocols.contains(p))
                .then_some(1)
        }
    });
    narrow(&mut c, |m| {
        prefix_score(&m.direct_source_prefix_ranges, s.direct_source)
    });
    narrow(&mut c, |m| match m.source_type {
        SourceType::Any => Some(0),
        SourceType::Local => is_local(s.source, s.destination).then_some(1),
        SourceType::External => (!is_local(s.source, s.destination)).then_some(1),
    });
    narrow(&mut c, |m| {
        prefix_score(&m.source_prefix_ranges, s.source.map(|x| x.0))
    });
    narrow(&mut c, |m| {
        if m.source_ports.is_empty() {
            Some(0)
        } else {
            s.source
                .is_some_and(|(_, p)| m.source_ports.contains(&p))
                .then_some(1)
        }
    });
    c.into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(name: &str, m: Option<FilterChainMatch>) -> FilterChain {
        FilterChain {
            name: name.into(),
            chain_match: m,
            filters: vec![],
            transport_socket: None,
            transport_socket_connect_timeout: None,
            drain: Default::default(),
        }
    }

    fn fcm() -> FilterChainMatch {
        FilterChainMatch {
            destination_port: None,
            prefix_ranges: vec![],
            source_type: SourceType::Any,
            source_prefix_ranges: vec![],
            direct_source_prefix_ranges: vec![],
            source_ports: vec![],
            server_names: vec![],
            transport_protocol: None,
            application_protocols: vec![],
        }
    }

    fn pick<'a>(chains: &'a [FilterChain], dst: &str, protos: &[String]) -> Option<&'a str> {
        let d: std::net::SocketAddr = dst.parse().expect("addr");
        let fs = |_: &str| None;
        let s = Selector {
            destination: Some((d.ip(), d.port())),
            source: Some(("10.0.0.1".parse().expect("ip"), 5555)),
            direct_source: None,
            server_name: None,
            transport_protocol: "raw_buffer",
            application_protocols: protos,
            filter_state: &fs,
        };
        classic(chains, &ClassicIndex::build(chains), &s).map(|c| c.name.as_str())
    }

    #[test]
    fn most_specific_chain_wins_and_empty_criteria_are_fallbacks() {
        let cidr = |s: &str, l| Cidr::parse(s, Some(l), "").expect("cidr");
        let chains = vec![
            chain("any", None),
            chain(
                "port-8080",
                Some(FilterChainMatch {
                    destination_port: Some(8080),
                    ..fcm()
                }),
            ),
            chain(
                "port-8080-net",
                Some(FilterChainMatch {
                    destination_port: Some(8080),
                    prefix_ranges: vec![cidr("10.1.0.0", 16)],
                    ..fcm()
                }),
            ),
            chain(
                "h2c",
                Some(FilterChainMatch {
                    destination_port: Some(9000),
                    application_protocols: vec!["h2c".into()],
                    ..fcm()
                }),
            ),
        ];
        assert_eq!(pick(&chains, "10.1.2.3:8080", &[]), Some("port-8080-net"));
        assert_eq!(pick(&chains, "10.9.2.3:8080", &[]), Some("port-8080"));
        assert_eq!(pick(&chains, "10.9.2.3:80", &[]), Some("any"));
        assert_eq!(pick(&chains, "10.9.2.3:9000", &["h2c".into()]), Some("h2c"));
        // Port 9000 matches only the h2c chain; without h2c the criterion fails and nothing is
        // left (Envoy does not fall back to less specific ports).
        assert_eq!(pick(&chains, "10.9.2.3:9000", &["http/1.1".into()]), None);
    }

    /// The narrowing step as first written: a new list per criterion.
    fn narrow_owned(
        candidates: Vec<&FilterChain>,
        score: impl Fn(&FilterChainMatch) -> Option<u32>,
    ) -> Vec<&FilterChain> {
        let scored: Vec<(u32, &FilterChain)> = candidates
            .into_iter()
            .filter_map(|c| match &c.chain_match {
                Some(m) => score(m).map(|s| (s, c)),
                None => Some((0, c)),
            })
            .collect();
        let best = scored.iter().map(|(s, _)| *s).max();
        scored
            .into_iter()
            .filter(|(s, _)| Some(*s) == best)
            .map(|(_, c)| c)
            .collect()
    }

    /// Envoy's classic search spelled out: every criterion narrows all chains, in order.
    fn classic_by_scan<'l>(chains: &'l [FilterChain], s: &Selector<'_>) -> Option<&'l FilterChain> {
        let mut c: Vec<&FilterChain> = chains.iter().collect();
        let dport = s.destination.map(|d| d.1);
        c = narrow_owned(c, |m| match m.destination_port {
            None => Some(0),
            Some(p) => (Some(p) == dport).then_some(1),
        });
        c = narrow_owned(c, |m| {
            prefix_score(&m.prefix_ranges, s.destination.map(|d| d.0))
        });
        c = narrow_owned(c, |m| server_name_score(&m.server_names, s.server_name));
        c = narrow_owned(c, |m| match &m.transport_protocol {
            None => Some(0),
            Some(t) => (t == s.transport_protocol).then_some(1),
        });
        c = narrow_owned(c, |m| {
            if m.application_protocols.is_empty() {
                Some(0)
            } else {
                m.application_protocols
                    .iter()
                    .any(|p| s.application_protocols.contains(p))
                    .then_some(1)
            }
        });
        c = narrow_owned(c, |m| {
            prefix_score(&m.direct_source_prefix_ranges, s.direct_source)
        });
        c = narrow_owned(c, |m| match m.source_type {
            SourceType::Any => Some(0),
            SourceType::Local => is_local(s.source, s.destination).then_some(1),
            SourceType::External => (!is_local(s.source, s.destination)).then_some(1),
        });
        c = narrow_owned(c, |m| {
            prefix_score(&m.source_prefix_ranges, s.source.map(|x| x.0))
        });
        c = narrow_owned(c, |m| {
            if m.source_ports.is_empty() {
                Some(0)
            } else {
                s.source
                    .is_some_and(|(_, p)| m.source_ports.contains(&p))
                    .then_some(1)
            }
        });
        c.into_iter().next()
    }

    #[test]
    fn indexed_classic_search_agrees_with_a_full_scan() {
        let cidr = |s: &str| {
            let (a, l) = s.split_once('/').expect("a/len");
            Cidr::parse(a, Some(l.parse().expect("len")), "").expect("cidr")
        };
        let pool = [
            "0.0.0.0/0",
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.3/32",
            "10.1.2.0/24",
            "fd00::/8",
        ];
        let mut state = 0xfeed_u64;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        for _ in 0..1_000 {
            let chains: Vec<FilterChain> = (0..1 + next(8))
                .map(|i| {
                    if next(8) == 0 {
                        return chain(&format!("c{i}"), None);
                    }
                    let m = FilterChainMatch {
                        destination_port: [None, Some(80), Some(443)][next(3)],
                        prefix_ranges: (0..next(3)).map(|_| cidr(pool[next(pool.len())])).collect(),
                        server_names: [vec![], vec!["a.example".to_owned()]][next(2)].clone(),
                        transport_protocol: [None, Some("tls".to_owned())][next(2)].clone(),
                        source_prefix_ranges: (0..next(2))
                            .map(|_| cidr(pool[next(pool.len())]))
                            .collect(),
                        source_type: [SourceType::Any, SourceType::Local, SourceType::External]
                            [next(3)],
                        source_ports: [vec![], vec![5555], vec![1]][next(3)].clone(),
                        ..fcm()
                    };
                    chain(&format!("c{i}"), Some(m))
                })
                .collect();
            let index = ClassicIndex::build(&chains);
            for dst in [
                "10.1.2.3:80",
                "10.1.9.9:443",
                "10.9.0.1:8080",
                "[fd00::1]:80",
            ] {
                let d: std::net::SocketAddr = dst.parse().expect("addr");
                for destination in [Some((d.ip(), d.port())), None] {
                    for (sni, transport) in [(None, "raw_buffer"), (Some("a.example"), "tls")] {
                        let fs = |_: &str| None;
                        let s = Selector {
                            destination,
                            source: Some(("10.1.2.3".parse().expect("ip"), 5555)),
                            direct_source: None,
                            server_name: sni,
                            transport_protocol: transport,
                            application_protocols: &[],
                            filter_state: &fs,
                        };
                        assert_eq!(
                            classic(&chains, &index, &s).map(|c| &c.name),
                            classic_by_scan(&chains, &s).map(|c| &c.name),
                            "{dst} {destination:?} {sni:?}"
                        );
                    }
                }
            }
        }
    }
}
