//! RBAC evaluation: runs the compiled engines of `envoy.filters.http.rbac` and
//! `envoy.filters.network.rbac` ([`Rules`]) against one request or connection, with Envoy's
//! semantics (`envoy.config.rbac.v3`): a policy matches when any of its permissions AND any of its
//! principals match; the first matching policy in name order is the effective policy; the action
//! turns that into allow/deny; a shadow engine is evaluated the same way but never enforced.
//!
//! The data path describes the request in an [`RbacInput`] made of borrowed views (headers,
//! addresses, filter state and dynamic metadata lookups), so evaluation builds no strings except
//! where a matcher needs one (several values of one header joined by `,`, case-insensitive
//! matching).

use std::{borrow::Cow, net::SocketAddr};

use http::HeaderMap;
use serde_json::Value as Json;

use crate::config::{
    filters::rbac::{Action, Permission, Policy, Principal, Rules},
    matchers::{Cidr, HeaderMatch, MetadataMatch, StringMatch, ValueMatch},
};

/// The TLS peer of the connection RBAC runs on, as Envoy's `Connection::ssl()` exposes it.
#[derive(Debug, Clone, Copy, Default)]
pub struct TlsPeer<'a> {
    /// URI SANs of the peer certificate (Istio: one SPIFFE ID). Empty without a peer certificate.
    pub uri_sans: &'a [String],
    /// DNS SANs of the peer certificate.
    pub dns_sans: &'a [String],
    /// The peer certificate's subject; empty without a peer certificate.
    pub subject: &'a str,
}

/// Looks up a filter state object by key, in its string form (`serializeAsString`).
pub type FilterStateLookup<'a> = dyn Fn(&str) -> Option<&'a str> + 'a;

/// Looks up dynamic metadata: the value in namespace `filter` (e.g. `envoy.filters.http.jwt_authn`)
/// at `path` (keys into nested structs); `None` when any step is missing or not a struct.
pub type MetadataLookup<'a> = dyn Fn(&str, &[String]) -> Option<&'a Json> + 'a;

/// What RBAC sees of one request (HTTP filter) or connection (network filter).
///
/// The lookups return borrows (no per-request copies); their output lifetime is the input's, so
/// build them as local closures over data that outlives the input, e.g.
/// `let fs = |k: &str| stream.get(k).or_else(|| conn.filter_state.get(k));`.
pub struct RbacInput<'a> {
    /// Request headers as the HCM hands them to filters (after path normalization); `None` for the
    /// network filter, where every header matcher sees an absent header, as in Envoy.
    pub headers: Option<&'a HeaderMap>,
    /// `:method`.
    pub method: Option<&'a str>,
    /// `:path`, with its query (header matchers see it whole; `url_path` strips `?…` and `#…`).
    pub path: Option<&'a str>,
    /// `:authority`; when `None` the `host` header stands in (HTTP/1, as Envoy's codec maps it).
    pub authority: Option<&'a str>,
    /// `:scheme`.
    pub scheme: Option<&'a str>,
    /// The downstream remote address (`remote_ip`): after `original_src`/PROXY protocol and
    /// `x-forwarded-for` processing.
    pub source: Option<SocketAddr>,
    /// The downstream directly connected peer (`direct_remote_ip` and the deprecated
    /// `source_ip`). `None` never matches; pass `source` again when there is no XFF.
    pub direct_source: Option<SocketAddr>,
    /// The downstream local address after `original_dst` (`destination_ip`, `destination_port`,
    /// `destination_port_range`).
    pub destination: Option<SocketAddr>,
    /// The SNI (`requested_server_name`); Envoy matches the empty string when there is none.
    pub requested_server_name: Option<&'a str>,
    /// The TLS peer of this connection (`authenticated`); `None` when the connection is not TLS.
    /// On a waypoint's internal listener Envoy has no TLS connection (the identity travels in the
    /// `io.istio.peer_principal` filter state instead), so pass `None` there.
    pub peer: Option<TlsPeer<'a>>,
    /// Filter state (`filter_state` principals), stream level first then connection level.
    pub filter_state: &'a FilterStateLookup<'a>,
    /// Dynamic metadata (`metadata` permissions and principals, e.g. JWT claims).
    pub metadata: &'a MetadataLookup<'a>,
}

fn no_filter_state<'a>(_: &str) -> Option<&'a str> {
    None
}

fn no_metadata<'a>(_: &str, _: &[String]) -> Option<&'a Json> {
    None
}

impl Default for RbacInput<'_> {
    /// Nothing known: no headers, addresses, TLS, filter state or metadata.
    fn default() -> Self {
        RbacInput {
            headers: None,
            method: None,
            path: None,
            authority: None,
            scheme: None,
            source: None,
            direct_source: None,
            destination: None,
            requested_server_name: None,
            peer: None,
            filter_state: &no_filter_state,
            metadata: &no_metadata,
        }
    }
}

