//! The HTTP connection manager on one downstream connection.
//!
//! Two codecs: an HCM that allows CONNECT on HTTP/2 (istiod's `connect_terminate`) runs on the
//! HBONE server (h2 crate, explicit stream/reset limits), and each CONNECT goes through the HTTP
//! filters and routes like any request — the route's `connect_matcher` → cluster `main_internal`
//! with `connect_config` terminates the CONNECT and joins the tunnel to an in-process connection.
//! Every other HCM runs on hyper (HTTP/1.1 and h2c by prior knowledge for codec AUTO), with the
//! header limits turned into 431s and HTTP/2 reset budgets set.
//!
//! Timers as Envoy's HCM has them (see [`super::timeout`]): per stream `stream_idle_timeout` (or
//! the route's `idle_timeout`), `request_timeout` and `max_stream_duration`; per connection
//! `common_http_protocol_options.idle_timeout`, `max_connection_duration` and
//! `max_requests_per_connection` (drain: GOAWAY or `Connection: close`), and HTTP/2
//! `connection_keepalive` PINGs on both codecs.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::{
    Body, cors, empty, fault, full, local_ratelimit, route_select, router, stream_info,
    timeout::{self, Activity, ConnActivity, Expired, TimedBody, Watch},
};
use crate::{
    config::filters::set_filter_state::Sharing,
    config::{
        RouteConfig, Snapshot,
        filters::{
            hcm::{Codec, HttpConnectionManager, Routes},
            http::{Fault, HttpFilterKind, PerFilterConfig},
            rbac::HttpRbac,
        },
        route::{Action, ClusterTarget, Route, VirtualHost},
    },
    dataplane::DataPlane,
    flags::ProxyError,
    hbone::{
        H2Settings,
        server::{ConnEvent, ConnInfo, ConnectHandler, ConnectRequest, Decision, serve_connection},
    },
    listener::{
        conn::{BoxIo, ConnContext, ConnValues, FilterState, StateObject, apply_set_filter_state},
        drain::ChainWatch,
    },
    rbac::{self, RbacInput, TlsPeer},
    stats::HcmStats,
    upstream::connect::Origin,
};

/// Envoy's default `max_request_headers_kb`.
const DEFAULT_MAX_HEADERS_KB: u32 = 60;
/// Envoy's default `max_headers_count`.
const DEFAULT_MAX_HEADERS_COUNT: u32 = 100;
/// Streams an HTTP/2 client may reset before we accepted them, before GOAWAY (rapid reset).
const MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams we may reset for a client's errors before GOAWAY.
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// Envoy's default for HTTP/2 `max_concurrent_streams`.
const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 2_147_483_647;
/// Envoy's default `stream_idle_timeout`.
const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Envoy's default downstream `common_http_protocol_options.idle_timeout`.
const DEFAULT_CONNECTION_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Serves HTTP on `io` until it closes, or drains it when the server drains or an LDS update
/// drains its filter chain (`ctx.drain`): HTTP/2 GOAWAY, HTTP/1.1 `Connection: close`, then the
/// streams in flight finish; a chain's connection still open when `--drain-time-s` is over is
/// closed with them.
pub async fn serve(
    dp: Arc<DataPlane>,
    ctx: Arc<ConnContext>,
    hcm: Arc<HttpConnectionManager>,
    io: BoxIo,
) {
    let drain = dp.server.drain.subscribe();
    let mut chain = ctx.drain.clone();
    // Envoy counts a connection the HCM drains for the server's or the listener's drain.
    let drain_close = dp.server.stats.counter(&format!(
        "http.{}.downstream_cx_drain_close",
        hcm.stat_prefix
    ));
    let headers_kb = hcm
        .max_request_headers_kb
        .unwrap_or(DEFAULT_MAX_HEADERS_KB)
        .max(1);
    if hcm.http2.allow_connect && hcm.codec != Codec::Http1 && terminates_connect(&hcm) {
        let mut settings = H2Settings {
            max_header_list_size: headers_kb * 1024,
            ..H2Settings::default()
        };
        if let Some(m) = hcm.http2.max_concurrent_streams {
            settings.max_concurrent_streams = m;
        }
        if let Some(w) = hcm.http2.initial_stream_window_size {
            settings.initial_stream_window = w;
        }
        if let Some(w) = hcm.http2.initial_connection_window_size {
            settings.initial_connection_window = w;
        }
        settings.keepalive_interval = hcm.http2.keepalive_interval;
        if let Some(t) = hcm.http2.keepalive_timeout {
            settings.keepalive_timeout = t;
        }
        let limits = ConnLimits::of(&hcm);
        settings.idle_timeout = limits.idle;
        settings.max_connection_duration = limits.max_duration;
        settings.max_requests_per_connection = limits.max_requests;
        let info = ConnInfo {
            remote: ctx
                .remote
                .socket()
                .unwrap_or_else(|| ([0, 0, 0, 0], 0).into()),
            local: ctx
                .local
                .socket()
                .unwrap_or_else(|| ([0, 0, 0, 0], 0).into()),
            peer_identity: ctx.tls.as_ref().and_then(|t| t.peer_uri_san.clone()),
            local_identity: ctx.tls.as_ref().and_then(|t| t.local_uri_san.clone()),
        };
        let stats = Arc::new(HcmStats::new(&dp.server.stats, &hcm.stat_prefix));
        let drain = drain_signal(drain, chain.clone(), drain_close);
        let handler = Arc::new(ConnectTerminate {
            dp,
            ctx,
            hcm,
            stats,
        });
        tokio::select! {
            r = serve_connection(io, info, &settings, handler, drain) => {
                if let Err(e) = r {
                    tracing::debug!(target: "http", "CONNECT connection ended: {e}");
                }
            }
            // Dropping the connection resets the tunnels still open on it.
            _ = chain.closed() => {
                tracing::debug!(target: "http", "drain time over; closing the CONNECT connection");
            }
        }
        return;
    }
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    match hcm.codec {
        Codec::Http1 => builder = builder.http1_only(),
        Codec::Http2 => builder = builder.http2_only(),
        Codec::Auto => {}
    }
    let max_count = hcm
        .common
        .max_headers_count
        .unwrap_or(DEFAULT_MAX_HEADERS_COUNT) as usize;
    {
        let mut h1 = builder.http1();
        h1.timer(TokioTimer::new())
            .max_buf_size(((headers_kb * 1024) as usize).max(8192))
            .max_headers(max_count);
        // hyper's own 30 s default would close idle keep-alive connections: only the
        // configured `request_headers_timeout` applies (the connection idle timeout is ours).
        h1.header_read_timeout(hcm.request_headers_timeout.filter(|t| !t.is_zero()));
    }
    {
        let mut h2 = builder.http2();
        h2.timer(TokioTimer::new())
            .max_header_list_size(headers_kb * 1024)
            .max_concurrent_streams(
                hcm.http2
                    .max_concurrent_streams
                    .unwrap_or(DEFAULT_MAX_CONCURRENT_STREAMS),
            )
            .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
            .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS);
        if let Some(w) = hcm.http2.initial_stream_window_size {
            h2.initial_stream_window_size(w);
        }
        if let Some(w) = hcm.http2.initial_connection_window_size {
            h2.initial_connection_window_size(w);
        }
        if let Some(i) = hcm.http2.keepalive_interval {
            h2.keep_alive_interval(i);
            if let Some(t) = hcm.http2.keepalive_timeout {
                h2.keep_alive_timeout(t);
            }
        }
    }
    let stats = Arc::new(HcmStats::new(&dp.server.stats, &hcm.stat_prefix));
    let state = Arc::new(ConnState::new(ConnLimits::of(&hcm)));
    let conn_stats = stats.clone();
    let conn_state = state.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (dp, ctx, hcm, stats) = (dp.clone(), ctx.clone(), hcm.clone(), stats.clone());
        let state = state.clone();
        // Boxed: the request's future is large, and HTTP/2 spawns one task per stream, which
        // moved it by value into the task (and again into the task's stage) on every request.
        Box::pin(async move {
            stats.rq_total.inc();
            // The stream counts for the connection's idle timeout until its response ends.
            let stream = state.activity.stream();
            let last = state.request();
            let h1 = req.version() < http::Version::HTTP_2;
            let active = ActiveRequest::new(&stats.rq_active);
            let resp = handle(dp.clone(), ctx, hcm, req, &stats).await;
            stats.codes.record(&dp.server.stats, resp.status().as_u16());
            drop(active);
            let mut resp = resp.map(|b| timeout::hold(b, stream));
            if resp.extensions().get::<router::Upgraded>().is_some() {
                resp = tunnel_lifetime(resp);
            }
            if last {
                // `max_requests_per_connection`: this response is the connection's last.
                stats.cx_max_requests_reached.inc();
                if h1 {
                    resp.headers_mut().insert(
                        header::CONNECTION,
                        header::HeaderValue::from_static("close"),
                    );
                }
                state.max_requests_hit.notify_one();
            }
            Ok::<_, Infallible>(resp)
        })
    });
    // HTTP/2 answers of one connection go out together (see `Coalesce`).
    let io = crate::io::coalesce::Coalesce::for_http2(io);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut drain = drain;
    let mut watchdog = timeout::Watchdog::spawn(async move {
        let reason = conn_state.until_drain(&mut drain, &mut chain).await;
        (reason, chain)
    });
    let (reason, mut chain) = tokio::select! {
        biased;
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(target: "http", "connection ended: {e}");
            }
            return;
        }
        w = &mut watchdog => match w {
            Some(w) => w,
            None => {
                tracing::warn!(target: "http", "connection limit task failed; serving without limits");
                if let Err(e) = conn.await {
                    tracing::debug!(target: "http", "connection ended: {e}");
                }
                return;
            }
        },
    };
    match reason {
        DrainReason::Server | DrainReason::Listener => drain_close.inc(),
        DrainReason::Idle => conn_stats.cx_idle_timeout.inc(),
        DrainReason::MaxDuration => conn_stats.cx_max_duration_reached.inc(),
        // Counted when the last request came in.
        DrainReason::MaxRequests => {}
    }
    tracing::debug!(target: "http", ?reason, "draining the connection");
    // GOAWAY (HTTP/2) or `Connection: close` after the response in flight (HTTP/1.1); an idle
    // connection closes at once.
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn.as_mut() => {}
        // Envoy removes a drained filter chain after the drain time, closing what is left on it.
        _ = chain.closed() => {
            tracing::debug!(target: "http", "drain time over; closing the connection with streams open");
        }
    }
}

