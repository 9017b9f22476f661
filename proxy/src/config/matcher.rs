//! The listener's `filter_chain_matcher` (xDS matcher API) compiled into a tree that selects a filter
//! chain by name: destination IP ranges (`IPMatcher`), exact/prefix maps over the destination port,
//! application protocol, server name, transport protocol or a filter state string.

use std::{collections::HashMap, net::IpAddr};

use waypoint_proto::{
    google::protobuf::{Any, StringValue},
    xds::matcher::IpMatcher,
    xds_matcher_v3::{
        Matcher as RawMatcher,
        matcher::{MatcherType, OnMatch as RawOnMatch, matcher_tree::TreeType, on_match},
    },
};

use super::{
    CompileResult, ConfigError, field, index, key, matchers::Cidr, supported::ExtensionKind,
    typed::Typed,
};

/// What a matcher looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The (restored) destination IP.
    DestinationIp,
    /// The (restored) destination port.
    DestinationPort,
    /// The source IP.
    SourceIp,
    /// SNI.
    ServerName,
    /// `tls` / `raw_buffer`.
    TransportProtocol,
    /// ALPN or sniffed protocols, as Envoy spells them: `'h2c','http/1.1'`.
    ApplicationProtocol,
    /// A filter state object's string value.
    FilterState(String),
}

/// The result of a match: a chain, or a nested matcher.
#[derive(Debug, Clone)]
pub enum OnMatch {
    /// Select this filter chain.
    Chain(String),
    /// Continue with this matcher.
    Matcher(Box<ChainMatcher>),
}

/// One IP range entry.
#[derive(Debug, Clone)]
pub struct IpRange {
    /// Any of these.
    pub ranges: Vec<Cidr>,
    /// Then.
    pub on_match: OnMatch,
    /// `exclusive`: when this entry is the most specific match and its nested matcher fails, do
    /// not fall back to less specific ranges.
    pub exclusive: bool,
}

/// A compiled tree.
#[derive(Debug, Clone)]
pub enum Tree {
    /// Exact value → result.
    Exact {
        /// The input.
        input: Input,
        /// The map.
        map: HashMap<String, OnMatch>,
    },
    /// Longest prefix → result.
    Prefix {
        /// The input.
        input: Input,
        /// Sorted by descending prefix length.
        entries: Vec<(String, OnMatch)>,
    },
    /// Most specific IP range → result.
    Ip {
        /// The input (an IP).
        input: Input,
        /// Range entries.
        ranges: Vec<IpRange>,
    },
}

/// A compiled `xds.type.matcher.v3.Matcher`.
#[derive(Debug, Clone)]
pub struct ChainMatcher {
    /// The tree.
    pub tree: Tree,
    /// When nothing matches.
    pub on_no_match: Option<OnMatch>,
}

/// What the data path knows about a connection when it selects a chain.
pub struct ConnectionInfo<'a> {
    /// Destination IP (after original_dst).
    pub destination_ip: IpAddr,
    /// Destination port.
    pub destination_port: u16,
    /// Source IP.
    pub source_ip: IpAddr,
    /// SNI.
    pub server_name: Option<&'a str>,
    /// `tls` or `raw_buffer`.
    pub transport_protocol: &'a str,
    /// Application protocols from ALPN / http_inspector.
    pub application_protocols: &'a [String],
    /// Filter state lookup (string form).
    pub filter_state: &'a dyn Fn(&str) -> Option<String>,
}

impl ConnectionInfo<'_> {
    fn value(&self, input: &Input) -> Option<String> {
        match input {
            Input::DestinationIp => Some(self.destination_ip.to_string()),
            Input::DestinationPort => Some(self.destination_port.to_string()),
            Input::SourceIp => Some(self.source_ip.to_string()),
            Input::ServerName => self.server_name.map(str::to_owned),
            Input::TransportProtocol => Some(self.transport_protocol.to_owned()),
            Input::ApplicationProtocol => (!self.application_protocols.is_empty()).then(|| {
                self.application_protocols
                    .iter()
                    .map(|p| format!("'{p}'"))
                    .collect::<Vec<_>>()
                    .join(",")
            }),
            Input::FilterState(k) => (self.filter_state)(k),
        }
    }

    fn ip(&self, input: &Input) -> Option<IpAddr> {
        match input {
            Input::DestinationIp => Some(self.destination_ip),
            Input::SourceIp => Some(self.source_ip),
            _ => None,
        }
    }
}

impl OnMatch {
    fn select<'m>(&'m self, info: &ConnectionInfo<'_>) -> Option<&'m str> {
        match self {
            OnMatch::Chain(c) => Some(c),
            OnMatch::Matcher(m) => m.select(info),
        }
    }

