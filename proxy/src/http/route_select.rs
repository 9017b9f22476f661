//! Route selection: virtual host by `:authority`, then the first matching route.
//!
//! Envoy's rules, which are the spec here:
//! - the virtual host is found by the lower-cased host, exact domains first, then `*.suffix`
//!   wildcards longest first, then `prefix*` wildcards longest first, then `*`. The host is matched
//!   as sent, port included (istiod lists both `name` and `name:port`), unless the route table sets
//!   `ignore_port_in_host_matching`;
//! - the routes of the virtual host are tried in order and the first whose every condition holds
//!   wins: runtime fraction, TLS context, headers, query parameters, `grpc`, then the path rule.
//!
//! Neither is a scan: the compiled table indexes domains ([`DomainIndex`]) and path rules
//! ([`RouteIndex`]), and the route chosen is the first in order among those whose path rule
//! matches and whose other conditions hold — the same route a scan in order finds.
//!
//! [`DomainIndex`]: crate::config::route::DomainIndex
//! [`RouteIndex`]: crate::config::route::RouteIndex

use std::borrow::Cow;

use http::{HeaderMap, Method, header, request::Parts};

use crate::config::route::{Route, RouteConfig, RouteMatch, VirtualHost, WeightedTarget};

/// What route selection reads of a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// `:method`.
    pub method: &'a Method,
    /// `:authority` (or `Host`), possibly with a port; empty when the request has none.
    pub authority: &'a str,
    /// `:path` with the query; empty for CONNECT.
    pub path: &'a str,
    /// `:scheme`, when known.
    pub scheme: Option<&'a str>,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// A CONNECT request (not an extended CONNECT, which is an upgrade).
    pub is_connect: bool,
    /// `content-type` is `application/grpc` or `application/grpc+…`.
    pub is_grpc: bool,
    /// The downstream presented a client certificate (for `tls_context` matches).
    pub peer_cert_presented: bool,
    /// The downstream's client certificate was validated (for `tls_context` matches).
    pub peer_cert_validated: bool,
}

impl<'a> RequestView<'a> {
    /// A view of a plain request: no TLS peer, CONNECT and gRPC derived from method and headers.
    pub fn new(
        method: &'a Method,
        authority: &'a str,
        path: &'a str,
        headers: &'a HeaderMap,
    ) -> Self {
        RequestView {
            method,
            authority,
            path,
            scheme: None,
            headers,
            is_connect: method == Method::CONNECT,
            is_grpc: is_grpc(headers),
            peer_cert_presented: false,
            peer_cert_validated: false,
        }
    }

    /// A view of request `parts`. The authority is the URI's (HTTP/2, absolute-form HTTP/1) or the
    /// `Host` header; an HTTP/2 extended CONNECT (`:protocol`) is an upgrade, not a CONNECT.
    /// TLS peer facts are unknown here: set `peer_cert_*` when the route table needs them.
    pub fn from_parts(parts: &'a Parts) -> Self {
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
            })
            .unwrap_or("");
        let path = parts.uri.path_and_query().map_or("", |p| p.as_str());
        let mut view = RequestView::new(&parts.method, authority, path, &parts.headers);
        view.scheme = parts.uri.scheme_str();
        view.is_connect = parts.method == Method::CONNECT
            && parts.extensions.get::<hyper::ext::Protocol>().is_none();
        view
    }

    /// The value a header matcher sees: pseudo-headers from the request line, other headers with
    /// several values joined by `,` (as Envoy joins them).
    pub fn header(&self, name: &str) -> Option<Cow<'a, str>> {
        match name {
            ":method" => Some(Cow::Borrowed(self.method.as_str())),
            ":authority" | "host" if !self.authority.is_empty() => {
                Some(Cow::Borrowed(self.authority))
            }
            ":authority" | "host" => None,
            ":path" => (!self.path.is_empty()).then_some(Cow::Borrowed(self.path)),
            ":scheme" => self.scheme.map(Cow::Borrowed),
            _ => {
                let mut values = self.headers.get_all(name).iter();
                let first = values.next()?;
                let mut joined = String::from_utf8_lossy(first.as_bytes());
                for v in values {
                    let s = joined.to_mut();
                    s.push(',');
                    s.push_str(&String::from_utf8_lossy(v.as_bytes()));
                }
                Some(joined)
            }
        }
    }

    /// The first value of query parameter `name`, as sent (Envoy matches query values undecoded);
    /// a parameter without `=` has the empty value.
    pub fn query_param(&self, name: &str) -> Option<&'a str> {
        let path = self.path.split('#').next().unwrap_or("");
        let (_, query) = path.split_once('?')?;
        query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then_some(v)
        })
    }
}

/// Whether `headers` carry a gRPC content type (`application/grpc`, `application/grpc+proto` …,
/// not `application/grpc-web`), as Envoy decides it.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    const GRPC: &str = "application/grpc";
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.strip_prefix(GRPC)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('+'))
        })
}