/// An upgraded stream's 101: hyper gets it with an empty body, while the body the stream built
/// (the tunnel's lifetime under the HCM's and the router's timers, its report, its hold on the
/// connection) is polled here until the tunnel ends or a timer ends it — which resets the
/// tunnel, as Envoy resets a stream whose response already started.
fn tunnel_lifetime(resp: Response<Body>) -> Response<Body> {
    let (head, mut lifetime) = resp.into_parts();
    tokio::spawn(async move {
        while let Some(frame) = lifetime.frame().await {
            if frame.is_err() {
                break;
            }
        }
    });
    Response::from_parts(head, empty())
}

/// The drain signal a CONNECT-terminating connection watches: set once the server drains or the
/// connection's filter chain does (counted in `downstream_cx_drain_close`). A task joins the two
/// until either fires or the connection ends.
fn drain_signal(
    mut server: tokio::sync::watch::Receiver<bool>,
    mut chain: ChainWatch,
    drain_close: Arc<crate::stats::Stat>,
) -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(*server.borrow());
    tokio::spawn(async move {
        tokio::select! {
            // A server gone is a server draining.
            _ = server.wait_for(|d| *d) => {}
            _ = chain.draining() => {}
            _ = tx.closed() => return,
        }
        drain_close.inc();
        tx.send_replace(true);
    });
    rx
}

/// An HCM's connection limits (`common_http_protocol_options`); `None` when off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ConnLimits {
    /// `idle_timeout` (Envoy's default 1 h; zero disables).
    idle: Option<Duration>,
    /// `max_connection_duration`.
    max_duration: Option<Duration>,
    /// `max_requests_per_connection`.
    max_requests: Option<u32>,
}

impl ConnLimits {
    fn of(hcm: &HttpConnectionManager) -> ConnLimits {
        ConnLimits {
            idle: match hcm.common.idle_timeout {
                None => Some(DEFAULT_CONNECTION_IDLE_TIMEOUT),
                Some(d) => Some(d).filter(|d| !d.is_zero()),
            },
            max_duration: hcm.common.max_connection_duration.filter(|d| !d.is_zero()),
            max_requests: hcm.common.max_requests_per_connection.filter(|n| *n > 0),
        }
    }
}

/// Why a downstream connection drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DrainReason {
    /// The server drains (`/drain_listeners`, SIGTERM).
    Server,
    /// An LDS update changed or removed the connection's filter chain.
    Listener,
    /// `idle_timeout`: no stream for that long.
    Idle,
    /// `max_connection_duration`.
    MaxDuration,
    /// `max_requests_per_connection`.
    MaxRequests,
}

/// One hyper connection's streams and requests, against its [`ConnLimits`].
struct ConnState {
    limits: ConnLimits,
    opened: tokio::time::Instant,
    activity: Arc<ConnActivity>,
    served: std::sync::atomic::AtomicU32,
    /// Signalled once the last allowed request was served (a stored permit, so a signal sent
    /// before the connection task waits is not lost).
    max_requests_hit: tokio::sync::Notify,
}

impl ConnState {
    fn new(limits: ConnLimits) -> ConnState {
        ConnState {
            limits,
            opened: tokio::time::Instant::now(),
            activity: ConnActivity::new(),
            served: std::sync::atomic::AtomicU32::new(0),
            max_requests_hit: tokio::sync::Notify::new(),
        }
    }

    /// Counts a request; `true` when it is the last one `max_requests_per_connection` allows.
    fn request(&self) -> bool {
        let n = self
            .served
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .saturating_add(1);
        self.limits.max_requests == Some(n)
    }

