//! Envoy's `stats_config.stats_matcher`: which stats exist at all. A stat the matcher rejects is not
//! shown by `/stats` (text and JSON) nor `/stats/prometheus` — in Envoy it is a null stat that is
//! never instantiated. The verdict is taken once, when the stat is created
//! ([`crate::stats::Stats`]), on the stat's full name before tag extraction
//! (`cluster.inbound-vip|8000|http|httpbin.default.svc.cluster.local.upstream_rq_total`).
//!
//! Istio's standard metrics are judged by the name Envoy's `istio.stats` filter gives them in its
//! custom stat namespace, without their tags: `istiocustom.istio_requests_total` (see
//! [`istio_metric_name`]). That is why Istio's inclusion list (prefix `istio`) keeps them. Envoy
//! appends the tags (`.reporter.waypoint.source_workload...`) to that name and judges each series;
//! we judge each metric as a whole, so a matcher that selects on tag values keeps or drops the
//! whole metric by its bare name.

use waypoint_proto::envoy::{
    config::{
        bootstrap::v3::Bootstrap,
        metrics::v3::{StatsMatcher as StatsMatcherProto, stats_matcher::StatsMatcher as Rule},
    },
    r#type::matcher::v3::StringMatcher,
};

use crate::config::{
    CompileResult, ConfigError,
    matchers::{StringMatch, StringPattern, string_matches},
};

/// The JSON path of the bootstrap's stats matcher.
const PATH: &str = "stats_config.stats_matcher";

/// Envoy's custom stat namespace for Istio's standard metrics (stripped in Prometheus output).
pub const ISTIO_NAMESPACE: &str = "istiocustom";

/// The name an Istio standard metric is matched by: `istiocustom.<family>`.
pub fn istio_metric_name(family: &str) -> String {
    format!("{ISTIO_NAMESPACE}.{family}")
}

/// One compiled pattern of an inclusion or exclusion list.
#[derive(Debug, Clone)]
enum Pattern {
    /// A case-sensitive prefix that ends in `.` (`cluster.`): Envoy matches it token-wise against
    /// the stat name's `.`-separated elements, so the bare element (`cluster`) matches too.
    TokenPrefix(String),
    /// Any other string matcher, applied to the full name.
    String(StringMatch),
}

impl Pattern {
    fn new(m: StringMatch) -> Pattern {
        match &m.pattern {
            StringPattern::Prefix(p) if !m.ignore_case && p.len() > 1 && p.ends_with('.') => {
                Pattern::TokenPrefix(p.clone())
            }
            _ => Pattern::String(m),
        }
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::TokenPrefix(p) => {
                name.starts_with(p.as_str()) || (name.len() + 1 == p.len() && p.starts_with(name))
            }
            Pattern::String(m) => m.matches(name),
        }
    }
}

/// A compiled `envoy.config.metrics.v3.StatsMatcher`.
#[derive(Debug, Clone, Default)]
pub enum StatsMatcher {
    /// No matcher, or `reject_all: false`: every stat exists (Envoy's default).
    #[default]
    AcceptAll,
    /// `reject_all: true`: no stat exists.
    RejectAll,
    /// `exclusion_list`: a stat matching any pattern does not exist.
    Exclusion(Vec<StatsPattern>),
    /// `inclusion_list`: only stats matching some pattern exist.
    Inclusion(Vec<StatsPattern>),
}

/// One pattern of a stats matcher's list (opaque: built by [`StatsMatcher::compile`]).
#[derive(Debug, Clone)]
pub struct StatsPattern(Pattern);

impl StatsMatcher {
    /// The bootstrap's `stats_config.stats_matcher` (everything accepted when unset).
    pub fn from_bootstrap(b: &Bootstrap) -> CompileResult<StatsMatcher> {
        match b
            .stats_config
            .as_ref()
            .and_then(|c| c.stats_matcher.as_ref())
        {
            None => Ok(StatsMatcher::AcceptAll),
            Some(m) => StatsMatcher::compile(m, PATH),
        }
    }

