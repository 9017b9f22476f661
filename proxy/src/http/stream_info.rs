//! What one stream did, for Istio's metrics and access logs: when it started, the bytes both
//! ways, the upstream that served it, how the response ended and (for access logs) the request
//! head, route and reply details. The router and the TCP proxy
//! fill the upstream part as they pick hosts; the connection manager wraps the response body and
//! reports once it ends (or is dropped: the downstream went away).

use std::{
    borrow::Cow,
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::{Body, BoxError};
use crate::{
    access_log::{HttpValues, LogValues},
    config::{
        Snapshot,
        access_log::AccessLog,
        cluster::Cluster,
        endpoint::EndpointAddress,
        filters::{
            hcm::HttpConnectionManager,
            http::HttpFilterKind,
            istio::{Discovery, StatsConfig},
        },
    },
    flags::{ProxyError, ResponseFlags},
    listener::conn::{ConnContext, ConnValues, FilterState},
    telemetry::istio::{HttpSample, PeerLabels, Protocol, SeriesKey, SeriesRef},
    upstream::lb::Host,
};

/// The upstream side of a stream, as far as it got.
#[derive(Debug, Default, Clone)]
pub struct UpstreamInfo {
    /// The cluster routed to.
    pub cluster: Option<Arc<Cluster>>,
    /// The host of the last attempt (EDS/static clusters).
    pub host: Option<Arc<Host>>,
    /// The address of the last attempt when it is not `host`'s own (read both through
    /// [`UpstreamInfo::address`]).
    pub address: Option<EndpointAddress>,
    /// Attempts made.
    pub attempts: u32,
}

impl UpstreamInfo {
    /// The address of the last attempt.
    pub fn address(&self) -> Option<&EndpointAddress> {
        self.address
            .as_ref()
            .or_else(|| self.host.as_deref().map(|h| &h.address))
    }

    /// The IP of the workload behind the upstream: a tunnelled endpoint's `original_dst`
    /// (`podIP:port`), else the host's socket address, else an internal endpoint id.
    pub fn workload_ip(&self) -> Option<IpAddr> {
        if let Some(a) = self.host.as_ref().and_then(|h| h.original_dst) {
            return Some(a.ip());
        }
        match self.address() {
            Some(EndpointAddress::Socket(a)) => Some(a.ip()),
            Some(EndpointAddress::Internal {
                endpoint_id: Some(id),
                ..
            }) => id
                .parse::<std::net::SocketAddr>()
                .map(|a| a.ip())
                .ok()
                .or_else(|| id.parse().ok()),
            _ => None,
        }
    }
}

/// Where the upstream part of a stream is written.
#[derive(Debug, Default)]
pub struct UpstreamSlot(Mutex<UpstreamInfo>);

impl UpstreamSlot {
    fn with(&self, f: impl FnOnce(&mut UpstreamInfo)) {
        match self.0.lock() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    /// The cluster chosen.
    pub fn set_cluster(&self, cluster: &Arc<Cluster>) {
        self.with(|u| {
            // The route's cluster is set first and the router's pick is most often the same.
            if !u.cluster.as_ref().is_some_and(|c| Arc::ptr_eq(c, cluster)) {
                u.cluster = Some(cluster.clone());
            }
        });
    }

    /// One more attempt, to `address` (`host` for EDS/static clusters).
    pub fn attempt(&self, host: Option<&Arc<Host>>, address: &EndpointAddress) {
        self.with(|u| {
            // A host's own internal address (a waypoint's upstream: two strings) is read from
            // the host rather than copied per attempt; a socket address copies cheaper than
            // it compares.
            u.address = match (host, address) {
                (Some(h), EndpointAddress::Internal { .. }) if h.address == *address => None,
                _ => Some(address.clone()),
            };
            u.host = host.cloned();
            u.attempts += 1;
        });
    }

    /// What is known so far.
    pub fn get(&self) -> UpstreamInfo {
        self.read(UpstreamInfo::clone)
    }

    /// Reads what is known so far in place (no copy of it).
    pub fn read<T>(&self, f: impl FnOnce(&UpstreamInfo) -> T) -> T {
        match self.0.lock() {
            Ok(g) => f(&g),
            Err(p) => f(&p.into_inner()),
        }
    }
}

/// What a stream records beyond metrics, chosen per HCM when the stream starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observe {
    /// Record the route name, why the response is what it is (local reply details, transport
    /// failure, body) and the stream's filter state: access logs read them.
    pub details: bool,
    /// Keep a copy of the request head (after the HCM's own header changes: `x-request-id`,
    /// `x-forwarded-for`), for access logs' `%REQ(..)%` and metric dimensions on request headers.
    pub request_headers: bool,
    /// Count gRPC messages both ways (a gRPC stream under `istio.stats`).
    pub grpc_messages: bool,
}

/// Dynamic metadata the HTTP filters of one stream set (Envoy's `StreamInfo::dynamicMetadata`):
/// one Struct (a JSON object) per namespace, e.g. `envoy.filters.http.jwt_authn` → verified JWT
/// payloads, which RBAC `metadata` matchers read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DynamicMetadata(std::collections::BTreeMap<String, serde_json::Value>);

impl DynamicMetadata {
    /// Merges `fields` into namespace `ns`: a key already there is replaced (Envoy's
    /// `setDynamicMetadata` merges at the top level of the namespace).
    pub fn merge(&mut self, ns: &str, fields: serde_json::Map<String, serde_json::Value>) {
        let entry = self
            .0
            .entry(ns.to_owned())
            .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
        if let serde_json::Value::Object(m) = entry {
            m.extend(fields);
        }
    }

    /// The value in namespace `ns` at `path` (keys into nested objects); the namespace's object
    /// for an empty path.
    pub fn value(&self, ns: &str, path: &[String]) -> Option<&serde_json::Value> {
        path.iter().try_fold(self.0.get(ns)?, |v, k| v.get(k))
    }

    /// Whether no filter set anything.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What the connection manager learnt about a stream, for access logs.
#[derive(Debug, Default)]
pub struct StreamDetails {
    /// The request head ([`Observe::request_headers`]).
    pub request: Option<http::request::Parts>,
    /// The stream's filter state after the request filters.
    pub filter_state: Option<FilterState>,
    /// The matched route's name.
    pub route_name: Option<String>,
    /// `%RESPONSE_CODE_DETAILS%` (`via_upstream`, `route_not_found`, …).
    pub code_details: Option<Cow<'static, str>>,
    /// `%UPSTREAM_TRANSPORT_FAILURE_REASON%`.
    pub transport_failure: Option<String>,
    /// The body of a local reply.
    pub local_reply_body: Option<String>,
    /// Start → the upstream response's headers.
    pub upstream_response: Option<Duration>,
}

/// One HTTP stream.
#[derive(Debug)]
pub struct StreamInfo {
    /// When the request arrived.
    pub started: Instant,
    /// The same, wall clock (`%START_TIME%`), read with [`Observe::details`] only: access logs
    /// are its one reader, and a clock read is not free on the per-request path.
    pub started_at: Option<SystemTime>,
    /// The upstream side.
    pub upstream: UpstreamSlot,
    request_body_bytes: AtomicU64,
    /// gRPC messages received ([`Observe::grpc_messages`]).
    request_messages: AtomicU64,
    /// gRPC messages sent ([`Observe::grpc_messages`]).
    response_messages: AtomicU64,
    /// The message counts reported so far ([`Observe::grpc_messages`]; boxed, as few streams
    /// are gRPC).
    message_reports: Option<Box<MessageReports>>,
    /// Nanoseconds from `started` to the request's last byte, plus one (0: not yet).
    request_done: AtomicU64,
    observe: Observe,
    /// Only a stream that records details has them (boxed: they are most of a stream's size,
    /// which metrics alone would copy into every stream's allocation for nothing).
    details: Option<Box<Mutex<StreamDetails>>>,
}

impl StreamInfo {
    /// A stream starting now, recording what `observe` asks for.
    pub fn new(observe: Observe) -> Arc<StreamInfo> {
        Arc::new(StreamInfo {
            started: Instant::now(),
            started_at: observe.details.then(SystemTime::now),
            upstream: UpstreamSlot::default(),
            request_body_bytes: AtomicU64::new(0),
            request_messages: AtomicU64::new(0),
            response_messages: AtomicU64::new(0),
            message_reports: observe.grpc_messages.then(Box::default),
            request_done: AtomicU64::new(0),
            observe,
            details: (observe.details || observe.request_headers)
                .then(|| Box::new(Mutex::new(StreamDetails::default()))),
        })
    }

    /// What this stream records.
    pub fn observe(&self) -> Observe {
        self.observe
    }

    /// Request body bytes received so far.
    pub fn request_body_bytes(&self) -> u64 {
        self.request_body_bytes.load(Ordering::Relaxed)
    }

    /// The request's last byte arrived now (the first call counts; recorded only with
    /// [`Observe::details`], for `%REQUEST_DURATION%`).
    // Inlined like the other recorders below: a stream that records nothing pays one test
    // at the call site.
    #[inline]
    pub fn request_done(&self) {
        if self.observe.details {
            self.note_request_done();
        }
    }

    fn note_request_done(&self) {
        let nanos = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1;
        let _ = self
            .request_done
            .compare_exchange(0, nanos, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Start → the request's last byte, once it arrived.
    pub fn request_duration(&self) -> Option<Duration> {
        match self.request_done.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_nanos(n - 1)),
        }
    }

    /// Reads the details recorded so far.
    pub fn with_details<T>(&self, f: impl FnOnce(&StreamDetails) -> T) -> T {
        match self.details.as_deref().map(Mutex::lock) {
            Some(Ok(g)) => f(&g),
            Some(Err(p)) => f(&p.into_inner()),
            None => f(&StreamDetails::default()),
        }
    }

    /// Records details, when this stream records them ([`Observe::details`]).
    #[inline]
    pub fn note(&self, f: impl FnOnce(&mut StreamDetails)) {
        if !self.observe.details {
            return;
        }
        match self.details.as_deref().map(Mutex::lock) {
            Some(Ok(mut g)) => f(&mut g),
            Some(Err(p)) => f(&mut p.into_inner()),
            None => {}
        }
    }

    /// Keeps a copy of the request head, when asked to ([`Observe::request_headers`]).
    #[inline]
    pub fn capture_request(&self, parts: &http::request::Parts) {
        if self.observe.request_headers {
            self.keep_request(parts);
        }
    }

    fn keep_request(&self, parts: &http::request::Parts) {
        let (mut head, ()) = http::Request::new(()).into_parts();
        head.method = parts.method.clone();
        head.uri = parts.uri.clone();
        head.version = parts.version;
        head.headers = parts.headers.clone();
        match self.details.as_deref().map(Mutex::lock) {
            Some(Ok(mut g)) => g.request = Some(head),
            Some(Err(p)) => p.into_inner().request = Some(head),
            None => {}
        }
    }

    /// Records why the stream got the local reply for `e`.
    pub fn local_reply(&self, e: &ProxyError) {
        self.note(|d| {
            d.code_details = Some(code_details(e));
            if let ProxyError::ConnectFailure(reason) = e {
                d.transport_failure = Some(no_spaces(reason));
            }
            let body = e.body();
            d.local_reply_body = (!body.is_empty()).then_some(body);
        });
    }

    /// Records that the response came from `details` (`via_upstream`, `direct_response`, …).
    #[inline]
    pub fn responded(&self, details: &'static str) {
        self.note(|d| {
            d.code_details = Some(Cow::Borrowed(details));
            if details == VIA_UPSTREAM {
                d.upstream_response = Some(self.started.elapsed());
            }
        });
    }
}

/// What a gRPC stream's message counters got so far: istio_stats adds the messages counted
/// since its last report every `tcp_reporting_duration` while the stream runs (once the
/// downstream peer is known), and at its end.
#[derive(Debug, Default)]
struct MessageReports {
    state: Mutex<MessageState>,
    /// The periodic reports' task.
    timer: Mutex<Option<tokio::task::AbortHandle>>,
}

#[derive(Debug, Default)]
struct MessageState {
    /// The series, fixed by the first report as istio_stats fixes a stream's tags.
    key: Option<SeriesKey>,
    /// Messages reported (request, response).
    reported: (u64, u64),
    /// The end was reported.
    done: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl MessageReports {
    fn stop_timer(&self) {
        if let Some(t) = lock(&self.timer).take() {
            t.abort();
        }
    }
}

impl Drop for MessageReports {
    fn drop(&mut self) {
        // A stream that never got a response (its reporter never ran) stops reporting too.
        self.stop_timer();
    }
}

impl StreamInfo {
    /// Adds the gRPC messages counted since the last report to the stream's message series
    /// (`upstream`: the upstream side when the caller holds it). A report before the end waits
    /// for the downstream peer, as istio_stats waits for its `downstream_peer` filter state.
    fn report_messages(
        &self,
        ctx: &ConnContext,
        labels: &StreamLabels,
        stats: &crate::stats::Stats,
        upstream: Option<&UpstreamInfo>,
        end: bool,
    ) {
        let Some(reports) = self.message_reports.as_deref() else {
            return;
        };
        if end {
            reports.stop_timer();
        }
        // The key is made without the state's lock: the end report holds the upstream side's
        // lock while it takes the state's, so the timer must not take them the other way round.
        let needs_key = {
            let state = lock(&reports.state);
            if state.done {
                return;
            }
            state.key.is_none()
        };
        let fresh = if needs_key {
            if !end && !self.downstream_peer_known(labels) {
                return;
            }
            Some(match upstream {
                Some(u) => self.message_key(ctx, labels, u),
                None => self.upstream.read(|u| self.message_key(ctx, labels, u)),
            })
        } else {
            None
        };
        let mut state = lock(&reports.state);
        if state.done {
            return;
        }
        if state.key.is_none() {
            state.key = fresh;
        }
        let now = (
            self.request_messages.load(Ordering::Relaxed),
            self.response_messages.load(Ordering::Relaxed),
        );
        let (rq, rs) = state.reported;
        if let Some(key) = &state.key {
            stats.istio.record_grpc_messages(
                key,
                now.0.saturating_sub(rq),
                now.1.saturating_sub(rs),
            );
        }
        state.reported = now;
        state.done = end;
    }

    /// Whether the `downstream_peer` filter state is set: the connection's (shared by
    /// `connect_terminate`) or, when the stream's is kept, the stream's own.
    fn downstream_peer_known(&self, labels: &StreamLabels) -> bool {
        labels.source.is_some()
            || self.with_details(|d| {
                d.filter_state
                    .as_ref()
                    .is_some_and(|fs| fs.get(DOWNSTREAM_PEER).is_some())
            })
    }

    /// The message series of this stream: its peers and service, none of the response's labels
    /// (they are not known while it runs), and dimensions evaluated as istio_stats evaluates
    /// them for these counters, without the request or response headers.
    fn message_key(
        &self,
        ctx: &ConnContext,
        labels: &StreamLabels,
        upstream: &UpstreamInfo,
    ) -> SeriesKey {
        let mut key = labels.series(
            &ctx.snapshot,
            upstream,
            Protocol::Grpc,
            (0, None, ResponseFlags::default()),
            labels.upstream_wds,
            crate::telemetry::istio::no_dimensions(),
        );
        let extra;
        if !labels.plan.dimensions.is_empty() {
            extra = self.with_details(|d| {
                labels
                    .plan
                    .evaluate(&crate::telemetry::attributes::RunningStream(
                        crate::telemetry::attributes::StreamAttributes {
                            conn: ctx,
                            request: None,
                            response_headers: None,
                            response_code: 0,
                            grpc_status: None,
                            cluster: upstream.cluster.as_ref().map(|c| c.name.as_str()),
                            route: d.route_name.as_deref(),
                            mtls: labels.mutual_tls,
                            source: key.source.map(|s| &**s),
                            destination: key.destination.map(|d| &**d),
                            stream_state: d.filter_state.as_ref(),
                        },
                    ))
            });
            key.extra = &extra;
        }
        key.to_key()
    }
}

/// Starts the periodic message reports of a gRPC stream under `istio.stats` (`labels`), every
/// `tcp_reporting_duration` from its request headers on, as istio_stats does; the stream's end
/// reports the rest and stops them. Nothing for another stream.
pub fn report_messages_periodically(
    info: &Arc<StreamInfo>,
    ctx: &Arc<ConnContext>,
    labels: Option<&StreamLabels>,
    stats: &Arc<crate::stats::Stats>,
) {
    let (Some(reports), Some(labels)) = (info.message_reports.as_deref(), labels) else {
        return;
    };
    let Some(every) = labels.report_interval else {
        return;
    };
    // The task holds the stream weakly: a stream dropped without an end report ends it.
    let stream = Arc::downgrade(info);
    let (ctx, labels, stats) = (ctx.clone(), labels.clone(), stats.clone());
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(info) = stream.upgrade() else {
                return;
            };
            info.report_messages(&ctx, &labels, &stats, None, false);
        }
    });
    *lock(&reports.timer) = Some(task.abort_handle());
}