    /// Waits until the connection must drain: the server or the filter chain drains, or a limit
    /// is reached.
    async fn until_drain(
        &self,
        drain: &mut tokio::sync::watch::Receiver<bool>,
        chain: &mut ChainWatch,
    ) -> DrainReason {
        let idle = async {
            match self.limits.idle {
                Some(d) => self.activity.idle_for(d).await,
                None => std::future::pending().await,
            }
        };
        let duration = async {
            match self
                .limits
                .max_duration
                .and_then(|d| self.opened.checked_add(d))
            {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = drain.wait_for(|d| *d) => DrainReason::Server,
            _ = chain.draining() => DrainReason::Listener,
            _ = idle => DrainReason::Idle,
            _ = duration => DrainReason::MaxDuration,
            _ = self.max_requests_hit.notified() => DrainReason::MaxRequests,
        }
    }
}

/// The HCM's timers of one stream, armed once its route is known: `stream_idle_timeout` (or the
/// route's `idle_timeout`), `request_timeout`, and `max_stream_duration` (HCM, route, or the
/// request's `grpc-timeout`). They run until the response ends; a timer that fires before the
/// response starts is the stream's local reply (408 while the request is arriving, else 504),
/// after that it resets the stream.
struct StreamTimers {
    watch: Option<Watch>,
    stats: Option<Arc<HcmStats>>,
}

impl StreamTimers {
    /// The timers of a stream on `route`; a gRPC request's `grpc-timeout` may be rewritten
    /// (the route's `max_stream_duration` with `grpc_timeout_header_max`).
    fn arm(
        hcm: &HttpConnectionManager,
        route: &Route,
        parts: &mut http::request::Parts,
        connect: bool,
        stats: &Arc<HcmStats>,
    ) -> StreamTimers {
        let stats = Some(stats.clone());
        let fwd = match &route.action {
            Action::Forward(f) => Some(f),
            _ => None,
        };
        // The route's idle timeout replaces the HCM's; zero turns both off.
        let idle = match fwd.and_then(|f| f.idle_timeout) {
            Some(d) => Some(d),
            None => Some(
                hcm.stream_idle_timeout
                    .unwrap_or(DEFAULT_STREAM_IDLE_TIMEOUT),
            ),
        }
        .filter(|d| !d.is_zero());
        // A tunnel's request never ends: `request_timeout` stops at its 200.
        let request = hcm.request_timeout.filter(|d| !d.is_zero() && !connect);
        let msd = fwd.map(|f| f.max_stream_duration).unwrap_or_default();
        let grpc = stream_info::is_grpc(&parts.headers);
        let duration = timeout::stream_duration(
            &timeout::StreamDurationConfig {
                present: msd.present,
                max: msd.max,
                grpc_timeout_header_max: msd.grpc_timeout_header_max,
                grpc_timeout_header_offset: msd.grpc_timeout_header_offset,
            },
            hcm.common.max_stream_duration,
            &mut parts.headers,
            grpc,
        );
        if idle.is_none() && request.is_none() && duration.is_none() {
            return StreamTimers { watch: None, stats };
        }
        let activity = Activity::new();
        let start = activity.started();
        let mut w = Watch::new(activity);
        if let Some(d) = idle {
            w = w.idle(d, start, Expired::StreamIdle);
        }
        if let Some(d) = request {
            w = w.request_by(start + d);
        }
        if let Some(d) = duration {
            w = w.at(start + d, Expired::StreamDuration);
        }
        StreamTimers {
            watch: Some(w),
            stats,
        }
    }

    /// Runs `f` unless a timer fires first (then the stream's local reply is the error).
    async fn run<F: Future>(&mut self, f: F) -> Result<F::Output, ProxyError> {
        let Some(w) = self.watch.as_mut() else {
            return Ok(f.await);
        };
        match w.run(std::pin::pin!(f)).await {
            Ok(r) => Ok(r),
            Err(kind) => {
                count_stream_expiry(self.stats.as_deref(), kind);
                let request_complete = w.activity().request_ended().is_some();
                // Spent: the local reply it causes must not be cut by it again.
                self.watch = None;
                Err(ProxyError::StreamTimeout {
                    kind,
                    request_complete,
                })
            }
        }
    }

    /// Counts the request body's frames as activity and hands the stream's activity to the
    /// router (whose timers start at the request's end). An `upgrade`'s request does not end
    /// with its (empty) body: Envoy's HTTP/1 codec stops at its headers without ending the
    /// request, the payload after the 101 being its body, so `request_timeout` runs until the
    /// 101 (the response's start) and a timer firing before it answers 408.
    fn observe(&self, body: Body, parts: &mut http::request::Parts, upgrade: bool) -> Body {
        match &self.watch {
            Some(w) => {
                parts.extensions.insert(w.activity().clone());
                if upgrade {
                    body
                } else {
                    timeout::observe_request(body, w.activity())
                }
            }
            None => body,
        }
    }

    /// Guards the response body with the timers still running. A timer that cuts the response
    /// names itself in the stream's details, as Envoy's `sendLocalReply` does when the response
    /// already started (it resets the stream and sets the details).
    fn guard(
        self,
        resp: Response<Body>,
        info: Option<&Arc<stream_info::StreamInfo>>,
    ) -> Response<Body> {
        let Some(w) = self.watch else {
            return resp;
        };
        w.activity().start_response();
        let stats = self.stats;
        let info = info.cloned();
        let on_expire: timeout::OnExpire = Box::new(move |k| {
            count_stream_expiry(stats.as_deref(), k);
            if let Some(i) = info {
                i.responded(k.code_details());
            }
        });
        let (head, body) = resp.into_parts();
        Response::from_parts(head, TimedBody::wrap(body, w, true, Some(on_expire)))
    }

    /// Guards a CONNECT tunnel with the timers still running.
    fn guard_tunnel(self, io: BoxIo) -> BoxIo {
        let Some(w) = self.watch else {
            return io;
        };
        w.activity().start_response();
        let stats = self.stats;
        let on_expire: timeout::OnExpire =
            Box::new(move |k| count_stream_expiry(stats.as_deref(), k));
        Box::new(timeout::WatchedIo::new(io, w, Some(on_expire)))
    }
}

/// Counts an HCM stream timer (`downstream_rq_idle_timeout`, `downstream_rq_timeout`,
/// `downstream_rq_max_duration_reached`).
fn count_stream_expiry(stats: Option<&HcmStats>, kind: Expired) {
    let Some(s) = stats else {
        return;
    };
    match kind {
        Expired::StreamIdle => s.rq_idle_timeout.inc(),
        Expired::Request => s.rq_timeout.inc(),
        Expired::StreamDuration => s.rq_max_duration_reached.inc(),
        _ => {}
    }
}

/// Whether some route of the HCM terminates CONNECT (`connect_matcher` routes).
fn terminates_connect(hcm: &HttpConnectionManager) -> bool {
    match &hcm.routes {
        Routes::Inline(rc) => rc.virtual_hosts.iter().any(|vh| {
            vh.routes
                .iter()
                .any(|r| matches!(r.matcher.path, crate::config::route::PathMatch::Connect))
        }),
        Routes::Rds { .. } => true,
    }
}

/// The route table for a request: the HCM's inline table, or its RDS table in `current`.
fn route_config<'a>(
    hcm: &'a HttpConnectionManager,
    current: &'a Snapshot,
) -> Option<&'a RouteConfig> {
    match &hcm.routes {
        Routes::Inline(rc) => Some(rc),
        Routes::Rds { name, .. } => current.routes.get(name).map(|r| r.as_ref()),
    }
}

