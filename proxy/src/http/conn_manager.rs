//! The HTTP connection manager on one downstream connection.
//!
//! Two codecs: an HCM that allows CONNECT on HTTP/2 (istiod's `connect_terminate`) runs on the
//! HBONE server (h2 crate, explicit stream/reset limits), and each CONNECT goes through the HTTP
//! filters and routes like any request — the route's `connect_matcher` → cluster `main_internal`
//! with `connect_config` terminates the CONNECT and joins the tunnel to an in-process connection.
//! Every other HCM runs on hyper (HTTP/1.1 and h2c by prior knowledge for codec AUTO), with the
//! header limits turned into 431s and HTTP/2 reset budgets set.

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

use super::{Body, fault, full, route_select, router, stream_info};
use crate::{
    config::filters::set_filter_state::Sharing,
    config::{
        RouteConfig,
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
        server::{ConnInfo, ConnectHandler, ConnectRequest, Decision, serve_connection},
    },
    listener::conn::{
        BoxIo, ConnContext, ConnValues, FilterState, StateObject, apply_set_filter_state,
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

/// Serves HTTP on `io` until it closes or the server drains.
pub async fn serve(
    dp: Arc<DataPlane>,
    ctx: Arc<ConnContext>,
    hcm: Arc<HttpConnectionManager>,
    io: BoxIo,
) {
    let drain = dp.server.drain.subscribe();
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
        let handler = Arc::new(ConnectTerminate {
            dp,
            ctx,
            hcm,
            stats,
        });
        if let Err(e) = serve_connection(io, info, &settings, handler, drain).await {
            tracing::debug!(target: "http", "CONNECT connection ended: {e}");
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
        if let Some(t) = hcm.request_headers_timeout.filter(|t| !t.is_zero()) {
            h1.header_read_timeout(t);
        }
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
    let service = hyper::service::service_fn(move |req| {
        let (dp, ctx, hcm, stats) = (dp.clone(), ctx.clone(), hcm.clone(), stats.clone());
        async move {
            stats.rq_total.inc();
            let active = ActiveRequest::new(&stats.rq_active);
            let resp = handle(dp.clone(), ctx, hcm, req).await;
            stats.codes.record(&dp.server.stats, resp.status().as_u16());
            drop(active);
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut drain = drain;
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(target: "http", "connection ended: {e}");
            }
        }
        _ = async { drop(drain.wait_for(|d| *d).await) } => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
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

/// The route table for a request.
fn route_config<'a>(
    hcm: &'a HttpConnectionManager,
    ctx: &'a ConnContext,
) -> Option<&'a RouteConfig> {
    match &hcm.routes {
        Routes::Inline(rc) => Some(rc),
        Routes::Rds { name, .. } => ctx.snapshot.routes.get(name).map(|r| r.as_ref()),
    }
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
    // Envoy's router marks a reply of an open circuit breaker (UO) for the client.
    if let ProxyError::Overflow(_) = e {
        r.headers_mut().insert(
            "x-envoy-overloaded",
            header::HeaderValue::from_static("true"),
        );
    }
    r.extensions_mut().insert(e.response_flags());
    r
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

/// Evaluates one RBAC filter for a request.
fn rbac_check(
    rules: &HttpRbac,
    filter: &str,
    ctx: &ConnContext,
    parts: &http::request::Parts,
    state: &FilterState,
) -> Result<(), ProxyError> {
    let fs = |k: &str| -> Option<&str> { state.get(k).or_else(|| ctx.filter_state.get(k)) };
    let md =
        |ns: &str, path: &[String]| -> Option<&serde_json::Value> { ctx.metadata_value(ns, path) };
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

/// Whether a request carries a JWT where jwt_authn looks by default (`Authorization: Bearer`,
/// `access_token` query parameter).
fn carries_jwt(parts: &http::request::Parts) -> bool {
    let bearer = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer "));
    let query = parts
        .uri
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv.starts_with("access_token=")));
    bearer || query
}

/// Runs the request-phase HTTP filters in their configured order and returns the stream's filter
/// state: `set_filter_state` writes it, RBAC (with per-route overrides) allows or denies. Filters
/// whose effects belong to later work (stats, grpc_stats, peer metadata, cors, fault) pass the
/// request on; `jwt_authn` refuses requests that carry a token (401) since tokens are not
/// verified yet — a token is never trusted unverified, and requests without one pass as they
/// would in Envoy when no requirement applies.
fn request_filters<'a>(
    hcm: &'a HttpConnectionManager,
    ctx: &ConnContext,
    parts: &http::request::Parts,
    matched: Option<Matched<'a>>,
) -> Result<(FilterState, Option<&'a Fault>), ProxyError> {
    let mut state = FilterState::default();
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
                    rbac_check(rules, &f.name, ctx, parts, &state)?;
                }
            }
            HttpFilterKind::Fault(f) => {
                fault = match route_config {
                    Some(PerFilterConfig::Fault(over)) => Some(over.as_ref()),
                    _ => Some(f.as_ref()),
                };
            }
            HttpFilterKind::JwtAuthn(_) if carries_jwt(parts) => {
                return Err(ProxyError::Unauthorized(format!(
                    "filter '{}': JWT verification is not implemented; a presented token is refused",
                    f.name
                )));
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
            HttpFilterKind::Router(_) => break,
            _ => {}
        }
    }
    Ok((state, fault))
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
) -> Response<Body> {
    let stats = stream_info::stats_filters(&hcm);
    let logs = !hcm.access_log.is_empty();
    if stats.is_none() && !logs {
        return respond(dp, ctx, hcm, req, None).await;
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
        grpc_messages: labels.is_some() && stream_info::is_grpc(req.headers()),
    });
    if req.body().is_end_stream() {
        info.request_done();
    }
    let grpc = stream_info::is_grpc(req.headers());
    // Request line (`METHOD target HTTP/1.1\r\n`) and headers.
    let request_header_bytes = stream_info::header_bytes(req.headers())
        + (req.method().as_str().len()
            + req.uri().path_and_query().map_or(1, |p| p.as_str().len())
            + 12) as u64;
    let access_log = logs.then(|| hcm.clone());
    let resp = respond(dp.clone(), ctx.clone(), hcm, req, Some(&info)).await;
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