impl<'a> RbacInput<'a> {
    /// The value Envoy's header matchers see for `name` (lower case): pseudo-headers from the
    /// request line, other headers with all their values joined by `,`.
    fn header(&self, name: &str) -> Option<Cow<'a, str>> {
        match name {
            ":method" => self.method.map(Cow::Borrowed),
            ":path" => self.path.map(Cow::Borrowed),
            ":scheme" => self.scheme.map(Cow::Borrowed),
            ":authority" => match self.authority {
                Some(a) => Some(Cow::Borrowed(a)),
                None => self.joined("host"),
            },
            // Other pseudo-headers (`:protocol`, …) are not request headers here.
            n if n.starts_with(':') => None,
            n => self.joined(n),
        }
    }

    fn joined(&self, name: &str) -> Option<Cow<'a, str>> {
        let mut values = self.headers?.get_all(name).iter();
        let first = String::from_utf8_lossy(values.next()?.as_bytes());
        let Some(second) = values.next() else {
            return Some(first);
        };
        let mut out = first.into_owned();
        for v in std::iter::once(second).chain(values) {
            out.push(',');
            out.push_str(&String::from_utf8_lossy(v.as_bytes()));
        }
        Some(Cow::Owned(out))
    }

    /// `:path` without query and fragment (Envoy's `PathUtil::removeQueryAndFragment`).
    fn url_path(&self) -> Option<&'a str> {
        let path = self.path?;
        Some(path.find(['?', '#']).map_or(path, |i| &path[..i]))
    }
}

/// The index (into `rules.policies`, which is in Envoy's name order) of the first policy where
/// any permission and any principal match; `None` when no policy matches.
pub fn matched_policy(rules: &Rules, input: &RbacInput<'_>) -> Option<usize> {
    rules.policies.iter().position(|p| policy_matches(p, input))
}

fn policy_matches(policy: &Policy, input: &RbacInput<'_>) -> bool {
    policy.permissions.iter().any(|p| permission(p, input))
        && policy.principals.iter().any(|p| principal(p, input))
}

// Exhaustive on purpose: a permission the compiler learns must be evaluated here too.
fn permission(p: &Permission, input: &RbacInput<'_>) -> bool {
    match p {
        Permission::And(rules) => rules.iter().all(|r| permission(r, input)),
        Permission::Or(rules) => rules.iter().any(|r| permission(r, input)),
        Permission::Any => true,
        Permission::Header(h) => header(h, input),
        Permission::UrlPath(m) => url_path(m, input),
        Permission::DestinationIp(c) => ip_in(c, input.destination),
        Permission::DestinationPort(port) => input
            .destination
            .is_some_and(|d| u32::from(d.port()) == *port),
        Permission::DestinationPortRange(start, end) => input.destination.is_some_and(|d| {
            let port = i32::from(d.port());
            *start <= port && port < *end
        }),
        Permission::Metadata(m) => metadata(m, input),
        Permission::Not(r) => !permission(r, input),
        Permission::RequestedServerName(m) => m.matches(input.requested_server_name.unwrap_or("")),
        // Envoy matches the `:path` header; the network filter has none, so no match.
        Permission::UriTemplate(t) => input.url_path().is_some_and(|p| t.matches(p)),
    }
}

// Exhaustive on purpose: a principal the compiler learns must be evaluated here too.
fn principal(p: &Principal, input: &RbacInput<'_>) -> bool {
    match p {
        Principal::And(ids) => ids.iter().all(|i| principal(i, input)),
        Principal::Or(ids) => ids.iter().any(|i| principal(i, input)),
        Principal::Any => true,
        Principal::Authenticated(name) => authenticated(name.as_ref(), input.peer.as_ref()),
        Principal::DirectRemoteIp(c) => ip_in(c, input.direct_source),
        Principal::RemoteIp(c) => ip_in(c, input.source),
        Principal::Header(h) => header(h, input),
        Principal::UrlPath(m) => url_path(m, input),
        Principal::Metadata(m) => metadata(m, input),
        Principal::FilterState { key, value } => {
            (input.filter_state)(key).is_some_and(|v| value.matches(v))
        }
        Principal::Not(i) => !principal(i, input),
    }
}

/// Envoy's `AuthenticatedMatcher`: needs a TLS connection; without `principal_name` any TLS peer
/// matches; with it, any URI SAN, then any DNS SAN, then the subject.
fn authenticated(name: Option<&StringMatch>, peer: Option<&TlsPeer<'_>>) -> bool {
    match (peer, name) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(peer), Some(m)) => {
            peer.uri_sans.iter().any(|s| m.matches(s))
                || peer.dns_sans.iter().any(|s| m.matches(s))
                || m.matches(peer.subject)
        }
    }
}

fn header(h: &HeaderMatch, input: &RbacInput<'_>) -> bool {
    h.matches(input.header(&h.name).as_deref())
}

fn url_path(m: &StringMatch, input: &RbacInput<'_>) -> bool {
    input.url_path().is_some_and(|p| m.matches(p))
}

/// Dual-stack sockets report IPv4 peers as `::ffff:a.b.c.d`; Envoy sees them as IPv4.
fn ip_in(range: &Cidr, addr: Option<SocketAddr>) -> bool {
    addr.is_some_and(|a| range.contains(a.ip().to_canonical()))
}

fn metadata(m: &MetadataMatch, input: &RbacInput<'_>) -> bool {
    value_matches(&m.value, (input.metadata)(&m.filter, &m.path)) != m.invert
}

