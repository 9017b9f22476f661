//! Istio's standard metrics, as the `istio.stats` filter reports them (istio/proxy
//! `istio_stats.cc`): `istio_requests_total`, the duration and size histograms, the TCP
//! connection and byte counters and `istio_build`, with the 25 HTTP / 23 TCP labels in Istio's
//! order and a waypoint's values (`reporter="waypoint"`).
//!
//! Recording is lock-free per request: a series key holds shared label structs (computed once
//! per workload, per cluster, per `istio.stats` config), so building it allocates nothing but
//! the peer principal, and a worker finds the series of a key whose structs it saw lately in a
//! small thread-local cache, by their addresses; other keys take a read lock on one of
//! [`SHARDS`] series maps, where they are hashed and compared by content. Metric
//! overrides (`tags_to_remove`, `drop`, `dimensions`) are applied when the series is rendered:
//! series whose rendered labels coincide are summed, as Envoy's counters with equal tags are one.

use std::{
    cell::RefCell,
    collections::{BTreeMap, HashMap},
    hash::{BuildHasher, BuildHasherDefault, Hash, Hasher},
    rc::Rc,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use super::histogram::{DEFAULT_BUCKETS, Histogram, HistogramSnapshot, format_bound};
use crate::{config::matchers::StringMatch, flags::ResponseFlags, stats_matcher::StatsMatcher};

/// The value of a label nothing is known for.
pub const UNKNOWN: &str = "unknown";

/// Number of series-map shards (no global lock on the request path).
pub const SHARDS: usize = 16;

/// A peer's telemetry labels (Envoy's `WorkloadMetadataObject`), from WDS or baggage.
///
/// It has no `labels` map: istio/proxy fills the object's map only from metadata-exchange
/// headers (`istio_headers` discovery, with the filter's `additional_labels`), which this proxy
/// refuses; WDS and baggage peers leave it empty, so `*_peer.labels[...]` reads nothing.
#[derive(Debug, Clone, Default, Eq)]
pub struct PeerLabels {
    /// `workload_name` (the owning Deployment …).
    pub workload: String,
    /// Namespace.
    pub namespace: String,
    /// `canonical_name`.
    pub canonical_service: String,
    /// `canonical_revision`.
    pub canonical_revision: String,
    /// The `app` label (WDS: the canonical name).
    pub app: String,
    /// The `version` label (WDS: the canonical revision).
    pub version: String,
    /// `cluster_id`.
    pub cluster: String,
    /// SPIFFE identity.
    pub identity: String,
    /// The workload kind as Istio spells it (`deployment`, `cronjob`, `job`, `pod`; empty:
    /// unknown), CEL's `type`.
    pub workload_type: &'static str,
    /// The instance (pod) name, CEL's `name`.
    pub instance: String,
}

/// Equal when every label a series shows is: the instance name is left out, as no standard
/// label reads it (an expression that does carries its value in [`SeriesKey::extra`]), so the
/// pods of one workload share their series.
impl PartialEq for PeerLabels {
    fn eq(&self, o: &Self) -> bool {
        self.workload == o.workload
            && self.namespace == o.namespace
            && self.canonical_service == o.canonical_service
            && self.canonical_revision == o.canonical_revision
            && self.app == o.app
            && self.version == o.version
            && self.cluster == o.cluster
            && self.identity == o.identity
            && self.workload_type == o.workload_type
    }
}

/// Hashes only what tells peers apart in practice (a subset of the fields, so equal labels
/// still hash equally): a series key is hashed whenever a stream misses the threads' recent
/// series cache.
impl Hash for PeerLabels {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.workload.hash(state);
        self.identity.hash(state);
    }
}

/// The Istio service a cluster serves (`istio.services[0]` of its metadata).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceLabels {
    /// `destination_service` (the FQDN), empty when unknown.
    pub host: String,
    /// `destination_service_name`, empty when unknown.
    pub name: String,
    /// `destination_service_namespace`, empty when unknown.
    pub namespace: String,
}

/// Clusters Istio names itself instead of a service.
const SPECIAL_CLUSTERS: &[&str] = &[
    "BlackHoleCluster",
    "PassthroughCluster",
    "InboundPassthroughCluster",
    "InboundPassthroughClusterIpv4",
    "InboundPassthroughClusterIpv6",
];

impl Hash for ServiceLabels {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.host.hash(state);
        self.name.hash(state);
    }
}

impl ServiceLabels {
    /// The labels for cluster `name` whose metadata lists `services` as (host, name, namespace).
    pub fn for_cluster<'a>(
        name: &str,
        mut services: impl Iterator<Item = (&'a str, &'a str, &'a str)>,
    ) -> ServiceLabels {
        if SPECIAL_CLUSTERS.contains(&name) {
            return ServiceLabels {
                name: name.to_owned(),
                ..ServiceLabels::default()
            };
        }
        match services.next() {
            Some((host, svc_name, namespace)) => ServiceLabels {
                host: host.to_owned(),
                name: if svc_name.is_empty() {
                    host.split('.').next().unwrap_or_default().to_owned()
                } else {
                    svc_name.to_owned()
                },
                namespace: namespace.to_owned(),
            },
            None => ServiceLabels::default(),
        }
    }
}

/// Number of [`Metric`]s.
pub const METRICS: usize = 10;

/// The metrics `istio.stats` emits, in Istio's naming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    /// `istio_requests_total`.
    RequestsTotal,
    /// `istio_request_duration_milliseconds`.
    RequestDuration,
    /// `istio_request_bytes`.
    RequestBytes,
    /// `istio_response_bytes`.
    ResponseBytes,
    /// `istio_tcp_connections_opened_total`.
    TcpOpened,
    /// `istio_tcp_connections_closed_total`.
    TcpClosed,
    /// `istio_tcp_sent_bytes_total`.
    TcpSent,
    /// `istio_tcp_received_bytes_total`.
    TcpReceived,
    /// `istio_request_messages_total` (gRPC).
    RequestMessages,
    /// `istio_response_messages_total` (gRPC).
    ResponseMessages,
}

impl Metric {
    /// The histograms.
    pub const HISTOGRAMS: [Metric; 3] = [
        Metric::RequestDuration,
        Metric::RequestBytes,
        Metric::ResponseBytes,
    ];

    /// Every metric.
    pub const ALL: [Metric; METRICS] = [
        Metric::RequestsTotal,
        Metric::RequestDuration,
        Metric::RequestBytes,
        Metric::ResponseBytes,
        Metric::TcpOpened,
        Metric::TcpClosed,
        Metric::TcpSent,
        Metric::TcpReceived,
        Metric::RequestMessages,
        Metric::ResponseMessages,
    ];

    /// The name in `stats.PluginConfig.metrics[].name` (Istio's without the `istio_` prefix).
    pub fn config_name(self) -> &'static str {
        match self {
            Metric::RequestsTotal => "requests_total",
            Metric::RequestDuration => "request_duration_milliseconds",
            Metric::RequestBytes => "request_bytes",
            Metric::ResponseBytes => "response_bytes",
            Metric::TcpOpened => "tcp_connections_opened_total",
            Metric::TcpClosed => "tcp_connections_closed_total",
            Metric::TcpSent => "tcp_sent_bytes_total",
            Metric::TcpReceived => "tcp_received_bytes_total",
            Metric::RequestMessages => "request_messages_total",
            Metric::ResponseMessages => "response_messages_total",
        }
    }

    /// The Prometheus family name.
    pub fn family(self) -> String {
        format!("istio_{}", self.config_name())
    }

    /// The metric named `name` in a `stats.PluginConfig`.
    pub fn from_config_name(name: &str) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.config_name() == name)
    }

    /// The `# HELP` text.
    pub fn help(self) -> &'static str {
        match self {
            Metric::RequestsTotal => "Requests handled, by source, destination and response.",
            Metric::RequestDuration => "Request duration in milliseconds.",
            Metric::RequestBytes => "Request size in bytes (headers and body).",
            Metric::ResponseBytes => "Response size in bytes (headers and body).",
            Metric::TcpOpened => "TCP connections opened.",
            Metric::TcpClosed => "TCP connections closed.",
            Metric::TcpSent => "Bytes sent to the downstream on TCP connections.",
            Metric::TcpReceived => "Bytes received from the downstream on TCP connections.",
            Metric::RequestMessages => "gRPC messages received from the downstream.",
            Metric::ResponseMessages => "gRPC messages sent to the downstream.",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The standard labels, in Istio's emission order (HTTP: all 25; TCP: all but `response_code`
/// and `grpc_response_status`).
pub const TAGS: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

/// The standard labels known while a stream runs ([`TAGS`] up to `request_protocol`).
const STREAM_TAGS: usize = 20;

/// Index of a standard tag.
pub fn tag_index(name: &str) -> Option<usize> {
    TAGS.iter().position(|t| *t == name)
}

/// What a `stats.PluginConfig`'s `metrics[]` change, compiled: per metric, whether it is
/// dropped, which standard tags are removed or replaced by a dimension, and which tags are added.
/// Dimension values are evaluated per stream by the caller (in [`Plan::dimensions`] order) and
/// travel in the series key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Per metric ([`Metric`] order): dropped.
    pub drop: [bool; METRICS],
    /// Per metric: standard tag index → `None` (removed) or `Some(dimension index)` (replaced).
    pub overrides: [BTreeMap<usize, Option<usize>>; METRICS],
    /// Per metric: added tags (name, dimension index), in order.
    pub additions: [Vec<(String, usize)>; METRICS],
    /// The dimension expressions, one value slot each (evaluated per stream into
    /// [`SeriesKey::extra`]).
    pub dimensions: Vec<super::expr::Expr>,
    /// `reporter` value (`waypoint`, `destination`, `source`).
    pub reporter: &'static str,
    /// Custom metrics (`definitions`), in definition order; empty for most configs, and then
    /// recording does no work for them.
    pub custom: Vec<CustomMetric>,
}

/// A custom metric's kind (`stats.MetricType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CustomKind {
    /// `COUNTER`: incremented by the value.
    Counter,
    /// `GAUGE`: set to the value.
    Gauge,
    /// `HISTOGRAM`: records the value.
    Histogram,
}

impl CustomKind {
    /// The Prometheus `# TYPE`.
    fn type_name(self) -> &'static str {
        match self {
            CustomKind::Counter => "counter",
            CustomKind::Gauge => "gauge",
            CustomKind::Histogram => "histogram",
        }
    }
}

/// Where a custom metric's value comes from, per stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueSource {
    /// A constant.
    Integer(u64),
    /// `request.size`: the request's `content-length`, else its body bytes received (0 when the
    /// header is not a number: Envoy's attribute is then absent).
    RequestSize,
    /// The stream's request bytes (headers and body), as `istio_request_bytes` counts them.
    RequestTotalSize,
    /// `response.size`: the response body bytes sent.
    ResponseSize,
    /// The stream's response bytes (headers, body and trailers), as `istio_response_bytes`.
    ResponseTotalSize,
    /// The response code (0: none).
    ResponseCode,
    /// The gRPC status (0: none).
    ResponseGrpcStatus,
    /// A dimension slot's text, when it is an unsigned integer (else 0).
    Dimension(usize),
}

/// One `stats.PluginConfig.definitions[]` entry, compiled.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CustomMetric {
    /// The configured name; the metric is `istio_<name>`.
    pub name: String,
    /// Its kind.
    pub kind: CustomKind,
    /// Its value.
    pub value: ValueSource,
    /// Its labels: as istio_stats gives a custom metric none of the standard labels, only those
    /// `metrics[].dimensions` add (tag, dimension slot), in order.
    pub labels: Vec<(String, usize)>,
}

impl CustomMetric {
    /// The Prometheus family: `istio_<name>`, with the characters Prometheus names cannot hold
    /// replaced by `_` as Envoy's Prometheus output does.
    pub fn family(&self) -> String {
        let mut f = String::with_capacity(6 + self.name.len());
        f.push_str("istio_");
        f.extend(
            self.name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }),
        );
        f
    }

    /// The name the stats matcher and bucket rules see: `istiocustom.istio_<name>`.
    pub fn envoy_name(&self) -> String {
        crate::stats_matcher::istio_metric_name(&format!("istio_{}", self.name))
    }
}