/// The config a request's RDS routes are read from. Envoy's HCM asks its route config provider
/// for the latest table on every stream, so an RDS update (a VirtualService change) reaches
/// requests on connections opened before it — long-lived HTTP/2 and gRPC channels included. An
/// inline table belongs to its listener, whose update drains the connection instead.
fn routes_snapshot(dp: &DataPlane, hcm: &HttpConnectionManager) -> Option<Arc<Snapshot>> {
    matches!(hcm.routes, Routes::Rds { .. }).then(|| dp.server.config.snapshot())
}

/// A local reply (Envoy's shape: status, `content-type: text/plain`, body, `server`).
pub fn local_reply(hcm: &HttpConnectionManager, e: &ProxyError) -> Response<Body> {
    let body = e.body();
    let mut r = Response::new(full(body.clone()));
    *r.status_mut() = e.status();
    if !body.is_empty() {
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain"),
        );
    }
    if let Ok(v) = header::HeaderValue::from_str(&hcm.server_name) {
        r.headers_mut().insert(header::SERVER, v);
    }
    if let ProxyError::Redirect(location) = e
        && let Ok(v) = header::HeaderValue::from_str(location)
    {
        r.headers_mut().insert(header::LOCATION, v);
    }
    // jwt_authn's challenge (RFC 6750), unless `strip_failure_response` left it out.
    if let ProxyError::Unauthorized(d) = e
        && let Some(v) = d
            .www_authenticate
            .as_deref()
            .and_then(|v| header::HeaderValue::from_str(v).ok())
    {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    // Envoy's router marks a reply of an open circuit breaker (UO) for the client.
    if let ProxyError::Overflow(_) = e {
        r.headers_mut().insert(
            "x-envoy-overloaded",
            header::HeaderValue::from_static("true"),
        );
    }
    r.extensions_mut().insert(e.response_flags());
    r.extensions_mut().insert(LocalReply {
        grpc_status: match e {
            // Envoy's `max_stream_duration` reply names the gRPC status itself.
            ProxyError::StreamTimeout {
                kind: super::timeout::Expired::StreamDuration,
                ..
            } => Some(GRPC_DEADLINE_EXCEEDED),
            _ => None,
        },
        message: body,
    });
    r
}

/// Marks a reply the proxy made itself, so a gRPC request can get it as a gRPC status.
#[derive(Debug, Clone)]
struct LocalReply {
    /// The gRPC status when the reply names one (else mapped from the HTTP status).
    grpc_status: Option<u32>,
    /// The reply's text: `grpc-message`.
    message: String,
}

/// gRPC `DEADLINE_EXCEEDED`.
const GRPC_DEADLINE_EXCEEDED: u32 = 4;

/// `grpc-status` (a parsed name: a `&str` key is parsed on every use).
const GRPC_STATUS: header::HeaderName = header::HeaderName::from_static("grpc-status");
/// `grpc-message`.
const GRPC_MESSAGE: header::HeaderName = header::HeaderName::from_static("grpc-message");

/// The gRPC status of an HTTP status (the gRPC spec's HTTP-to-gRPC mapping, which Envoy's local
/// replies use).
fn grpc_status_of(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,                   // INTERNAL
        401 => 16,                   // UNAUTHENTICATED
        403 => 7,                    // PERMISSION_DENIED
        404 => 12,                   // UNIMPLEMENTED
        429 | 502 | 503 | 504 => 14, // UNAVAILABLE
        _ => 2,                      // UNKNOWN
    }
}

/// A local reply to a gRPC request becomes what Envoy sends: a trailers-only gRPC response (HTTP
/// 200, `content-type: application/grpc`, `grpc-status`, `grpc-message` percent-encoded, no body),
/// so gRPC clients see e.g. UNAVAILABLE for "no healthy upstream" instead of a protocol error.
/// Upstream responses and replies that already carry a `grpc-status` (a gRPC fault abort) pass.
fn grpc_local_reply(resp: Response<Body>) -> Response<Body> {
    let Some(local) = resp.extensions().get::<LocalReply>().cloned() else {
        return resp;
    };
    if resp.headers().contains_key(&GRPC_STATUS) {
        return resp;
    }
    let (mut parts, _) = resp.into_parts();
    let code = local
        .grpc_status
        .unwrap_or_else(|| grpc_status_of(parts.status));
    parts.status = StatusCode::OK;
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/grpc"),
    );
    parts
        .headers
        .insert(GRPC_STATUS, header::HeaderValue::from(code));
    if !local.message.is_empty()
        && let Ok(v) = header::HeaderValue::from_str(&grpc_percent_encode(&local.message))
    {
        parts.headers.insert(GRPC_MESSAGE, v);
    }
    Response::from_parts(parts, full(String::new()))
}

/// `grpc-message` encoding: bytes outside printable ASCII, and `%`, as `%XX`.
fn grpc_percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The route a request matched, for per-route filter configs.
type Matched<'a> = (&'a RouteConfig, &'a VirtualHost, &'a Route);

/// The most specific `typed_per_filter_config` for filter `name` (route, then virtual host, then
/// route table).
fn per_filter<'a>(name: &str, matched: Option<Matched<'a>>) -> Option<&'a PerFilterConfig> {
    let (rc, vh, route) = matched?;
    route
        .per_filter
        .get(name)
        .or_else(|| vh.per_filter.get(name))
        .or_else(|| rc.per_filter.get(name))
}

/// A reply a filter made itself, ending the filter chain.
enum Stop {
    /// Refused (local rate limit): the error's local reply with the filter's headers.
    Refused(ProxyError, Response<Body>),
    /// A CORS preflight answered.
    Preflight(Response<Body>),
}

impl Stop {
    /// The refusal of a CONNECT stream (which has no response to shape).
    fn into_error(self) -> ProxyError {
        match self {
            Stop::Refused(e, _) => e,
            Stop::Preflight(_) => ProxyError::Unsupported("CORS preflight on CONNECT".into()),
        }
    }
}

/// What CORS and the local rate limit leave for the response — Envoy runs their
/// `encodeHeaders` on whatever response the stream gets — and a reply when one answered.
#[derive(Default)]
struct Filtered {
    stop: Option<Stop>,
    cors: Option<cors::ResponseHeaders>,
    rate_limit: Option<local_ratelimit::Evaluated>,
}

impl Filtered {
    /// Adds the CORS and `x-ratelimit-*` response headers.
    fn encode(&self, resp: &mut Response<Body>) {
        if let Some(c) = &self.cors {
            c.apply(resp.headers_mut());
        }
        if let Some(l) = &self.rate_limit {
            l.apply(resp.headers_mut());
        }
    }

    /// The reply of a filter that answered, recorded for access logs and shaped.
    fn stopped(&self, stop: Stop, info: Option<&Arc<stream_info::StreamInfo>>) -> Response<Body> {
        let mut r = match stop {
            Stop::Refused(e, r) => {
                if let Some(i) = info {
                    i.local_reply(&e);
                }
                r
            }
            Stop::Preflight(r) => {
                if let Some(i) = info {
                    i.responded("cors_response");
                }
                r
            }
        };
        self.encode(&mut r);
        r
    }
}