    /// Compiles `m`, found at JSON path `path`. Every string matcher kind of
    /// [`StringMatch::compile`] is supported; `custom` matchers and an empty list are refused (an
    /// empty list fails Envoy's validation too: `patterns` has `min_items: 1`).
    pub fn compile(m: &StatsMatcherProto, path: &str) -> CompileResult<StatsMatcher> {
        let list = |patterns: &[StringMatcher], name: &str| -> CompileResult<Vec<StatsPattern>> {
            let lpath = format!("{path}.{name}");
            if patterns.is_empty() {
                return Err(ConfigError::new(
                    format!("{lpath}.patterns"),
                    "needs at least one pattern",
                ));
            }
            Ok(string_matches(patterns, &lpath, "patterns")?
                .into_iter()
                .map(|m| StatsPattern(Pattern::new(m)))
                .collect())
        };
        match &m.stats_matcher {
            Some(Rule::RejectAll(true)) => Ok(StatsMatcher::RejectAll),
            Some(Rule::RejectAll(false)) => Ok(StatsMatcher::AcceptAll),
            Some(Rule::ExclusionList(l)) => Ok(StatsMatcher::Exclusion(list(
                &l.patterns,
                "exclusion_list",
            )?)),
            Some(Rule::InclusionList(l)) => Ok(StatsMatcher::Inclusion(list(
                &l.patterns,
                "inclusion_list",
            )?)),
            None => Err(ConfigError::new(
                path,
                "one of reject_all, exclusion_list or inclusion_list is required",
            )),
        }
    }

    /// Whether the stat with full name `name` must not exist.
    pub fn rejects(&self, name: &str) -> bool {
        match self {
            StatsMatcher::AcceptAll => false,
            StatsMatcher::RejectAll => true,
            StatsMatcher::Exclusion(list) => list.iter().any(|p| p.0.matches(name)),
            StatsMatcher::Inclusion(list) => !list.iter().any(|p| p.0.matches(name)),
        }
    }

    /// Whether every stat exists (no matcher in force).
    pub fn accepts_all(&self) -> bool {
        matches!(self, StatsMatcher::AcceptAll)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value as Json, json};

    use super::*;

    fn compile(m: Json) -> CompileResult<StatsMatcher> {
        let b: Bootstrap = waypoint_proto::json::from_json(&json!({
            "stats_config": { "stats_matcher": m }
        }))
        .expect("bootstrap decodes");
        StatsMatcher::from_bootstrap(&b)
    }

    fn including(patterns: Json) -> StatsMatcher {
        compile(json!({ "inclusion_list": { "patterns": patterns } })).expect("compiles")
    }

    #[test]
    fn no_matcher_and_reject_all_false_accept_everything() {
        let none = StatsMatcher::from_bootstrap(&Bootstrap::default()).expect("compiles");
        assert!(none.accepts_all());
        assert!(!none.rejects("cluster.a.upstream_rq_total"));
        let no = compile(json!({ "reject_all": false })).expect("compiles");
        assert!(no.accepts_all());
        assert!(!no.rejects("server.live"));
    }

    #[test]
    fn reject_all_true_rejects_everything() {
        let all = compile(json!({ "reject_all": true })).expect("compiles");
        assert!(!all.accepts_all());
        for name in ["server.live", "cluster.a.upstream_rq_total", ""] {
            assert!(all.rejects(name), "{name}");
        }
    }

    #[test]
    fn inclusion_list_keeps_only_matching_stats() {
        let m = including(json!([
            { "prefix": "server" },
            { "suffix": "rbac.allowed" },
            { "exact": "cluster_manager.active_clusters" },
            { "contains": ".sds." },
            { "safe_regex": { "regex": r"vhost\..*\.route\..*" } },
        ]));
        for kept in [
            "server.live",
            "serverless",
            "http.inbound_0.0.0.0_8000;.rbac.allowed",
            "cluster_manager.active_clusters",
            "a.sds.b",
            "vhost.v1.route.r1.upstream_rq_total",
        ] {
            assert!(!m.rejects(kept), "{kept} should be kept");
        }
        for hidden in [
            "cluster.inbound-vip|8000|http|httpbin.default.svc.cluster.local.upstream_rq_total",
            "cluster_manager.active_clusters_x",
            "http.p.rbac.denied",
            "sds.default.update_success",
            // safe_regex matches the whole name (RE2 FullMatch), not a substring.
            "x.vhost.v1.route.r1",
            "vhost.v1.upstream_rq_total",
        ] {
            assert!(m.rejects(hidden), "{hidden} should be hidden");
        }
    }

    #[test]
    fn exclusion_list_hides_only_matching_stats() {
        let m = compile(json!({ "exclusion_list": { "patterns": [
            { "prefix": "cluster." },
            { "suffix": "_active" },
        ] } }))
        .expect("compiles");
        assert!(m.rejects("cluster.a.upstream_rq_total"));
        assert!(m.rejects("http.p.downstream_rq_active"));
        assert!(!m.rejects("cluster_manager.active_clusters"));
        assert!(!m.rejects("server.live"));
    }