/// Why a `stats.PluginConfig.definitions[]` entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("definition '{name}': {reason}")]
pub struct DefinitionError {
    /// The entry's index in `definitions`.
    pub index: usize,
    /// The field at fault (`value`, `type`).
    pub field: &'static str,
    /// The definition's name.
    pub name: String,
    /// Why.
    pub reason: String,
}

/// Compiles `definitions` into `plan.custom` as istio_stats reads them: a definition naming a
/// standard metric is skipped with a warning, the first of two with the same name wins, and the
/// type defaults to `COUNTER`. `build` is skipped too (istio_stats would mix its series into the
/// `istio_build` gauge's family, which Prometheus refuses). A value expression the
/// evaluator cannot compute, or a type it does not know, is refused (istio_stats skips a value it
/// cannot parse; a NACK says so instead of losing the metric silently). Text-valued expressions
/// take a dimension slot, shared with `metrics[].dimensions` of the same expression.
pub fn custom_metrics(
    definitions: &[waypoint_proto::istio::stats::MetricDefinition],
    plan: &mut Plan,
) -> Result<(), DefinitionError> {
    use super::expr::ValueExpr;
    use waypoint_proto::istio::stats::MetricType;
    for (index, d) in definitions.iter().enumerate() {
        let error = |field, reason: String| DefinitionError {
            index,
            field,
            name: d.name.clone(),
            reason,
        };
        if Metric::from_config_name(&d.name).is_some() || d.name == "build" {
            tracing::warn!(target: "stats", "definitions[{index}]: re-defining the standard metric istio_{} is not allowed; skipped", d.name);
            continue;
        }
        if plan.custom.iter().any(|c| c.name == d.name) {
            tracing::warn!(target: "stats", "definitions[{index}]: istio_{} is defined twice; the first definition stays", d.name);
            continue;
        }
        let kind = match MetricType::try_from(d.r#type) {
            Ok(MetricType::Counter) => CustomKind::Counter,
            Ok(MetricType::Gauge) => CustomKind::Gauge,
            Ok(MetricType::Histogram) => CustomKind::Histogram,
            Err(_) => return Err(error("type", format!("unknown metric type {}", d.r#type))),
        };
        let value = match ValueExpr::parse(&d.value).map_err(|e| error("value", e.0))? {
            ValueExpr::Integer(v) => ValueSource::Integer(v),
            ValueExpr::RequestSize => ValueSource::RequestSize,
            ValueExpr::RequestTotalSize => ValueSource::RequestTotalSize,
            ValueExpr::ResponseSize => ValueSource::ResponseSize,
            ValueExpr::ResponseTotalSize => ValueSource::ResponseTotalSize,
            ValueExpr::ResponseCode => ValueSource::ResponseCode,
            ValueExpr::ResponseGrpcStatus => ValueSource::ResponseGrpcStatus,
            ValueExpr::Text(e) => ValueSource::Dimension(plan.dimension_slot(e)),
        };
        plan.custom.push(CustomMetric {
            name: d.name.clone(),
            kind,
            value,
            labels: Vec::new(),
        });
    }
    Ok(())
}

/// The values a custom metric's [`ValueSource`] reads from one stream or connection.
#[derive(Debug, Clone, Copy)]
struct CustomInputs<'a> {
    request_bytes: u64,
    response_bytes: u64,
    request_body: Option<u64>,
    response_body: u64,
    response_code: u16,
    grpc_status: Option<u32>,
    extra: &'a [Arc<str>],
}

impl ValueSource {
    fn eval(self, i: &CustomInputs<'_>) -> u64 {
        match self {
            ValueSource::Integer(v) => v,
            ValueSource::RequestSize => i.request_body.unwrap_or(0),
            ValueSource::RequestTotalSize => i.request_bytes,
            ValueSource::ResponseSize => i.response_body,
            ValueSource::ResponseTotalSize => i.response_bytes,
            ValueSource::ResponseCode => u64::from(i.response_code),
            ValueSource::ResponseGrpcStatus => i.grpc_status.map_or(0, u64::from),
            ValueSource::Dimension(d) => i
                .extra
                .get(d)
                .and_then(|v| super::expr::integer_text(v))
                .unwrap_or(0),
        }
    }
}

/// Plans differ rarely (one per `istio.stats` config): the reporter and the dimension count
/// tell most apart, equality settles the rest.
impl Hash for Plan {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.reporter.hash(state);
        self.dimensions.len().hash(state);
    }
}

impl Plan {
    /// A plan without overrides.
    pub fn standard(reporter: &'static str) -> Plan {
        Plan {
            reporter,
            ..Plan::default()
        }
    }

    /// The slot of dimension expression `e`, added when no dimension has it yet.
    pub fn dimension_slot(&mut self, e: super::expr::Expr) -> usize {
        match self.dimensions.iter().position(|d| *d == e) {
            Some(i) => i,
            None => {
                self.dimensions.push(e);
                self.dimensions.len() - 1
            }
        }
    }

    /// The value of dimension `d` for a series whose evaluated values are `extra`. A key built
    /// without evaluating (`extra` empty, as in unit tests) still shows a literal's text.
    fn dimension_value<'s>(&'s self, extra: &'s [Arc<str>], d: usize) -> &'s str {
        match extra.get(d) {
            Some(v) => v,
            None => match self.dimensions.get(d) {
                Some(super::expr::Expr::Literal(l)) => l,
                _ => "",
            },
        }
    }

    /// The labels of `metric` for a series as (name, value) pairs: standard values (in [`TAGS`]
    /// order, `None` where a label does not apply) with overrides and additions applied.
    fn label_pairs<'s>(
        &'s self,
        metric: Metric,
        standard: [Option<&'s str>; 25],
        extra: &'s [Arc<str>],
    ) -> impl Iterator<Item = (&'s str, &'s str)> + 's {
        let i = metric.index();
        let value = move |d: usize| self.dimension_value(extra, d);
        let overrides = &self.overrides[i];
        standard
            .into_iter()
            .enumerate()
            .filter_map(move |(t, v)| {
                let v = v?;
                match overrides.get(&t) {
                    Some(None) => None,
                    Some(Some(d)) => Some((TAGS[t], value(*d))),
                    None => Some((TAGS[t], v)),
                }
            })
            .chain(
                self.additions[i]
                    .iter()
                    .map(move |(name, d)| (name.as_str(), value(*d))),
            )
    }
}

/// Request protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// `http`.
    Http,
    /// `grpc`.
    Grpc,
    /// `tcp`.
    Tcp,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
            Protocol::Tcp => "tcp",
        }
    }
}

/// The [`SeriesKey::extra`] of a stream without dimensions: one shared empty list, so such a
/// key allocates nothing.
pub fn no_dimensions() -> &'static Arc<[Arc<str>]> {
    static EMPTY: std::sync::LazyLock<Arc<[Arc<str>]>> =
        std::sync::LazyLock::new(|| Arc::from(Vec::new()));
    &EMPTY
}

/// The labels of one stream, as shared pieces.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SeriesKey {
    /// The reporting filter's overrides.
    pub plan: Arc<Plan>,
    /// Source workload, when known.
    pub source: Option<Arc<PeerLabels>>,
    /// The peer's SPIFFE id (`io.istio.peer_principal`).
    pub source_principal: Option<Arc<str>>,
    /// Destination workload, when known.
    pub destination: Option<Arc<PeerLabels>>,
    /// Destination service.
    pub service: Option<Arc<ServiceLabels>>,
    /// Protocol.
    pub protocol: Protocol,
    /// Response code (HTTP; 0 when none was sent).
    pub response_code: u16,
    /// gRPC status (gRPC only).
    pub grpc_status: Option<u32>,
    /// Envoy response flags.
    pub flags: ResponseFlags,
    /// `mutual_tls` (true), `none` (false), `unknown` (None).
    pub mutual_tls: Option<bool>,
    /// Dimension values, in [`Plan::dimensions`] order.
    pub extra: Arc<[Arc<str>]>,
}

impl SeriesKey {
    /// The standard label values in [`TAGS`] order (`None` where a label does not apply: TCP has
    /// no `response_code` nor `grpc_response_status`).
    fn standard<'s>(&'s self, computed: &'s Computed) -> [Option<&'s str>; 25] {
        fn or_unknown(s: Option<&str>) -> &str {
            match s {
                Some(v) if !v.is_empty() => v,
                _ => UNKNOWN,
            }
        }
        let src = self.source.as_deref();
        let dst = self.destination.as_deref();
        let svc = self.service.as_deref();
        let principal = self.source_principal.as_deref();
        // The namespace from the SAN (`/ns/<ns>/`), else from the peer's metadata.
        let src_ns = principal
            .and_then(|p| p.split_once("/ns/"))
            .map(|(_, rest)| rest.split('/').next().unwrap_or_default())
            .filter(|ns| !ns.is_empty())
            .or(src.map(|s| s.namespace.as_str()));
        let http = self.protocol != Protocol::Tcp;
        [
            Some(self.plan.reporter),
            Some(or_unknown(src.map(|s| s.workload.as_str()))),
            Some(or_unknown(src.map(|s| s.canonical_service.as_str()))),
            Some(match src.map(|s| s.canonical_revision.as_str()) {
                Some(v) if !v.is_empty() => v,
                _ => "latest",
            }),
            Some(or_unknown(src_ns)),
            Some(or_unknown(principal)),
            Some(or_unknown(src.map(|s| s.app.as_str()))),
            Some(or_unknown(src.map(|s| s.version.as_str()))),
            Some(or_unknown(src.map(|s| s.cluster.as_str()))),
            Some(or_unknown(dst.map(|d| d.workload.as_str()))),
            Some(or_unknown(dst.map(|d| d.namespace.as_str()))),
            Some(or_unknown(dst.map(|d| d.identity.as_str()))),
            Some(or_unknown(dst.map(|d| d.app.as_str()))),
            Some(or_unknown(dst.map(|d| d.version.as_str()))),
            Some(or_unknown(svc.map(|s| s.host.as_str()))),
            Some(or_unknown(dst.map(|d| d.canonical_service.as_str()))),
            Some(or_unknown(dst.map(|d| d.canonical_revision.as_str()))),
            Some(or_unknown(svc.map(|s| s.name.as_str()))),
            Some(or_unknown(svc.map(|s| s.namespace.as_str()))),
            Some(or_unknown(dst.map(|d| d.cluster.as_str()))),
            Some(self.protocol.as_str()),
            http.then_some(computed.code.as_str()),
            http.then_some(computed.grpc.as_str()),
            Some(computed.flags.as_str()),
            Some(match self.mutual_tls {
                Some(true) => "mutual_tls",
                Some(false) => "none",
                None => UNKNOWN,
            }),
        ]
    }

    /// The labels of `metric` for this series as (name, value) pairs, overrides applied. The
    /// gRPC message counters have only the 20 peer and service labels: istio_stats adds them
    /// while a stream runs, before `request_protocol`, `response_code`,
    /// `grpc_response_status`, `response_flags` and `connection_security_policy` are known
    /// (its `server_request_messages.yaml` shows the set).
    fn label_pairs<'s>(
        &'s self,
        metric: Metric,
        computed: &'s Computed,
    ) -> impl Iterator<Item = (&'s str, &'s str)> + 's {
        let mut standard = self.standard(computed);
        if matches!(metric, Metric::RequestMessages | Metric::ResponseMessages) {
            for v in &mut standard[STREAM_TAGS..] {
                *v = None;
            }
        }
        self.plan.label_pairs(metric, standard, &self.extra)
    }

    /// The rendered labels of `metric` for this series.
    pub fn labels(&self, metric: Metric) -> Vec<(String, String)> {
        let computed = Computed::new(self);
        self.label_pairs(metric, &computed)
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    /// This key, borrowed.
    pub fn borrowed(&self) -> SeriesRef<'_> {
        SeriesRef {
            plan: &self.plan,
            source: self.source.as_ref(),
            source_principal: self.source_principal.as_ref(),
            destination: self.destination.as_ref(),
            service: self.service.as_ref(),
            protocol: self.protocol,
            response_code: self.response_code,
            grpc_status: self.grpc_status,
            flags: self.flags,
            mutual_tls: self.mutual_tls,
            extra: &self.extra,
        }
    }
}