/// `%RESPONSE_CODE_DETAILS%` of a response proxied from the upstream.
pub const VIA_UPSTREAM: &str = "via_upstream";

/// Envoy keeps response code details free of whitespace.
fn no_spaces(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .collect()
}

/// Envoy's `%RESPONSE_CODE_DETAILS%` for a local reply.
pub fn code_details(e: &ProxyError) -> Cow<'static, str> {
    let s: &'static str = match e {
        ProxyError::NoRoute => "route_not_found",
        ProxyError::NoFilterChain => "filter_chain_not_found",
        ProxyError::NoCluster(_) => "cluster_not_found",
        ProxyError::NoHealthyUpstream(_) => "no_healthy_upstream",
        ProxyError::ConnectFailure(_) => {
            "upstream_reset_before_response_started{connection_failure}"
        }
        // The last attempt's failure, as Envoy reports it.
        ProxyError::NotRetried { last, .. } => return code_details(last),
        ProxyError::UpstreamReset(_) => {
            "upstream_reset_before_response_started{connection_termination}"
        }
        ProxyError::UpstreamProtocol(_) => "upstream_reset_before_response_started{protocol_error}",
        ProxyError::Timeout => "upstream_response_timeout",
        ProxyError::StreamTimeout { kind, .. } => kind.code_details(),
        ProxyError::BadRequest(_) => "codec_error",
        ProxyError::Overflow(_) => "upstream_reset_before_response_started{overflow}",
        ProxyError::Redirect(_) => "path_normalization_redirect",
        ProxyError::Unauthorized(denial) => return Cow::Owned(denial.details()),
        ProxyError::RbacDenied(why) => {
            // `filter 'x' policy NAME` / `... policy (none matched)`.
            let policy = why
                .rsplit_once(" policy ")
                .map(|(_, p)| p)
                .filter(|p| !p.starts_with('('))
                .unwrap_or("none");
            return Cow::Owned(format!(
                "rbac_access_denied_matched_policy[{}]",
                no_spaces(policy)
            ));
        }
        ProxyError::Unsupported(_) => "local_reset",
        ProxyError::RateLimited(_) => "local_rate_limited",
    };
    Cow::Borrowed(s)
}