    fn compile(
        raw: &RawOnMatch,
        path: &str,
        chains: &mut Vec<(String, String)>,
    ) -> CompileResult<Self> {
        if raw.keep_matching {
            return Err(ConfigError::new(
                field(path, "keep_matching"),
                "keep_matching is not supported",
            ));
        }
        match &raw.on_match {
            Some(on_match::OnMatch::Matcher(m)) => Ok(OnMatch::Matcher(Box::new(
                ChainMatcher::compile_inner(m, &field(path, "matcher"), chains)?,
            ))),
            Some(on_match::OnMatch::Action(a)) => {
                let apath = field(&field(path, "action"), "typed_config");
                let any = a
                    .typed_config
                    .as_ref()
                    .ok_or_else(|| ConfigError::new(&apath, "typed_config is required"))?;
                let chain = action_chain(any, &apath)?;
                chains.push((chain.clone(), apath));
                Ok(OnMatch::Chain(chain))
            }
            None => Err(ConfigError::new(path, "matcher or action is required")),
        }
    }
}

fn action_chain(any: &Any, path: &str) -> CompileResult<String> {
    let t = Typed::new(any, path)?;
    let name = t
        .check_kind(&[ExtensionKind::MatchAction], "a filter chain action", path)?
        .to_owned();
    let v: StringValue = t.decode(&name, path)?;
    if v.value.is_empty() {
        return Err(ConfigError::new(path, "the filter chain name is empty"));
    }
    Ok(v.value)
}

fn input(name: &str, cfg: Option<&Any>, path: &str) -> CompileResult<Input> {
    let cpath = field(path, "typed_config");
    let any = cfg
        .ok_or_else(|| ConfigError::new(&cpath, format!("input '{name}' needs a typed_config")))?;
    let t = Typed::new(any, &cpath)?;
    let tname = t
        .check_kind(
            &[ExtensionKind::MatchInput],
            "a network match input",
            &cpath,
        )?
        .to_owned();
    Ok(match tname.rsplit('.').next().unwrap_or_default() {
        "DestinationIPInput" => Input::DestinationIp,
        "DestinationPortInput" => Input::DestinationPort,
        "SourceIPInput" => Input::SourceIp,
        "ServerNameInput" => Input::ServerName,
        "TransportProtocolInput" => Input::TransportProtocol,
        "ApplicationProtocolInput" => Input::ApplicationProtocol,
        "FilterStateInput" => {
            let fs: waypoint_proto::envoy::extensions::matching::common_inputs::network::v3::FilterStateInput =
                t.decode(&tname, &cpath)?;
            if fs.key.is_empty() {
                return Err(ConfigError::new(field(&cpath, "key"), "key is required"));
            }
            Input::FilterState(fs.key)
        }
        other => {
            return Err(ConfigError::new(
                cpath,
                format!("input {other} is not supported"),
            ));
        }
    })
}

impl ChainMatcher {
    /// Compiles `m` (at `path`); returns the matcher and every chain name it selects, with the
    /// path of the action that names it.
    pub fn compile(m: &RawMatcher, path: &str) -> CompileResult<(Self, Vec<(String, String)>)> {
        let mut chains = Vec::new();
        let matcher = ChainMatcher::compile_inner(m, path, &mut chains)?;
        Ok((matcher, chains))
    }

