//! Istio's own filters: `istio.stats` (`stats.PluginConfig`, raw Any or `TypedStruct`), peer
//! metadata discovery (`io.istio.http.peer_metadata.Config`, TypedStruct only),
//! `istio.metadata_exchange` and the network peer metadata filter of baggage mode.

use std::{sync::Arc, time::Duration};

use crate::telemetry::{
    expr::Expr,
    istio::{Metric, Plan, custom_metrics, tag_index},
};

use serde_json::Value as Json;
use waypoint_proto::istio::stats::{PluginConfig, Reporter};

use crate::config::{CompileResult, ConfigError, field, index, key, opt_duration, typed::Typed};

/// Who reports the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsReporter {
    /// `UNSPECIFIED`: inbound sidecar semantics (destination).
    Unspecified,
    /// `SERVER_GATEWAY`: a waypoint reports as the destination side.
    ServerGateway,
}

/// A metric override (`metrics[]` without CEL: drop or strip tags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricOverride {
    /// Metric name (`requests_total` …; empty: all).
    pub name: String,
    /// Labels removed.
    pub tags_to_remove: Vec<String>,
    /// Do not emit the metric.
    pub drop: bool,
}

/// A compiled `stats.PluginConfig`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsConfig {
    /// `reporter`.
    pub reporter: StatsReporter,
    /// `disable_host_header_fallback`.
    pub disable_host_header_fallback: bool,
    /// `tcp_reporting_duration` (Envoy's default 5s applies when `None`).
    pub tcp_reporting_duration: Option<Duration>,
    /// `stat_prefix` (default `istio`).
    pub stat_prefix: Option<String>,
    /// `rotation_interval`.
    pub rotation_interval: Option<Duration>,
    /// `graceful_deletion_interval`.
    pub graceful_deletion_interval: Option<Duration>,
    /// `metrics`.
    pub metrics: Vec<MetricOverride>,
    /// What the reporter and `metrics` make of the standard metrics.
    pub plan: Arc<Plan>,
}