/// Bytes a header block takes on an HTTP/1.1 wire (`name: value\r\n` each, plus the blank line);
/// Envoy's wire meter counts what the codec read or wrote, this is the uncompressed equivalent.
pub fn header_bytes(headers: &HeaderMap) -> u64 {
    headers
        .iter()
        .map(|(k, v)| (k.as_str().len() + v.len() + 4) as u64)
        .sum::<u64>()
        + 2
}

/// Counts request body bytes into `info` as they are read, and notes when the body ends.
pub fn count_request_body(body: Body, info: &Arc<StreamInfo>) -> Body {
    super::observe_request_body(
        body,
        RequestCounter {
            info: info.clone(),
            frames: info
                .observe
                .grpc_messages
                .then(crate::telemetry::grpc::GrpcFrames::default),
        },
    )
}

/// A request body's bytes (and gRPC messages) counted into its stream.
struct RequestCounter {
    info: Arc<StreamInfo>,
    frames: Option<crate::telemetry::grpc::GrpcFrames>,
}

impl super::RequestObserver for RequestCounter {
    fn data(&mut self, d: &Bytes) {
        self.info
            .request_body_bytes
            .fetch_add(d.len() as u64, Ordering::Relaxed);
        if let Some(n) = self.frames.as_mut().map(|g| g.feed(d)) {
            self.info.request_messages.store(n, Ordering::Relaxed);
        }
    }

