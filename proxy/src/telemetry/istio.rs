//! Istio's standard metrics, as the `istio.stats` filter reports them (istio/proxy
//! `istio_stats.cc`): `istio_requests_total`, the duration and size histograms, the TCP
//! connection and byte counters and `istio_build`, with the 25 HTTP / 23 TCP labels in Istio's
//! order and a waypoint's values (`reporter="waypoint"`).
//!
//! Recording is lock-free per request except for a read lock on one of [`SHARDS`] series maps:
//! a series key holds shared label structs (computed once per workload, per cluster, per
//! `istio.stats` config), so building it allocates nothing but the peer principal. Metric
//! overrides (`tags_to_remove`, `drop`, `dimensions`) are applied when the series is rendered:
//! series whose rendered labels coincide are summed, as Envoy's counters with equal tags are one.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    hash::{BuildHasher, BuildHasherDefault, Hash, Hasher},
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use super::histogram::{DEFAULT_BUCKETS, Histogram, HistogramSnapshot};
use crate::flags::ResponseFlags;

/// The value of a label nothing is known for.
pub const UNKNOWN: &str = "unknown";

/// Number of series-map shards (no global lock on the request path).
pub const SHARDS: usize = 16;

/// A peer's telemetry labels (Envoy's `WorkloadMetadataObject`), from WDS or baggage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
}

/// Hashes only what tells peers apart in practice (a subset of the fields, so equal labels
/// still hash equally): the hot path hashes a series key once per request.
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

/// Index of a standard tag.
pub fn tag_index(name: &str) -> Option<usize> {
    TAGS.iter().position(|t| *t == name)
}