impl StatsConfig {
    /// Compiles the typed config at `path`.
    pub fn compile(t: &Typed<'_>, path: &str) -> CompileResult<Self> {
        let c: PluginConfig = t.decode("stats.PluginConfig", path)?;
        let ipath = t.inner_path(path);
        let reporter = match Reporter::try_from(c.reporter) {
            Ok(Reporter::ServerGateway) => StatsReporter::ServerGateway,
            // Sidecar reporting fills one side's labels from the node's own metadata; this proxy
            // is a waypoint and reports as one.
            Ok(Reporter::Unspecified) => {
                return Err(ConfigError::new(
                    field(&ipath, "reporter"),
                    "reporter UNSPECIFIED (sidecar reporting) is not supported; a waypoint reports as SERVER_GATEWAY",
                ));
            }
            Err(_) => {
                return Err(ConfigError::new(
                    field(&ipath, "reporter"),
                    format!("unknown reporter {}", c.reporter),
                ));
            }
        };
        let mut metrics = Vec::new();
        let mut plan = Plan::standard("waypoint");
        // Definitions first, as istio_stats reads them: `metrics` may name them.
        custom_metrics(&c.definitions, &mut plan).map_err(|e| {
            ConfigError::new(
                field(&index(&ipath, "definitions", e.index), e.field),
                e.to_string(),
            )
        })?;
        for (i, m) in c.metrics.iter().enumerate() {
            let mpath = index(&ipath, "metrics", i);
            // `match` is a CEL predicate over the stream, which we do not evaluate.
            if !m.r#match.is_empty() {
                return Err(ConfigError::new(
                    field(&mpath, "match"),
                    "CEL match expressions are not supported",
                ));
            }
            // Standard metrics and custom ones (by index into `plan.custom`) this entry changes.
            // A name that is neither changes nothing, as in istio_stats: istiod sends Telemetry
            // `customMetric` overrides whether or not a definition exists.
            let (targets, custom): (Vec<usize>, Vec<usize>) = if m.name.is_empty() {
                (
                    (0..Metric::ALL.len()).collect(),
                    (0..plan.custom.len()).collect(),
                )
            } else if let Some(metric) = Metric::from_config_name(&m.name) {
                (vec![metric as usize], Vec::new())
            } else if let Some(ci) = plan.custom.iter().position(|d| d.name == m.name) {
                (Vec::new(), vec![ci])
            } else {
                tracing::warn!(target: "stats", "{}: metric '{}' is neither standard nor defined; the entry changes nothing", field(&mpath, "name"), m.name);
                (Vec::new(), Vec::new())
            };
            for t in &targets {
                if m.drop {
                    if !m.name.is_empty() {
                        plan.drop[*t] = true;
                    }
                    continue;
                }
                for tag in &m.tags_to_remove {
                    // A tag that is not a standard label is not there to remove (Envoy logs and
                    // goes on).
                    if let Some(ti) = tag_index(tag) {
                        plan.overrides[*t].insert(ti, None);
                    }
                }
            }
            if m.drop {
                continue;
            }
            // Dimensions in tag-name order (Envoy sorts them): a standard tag's value is
            // replaced, another tag is added after the standard ones.
            let mut dims: Vec<(&String, &String)> = m.dimensions.iter().collect();
            dims.sort();
            for (tag, text) in dims {
                let expr = Expr::parse(text)
                    .map_err(|e| ConfigError::new(key(&mpath, "dimensions", tag), e.to_string()))?;
                let slot = plan.dimension_slot(expr);
                for t in &targets {
                    match tag_index(tag) {
                        Some(ti) => {
                            plan.overrides[*t].insert(ti, Some(slot));
                        }
                        None => plan.additions[*t].push((tag.clone(), slot)),
                    }
                }
                // A custom metric has no standard labels to replace: every dimension adds one.
                // (`tags_to_remove` and `drop` apply to standard metrics only, as in istio_stats.)
                for ci in &custom {
                    if let Some(d) = plan.custom.get_mut(*ci) {
                        d.labels.push((tag.clone(), slot));
                    }
                }
            }
            metrics.push(MetricOverride {
                name: m.name.clone(),
                tags_to_remove: m.tags_to_remove.clone(),
                drop: m.drop,
            });
        }
        Ok(StatsConfig {
            reporter,
            disable_host_header_fallback: c.disable_host_header_fallback,
            tcp_reporting_duration: opt_duration(
                c.tcp_reporting_duration.as_ref(),
                &field(&ipath, "tcp_reporting_duration"),
            )?,
            stat_prefix: (!c.stat_prefix.is_empty()).then(|| c.stat_prefix.clone()),
            rotation_interval: opt_duration(
                c.rotation_interval.as_ref(),
                &field(&ipath, "rotation_interval"),
            )?,
            graceful_deletion_interval: opt_duration(
                c.graceful_deletion_interval.as_ref(),
                &field(&ipath, "graceful_deletion_interval"),
            )?,
            metrics,
            plan: Arc::new(plan),
        })
    }
}

/// How peer metadata is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// WDS lookup by address (downstream remote address / upstream host's original_dst local).
    WorkloadDiscovery,
    /// The `baggage` header.
    Baggage,
    /// From a filter state object (`peer_metadata_key`).
    UpstreamFilterState(String),
}

/// How peer metadata is propagated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Propagation {
    /// As a `baggage` header.
    Baggage,
}

/// A compiled `io.istio.http.peer_metadata.Config`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerMetadata {
    /// `downstream_discovery`, in order.
    pub downstream_discovery: Vec<Discovery>,
    /// `upstream_discovery`, in order.
    pub upstream_discovery: Vec<Discovery>,
    /// `downstream_propagation`.
    pub downstream_propagation: Vec<Propagation>,
    /// `upstream_propagation`.
    pub upstream_propagation: Vec<Propagation>,
    /// `shared_with_upstream`: the downstream peer is visible on the upstream connection.
    pub shared_with_upstream: bool,
}

fn one_key<'a>(entry: &'a Json, path: &str) -> CompileResult<(&'a str, &'a Json)> {
    match entry {
        Json::Object(m) if m.len() == 1 => m
            .iter()
            .next()
            .map(|(k, v)| (k.as_str(), v))
            .ok_or_else(|| ConfigError::new(path, "empty entry")),
        _ => Err(ConfigError::new(
            path,
            "each entry must be an object with exactly one method",
        )),
    }
}