    #[test]
    fn ignore_case_applies_to_every_kind_but_regex() {
        let m = including(json!([
            { "prefix": "SERVER.", "ignore_case": true },
            { "suffix": "_TOTAL", "ignore_case": true },
            { "exact": "Listener_Manager.LDS.Version", "ignore_case": true },
            { "contains": "XDS-GRPC", "ignore_case": true },
            { "safe_regex": { "regex": "Foo" }, "ignore_case": true },
        ]));
        assert!(!m.rejects("server.live"));
        assert!(!m.rejects("http.p.downstream_rq_total"));
        assert!(!m.rejects("listener_manager.lds.version"));
        assert!(!m.rejects("cluster.xds-grpc.upstream_cx_active"));
        assert!(!m.rejects("Foo"));
        // Envoy's safe_regex ignores ignore_case.
        assert!(m.rejects("foo"));
        // Case matters without ignore_case.
        let strict = including(json!([{ "prefix": "SERVER." }]));
        assert!(strict.rejects("server.live"));
    }

    #[test]
    fn dotted_prefixes_match_the_bare_element_like_envoys_token_match() {
        let m = including(json!([{ "prefix": "cluster." }, { "prefix": "server" }]));
        assert!(!m.rejects("cluster.a.upstream_rq_total"));
        assert!(!m.rejects("cluster"));
        assert!(m.rejects("cluster_manager.active_clusters"));
        assert!(m.rejects("cluste"));
    }

    #[test]
    fn istio_standard_metrics_pass_istios_list() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/istio/bootstrap_ambient_golden.json"
        ))
        .expect("fixture");
        let doc: Json = serde_json::from_str(&text).expect("json");
        let b: Bootstrap = waypoint_proto::json::from_json(&doc).expect("bootstrap");
        let m = StatsMatcher::from_bootstrap(&b).expect("Istio's list compiles");
        for kept in [
            istio_metric_name("istio_requests_total"),
            istio_metric_name("istio_build"),
            "server.state".to_owned(),
            "listener_manager.workers_started".to_owned(),
            "cluster_manager.cds.update_success".to_owned(),
            "cluster.xds-grpc.upstream_cx_total".to_owned(),
            "http.inbound_0.0.0.0_8000;.rbac.allowed".to_owned(),
            "workload_discovery.total".to_owned(),
        ] {
            assert!(!m.rejects(&kept), "{kept} should be kept");
        }
        for hidden in [
            "cluster.inbound-vip|8000|http|httpbin.default.svc.cluster.local;.upstream_rq_total",
            "http.inbound_0.0.0.0_8000;.downstream_rq_total",
            "sds.default.update_success",
            "listener.0.0.0.0_15008.downstream_cx_total",
        ] {
            assert!(m.rejects(hidden), "{hidden} should be hidden");
        }
    }

    #[test]
    fn unsupported_or_invalid_matchers_are_refused_with_their_path() {
        let e = compile(json!({})).expect_err("empty matcher");
        assert_eq!(e.path, "stats_config.stats_matcher");
        let e = compile(json!({ "inclusion_list": { "patterns": [] } })).expect_err("no patterns");
        assert_eq!(e.path, "stats_config.stats_matcher.inclusion_list.patterns");
        let e = compile(json!({ "exclusion_list": { "patterns": [
            { "prefix": "a" },
            { "safe_regex": { "regex": "(" } },
        ] } }))
        .expect_err("bad regex");
        assert!(
            e.path
                .starts_with("stats_config.stats_matcher.exclusion_list.patterns[1].safe_regex"),
            "{e}"
        );
        let e = compile(json!({ "inclusion_list": { "patterns": [{}] } }))
            .expect_err("matcher without a pattern");
        assert_eq!(
            e.path,
            "stats_config.stats_matcher.inclusion_list.patterns[0]"
        );
        let e = compile(json!({ "inclusion_list": { "patterns": [{ "custom": {
            "name": "x",
            "typed_config": { "@type": "type.googleapis.com/google.protobuf.Struct", "value": {} }
        } }] } }))
        .expect_err("custom");
        assert_eq!(
            e.path,
            "stats_config.stats_matcher.inclusion_list.patterns[0].custom"
        );
    }
}