const TAG_RESPONSE_CODE: usize = 21;
const TAG_GRPC_STATUS: usize = 22;

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

    /// The labels of `metric` for a series: standard values (in [`TAGS`] order, `None` where a
    /// label does not apply) with overrides and additions applied.
    fn labels(
        &self,
        metric: Metric,
        standard: &[Option<&str>; 25],
        extra: &[Arc<str>],
    ) -> Vec<(String, String)> {
        let i = metric.index();
        let value = |d: usize| extra.get(d).map(|v| v.to_string()).unwrap_or_default();
        let mut out = Vec::with_capacity(27);
        for (t, v) in standard.iter().enumerate() {
            let Some(v) = v else { continue };
            match self.overrides[i].get(&t) {
                Some(None) => {}
                Some(Some(d)) => out.push((TAGS[t].to_owned(), value(*d))),
                None => out.push((TAGS[t].to_owned(), (*v).to_owned())),
            }
        }
        for (name, d) in &self.additions[i] {
            out.push((name.clone(), value(*d)));
        }
        out
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
    /// The standard label values in [`TAGS`] order.
    fn standard(&self, code: &str, grpc: &str) -> [Option<String>; 25] {
        let or_unknown = |s: Option<&str>| match s {
            Some(v) if !v.is_empty() => v.to_owned(),
            _ => UNKNOWN.to_owned(),
        };
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
            Some(self.plan.reporter.to_owned()),
            Some(or_unknown(src.map(|s| s.workload.as_str()))),
            Some(or_unknown(src.map(|s| s.canonical_service.as_str()))),
            Some(match src.map(|s| s.canonical_revision.as_str()) {
                Some(v) if !v.is_empty() => v.to_owned(),
                _ => "latest".to_owned(),
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
            Some(self.protocol.as_str().to_owned()),
            http.then(|| code.to_owned()),
            http.then(|| grpc.to_owned()),
            Some(self.flags.to_string()),
            Some(
                match self.mutual_tls {
                    Some(true) => "mutual_tls",
                    Some(false) => "none",
                    None => UNKNOWN,
                }
                .to_owned(),
            ),
        ]
    }

    /// The rendered labels of `metric` for this series.
    pub fn labels(&self, metric: Metric) -> Vec<(String, String)> {
        let code = self.response_code.to_string();
        let grpc = match (self.protocol, self.grpc_status) {
            (Protocol::Grpc, Some(s)) => s.to_string(),
            _ => String::new(),
        };
        let owned = self.standard(&code, &grpc);
        let mut standard: [Option<&str>; 25] = [None; 25];
        for (s, o) in standard.iter_mut().zip(&owned) {
            *s = o.as_deref();
        }
        // response_code / grpc_response_status are HTTP-only.
        if self.protocol == Protocol::Tcp {
            standard[TAG_RESPONSE_CODE] = None;
            standard[TAG_GRPC_STATUS] = None;
        }
        self.plan.labels(metric, &standard, &self.extra)
    }
}

/// The HTTP metrics of one series.
#[derive(Debug)]
struct HttpSeries {
    requests: AtomicU64,
    request_messages: AtomicU64,
    response_messages: AtomicU64,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
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
    /// gRPC messages (request, response), for gRPC streams.
    pub messages: Option<(u64, u64)>,
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

/// The registry of Istio metrics.
#[derive(Debug)]
pub struct IstioMetrics {
    hasher: std::collections::hash_map::RandomState,
    http: Vec<Shard<HttpSeries>>,
    tcp: Vec<Shard<TcpSeries>>,
    buckets: RwLock<BTreeMap<Metric, Arc<[f64]>>>,
    default_buckets: Arc<[f64]>,
    build: RwLock<Option<String>>,
}

impl Default for IstioMetrics {
    fn default() -> Self {
        IstioMetrics {
            hasher: Default::default(),
            http: (0..SHARDS).map(|_| RwLock::default()).collect(),
            tcp: (0..SHARDS).map(|_| RwLock::default()).collect(),
            buckets: RwLock::default(),
            default_buckets: Arc::from(DEFAULT_BUCKETS),
            build: RwLock::default(),
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

    /// Records one finished HTTP stream.
    pub fn record_http(&self, key: SeriesKey, sample: HttpSample) {
        let plan = key.plan.clone();
        let Some(series) = self.series(&self.http, key, || HttpSeries {
            requests: AtomicU64::new(0),
            request_messages: AtomicU64::new(0),
            response_messages: AtomicU64::new(0),
            duration: Histogram::new(self.bounds(Metric::RequestDuration)),
            request_bytes: Histogram::new(self.bounds(Metric::RequestBytes)),
            response_bytes: Histogram::new(self.bounds(Metric::ResponseBytes)),
        }) else {
            return;
        };
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
        if let Some((rq, rs)) = sample.messages {
            series.request_messages.fetch_add(rq, Ordering::Relaxed);
            series.response_messages.fetch_add(rs, Ordering::Relaxed);
        }
    }

    /// The counters of a TCP series (created on first use).
    pub fn tcp_series(&self, key: SeriesKey) -> Option<Arc<TcpSeries>> {
        self.series(&self.tcp, key, TcpSeries::default)
    }

    /// Number of HTTP and TCP series.
    pub fn series_count(&self) -> usize {
        fn count<V>(shards: &[Shard<V>]) -> usize {
            shards
                .iter()
                .map(|s| read(s).values().map(Vec::len).sum::<usize>())
                .sum()
        }
        count(&self.http) + count(&self.tcp)
    }

    /// Appends the Prometheus text exposition of every Istio metric to `out`.
    pub fn render_prometheus(&self, out: &mut String) {
        let mut counters: BTreeMap<Metric, BTreeMap<Vec<(String, String)>, u64>> = BTreeMap::new();
        let mut histograms: BTreeMap<Metric, BTreeMap<Vec<(String, String)>, HistogramSnapshot>> =
            BTreeMap::new();
        let mut order: BTreeMap<Metric, Vec<Vec<(String, String)>>> = BTreeMap::new();
        let mut add_counter = |m: Metric, key: &SeriesKey, v: u64| {
            if key.plan.drop[m.index()] {
                return;
            }
            let labels = key.labels(m);
            let slot = counters.entry(m).or_default();
            if !slot.contains_key(&labels) {
                order.entry(m).or_default().push(labels.clone());
            }
            *slot.entry(labels).or_default() += v;
        };
        for shard in &self.http {
            for (key, s) in read(shard).values().flatten() {
                add_counter(
                    Metric::RequestsTotal,
                    key,
                    s.requests.load(Ordering::Relaxed),
                );
                if key.protocol == Protocol::Grpc {
                    add_counter(
                        Metric::RequestMessages,
                        key,
                        s.request_messages.load(Ordering::Relaxed),
                    );
                    add_counter(
                        Metric::ResponseMessages,
                        key,
                        s.response_messages.load(Ordering::Relaxed),
                    );
                }
                for (m, h) in [
                    (Metric::RequestDuration, &s.duration),
                    (Metric::RequestBytes, &s.request_bytes),
                    (Metric::ResponseBytes, &s.response_bytes),
                ] {
                    if key.plan.drop[m.index()] {
                        continue;
                    }
                    let snap = h.snapshot();
                    let slot = histograms.entry(m).or_default();
                    match slot.get_mut(&key.labels(m)) {
                        Some(existing) => existing.merge(&snap),
                        None => {
                            slot.insert(key.labels(m), snap);
                        }
                    }
                }
            }
        }
        for shard in &self.tcp {
            for (key, s) in read(shard).values().flatten() {
                add_counter(Metric::TcpOpened, key, s.opened.load(Ordering::Relaxed));
                add_counter(Metric::TcpClosed, key, s.closed.load(Ordering::Relaxed));
                add_counter(Metric::TcpSent, key, s.sent.load(Ordering::Relaxed));
                add_counter(Metric::TcpReceived, key, s.received.load(Ordering::Relaxed));
            }
        }
        for (m, series) in &counters {
            let family = m.family();
            let _ = writeln!(out, "# HELP {family} {}", m.help());
            let _ = writeln!(out, "# TYPE {family} counter");
            for labels in order.get(m).into_iter().flatten() {
                if let Some(v) = series.get(labels) {
                    let _ = writeln!(out, "{family}{} {v}", render_labels(labels, None));
                }
            }
        }
        for (m, series) in &histograms {
            let family = m.family();
            let _ = writeln!(out, "# HELP {family} {}", m.help());
            let _ = writeln!(out, "# TYPE {family} histogram");
            for (labels, snap) in series {
                for (le, c) in snap.cumulative() {
                    let _ = writeln!(
                        out,
                        "{family}_bucket{} {c}",
                        render_labels(labels, Some(&le))
                    );
                }
                let l = render_labels(labels, None);
                let _ = writeln!(out, "{family}_sum{l} {}", snap.sum);
                let _ = writeln!(out, "{family}_count{l} {}", snap.count());
            }
        }
        if let Some(tag) = read(&self.build).as_deref() {
            let _ = writeln!(out, "# HELP istio_build Istio version of the proxy.");
            let _ = writeln!(out, "# TYPE istio_build gauge");
            let _ = writeln!(
                out,
                "istio_build{{component=\"proxy\",tag=\"{}\"}} 1",
                escape(tag)
            );
        }
    }
}

/// `{a="b",...}` (with `le` last for histogram buckets).
fn render_labels(labels: &[(String, String)], le: Option<&str>) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{k}=\"{}\"", escape(v));
    }
    if let Some(le) = le {
        if !labels.is_empty() {
            s.push(',');
        }
        let _ = write!(s, "le=\"{le}\"");
    }
    s.push('}');
    s
}

/// Prometheus label-value escaping.
pub fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
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
    fn http_series_render_with_istio_labels_in_order() {
        let m = IstioMetrics::default();
        let plan = Arc::new(Plan::standard("waypoint"));
        let sample = HttpSample {
            duration_ms: 3,
            request_bytes: 120,
            response_bytes: 2000,
            messages: None,
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
            messages: None,
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
                messages: None,
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
}
