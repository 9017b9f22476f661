//! `envoy.filters.http.cors` at run time, as Envoy's filter does it:
//!
//! * the policies are the route's `typed_per_filter_config` CORS policies, most specific first
//!   (route, virtual host, route table), or, when none is configured, the deprecated `cors` of
//!   the route action and of the virtual host; each attribute comes from the first policy that
//!   sets it; only routes that forward have policies (Envoy needs a route entry);
//! * `filter_enabled` / `shadow_enabled` come from the most specific policy; a shadow-only policy
//!   checks the origin and counts it (`http.<stat_prefix>.cors.origin_valid` / `origin_invalid`)
//!   but never changes a request or response;
//! * a preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is answered here
//!   with a 200 carrying the `Access-Control-Allow-*` headers, unless its origin is not allowed
//!   and `forward_not_matching_preflights` (default true) sends it on;
//! * any other response to a request whose origin is allowed gets `Access-Control-Allow-Origin`,
//!   `-Allow-Credentials` and `-Expose-Headers`.
//!
//! The fractions are drawn once per request (Envoy draws at each look-up, which can disagree
//! with itself within one request).

use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, request::Parts};

use super::{Body, request};
use crate::{
    config::{
        RouteConfig,
        filters::{cors::CorsPolicy, hcm::HttpConnectionManager, http::PerFilterConfig},
        route::{Action, Route, VirtualHost},
    },
    stats::Stats,
};

const ALLOW_ORIGIN: &str = "access-control-allow-origin";
const ALLOW_CREDENTIALS: &str = "access-control-allow-credentials";
const ALLOW_METHODS: &str = "access-control-allow-methods";
const ALLOW_HEADERS: &str = "access-control-allow-headers";
const MAX_AGE: &str = "access-control-max-age";
const EXPOSE_HEADERS: &str = "access-control-expose-headers";
const ALLOW_PRIVATE_NETWORK: &str = "access-control-allow-private-network";
const REQUEST_METHOD: &str = "access-control-request-method";
const REQUEST_HEADERS: &str = "access-control-request-headers";
const REQUEST_PRIVATE_NETWORK: &str = "access-control-request-private-network";

/// The CORS policies that apply to a request on `route`, most specific first, for the filter
/// named `filter`.
pub fn policies<'a>(
    filter: &str,
    rc: &'a RouteConfig,
    vh: &'a VirtualHost,
    route: &'a Route,
) -> Vec<&'a CorsPolicy> {
    let Action::Forward(fwd) = &route.action else {
        return Vec::new();
    };
    let typed: Vec<&CorsPolicy> = [
        route.per_filter.get(filter),
        vh.per_filter.get(filter),
        rc.per_filter.get(filter),
    ]
    .into_iter()
    .filter_map(|c| match c {
        Some(PerFilterConfig::Cors(p)) => Some(p.as_ref()),
        _ => None,
    })
    .collect();
    if !typed.is_empty() {
        return typed;
    }
    // Without typed configs, Envoy falls back to the deprecated route and virtual host fields.
    [fwd.cors.as_ref(), vh.cors.as_ref()]
        .into_iter()
        .flatten()
        .collect()
}

/// The headers a response to an allowed CORS request gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHeaders {
    origin: HeaderValue,
    credentials: bool,
    expose: Option<HeaderValue>,
}

impl ResponseHeaders {
    /// Sets them on `headers` (replacing what the upstream sent, as Envoy does).
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(ALLOW_ORIGIN, self.origin.clone());
        if self.credentials {
            headers.insert(ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        }
        if let Some(e) = &self.expose {
            headers.insert(EXPOSE_HEADERS, e.clone());
        }
    }
}

/// What the filter does with a request.
#[derive(Debug)]
pub enum Outcome {
    /// Nothing (no policy, disabled, no `Origin`, shadow only, origin not allowed).
    Pass,
    /// The request goes on; its response gets these headers.
    Respond(ResponseHeaders),
    /// A preflight answered here.
    Preflight(Response<Body>),
}

/// One request's evaluation: whether the origin was checked and found valid (for the stats),
/// and the outcome.
#[derive(Debug)]
pub struct Evaluation {
    /// `Some(valid)` when an `Origin` was checked.
    pub origin_valid: Option<bool>,
    /// What to do.
    pub outcome: Outcome,
}

/// The first policy (most specific first) for which `get` has a value.
fn first<'a, T>(
    policies: &[&'a CorsPolicy],
    get: impl Fn(&'a CorsPolicy) -> Option<T>,
) -> Option<T> {
    policies.iter().find_map(|p| get(p))
}

fn text<'a>(policies: &[&'a CorsPolicy], get: impl Fn(&'a CorsPolicy) -> &'a str) -> &'a str {
    first(policies, |p| Some(get(p)).filter(|s| !s.is_empty())).unwrap_or("")
}