    fn end(&mut self) {
        self.info.request_done();
    }
}

/// Whether a request is gRPC (`content-type: application/grpc[+proto|…]`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// `grpc-status`, parsed once: looking a header up by a `&str` parses the name on every call.
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get(GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// The `istio.stats` filter an HCM runs, if any, and whether its peer-metadata filter discovers
/// the upstream peer through WDS.
pub fn stats_filters(hcm: &HttpConnectionManager) -> Option<(&StatsConfig, bool)> {
    let mut upstream_wds = false;
    for f in &hcm.http_filters {
        match &f.kind {
            HttpFilterKind::PeerMetadata(p) if !f.disabled => {
                upstream_wds |= p.upstream_discovery.contains(&Discovery::WorkloadDiscovery);
            }
            HttpFilterKind::IstioStats(s) if !f.disabled => return Some((s, upstream_wds)),
            _ => {}
        }
    }
    None
}

/// The peer found by the `peer_metadata` filters (`downstream_peer` filter state).
pub const DOWNSTREAM_PEER: &str = "downstream_peer";

/// The labels Istio's metrics need that are known when the stream starts.
#[derive(Debug, Clone)]
pub struct StreamLabels {
    /// The `istio.stats` config's plan.
    pub plan: Arc<crate::telemetry::istio::Plan>,
    /// Look the upstream peer up in WDS.
    pub upstream_wds: bool,
    /// Source workload.
    pub source: Option<Arc<PeerLabels>>,
    /// Source principal.
    pub source_principal: Option<Arc<str>>,
    /// `mutual_tls` when both principals are known.
    pub mutual_tls: bool,
    /// `tcp_reporting_duration` (default 5s), which gRPC streams' message counts are reported
    /// at while they run; `None` when it is zero (istio_stats would re-arm its timer at once).
    pub report_interval: Option<std::time::Duration>,
}

impl StreamLabels {
    /// The connection-level labels for a stream on `ctx` (the peer principals from the filter
    /// state `connect_authority` shared, else the connection's own TLS).
    pub fn new(stats: &StatsConfig, upstream_wds: bool, ctx: &ConnContext) -> StreamLabels {
        let fs = |k: &str| ctx.filter_state.get(k).filter(|v| !v.is_empty());
        let mut peer = fs("io.istio.peer_principal");
        let mut local = fs("io.istio.local_principal");
        if peer.is_none() && local.is_none() {
            let tls = ctx.tls.as_ref();
            peer = tls.and_then(|t| t.peer_uri_san.as_deref());
            local = tls.and_then(|t| t.local_uri_san.as_deref());
        }
        StreamLabels {
            plan: stats.plan.clone(),
            upstream_wds,
            source: ctx.filter_state.peer(DOWNSTREAM_PEER),
            mutual_tls: peer.is_some() && local.is_some(),
            report_interval: Some(
                stats
                    .tcp_reporting_duration
                    .unwrap_or(std::time::Duration::from_secs(5)),
            )
            .filter(|d| !d.is_zero()),
            // Copied straight into its shared allocation (no interim `String`).
            source_principal: peer.map(Arc::from),
        }
    }

    /// The series key once the upstream and the response are known.
    #[allow(clippy::too_many_arguments)]
    pub fn key(
        &self,
        snapshot: &Snapshot,
        upstream: &UpstreamInfo,
        protocol: Protocol,
        response_code: u16,
        grpc_status: Option<u32>,
        flags: ResponseFlags,
        wds: bool,
    ) -> SeriesKey {
        self.series(
            snapshot,
            upstream,
            protocol,
            (response_code, grpc_status, flags),
            wds,
            crate::telemetry::istio::no_dimensions(),
        )
        .to_key()
    }

    /// The series key, borrowed from these labels, the snapshot (the destination workload)
    /// and the upstream (the cluster's service): nothing is copied. `response` is the code,
    /// gRPC status and flags; `extra` the dimension values.
    pub fn series<'a>(
        &'a self,
        snapshot: &'a Snapshot,
        upstream: &'a UpstreamInfo,
        protocol: Protocol,
        response: (u16, Option<u32>, ResponseFlags),
        wds: bool,
        extra: &'a Arc<[Arc<str>]>,
    ) -> SeriesRef<'a> {
        let destination = if wds {
            upstream
                .workload_ip()
                .and_then(|ip| snapshot.workload_at(ip))
                .map(|w| &w.peer_labels)
        } else {
            None
        };
        let (response_code, grpc_status, flags) = response;
        SeriesRef {
            plan: &self.plan,
            source: self.source.as_ref(),
            source_principal: self.source_principal.as_ref(),
            destination,
            service: upstream.cluster.as_ref().map(|c| &c.service_labels),
            protocol,
            response_code,
            grpc_status,
            flags,
            mutual_tls: Some(self.mutual_tls),
            extra,
        }
    }
}