/// Runs `envoy.filters.http.cors` (named `name`); `true` when it answered a preflight.
fn cors_filter(
    name: &str,
    hcm: &HttpConnectionManager,
    stats: &crate::stats::Stats,
    parts: &http::request::Parts,
    matched: Option<Matched<'_>>,
    filtered: &mut Filtered,
) -> bool {
    let Some((rc, vh, route)) = matched else {
        return false;
    };
    let policies = cors::policies(name, rc, vh, route);
    let e = cors::evaluate(&policies, parts, hcm, (rand::random(), rand::random()));
    cors::count(stats, &hcm.stat_prefix, e.origin_valid);
    match e.outcome {
        cors::Outcome::Pass => false,
        cors::Outcome::Respond(h) => {
            filtered.cors = Some(h);
            false
        }
        cors::Outcome::Preflight(r) => {
            filtered.stop = Some(Stop::Preflight(r));
            true
        }
    }
}

/// Runs `envoy.filters.http.local_ratelimit` with `cfg` (the filter's or the route's); `true`
/// when it refused the request.
fn rate_limit_filter(
    cfg: &crate::config::filters::local_ratelimit::LocalRateLimit,
    hcm: &HttpConnectionManager,
    ctx: &ConnContext,
    stats: &crate::stats::Stats,
    parts: &mut http::request::Parts,
    state: &FilterState,
    filtered: &mut Filtered,
) -> bool {
    use local_ratelimit::Verdict;
    let random = (rand::random(), rand::random());
    match local_ratelimit::decide(cfg, stats, &ctx.rate_limits, random) {
        Verdict::Skipped => false,
        Verdict::Allowed(e) => {
            filtered.rate_limit = Some(e);
            false
        }
        Verdict::NotEnforced(e) => {
            let values = ConnValues {
                conn: ctx,
                stream_state: Some(state),
                request: None,
            };
            super::request::apply_header_ops(
                &mut parts.headers,
                &cfg.request_headers_when_not_enforced,
                &values,
            );
            filtered.rate_limit = Some(e);
            false
        }
        Verdict::Limited(e) => {
            let status = StatusCode::from_u16(cfg.status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
            let err = ProxyError::RateLimited(status);
            let mut r = local_reply(hcm, &err);
            let values = ConnValues {
                conn: ctx,
                stream_state: Some(state),
                request: Some(parts),
            };
            super::request::apply_header_ops(r.headers_mut(), &cfg.response_headers, &values);
            e.retry_after(cfg.status, r.headers_mut());
            filtered.rate_limit = Some(e);
            filtered.stop = Some(Stop::Refused(err, r));
            true
        }
    }
}

/// Evaluates one RBAC filter for a request.
fn rbac_check(
    rules: &HttpRbac,
    filter: &str,
    ctx: &ConnContext,
    parts: &http::request::Parts,
    state: &FilterState,
    metadata: &stream_info::DynamicMetadata,
) -> Result<(), ProxyError> {
    let fs = |k: &str| -> Option<&str> { state.get(k).or_else(|| ctx.filter_state.get(k)) };
    // The stream's dynamic metadata (jwt_authn payloads), then the connection's.
    let md = |ns: &str, path: &[String]| -> Option<&serde_json::Value> {
        metadata
            .value(ns, path)
            .or_else(|| ctx.metadata_value(ns, path))
    };
    let uri_sans: Vec<String> = ctx
        .tls
        .as_ref()
        .and_then(|t| t.peer_uri_san.clone())
        .into_iter()
        .collect();
    let authority = router::authority(parts);
    let input = RbacInput {
        headers: Some(&parts.headers),
        method: Some(parts.method.as_str()),
        path: parts.uri.path_and_query().map(|p| p.as_str()),
        authority: authority.as_deref(),
        scheme: parts.uri.scheme_str(),
        source: ctx.remote.socket(),
        direct_source: ctx.direct_remote.socket().or(ctx.remote.socket()),
        destination: ctx.local.socket(),
        requested_server_name: ctx.tls.as_ref().and_then(|t| t.server_name.as_deref()),
        peer: ctx.tls.as_ref().map(|_| TlsPeer {
            uri_sans: &uri_sans,
            ..TlsPeer::default()
        }),
        filter_state: &fs,
        metadata: &md,
    };
    let d = rbac::evaluate(rules.rules.as_ref(), rules.shadow_rules.as_ref(), &input);
    if d.allowed {
        Ok(())
    } else {
        Err(ProxyError::RbacDenied(format!(
            "filter '{filter}' policy {}",
            d.policy.as_deref().unwrap_or("(none matched)")
        )))
    }
}

/// Runs one jwt_authn filter: verifies the request's tokens, applies what verified tokens do to
/// the request (token removal, payload and claim headers) and puts their payloads into the
/// stream's dynamic metadata. Returns whether the route must be picked again
/// (`clear_route_cache` after claim headers were added). A token whose provider's remote JWKS
/// is not cached waits for it to be fetched through `dp`'s clusters.
async fn jwt_check(
    dp: &Arc<DataPlane>,
    jwt: &crate::config::filters::jwt::JwtAuthn,
    per_route: Option<&crate::config::filters::jwt::PerRoute>,
    hcm: &HttpConnectionManager,
    stats: &crate::stats::Stats,
    parts: &mut http::request::Parts,
    metadata: &mut stream_info::DynamicMetadata,
) -> Result<bool, ProxyError> {
    let counters = jwt.counters(stats, &hcm.stat_prefix);
    jwt.bind(dp, counters);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match jwt.verify(per_route, parts, metadata, now).await {
        Ok(passed) => {
            counters.allowed.inc();
            if passed.cors_preflight_bypassed {
                counters.cors_preflight_bypassed.inc();
            }
            Ok(passed.clear_route_cache)
        }
        Err(denial) => {
            counters.denied.inc();
            Err(ProxyError::Unauthorized(Box::new(denial)))
        }
    }
}

/// Runs the request-phase HTTP filters in their configured order and returns the stream's filter
/// state, the fault config to apply and the route (picked again when jwt_authn clears the route
/// cache): `set_filter_state` writes the state, `jwt_authn` verifies tokens and publishes their
/// payloads as dynamic metadata, RBAC (with per-route overrides) allows or denies on both.
/// CORS and the local rate limit leave their response work in `filtered`, or a reply that ends
/// the chain (a preflight, a 429). Filters whose effects belong to later work (stats,
/// grpc_stats, peer metadata, fault) pass the request on. Async only because jwt_authn may wait
/// for a remote JWKS.
async fn request_filters<'a>(
    dp: &Arc<DataPlane>,
    hcm: &'a HttpConnectionManager,
    ctx: &'a ConnContext,
    current: &'a Snapshot,
    parts: &mut http::request::Parts,
    mut matched: Option<Matched<'a>>,
    filtered: &mut Filtered,
) -> Result<(FilterState, Option<&'a Fault>, Option<Matched<'a>>), ProxyError> {
    let stats: &crate::stats::Stats = &dp.server.stats;
    let mut state = FilterState::default();
    let mut metadata = stream_info::DynamicMetadata::default();
    let mut fault = None;
    for f in &hcm.http_filters {
        let route_config = per_filter(&f.name, matched);
        if matches!(route_config, Some(PerFilterConfig::Disabled))
            || (f.disabled && route_config.is_none())
        {
            continue;
        }
        match &f.kind {
            HttpFilterKind::SetFilterState(c) => {
                let seen = state.clone();
                apply_set_filter_state(
                    c,
                    &ConnValues {
                        conn: ctx,
                        stream_state: Some(&seen),
                        request: Some(parts),
                    },
                    &mut state,
                );
            }
            HttpFilterKind::Rbac(r) => {
                let rules: Option<&HttpRbac> = match route_config {
                    Some(PerFilterConfig::Rbac(over)) => over.as_deref(),
                    _ => Some(r),
                };
                if let Some(rules) = rules {
                    rbac_check(rules, &f.name, ctx, parts, &state, &metadata)?;
                }
            }
            HttpFilterKind::Fault(f) => {
                fault = match route_config {
                    Some(PerFilterConfig::Fault(over)) => Some(over.as_ref()),
                    _ => Some(f.as_ref()),
                };
            }
            HttpFilterKind::JwtAuthn(jwt) => {
                let per_route = match route_config {
                    Some(PerFilterConfig::JwtAuthn(p)) => Some(p),
                    _ => None,
                };
                // Boxed: a remote JWKS wait is rare, and its state must not grow every
                // request's future (the HCM's is copied as it moves through the timers).
                let check = Box::pin(jwt_check(
                    dp,
                    jwt,
                    per_route,
                    hcm,
                    stats,
                    parts,
                    &mut metadata,
                ));
                if check.await? {
                    // Envoy's clearRouteCache: the filters after this one and the router see
                    // the route the new headers select.
                    matched = self::route_config(hcm, current).and_then(|rc| {
                        let view = route_select::RequestView::from_parts(parts);
                        route_select::select(rc, &view, rand::random()).map(|(vh, r)| (rc, vh, r))
                    });
                }
            }
            HttpFilterKind::PeerMetadata(pm) => {
                if let Some((value, peer)) = discover_downstream(pm, ctx, parts) {
                    state.set(
                        stream_info::DOWNSTREAM_PEER,
                        StateObject {
                            value,
                            sharing: if pm.shared_with_upstream {
                                Sharing::Once
                            } else {
                                Sharing::None
                            },
                            read_only: false,
                            peer: Some(peer),
                        },
                    );
                }
            }
            HttpFilterKind::Cors => {
                let answered = cors_filter(&f.name, hcm, stats, parts, matched, filtered);
                if answered {
                    break;
                }
            }
            HttpFilterKind::LocalRateLimit(l) => {
                let cfg = match route_config {
                    Some(PerFilterConfig::LocalRateLimit(over)) => over.as_ref(),
                    _ => l.as_ref(),
                };
                if rate_limit_filter(cfg, hcm, ctx, stats, parts, &state, filtered) {
                    break;
                }
            }
            HttpFilterKind::Router(_) => break,
            _ => {}
        }
    }
    Ok((state, fault, matched))
}