/// The host a virtual host is chosen by: lower-cased, the port removed only when the route table
/// says `ignore_port_in_host_matching` (an IPv6 literal keeps its brackets).
pub fn host_for_matching(authority: &str, ignore_port: bool) -> String {
    let host = if ignore_port {
        strip_port(authority)
    } else {
        authority
    };
    host.to_ascii_lowercase()
}

/// `authority` without a trailing `:port` (`[::1]:80` → `[::1]`, `[::1]` unchanged).
pub fn strip_port(authority: &str) -> &str {
    match authority.rfind(':') {
        Some(colon) if authority.rfind(']').is_none_or(|close| close < colon) => {
            &authority[..colon]
        }
        _ => authority,
    }
}

/// The virtual host for a request's authority. A request without an authority only reaches a `*`
/// virtual host.
pub fn virtual_host<'r>(rc: &'r RouteConfig, authority: &str) -> Option<&'r VirtualHost> {
    if authority.is_empty() {
        return rc.domain_index.any().and_then(|i| rc.virtual_hosts.get(i));
    }
    let host = if rc.ignore_port_in_host_matching {
        strip_port(authority)
    } else {
        authority
    };
    // `RouteConfig::virtual_host` lower-cases only when it must (hosts usually arrive lower-case).
    rc.virtual_host(host)
}

/// Whether every condition of `m` holds for `req`; `random` decides `runtime_fraction`.
/// `ignore_path_parameters` is the route table's `ignore_path_parameters_in_path_matching`.
pub fn route_matches(
    m: &RouteMatch,
    req: &RequestView<'_>,
    random: u64,
    ignore_path_parameters: bool,
) -> bool {
    if !conditions_hold(m, req, random) {
        return false;
    }
    let path = if ignore_path_parameters {
        without_path_parameters(req.path)
    } else {
        req.path
    };
    m.matches_path(path, req.is_connect)
}

/// Whether every condition of `m` but the path rule holds for `req`.
fn conditions_hold(m: &RouteMatch, req: &RequestView<'_>, random: u64) -> bool {
    if let Some(f) = m.runtime_fraction {
        let draw = random % u64::from(f.denominator.max(1));
        // The draw is below the denominator, a u32.
        if !f.hit(u32::try_from(draw).unwrap_or(u32::MAX)) {
            return false;
        }
    }
    if let Some((presented, validated)) = m.tls_context
        && (presented.is_some_and(|p| p != req.peer_cert_presented)
            || validated.is_some_and(|v| v != req.peer_cert_validated))
    {
        return false;
    }
    if !m
        .headers
        .iter()
        .all(|h| h.matches(req.header(&h.name).as_deref()))
    {
        return false;
    }
    let query_ok = m
        .query_parameters
        .iter()
        .all(|q| match (req.query_param(&q.name), &q.value) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(v), Some(sm)) => sm.matches(v),
        });
    query_ok && (!m.grpc || req.is_grpc)
}

/// `path` cut at its first `;` (Envoy drops path parameters this way before matching).
fn without_path_parameters(path: &str) -> &str {
    path.split(';').next().unwrap_or(path)
}

/// The path as path rules see it: without query and fragment, and without path parameters when
/// `ignore_path_parameters` (what [`RouteMatch::matches_path`] cuts).
fn path_for_matching(path: &str, ignore_path_parameters: bool) -> &str {
    let cut = if ignore_path_parameters {
        path.find([';', '?', '#'])
    } else {
        path.find(['?', '#'])
    };
    cut.map_or(path, |i| &path[..i])
}

/// The virtual host and the first route of it that `req` matches; `random` (uniform) decides
/// `runtime_fraction` matches.
pub fn select<'r>(
    rc: &'r RouteConfig,
    req: &RequestView<'_>,
    random: u64,
) -> Option<(&'r VirtualHost, &'r Route)> {
    let vh = virtual_host(rc, req.authority)?;
    let path = path_for_matching(req.path, rc.ignore_path_parameters_in_path_matching);
    let i = vh.route_index.first_match(path, req.is_connect, |i| {
        vh.routes
            .get(i)
            .is_some_and(|r| conditions_hold(&r.matcher, req, random))
    })?;
    Some((vh, vh.routes.get(i)?))
}