/// Evaluates a request against `policies` (most specific first) with two uniform random draws
/// (`filter_enabled`, `shadow_enabled`).
pub fn evaluate(
    policies: &[&CorsPolicy],
    parts: &Parts,
    hcm: &HttpConnectionManager,
    random: (u64, u64),
) -> Evaluation {
    let pass = |origin_valid| Evaluation {
        origin_valid,
        outcome: Outcome::Pass,
    };
    let Some(top) = policies.first() else {
        return pass(None);
    };
    let enabled = top.enabled.sample(random.0);
    let shadow = top.shadow.sample(random.1);
    if !enabled && !shadow {
        return pass(None);
    }
    let Some(origin) = parts
        .headers
        .get(http::header::ORIGIN)
        .filter(|o| !o.is_empty())
    else {
        return pass(None);
    };
    let origins = first(policies, |p| {
        Some(p.allow_origins.as_slice()).filter(|o| !o.is_empty())
    })
    .unwrap_or(&[]);
    // A matcher that matches the literal `*` allows every origin (Envoy's rule).
    let allowed = origin
        .to_str()
        .is_ok_and(|o| origins.iter().any(|m| m.matches("*") || m.matches(o)));
    if !enabled {
        return pass(Some(allowed));
    }
    let credentials = first(policies, |p| p.allow_credentials).unwrap_or(false);
    let is_preflight = parts.method == Method::OPTIONS
        && parts
            .headers
            .get(REQUEST_METHOD)
            .is_some_and(|m| !m.is_empty());
    if !is_preflight {
        let outcome = if allowed {
            let expose = text(policies, |p| &p.expose_headers);
            Outcome::Respond(ResponseHeaders {
                origin: origin.clone(),
                credentials,
                expose: (!expose.is_empty())
                    .then(|| HeaderValue::from_str(expose).ok())
                    .flatten(),
            })
        } else {
            Outcome::Pass
        };
        return Evaluation {
            origin_valid: Some(allowed),
            outcome,
        };
    }
    if !allowed && first(policies, |p| p.forward_not_matching_preflights).unwrap_or(true) {
        return pass(Some(false));
    }
    let mut r = Response::new(super::empty());
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    if allowed {
        h.insert(ALLOW_ORIGIN, origin.clone());
    }
    if credentials {
        h.insert(ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    }
    // `*` echoes what the preflight asks for.
    let echo_or = |configured: &str, requested: &str| -> Option<HeaderValue> {
        match configured {
            "" => None,
            "*" => parts.headers.get(requested).cloned(),
            v => HeaderValue::from_str(v).ok(),
        }
    };
    if let Some(v) = echo_or(text(policies, |p| &p.allow_methods), REQUEST_METHOD) {
        h.insert(ALLOW_METHODS, v);
    }
    if let Some(v) = echo_or(text(policies, |p| &p.allow_headers), REQUEST_HEADERS) {
        h.insert(ALLOW_HEADERS, v);
    }
    if let Ok(v) = HeaderValue::from_str(text(policies, |p| &p.max_age))
        && !v.is_empty()
    {
        h.insert(MAX_AGE, v);
    }
    if first(policies, |p| p.allow_private_network_access).unwrap_or(false)
        && parts
            .headers
            .get(REQUEST_PRIVATE_NETWORK)
            .is_some_and(|v| v == "true")
    {
        h.insert(ALLOW_PRIVATE_NETWORK, HeaderValue::from_static("true"));
    }
    request::server_header(h, hcm.server_header, &hcm.server_name);
    Evaluation {
        origin_valid: Some(allowed),
        outcome: Outcome::Preflight(r),
    }
}

/// Counts a checked origin in `http.<stat_prefix>.cors.origin_valid` / `origin_invalid`.
pub fn count(stats: &Stats, stat_prefix: &str, origin_valid: Option<bool>) {
    let name = match origin_valid {
        Some(true) => "origin_valid",
        Some(false) => "origin_invalid",
        None => return,
    };
    stats
        .counter(&format!("http.{stat_prefix}.cors.{name}"))
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::matchers::{Fraction, StringMatch};

    fn policy() -> CorsPolicy {
        CorsPolicy {
            allow_origins: vec![StringMatch::exact("https://a.example")],
            allow_methods: "GET,POST".into(),
            allow_headers: String::new(),
            expose_headers: String::new(),
            max_age: String::new(),
            allow_credentials: None,
            enabled: Fraction::ALWAYS,
            shadow: Fraction {
                numerator: 0,
                denominator: 100,
            },
            allow_private_network_access: None,
            forward_not_matching_preflights: None,
        }
    }

    fn hcm() -> HttpConnectionManager {
        use waypoint_proto::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager as RawHcm;
        let raw: RawHcm = waypoint_proto::json::from_json(&serde_json::json!({
            "stat_prefix": "t",
            "route_config": {"name": "r"},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
        }))
        .expect("decodes");
        HttpConnectionManager::compile(&raw, "").expect("compiles")
    }

    fn req(method: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri("/x");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    fn eval(policies: &[&CorsPolicy], parts: &Parts) -> Evaluation {
        evaluate(policies, parts, &hcm(), (0, 0))
    }

    #[test]
    fn preflight_from_an_allowed_origin_is_answered() {
        let mut route = policy();
        route.allow_headers = "*".into();
        route.max_age = "600".into();
        route.allow_private_network_access = Some(true);
        let mut vhost = policy();
        vhost.allow_methods = "PUT".into();
        vhost.allow_credentials = Some(true);
        let parts = req(
            "OPTIONS",
            &[
                ("origin", "https://a.example"),
                (REQUEST_METHOD, "POST"),
                (REQUEST_HEADERS, "x-a, x-b"),
                (REQUEST_PRIVATE_NETWORK, "true"),
            ],
        );
        let e = eval(&[&route, &vhost], &parts);
        assert_eq!(e.origin_valid, Some(true));
        let Outcome::Preflight(r) = e.outcome else {
            panic!("preflight expected: {e:?}")
        };
        assert_eq!(r.status(), 200);
        let h = r.headers();
        assert_eq!(h[ALLOW_ORIGIN], "https://a.example");
        assert_eq!(h[ALLOW_METHODS], "GET,POST", "the route's methods win");
        assert_eq!(h[ALLOW_HEADERS], "x-a, x-b", "`*` echoes the request");
        assert_eq!(h[MAX_AGE], "600");
        assert_eq!(h[ALLOW_CREDENTIALS], "true", "from the virtual host");
        assert_eq!(h[ALLOW_PRIVATE_NETWORK], "true");
    }

    #[test]
    fn preflight_from_another_origin_is_forwarded_or_answered_bare() {
        let parts = req(
            "OPTIONS",
            &[("origin", "https://evil.example"), (REQUEST_METHOD, "GET")],
        );
        let p = policy();
        let e = eval(&[&p], &parts);
        assert_eq!(e.origin_valid, Some(false));
        assert!(matches!(e.outcome, Outcome::Pass), "forwarded by default");
        let mut p = policy();
        p.forward_not_matching_preflights = Some(false);
        let e = eval(&[&p], &parts);
        let Outcome::Preflight(r) = e.outcome else {
            panic!("answered")
        };
        assert!(!r.headers().contains_key(ALLOW_ORIGIN));
        assert_eq!(r.headers()[ALLOW_METHODS], "GET,POST");
    }

    #[test]
    fn simple_requests_get_allow_origin_and_expose_headers() {
        let mut p = policy();
        p.expose_headers = "x-total".into();
        p.allow_credentials = Some(true);
        let e = eval(&[&p], &req("GET", &[("origin", "https://a.example")]));
        let Outcome::Respond(h) = e.outcome else {
            panic!("respond")
        };
        let mut headers = HeaderMap::new();
        headers.insert(ALLOW_ORIGIN, HeaderValue::from_static("upstream"));
        h.apply(&mut headers);
        assert_eq!(headers[ALLOW_ORIGIN], "https://a.example");
        assert_eq!(headers[EXPOSE_HEADERS], "x-total");
        assert_eq!(headers[ALLOW_CREDENTIALS], "true");
        let e = eval(&[&p], &req("GET", &[("origin", "https://b.example")]));
        assert!(matches!(e.outcome, Outcome::Pass));
        assert_eq!(e.origin_valid, Some(false));
        let e = eval(&[&p], &req("GET", &[]));
        assert_eq!(e.origin_valid, None, "no Origin: not a CORS request");
    }

    #[test]
    fn a_star_matcher_allows_every_origin() {
        let mut p = policy();
        p.allow_origins = vec![StringMatch::exact("*")];
        let e = eval(&[&p], &req("GET", &[("origin", "https://any.example")]));
        assert!(matches!(e.outcome, Outcome::Respond(_)));
    }

    #[test]
    fn disabled_and_shadow_policies_do_not_touch_the_request() {
        let parts = req(
            "OPTIONS",
            &[("origin", "https://a.example"), (REQUEST_METHOD, "GET")],
        );
        let mut off = policy();
        off.enabled = Fraction {
            numerator: 0,
            denominator: 100,
        };
        let e = eval(&[&off], &parts);
        assert_eq!(e.origin_valid, None, "disabled: nothing checked");
        off.shadow = Fraction::ALWAYS;
        let e = eval(&[&off], &parts);
        assert_eq!(e.origin_valid, Some(true), "shadow: checked and counted");
        assert!(matches!(e.outcome, Outcome::Pass), "shadow: not answered");
        let e = eval(&[], &parts);
        assert!(e.origin_valid.is_none() && matches!(e.outcome, Outcome::Pass));
    }

    #[test]
    fn the_enabled_fraction_is_sampled() {
        let mut p = policy();
        p.enabled = Fraction {
            numerator: 30,
            denominator: 100,
        };
        let parts = req("GET", &[("origin", "https://a.example")]);
        let hcm = hcm();
        let on = (0..1000u64)
            .filter(|i| {
                matches!(
                    evaluate(&[&p], &parts, &hcm, (*i, 0)).outcome,
                    Outcome::Respond(_)
                )
            })
            .count();
        assert_eq!(on, 300);
    }
}
