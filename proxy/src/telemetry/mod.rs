//! Telemetry: histograms and Istio's standard metrics.

pub mod attributes;
pub mod expr;
pub mod grpc;
pub mod histogram;
pub mod istio;

use crate::{config::matchers::StringMatch, server::Server};

/// Applies the bootstrap's telemetry settings: `istio_build`'s tag from the node's
/// `ISTIO_VERSION`, and `stats_config.histogram_bucket_settings` for Istio's histograms (a rule
/// matches the stat's Envoy name, `istiocustom.istio_request_duration_milliseconds`, or the name
/// Prometheus shows; the first matching rule wins). A rule we cannot compile is logged and skipped.
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
    let rules = b
        .bootstrap
        .stats_config
        .as_ref()
        .map(|c| c.histogram_bucket_settings.as_slice())
        .unwrap_or_default();
    let mut compiled = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let path = format!("stats_config.histogram_bucket_settings[{i}]");
        let Some(m) = r.r#match.as_ref() else {
            continue;
        };
        match StringMatch::compile(m, &format!("{path}.match")) {
            Ok(sm) => compiled.push((sm, r.buckets.clone())),
            Err(e) => tracing::warn!(target: "stats", "{e}; rule skipped"),
        }
    }
    let mut settings = Vec::new();
    for metric in istio::Metric::HISTOGRAMS {
        let family = metric.family();
        let envoy_name = format!("istiocustom.{family}");
        if let Some((_, buckets)) = compiled
            .iter()
            .find(|(m, _)| m.matches(&envoy_name) || m.matches(&family))
        {
            let mut buckets = buckets.clone();
            buckets.sort_by(f64::total_cmp);
            buckets.dedup();
            settings.push((metric, buckets));
        }
    }
    server.stats.istio.set_buckets(settings);
}