/// The index of the weighted cluster `random` falls on: `random % total` walks the cumulative
/// weights, so a zero weight is never picked (Envoy's rule). `None` when no weight is positive.
pub fn weighted_index(targets: &[WeightedTarget], random: u64) -> Option<usize> {
    let total: u64 = targets.iter().map(|t| u64::from(t.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut point = random % total;
    for (i, t) in targets.iter().enumerate() {
        let w = u64::from(t.weight);
        if point < w {
            return Some(i);
        }
        point -= w;
    }
    None
}

/// The weighted cluster `random` falls on (see [`weighted_index`]).
pub fn weighted_pick(targets: &[WeightedTarget], random: u64) -> Option<&WeightedTarget> {
    weighted_index(targets, random).and_then(|i| targets.get(i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::route::{Action, ClusterRef, ClusterTarget};
    use serde_json::{Value as Json, json};
    use waypoint_proto::{envoy::config::route::v3::RouteConfiguration, json as pjson};

    fn compile(doc: Json) -> RouteConfig {
        let raw: RouteConfiguration = pjson::from_json(&doc).expect("decodes");
        RouteConfig::compile(&raw, "rc").expect("compiles")
    }

    fn direct(name: &str, m: Json) -> Json {
        json!({"name": name, "match": m, "direct_response": {"status": 200}})
    }

    fn vhosts(list: Json) -> RouteConfig {
        compile(json!({"name": "r", "virtual_hosts": list}))
    }

    fn routes(list: Json) -> RouteConfig {
        vhosts(json!([{"name": "vh", "domains": ["*"], "routes": list}]))
    }

    struct Req {
        method: Method,
        authority: String,
        path: String,
        headers: HeaderMap,
    }

    impl Req {
        fn get(authority: &str, path: &str) -> Self {
            Req {
                method: Method::GET,
                authority: authority.into(),
                path: path.into(),
                headers: HeaderMap::new(),
            }
        }

        fn header(mut self, k: &'static str, v: &'static str) -> Self {
            self.headers.append(k, http::HeaderValue::from_static(v));
            self
        }

        fn method(mut self, m: Method) -> Self {
            self.method = m;
            self
        }

        fn view(&self) -> RequestView<'_> {
            RequestView::new(&self.method, &self.authority, &self.path, &self.headers)
        }
    }

    fn vh_name(rc: &RouteConfig, authority: &str) -> Option<String> {
        virtual_host(rc, authority).map(|v| v.name.clone())
    }

    fn route_name(rc: &RouteConfig, req: &Req) -> Option<String> {
        select(rc, &req.view(), 0).map(|(_, r)| r.name.clone())
    }

    fn domains_table() -> RouteConfig {
        let vh = |name: &str, domains: Json| {
            json!({"name": name, "domains": domains,
                   "routes": [direct("r", json!({"prefix": "/"}))]})
        };
        vhosts(json!([
            vh("exact", json!(["api.example.com", "api.example.com:8080"])),
            vh("suffix-long", json!(["*.api.example.com"])),
            vh("suffix", json!(["*.example.com"])),
            vh("suffix-bare", json!(["*example.org"])),
            vh("prefix-long", json!(["api.example.*"])),
            vh("prefix", json!(["api.*"])),
            vh("any", json!(["*"])),
        ]))
    }

    #[test]
    fn virtual_host_order_exact_suffix_prefix_any() {
        let rc = domains_table();
        assert_eq!(vh_name(&rc, "api.example.com").as_deref(), Some("exact"));
        assert_eq!(vh_name(&rc, "API.Example.COM").as_deref(), Some("exact"));
        assert_eq!(
            vh_name(&rc, "v1.api.example.com").as_deref(),
            Some("suffix-long")
        );
        assert_eq!(vh_name(&rc, "www.example.com").as_deref(), Some("suffix"));
        // The suffix wildcard needs at least one character before the suffix.
        assert_eq!(vh_name(&rc, ".example.com").as_deref(), Some("any"));
        assert_eq!(
            vh_name(&rc, "myexample.org").as_deref(),
            Some("suffix-bare")
        );
        assert_eq!(vh_name(&rc, "example.org").as_deref(), Some("any"));
        // Suffix beats prefix: api.example.com.evil would be prefix-long.
        assert_eq!(
            vh_name(&rc, "api.example.net").as_deref(),
            Some("prefix-long")
        );
        assert_eq!(vh_name(&rc, "api.other").as_deref(), Some("prefix"));
        assert_eq!(vh_name(&rc, "unknown.host").as_deref(), Some("any"));
    }

    #[test]
    fn host_port_is_matched_as_sent() {
        let rc = domains_table();
        assert_eq!(
            vh_name(&rc, "api.example.com:8080").as_deref(),
            Some("exact")
        );
        // No fallback to the host without its port (Envoy): `api.example.com:9090` is not an exact
        // domain, nor does it end with a suffix; the prefix wildcard `api.example.*` takes it.
        assert_eq!(
            vh_name(&rc, "api.example.com:9090").as_deref(),
            Some("prefix-long")
        );
        assert_eq!(vh_name(&rc, "www.example.com:80").as_deref(), Some("any"));
    }

    #[test]
    fn ignore_port_in_host_matching_strips_the_port() {
        let vh = |name: &str, domains: Json| {
            json!({"name": name, "domains": domains,
                   "routes": [direct("r", json!({"prefix": "/"}))]})
        };
        let rc = compile(json!({"name": "r", "ignore_port_in_host_matching": true,
            "virtual_hosts": [vh("exact", json!(["svc.ns"])), vh("suffix", json!(["*.example.com"])),
                              vh("v6", json!(["[::1]"])), vh("any", json!(["*"]))]}));
        assert_eq!(vh_name(&rc, "svc.ns:9080").as_deref(), Some("exact"));
        assert_eq!(
            vh_name(&rc, "www.example.com:80").as_deref(),
            Some("suffix")
        );
        assert_eq!(vh_name(&rc, "[::1]:443").as_deref(), Some("v6"));
        assert_eq!(vh_name(&rc, "[::1]").as_deref(), Some("v6"));
    }

    #[test]
    fn strip_port_handles_ipv6_literals() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("a.b"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("10.0.0.1:15008"), "10.0.0.1");
    }

    #[test]
    fn no_authority_reaches_only_the_any_host() {
        let rc = domains_table();
        assert_eq!(vh_name(&rc, "").as_deref(), Some("any"));
        let rc = vhosts(json!([{"name": "only", "domains": ["a.b"],
                                "routes": [direct("r", json!({"prefix": "/"}))]}]));
        assert_eq!(vh_name(&rc, ""), None);
        assert_eq!(vh_name(&rc, "c.d"), None);
        assert!(select(&rc, &Req::get("c.d", "/").view(), 0).is_none());
    }

    #[test]
    fn istiod_inbound_vip_shape_routes_everything() {
        // `inbound|http|8000`: domains ["*"], one route with prefix "/".
        let rc = routes(json!([{"name": "default", "match": {"prefix": "/"},
                                "route": {"cluster": "inbound-vip|8000|http|httpbin.default.svc.cluster.local",
                                          "timeout": "0s"}}]));
        for (authority, path) in [
            ("httpbin.default.svc.cluster.local:8000", "/"),
            ("10.96.0.100:8000", "/status/200?x=1"),
            ("anything", "/a/b/c"),
        ] {
            let req = Req::get(authority, path);
            let (vh, route) = select(&rc, &req.view(), 7).expect("routed");
            assert_eq!(vh.name, "vh");
            assert_eq!(route.name, "default");
            let Action::Forward(f) = &route.action else {
                panic!("forward");
            };
            assert!(
                matches!(&f.target, ClusterTarget::Name(n) if n.starts_with("inbound-vip|8000"))
            );
        }
        // CONNECT does not match a path rule.
        let req = Req::get("10.0.0.1:8000", "").method(Method::CONNECT);
        assert!(select(&rc, &req.view(), 0).is_none());
    }

    #[test]
    fn istiod_connect_terminate_shape_matches_only_connect() {
        let rc = routes(json!([{"match": {"connect_matcher": {}},
            "route": {"cluster": "main_internal",
                      "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]}}]));
        let connect = Req::get("10.0.0.7:8080", "").method(Method::CONNECT);
        let (_, route) = select(&rc, &connect.view(), 0).expect("CONNECT routed");
        assert!(matches!(&route.action, Action::Forward(f)
            if matches!(&f.target, ClusterTarget::Name(n) if n == "main_internal")));
        assert!(select(&rc, &Req::get("10.0.0.7:8080", "/").view(), 0).is_none());
    }

    #[test]
    fn from_parts_reads_authority_path_and_connect() {
        let req = http::Request::builder()
            .method(Method::CONNECT)
            .uri("10.0.0.7:8080")
            .body(())
            .expect("request");
        let (parts, ()) = req.into_parts();
        let view = RequestView::from_parts(&parts);
        assert!(view.is_connect);
        assert_eq!(view.authority, "10.0.0.7:8080");
        assert_eq!(view.path, "");

        let req = http::Request::builder()
            .uri("/a?b=c")
            .header("host", "svc:80")
            .header("content-type", "application/grpc+proto")
            .body(())
            .expect("request");
        let (parts, ()) = req.into_parts();
        let view = RequestView::from_parts(&parts);
        assert!(!view.is_connect && view.is_grpc);
        assert_eq!(view.authority, "svc:80");
        assert_eq!(view.path, "/a?b=c");

        let req = http::Request::builder()
            .uri("http://h2.example:8443/x")
            .header("host", "ignored")
            .body(())
            .expect("request");
        let (parts, ()) = req.into_parts();
        let view = RequestView::from_parts(&parts);
        assert_eq!(view.authority, "h2.example:8443");
        assert_eq!(view.scheme, Some("http"));
        assert_eq!(
            view.header(":authority").as_deref(),
            Some("h2.example:8443")
        );

        // An extended CONNECT (HTTP/2 WebSocket) is an upgrade, not a CONNECT.
        let mut req = http::Request::builder()
            .method(Method::CONNECT)
            .uri("https://ws.example/chat")
            .body(())
            .expect("request");
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        let (parts, ()) = req.into_parts();
        assert!(!RequestView::from_parts(&parts).is_connect);
    }

    #[test]
    fn path_rules_ignore_the_query_and_honour_case_sensitivity() {
        let rc = routes(json!([
            direct("exact", json!({"path": "/exact"})),
            direct("sep", json!({"path_separated_prefix": "/api"})),
            direct("regex", json!({"safe_regex": {"regex": "/r/[0-9]+"}})),
            direct("ci", json!({"prefix": "/CI/", "case_sensitive": false})),
            direct("cs", json!({"prefix": "/Cs/"})),
        ]));
        let name = |p: &str| route_name(&rc, &Req::get("h", p));
        assert_eq!(name("/exact").as_deref(), Some("exact"));
        assert_eq!(name("/exact?q=1").as_deref(), Some("exact"));
        assert_eq!(name("/exact/").as_deref(), None);
        assert_eq!(name("/api").as_deref(), Some("sep"));
        assert_eq!(name("/api/v1").as_deref(), Some("sep"));
        assert_eq!(name("/api?x").as_deref(), Some("sep"));
        assert_eq!(name("/apiv1").as_deref(), None);
        assert_eq!(name("/r/123?x=y").as_deref(), Some("regex"));
        assert_eq!(name("/r/123/x").as_deref(), None);
        assert_eq!(name("/ci/x").as_deref(), Some("ci"));
        assert_eq!(name("/cI/x").as_deref(), Some("ci"));
        assert_eq!(name("/Cs/x").as_deref(), Some("cs"));
        assert_eq!(name("/cs/x").as_deref(), None);
    }

    #[test]
    fn first_matching_route_wins() {
        let rc = routes(json!([
            direct("specific", json!({"prefix": "/a/b"})),
            direct("general", json!({"prefix": "/a"})),
            direct("shadowed", json!({"prefix": "/a/b/c"})),
        ]));
        assert_eq!(
            route_name(&rc, &Req::get("h", "/a/b/c")).as_deref(),
            Some("specific")
        );
        assert_eq!(
            route_name(&rc, &Req::get("h", "/a/x")).as_deref(),
            Some("general")
        );
        assert_eq!(route_name(&rc, &Req::get("h", "/b")), None);
    }

    #[test]
    fn header_matchers_all_must_hold_and_see_pseudo_headers() {
        let rc = routes(json!([
            direct(
                "both",
                json!({"prefix": "/", "headers": [
                {"name": "x-user", "string_match": {"exact": "a"}},
                {"name": ":method", "string_match": {"exact": "POST"}}]})
            ),
            direct(
                "absent",
                json!({"prefix": "/", "headers": [
                {"name": "x-debug", "present_match": false}]})
            ),
            direct(
                "joined",
                json!({"prefix": "/", "headers": [
                {"name": "x-multi", "string_match": {"exact": "1,2"}}]})
            ),
            direct(
                "authority",
                json!({"prefix": "/", "headers": [
                {"name": ":authority", "string_match": {"suffix": ":9080"}}]})
            ),
            direct("fallback", json!({"prefix": "/"})),
        ]));
        let post = Req::get("h", "/")
            .method(Method::POST)
            .header("x-user", "a");
        assert_eq!(route_name(&rc, &post).as_deref(), Some("both"));
        let get = Req::get("h", "/").header("x-user", "a");
        assert_eq!(route_name(&rc, &get).as_deref(), Some("absent"));
        let multi = Req::get("h", "/")
            .header("x-debug", "1")
            .header("x-multi", "1")
            .header("x-multi", "2");
        assert_eq!(route_name(&rc, &multi).as_deref(), Some("joined"));
        let port = Req::get("svc:9080", "/").header("x-debug", "1");
        assert_eq!(route_name(&rc, &port).as_deref(), Some("authority"));
        let none = Req::get("svc", "/").header("x-debug", "1");
        assert_eq!(route_name(&rc, &none).as_deref(), Some("fallback"));
    }

    #[test]
    fn query_parameter_matchers_all_must_hold() {
        let rc = routes(json!([
            direct(
                "q",
                json!({"prefix": "/", "query_parameters": [
                {"name": "debug", "present_match": true},
                {"name": "v", "string_match": {"exact": "2"}}]})
            ),
            direct("fallback", json!({"prefix": "/"})),
        ]));
        let name = |p: &str| route_name(&rc, &Req::get("h", p));
        assert_eq!(name("/x?debug&v=2").as_deref(), Some("q"));
        assert_eq!(name("/x?v=2&debug=0").as_deref(), Some("q"));
        assert_eq!(name("/x?v=2").as_deref(), Some("fallback"));
        assert_eq!(name("/x?debug&v=3").as_deref(), Some("fallback"));
        // The first value counts; values are not decoded.
        assert_eq!(name("/x?debug&v=3&v=2").as_deref(), Some("fallback"));
        assert_eq!(name("/x?debug&v=%32").as_deref(), Some("fallback"));
        // A fragment is not part of the query.
        assert_eq!(name("/x?debug#&v=2").as_deref(), Some("fallback"));
    }

    #[test]
    fn grpc_matcher_needs_a_grpc_content_type() {
        let rc = routes(json!([
            direct("grpc", json!({"prefix": "/", "grpc": {}})),
            direct("other", json!({"prefix": "/"})),
        ]));
        for (ct, want) in [
            ("application/grpc", "grpc"),
            ("application/grpc+proto", "grpc"),
            ("application/grpc-web", "other"),
            ("application/json", "other"),
        ] {
            let mut req = Req::get("h", "/pkg.Svc/M");
            req.headers
                .insert(header::CONTENT_TYPE, ct.parse().expect("value"));
            assert_eq!(route_name(&rc, &req).as_deref(), Some(want), "{ct}");
        }
        assert_eq!(
            route_name(&rc, &Req::get("h", "/")).as_deref(),
            Some("other")
        );
    }

    #[test]
    fn runtime_fraction_uses_the_random_value() {
        let rc = routes(json!([
            direct(
                "canary",
                json!({"prefix": "/", "runtime_fraction": {
                "default_value": {"numerator": 25, "denominator": "HUNDRED"}, "runtime_key": "k"}})
            ),
            direct("stable", json!({"prefix": "/"})),
        ]));
        let req = Req::get("h", "/");
        let pick = |random| select(&rc, &req.view(), random).map(|(_, r)| r.name.clone());
        assert_eq!(pick(0).as_deref(), Some("canary"));
        assert_eq!(pick(24).as_deref(), Some("canary"));
        assert_eq!(pick(25).as_deref(), Some("stable"));
        assert_eq!(pick(99).as_deref(), Some("stable"));
        assert_eq!(pick(124).as_deref(), Some("canary"));
        let hits = (0..1000u64)
            .filter(|r| pick(*r).as_deref() == Some("canary"))
            .count();
        assert_eq!(hits, 250);
        // An unset default is 0%.
        let rc = routes(json!([direct(
            "never",
            json!({"prefix": "/", "runtime_fraction": {"runtime_key": "k"}})
        ),]));
        assert!(select(&rc, &req.view(), 0).is_none());
    }

    #[test]
    fn tls_context_match_reads_the_peer_certificate_facts() {
        let rc = routes(json!([
            direct(
                "mtls",
                json!({"prefix": "/", "tls_context": {"presented": true, "validated": true}})
            ),
            direct("plain", json!({"prefix": "/"})),
        ]));
        let req = Req::get("h", "/");
        let mut view = req.view();
        assert_eq!(
            select(&rc, &view, 0).map(|(_, r)| r.name.as_str()),
            Some("plain")
        );
        view.peer_cert_presented = true;
        assert_eq!(
            select(&rc, &view, 0).map(|(_, r)| r.name.as_str()),
            Some("plain")
        );
        view.peer_cert_validated = true;
        assert_eq!(
            select(&rc, &view, 0).map(|(_, r)| r.name.as_str()),
            Some("mtls")
        );
    }

    #[test]
    fn path_parameters_are_ignored_when_configured() {
        let table = |ignore: bool| {
            compile(
                json!({"name": "r", "ignore_path_parameters_in_path_matching": ignore,
                "virtual_hosts": [{"name": "vh", "domains": ["*"],
                    "routes": [direct("exact", json!({"path": "/api/x"}))]}]}),
            )
        };
        let req = Req::get("h", "/api/x;jsessionid=1?q");
        assert_eq!(route_name(&table(true), &req).as_deref(), Some("exact"));
        assert_eq!(route_name(&table(false), &req), None);
    }

    fn targets(weights: &[u32]) -> Vec<WeightedTarget> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| WeightedTarget {
                cluster: ClusterRef::Name(format!("c{i}")),
                weight: *w,
                headers: Default::default(),
                host_rewrite_literal: None,
            })
            .collect()
    }

    fn pick_name(t: &[WeightedTarget], random: u64) -> Option<String> {
        weighted_pick(t, random).map(|w| match &w.cluster {
            ClusterRef::Name(n) | ClusterRef::Header(n) => n.clone(),
        })
    }

    #[test]
    fn weighted_pick_walks_cumulative_weights() {
        let t = targets(&[90, 0, 10]);
        assert_eq!(pick_name(&t, 0).as_deref(), Some("c0"));
        assert_eq!(pick_name(&t, 89).as_deref(), Some("c0"));
        assert_eq!(pick_name(&t, 90).as_deref(), Some("c2"));
        assert_eq!(pick_name(&t, 99).as_deref(), Some("c2"));
        assert_eq!(pick_name(&t, 100).as_deref(), Some("c0"));
        assert_eq!(pick_name(&t, u64::MAX).as_deref(), Some("c0"));
        assert_eq!(weighted_index(&t, 95), Some(2));
        let counts = (0..1000u64).fold([0usize; 3], |mut acc, r| {
            if let Some(i) = weighted_index(&t, r) {
                acc[i] += 1;
            }
            acc
        });
        assert_eq!(counts, [900, 0, 100]);
        assert!(weighted_pick(&targets(&[0, 0]), 3).is_none());
        assert!(weighted_pick(&[], 3).is_none());
    }

    #[test]
    fn weighted_pick_on_compiled_weighted_clusters() {
        let rc = routes(
            json!([{"name": "w", "match": {"prefix": "/"}, "route": {"weighted_clusters": {
            "clusters": [{"name": "v1", "weight": 1}, {"name": "v2", "weight": 3}]}}}]),
        );
        let (_, route) = select(&rc, &Req::get("h", "/").view(), 0).expect("routed");
        let Action::Forward(f) = &route.action else {
            panic!("forward");
        };
        let ClusterTarget::Weighted { clusters, .. } = &f.target else {
            panic!("weighted");
        };
        assert_eq!(pick_name(clusters, 0).as_deref(), Some("v1"));
        assert_eq!(pick_name(clusters, 1).as_deref(), Some("v2"));
        assert_eq!(pick_name(clusters, 3).as_deref(), Some("v2"));
        assert_eq!(pick_name(clusters, 4).as_deref(), Some("v1"));
    }

    /// Envoy's rules applied literally: every domain of every virtual host ranked, then every
    /// route in order. The indexed selection must agree with it.
    fn select_by_scan<'r>(
        rc: &'r RouteConfig,
        req: &RequestView<'_>,
        random: u64,
    ) -> Option<(&'r VirtualHost, &'r Route)> {
        use crate::config::route::Domain;
        let vh = if req.authority.is_empty() {
            rc.virtual_hosts
                .iter()
                .find(|vh| vh.domains.contains(&Domain::Any))
        } else {
            let host = host_for_matching(req.authority, rc.ignore_port_in_host_matching);
            let mut best: Option<(u8, usize, &VirtualHost)> = None;
            for vh in &rc.virtual_hosts {
                for d in vh.domains.iter().filter(|d| d.matches(&host)) {
                    let rank = match d {
                        Domain::Exact(_) => (3, usize::MAX),
                        Domain::Suffix(s) => (2, s.len()),
                        Domain::Prefix(p) => (1, p.len()),
                        Domain::Any => (0, 0),
                    };
                    if best.is_none_or(|(r, l, _)| rank > (r, l)) {
                        best = Some((rank.0, rank.1, vh));
                    }
                }
            }
            best.map(|(_, _, vh)| vh)
        }?;
        let route = vh.routes.iter().find(|r| {
            route_matches(
                &r.matcher,
                req,
                random,
                rc.ignore_path_parameters_in_path_matching,
            )
        })?;
        Some((vh, route))
    }

    /// splitmix64: a fixed-seed generator, so a failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len())]
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.next() % 100 < percent
        }
    }

    const SEGMENTS: &[&str] = &["a", "b", "ab", "A", "api", "v1", "Api", "é"];

    fn random_path(rng: &mut Rng, max_segments: usize) -> String {
        let mut p = String::new();
        for _ in 0..rng.below(max_segments + 1) {
            p.push('/');
            let segment: &&str = rng.pick(SEGMENTS);
            p.push_str(segment);
        }
        p
    }

    fn random_route(rng: &mut Rng, i: usize) -> Json {
        let mut m = serde_json::Map::new();
        match rng.below(6) {
            0 => {
                // Whole or partial segments, the empty prefix and "/" included.
                let mut p = random_path(rng, 3);
                if rng.chance(30) {
                    // A partial last segment.
                    p.pop();
                }
                if rng.chance(20) {
                    p.push('/');
                }
                m.insert("prefix".into(), json!(p));
            }
            1 => {
                let mut p = random_path(rng, 3);
                if rng.chance(20) {
                    p.push('/');
                }
                m.insert("path".into(), json!(p));
            }
            2 => {
                let re = *rng.pick(&[
                    "/a/.*",
                    "/[ab]+",
                    "/api/v[0-9]",
                    "/(a|b)/b",
                    "/A.*",
                    "/.*/ab",
                    "/api/v[0-9]",
                ]);
                m.insert("safe_regex".into(), json!({"regex": re}));
            }
            3 => {
                let mut p = random_path(rng, 2);
                if p.is_empty() {
                    p.push('/');
                }
                m.insert("path_separated_prefix".into(), json!(p));
            }
            4 => {
                m.insert("connect_matcher".into(), json!({}));
            }
            _ => {
                m.insert("prefix".into(), json!("/"));
            }
        }
        match rng.below(3) {
            0 => {}
            1 => {
                m.insert("case_sensitive".into(), json!(false));
            }
            _ => {
                m.insert("case_sensitive".into(), json!(true));
            }
        }
        // The same path under different header rules: the header decides between them.
        let mut headers = Vec::new();
        for _ in 0..rng.below(3) {
            headers.push(match rng.below(4) {
                0 => json!({"name": "x-h", "string_match": {"exact": rng.pick(&["1", "2"])}}),
                1 => json!({"name": "x-h", "present_match": true}),
                2 => json!({"name": "x-h", "present_match": true, "invert_match": true}),
                _ => json!({"name": ":method", "string_match": {"exact": "POST"}}),
            });
        }
        if !headers.is_empty() {
            m.insert("headers".into(), json!(headers));
        }
        if rng.chance(15) {
            m.insert(
                "query_parameters".into(),
                json!([{"name": "q", "string_match": {"exact": "1"}}]),
            );
        }
        if rng.chance(10) {
            m.insert("grpc".into(), json!({}));
        }
        if rng.chance(10) {
            m.insert(
                "runtime_fraction".into(),
                json!({"default_value": {"numerator": 50, "denominator": "HUNDRED"},
                       "runtime_key": "k"}),
            );
        }
        direct(&format!("r{i}"), Json::Object(m))
    }

    const DOMAINS: &[&str] = &[
        "a.com", "b.a.com", "a.com:80", "*.a.com", "*a.com", "*.com", "b.a.*", "A.*", "é.com", "*",
    ];

    fn random_table(rng: &mut Rng) -> RouteConfig {
        let mut domains: Vec<&str> = DOMAINS.to_vec();
        let mut vhs = Vec::new();
        let mut next_route = 0;
        for v in 0..1 + rng.below(4) {
            let mut mine = Vec::new();
            for _ in 0..1 + rng.below(3) {
                if domains.is_empty() {
                    break;
                }
                let at = rng.below(domains.len());
                mine.push(domains.remove(at));
            }
            if mine.is_empty() {
                break;
            }
            let routes: Vec<Json> = (0..rng.below(40))
                .map(|_| {
                    next_route += 1;
                    random_route(rng, next_route)
                })
                .collect();
            vhs.push(json!({"name": format!("vh{v}"), "domains": mine, "routes": routes}));
        }
        compile(json!({"name": "r",
            "ignore_port_in_host_matching": rng.chance(30),
            "ignore_path_parameters_in_path_matching": rng.chance(30),
            "virtual_hosts": vhs}))
    }

    fn random_request(rng: &mut Rng) -> Req {
        let host = *rng.pick(&[
            "",
            "a.com",
            "A.COM",
            "b.a.com",
            "x.b.a.com",
            "xa.com",
            "a.com:80",
            "a.com:81",
            "a.org",
            "b.a.net",
            "é.com",
            "[::1]:80",
        ]);
        let mut path = random_path(rng, 4);
        if rng.chance(20) {
            path.push('/');
        }
        for suffix in [";p=1", "?q=1", "?q=2", "#f"] {
            if rng.chance(15) {
                path.push_str(suffix);
            }
        }
        let mut req = Req::get(host, &path);
        if rng.chance(10) {
            req = req.method(Method::CONNECT);
        } else if rng.chance(30) {
            req = req.method(Method::POST);
        }
        match rng.below(3) {
            0 => {}
            1 => req = req.header("x-h", "1"),
            _ => req = req.header("x-h", "2"),
        }
        if rng.chance(20) {
            req = req.header("content-type", "application/grpc");
        }
        req
    }

    #[test]
    fn indexed_selection_agrees_with_a_scan_in_order() {
        let mut rng = Rng(0x5eed_0009);
        let mut routed = 0;
        for _ in 0..300 {
            let rc = random_table(&mut rng);
            for _ in 0..200 {
                let req = random_request(&mut rng);
                let random = rng.next();
                let view = req.view();
                let names = |hit: Option<(&VirtualHost, &Route)>| {
                    hit.map(|(vh, r)| (vh.name.clone(), r.name.clone()))
                };
                let want = names(select_by_scan(&rc, &view, random));
                assert_eq!(
                    names(select(&rc, &view, random)),
                    want,
                    "{} {}{:?}",
                    req.method,
                    req.authority,
                    req.path
                );
                routed += usize::from(want.is_some());
            }
        }
        // The generator must exercise matches, not only misses.
        assert!(routed > 10_000, "only {routed} of 60000 requests routed");
    }

    #[test]
    fn same_path_routes_are_told_apart_by_headers_in_order() {
        let rc = routes(json!([
            direct(
                "one",
                json!({"path": "/p", "headers": [
                {"name": "x-h", "string_match": {"exact": "1"}}]})
            ),
            direct(
                "regex-two",
                json!({"safe_regex": {"regex": "/p"}, "headers": [
                {"name": "x-h", "string_match": {"exact": "2"}}]})
            ),
            direct(
                "prefix-two",
                json!({"prefix": "/p", "headers": [
                {"name": "x-h", "string_match": {"exact": "2"}}]})
            ),
            direct("ci", json!({"prefix": "/P", "case_sensitive": false})),
            direct("any", json!({"path": "/p"})),
        ]));
        let name = |v: Option<&'static str>| {
            let mut req = Req::get("h", "/p");
            if let Some(v) = v {
                req = req.header("x-h", v);
            }
            route_name(&rc, &req)
        };
        assert_eq!(name(Some("1")).as_deref(), Some("one"));
        assert_eq!(name(Some("2")).as_deref(), Some("regex-two"));
        assert_eq!(name(None).as_deref(), Some("ci"));
    }

    #[test]
    fn identical_regexes_are_compiled_once() {
        let ua = json!([{"name": "ua", "string_match": {"safe_regex": {"regex": "grpc-go/.*"}}}]);
        let table = json!([
            direct(
                "a",
                json!({"safe_regex": {"regex": "/x/[0-9]+"}, "headers": ua})
            ),
            direct("b", json!({"prefix": "/", "headers": ua})),
            direct(
                "c",
                json!({"safe_regex": {"regex": "/x/[0-9]+"}, "headers": ua})
            ),
        ]);
        let before = crate::config::matchers::compiled_regexes();
        let rc = routes(table.clone());
        assert_eq!(crate::config::matchers::compiled_regexes() - before, 2);
        // Each table compiles its own: sharing is scoped to one compile.
        let _again = routes(table);
        assert_eq!(crate::config::matchers::compiled_regexes() - before, 4);
        let req = Req::get("h", "/x/1").header("ua", "grpc-go/1.2");
        assert_eq!(route_name(&rc, &req).as_deref(), Some("a"));
        let req = Req::get("h", "/x/1").header("ua", "curl");
        assert_eq!(route_name(&rc, &req), None);
    }
}