/// Envoy's `ValueMatcher` on a `google.protobuf.Value`; `None` is an unset value (missing path).
fn value_matches(m: &ValueMatch, value: Option<&Json>) -> bool {
    match m {
        ValueMatch::Null => matches!(value, Some(Json::Null)),
        ValueMatch::DoubleExact(x) => number(value).is_some_and(|n| n == *x),
        ValueMatch::DoubleRange(start, end) => {
            number(value).is_some_and(|n| *start <= n && n < *end)
        }
        ValueMatch::String(s) => matches!(value, Some(Json::String(v)) if s.matches(v)),
        ValueMatch::Bool(b) => matches!(value, Some(Json::Bool(v)) if v == b),
        // `present_match: false` never matches in Envoy (it is not "absent").
        ValueMatch::Present(want) => *want && value.is_some(),
        ValueMatch::ListOneOf(inner) => matches!(
            value,
            Some(Json::Array(items)) if items.iter().any(|i| value_matches(inner, Some(i)))
        ),
        ValueMatch::Or(any) => any.iter().any(|m| value_matches(m, value)),
    }
}

fn number(value: Option<&Json>) -> Option<f64> {
    match value {
        Some(Json::Number(n)) => n.as_f64(),
        _ => None,
    }
}

/// The outcome of the RBAC filter for one request or connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the enforced engine lets it through (no engine: allowed).
    pub allowed: bool,
    /// The enforced engine's effective policy: the first matching policy's name, whatever the
    /// action (for DENY it names the policy that denied).
    pub policy: Option<String>,
    /// The shadow engine's result, if there is one: (would allow, effective policy). It never
    /// changes `allowed`; Envoy reports it as `shadow_engine_result` / `shadow_effective_policy_id`
    /// dynamic metadata and `shadow_allowed` / `shadow_denied` stats.
    pub shadow: Option<(bool, Option<String>)>,
    /// For an enforced LOG engine: whether a policy matched, which Envoy publishes as
    /// `envoy.common` metadata `access_log_hint` for access loggers. `None` for other actions.
    pub access_log_hint: Option<bool>,
}

/// Runs the enforced engine `rules` (none: allow) and the dry-run engine `shadow` on `input`.
pub fn evaluate(rules: Option<&Rules>, shadow: Option<&Rules>, input: &RbacInput<'_>) -> Decision {
    let (allowed, policy, access_log_hint) = match rules {
        None => (true, None, None),
        Some(r) => {
            let matched = matched_policy(r, input);
            (
                r.allows(matched),
                policy_name(r, matched),
                (r.action == Action::Log).then_some(matched.is_some()),
            )
        }
    };
    let shadow = shadow.map(|s| {
        let matched = matched_policy(s, input);
        (s.allows(matched), policy_name(s, matched))
    });
    Decision {
        allowed,
        policy,
        shadow,
        access_log_hint,
    }
}