/// What the end of a stream reports to: Istio's metrics (with `istio.stats`) and the HCM's
/// access logs.
#[derive(Debug)]
pub struct Reporter {
    /// The stream.
    pub info: Arc<StreamInfo>,
    /// Its connection.
    pub ctx: Arc<ConnContext>,
    /// The metrics registry.
    pub stats: Arc<crate::stats::Stats>,
    /// Stream-start labels (`None`: the HCM runs no `istio.stats`).
    pub labels: Option<StreamLabels>,
    /// gRPC request.
    pub grpc: bool,
    /// Request header bytes.
    pub request_header_bytes: u64,
    /// The HCM whose `access_log` is written at the end (`None`: it has none).
    pub access_log: Option<Arc<HttpConnectionManager>>,
}

/// How a response ended.
#[derive(Debug)]
struct Ending<'a> {
    code: u16,
    flags: ResponseFlags,
    grpc_status: Option<u32>,
    /// Headers, body and trailers (Istio's `response_bytes`).
    response_bytes: u64,
    /// Body only (`%BYTES_SENT%`).
    body_bytes: u64,
    /// Borrowed from the body, which keeps them for access logs only.
    headers: Option<&'a HeaderMap>,
    trailers: Option<&'a HeaderMap>,
}

impl Reporter {
    fn report(&self, end: &Ending<'_>) {
        // Read in place: the stream is over, nothing else writes its upstream side now.
        self.info
            .upstream
            .read(|upstream| self.report_with(upstream, end));
    }