/// The downstream peer per a `peer_metadata` filter's `downstream_discovery` (first method that
/// finds one): WDS by the connection's remote address, or the `baggage` header. Returns the
/// filter-state value (workload uid or the baggage) and the peer's labels.
fn discover_downstream(
    pm: &crate::config::filters::istio::PeerMetadata,
    ctx: &ConnContext,
    parts: &http::request::Parts,
) -> Option<(String, Arc<crate::telemetry::istio::PeerLabels>)> {
    use crate::config::filters::istio::Discovery;
    pm.downstream_discovery.iter().find_map(|d| match d {
        Discovery::WorkloadDiscovery => {
            let ip = ctx.remote.socket()?.ip();
            let w = ctx.snapshot.workload_at(ip)?;
            Some((w.uid.clone(), w.peer_labels.clone()))
        }
        Discovery::Baggage => {
            let b = parts.headers.get("baggage")?.to_str().ok()?;
            Some((b.to_owned(), Arc::new(peer_from_baggage(b)?)))
        }
        Discovery::UpstreamFilterState(_) => None,
    })
}

/// A peer from Istio's `baggage` (`k8s.namespace.name=…,k8s.deployment.name=…,service.name=…`).
fn peer_from_baggage(baggage: &str) -> Option<crate::telemetry::istio::PeerLabels> {
    let mut p = crate::telemetry::istio::PeerLabels::default();
    let mut any = false;
    for entry in baggage.split(',') {
        let Some((k, v)) = entry.split(';').next().and_then(|kv| kv.split_once('=')) else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim().to_owned());
        match k {
            "k8s.cluster.name" => p.cluster = v,
            "k8s.namespace.name" => p.namespace = v,
            "service.name" => {
                p.canonical_service = v.clone();
                p.app = v;
            }
            "service.version" => {
                p.canonical_revision = v.clone();
                p.version = v;
            }
            k if k.starts_with("k8s.") && k.ends_with(".name") => p.workload = v,
            _ => continue,
        }
        any = true;
    }
    any.then_some(p)
}

/// One request on a hyper connection; observed when the HCM runs `istio.stats` (Istio's
/// metrics) or has access logs. The request head is copied only for access logs.
async fn handle(
    dp: Arc<DataPlane>,
    ctx: Arc<ConnContext>,
    hcm: Arc<HttpConnectionManager>,
    req: Request<Incoming>,
    hcm_stats: &Arc<HcmStats>,
) -> Response<Body> {
    // Read once: local replies and metrics both ask.
    let grpc = stream_info::is_grpc(req.headers());
    let stats = stream_info::stats_filters(&hcm);
    let logs = !hcm.access_log.is_empty();
    if stats.is_none() && !logs {
        return respond(dp, ctx, hcm, req, hcm_stats, None, grpc).await;
    }
    let labels =
        stats.map(|(s, upstream_wds)| stream_info::StreamLabels::new(s, upstream_wds, &ctx));
    // Metric dimensions over the request (`request.headers['x']`, `request.host`, …) need the
    // request head kept, as access logs do.
    let dims_read_request = labels.as_ref().is_some_and(|l| l.plan.reads_request());
    let dims = labels
        .as_ref()
        .is_some_and(|l| !l.plan.dimensions.is_empty());
    let info = stream_info::StreamInfo::new(stream_info::Observe {
        details: logs || dims,
        request_headers: logs || dims_read_request,
        grpc_messages: labels.is_some() && grpc,
    });
    // istio_stats reports a gRPC stream's message counts while it runs, not only at its end.
    stream_info::report_messages_periodically(&info, &ctx, labels.as_ref(), &dp.server.stats);
    if req.body().is_end_stream() {
        info.request_done();
    }
    // Request line (`METHOD target HTTP/1.1\r\n`) and headers.
    let request_header_bytes = stream_info::header_bytes(req.headers())
        + (req.method().as_str().len()
            + req.uri().path_and_query().map_or(1, |p| p.as_str().len())
            + 12) as u64;
    let access_log = logs.then(|| hcm.clone());
    let resp = respond(
        dp.clone(),
        ctx.clone(),
        hcm,
        req,
        hcm_stats,
        Some(&info),
        grpc,
    )
    .await;
    stream_info::ObservedBody::wrap(
        resp,
        stream_info::Reporter {
            info,
            ctx,
            stats: dp.server.stats.clone(),
            labels,
            grpc,
            request_header_bytes,
            access_log,
        },
    )
}