fn policy_name(rules: &Rules, matched: Option<usize>) -> Option<String> {
    matched
        .and_then(|i| rules.policies.get(i))
        .map(|p| p.name.clone())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use http::{HeaderMap, HeaderValue};
    use prost::Message;
    use serde_json::json;
    use waypoint_proto::{envoy::config::rbac::v3::Rbac as RawRbac, json as pjson};

    use super::*;

    /// Compiles an `envoy.config.rbac.v3.RBAC` written as proto3 JSON.
    fn rules(doc: Json) -> Rules {
        let dynamic =
            pjson::dynamic_from_json("envoy.config.rbac.v3.RBAC", &doc).expect("rbac json");
        let raw = RawRbac::decode(dynamic.encode_to_vec().as_slice()).expect("decodes");
        Rules::compile(&raw, "rules").expect("compiles")
    }

    /// One Istio policy (`ns[default]-policy[name]-rule[0]`) with the usual and/or wrapping.
    fn istio(action: &str, name: &str, permissions: Json, principals: Json) -> Rules {
        rules(json!({"action": action, "policies": {
            format!("ns[default]-policy[{name}]-rule[0]"): {
                "permissions": [{"and_rules": {"rules": permissions}}],
                "principals": [{"and_ids": {"ids": principals}}]}}}))
    }

    fn peer_principal(exact_or: Json) -> Json {
        json!({"filter_state": {"key": "io.istio.peer_principal", "string_match": exact_or}})
    }

    const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
    const OTHER: &str = "spiffe://cluster.local/ns/other/sa/client";

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    /// A request from the waypoint's point of view: identity in filter state, no TLS on the
    /// internal listener.
    fn request<'a>(
        state: &'a FilterStateLookup<'a>,
        method: &'a str,
        path: &'a str,
    ) -> RbacInput<'a> {
        RbacInput {
            method: Some(method),
            path: Some(path),
            authority: Some("reviews.default.svc.cluster.local:9080"),
            scheme: Some("http"),
            source: Some(addr("10.244.1.7:40000")),
            direct_source: Some(addr("10.244.1.7:40000")),
            destination: Some(addr("10.96.0.50:9080")),
            filter_state: state,
            ..RbacInput::default()
        }
    }

    /// A filter state lookup holding only `io.istio.peer_principal` (a macro so that each use is
    /// a plain closure, not an opaque type that drop check has to assume the worst of).
    macro_rules! principal_is {
        ($p:expr) => {
            |k: &str| (k == "io.istio.peer_principal").then_some($p)
        };
    }

    #[test]
    fn allow_by_filter_state_principal_method_and_path() {
        let r = istio(
            "ALLOW",
            "reviews-get",
            json!([
                {"or_rules": {"rules": [{"header": {"name": ":method", "string_match": {"exact": "GET"}}}]}},
                {"or_rules": {"rules": [{"url_path": {"path": {"prefix": "/api/"}}},
                                        {"url_path": {"path": {"exact": "/health"}}}]}}
            ]),
            json!([{"or_ids": {"ids": [peer_principal(json!({"exact": SLEEP}))]}}]),
        );
        let sleep = principal_is!(SLEEP);
        let other = principal_is!(OTHER);
        let d = evaluate(Some(&r), None, &request(&sleep, "GET", "/api/v1?x=/y"));
        assert!(d.allowed);
        assert_eq!(
            d.policy.as_deref(),
            Some("ns[default]-policy[reviews-get]-rule[0]")
        );
        assert_eq!((d.shadow, d.access_log_hint), (None, None));
        assert!(
            evaluate(
                Some(&r),
                None,
                &request(&sleep, "GET", "/health?verbose#top")
            )
            .allowed,
            "url_path ignores query and fragment"
        );
        assert!(!evaluate(Some(&r), None, &request(&sleep, "GET", "/healthz")).allowed);
        assert!(
            !evaluate(Some(&r), None, &request(&sleep, "GET", "/other?p=/api/")).allowed,
            "the query is not part of url_path"
        );
        assert!(!evaluate(Some(&r), None, &request(&sleep, "POST", "/api/v1")).allowed);
        let d = evaluate(Some(&r), None, &request(&other, "GET", "/api/v1"));
        assert_eq!((d.allowed, d.policy), (false, None));
        let none = |_: &str| None;
        assert!(
            !evaluate(Some(&r), None, &request(&none, "GET", "/api/v1")).allowed,
            "no peer principal in filter state: no match"
        );
        let mut connect = request(&sleep, "CONNECT", "/");
        connect.path = None;
        connect.method = Some("GET");
        assert!(
            !evaluate(Some(&r), None, &connect).allowed,
            "url_path needs a :path"
        );
    }

    #[test]
    fn istio_principal_prefix_namespace_and_service_account_forms() {
        // principals: ["cluster.local/ns/default/sa/*"] -> prefix; namespaces: ["prod-*"] ->
        // regex; serviceAccounts: ["default/sleep"] -> Istio's SA regex.
        let r = rules(json!({"action": "ALLOW", "policies": {
            "ns[default]-policy[a]-rule[0]": {
                "permissions": [{"any": true}],
                "principals": [{"and_ids": {"ids": [{"or_ids": {"ids": [
                    peer_principal(json!({"prefix": "spiffe://cluster.local/ns/default/sa/"}))]}}]}}]},
            "ns[default]-policy[b]-rule[0]": {
                "permissions": [{"any": true}],
                "principals": [{"and_ids": {"ids": [{"or_ids": {"ids": [
                    peer_principal(json!({"safe_regex": {"regex": ".*/ns/prod-.*/.*"}}))]}}]}}]},
            "ns[default]-policy[c]-rule[0]": {
                "permissions": [{"any": true}],
                "principals": [{"and_ids": {"ids": [{"or_ids": {"ids": [
                    peer_principal(json!({"safe_regex":
                        {"regex": "spiffe://.+/ns/tools/(.+/|)sa/curl(/.+)?"}}))]}}]}}]}
        }}));
        let check = |p: &'static str| {
            let state = principal_is!(p);
            evaluate(Some(&r), None, &request(&state, "GET", "/")).policy
        };
        assert_eq!(
            check(SLEEP).as_deref(),
            Some("ns[default]-policy[a]-rule[0]")
        );
        assert_eq!(
            check("spiffe://cluster.local/ns/prod-eu/sa/web").as_deref(),
            Some("ns[default]-policy[b]-rule[0]")
        );
        assert_eq!(check("spiffe://cluster.local/ns/prod/sa/web"), None);
        assert_eq!(
            check("spiffe://td/ns/tools/sa/curl").as_deref(),
            Some("ns[default]-policy[c]-rule[0]")
        );
        assert_eq!(
            check("spiffe://td/ns/tools/sa/curl-2"),
            None,
            "regex is a full match"
        );
        assert_eq!(check(OTHER), None);
    }

    #[test]
    fn deny_with_not_principals() {
        // DENY from everyone but sleep (notPrincipals), on DELETE or /admin.
        let r = istio(
            "DENY",
            "deny-admin",
            json!([{"or_rules": {"rules": [
                {"url_path": {"path": {"prefix": "/admin"}}},
                {"header": {"name": ":method", "string_match": {"exact": "DELETE"}}}]}}]),
            json!([{"not_id": {"or_ids": {"ids": [peer_principal(json!({"exact": SLEEP}))]}}}]),
        );
        let sleep = principal_is!(SLEEP);
        let other = principal_is!(OTHER);
        assert!(evaluate(Some(&r), None, &request(&sleep, "DELETE", "/admin")).allowed);
        let d = evaluate(Some(&r), None, &request(&other, "GET", "/admin/users"));
        assert!(!d.allowed);
        assert_eq!(
            d.policy.as_deref(),
            Some("ns[default]-policy[deny-admin]-rule[0]"),
            "the denying policy is reported"
        );
        assert!(!evaluate(Some(&r), None, &request(&other, "DELETE", "/x")).allowed);
        let d = evaluate(Some(&r), None, &request(&other, "GET", "/x"));
        assert_eq!((d.allowed, d.policy), (true, None));
    }

    #[test]
    fn not_rule_and_nested_sets() {
        // Istio `notPaths` / `notMethods` shape.
        let r = istio(
            "ALLOW",
            "not",
            json!([
                {"not_rule": {"or_rules": {"rules": [{"url_path": {"path": {"prefix": "/private"}}}]}}},
                {"not_rule": {"or_rules": {"rules": [
                    {"header": {"name": ":method", "string_match": {"exact": "PUT"}}},
                    {"header": {"name": ":method", "string_match": {"exact": "PATCH"}}}]}}}
            ]),
            json!([{"any": true}]),
        );
        let none = |_: &str| None;
        assert!(evaluate(Some(&r), None, &request(&none, "GET", "/public")).allowed);
        assert!(!evaluate(Some(&r), None, &request(&none, "GET", "/private/x")).allowed);
        assert!(!evaluate(Some(&r), None, &request(&none, "PATCH", "/public")).allowed);
    }

    #[test]
    fn destination_port_range_ip_and_sni() {
        // Network RBAC on a TCP chain: no headers at all.
        let r = rules(json!({"action": "ALLOW", "policies": {
            "ns[default]-policy[tcp]-rule[0]": {
                "permissions": [{"and_rules": {"rules": [
                    {"or_rules": {"rules": [{"destination_port": 9000},
                                            {"destination_port_range": {"start": 8000, "end": 8010}}]}},
                    {"or_rules": {"rules": [{"destination_ip": {"address_prefix": "10.96.0.0", "prefix_len": 16}}]}}]}}],
                "principals": [{"and_ids": {"ids": [{"any": true}]}}]},
            "ns[default]-policy[tls]-rule[0]": {
                "permissions": [{"requested_server_name": {"suffix": ".example.com"}}],
                "principals": [{"any": true}]}
        }}));
        let conn = |dst: &str| RbacInput {
            destination: Some(addr(dst)),
            ..RbacInput::default()
        };
        assert!(evaluate(Some(&r), None, &conn("10.96.3.4:9000")).allowed);
        assert!(evaluate(Some(&r), None, &conn("10.96.3.4:8000")).allowed);
        assert!(evaluate(Some(&r), None, &conn("10.96.3.4:8009")).allowed);
        assert!(
            !evaluate(Some(&r), None, &conn("10.96.3.4:8010")).allowed,
            "range end is exclusive"
        );
        assert!(!evaluate(Some(&r), None, &conn("10.97.3.4:9000")).allowed);
        assert!(
            evaluate(Some(&r), None, &conn("[::ffff:10.96.3.4]:9000")).allowed,
            "IPv4-mapped addresses match IPv4 ranges"
        );
        assert!(!evaluate(Some(&r), None, &RbacInput::default()).allowed);
        let sni = RbacInput {
            destination: Some(addr("192.168.1.1:443")),
            requested_server_name: Some("api.example.com"),
            ..RbacInput::default()
        };
        assert_eq!(
            evaluate(Some(&r), None, &sni).policy.as_deref(),
            Some("ns[default]-policy[tls]-rule[0]")
        );
    }

    #[test]
    fn remote_ip_direct_remote_ip_and_source_ip() {
        // remote_ip sees the XFF-derived client, direct_remote_ip and the deprecated source_ip
        // the direct peer.
        let r = rules(json!({"action": "DENY", "policies": {
            "a-remote": {"permissions": [{"any": true}],
                "principals": [{"remote_ip": {"address_prefix": "203.0.113.0", "prefix_len": 24}}]},
            "b-direct": {"permissions": [{"any": true}],
                "principals": [{"direct_remote_ip": {"address_prefix": "203.0.113.0", "prefix_len": 24}}]},
            "c-source": {"permissions": [{"any": true}],
                "principals": [{"source_ip": {"address_prefix": "10.244.0.0", "prefix_len": 16}}]}
        }}));
        let input = |source: &str, direct: &str| RbacInput {
            source: Some(addr(source)),
            direct_source: Some(addr(direct)),
            ..RbacInput::default()
        };
        let d = evaluate(Some(&r), None, &input("203.0.113.9:1", "10.244.1.7:2"));
        assert_eq!((d.allowed, d.policy.as_deref()), (false, Some("a-remote")));
        let d = evaluate(Some(&r), None, &input("198.51.100.1:1", "203.0.113.9:2"));
        assert_eq!(d.policy.as_deref(), Some("b-direct"));
        let d = evaluate(Some(&r), None, &input("198.51.100.1:1", "10.244.1.7:2"));
        assert_eq!(d.policy.as_deref(), Some("c-source"));
        let d = evaluate(Some(&r), None, &input("198.51.100.1:1", "192.0.2.1:2"));
        assert_eq!((d.allowed, d.policy), (true, None));
        let missing = RbacInput {
            source: Some(addr("203.0.113.9:1")),
            ..RbacInput::default()
        };
        assert_eq!(
            matched_policy(&r, &missing),
            Some(0),
            "only remote_ip can match"
        );
    }

    #[test]
    fn first_policy_in_name_order_wins() {
        let r = rules(json!({"action": "ALLOW", "policies": {
            "z-last": {"permissions": [{"any": true}], "principals": [{"any": true}]},
            "a-first": {"permissions": [{"any": true}], "principals": [{"any": true}]}
        }}));
        let d = evaluate(Some(&r), None, &RbacInput::default());
        assert_eq!(d.policy.as_deref(), Some("a-first"));
    }

    #[test]
    fn empty_policy_lists_and_missing_engine() {
        let allow = rules(json!({"action": "ALLOW"}));
        let deny = rules(json!({"action": "DENY", "policies": {}}));
        let log = rules(json!({"action": "LOG"}));
        let input = RbacInput::default();
        assert!(
            !evaluate(Some(&allow), None, &input).allowed,
            "ALLOW none: deny all"
        );
        assert!(
            evaluate(Some(&deny), None, &input).allowed,
            "DENY none: allow all"
        );
        let d = evaluate(Some(&log), None, &input);
        assert_eq!((d.allowed, d.access_log_hint), (true, Some(false)));
        assert_eq!(
            evaluate(None, None, &input),
            Decision {
                allowed: true,
                policy: None,
                shadow: None,
                access_log_hint: None
            }
        );
    }

    #[test]
    fn log_action_allows_and_hints() {
        let r = istio(
            "LOG",
            "audit",
            json!([{"or_rules": {"rules": [{"url_path": {"path": {"prefix": "/audit"}}}]}}]),
            json!([{"any": true}]),
        );
        let none = |_: &str| None;
        let d = evaluate(Some(&r), None, &request(&none, "GET", "/audit/1"));
        assert!(d.allowed);
        assert_eq!(d.access_log_hint, Some(true));
        assert_eq!(
            d.policy.as_deref(),
            Some("ns[default]-policy[audit]-rule[0]")
        );
        let d = evaluate(Some(&r), None, &request(&none, "GET", "/other"));
        assert_eq!(
            (d.allowed, d.access_log_hint, d.policy),
            (true, Some(false), None)
        );
    }

    #[test]
    fn shadow_never_changes_the_decision() {
        let enforced = rules(json!({"action": "ALLOW", "policies": {
            "p": {"permissions": [{"any": true}], "principals": [{"any": true}]}}}));
        let dry_deny = istio(
            "DENY",
            "dry",
            json!([{"any": true}]),
            json!([{"or_ids": {"ids": [peer_principal(json!({"exact": OTHER}))]}}]),
        );
        let other = principal_is!(OTHER);
        let sleep = principal_is!(SLEEP);
        let d = evaluate(
            Some(&enforced),
            Some(&dry_deny),
            &request(&other, "GET", "/"),
        );
        assert!(d.allowed);
        assert_eq!(d.policy.as_deref(), Some("p"));
        assert_eq!(
            d.shadow,
            Some((false, Some("ns[default]-policy[dry]-rule[0]".to_owned())))
        );
        let d = evaluate(None, Some(&dry_deny), &request(&other, "GET", "/"));
        assert_eq!((d.allowed, d.policy), (true, None));
        assert_eq!(d.shadow.map(|s| s.0), Some(false));
        let d = evaluate(None, Some(&dry_deny), &request(&sleep, "GET", "/"));
        assert_eq!(d.shadow, Some((true, None)));
        let dry_allow = rules(json!({"action": "ALLOW"}));
        let d = evaluate(Some(&enforced), Some(&dry_allow), &RbacInput::default());
        assert_eq!((d.allowed, d.shadow), (true, Some((false, None))));
        let dry_log = rules(json!({"action": "LOG"}));
        let d = evaluate(None, Some(&dry_log), &RbacInput::default());
        assert_eq!(
            (d.shadow, d.access_log_hint),
            (Some((true, None)), None),
            "a shadow LOG engine sets no access log hint"
        );
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn multi_valued_headers_are_joined_with_commas() {
        let r = rules(json!({"action": "ALLOW", "policies": {
            "a-joined": {"permissions": [{"header": {"name": "x-group", "string_match": {"exact": "dev,ops"}}}],
                "principals": [{"any": true}]},
            "b-single": {"permissions": [{"header": {"name": "x-group", "string_match": {"exact": "dev"}}}],
                "principals": [{"any": true}]}
        }}));
        let one = headers(&[("x-group", "dev")]);
        let two = headers(&[("x-group", "dev"), ("x-group", "ops")]);
        let input = |h: &HeaderMap| {
            let i = RbacInput {
                headers: Some(h),
                ..RbacInput::default()
            };
            matched_policy(&r, &i).map(|n| r.policies[n].name.as_str())
        };
        assert_eq!(input(&one), Some("b-single"));
        assert_eq!(input(&two), Some("a-joined"));
        assert_eq!(input(&HeaderMap::new()), None);
    }

    #[test]
    fn header_rules_present_invert_authority_and_principal_side() {
        let r = rules(json!({"action": "ALLOW", "policies": {
            "a-host": {"permissions": [{"header": {"name": ":authority",
                    "string_match": {"prefix": "Reviews.", "ignore_case": true}}}],
                "principals": [{"header": {"name": "x-token", "present_match": true}}]},
            "b-no-debug": {"permissions": [{"header": {"name": "x-debug", "present_match": true, "invert_match": true}}],
                "principals": [{"url_path": {"path": {"suffix": ".json"}}}]}
        }}));
        let token = headers(&[("x-token", "t"), ("host", "REVIEWS.default:9080")]);
        let debug = headers(&[("x-debug", "1")]);
        let mut i = RbacInput {
            headers: Some(&token),
            ..RbacInput::default()
        };
        assert_eq!(
            matched_policy(&r, &i),
            Some(0),
            "HTTP/1: :authority from the host header"
        );
        i.authority = Some("details.default");
        assert_eq!(matched_policy(&r, &i), None);
        i.path = Some("/data.json?x=1");
        assert_eq!(matched_policy(&r, &i), Some(1));
        i.headers = Some(&debug);
        assert_eq!(matched_policy(&r, &i), None, "inverted presence");
        i.headers = None;
        assert_eq!(
            matched_policy(&r, &i),
            Some(1),
            "no header map: every header is absent"
        );
    }

    #[test]
    fn authenticated_follows_envoy() {
        let r = rules(json!({"action": "ALLOW", "policies": {
            "a-any-peer": {"permissions": [{"destination_port": 1}],
                "principals": [{"authenticated": {}}]},
            "b-uri": {"permissions": [{"destination_port": 2}],
                "principals": [{"authenticated": {"principal_name": {"exact": SLEEP}}}]},
            "c-dns": {"permissions": [{"destination_port": 3}],
                "principals": [{"authenticated": {"principal_name": {"suffix": ".example.com"}}}]},
            "d-subject": {"permissions": [{"destination_port": 4}],
                "principals": [{"authenticated": {"principal_name": {"exact": "CN=legacy"}}}]}
        }}));
        let uri = vec![SLEEP.to_owned()];
        let dns = vec!["client.example.com".to_owned()];
        let istio_peer = TlsPeer {
            uri_sans: &uri,
            ..TlsPeer::default()
        };
        let dns_peer = TlsPeer {
            dns_sans: &dns,
            subject: "CN=legacy",
            ..TlsPeer::default()
        };
        let at = |port: u16, peer: Option<TlsPeer<'_>>| {
            let input = RbacInput {
                destination: Some(SocketAddr::new([10, 0, 0, 1].into(), port)),
                peer,
                ..RbacInput::default()
            };
            matched_policy(&r, &input).is_some()
        };
        assert!(at(1, Some(istio_peer)));
        assert!(
            at(1, Some(TlsPeer::default())),
            "unset principal_name: any TLS peer"
        );
        assert!(!at(1, None), "plaintext is never authenticated");
        assert!(at(2, Some(istio_peer)));
        assert!(!at(2, Some(dns_peer)));
        assert!(at(3, Some(dns_peer)));
        assert!(!at(3, Some(istio_peer)));
        assert!(at(4, Some(dns_peer)), "subject fallback");
        assert!(!at(4, None));
    }

    #[test]
    fn metadata_matchers_on_jwt_claims() {
        let jwt = "envoy.filters.http.jwt_authn";
        let meta = |key: &str, value: Json| {
            json!({"metadata": {"filter": jwt, "path": [{"key": "payload"}, {"key": key}],
                "value": value}})
        };
        let r = rules(json!({"action": "ALLOW", "policies": {
            "a-sub": {"permissions": [{"any": true}], "principals": [{"and_ids": {"ids": [
                meta("iss", json!({"string_match": {"exact": "https://issuer"}})),
                meta("sub", json!({"string_match": {"prefix": "alice"}}))]}}]},
            "b-groups": {"permissions": [meta("groups", json!({"list_match": {"one_of": {"string_match": {"exact": "admin"}}}}))],
                "principals": [{"any": true}]},
            "c-level": {"permissions": [meta("level", json!({"double_match": {"range": {"start": 5, "end": 10}}}))],
                "principals": [{"any": true}]},
            "0-never": {"permissions": [meta("absent", json!({"present_match": false}))],
                "principals": [{"any": true}]},
            "d-flags": {"permissions": [{"and_rules": {"rules": [
                    meta("verified", json!({"bool_match": true})),
                    meta("nick", json!({"null_match": {}})),
                    meta("exp", json!({"present_match": true})),
                ]}}], "principals": [{"any": true}]},
            "e-not-banned": {"permissions": [{"metadata": {"filter": jwt,
                    "path": [{"key": "payload"}, {"key": "banned"}],
                    "value": {"bool_match": true}, "invert": true}}],
                "principals": [{"metadata": {"filter": jwt, "path": [{"key": "payload"}, {"key": "level"}],
                    "value": {"double_match": {"exact": 42}}}}]}
        }}));
        let eval = |payload: Json| {
            let store: BTreeMap<String, Json> =
                [(jwt.to_owned(), json!({ "payload": payload }))].into();
            let lookup = |filter: &str, path: &[String]| {
                path.iter()
                    .try_fold(store.get(filter)?, |v, k| v.as_object()?.get(k))
            };
            let input = RbacInput {
                metadata: &lookup,
                ..RbacInput::default()
            };
            matched_policy(&r, &input).map(|n| r.policies[n].name.clone())
        };
        assert_eq!(
            eval(json!({"iss": "https://issuer", "sub": "alice@x"})).as_deref(),
            Some("a-sub")
        );
        assert_eq!(
            eval(json!({"iss": "https://other", "sub": "alice@x"})),
            None
        );
        assert_eq!(
            eval(json!({"groups": ["dev", "admin"]})).as_deref(),
            Some("b-groups")
        );
        assert_eq!(
            eval(json!({"groups": "admin"})),
            None,
            "list_match needs a list"
        );
        assert_eq!(eval(json!({"level": 7})).as_deref(), Some("c-level"));
        assert_eq!(
            eval(json!({"level": "7"})),
            None,
            "a string is not a number"
        );
        assert_eq!(
            eval(json!({"verified": true, "nick": null, "exp": {"a": 1}})).as_deref(),
            Some("d-flags"),
            "present_match: false (policy 0-never) matches nothing, even a missing value"
        );
        assert_eq!(
            eval(json!({"verified": true, "nick": "n", "exp": 1})),
            None,
            "null_match needs null"
        );
        assert_eq!(
            eval(json!({"verified": "true", "nick": null, "exp": 1})),
            None,
            "bool_match needs a bool"
        );
        assert_eq!(
            eval(json!({"level": 42})).as_deref(),
            Some("e-not-banned"),
            "inverted: a missing value does not match bool_match"
        );
        assert_eq!(eval(json!({"level": 42, "banned": true})), None);
    }

    #[test]
    fn or_match_as_istiod_sends_it_for_claims() {
        // istiod: `request.auth.claims[groups]` → a claim that is the string or a list holding it.
        let jwt = "envoy.filters.http.jwt_authn";
        let r = rules(json!({"action": "ALLOW", "policies": {"claims": {
            "permissions": [{"any": true}],
            "principals": [{"metadata": {"filter": jwt, "path": [{"key": "payload"}, {"key": "groups"}],
                "value": {"or_match": {"value_matchers": [
                    {"string_match": {"exact": "admin"}},
                    {"list_match": {"one_of": {"string_match": {"exact": "admin"}}}}]}}}}]}}}));
        let eval = |groups: Json| {
            let store: BTreeMap<String, Json> =
                [(jwt.to_owned(), json!({ "payload": {"groups": groups} }))].into();
            let lookup = |filter: &str, path: &[String]| {
                path.iter().try_fold(store.get(filter)?, |v, k| v.get(k))
            };
            let input = RbacInput {
                metadata: &lookup,
                ..RbacInput::default()
            };
            matched_policy(&r, &input).is_some()
        };
        assert!(eval(json!("admin")));
        assert!(eval(json!(["dev", "admin"])));
        assert!(!eval(json!(["dev"])));
        assert!(!eval(json!("dev")));
    }

    #[test]
    fn istio_waypoint_fixture_policy() {
        // The DENY policy of config::tests' policy listener: any of principal / JWT sub / remote
        // IP, on /admin or DELETE.
        let r = rules(
            json!({"action": "DENY", "policies": {"ns[default]-policy[deny]-rule[0]": {
            "permissions": [{"and_rules": {"rules": [{"or_rules": {"rules": [
                {"url_path": {"path": {"prefix": "/admin"}}},
                {"header": {"name": ":method", "string_match": {"exact": "DELETE"}}}]}}]}}],
            "principals": [{"and_ids": {"ids": [{"or_ids": {"ids": [
                peer_principal(json!({"exact": SLEEP})),
                {"metadata": {"filter": "envoy.filters.http.jwt_authn",
                    "path": [{"key": "testing@secure.istio.io"}, {"key": "sub"}],
                    "value": {"string_match": {"exact": "alice"}}}},
                {"remote_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}}]}}]}}]}}}),
        );
        let other = principal_is!(OTHER);
        let sleep = principal_is!(SLEEP);
        let mut i = request(&other, "DELETE", "/x");
        i.source = Some(addr("192.0.2.1:5"));
        assert!(evaluate(Some(&r), None, &i).allowed);
        i.source = Some(addr("10.1.2.3:5"));
        assert!(!evaluate(Some(&r), None, &i).allowed);
        let j = request(&sleep, "GET", "/admin");
        assert!(!evaluate(Some(&r), None, &j).allowed);
        let alice = json!("alice");
        let md = |f: &str, p: &[String]| {
            (f == "envoy.filters.http.jwt_authn" && p.last().is_some_and(|k| k == "sub"))
                .then_some(&alice)
        };
        let k = RbacInput {
            metadata: &md,
            ..request(&other, "GET", "/admin")
        };
        assert!(!evaluate(Some(&r), None, &k).allowed);
    }

    #[test]
    fn uri_template_permissions_as_istiod_sends_them() {
        // AuthorizationPolicy `paths: ["/api/{*}/items/{**}"]`: istiod's uri_template permission.
        let template = |t: &str| {
            json!({"uri_template": {"name": "uri-template", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig",
                "path_template": t}}})
        };
        let r = istio(
            "ALLOW",
            "items",
            json!([{"or_rules": {"rules": [template("/api/*/items/**"), template("/health")]}}]),
            json!([{"any": true}]),
        );
        let none = |_: &str| None;
        for (path, allowed) in [
            ("/api/v1/items/", true),
            ("/api/v1/items/7/parts?x=1", true),
            ("/health#top", true),
            ("/api/items/7", false),
            ("/api/v1/v2/items/7", false),
            ("/healthz", false),
        ] {
            assert_eq!(
                evaluate(Some(&r), None, &request(&none, "GET", path)).allowed,
                allowed,
                "{path}"
            );
        }
        // The network filter sees no path: a uri_template never matches there.
        let mut tcp = request(&none, "GET", "/health");
        tcp.path = None;
        assert!(!evaluate(Some(&r), None, &tcp).allowed);
    }
}