fn list<'a>(v: &'a Json, key: &str, path: &str) -> CompileResult<&'a [Json]> {
    match v.get(key) {
        None => Ok(&[]),
        Some(Json::Array(a)) => Ok(a.as_slice()),
        Some(_) => Err(ConfigError::new(field(path, key), "must be a list")),
    }
}

fn discovery(v: &Json, key: &str, path: &str) -> CompileResult<Vec<Discovery>> {
    list(v, key, path)?
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let epath = index(path, key, i);
            match one_key(e, &epath)? {
                ("workload_discovery", _) => Ok(Discovery::WorkloadDiscovery),
                ("baggage", _) => Ok(Discovery::Baggage),
                ("upstream_filter_state", cfg) => {
                    match cfg.get("peer_metadata_key").and_then(Json::as_str) {
                        Some(k) if !k.is_empty() => {
                            Ok(Discovery::UpstreamFilterState(k.to_owned()))
                        }
                        _ => Err(ConfigError::new(
                            field(&epath, "upstream_filter_state"),
                            "peer_metadata_key is required",
                        )),
                    }
                }
                (other, _) => Err(ConfigError::new(
                    field(&epath, other),
                    format!("discovery method '{other}' is not supported"),
                )),
            }
        })
        .collect()
}

fn propagation(v: &Json, key: &str, path: &str) -> CompileResult<Vec<Propagation>> {
    list(v, key, path)?
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let epath = index(path, key, i);
            match one_key(e, &epath)? {
                ("baggage", _) => Ok(Propagation::Baggage),
                (other, _) => Err(ConfigError::new(
                    field(&epath, other),
                    format!("propagation method '{other}' is not supported"),
                )),
            }
        })
        .collect()
}

impl PeerMetadata {
    /// Compiles the TypedStruct at `path`.
    pub fn compile(t: &Typed<'_>, path: &str) -> CompileResult<Self> {
        let v = t.struct_value(path)?;
        let ipath = t.inner_path(path);
        Ok(PeerMetadata {
            downstream_discovery: discovery(v, "downstream_discovery", &ipath)?,
            upstream_discovery: discovery(v, "upstream_discovery", &ipath)?,
            downstream_propagation: propagation(v, "downstream_propagation", &ipath)?,
            upstream_propagation: propagation(v, "upstream_propagation", &ipath)?,
            shared_with_upstream: match v.get("shared_with_upstream") {
                None => false,
                Some(Json::Bool(b)) => *b,
                Some(_) => {
                    return Err(ConfigError::new(
                        field(&ipath, "shared_with_upstream"),
                        "must be a boolean",
                    ));
                }
            },
        })
    }
}

/// A compiled `envoy.tcp.metadataexchange.config.MetadataExchange`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataExchange {
    /// `protocol` (ALPN, `istio-peer-exchange`).
    pub protocol: String,
    /// `enable_discovery`: fall back to WDS when the peer does not exchange.
    pub enable_discovery: bool,
}

impl MetadataExchange {
    /// Compiles the TypedStruct at `path`.
    pub fn compile(t: &Typed<'_>, path: &str) -> CompileResult<Self> {
        let v = t.struct_value(path)?;
        let ipath = t.inner_path(path);
        let protocol = match v.get("protocol") {
            Some(Json::String(s)) if !s.is_empty() => s.clone(),
            _ => {
                return Err(ConfigError::new(
                    field(&ipath, "protocol"),
                    "protocol is required",
                ));
            }
        };
        Ok(MetadataExchange {
            protocol,
            enable_discovery: v
                .get("enable_discovery")
                .and_then(Json::as_bool)
                .unwrap_or(false),
        })
    }
}

/// A compiled network `envoy.extensions.network_filters.peer_metadata.Config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPeerMetadata {
    /// `baggage_key`: the filter state key the baggage string is stored under.
    pub baggage_key: String,
}

impl NetworkPeerMetadata {
    /// Compiles the TypedStruct at `path`.
    pub fn compile(t: &Typed<'_>, path: &str) -> CompileResult<Self> {
        let v = t.struct_value(path)?;
        match v.get("baggage_key") {
            Some(Json::String(s)) if !s.is_empty() => Ok(NetworkPeerMetadata {
                baggage_key: s.clone(),
            }),
            _ => Err(ConfigError::new(
                field(&t.inner_path(path), "baggage_key"),
                "baggage_key is required",
            )),
        }
    }
}
