//! `envoy.filters.http.fault` (istiod's VirtualService `fault`): fixed or header-controlled delays
//! and aborts (HTTP status or gRPC status) with their percentages, the `headers`,
//! `upstream_cluster` and `downstream_nodes` conditions, and `max_active_faults`.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};

use super::{Body, full};
use crate::{
    config::{
        filters::http::{Abort, Delay, Fault},
        matchers::{Fraction, HeaderMatch},
    },
    flags::{ResponseFlag, ResponseFlags},
};

/// Faults in progress (Envoy counts per filter; one process-wide count is stricter).
static ACTIVE: AtomicU64 = AtomicU64::new(0);

/// What a fault does to one request.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Wait this long first.
    pub delay: Option<Duration>,
    /// Then answer with this instead of forwarding.
    pub abort: Option<AbortWith>,
}

/// An injected answer.
#[derive(Debug, PartialEq, Eq)]
pub enum AbortWith {
    /// An HTTP status.
    Http(u16),
    /// A gRPC status (HTTP 200, trailers-only).
    Grpc(u32),
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// A header-given percentage caps the configured one (Envoy's `*-percentage` headers).
fn effective(f: &Fraction, headers: &HeaderMap, pct_header: &str) -> Fraction {
    match header_u64(headers, pct_header) {
        Some(n) => Fraction {
            numerator: (n.min(u64::from(f.denominator)) as u32).min(f.numerator),
            denominator: f.denominator,
        },
        None => *f,
    }
}

fn draw(f: &Fraction, random: u64) -> bool {
    f.denominator > 0 && f.hit((random % u64::from(f.denominator)) as u32)
}

fn header_matches(m: &HeaderMatch, headers: &HeaderMap) -> bool {
    let v = headers.get(m.name.as_str()).and_then(|v| v.to_str().ok());
    m.matches(v)
}

/// Decides the fault for a request routed to `cluster`.
pub fn decide(
    f: &Fault,
    headers: &HeaderMap,
    cluster: Option<&str>,
    random: (u64, u64),
) -> Decision {
    if f.upstream_cluster
        .as_deref()
        .is_some_and(|c| Some(c) != cluster)
    {
        return Decision::default();
    }
    if !f.headers.iter().all(|m| header_matches(m, headers)) {
        return Decision::default();
    }
    if !f.downstream_nodes.is_empty() {
        let node = headers
            .get("x-envoy-downstream-service-node")
            .and_then(|v| v.to_str().ok());
        if !node.is_some_and(|n| f.downstream_nodes.iter().any(|d| d == n)) {
            return Decision::default();
        }
    }
    let delay = f.delay.as_ref().and_then(|(kind, frac)| {
        let frac = effective(frac, headers, "x-envoy-fault-delay-request-percentage");
        if !draw(&frac, random.0) {
            return None;
        }
        match kind {
            Delay::Fixed(d) => Some(*d),
            Delay::Header => {
                header_u64(headers, "x-envoy-fault-delay-request").map(Duration::from_millis)
            }
        }
    });
    let abort = f.abort.as_ref().and_then(|(kind, frac)| {
        let frac = effective(frac, headers, "x-envoy-fault-abort-request-percentage");
        if !draw(&frac, random.1) {
            return None;
        }
        match kind {
            Abort::Http(s) => Some(AbortWith::Http(*s)),
            Abort::Grpc(s) => Some(AbortWith::Grpc(*s)),
            Abort::Header => header_u64(headers, "x-envoy-fault-abort-grpc-request")
                .map(|g| AbortWith::Grpc(g as u32))
                .or_else(|| {
                    header_u64(headers, "x-envoy-fault-abort-request")
                        .filter(|s| (200..600).contains(s))
                        .map(|s| AbortWith::Http(s as u16))
                }),
        }
    });
    Decision { delay, abort }
}

/// Holds one slot of `max_active_faults` while a fault is applied.
pub struct Active;

impl Active {
    /// A slot, unless `max` faults are already active.
    pub fn acquire(max: Option<u32>) -> Option<Active> {
        let prev = ACTIVE.fetch_add(1, Ordering::AcqRel);
        if max.is_some_and(|m| prev >= u64::from(m)) {
            ACTIVE.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Active)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The injected response.
pub fn abort_response(a: &AbortWith, delayed: bool) -> Response<Body> {
    let mut r = match a {
        AbortWith::Http(s) => {
            let mut r = Response::new(full("fault filter abort"));
            *r.status_mut() = StatusCode::from_u16(*s).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            r
        }
        AbortWith::Grpc(g) => {
            let mut r = Response::new(super::empty());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            r.headers_mut().insert("grpc-status", HeaderValue::from(*g));
            r.headers_mut().insert(
                "grpc-message",
                HeaderValue::from_static("fault filter abort"),
            );
            r
        }
    };
    ResponseFlags::add_to(&mut r, ResponseFlag::FaultInjected);
    if delayed {
        ResponseFlags::add_to(&mut r, ResponseFlag::DelayInjected);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(delay: Option<(Delay, u32)>, abort: Option<(Abort, u32)>) -> Fault {
        let pct = |n| Fraction {
            numerator: n,
            denominator: 100,
        };
        Fault {
            delay: delay.map(|(d, n)| (d, pct(n))),
            abort: abort.map(|(a, n)| (a, pct(n))),
            upstream_cluster: None,
            headers: vec![],
            downstream_nodes: vec![],
            max_active_faults: None,
        }
    }

    #[test]
    fn percentages_decide_per_request() {
        let f = fault(
            Some((Delay::Fixed(Duration::from_millis(5)), 50)),
            Some((Abort::Http(503), 10)),
        );
        let h = HeaderMap::new();
        assert_eq!(
            decide(&f, &h, None, (49, 9)),
            Decision {
                delay: Some(Duration::from_millis(5)),
                abort: Some(AbortWith::Http(503))
            }
        );
        assert_eq!(decide(&f, &h, None, (50, 10)), Decision::default());
        let mut hits = 0;
        for r in 0..1000u64 {
            if decide(&f, &h, None, (0, r)).abort.is_some() {
                hits += 1;
            }
        }
        assert_eq!(hits, 100);
    }

    #[test]
    fn header_controlled_faults_and_conditions() {
        let mut f = fault(Some((Delay::Header, 100)), Some((Abort::Header, 100)));
        let mut h = HeaderMap::new();
        assert_eq!(decide(&f, &h, None, (0, 0)), Decision::default());
        h.insert(
            "x-envoy-fault-abort-request",
            HeaderValue::from_static("418"),
        );
        h.insert("x-envoy-fault-delay-request", HeaderValue::from_static("7"));
        let d = decide(&f, &h, None, (0, 0));
        assert_eq!(d.abort, Some(AbortWith::Http(418)));
        assert_eq!(d.delay, Some(Duration::from_millis(7)));
        h.insert(
            "x-envoy-fault-abort-grpc-request",
            HeaderValue::from_static("14"),
        );
        assert_eq!(
            decide(&f, &h, None, (0, 0)).abort,
            Some(AbortWith::Grpc(14))
        );
        f.upstream_cluster = Some("a".into());
        assert_eq!(decide(&f, &h, Some("b"), (0, 0)), Decision::default());
        assert!(decide(&f, &h, Some("a"), (0, 0)).abort.is_some());
    }

    #[test]
    fn max_active_faults_is_a_bound() {
        let held: Vec<Active> = (0..3)
            .filter_map(|_| Active::acquire(Some(1_000)))
            .collect();
        assert_eq!(held.len(), 3);
        assert!(Active::acquire(Some(0)).is_none());
    }
}
