//! Telemetry: histograms, Istio's standard metrics and the custom metrics of `istio.stats`
//! definitions.

pub mod attributes;
pub mod expr;
pub mod grpc;
pub mod histogram;
pub mod istio;

use waypoint_proto::envoy::config::bootstrap::v3::Bootstrap;

use crate::{
    config::{CompileResult, ConfigError, matchers::StringMatch},
    server::Server,
};

/// The bootstrap's `stats_config.histogram_bucket_settings`, compiled: (match, sorted bounds) per
/// rule. As Envoy validates them, `match` is required and bounds must be positive and unique; the
/// bootstrap is refused otherwise (`config::bootstrap::compile`), with the rule's path.
pub fn bucket_rules(b: &Bootstrap) -> CompileResult<Vec<(StringMatch, Vec<f64>)>> {
    let rules = b
        .stats_config
        .as_ref()
        .map(|c| c.histogram_bucket_settings.as_slice())
        .unwrap_or_default();
    let mut compiled = Vec::with_capacity(rules.len());
    for (i, r) in rules.iter().enumerate() {
        let path = format!("stats_config.histogram_bucket_settings[{i}]");
        let m = r
            .r#match
            .as_ref()
            .ok_or_else(|| ConfigError::new(format!("{path}.match"), "is required"))?;
        let m = StringMatch::compile(m, &format!("{path}.match"))?;
        let mut buckets = r.buckets.clone();
        if let Some((j, b)) = buckets
            .iter()
            .enumerate()
            .find(|(_, b)| b.is_nan() || **b <= 0.0)
        {
            return Err(ConfigError::new(
                format!("{path}.buckets[{j}]"),
                format!("{b} is not a positive bound"),
            ));
        }
        buckets.sort_by(f64::total_cmp);
        if let Some(w) = buckets.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::new(
                format!("{path}.buckets"),
                format!("{} appears twice; bounds must be unique", w[0]),
            ));
        }
        compiled.push((m, buckets));
    }
    Ok(compiled)
}

/// Applies the bootstrap's telemetry settings: `istio_build`'s tag from the node's
/// `ISTIO_VERSION`, and `stats_config.histogram_bucket_settings` for Istio's histograms, custom
/// ones included (a rule matches the stat's Envoy name,
/// `istiocustom.istio_request_duration_milliseconds`, or the name Prometheus shows; the first
/// matching rule wins), and the stats matcher for custom metrics. Rules that do not compile were refused with
/// the bootstrap; should one get here anyway it is logged and Envoy's default buckets stay.
pub fn configure(server: &Server) {
    let b = &server.bootstrap;
    let version = b
        .node
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get("ISTIO_VERSION"))
        .and_then(|v| match &v.kind {
            Some(waypoint_proto::google::protobuf::value::Kind::StringValue(s)) => Some(s.as_str()),
            _ => None,
        })
        .unwrap_or_default();
    server.stats.istio.set_build(version);
    let compiled = match bucket_rules(&b.bootstrap) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(target: "stats", "{e}; default buckets kept");
            Vec::new()
        }
    };
    let mut settings = Vec::new();
    for metric in istio::Metric::HISTOGRAMS {
        let family = metric.family();
        let envoy_name = crate::stats_matcher::istio_metric_name(&family);
        if let Some((_, buckets)) = compiled
            .iter()
            .find(|(m, _)| m.matches(&envoy_name) || m.matches(&family))
        {
            settings.push((metric, buckets.clone()));
        }
    }
    server.stats.istio.set_buckets(settings);
    // Custom metrics are named by config that comes later: they keep the rules and the matcher.
    server.stats.istio.set_custom_buckets(compiled);
    server
        .stats
        .istio
        .set_custom_matcher(server.stats.matcher().clone());
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rules(settings: serde_json::Value) -> CompileResult<Vec<(StringMatch, Vec<f64>)>> {
        let b: Bootstrap = waypoint_proto::json::from_json(&json!({
            "stats_config": { "histogram_bucket_settings": settings }
        }))
        .expect("bootstrap decodes");
        bucket_rules(&b)
    }

    #[test]
    fn bucket_rules_compile_sorted_and_refuse_bad_bounds() {
        let ok = rules(json!([{ "match": { "prefix": "istio" }, "buckets": [10, 1, 5] }]))
            .expect("compiles");
        assert_eq!(ok[0].1, [1.0, 5.0, 10.0]);
        assert!(ok[0].0.matches("istiocustom.istio_request_bytes"));
        let e = rules(json!([{ "match": { "prefix": "a" }, "buckets": [1, 0] }]))
            .expect_err("zero bound");
        assert_eq!(
            e.path,
            "stats_config.histogram_bucket_settings[0].buckets[1]"
        );
        let e = rules(json!([{ "match": { "prefix": "a" }, "buckets": [1, 2, 1] }]))
            .expect_err("duplicate bound");
        assert_eq!(e.path, "stats_config.histogram_bucket_settings[0].buckets");
        let e = rules(json!([{ "buckets": [1] }])).expect_err("no match");
        assert_eq!(e.path, "stats_config.histogram_bucket_settings[0].match");
        let e = rules(json!([{ "match": { "safe_regex": { "regex": "(" } }, "buckets": [1] }]))
            .expect_err("bad regex");
        assert!(
            e.path
                .starts_with("stats_config.histogram_bucket_settings[0].match.safe_regex"),
            "{e}"
        );
    }
}