/// Routes one request and produces its response; a local reply to a gRPC request (`grpc`) is
/// shaped as gRPC (see [`grpc_local_reply`]).
async fn respond(
    dp: Arc<DataPlane>,
    ctx: Arc<ConnContext>,
    hcm: Arc<HttpConnectionManager>,
    req: Request<Incoming>,
    stats: &Arc<HcmStats>,
    info: Option<&Arc<stream_info::StreamInfo>>,
    grpc: bool,
) -> Response<Body> {
    let resp = route_and_forward(dp, ctx, hcm, req, stats, info).await;
    if grpc { grpc_local_reply(resp) } else { resp }
}

/// Routes one request and produces its response.
async fn route_and_forward(
    dp: Arc<DataPlane>,
    ctx: Arc<ConnContext>,
    hcm: Arc<HttpConnectionManager>,
    req: Request<Incoming>,
    stats: &Arc<HcmStats>,
    info: Option<&Arc<stream_info::StreamInfo>>,
) -> Response<Body> {
    // An observed stream read the clock as it started: one read per request is enough.
    let started = info.map_or_else(Instant::now, |i| i.started);
    let (mut parts, body) = req.into_parts();
    // A local reply, with its reason recorded for access logs.
    let local = |e: &ProxyError| {
        if let Some(i) = info {
            i.local_reply(e);
        }
        local_reply(&hcm, e)
    };
    let rds = routes_snapshot(&dp, &hcm);
    let current: &Snapshot = rds.as_deref().unwrap_or(&ctx.snapshot);
    let internal_only = route_config(&hcm, current)
        .map(|rc| rc.internal_only_headers.as_slice())
        .unwrap_or(&[]);
    let prepared = router::prepare_downstream(&hcm, &ctx, internal_only, &mut parts);
    if let Some(i) = info {
        i.capture_request(&parts);
    }
    if let Err(e) = prepared {
        return local(&e);
    }
    let rc = route_config(&hcm, current);
    let selected = rc.and_then(|rc| {
        let view = route_select::RequestView::from_parts(&parts);
        route_select::select(rc, &view, rand::random()).map(|(vh, r)| (rc, vh, r))
    });
    if let (Some(i), Some((_, _, r))) = (info, selected) {
        i.note(|d| d.route_name = Some(r.name.clone()));
        // The route's cluster is the stream's from here on (Envoy sets the upstream cluster info
        // when the route is resolved): metrics of a request a filter answers (fault abort, RBAC
        // denial) still name the destination service.
        if let Action::Forward(fwd) = &r.action
            && let ClusterTarget::Name(n) = &fwd.target
            && let Some(c) = current.clusters.get(n)
        {
            i.upstream.set_cluster(c);
        }
    }
    let mut filtered = Filtered::default();
    let (state, fault, selected) = match request_filters(
        &dp,
        &hcm,
        &ctx,
        current,
        &mut parts,
        selected,
        &mut filtered,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => return local(&e),
    };
    if let Some(i) = info {
        i.note(|d| d.filter_state = Some(state.clone()));
    }
    let Some((rc, vh, route)) = selected else {
        // A filter that answered (rate limit) needs no route.
        if let Some(stop) = filtered.stop.take() {
            return filtered.stopped(stop, info);
        }
        return local(&ProxyError::NoRoute);
    };
    let mut timers = StreamTimers::arm(&hcm, route, &mut parts, false, stats);
    // Fault injection (after RBAC, before the router, as istiod orders the filters).
    let mut delayed = false;
    if let Some(f) = fault {
        let cluster = match &route.action {
            Action::Forward(fwd) => match &fwd.target {
                ClusterTarget::Name(n) => Some(n.as_str()),
                _ => None,
            },
            _ => None,
        };
        let d = fault::decide(f, &parts.headers, cluster, (rand::random(), rand::random()));
        if (d.delay.is_some() || d.abort.is_some())
            && let Some(_slot) = fault::Active::acquire(f.max_active_faults)
        {
            if let Some(delay) = d.delay {
                if let Err(e) = timers.run(tokio::time::sleep(delay)).await {
                    return local(&e);
                }
                delayed = true;
            }
            if let Some(a) = &d.abort {
                if let Some(i) = info {
                    i.responded("fault_filter_abort");
                }
                return fault::abort_response(a, delayed);
            }
        }
    }
    // A filter's own reply comes after the fault (istiod places fault before CORS).
    if let Some(stop) = filtered.stop.take() {
        return filtered.stopped(stop, info);
    }
    if let (Some(i), Action::DirectResponse(_) | Action::Redirect(_)) = (info, &route.action) {
        i.responded("direct_response");
    }
    let mut resp = match &route.action {
        Action::DirectResponse(d) => {
            let mut r = Response::new(full(d.body.clone().unwrap_or_default()));
            *r.status_mut() = StatusCode::from_u16(d.status).unwrap_or(StatusCode::OK);
            r
        }
        Action::Redirect(rd) => router::redirect_response(rd, &parts, &route.matcher),
        Action::Forward(fwd) => {
            let call = router::Call {
                dp: &dp,
                ctx: &ctx,
                hcm: &hcm,
                rc,
                vh,
                route,
                fwd,
                state,
                started,
            };
            let body = body.map_err(|e| Box::new(e) as super::BoxError).boxed();
            let body = match info {
                Some(i) => {
                    parts.extensions.insert(i.clone());
                    stream_info::count_request_body(body, i)
                }
                None => body,
            };
            let upgrade = router::upgrade_of(&parts, &hcm, fwd).is_some();
            let body = timers.observe(body, &mut parts, upgrade);
            // Boxed: the router's future is large, and passing it by value through the timers'
            // `select!` copied it several times per request.
            let forwarded = timers
                .run(Box::pin(router::forward(call, parts, body)))
                .await
                .unwrap_or_else(Err);
            let mut resp = match forwarded {
                Ok(r) => {
                    if let Some(i) = info {
                        i.responded(stream_info::VIA_UPSTREAM);
                    }
                    r
                }
                Err(e) => {
                    tracing::debug!(target: "http", flag = %e.flag(), "local reply: {e}");
                    local(&e)
                }
            };
            if delayed {
                crate::flags::ResponseFlags::add_to(
                    &mut resp,
                    crate::flags::ResponseFlag::DelayInjected,
                );
            }
            resp
        }
    };
    filtered.encode(&mut resp);
    timers.guard(resp, info)
}

/// `connect_terminate`: every CONNECT stream of an HBONE connection.
struct ConnectTerminate {
    dp: Arc<DataPlane>,
    ctx: Arc<ConnContext>,
    hcm: Arc<HttpConnectionManager>,
    stats: Arc<HcmStats>,
}

impl ConnectHandler for ConnectTerminate {
    fn connect(&self, req: ConnectRequest) -> Pin<Box<dyn Future<Output = Decision> + Send>> {
        let (dp, ctx, hcm) = (self.dp.clone(), self.ctx.clone(), self.hcm.clone());
        let stats = self.stats.clone();
        Box::pin(async move {
            stats.rq_total.inc();
            let decision = match connect_stream(&dp, &ctx, &hcm, &stats, req).await {
                Ok(io) => Decision::Tunnel(io),
                Err(e) => {
                    tracing::debug!(target: "http", flag = %e.flag(), "CONNECT refused: {e}");
                    Decision::Refuse(e.status(), e.flag().short())
                }
            };
            let code = match &decision {
                Decision::Tunnel(_) => 200,
                Decision::Refuse(status, _) => status.as_u16(),
            };
            stats.codes.record(&dp.server.stats, code);
            decision
        })
    }