    fn report_with(&self, upstream: &UpstreamInfo, end: &Ending<'_>) {
        if let Some(labels) = &self.labels {
            let protocol = if self.grpc {
                Protocol::Grpc
            } else {
                Protocol::Http
            };
            let mut key = labels.series(
                &self.ctx.snapshot,
                upstream,
                protocol,
                (end.code, end.grpc_status, end.flags),
                labels.upstream_wds,
                crate::telemetry::istio::no_dimensions(),
            );
            // The dimension values, when the plan has dimensions (they read the key's peers).
            let extra;
            if !labels.plan.dimensions.is_empty() {
                extra = self.info.with_details(|d| {
                    labels
                        .plan
                        .evaluate(&crate::telemetry::attributes::StreamAttributes {
                            conn: &self.ctx,
                            request: d.request.as_ref(),
                            response_headers: end.headers,
                            response_code: end.code,
                            grpc_status: end.grpc_status,
                            cluster: upstream.cluster.as_ref().map(|c| c.name.as_str()),
                            route: d.route_name.as_deref(),
                            mtls: labels.mutual_tls,
                            source: key.source.map(|s| &**s),
                            destination: key.destination.map(|d| &**d),
                            stream_state: d.filter_state.as_ref(),
                        })
                });
                key.extra = &extra;
            }
            // `request.size` as Envoy reads it: the `content-length` (kept with the request
            // head when a custom metric reads the size), else the body bytes received.
            // Only a custom metric reads it: other streams skip the lock.
            let body = self.info.request_body_bytes();
            let request_body = if labels.plan.custom.is_empty() {
                Some(body)
            } else {
                self.info.with_details(|d| {
                    match d
                        .request
                        .as_ref()
                        .and_then(|r| r.headers.get(http::header::CONTENT_LENGTH))
                    {
                        Some(v) => v.to_str().ok().and_then(|v| v.parse().ok()),
                        None => Some(body),
                    }
                })
            };
            self.stats.istio.record_http_ref(
                key,
                HttpSample {
                    duration_ms: self.info.started.elapsed().as_millis() as u64,
                    request_bytes: self.request_header_bytes + body,
                    response_bytes: end.response_bytes,
                    request_body,
                    response_body: end.body_bytes,
                },
            );
            if self.grpc {
                self.info
                    .report_messages(&self.ctx, labels, &self.stats, Some(upstream), true);
            }
        }
        if let Some(hcm) = &self.access_log {
            self.log(&hcm.access_log, upstream, end);
        }
    }

    fn log(&self, logs: &[AccessLog], upstream: &UpstreamInfo, end: &Ending<'_>) {
        let info = &self.info;
        info.with_details(|d| {
            let values = LogValues {
                conn: ConnValues {
                    conn: &self.ctx,
                    stream_state: d.filter_state.as_ref(),
                    request: d.request.as_ref(),
                },
                started_at: info.started_at.unwrap_or_else(SystemTime::now),
                duration: info.started.elapsed(),
                flags: end.flags,
                bytes_received: info.request_body_bytes(),
                bytes_sent: end.body_bytes,
                upstream: Some(upstream),
                http: Some(HttpValues {
                    response_code: end.code,
                    response_headers: end.headers,
                    trailers: end.trailers,
                    request_duration: info.request_duration(),
                    response_duration: d.upstream_response,
                    code_details: d.code_details.as_deref(),
                    transport_failure: d.transport_failure.as_deref(),
                    route_name: d.route_name.as_deref(),
                    local_reply_body: d.local_reply_body.as_deref(),
                }),
            };
            crate::access_log::write(logs, &values);
        });
    }
}

/// A response body that reports the stream when it ends or is dropped.
pub struct ObservedBody {
    inner: Body,
    reporter: Option<Reporter>,
    code: u16,
    flags: ResponseFlags,
    grpc_status: Option<u32>,
    /// Whether the metrics read the gRPC status (a gRPC stream's, or one a dimension or custom
    /// metric reads): a header lookup per response saved otherwise.
    wants_grpc_status: bool,
    sent: u64,
    body_sent: u64,
    /// The response headers and trailers, kept for access logs and response-header
    /// dimensions only (boxed: most streams keep none, and the body is moved whole).
    kept: Option<Box<KeptHeaders>>,
    /// gRPC messages sent, for a gRPC stream under `istio.stats`.
    frames: Option<crate::telemetry::grpc::GrpcFrames>,
}

/// A response's headers and trailers, as the end of a stream reports them.
#[derive(Debug)]
struct KeptHeaders {
    headers: HeaderMap,
    trailers: Option<HeaderMap>,
}