/// A [`SeriesKey`] borrowed from where its parts live (the stream's labels, the snapshot, the
/// cluster): what [`IstioMetrics::record_http_ref`] finds a series by. An owned key is built
/// only for a series not seen yet, so a stream of a known series copies no label struct.
#[derive(Debug, Clone, Copy)]
pub struct SeriesRef<'a> {
    /// [`SeriesKey::plan`].
    pub plan: &'a Arc<Plan>,
    /// [`SeriesKey::source`].
    pub source: Option<&'a Arc<PeerLabels>>,
    /// [`SeriesKey::source_principal`].
    pub source_principal: Option<&'a Arc<str>>,
    /// [`SeriesKey::destination`].
    pub destination: Option<&'a Arc<PeerLabels>>,
    /// [`SeriesKey::service`].
    pub service: Option<&'a Arc<ServiceLabels>>,
    /// [`SeriesKey::protocol`].
    pub protocol: Protocol,
    /// [`SeriesKey::response_code`].
    pub response_code: u16,
    /// [`SeriesKey::grpc_status`].
    pub grpc_status: Option<u32>,
    /// [`SeriesKey::flags`].
    pub flags: ResponseFlags,
    /// [`SeriesKey::mutual_tls`].
    pub mutual_tls: Option<bool>,
    /// [`SeriesKey::extra`] ([`no_dimensions`] without dimensions).
    pub extra: &'a Arc<[Arc<str>]>,
}

impl SeriesRef<'_> {
    /// The owned key.
    pub fn to_key(&self) -> SeriesKey {
        SeriesKey {
            plan: self.plan.clone(),
            source: self.source.cloned(),
            source_principal: self.source_principal.cloned(),
            destination: self.destination.cloned(),
            service: self.service.cloned(),
            protocol: self.protocol,
            response_code: self.response_code,
            grpc_status: self.grpc_status,
            flags: self.flags,
            mutual_tls: self.mutual_tls,
            extra: self.extra.clone(),
        }
    }

    /// Whether `key` has the very same shared label structs (the same allocations, not just
    /// equal ones) and equal values: a test of a few words that implies `key == self.to_key()`.
    fn same_parts(&self, key: &SeriesKey) -> bool {
        fn same<T: ?Sized>(a: Option<&Arc<T>>, b: &Option<Arc<T>>) -> bool {
            match (a, b) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
        }
        Arc::ptr_eq(self.plan, &key.plan)
            && same(self.source, &key.source)
            && same(self.destination, &key.destination)
            && same(self.service, &key.service)
            && self.protocol == key.protocol
            && self.response_code == key.response_code
            && self.grpc_status == key.grpc_status
            && self.flags == key.flags
            && self.mutual_tls == key.mutual_tls
            // Built per stream, so compared by content.
            && self.source_principal == key.source_principal.as_ref()
            && (Arc::ptr_eq(self.extra, &key.extra) || *self.extra == key.extra)
    }

    /// A hash that agrees with [`SeriesRef::same_parts`]: shared structs by address, the rest
    /// by value.
    fn parts_hash(&self, state: &mut impl Hasher) {
        fn addr<T: ?Sized>(a: Option<&Arc<T>>) -> usize {
            a.map_or(0, |a| Arc::as_ptr(a).cast::<()>().addr())
        }
        state.write_usize(addr(Some(self.plan)));
        state.write_usize(addr(self.source));
        state.write_usize(addr(self.destination));
        state.write_usize(addr(self.service));
        self.protocol.hash(state);
        self.response_code.hash(state);
        self.grpc_status.hash(state);
        self.flags.hash(state);
        self.mutual_tls.hash(state);
        self.source_principal.hash(state);
        if !self.extra.is_empty() {
            self.extra.hash(state);
        }
    }
}

/// Slots of a thread's cache of the HTTP series it recorded lately (direct-mapped by
/// [`SeriesRef::parts_hash`]; a power of two); a few dozen cover the series a waypoint's
/// worker sees at a time.
const RECENT_SLOTS: usize = 64;

/// A series a thread recorded to lately, with the key it was found by.
struct Recent {
    /// The [`IstioMetrics::id`] of the registry holding the series.
    registry: u64,
    hash: u64,
    key: SeriesKey,
    series: Arc<HttpSeries>,
}

thread_local! {
    /// The streams of a worker repeat a few series whose keys share the very same label structs
    /// (one per workload, cluster and `istio.stats` config): finding the series by those
    /// structs' addresses costs a fraction of hashing and comparing the labels' text in the
    /// series map and taking its shard's lock. Series are never removed from the map, so a
    /// cached one is the one the map would give; an entry only holds its key's structs alive
    /// until another series takes the slot.
    static RECENT: RefCell<Vec<Option<Recent>>> = const { RefCell::new(Vec::new()) };
}

/// Source of [`IstioMetrics::id`]s.
static REGISTRY_IDS: AtomicU64 = AtomicU64::new(1);

/// The hasher of [`SeriesRef::parts_hash`]: FxHash's rotate-xor-multiply per word. Its input is
/// a few addresses and small values (and the principal), and a collision costs one lookup in
/// the series map, so a round per word beats a general-purpose hasher here.
#[derive(Default)]
struct WordHasher(u64);

impl WordHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    /// The slot of [`RECENT`] for the hash: its top bits, the best mixed by the multiply.
    fn slot(hash: u64) -> usize {
        (hash >> (64 - RECENT_SLOTS.trailing_zeros())) as usize
    }
}

impl Hasher for WordHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }
    fn write_u16(&mut self, n: u16) {
        self.add(u64::from(n));
    }
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

/// The HTTP metrics of one series.
#[derive(Debug)]
struct HttpSeries {
    requests: AtomicU64,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
    /// The plan's custom metrics, in [`Plan::custom`] order (empty without definitions).
    custom: Box<[CustomCell]>,
}

/// The TCP metrics of one series.
#[derive(Debug, Default)]
pub struct TcpSeries {
    /// `istio_tcp_connections_opened_total`.
    pub opened: AtomicU64,
    /// `istio_tcp_connections_closed_total`.
    pub closed: AtomicU64,
    /// `istio_tcp_sent_bytes_total` (to the downstream).
    pub sent: AtomicU64,
    /// `istio_tcp_received_bytes_total` (from the downstream).
    pub received: AtomicU64,
    /// The plan's custom metrics, in [`Plan::custom`] order (empty without definitions).
    custom: Box<[CustomCell]>,
}

impl TcpSeries {
    /// Counts a closed connection that received `received` and sent `sent` bytes downstream
    /// over its life, and records the custom metrics, which istio_stats reports for a
    /// connection once, at its close (`request.total_size` is then the bytes received,
    /// `response.total_size` the bytes sent; a TCP connection has no response code). `extra` is
    /// the connection's dimension values (its key's [`SeriesKey::extra`]), which text values read.
    pub fn close(&self, received: u64, sent: u64, extra: &[Arc<str>]) {
        self.closed.fetch_add(1, Ordering::Relaxed);
        if !self.custom.is_empty() {
            record_custom(
                &self.custom,
                &CustomInputs {
                    request_bytes: received,
                    response_bytes: sent,
                    // A connection has no headers: its sizes are its bytes.
                    request_body: Some(received),
                    response_body: sent,
                    response_code: 0,
                    grpc_status: None,
                    // A text value a connection lacks evaluated to `unknown`, which counts 0
                    // as istio_stats's integer parse of it fails.
                    extra,
                },
            );
        }
    }
}

/// Orders gauge sets across series: when series with the same custom labels merge at render,
/// the value set last wins, as one Envoy gauge would hold it.
static GAUGE_SETS: AtomicU64 = AtomicU64::new(0);

/// One custom metric's value in one series.
#[derive(Debug)]
struct CustomCell {
    value: ValueSource,
    data: CellData,
}

#[derive(Debug)]
enum CellData {
    Counter(AtomicU64),
    /// The value and when it was set ([`GAUGE_SETS`]; 0: never).
    Gauge {
        value: AtomicU64,
        set_at: AtomicU64,
    },
    Histogram(Histogram),
}

/// Records every custom metric of a series for one stream or connection.
fn record_custom(cells: &[CustomCell], inputs: &CustomInputs<'_>) {
    for cell in cells {
        let v = cell.value.eval(inputs);
        match &cell.data {
            CellData::Counter(c) => {
                c.fetch_add(v, Ordering::Relaxed);
            }
            CellData::Gauge { value, set_at } => {
                let at = GAUGE_SETS.fetch_add(1, Ordering::Relaxed) + 1;
                value.store(v, Ordering::Relaxed);
                set_at.store(at, Ordering::Relaxed);
            }
            CellData::Histogram(h) => h.record(v),
        }
    }
}

/// One finished HTTP stream.
#[derive(Debug, Clone, Copy)]
pub struct HttpSample {
    /// Milliseconds from the request's first byte to the response's last.
    pub duration_ms: u64,
    /// Bytes received from the downstream (headers and body).
    pub request_bytes: u64,
    /// Bytes sent to the downstream (headers and body).
    pub response_bytes: u64,
    /// `request.size` (the `content-length`, else the body bytes received; `None`: the header
    /// is not a number).
    pub request_body: Option<u64>,
    /// Response body bytes sent (`response.size`).
    pub response_body: u64,
}

/// The gRPC message counters of one series ([`IstioMetrics::record_grpc_messages`]).
#[derive(Debug, Default)]
struct MessageSeries {
    request: AtomicU64,
    response: AtomicU64,
}

/// Series of one shard by key hash (computed once per record; collisions share a bucket).
type Shard<V> = RwLock<HashMap<u64, Vec<(SeriesKey, Arc<V>)>, BuildHasherDefault<KeyHashed>>>;

/// A hasher for keys that are already hashes.
#[derive(Debug, Default)]
struct KeyHashed(u64);

impl Hasher for KeyHashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The metrics an HTTP stream records at its end.
const HTTP_METRICS: [Metric; 4] = [
    Metric::RequestsTotal,
    Metric::RequestDuration,
    Metric::RequestBytes,
    Metric::ResponseBytes,
];

/// The metrics a gRPC stream adds to while it runs.
const MESSAGE_METRICS: [Metric; 2] = [Metric::RequestMessages, Metric::ResponseMessages];

/// The metrics a TCP connection records.
const TCP_METRICS: [Metric; 4] = [
    Metric::TcpOpened,
    Metric::TcpClosed,
    Metric::TcpSent,
    Metric::TcpReceived,
];

/// The registry of Istio metrics.
#[derive(Debug)]
pub struct IstioMetrics {
    /// Tells registries apart in the threads' [`RECENT`] caches (never reused).
    id: u64,
    /// Hashes series keys: foldhash (randomly seeded) instead of SipHash, which cost ~1.7k
    /// instructions per request over the 25 labels.
    hasher: foldhash::fast::RandomState,
    http: Vec<Shard<HttpSeries>>,
    tcp: Vec<Shard<TcpSeries>>,
    /// gRPC message counters, by a key without the response's labels (they are added while
    /// streams run).
    messages: Vec<Shard<MessageSeries>>,
    buckets: RwLock<BTreeMap<Metric, Arc<[f64]>>>,
    default_buckets: Arc<[f64]>,
    build: RwLock<Option<String>>,
    /// Metrics the bootstrap's stats matcher rejects, by [`Metric::index`] (set once at start).
    hidden: [AtomicBool; METRICS],
    /// `istio_build` is rejected.
    build_hidden: AtomicBool,
    /// The stats matcher custom metrics are judged by at render (their names come with config).
    custom_matcher: RwLock<Option<StatsMatcher>>,
    /// The bootstrap's bucket rules, for custom histograms (matched when a series is created).
    custom_buckets: RwLock<Vec<(StringMatch, Arc<[f64]>)>>,
}