    fn event(&self, event: ConnEvent) {
        match event {
            ConnEvent::IdleTimeout => self.stats.cx_idle_timeout.inc(),
            ConnEvent::MaxDuration => self.stats.cx_max_duration_reached.inc(),
            ConnEvent::MaxRequests => self.stats.cx_max_requests_reached.inc(),
            ConnEvent::KeepaliveTimeout => {}
        }
    }
}

/// Holds one count in `downstream_rq_active` while a request is handled (a guard, so a request
/// the client abandons does not stay counted).
struct ActiveRequest(Arc<crate::stats::Stat>);

impl ActiveRequest {
    fn new(gauge: &Arc<crate::stats::Stat>) -> Self {
        gauge.add(1);
        ActiveRequest(gauge.clone())
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn connect_stream(
    dp: &Arc<DataPlane>,
    ctx: &Arc<ConnContext>,
    hcm: &HttpConnectionManager,
    stats: &Arc<HcmStats>,
    req: ConnectRequest,
) -> Result<BoxIo, ProxyError> {
    let mut builder = Request::builder()
        .method(http::Method::CONNECT)
        .uri(req.authority.as_str())
        .version(http::Version::HTTP_2);
    if let Some(h) = builder.headers_mut() {
        *h = req.headers;
    }
    let (mut parts, ()) = builder
        .body(())
        .map_err(|e| ProxyError::BadRequest(format!("CONNECT {}: {e}", req.authority)))?
        .into_parts();
    let rds = routes_snapshot(dp, hcm);
    let current: &Snapshot = rds.as_deref().unwrap_or(&ctx.snapshot);
    let rc = route_config(hcm, current).ok_or(ProxyError::NoRoute)?;
    let view = route_select::RequestView::from_parts(&parts);
    let selected = route_select::select(rc, &view, rand::random()).map(|(vh, r)| (rc, vh, r));
    // CONNECT termination: faults do not apply to tunnels (istiod configures none there).
    let mut filtered = Filtered::default();
    let (state, _, selected) =
        request_filters(dp, hcm, ctx, current, &mut parts, selected, &mut filtered).await?;
    if let Some(stop) = filtered.stop {
        return Err(stop.into_error());
    }
    let (_, _, route) = selected.ok_or(ProxyError::NoRoute)?;
    let Action::Forward(fwd) = &route.action else {
        return Err(ProxyError::Unsupported(
            "CONNECT routed to a redirect or direct response".into(),
        ));
    };
    let connect_upgrade = fwd
        .upgrades
        .iter()
        .find(|u| u.upgrade_type.eq_ignore_ascii_case("CONNECT"));
    let hcm_allows = hcm
        .upgrades
        .iter()
        .any(|u| u.upgrade_type.eq_ignore_ascii_case("CONNECT") && u.enabled);
    if !(connect_upgrade.is_some_and(|u| u.enabled) || (connect_upgrade.is_none() && hcm_allows))
        || connect_upgrade.is_some_and(|u| u.connect.is_none())
    {
        return Err(ProxyError::Unsupported(
            "CONNECT without connect_config on the route (proxying CONNECT upstream)".into(),
        ));
    }
    let name = match &fwd.target {
        ClusterTarget::Name(n) => n.clone(),
        _ => {
            return Err(ProxyError::Unsupported(
                "CONNECT to a header-named or weighted cluster".into(),
            ));
        }
    };
    let rt = dp
        .clusters
        .get(dp, &dp.server.config.snapshot(), &name)
        .ok_or_else(|| ProxyError::NoCluster(name.clone()))?;
    let mut shared = ctx.filter_state.shared_with_upstream();
    for (k, o) in state.shared_with_upstream().iter() {
        shared.set(k, o.clone());
    }
    let origin = Origin {
        shared,
        source: Some(ctx.remote.clone()),
    };
    rt.stats.rq_total.inc();
    // The tunnel's stream timers (idle, max duration) run over its bytes.
    let timers = StreamTimers::arm(hcm, route, &mut parts, true, stats);
    router::open_tcp(
        dp,
        &rt,
        &origin,
        ctx,
        fwd.timeout
            .filter(|t| !t.is_zero())
            .or(Some(Duration::from_secs(15))),
        None,
    )
    .await
    .map(|io| timers.guard_tunnel(io))
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::*;

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

    async fn body_text(resp: Response<Body>) -> String {
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[tokio::test]
    async fn grpc_requests_get_local_replies_as_trailers_only_statuses() {
        let cases = [
            (
                ProxyError::NoHealthyUpstream("c".into()),
                14,
                "no healthy upstream",
            ),
            (ProxyError::NoRoute, 12, ""),
            (
                ProxyError::StreamTimeout {
                    kind: super::super::timeout::Expired::StreamDuration,
                    request_complete: true,
                },
                4,
                "downstream duration timeout",
            ),
        ];
        for (e, code, message) in cases {
            let plain = local_reply(&hcm(), &e);
            let status = plain.status();
            let r = grpc_local_reply(plain);
            assert_eq!(r.status(), StatusCode::OK, "{e}: was {status}");
            assert_eq!(r.headers()[header::CONTENT_TYPE], "application/grpc");
            assert_eq!(r.headers()[&GRPC_STATUS], code.to_string().as_str(), "{e}");
            let sent = r
                .headers()
                .get(&GRPC_MESSAGE)
                .map(|v| v.to_str().expect("ascii"));
            if message.is_empty() {
                assert!(sent.is_none_or(|m| !m.is_empty()), "{e}");
            } else {
                assert_eq!(sent, Some(message), "{e}");
            }
            assert!(
                r.extensions()
                    .get::<crate::flags::ResponseFlags>()
                    .is_some()
            );
            assert_eq!(body_text(r).await, "", "{e}: trailers-only has no body");
        }
    }

    #[tokio::test]
    async fn upstream_and_grpc_shaped_replies_pass_unchanged() {
        let mut upstream = Response::new(full("x"));
        *upstream.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let r = grpc_local_reply(upstream);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body_text(r).await, "x");

        let mut fault = local_reply(&hcm(), &ProxyError::NoRoute);
        fault
            .headers_mut()
            .insert(GRPC_STATUS, header::HeaderValue::from_static("8"));
        let r = grpc_local_reply(fault);
        assert_eq!(r.headers()[&GRPC_STATUS], "8");
    }

    #[test]
    fn http_statuses_map_as_the_grpc_spec_says() {
        for (http, grpc) in [
            (400, 13),
            (401, 16),
            (403, 7),
            (404, 12),
            (429, 14),
            (502, 14),
            (503, 14),
            (504, 14),
            (500, 2),
            (408, 2),
        ] {
            let s = StatusCode::from_u16(http).expect("status");
            assert_eq!(grpc_status_of(s), grpc, "{http}");
        }
        assert_eq!(grpc_percent_encode("50% ü\n"), "50%25 %C3%BC%0A");
    }
}