impl ObservedBody {
    /// Wraps `resp`'s body; the stream is reported to `reporter` at its end.
    pub fn wrap(resp: http::Response<Body>, reporter: Reporter) -> http::Response<Body> {
        let code = resp.status().as_u16();
        let flags = ResponseFlags::of_response(&resp);
        let wants_grpc_status = reporter
            .labels
            .as_ref()
            .is_some_and(|l| reporter.grpc || l.plan.reads_grpc_status());
        let grpc_status = if wants_grpc_status {
            grpc_status(resp.headers())
        } else {
            None
        };
        let head = header_bytes(resp.headers()) + 17;
        let kept = (reporter.access_log.is_some()
            || reporter
                .labels
                .as_ref()
                .is_some_and(|l| l.plan.reads_response_headers()))
        .then(|| {
            Box::new(KeptHeaders {
                headers: resp.headers().clone(),
                trailers: None,
            })
        });
        let (parts, inner) = resp.into_parts();
        let frames = reporter
            .info
            .observe
            .grpc_messages
            .then(crate::telemetry::grpc::GrpcFrames::default);
        let body = ObservedBody {
            frames,
            inner,
            reporter: Some(reporter),
            code,
            flags,
            grpc_status,
            wants_grpc_status,
            sent: head,
            body_sent: 0,
            kept,
        };
        http::Response::from_parts(parts, http_body_util::combinators::BoxBody::new(body))
    }

    fn finish(&mut self, complete: bool) {
        if let Some(r) = self.reporter.take() {
            let mut flags = self.flags;
            if !complete {
                flags.insert(crate::flags::ResponseFlag::DownstreamConnectionTermination);
            }
            r.report(&Ending {
                code: self.code,
                flags,
                grpc_status: self.grpc_status,
                response_bytes: self.sent,
                body_bytes: self.body_sent,
                headers: self.kept.as_ref().map(|k| &k.headers),
                trailers: self.kept.as_ref().and_then(|k| k.trailers.as_ref()),
            });
        }
    }
}

impl HttpBody for ObservedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.sent += d.len() as u64;
                    self.body_sent += d.len() as u64;
                    if let Some(n) = self.frames.as_mut().map(|g| g.feed(d))
                        && let Some(r) = &self.reporter
                    {
                        r.info.response_messages.store(n, Ordering::Relaxed);
                    }
                } else if let Some(t) = f.trailers_ref() {
                    self.sent += header_bytes(t);
                    if self.wants_grpc_status
                        && let Some(s) = grpc_status(t)
                    {
                        self.grpc_status = Some(s);
                    }
                    if let Some(k) = self.kept.as_mut() {
                        k.trailers = Some(t.clone());
                    }
                }
                if self.inner.is_end_stream() {
                    self.finish(true);
                }
            }
            Poll::Ready(None) => self.finish(true),
            Poll::Ready(Some(Err(e))) => {
                // A timer that cut the response names itself (SI, UT, …); else the upstream reset.
                match e.downcast_ref::<crate::http::timeout::Expired>() {
                    Some(kind) => self.flags.extend(kind.response_flags()),
                    None => self
                        .flags
                        .insert(crate::flags::ResponseFlag::UpstreamRemoteReset),
                }
                self.finish(true);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}