impl Default for IstioMetrics {
    fn default() -> Self {
        IstioMetrics {
            id: REGISTRY_IDS.fetch_add(1, Ordering::Relaxed),
            hasher: Default::default(),
            http: (0..SHARDS).map(|_| RwLock::default()).collect(),
            tcp: (0..SHARDS).map(|_| RwLock::default()).collect(),
            messages: (0..SHARDS).map(|_| RwLock::default()).collect(),
            buckets: RwLock::default(),
            default_buckets: Arc::from(DEFAULT_BUCKETS),
            build: RwLock::default(),
            hidden: std::array::from_fn(|_| AtomicBool::new(false)),
            build_hidden: AtomicBool::new(false),
            custom_matcher: RwLock::default(),
            custom_buckets: RwLock::default(),
        }
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    match l.read() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    match l.write() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl IstioMetrics {
    /// Bucket bounds for histogram metrics (from the bootstrap's `histogram_bucket_settings`);
    /// the others keep Envoy's defaults.
    pub fn set_buckets(&self, settings: Vec<(Metric, Vec<f64>)>) {
        *write(&self.buckets) = settings
            .into_iter()
            .map(|(m, b)| (m, Arc::from(b)))
            .collect();
    }

    /// Publishes `istio_build{component="proxy",tag=<version>}` (`unknown` when empty).
    pub fn set_build(&self, istio_version: &str) {
        *write(&self.build) = Some(if istio_version.is_empty() {
            UNKNOWN.to_owned()
        } else {
            istio_version.to_owned()
        });
    }

    /// Hides the metrics `rejects` says must not exist, judged by their Envoy names
    /// ([`crate::stats_matcher::istio_metric_name`]: `istiocustom.istio_requests_total`, ...).
    /// Hidden metrics are not rendered; when all of a protocol's are hidden its series are not
    /// even kept.
    pub fn hide(&self, rejects: impl Fn(&str) -> bool) {
        use crate::stats_matcher::istio_metric_name;
        for m in Metric::ALL {
            self.hidden[m.index()]
                .store(rejects(&istio_metric_name(&m.family())), Ordering::Relaxed);
        }
        self.build_hidden.store(
            rejects(&istio_metric_name("istio_build")),
            Ordering::Relaxed,
        );
    }

    fn is_hidden(&self, m: Metric) -> bool {
        self.hidden[m.index()].load(Ordering::Relaxed)
    }

    /// Judges custom metrics (`istiocustom.istio_<name>`) by `matcher` from now on; a rejected
    /// one is not rendered.
    pub fn set_custom_matcher(&self, matcher: StatsMatcher) {
        *write(&self.custom_matcher) = Some(matcher);
    }

    /// Bucket rules (the bootstrap's `histogram_bucket_settings`, in order) for custom
    /// histograms: the first rule matching `istiocustom.istio_<name>` or `istio_<name>` sets
    /// the bounds of series created from now on; others keep Envoy's defaults.
    pub fn set_custom_buckets(&self, rules: Vec<(StringMatch, Vec<f64>)>) {
        *write(&self.custom_buckets) = rules.into_iter().map(|(m, b)| (m, Arc::from(b))).collect();
    }

    fn custom_hidden(&self, metric: &CustomMetric) -> bool {
        read(&self.custom_matcher)
            .as_ref()
            .is_some_and(|m| m.rejects(&metric.envoy_name()))
    }

    /// The cells of a new series of `plan` (none without definitions: nothing allocated).
    fn custom_cells(&self, plan: &Plan) -> Box<[CustomCell]> {
        if plan.custom.is_empty() {
            return Box::default();
        }
        let rules = read(&self.custom_buckets);
        plan.custom
            .iter()
            .map(|m| CustomCell {
                value: m.value,
                data: match m.kind {
                    CustomKind::Counter => CellData::Counter(AtomicU64::new(0)),
                    CustomKind::Gauge => CellData::Gauge {
                        value: AtomicU64::new(0),
                        set_at: AtomicU64::new(0),
                    },
                    CustomKind::Histogram => {
                        let bounds = if rules.is_empty() {
                            self.default_buckets.clone()
                        } else {
                            let (envoy, family) = (m.envoy_name(), m.family());
                            rules
                                .iter()
                                .find(|(r, _)| r.matches(&envoy) || r.matches(&family))
                                .map_or_else(|| self.default_buckets.clone(), |(_, b)| b.clone())
                        };
                        CellData::Histogram(Histogram::new(bounds))
                    }
                },
            })
            .collect()
    }

    fn bounds(&self, metric: Metric) -> Arc<[f64]> {
        read(&self.buckets)
            .get(&metric)
            .cloned()
            .unwrap_or_else(|| self.default_buckets.clone())
    }

    fn series<V>(
        &self,
        shards: &[Shard<V>],
        key: SeriesKey,
        make: impl FnOnce() -> V,
    ) -> Option<Arc<V>> {
        let hash = self.hasher.hash_one(&key);
        let shard = shards.get((hash as usize) % shards.len().max(1))?;
        let find = |bucket: &Vec<(SeriesKey, Arc<V>)>| {
            bucket
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.clone())
        };
        if let Some(s) = read(shard).get(&hash).and_then(find) {
            return Some(s);
        }
        let mut map = write(shard);
        let bucket = map.entry(hash).or_default();
        if let Some(s) = find(bucket) {
            return Some(s);
        }
        let s = Arc::new(make());
        bucket.push((key, s.clone()));
        Some(s)
    }

    /// The HTTP series of `key`: from this thread's [`RECENT`] cache when its label structs
    /// are the ones a recent stream had, else from the series map (created on first use).
    fn http_series(&self, key: SeriesRef<'_>) -> Option<Arc<HttpSeries>> {
        let mut h = WordHasher(self.id);
        key.parts_hash(&mut h);
        let hash = h.finish();
        let slot = WordHasher::slot(hash);
        let cached = RECENT
            .try_with(|r| {
                let r = r.try_borrow().ok()?;
                r.get(slot)?
                    .as_ref()
                    .filter(|e| e.registry == self.id && e.hash == hash && key.same_parts(&e.key))
                    .map(|e| e.series.clone())
            })
            .ok()
            .flatten();
        if cached.is_some() {
            return cached;
        }
        let owned = key.to_key();
        let series = self.series(&self.http, owned.clone(), || HttpSeries {
            requests: AtomicU64::new(0),
            duration: Histogram::new(self.bounds(Metric::RequestDuration)),
            request_bytes: Histogram::new(self.bounds(Metric::RequestBytes)),
            response_bytes: Histogram::new(self.bounds(Metric::ResponseBytes)),
            custom: self.custom_cells(key.plan),
        })?;
        // A thread being torn down (no cache) or a nested borrow (none today) just skips it.
        let _ = RECENT.try_with(|r| {
            if let Ok(mut r) = r.try_borrow_mut() {
                if r.is_empty() {
                    r.resize_with(RECENT_SLOTS, || None);
                }
                if let Some(entry) = r.get_mut(slot) {
                    *entry = Some(Recent {
                        registry: self.id,
                        hash,
                        key: owned,
                        series: series.clone(),
                    });
                }
            }
        });
        Some(series)
    }

    /// Records one finished HTTP stream.
    pub fn record_http(&self, key: SeriesKey, sample: HttpSample) {
        self.record_http_ref(key.borrowed(), sample);
    }

    /// Records one finished HTTP stream by its borrowed key (no label struct is copied unless
    /// the series is new).
    pub fn record_http_ref(&self, key: SeriesRef<'_>, sample: HttpSample) {
        let plan = key.plan;
        if plan.custom.is_empty() && HTTP_METRICS.iter().all(|m| self.is_hidden(*m)) {
            return;
        }
        let Some(series) = self.http_series(key) else {
            return;
        };
        if !plan.custom.is_empty() {
            record_custom(
                &series.custom,
                &CustomInputs {
                    request_bytes: sample.request_bytes,
                    response_bytes: sample.response_bytes,
                    request_body: sample.request_body,
                    response_body: sample.response_body,
                    response_code: key.response_code,
                    grpc_status: key.grpc_status,
                    extra: key.extra,
                },
            );
        }
        if !plan.drop[Metric::RequestsTotal.index()] {
            series.requests.fetch_add(1, Ordering::Relaxed);
        }
        if !plan.drop[Metric::RequestDuration.index()] {
            series.duration.record(sample.duration_ms);
        }
        if !plan.drop[Metric::RequestBytes.index()] {
            series.request_bytes.record(sample.request_bytes);
        }
        if !plan.drop[Metric::ResponseBytes.index()] {
            series.response_bytes.record(sample.response_bytes);
        }
    }

    /// Adds `request` and `response` gRPC messages to the message counters of `key` (whose
    /// response labels are not shown: see [`SeriesKey::labels`]). istio_stats adds a stream's
    /// new messages every `tcp_reporting_duration` while it runs and at its end.
    pub fn record_grpc_messages(&self, key: &SeriesKey, request: u64, response: u64) {
        // A report with no new message still makes the series (at 0), as Envoy's counter is
        // made by the add.
        let shown = |m: Metric| !key.plan.drop[m.index()] && !self.is_hidden(m);
        if !MESSAGE_METRICS.into_iter().any(shown) {
            return;
        }
        if let Some(s) = self.series(&self.messages, key.clone(), MessageSeries::default) {
            s.request.fetch_add(request, Ordering::Relaxed);
            s.response.fetch_add(response, Ordering::Relaxed);
        }
    }

    /// The counters of a TCP series (created on first use).
    pub fn tcp_series(&self, key: SeriesKey) -> Option<Arc<TcpSeries>> {
        if key.plan.custom.is_empty() && TCP_METRICS.iter().all(|m| self.is_hidden(*m)) {
            return None;
        }
        let plan = key.plan.clone();
        self.series(&self.tcp, key, || TcpSeries {
            custom: self.custom_cells(&plan),
            ..TcpSeries::default()
        })
    }

    /// Number of HTTP and TCP series.
    pub fn series_count(&self) -> usize {
        fn count<V>(shards: &[Shard<V>]) -> usize {
            shards
                .iter()
                .map(|s| read(s).values().map(Vec::len).sum::<usize>())
                .sum()
        }
        count(&self.http) + count(&self.tcp) + count(&self.messages)
    }

    /// Appends the Prometheus text exposition of every Istio metric to `out`.
    ///
    /// Series whose labels coincide after the plan's overrides are summed; counter series keep
    /// the order they were first seen in, histogram series are sorted by their labels. A series'
    /// label text is built and hashed once (per distinct override set of its plan) and copied into
    /// each of its lines — a histogram has one per bucket — and `out` grows once, to the size of
    /// the text.
    pub fn render_prometheus(&self, out: &mut String) {
        let hidden: [bool; METRICS] =
            std::array::from_fn(|i| self.hidden[i].load(Ordering::Relaxed));
        // Copies of the series, so a shard's lock is held only while it is copied.
        let http = snapshot_series(&self.http);
        let tcp = snapshot_series(&self.tcp);
        let messages = snapshot_series(&self.messages);
        let keys: Vec<&SeriesKey> = http
            .iter()
            .map(|(k, _)| k)
            .chain(tcp.iter().map(|(k, _)| k))
            .chain(messages.iter().map(|(k, _)| k))
            .collect();
        let computed: Vec<Computed> = keys.iter().map(|k| Computed::new(k)).collect();
        let mut texts = Texts::default();
        let mut families: [Family; METRICS] = std::array::from_fn(|_| Family::default());
        for (i, (key, s)) in http.iter().enumerate() {
            let ids = texts.of_series(key, &computed[i], &HTTP_METRICS);
            let mut add = |m: Metric, v: Value| {
                if !key.plan.drop[m.index()] && !hidden[m.index()] {
                    families[m.index()].add(ids[m.index()], i, v);
                }
            };
            add(
                Metric::RequestsTotal,
                Value::Counter(s.requests.load(Ordering::Relaxed)),
            );
            for (m, h) in [
                (Metric::RequestDuration, &s.duration),
                (Metric::RequestBytes, &s.request_bytes),
                (Metric::ResponseBytes, &s.response_bytes),
            ] {
                // Dropped or hidden histograms are not even read.
                if !key.plan.drop[m.index()] && !hidden[m.index()] {
                    add(m, Value::Histogram(h.snapshot()));
                }
            }
        }
        for (j, (key, s)) in tcp.iter().enumerate() {
            let i = http.len() + j;
            let ids = texts.of_series(key, &computed[i], &TCP_METRICS);
            for (m, v) in [
                (Metric::TcpOpened, &s.opened),
                (Metric::TcpClosed, &s.closed),
                (Metric::TcpSent, &s.sent),
                (Metric::TcpReceived, &s.received),
            ] {
                if !key.plan.drop[m.index()] && !hidden[m.index()] {
                    families[m.index()].add(
                        ids[m.index()],
                        i,
                        Value::Counter(v.load(Ordering::Relaxed)),
                    );
                }
            }
        }
        for (j, (key, s)) in messages.iter().enumerate() {
            let i = http.len() + tcp.len() + j;
            let ids = texts.of_series(key, &computed[i], &MESSAGE_METRICS);
            for (m, v) in [
                (Metric::RequestMessages, &s.request),
                (Metric::ResponseMessages, &s.response),
            ] {
                if !key.plan.drop[m.index()] && !hidden[m.index()] {
                    families[m.index()].add(
                        ids[m.index()],
                        i,
                        Value::Counter(v.load(Ordering::Relaxed)),
                    );
                }
            }
        }
        // Counters (in `Metric` order, series as first seen), then histograms.
        let mut rendered: Vec<(Metric, Vec<&Slot>)> = Vec::new();
        for m in Metric::ALL.into_iter().filter(|m| !is_histogram(*m)) {
            rendered.push((m, families[m.index()].slots.iter().collect()));
        }
        for m in Metric::HISTOGRAMS {
            let mut slots: Vec<&Slot> = families[m.index()].slots.iter().collect();
            // Ordered by label list (as a map keyed by the lists would be): every series of a
            // slot has the same list, so its first series stands for the slot.
            slots.sort_by_cached_key(|s| {
                keys.get(s.first_series)
                    .zip(computed.get(s.first_series))
                    .map(|(k, c)| k.label_pairs(m, c).collect::<Vec<_>>())
            });
            rendered.push((m, slots));
        }
        let custom = self.custom_families(&http, &tcp, &mut texts);
        let names: Vec<String> = rendered.iter().map(|(m, _)| m.family()).collect();
        let mut heads: Vec<(Head<'_>, Vec<&Slot>)> = rendered
            .into_iter()
            .zip(&names)
            .map(|((m, slots), family)| {
                let kind = if is_histogram(m) {
                    "histogram"
                } else {
                    "counter"
                };
                (
                    Head {
                        family,
                        help: m.help(),
                        kind,
                    },
                    slots,
                )
            })
            .collect();
        for (family, (kind, f)) in &custom {
            let mut slots: Vec<&Slot> = f.slots.iter().collect();
            // Ordered by label text, so a scrape does not depend on the series maps' order.
            slots.sort_by(|a, b| texts.get(a.text).cmp(texts.get(b.text)));
            let head = Head {
                family,
                help: CUSTOM_HELP,
                kind: kind.type_name(),
            };
            heads.push((head, slots));
        }
        let size: usize = heads
            .iter()
            .map(|(h, slots)| family_size(h, slots, &texts))
            .sum();
        out.reserve(size + 256);
        for (h, slots) in &heads {
            write_family(out, h, slots, &texts);
        }
        if let Some(tag) = read(&self.build)
            .as_deref()
            .filter(|_| !self.build_hidden.load(Ordering::Relaxed))
        {
            out.push_str("# HELP istio_build Istio version of the proxy.\n");
            out.push_str("# TYPE istio_build gauge\n");
            out.push_str("istio_build{component=\"proxy\",tag=\"");
            push_escaped(out, tag);
            out.push_str("\"} 1\n");
        }
    }
}

impl IstioMetrics {
    /// The custom metrics of every series, by family: series whose labels coincide are merged
    /// (counters and histograms summed, the gauge set last kept). A family takes the kind of
    /// the first definition seen; a definition of the same name with another kind (from another
    /// `istio.stats` config) is left out rather than mixed into it.
    fn custom_families(
        &self,
        http: &[(SeriesKey, Arc<HttpSeries>)],
        tcp: &[(SeriesKey, Arc<TcpSeries>)],
        texts: &mut Texts,
    ) -> BTreeMap<String, (CustomKind, Family)> {
        let mut families: BTreeMap<String, (CustomKind, Family)> = BTreeMap::new();
        let mut hidden: HashMap<String, bool> = HashMap::new();
        let series = http
            .iter()
            .map(|(k, s)| (k, &s.custom))
            .chain(tcp.iter().map(|(k, s)| (k, &s.custom)));
        for (key, cells) in series {
            for (metric, cell) in key.plan.custom.iter().zip(cells.iter()) {
                let hide = *hidden
                    .entry(metric.name.clone())
                    .or_insert_with(|| self.custom_hidden(metric));
                if hide {
                    continue;
                }
                let (kind, family) = families
                    .entry(metric.family())
                    .or_insert_with(|| (metric.kind, Family::default()));
                if *kind != metric.kind {
                    continue;
                }
                let value = match &cell.data {
                    CellData::Counter(c) => Value::Counter(c.load(Ordering::Relaxed)),
                    CellData::Gauge { value, set_at } => Value::Gauge(
                        value.load(Ordering::Relaxed),
                        set_at.load(Ordering::Relaxed),
                    ),
                    CellData::Histogram(h) => Value::Histogram(h.snapshot()),
                };
                let text = texts.of_custom(key, metric);
                family.add(text, 0, value);
            }
        }
        families
    }
}

fn is_histogram(m: Metric) -> bool {
    Metric::HISTOGRAMS.contains(&m)
}

/// `(key, series)` pairs of every shard, in the shards' iteration order.
fn snapshot_series<V>(shards: &[Shard<V>]) -> Vec<(SeriesKey, Arc<V>)> {
    let mut out = Vec::new();
    for shard in shards {
        out.extend(read(shard).values().flatten().cloned());
    }
    out
}

/// The label values of a series that are not stored in its key, as text.
struct Computed {
    code: String,
    grpc: String,
    flags: String,
}

impl Computed {
    fn new(key: &SeriesKey) -> Self {
        Computed {
            code: key.response_code.to_string(),
            grpc: match (key.protocol, key.grpc_status) {
                (Protocol::Grpc, Some(s)) => s.to_string(),
                _ => String::new(),
            },
            flags: key.flags.to_string(),
        }
    }
}

/// The label texts (`k="v",...`, no braces) of one render, each distinct text stored and hashed
/// once, named by its index. The text is a one-to-one rendering of the label list, so equal texts
/// are equal labels.
#[derive(Default)]
struct Texts {
    ids: HashMap<Rc<str>, usize>,
    by_id: Vec<Rc<str>>,
    scratch: String,
}

impl Texts {
    fn intern(&mut self, text: &str) -> usize {
        if let Some(id) = self.ids.get(text) {
            return *id;
        }
        let id = self.by_id.len();
        let text: Rc<str> = Rc::from(text);
        self.by_id.push(text.clone());
        self.ids.insert(text, id);
        id
    }

    fn get(&self, id: usize) -> &str {
        self.by_id.get(id).map_or("", |t| &**t)
    }

    /// The text id of a custom metric's labels for a series.
    fn of_custom(&mut self, key: &SeriesKey, metric: &CustomMetric) -> usize {
        let mut text = std::mem::take(&mut self.scratch);
        text.clear();
        for (n, (tag, slot)) in metric.labels.iter().enumerate() {
            if n > 0 {
                text.push(',');
            }
            text.push_str(tag);
            text.push_str("=\"");
            push_escaped(&mut text, key.plan.dimension_value(&key.extra, *slot));
            text.push('"');
        }
        let id = self.intern(&text);
        self.scratch = text;
        id
    }

    /// The text id of each of `metrics` for a series (other metrics: unset); metrics whose
    /// overrides and additions are the same share one text.
    fn of_series(
        &mut self,
        key: &SeriesKey,
        computed: &Computed,
        metrics: &[Metric],
    ) -> [usize; METRICS] {
        let plan = &key.plan;
        let mut ids = [usize::MAX; METRICS];
        for &m in metrics {
            let i = m.index();
            let same = (0..i).find(|&j| {
                ids[j] != usize::MAX
                    && plan.overrides[j] == plan.overrides[i]
                    && plan.additions[j] == plan.additions[i]
            });
            ids[i] = match same {
                Some(j) => ids[j],
                None => {
                    let mut text = std::mem::take(&mut self.scratch);
                    text.clear();
                    for (n, (k, v)) in key.label_pairs(m, computed).enumerate() {
                        if n > 0 {
                            text.push(',');
                        }
                        text.push_str(k);
                        text.push_str("=\"");
                        push_escaped(&mut text, v);
                        text.push('"');
                    }
                    let id = self.intern(&text);
                    self.scratch = text;
                    id
                }
            };
        }
        ids
    }
}

/// A metric's value for one series.
enum Value {
    Counter(u64),
    /// A gauge's value and when it was set (the later set wins a merge).
    Gauge(u64, u64),
    Histogram(HistogramSnapshot),
}

impl Value {
    fn merge(&mut self, other: Value) {
        match (self, other) {
            (Value::Counter(a), Value::Counter(b)) => *a += b,
            (Value::Gauge(v, at), Value::Gauge(v2, at2)) if at2 > *at => (*v, *at) = (v2, at2),
            (Value::Histogram(a), Value::Histogram(b)) => a.merge(&b),
            _ => {}
        }
    }
}

/// One rendered series: the sum of the series with its labels.
struct Slot {
    /// The label text's id in [`Texts`].
    text: usize,
    /// The first series with these labels (index into the render's HTTP then TCP series).
    first_series: usize,
    value: Value,
}

/// The series of one metric, in order of first appearance.
#[derive(Default)]
struct Family {
    slots: Vec<Slot>,
    /// Slot index by text id (`usize::MAX`: none yet).
    slot_of_text: Vec<usize>,
}

impl Family {
    fn add(&mut self, text: usize, series: usize, value: Value) {
        if let Some(slot) = self
            .slot_of_text
            .get(text)
            .and_then(|s| self.slots.get_mut(*s))
        {
            slot.value.merge(value);
            return;
        }
        if self.slot_of_text.len() <= text {
            self.slot_of_text.resize(text + 1, usize::MAX);
        }
        self.slot_of_text[text] = self.slots.len();
        self.slots.push(Slot {
            text,
            first_series: series,
            value,
        });
    }
}

/// `le` texts of a histogram's bounds, `+Inf` last.
fn le_texts(bounds: &[f64]) -> Vec<String> {
    bounds
        .iter()
        .map(|b| format_bound(*b))
        .chain(std::iter::once("+Inf".to_owned()))
        .collect()
}

/// Decimal digits of a `u64` at most.
const U64_DIGITS: usize = 20;

/// What heads a family: its name, `# HELP` text and `# TYPE`.
struct Head<'a> {
    family: &'a str,
    help: &'a str,
    kind: &'a str,
}

/// The help text of custom metrics.
const CUSTOM_HELP: &str =
    "Custom metric of the istio.stats filter (stats.PluginConfig definitions).";

/// An upper bound of the text [`write_family`] writes.
fn family_size(head: &Head<'_>, slots: &[&Slot], texts: &Texts) -> usize {
    if slots.is_empty() {
        return 0;
    }
    let family = head.family.len();
    let header = 2 * family + head.help.len() + "# HELP  \n# TYPE  histogram\n".len();
    let per_series: usize = slots
        .iter()
        .map(|slot| {
            let labels = texts.get(slot.text);
            // name, `{`, labels, `} `, value, newline.
            let line = |suffix: usize, extra: usize| {
                family + suffix + labels.len() + extra + 4 + U64_DIGITS
            };
            match &slot.value {
                Value::Counter(_) | Value::Gauge(..) => line(0, 0),
                Value::Histogram(h) => {
                    let les: usize = h
                        .bounds
                        .iter()
                        .map(|b| line("_bucket".len(), ",le=\"\"".len() + format_bound_len(*b)))
                        .sum();
                    les + line("_bucket".len(), ",le=\"+Inf\"".len())
                        + line("_sum".len(), 0)
                        + line("_count".len(), 0)
                }
            }
        })
        .sum();
    header + per_series
}

/// Length of [`format_bound`]'s text, without building it for every series.
fn format_bound_len(b: f64) -> usize {
    // Bounds are few; a generous constant keeps this an upper bound without formatting.
    if b.fract() == 0.0 && b.abs() < 1e15 {
        16
    } else {
        32
    }
}

/// Writes one family: `# HELP`, `# TYPE` and its series.
fn write_family(out: &mut String, head: &Head<'_>, slots: &[&Slot], texts: &Texts) {
    if slots.is_empty() {
        return;
    }
    let family = head.family;
    out.push_str("# HELP ");
    out.push_str(family);
    out.push(' ');
    out.push_str(head.help);
    out.push_str("\n# TYPE ");
    out.push_str(family);
    out.push(' ');
    out.push_str(head.kind);
    out.push('\n');
    // `le` texts for the bounds last seen (every series of a metric shares them in practice).
    let mut les: Option<(Arc<[f64]>, Vec<String>)> = None;
    for slot in slots {
        let labels = texts.get(slot.text);
        match &slot.value {
            Value::Counter(v) | Value::Gauge(v, _) => write_line(out, family, "", labels, None, *v),
            Value::Histogram(h) => {
                let le_list = match &les {
                    Some((bounds, list)) if *bounds == h.bounds => list,
                    _ => {
                        let (_, list) = les.insert((h.bounds.clone(), le_texts(&h.bounds)));
                        list
                    }
                };
                let mut total = 0u64;
                for (c, le) in h.counts.iter().zip(le_list) {
                    total += c;
                    write_line(out, family, "_bucket", labels, Some(le), total);
                }
                write_line(out, family, "_sum", labels, None, h.sum);
                write_line(out, family, "_count", labels, None, h.count());
            }
        }
    }
}

/// `family+suffix{labels[,le="le"]} value\n`.
fn write_line(
    out: &mut String,
    family: &str,
    suffix: &str,
    labels: &str,
    le: Option<&str>,
    value: u64,
) {
    out.push_str(family);
    out.push_str(suffix);
    out.push('{');
    out.push_str(labels);
    if let Some(le) = le {
        if !labels.is_empty() {
            out.push(',');
        }
        out.push_str("le=\"");
        out.push_str(le);
        out.push('"');
    }
    out.push_str("} ");
    push_u64(out, value);
    out.push('\n');
}

/// Appends `v` in decimal.
fn push_u64(out: &mut String, mut v: u64) {
    let mut digits = [0u8; U64_DIGITS];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for d in &digits[at..] {
        out.push(char::from(*d));
    }
}

/// Appends `v` with Prometheus label-value escaping.
fn push_escaped(out: &mut String, v: &str) {
    if !v.contains(['\\', '"', '\n']) {
        out.push_str(v);
        return;
    }
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Prometheus label-value escaping.
pub fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    push_escaped(&mut s, v);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::ResponseFlag;

    fn peer(workload: &str, ns: &str, sa: &str) -> Arc<PeerLabels> {
        Arc::new(PeerLabels {
            workload: workload.into(),
            namespace: ns.into(),
            canonical_service: workload.into(),
            canonical_revision: "v1".into(),
            app: workload.into(),
            version: "v1".into(),
            cluster: "Kubernetes".into(),
            identity: format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"),
            ..PeerLabels::default()
        })
    }

    fn key(plan: Arc<Plan>) -> SeriesKey {
        SeriesKey {
            plan,
            source: Some(peer("sleep", "default", "sleep")),
            source_principal: Some(Arc::from("spiffe://cluster.local/ns/default/sa/sleep")),
            destination: Some(peer("httpbin", "default", "httpbin")),
            service: Some(Arc::new(ServiceLabels::for_cluster(
                "inbound-vip|8000|http|httpbin.default.svc.cluster.local",
                [("httpbin.default.svc.cluster.local", "httpbin", "default")].into_iter(),
            ))),
            protocol: Protocol::Http,
            response_code: 200,
            grpc_status: None,
            flags: ResponseFlags::default(),
            mutual_tls: Some(true),
            extra: Arc::from(Vec::new()),
        }
    }

    #[test]
    fn grpc_message_counters_carry_the_stream_labels_only() {
        let m = IstioMetrics::default();
        let mut plan = Plan::standard("waypoint");
        // A dimension added to the message counters, and one replacing a label they lack.
        plan.dimensions = vec![super::super::expr::Expr::Literal("lit".into())];
        plan.additions[Metric::RequestMessages.index()].push(("x_tag".into(), 0));
        plan.overrides[Metric::ResponseMessages.index()]
            .insert(tag_index("response_code").unwrap_or(0), Some(0));
        let mut k = key(Arc::new(plan));
        k.protocol = Protocol::Grpc;
        k.response_code = 0;
        // Two reports of one stream (periodic, then the end) and one of another that saw no
        // message: the series is made at 0 all the same.
        m.record_grpc_messages(&k, 2, 3);
        m.record_grpc_messages(&k, 1, 0);
        let mut other = k.clone();
        other.destination = Some(peer("ratings", "default", "ratings"));
        m.record_grpc_messages(&other, 0, 0);
        assert_eq!(m.series_count(), 2);
        let mut out = String::new();
        m.render_prometheus(&mut out);
        // A family's lines, the httpbin stream's first.
        let lines = |family: &str| -> Vec<&str> {
            let mut v: Vec<&str> = out
                .lines()
                .filter(|l| l.starts_with(&format!("{family}{{")))
                .collect();
            v.sort_by_key(|l| !l.contains("destination_workload=\"httpbin\""));
            v
        };
        let requests = lines("istio_request_messages_total");
        let responses = lines("istio_response_messages_total");
        assert_eq!(requests.len(), 2, "{out}");
        assert_eq!(responses.len(), 2, "{out}");
        let names = |line: &str| -> Vec<String> {
            line.split_once('{')
                .map(|(_, rest)| rest)
                .unwrap_or_default()
                .split("\",")
                .map(|kv| kv.split('=').next().unwrap_or_default().to_owned())
                .collect()
        };
        let mut want: Vec<String> = TAGS[..20].iter().map(|t| (*t).to_owned()).collect();
        want.push("x_tag".into());
        assert_eq!(names(requests[0]), want, "{}", requests[0]);
        assert!(requests[0].contains("destination_workload=\"httpbin\""));
        assert!(requests[0].ends_with("x_tag=\"lit\"} 3"), "{}", requests[0]);
        assert!(requests[1].ends_with("} 0"), "{}", requests[1]);
        // A replaced label the counters do not have stays absent.
        assert_eq!(names(responses[0]), TAGS[..20].to_vec(), "{}", responses[0]);
        assert!(responses[0].ends_with("} 3"), "{}", responses[0]);
        assert!(!out.contains("istio_requests_total{"), "{out}");
        // Dropped: no series at all.
        let mut dropped = Plan::standard("waypoint");
        dropped.drop[Metric::RequestMessages.index()] = true;
        dropped.drop[Metric::ResponseMessages.index()] = true;
        let none = IstioMetrics::default();
        none.record_grpc_messages(&key(Arc::new(dropped)), 5, 5);
        assert_eq!(none.series_count(), 0);
    }

    #[test]
    fn body_sizes_are_custom_values() {
        use waypoint_proto::istio::stats::MetricType;
        let mut plan = Plan::standard("waypoint");
        custom_metrics(
            &[
                definition("rq_body", "request.size", MetricType::Counter),
                definition("rs_body", "int(response.size)", MetricType::Counter),
                definition("rq_total", "request.total_size", MetricType::Counter),
            ],
            &mut plan,
        )
        .expect("definitions compile");
        assert_eq!(
            plan.custom.iter().map(|c| c.value).collect::<Vec<_>>(),
            [
                ValueSource::RequestSize,
                ValueSource::ResponseSize,
                ValueSource::RequestTotalSize
            ]
        );
        let plan = Arc::new(plan);
        let m = IstioMetrics::default();
        let sample = |request_body| HttpSample {
            duration_ms: 1,
            request_bytes: 300,
            response_bytes: 900,
            request_body,
            response_body: 700,
        };
        m.record_http(key(plan.clone()), sample(Some(11)));
        // A `content-length` that is not a number: Envoy's attribute is absent, 0 is recorded.
        m.record_http(key(plan.clone()), sample(None));
        fn value(out: &str, family: &str) -> Option<String> {
            out.lines()
                .find(|l| {
                    l.strip_prefix(family)
                        .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
                })
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        }
        let mut out = String::new();
        m.render_prometheus(&mut out);
        for (family, want) in [
            ("istio_rq_body", "11"),
            ("istio_rs_body", "1400"),
            ("istio_rq_total", "600"),
        ] {
            assert_eq!(
                value(&out, family).as_deref(),
                Some(want),
                "{family} in\n{out}"
            );
        }
        // A connection's sizes are its bytes (no headers).
        let mut t = key(plan);
        t.protocol = Protocol::Tcp;
        let tcp = IstioMetrics::default();
        tcp.tcp_series(t).expect("tcp series").close(40, 50, &[]);
        let mut out = String::new();
        tcp.render_prometheus(&mut out);
        for (family, want) in [
            ("istio_rq_body", "40"),
            ("istio_rs_body", "50"),
            ("istio_rq_total", "40"),
        ] {
            assert_eq!(
                value(&out, family).as_deref(),
                Some(want),
                "{family} in\n{out}"
            );
        }
    }

    #[test]
    fn http_series_render_with_istio_labels_in_order() {
        let m = IstioMetrics::default();
        let plan = Arc::new(Plan::standard("waypoint"));
        let sample = HttpSample {
            duration_ms: 3,
            request_bytes: 120,
            response_bytes: 2000,
            request_body: None,
            response_body: 0,
        };
        m.record_http(key(plan.clone()), sample);
        m.record_http(key(plan.clone()), sample);
        m.set_build("1.29.2");
        let mut out = String::new();
        m.render_prometheus(&mut out);
        let line = out
            .lines()
            .find(|l| l.starts_with("istio_requests_total{"))
            .unwrap_or_default();
        let names: Vec<&str> = line
            .trim_start_matches("istio_requests_total{")
            .split("\",")
            .map(|kv| kv.split('=').next().unwrap_or_default())
            .collect();
        assert_eq!(names, TAGS.to_vec());
        assert!(line.ends_with("} 2"), "{line}");
        for want in [
            "reporter=\"waypoint\"",
            "source_workload=\"sleep\"",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"",
            "destination_service=\"httpbin.default.svc.cluster.local\"",
            "destination_service_name=\"httpbin\"",
            "destination_principal=\"spiffe://cluster.local/ns/default/sa/httpbin\"",
            "response_code=\"200\"",
            "grpc_response_status=\"\"",
            "response_flags=\"-\"",
            "connection_security_policy=\"mutual_tls\"",
        ] {
            assert!(line.contains(want), "{want} missing in {line}");
        }
        assert!(out.contains("# TYPE istio_request_duration_milliseconds histogram"));
        assert!(out.contains(",le=\"5\"} 2"), "{out}");
        assert!(out.contains("istio_request_duration_milliseconds_count{"));
        assert!(out.contains("istio_response_bytes_sum{"));
        assert!(out.contains("istio_build{component=\"proxy\",tag=\"1.29.2\"} 1"));
    }

    #[test]
    fn unknown_peers_and_tcp_labels() {
        let m = IstioMetrics::default();
        let mut k = key(Arc::new(Plan::standard("waypoint")));
        k.source = None;
        k.source_principal = None;
        k.destination = None;
        k.protocol = Protocol::Tcp;
        k.mutual_tls = Some(false);
        let mut flags = ResponseFlags::default();
        flags.insert(ResponseFlag::UpstreamConnectionFailure);
        k.flags = flags;
        let s = m.tcp_series(k).expect("series");
        s.opened.fetch_add(1, Ordering::Relaxed);
        let mut out = String::new();
        m.render_prometheus(&mut out);
        let line = out
            .lines()
            .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .unwrap_or_default();
        assert!(line.contains("source_workload=\"unknown\""), "{line}");
        assert!(line.contains("source_canonical_revision=\"latest\""));
        assert!(line.contains("request_protocol=\"tcp\""));
        assert!(line.contains("response_flags=\"UF\""));
        assert!(line.contains("connection_security_policy=\"none\""));
        assert!(!line.contains("response_code"), "TCP has no response_code");
        assert_eq!(line.matches("=\"").count(), 23);
    }

    #[test]
    fn overrides_remove_replace_add_and_drop_then_merge() {
        let m = IstioMetrics::default();
        let mut plan = Plan::standard("waypoint");
        let rq = Metric::RequestsTotal.index();
        plan.overrides[rq].insert(tag_index("source_principal").unwrap_or(0), None);
        plan.overrides[rq].insert(tag_index("destination_app").unwrap_or(0), Some(0));
        plan.additions[rq].push(("x_user".into(), 1));
        plan.dimensions = vec![
            crate::telemetry::expr::Expr::Literal("fixed".into()),
            crate::telemetry::expr::Expr::RequestHeader("x-user".into()),
        ];
        plan.drop[Metric::RequestBytes.index()] = true;
        let plan = Arc::new(plan);
        let sample = HttpSample {
            duration_ms: 1,
            request_bytes: 1,
            response_bytes: 1,
            request_body: None,
            response_body: 0,
        };
        let mut a = key(plan.clone());
        a.extra = Arc::from(vec![Arc::from("fixed"), Arc::from("alice")]);
        let mut b = a.clone();
        // Differs only in the removed label: one rendered series.
        b.source_principal = Some(Arc::from("spiffe://cluster.local/ns/default/sa/other"));
        m.record_http(a, sample);
        m.record_http(b, sample);
        let mut out = String::new();
        m.render_prometheus(&mut out);
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .collect();
        assert_eq!(lines.len(), 1, "{out}");
        let line = lines[0];
        assert!(line.ends_with("} 2"));
        assert!(!line.contains("source_principal"));
        assert!(line.contains("destination_app=\"fixed\""));
        assert!(line.contains("connection_security_policy=\"mutual_tls\",x_user=\"alice\""));
        assert!(!out.contains("istio_request_bytes"), "dropped");
        assert!(out.contains("istio_response_bytes_bucket{"));
    }

    #[test]
    fn label_values_are_escaped_and_buckets_configurable() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let m = IstioMetrics::default();
        m.set_buckets(vec![(Metric::RequestDuration, vec![1.0, 2.0])]);
        m.record_http(
            key(Arc::new(Plan::standard("waypoint"))),
            HttpSample {
                duration_ms: 2,
                request_bytes: 5,
                response_bytes: 5,
                request_body: None,
                response_body: 0,
            },
        );
        let mut out = String::new();
        m.render_prometheus(&mut out);
        let duration: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("istio_request_duration_milliseconds_bucket"))
            .collect();
        assert_eq!(duration.len(), 3, "{out}");
        assert!(duration[1].ends_with("le=\"2\"} 1"));
        assert!(out.contains("istio_request_bytes_bucket{") && out.contains("le=\"0.5\""));
    }

    #[test]
    fn hidden_metrics_are_not_rendered_nor_kept() {
        let m = IstioMetrics::default();
        // Reject the duration histogram and istio_build by their Envoy names.
        m.hide(|name| {
            name == "istiocustom.istio_request_duration_milliseconds"
                || name == "istiocustom.istio_build"
        });
        m.set_build("1.29.2");
        let plan = Arc::new(Plan::standard("waypoint"));
        let sample = HttpSample {
            duration_ms: 3,
            request_bytes: 120,
            response_bytes: 2000,
            request_body: None,
            response_body: 0,
        };
        m.record_http(key(plan.clone()), sample);
        let mut out = String::new();
        m.render_prometheus(&mut out);
        assert!(out.contains("# TYPE istio_requests_total counter"), "{out}");
        assert!(
            out.contains("# TYPE istio_request_bytes histogram"),
            "{out}"
        );
        assert!(
            !out.contains("istio_request_duration_milliseconds"),
            "{out}"
        );
        assert!(!out.contains("istio_build"), "{out}");

        // Everything rejected: nothing is rendered and no series is kept.
        let none = IstioMetrics::default();
        none.hide(|_| true);
        none.set_build("1.29.2");
        none.record_http(key(plan.clone()), sample);
        let mut tcp_key = key(plan);
        tcp_key.protocol = Protocol::Tcp;
        assert!(none.tcp_series(tcp_key).is_none());
        assert_eq!(none.series_count(), 0);
        let mut out = String::new();
        none.render_prometheus(&mut out);
        assert_eq!(out, "");
    }

    /// The exposition built the plain way: label lists per metric, histograms in a map ordered
    /// by them, counters in order of first appearance, every line formatted on its own.
    fn render_plainly(m: &IstioMetrics) -> String {
        use std::fmt::Write as _;
        fn braces(labels: &[(String, String)], le: Option<&str>) -> String {
            let mut parts: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            parts.extend(le.map(|le| format!("le=\"{le}\"")));
            format!("{{{}}}", parts.join(","))
        }
        type Labels = Vec<(String, String)>;
        let mut counters: BTreeMap<Metric, Vec<(Labels, u64)>> = BTreeMap::new();
        let mut histograms: BTreeMap<Metric, BTreeMap<Labels, HistogramSnapshot>> = BTreeMap::new();
        let shown =
            |k: &SeriesKey, metric: Metric| !k.plan.drop[metric.index()] && !m.is_hidden(metric);
        let mut count = |metric: Metric, k: &SeriesKey, v: u64| {
            if !shown(k, metric) {
                return;
            }
            let list = counters.entry(metric).or_default();
            let labels = k.labels(metric);
            match list.iter_mut().find(|(l, _)| *l == labels) {
                Some((_, total)) => *total += v,
                None => list.push((labels, v)),
            }
        };
        for (k, s) in snapshot_series(&m.http) {
            count(
                Metric::RequestsTotal,
                &k,
                s.requests.load(Ordering::Relaxed),
            );
            for (metric, h) in [
                (Metric::RequestDuration, &s.duration),
                (Metric::RequestBytes, &s.request_bytes),
                (Metric::ResponseBytes, &s.response_bytes),
            ] {
                if shown(&k, metric) {
                    let slot = histograms.entry(metric).or_default();
                    match slot.get_mut(&k.labels(metric)) {
                        Some(h0) => h0.merge(&h.snapshot()),
                        None => {
                            slot.insert(k.labels(metric), h.snapshot());
                        }
                    }
                }
            }
        }
        for (k, s) in snapshot_series(&m.messages) {
            count(
                Metric::RequestMessages,
                &k,
                s.request.load(Ordering::Relaxed),
            );
            count(
                Metric::ResponseMessages,
                &k,
                s.response.load(Ordering::Relaxed),
            );
        }
        for (k, s) in snapshot_series(&m.tcp) {
            count(Metric::TcpOpened, &k, s.opened.load(Ordering::Relaxed));
            count(Metric::TcpClosed, &k, s.closed.load(Ordering::Relaxed));
            count(Metric::TcpSent, &k, s.sent.load(Ordering::Relaxed));
            count(Metric::TcpReceived, &k, s.received.load(Ordering::Relaxed));
        }
        let mut out = String::new();
        for (metric, list) in &counters {
            let f = metric.family();
            let _ = write!(out, "# HELP {f} {}\n# TYPE {f} counter\n", metric.help());
            for (labels, v) in list {
                let _ = writeln!(out, "{f}{} {v}", braces(labels, None));
            }
        }
        for (metric, series) in &histograms {
            let f = metric.family();
            let _ = write!(out, "# HELP {f} {}\n# TYPE {f} histogram\n", metric.help());
            for (labels, h) in series {
                for (le, c) in h.cumulative() {
                    let _ = writeln!(out, "{f}_bucket{} {c}", braces(labels, Some(&le)));
                }
                let _ = writeln!(out, "{f}_sum{} {}", braces(labels, None), h.sum);
                let _ = writeln!(out, "{f}_count{} {}", braces(labels, None), h.count());
            }
        }
        if let Some(tag) = read(&m.build).as_deref() {
            let _ = write!(
                out,
                "# HELP istio_build Istio version of the proxy.\n# TYPE istio_build gauge\n\
                 istio_build{{component=\"proxy\",tag=\"{}\"}} 1\n",
                escape(tag)
            );
        }
        out
    }

    #[test]
    fn render_matches_the_plain_rendering_byte_for_byte() {
        let m = IstioMetrics::default();
        m.set_build("1.29.\"2\"");
        let mut over = Plan::standard("waypoint");
        let rq = Metric::RequestsTotal.index();
        let dur = Metric::RequestDuration.index();
        // Removing the principal merges series that differ only by it.
        over.overrides[rq].insert(tag_index("source_principal").unwrap_or(0), None);
        over.overrides[rq].insert(tag_index("destination_app").unwrap_or(0), Some(0));
        over.overrides[dur].insert(tag_index("response_code").unwrap_or(0), None);
        over.additions[rq].push(("x_user".into(), 1));
        over.additions[dur].push(("x_missing".into(), 5));
        over.drop[Metric::RequestBytes.index()] = true;
        let over = Arc::new(over);
        let standard = Arc::new(Plan::standard("waypoint"));
        for i in 0..60u64 {
            let mut k = key(if i % 3 == 0 {
                over.clone()
            } else {
                standard.clone()
            });
            if i % 3 == 0 {
                k.extra = Arc::from(vec![
                    Arc::<str>::from("fixed"),
                    Arc::<str>::from(format!("user \"{}\"\n\\", i % 4).as_str()),
                ]);
            }
            k.destination = Some(peer(&format!("svc{}", i % 7), "default", "svc"));
            k.source_principal = Some(Arc::from(format!("spiffe://td/ns/n{}/sa/s", i % 5)));
            k.response_code = [200, 503, 404][(i % 3) as usize];
            if i % 5 == 0 {
                k.protocol = Protocol::Grpc;
                k.grpc_status = Some((i % 3) as u32);
            }
            if i % 7 == 0 {
                k.source = None;
                k.source_principal = None;
            }
            if i % 4 == 0 {
                let mut f = ResponseFlags::default();
                f.insert(ResponseFlag::UpstreamConnectionFailure);
                k.flags = f;
            }
            if i % 6 == 0 {
                k.mutual_tls = None;
            }
            for r in 0..1 + i % 3 {
                m.record_http(
                    k.clone(),
                    HttpSample {
                        duration_ms: i * 37 + r * 1000,
                        request_bytes: i * 101,
                        response_bytes: i * 977 + r,
                        request_body: None,
                        response_body: 0,
                    },
                );
            }
            if k.protocol == Protocol::Grpc {
                m.record_grpc_messages(&k, i, i % 3);
            }
            let mut t = k.clone();
            t.protocol = Protocol::Tcp;
            let s = m.tcp_series(t).expect("tcp series");
            s.opened.fetch_add(i, Ordering::Relaxed);
            s.sent.fetch_add(7 * i, Ordering::Relaxed);
        }
        let mut out = String::from("# kept\n");
        m.render_prometheus(&mut out);
        let plain = render_plainly(&m);
        assert_eq!(out.strip_prefix("# kept\n"), Some(plain.as_str()));
        // The fixture exercises what it should: merged, escaped, gRPC and TCP series.
        assert!(out.contains("x_user=\"user \\\"1\\\"\\n\\\\\""), "{out}");
        assert!(out.contains("istio_request_messages_total{"));
        assert!(out.contains("istio_tcp_sent_bytes_total{"));
        // Series of the plan that drops `request_bytes` have none.
        assert!(
            out.matches("istio_request_bytes_count{").count()
                < out.matches("istio_response_bytes_count{").count()
        );
    }

    fn definition(
        name: &str,
        value: &str,
        kind: waypoint_proto::istio::stats::MetricType,
    ) -> waypoint_proto::istio::stats::MetricDefinition {
        waypoint_proto::istio::stats::MetricDefinition {
            name: name.into(),
            value: value.into(),
            r#type: kind as i32,
        }
    }

    #[test]
    fn definitions_compile_as_istio_stats_reads_them() {
        use crate::telemetry::expr::Expr;
        use waypoint_proto::istio::stats::MetricType;
        let mut plan = Plan::standard("waypoint");
        plan.dimensions.push(Expr::RequestHeader("x-cost".into()));
        custom_metrics(
            &[
                definition("calls", "1", MetricType::Counter),
                // Standard names (and istio_build's) are not redefined.
                definition("requests_total", "10", MetricType::Counter),
                definition("build", "1", MetricType::Gauge),
                definition("sizes", "response.total_size", MetricType::Histogram),
                // The first of two definitions stays.
                definition("calls", "2", MetricType::Gauge),
                // A text value shares the slot of the same dimension expression.
                definition("cost", "request.headers['x-cost']", MetricType::Counter),
                definition("last_code", "response.code", MetricType::Gauge),
            ],
            &mut plan,
        )
        .expect("compiles");
        let got: Vec<(&str, CustomKind, ValueSource)> = plan
            .custom
            .iter()
            .map(|c| (c.name.as_str(), c.kind, c.value))
            .collect();
        assert_eq!(
            got,
            [
                ("calls", CustomKind::Counter, ValueSource::Integer(1)),
                (
                    "sizes",
                    CustomKind::Histogram,
                    ValueSource::ResponseTotalSize
                ),
                ("cost", CustomKind::Counter, ValueSource::Dimension(0)),
                ("last_code", CustomKind::Gauge, ValueSource::ResponseCode),
            ]
        );
        assert_eq!(plan.dimensions.len(), 1);
        assert_eq!(plan.custom[0].family(), "istio_calls");
        assert_eq!(plan.custom[0].envoy_name(), "istiocustom.istio_calls");

        let mut plan = Plan::standard("waypoint");
        let e = custom_metrics(
            &[
                definition("fine", "1", MetricType::Counter),
                definition("latency", "request.total_size * 2", MetricType::Histogram),
            ],
            &mut plan,
        )
        .expect_err("arithmetic in a value");
        assert_eq!((e.index, e.field), (1, "value"));
        assert!(
            e.to_string().contains("'latency'") && e.reason.contains("request.total_size * 2"),
            "{e}"
        );
        let mut bad_type = definition("t", "1", MetricType::Counter);
        bad_type.r#type = 7;
        let e = custom_metrics(&[bad_type], &mut Plan::standard("waypoint"))
            .expect_err("an unknown type");
        assert_eq!((e.index, e.field), (0, "type"));
    }

    /// A plan with the custom metrics of the Istio docs' kind: a per-request counter labelled
    /// by a literal dimension, a response size histogram, the last response code as a gauge and
    /// a counter of a request header's value.
    fn custom_plan() -> Arc<Plan> {
        use crate::telemetry::expr::Expr;
        let mut plan = Plan::standard("waypoint");
        plan.dimensions = vec![
            Expr::Literal("proxy".into()),
            Expr::RequestHeader("x-cost".into()),
        ];
        plan.custom = vec![
            CustomMetric {
                name: "calls".into(),
                kind: CustomKind::Counter,
                value: ValueSource::Integer(1),
                labels: vec![("reporter".into(), 0)],
            },
            CustomMetric {
                name: "sizes".into(),
                kind: CustomKind::Histogram,
                value: ValueSource::ResponseTotalSize,
                labels: Vec::new(),
            },
            CustomMetric {
                name: "last_code".into(),
                kind: CustomKind::Gauge,
                value: ValueSource::ResponseCode,
                labels: Vec::new(),
            },
            CustomMetric {
                name: "cost".into(),
                kind: CustomKind::Counter,
                value: ValueSource::Dimension(1),
                labels: vec![("reporter".into(), 0)],
            },
        ];
        Arc::new(plan)
    }

    #[test]
    fn custom_metrics_record_merge_and_render() {
        let m = IstioMetrics::default();
        let plan = custom_plan();
        // Three streams in two standard series (the code differs): custom series with the
        // same labels merge.
        for (code, response_bytes, cost) in [(200, 700, "3"), (200, 1500, "4"), (503, 90, "x")] {
            let mut k = key(plan.clone());
            k.response_code = code;
            k.extra = Arc::from(vec![Arc::<str>::from("proxy"), Arc::<str>::from(cost)]);
            m.record_http(
                k,
                HttpSample {
                    duration_ms: 1,
                    request_bytes: 100,
                    response_bytes,
                    request_body: None,
                    response_body: 0,
                },
            );
        }
        let mut out = String::new();
        m.render_prometheus(&mut out);
        assert!(out.contains("# TYPE istio_calls counter\n"), "{out}");
        assert!(
            out.contains("\nistio_calls{reporter=\"proxy\"} 3\n"),
            "{out}"
        );
        // A non-integer value counts 0.
        assert!(
            out.contains("\nistio_cost{reporter=\"proxy\"} 7\n"),
            "{out}"
        );
        assert!(out.contains("# TYPE istio_sizes histogram\n"), "{out}");
        assert!(out.contains("\nistio_sizes_count{} 3\n"), "{out}");
        assert!(out.contains("\nistio_sizes_sum{} 2290\n"), "{out}");
        assert!(
            out.contains("\nistio_sizes_bucket{le=\"100\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("\nistio_sizes_bucket{le=\"1000\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("\nistio_sizes_bucket{le=\"+Inf\"} 3\n"),
            "{out}"
        );
        // The gauge holds the value set last, across the series it merges.
        assert!(out.contains("# TYPE istio_last_code gauge\n"), "{out}");
        assert!(out.contains("\nistio_last_code{} 503\n"), "{out}");
        // Custom metrics carry only the labels dimensions give them.
        assert!(!out.contains("istio_calls{reporter=\"waypoint\""), "{out}");
        // The standard metrics are untouched.
        assert!(out.contains("istio_requests_total{reporter=\"waypoint\""));
        // Every family is headed once.
        assert_eq!(out.matches("# TYPE istio_calls ").count(), 1);
    }

    #[test]
    fn tcp_connections_record_custom_metrics_at_close() {
        let m = IstioMetrics::default();
        let mut k = key(custom_plan());
        k.protocol = Protocol::Tcp;
        let s = m.tcp_series(k).expect("series");
        s.opened.fetch_add(1, Ordering::Relaxed);
        s.close(10, 2000, &[]);
        let mut out = String::new();
        m.render_prometheus(&mut out);
        assert!(out.contains("istio_tcp_connections_closed_total{"), "{out}");
        // Undimensioned connections still show a literal dimension.
        assert!(
            out.contains("\nistio_calls{reporter=\"proxy\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("\nistio_sizes_sum{} 2000\n"), "{out}");
        // A connection has no response code nor headers: 0.
        assert!(out.contains("\nistio_last_code{} 0\n"), "{out}");
        assert!(
            out.contains("\nistio_cost{reporter=\"proxy\"} 0\n"),
            "{out}"
        );
    }

    #[test]
    fn tcp_custom_text_values_read_the_connection_dimensions() {
        let m = IstioMetrics::default();
        let mut k = key(custom_plan());
        k.protocol = Protocol::Tcp;
        // As tcp_proxy evaluates them once per connection: the literal, then a value that is
        // an integer (a filter state's, say).
        let extra: Arc<[Arc<str>]> = Arc::from(vec![Arc::from("proxy"), Arc::from("7")]);
        k.extra = extra.clone();
        let s = m.tcp_series(k.clone()).expect("series");
        s.close(1, 2, &extra);
        s.close(1, 2, &extra);
        // A connection's `unknown` (a request header) counts 0.
        let unknown: Arc<[Arc<str>]> = Arc::from(vec![Arc::from("proxy"), Arc::from(UNKNOWN)]);
        k.extra = unknown.clone();
        m.tcp_series(k).expect("series").close(1, 2, &unknown);
        let mut out = String::new();
        m.render_prometheus(&mut out);
        assert!(
            out.contains("\nistio_cost{reporter=\"proxy\"} 14\n"),
            "{out}"
        );
        assert!(
            out.contains("\nistio_calls{reporter=\"proxy\"} 3\n"),
            "{out}"
        );
    }

    #[test]
    fn custom_metrics_follow_the_matcher_and_bucket_rules() {
        let plan = custom_plan();
        let sample = HttpSample {
            duration_ms: 1,
            request_bytes: 1,
            response_bytes: 3,
            request_body: None,
            response_body: 0,
        };
        let hidden = IstioMetrics::default();
        hidden.hide(|_| true);
        hidden.set_custom_matcher(StatsMatcher::RejectAll);
        hidden.record_http(key(plan.clone()), sample);
        let mut out = String::new();
        hidden.render_prometheus(&mut out);
        assert_eq!(out, "");

        let m = IstioMetrics::default();
        let b: waypoint_proto::envoy::config::bootstrap::v3::Bootstrap =
            waypoint_proto::json::from_json(&serde_json::json!({
                "stats_config": { "histogram_bucket_settings": [
                    { "match": { "exact": "istiocustom.istio_sizes" }, "buckets": [2, 4] }
                ]}
            }))
            .expect("bootstrap");
        m.set_custom_buckets(crate::telemetry::bucket_rules(&b).expect("rules"));
        m.record_http(key(plan), sample);
        let mut out = String::new();
        m.render_prometheus(&mut out);
        let buckets: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("istio_sizes_bucket"))
            .collect();
        assert_eq!(
            buckets,
            [
                "istio_sizes_bucket{le=\"2\"} 0",
                "istio_sizes_bucket{le=\"4\"} 1",
                "istio_sizes_bucket{le=\"+Inf\"} 1"
            ],
            "{out}"
        );
    }

    #[test]
    fn a_plan_without_definitions_allocates_no_custom_cells() {
        let m = IstioMetrics::default();
        assert!(m.custom_cells(&Plan::standard("waypoint")).is_empty());
        assert_eq!(m.custom_cells(&custom_plan()).len(), 4);
    }

    #[test]
    fn keys_with_the_same_structs_or_equal_ones_share_a_series() {
        let sample = HttpSample {
            duration_ms: 1,
            request_bytes: 10,
            response_bytes: 20,
            request_body: None,
            response_body: 0,
        };
        let requests = |m: &IstioMetrics| {
            let mut out = String::new();
            m.render_prometheus(&mut out);
            out.lines()
                .filter(|l| l.starts_with("istio_requests_total{"))
                .map(|l| {
                    let (labels, v) = l.rsplit_once(' ').unwrap_or_default();
                    let code = labels
                        .split("response_code=\"")
                        .nth(1)
                        .and_then(|r| r.split('"').next())
                        .unwrap_or_default();
                    (code.to_owned(), v.to_owned())
                })
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
        };
        let m = IstioMetrics::default();
        let a = key(Arc::new(Plan::standard("waypoint")));
        // The same labels in new allocations (as after a config push), the principal too.
        let mut b = a.clone();
        b.destination = Some(peer("httpbin", "default", "httpbin"));
        b.source_principal = a.source_principal.as_deref().map(Arc::from);
        assert!(a.borrowed().same_parts(&a.clone()) && !a.borrowed().same_parts(&b) && a == b);
        for k in [&a, &b, &a, &b, &b] {
            m.record_http(k.clone(), sample);
        }
        assert_eq!(m.series_count(), 1);
        assert_eq!(requests(&m), [("200".to_owned(), "5".to_owned())]);
        // The same structs with another value are another series.
        let mut c = a.clone();
        c.response_code = 503;
        m.record_http(c.clone(), sample);
        m.record_http(c, sample);
        assert_eq!(m.series_count(), 2);
        assert_eq!(
            requests(&m),
            [
                ("200".to_owned(), "5".to_owned()),
                ("503".to_owned(), "2".to_owned())
            ]
        );
        // Another registry on this thread does not get this one's series from the cache.
        let other = IstioMetrics::default();
        other.record_http(a.clone(), sample);
        assert_eq!(requests(&other), [("200".to_owned(), "1".to_owned())]);
        assert_eq!(requests(&m)[0].1, "5");
        // Equal parts hash alike (the cache's slot); the test above is what decides a hit.
        let hash = |k: &SeriesKey| {
            let mut h = WordHasher(7);
            k.borrowed().parts_hash(&mut h);
            h.finish()
        };
        assert_eq!(hash(&a), hash(&a.clone()));
    }
}