    fn compile_inner(
        m: &RawMatcher,
        path: &str,
        chains: &mut Vec<(String, String)>,
    ) -> CompileResult<Self> {
        let tree = match &m.matcher_type {
            Some(MatcherType::MatcherTree(t)) => {
                let tpath = field(path, "matcher_tree");
                let ipath = field(&tpath, "input");
                let raw_input = t
                    .input
                    .as_ref()
                    .ok_or_else(|| ConfigError::new(&ipath, "input is required"))?;
                let inp = input(&raw_input.name, raw_input.typed_config.as_ref(), &ipath)?;
                match &t.tree_type {
                    Some(TreeType::ExactMatchMap(mm)) => {
                        let mpath = field(&tpath, "exact_match_map");
                        let mut map = HashMap::new();
                        let mut keys: Vec<&String> = mm.map.keys().collect();
                        keys.sort();
                        for k in keys {
                            let kpath = key(&mpath, "map", k);
                            if inp == Input::DestinationPort && k.parse::<u16>().is_err() {
                                return Err(ConfigError::new(
                                    &kpath,
                                    format!("'{k}' is not a port number"),
                                ));
                            }
                            map.insert(k.clone(), OnMatch::compile(&mm.map[k], &kpath, chains)?);
                        }
                        Tree::Exact { input: inp, map }
                    }
                    Some(TreeType::PrefixMatchMap(mm)) => {
                        let mpath = field(&tpath, "prefix_match_map");
                        let mut entries = Vec::new();
                        let mut keys: Vec<&String> = mm.map.keys().collect();
                        keys.sort();
                        for k in keys {
                            entries.push((
                                k.clone(),
                                OnMatch::compile(&mm.map[k], &key(&mpath, "map", k), chains)?,
                            ));
                        }
                        entries.sort_by_key(|e| std::cmp::Reverse(e.0.len()));
                        Tree::Prefix {
                            input: inp,
                            entries,
                        }
                    }
                    Some(TreeType::CustomMatch(c)) => {
                        let cpath = field(&field(&tpath, "custom_match"), "typed_config");
                        let any = c
                            .typed_config
                            .as_ref()
                            .ok_or_else(|| ConfigError::new(&cpath, "typed_config is required"))?;
                        let t = Typed::new(any, &cpath)?;
                        let name = t
                            .check_kind(
                                &[ExtensionKind::CustomMatcher],
                                "a custom matcher",
                                &cpath,
                            )?
                            .to_owned();
                        if !matches!(inp, Input::DestinationIp | Input::SourceIp) {
                            return Err(ConfigError::new(
                                &ipath,
                                "an IPMatcher needs DestinationIPInput or SourceIPInput",
                            ));
                        }
                        let ip: IpMatcher = t.decode(&name, &cpath)?;
                        let mut ranges = Vec::new();
                        for (i, r) in ip.range_matchers.iter().enumerate() {
                            let rpath = index(&cpath, "range_matchers", i);
                            if r.ranges.is_empty() {
                                return Err(ConfigError::new(
                                    field(&rpath, "ranges"),
                                    "at least one range is required",
                                ));
                            }
                            let cidrs = r
                                .ranges
                                .iter()
                                .enumerate()
                                .map(|(j, c)| {
                                    Cidr::parse(
                                        &c.address_prefix,
                                        c.prefix_len.as_ref().map(|v| v.value),
                                        &index(&rpath, "ranges", j),
                                    )
                                })
                                .collect::<CompileResult<Vec<_>>>()?;
                            let on = r.on_match.as_ref().ok_or_else(|| {
                                ConfigError::new(field(&rpath, "on_match"), "on_match is required")
                            })?;
                            ranges.push(IpRange {
                                ranges: cidrs,
                                on_match: OnMatch::compile(on, &field(&rpath, "on_match"), chains)?,
                                exclusive: r.exclusive,
                            });
                        }
                        Tree::Ip { input: inp, ranges }
                    }
                    None => {
                        return Err(ConfigError::new(
                            tpath,
                            "exact_match_map, prefix_match_map or custom_match is required",
                        ));
                    }
                }
            }
            Some(MatcherType::MatcherList(_)) => {
                return Err(ConfigError::new(
                    field(path, "matcher_list"),
                    "matcher_list is not supported",
                ));
            }
            None => return Err(ConfigError::new(path, "matcher_tree is required")),
        };
        let on_no_match = m
            .on_no_match
            .as_ref()
            .map(|o| OnMatch::compile(o, &field(path, "on_no_match"), chains))
            .transpose()?;
        Ok(ChainMatcher { tree, on_no_match })
    }

    /// The filter chain name for a connection, if any.
    pub fn select<'m>(&'m self, info: &ConnectionInfo<'_>) -> Option<&'m str> {
        let hit = match &self.tree {
            Tree::Exact { input, map } => info
                .value(input)
                .and_then(|v| map.get(&v))
                .and_then(|on| on.select(info)),
            Tree::Prefix { input, entries } => info.value(input).and_then(|v| {
                entries
                    .iter()
                    .filter(|(p, _)| v.starts_with(p.as_str()))
                    .find_map(|(_, on)| on.select(info))
            }),
            Tree::Ip { input, ranges } => info.ip(input).and_then(|ip| {
                let mut hits: Vec<(u8, &IpRange)> = ranges
                    .iter()
                    .filter_map(|r| {
                        r.ranges
                            .iter()
                            .filter(|c| c.contains(ip))
                            .map(|c| c.len)
                            .max()
                            .map(|len| (len, r))
                    })
                    .collect();
                hits.sort_by_key(|h| std::cmp::Reverse(h.0));
                for (_, r) in hits {
                    if let Some(chain) = r.on_match.select(info) {
                        return Some(chain);
                    }
                    if r.exclusive {
                        return None;
                    }
                }
                None
            }),
        };
        hit.or_else(|| self.on_no_match.as_ref().and_then(|o| o.select(info)))
    }
}