impl std::fmt::Debug for ObservedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedBody")
            .field("code", &self.code)
            .field("sent", &self.sent)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_are_reported_once_the_peer_is_known_and_never_twice() {
        use crate::listener::conn::{Addr, StateObject};
        let info = StreamInfo::new(Observe {
            details: true,
            request_headers: false,
            grpc_messages: true,
        });
        let ctx = ConnContext::new(
            "l",
            Addr::Socket(([10, 0, 0, 2], 9000).into()),
            Addr::Socket(([10, 0, 0, 1], 40000).into()),
            Arc::new(Snapshot::default()),
        );
        let stats = crate::stats::Stats::default();
        let labels = StreamLabels {
            plan: Arc::new(crate::telemetry::istio::Plan::standard("waypoint")),
            upstream_wds: false,
            source: None,
            source_principal: None,
            mutual_tls: false,
            report_interval: None,
        };
        let value = |family: &str| {
            let mut out = String::new();
            stats.istio.render_prometheus(&mut out);
            out.lines()
                .find(|l| l.starts_with(&format!("{family}{{")))
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        info.request_messages.store(2, Ordering::Relaxed);
        info.response_messages.store(1, Ordering::Relaxed);
        // No downstream peer yet: a report while the stream runs waits for it.
        info.report_messages(&ctx, &labels, &stats, None, false);
        assert_eq!(stats.istio.series_count(), 0);
        // The stream's peer_metadata filter found it.
        info.note(|d| {
            let mut fs = FilterState::default();
            fs.set(
                DOWNSTREAM_PEER,
                StateObject {
                    value: "uid".into(),
                    sharing: crate::config::filters::set_filter_state::Sharing::None,
                    read_only: false,
                    peer: Some(Arc::new(PeerLabels::default())),
                },
            );
            d.filter_state = Some(fs);
        });
        info.report_messages(&ctx, &labels, &stats, None, false);
        assert_eq!(value("istio_request_messages_total").as_deref(), Some("2"));
        assert_eq!(value("istio_response_messages_total").as_deref(), Some("1"));
        // The end adds what came since, to the same series; nothing is reported after it.
        info.request_messages.store(5, Ordering::Relaxed);
        info.report_messages(&ctx, &labels, &stats, Some(&UpstreamInfo::default()), true);
        info.request_messages.store(9, Ordering::Relaxed);
        info.report_messages(&ctx, &labels, &stats, None, false);
        assert_eq!(stats.istio.series_count(), 1);
        assert_eq!(value("istio_request_messages_total").as_deref(), Some("5"));
        assert_eq!(value("istio_response_messages_total").as_deref(), Some("1"));
    }

    #[test]
    fn details_are_recorded_only_when_observed() {
        let parts = http::Request::builder()
            .uri("/x")
            .header("x-a", "1")
            .body(())
            .expect("request")
            .into_parts()
            .0;
        let off = StreamInfo::new(Observe::default());
        off.note(|d| d.route_name = Some("r".into()));
        off.capture_request(&parts);
        off.local_reply(&ProxyError::NoRoute);
        off.with_details(|d| {
            assert!(d.route_name.is_none() && d.request.is_none() && d.code_details.is_none())
        });
        // Request headers alone (metric dimensions) without the other details.
        let headers_only = StreamInfo::new(Observe {
            details: false,
            request_headers: true,
            grpc_messages: false,
        });
        headers_only.capture_request(&parts);
        headers_only.note(|d| d.route_name = Some("r".into()));
        headers_only.with_details(|d| {
            assert_eq!(
                d.request.as_ref().map(|r| r.headers["x-a"].clone()),
                Some(http::HeaderValue::from_static("1"))
            );
            assert!(d.route_name.is_none());
        });
        let on = StreamInfo::new(Observe {
            details: true,
            request_headers: true,
            grpc_messages: false,
        });
        on.local_reply(&ProxyError::ConnectFailure("connection refused".into()));
        on.with_details(|d| {
            assert_eq!(
                d.code_details.as_deref(),
                Some("upstream_reset_before_response_started{connection_failure}")
            );
            assert_eq!(d.transport_failure.as_deref(), Some("connection_refused"));
            assert!(
                d.local_reply_body
                    .as_deref()
                    .is_some_and(|b| b.starts_with("upstream connect error"))
            );
            assert!(d.upstream_response.is_none());
        });
        on.responded(VIA_UPSTREAM);
        on.with_details(|d| {
            assert_eq!(d.code_details.as_deref(), Some("via_upstream"));
            assert!(d.upstream_response.is_some());
        });
    }

    #[test]
    fn an_attempt_to_a_hosts_own_address_reads_it_from_the_host() {
        let internal = |id: &str| EndpointAddress::Internal {
            listener: "connect_originate".into(),
            endpoint_id: Some(id.into()),
        };
        let host = Arc::new(Host::from_endpoint(
            &crate::config::endpoint::Endpoint {
                address: internal("10.0.0.5:8080"),
                additional_addresses: Vec::new(),
                hostname: None,
                health: crate::config::endpoint::Health::Unknown,
                weight: 1,
                metadata: Default::default(),
                original_dst: None,
            },
            0,
            None,
        ));
        let slot = UpstreamSlot::default();
        slot.attempt(Some(&host), &internal("10.0.0.5:8080"));
        slot.read(|u| {
            assert!(u.address.is_none(), "not copied");
            assert_eq!(u.address(), Some(&internal("10.0.0.5:8080")));
            assert_eq!(u.workload_ip(), "10.0.0.5".parse().ok());
        });
        // Another address than the host's (a port override) is kept, and wins.
        slot.attempt(Some(&host), &internal("10.0.0.5:9090"));
        // No host: the address alone.
        let bare = UpstreamSlot::default();
        bare.attempt(None, &EndpointAddress::Socket(([10, 0, 0, 7], 80).into()));
        assert_eq!(slot.get().address(), Some(&internal("10.0.0.5:9090")));
        assert_eq!(slot.get().attempts, 2);
        assert_eq!(bare.get().workload_ip(), "10.0.0.7".parse().ok());
    }

    #[test]
    fn request_duration_is_the_first_end() {
        let off = StreamInfo::new(Observe::default());
        off.request_done();
        assert_eq!(off.request_duration(), None);
        let i = StreamInfo::new(Observe {
            details: true,
            request_headers: false,
            grpc_messages: false,
        });
        assert_eq!(i.request_duration(), None);
        i.request_done();
        let first = i.request_duration().expect("done");
        std::thread::yield_now();
        i.request_done();
        assert_eq!(i.request_duration(), Some(first));
    }

    #[test]
    fn local_reply_details_are_envoys() {
        let cases = [
            (ProxyError::NoRoute, "route_not_found"),
            (ProxyError::NoCluster("c".into()), "cluster_not_found"),
            (
                ProxyError::NoHealthyUpstream("c".into()),
                "no_healthy_upstream",
            ),
            (ProxyError::Timeout, "upstream_response_timeout"),
            (
                ProxyError::NotRetried {
                    last: Box::new(ProxyError::ConnectFailure("refused".into())),
                    flag: crate::flags::ResponseFlag::UpstreamRetryLimitExceeded,
                    retried: true,
                },
                "upstream_reset_before_response_started{connection_failure}",
            ),
            (
                ProxyError::Overflow("c".into()),
                "upstream_reset_before_response_started{overflow}",
            ),
            (
                ProxyError::RbacDenied("filter 'rbac' policy ns[a]-policy[deny]".into()),
                "rbac_access_denied_matched_policy[ns[a]-policy[deny]]",
            ),
            (
                ProxyError::RbacDenied("filter 'rbac' policy (none matched)".into()),
                "rbac_access_denied_matched_policy[none]",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(code_details(&e), want, "{e}");
        }
    }
}