/// Routes one request and produces its response.
async fn respond(
    dp: Arc<DataPlane>,
    ctx: Arc<ConnContext>,
    hcm: Arc<HttpConnectionManager>,
    req: Request<Incoming>,
    info: Option<&Arc<stream_info::StreamInfo>>,
) -> Response<Body> {
    let started = Instant::now();
    let (mut parts, body) = req.into_parts();
    // A local reply, with its reason recorded for access logs.
    let local = |e: &ProxyError| {
        if let Some(i) = info {
            i.local_reply(e);
        }
        local_reply(&hcm, e)
    };
    let internal_only = route_config(&hcm, &ctx)
        .map(|rc| rc.internal_only_headers.as_slice())
        .unwrap_or(&[]);
    let prepared = router::prepare_downstream(&hcm, &ctx, internal_only, &mut parts);
    if let Some(i) = info {
        i.capture_request(&parts);
    }
    if let Err(e) = prepared {
        return local(&e);
    }
    let rc = route_config(&hcm, &ctx);
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
            && let Some(c) = ctx.snapshot.clusters.get(n)
        {
            i.upstream.set_cluster(c);
        }
    }
    let (state, fault) = match request_filters(&hcm, &ctx, &parts, selected) {
        Ok(s) => s,
        Err(e) => return local(&e),
    };
    if let Some(i) = info {
        i.note(|d| d.filter_state = Some(state.clone()));
    }
    let Some((rc, vh, route)) = selected else {
        return local(&ProxyError::NoRoute);
    };
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
                tokio::time::sleep(delay).await;
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
    if let (Some(i), Action::DirectResponse(_) | Action::Redirect(_)) = (info, &route.action) {
        i.responded("direct_response");
    }
    match &route.action {
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
            let forwarded = router::forward(call, parts, body).await;
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
    }
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
            let decision = match connect_stream(&dp, &ctx, &hcm, req).await {
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
    req: ConnectRequest,
) -> Result<BoxIo, ProxyError> {
    let mut builder = Request::builder()
        .method(http::Method::CONNECT)
        .uri(req.authority.as_str())
        .version(http::Version::HTTP_2);
    if let Some(h) = builder.headers_mut() {
        *h = req.headers;
    }
    let (parts, ()) = builder
        .body(())
        .map_err(|e| ProxyError::BadRequest(format!("CONNECT {}: {e}", req.authority)))?
        .into_parts();
    let rc = route_config(hcm, ctx).ok_or(ProxyError::NoRoute)?;
    let view = route_select::RequestView::from_parts(&parts);
    let selected = route_select::select(rc, &view, rand::random()).map(|(vh, r)| (rc, vh, r));
    // CONNECT termination: faults do not apply to tunnels (istiod configures none there).
    let (state, _) = request_filters(hcm, ctx, &parts, selected)?;
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
        .get(dp, &ctx.snapshot, &name)
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
}
