//! The router: a routed request goes to a cluster — pick the cluster (name, header, weights), apply
//! the header operations and rewrites, pick a host, send on a pooled connection with the route
//! timeout, and shape the response (header operations, `server`, `x-envoy-upstream-service-time`);
//! WebSocket upgrades are joined end to end after the upstream's 101.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use http::{
    HeaderName, HeaderValue, Request, Response, Uri, header,
    request::Parts,
    uri::{Authority, PathAndQuery},
};

use super::{
    Body, request, retry,
    timeout::{self, Activity, Expired, TimedBody, Watch},
};
use crate::{
    config::{
        RouteConfig,
        cluster::{Discovery, LbPolicy},
        endpoint::EndpointAddress,
        filters::hcm::HttpConnectionManager,
        headers::HeaderMutations,
        matchers::RegexRewrite,
        route::{
            ClusterRef, ClusterTarget, Forward, HashKind, HashPolicy, Redirect, Route, RouteMatch,
            VirtualHost,
        },
    },
    dataplane::DataPlane,
    flags::{ProxyError, ResponseFlag, ResponseFlags},
    listener::conn::{BoxIo, ConnContext, ConnValues, FilterState},
    upstream::{
        cluster_manager::{ClusterRt, original_destination},
        connect::{Origin, connect},
        lb::{Host, PickContext},
        pool::{Dial, Proto, SendError},
        retry_priority::PreviousPriorities,
    },
};

/// Envoy's route timeout when the route sets none.
pub const DEFAULT_ROUTE_TIMEOUT: std::time::Duration = timeout::DEFAULT_ROUTE_TIMEOUT;

/// Everything a routed request carries into the router.
pub struct Call<'a> {
    /// The data plane.
    pub dp: &'a Arc<DataPlane>,
    /// The downstream connection.
    pub ctx: &'a Arc<ConnContext>,
    /// The HCM.
    pub hcm: &'a HttpConnectionManager,
    /// The route table.
    pub rc: &'a RouteConfig,
    /// The virtual host.
    pub vh: &'a VirtualHost,
    /// The route.
    pub route: &'a Route,
    /// Its forward action.
    pub fwd: &'a Forward,
    /// Stream filter state.
    pub state: FilterState,
    /// When the request arrived.
    pub started: Instant,
}

/// Headers the proxy typically adds to a request on its way upstream.
const REQUEST_HEADERS_ADDED: usize = 6;

/// Normalizes and annotates a downstream request before routing (path normalization,
/// `x-forwarded-*`, `x-request-id`). A path that cannot be normalized is a 400.
pub fn prepare_downstream(
    hcm: &HttpConnectionManager,
    ctx: &ConnContext,
    internal_only: &[String],
    parts: &mut Parts,
) -> Result<(), ProxyError> {
    // The proxy adds a few headers to every request (x-forwarded-proto, x-request-id,
    // x-envoy-expected-rq-timeout-ms, ...); a map parsed to fit the client's headers would grow
    // (and rehash) on the first of them and maybe again: one growth here instead.
    let _ = parts.headers.try_reserve(REQUEST_HEADERS_ADDED);
    if parts.method != http::Method::CONNECT
        && let Some(pq) = parts.uri.path_and_query()
    {
        let normalized = request::normalize_path(
            pq.as_str(),
            hcm.normalize_path,
            hcm.merge_slashes,
            hcm.escaped_slashes,
        )
        .map_err(|e| match e {
            request::PathError::Redirect(location) => ProxyError::Redirect(location),
            other => ProxyError::BadRequest(format!("path: {other}")),
        })?;
        if let std::borrow::Cow::Owned(normalized) = normalized
            && normalized != pq.as_str()
        {
            let path_and_query = normalized
                .parse()
                .map_err(|e| ProxyError::BadRequest(format!("path: {e}")))?;
            let mut p = std::mem::take(&mut parts.uri).into_parts();
            p.path_and_query = Some(path_and_query);
            parts.uri = Uri::from_parts(p).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
        }
    }
    let remote_ip = ctx.remote.socket().map(|s| s.ip());
    let client = request::apply_xff(
        &mut parts.headers,
        remote_ip,
        hcm.use_remote_address,
        hcm.skip_xff_append,
        hcm.xff_num_trusted_hops,
    );
    request::set_forwarded_proto(
        &mut parts.headers,
        ctx.tls.is_some(),
        hcm.use_remote_address,
    );
    request::apply_internal_status(&mut parts.headers, &client, internal_only);
    request::ensure_request_id(
        &mut parts.headers,
        hcm.generate_request_id,
        hcm.preserve_external_request_id,
        !client.edge,
    );
    Ok(())
}

/// A redirect reply.
pub fn redirect_response(rd: &Redirect, parts: &Parts, matcher: &RouteMatch) -> Response<Body> {
    let scheme = parts.uri.scheme_str().unwrap_or("http");
    let host = authority(parts).unwrap_or_default();
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let (status, location) = request::redirect_location(rd, scheme, &host, pq, matcher);
    let mut r = Response::new(super::empty());
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// The URI of the upstream request: origin-form for HTTP/1.1, `http://host/path` for HTTP/2, with
/// the route's rewritten path if it has one. The received path and authority are reused (shared,
/// not copied or re-validated) when they are the ones sent.
fn upstream_uri(
    proto: Proto,
    received: &Uri,
    host: &str,
    rewritten_pq: Option<&str>,
) -> Result<Uri, http::Error> {
    let pq = match rewritten_pq {
        Some(p) => PathAndQuery::try_from(p)?,
        None => received
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    };
    Ok(match proto {
        Proto::Http1 => Uri::from(pq),
        Proto::Http2 => {
            let authority = match received.authority() {
                Some(a) if a.as_str() == host => a.clone(),
                _ => Authority::try_from(host)?,
            };
            Uri::builder()
                .scheme(http::uri::Scheme::HTTP)
                .authority(authority)
                .path_and_query(pq)
                .build()?
        }
    })
}

/// `:authority` or `Host`.
pub fn authority(parts: &Parts) -> Option<String> {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
}

fn cluster_name(
    target: &ClusterTarget,
    parts: &Parts,
) -> Result<(String, Option<usize>), ProxyError> {
    let by_header = |h: &str| {
        parts
            .headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| ProxyError::NoCluster(format!("header {h} absent")))
    };
    match target {
        ClusterTarget::Name(n) => Ok((n.clone(), None)),
        ClusterTarget::Header(h) => Ok((by_header(h)?, None)),
        ClusterTarget::Weighted {
            clusters,
            header_name,
            ..
        } => {
            let random = header_name
                .as_ref()
                .and_then(|h| parts.headers.get(h))
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(rand::random);
            let i = super::route_select::weighted_index(clusters, random)
                .ok_or_else(|| ProxyError::NoCluster("no weighted cluster".into()))?;
            let name = match &clusters[i].cluster {
                ClusterRef::Name(n) => n.clone(),
                ClusterRef::Header(h) => by_header(h)?,
            };
            Ok((name, Some(i)))
        }
    }
}

/// The WebSocket (or other) upgrade a request asks for and the config allows.
pub(super) fn upgrade_of(
    parts: &Parts,
    hcm: &HttpConnectionManager,
    fwd: &Forward,
) -> Option<String> {
    let conn_upgrade = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        });
    if !conn_upgrade {
        return None;
    }
    let kind = parts
        .headers
        .get(header::UPGRADE)?
        .to_str()
        .ok()?
        .to_owned();
    let on_route = fwd
        .upgrades
        .iter()
        .find(|u| u.upgrade_type.eq_ignore_ascii_case(&kind));
    let on_hcm = hcm
        .upgrades
        .iter()
        .find(|u| u.upgrade_type.eq_ignore_ascii_case(&kind));
    let enabled = match (on_route, on_hcm) {
        (Some(r), Some(_)) => r.enabled,
        (None, Some(h)) => h.enabled,
        _ => false,
    };
    enabled.then_some(kind)
}

/// Where a request goes: (address, host metadata, pool key, LB guard).
pub(super) struct Target {
    address: EndpointAddress,
    metadata: Arc<BTreeMap<String, serde_json::Value>>,
    pub(super) key: Arc<str>,
    pub(super) host: Option<Arc<Host>>,
    guard: Option<crate::upstream::lb::RequestGuard>,
}

/// What a retried request is rebuilt from.
struct Template {
    method: http::Method,
    uri: Uri,
    version: http::Version,
    headers: http::HeaderMap,
}

impl Template {
    fn rebuild(&self, body: Body) -> Request<Body> {
        let mut r = Request::new(body);
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        r
    }
}

/// Opens connections for a pool to `target`.
pub(super) fn dialer(
    dp: &Arc<DataPlane>,
    rt: &ClusterRt,
    target: &Target,
    origin: &Origin,
) -> impl FnOnce() -> Dial<'static> + use<> {
    let (dp, cluster, address, metadata, origin) = (
        dp.clone(),
        rt.cluster.clone(),
        target.address.clone(),
        target.metadata.clone(),
        origin.clone(),
    );
    let stats = rt.stats.clone();
    move || -> Dial<'static> {
        Box::pin(async move {
            let r = connect(&dp, &cluster, &address, &metadata, &origin).await;
            if r.is_err() {
                stats.cx_connect_fail.inc();
            }
            r
        })
    }
}

/// One request to `target` outside a route's retry loop (a mirror copy, a JWKS fetch), counted
/// and reported as a routed attempt is: `upstream_rq_total`, the cluster's pool and breakers,
/// outlier detection, the response-code stats. The guard keeps `upstream_rq_active` up while the
/// caller reads the response.
pub(super) async fn send_single(
    dp: &Arc<DataPlane>,
    rt: &ClusterRt,
    target: &Target,
    origin: &Origin,
    (proto, request): (Proto, Request<Body>),
) -> Result<(Response<Body>, ActiveGuard), ProxyError> {
    rt.stats.rq_total.inc();
    let pool = rt.pool(&target.key, proto, origin.shared.sharing_hash(), false)?;
    let dial = dialer(dp, rt, target, origin);
    let limits = rt.limits(false);
    let active = ActiveGuard::new(&rt.stats.rq_active);
    let outcome = pool.send(request, dial, false, &limits).await;
    record_outcome(dp, rt, target, &outcome);
    Ok((outcome.map_err(|e| e.error)?, active))
}

/// An attempt's outcome for outlier detection and, for a response, the response-code stats.
fn record_outcome(
    dp: &DataPlane,
    rt: &ClusterRt,
    target: &Target,
    outcome: &Result<Response<Body>, SendError>,
) {
    rt.report_attempt(
        target.host.as_deref(),
        outcome
            .as_ref()
            .map(|r| r.status().as_u16())
            .map_err(|e| &e.error),
    );
    if let Ok(r) = outcome {
        rt.stats.codes.record(&dp.server.stats, r.status().as_u16());
    }
}

/// `x-envoy-original-dst-host` (names parsed once: a `&str` key is parsed on every lookup).
pub(super) const ORIGINAL_DST_HOST: HeaderName =
    HeaderName::from_static("x-envoy-original-dst-host");
/// `x-envoy-attempt-count`.
const ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");
/// `x-envoy-upstream-service-time`.
const UPSTREAM_SERVICE_TIME: HeaderName = HeaderName::from_static("x-envoy-upstream-service-time");

/// Picks where a request goes, avoiding the hosts of `exclude` while others are available.
pub(super) fn pick_target(
    rt: &ClusterRt,
    ctx: &ConnContext,
    header_dst: Option<&str>,
    exclude: &[Arc<Host>],
    hash: Option<u64>,
) -> Result<Target, ProxyError> {
    pick_retry_target(rt, ctx, header_dst, exclude, &[], hash)
}

/// Like [`pick_target`], for a retry whose retry priority leaves `skip_priorities` out.
fn pick_retry_target(
    rt: &ClusterRt,
    ctx: &ConnContext,
    header_dst: Option<&str>,
    exclude: &[Arc<Host>],
    skip_priorities: &[u32],
    hash: Option<u64>,
) -> Result<Target, ProxyError> {
    match &rt.cluster.discovery {
        Discovery::OriginalDst(cfg) => {
            let a = original_destination(cfg, ctx, header_dst).ok_or_else(|| {
                ProxyError::NoHealthyUpstream(format!(
                    "{}: no original destination",
                    rt.cluster.name
                ))
            })?;
            Ok(Target {
                address: EndpointAddress::Socket(a),
                metadata: Arc::default(),
                key: a.to_string().into(),
                host: None,
                guard: None,
            })
        }
        _ => {
            let host = rt
                .hosts
                .pick_for_retry(
                    &PickContext {
                        hash,
                        exclude,
                        random: rand::random(),
                    },
                    skip_priorities,
                )
                .ok_or_else(|| {
                    rt.stats.none_healthy.inc();
                    ProxyError::NoHealthyUpstream(rt.cluster.name.clone())
                })?;
            Ok(Target {
                address: host.address.clone(),
                metadata: host.metadata.clone(),
                key: host.key.clone(),
                guard: Some(host.start_request()),
                host: Some(host),
            })
        }
    }
}

/// What the route's hash policies give one request: the hash for a ring hash / Maglev cluster,
/// and the cookies a cookie policy made up, which the response sets.
#[derive(Debug, Default)]
struct RequestHash {
    hash: Option<u64>,
    set_cookies: Vec<HeaderValue>,
}

/// Envoy's `HashPolicyImpl::generateHash`: each policy that yields a value adds its xxHash64,
/// combined by rotate-left-1 and xor; after a `terminal` policy, a hash so far ends the walk.
/// Envoy computes it only when the load balancer asks (ring hash, Maglev), so only then is a
/// cookie generated.
fn request_hash(
    policies: &[HashPolicy],
    parts: &Parts,
    ctx: &ConnContext,
    state: &FilterState,
) -> RequestHash {
    let xxhash = |bytes: &[u8]| crate::upstream::lb::xxhash64(bytes, 0);
    let mut out = RequestHash::default();
    for p in policies {
        let h = match &p.kind {
            HashKind::Header { name, rewrite } => header_hash(parts, name, rewrite.as_ref()),
            HashKind::Cookie(c) => match request_cookie(&parts.headers, &c.name) {
                Some(v) if !v.is_empty() => Some(xxhash(v.as_bytes())),
                _ => c.ttl_seconds.map(|_| {
                    let value = generated_cookie(ctx);
                    out.set_cookies.extend(c.set_cookie(&value));
                    xxhash(value.as_bytes())
                }),
            },
            HashKind::SourceIp => ctx
                .remote
                .socket()
                .map(|s| xxhash(s.ip().to_string().as_bytes())),
            HashKind::QueryParameter(q) => parts.uri.query().and_then(|query| {
                query
                    .split('&')
                    .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
                    .find(|(k, _)| k == q)
                    .map(|(_, v)| xxhash(v.as_bytes()))
            }),
            HashKind::FilterState(k) => state
                .get(k)
                .or_else(|| ctx.filter_state.get(k))
                .map(|v| xxhash(v.as_bytes())),
        };
        if let Some(h) = h {
            out.hash = Some(match out.hash {
                Some(prev) => prev.rotate_left(1) ^ h,
                None => h,
            });
        }
        if p.terminal && out.hash.is_some() {
            break;
        }
    }
    out
}

/// Envoy's `HeaderHashMethod`: every value of the header (rewritten), sorted so their order
/// does not matter, hashed as one byte string.
fn header_hash(parts: &Parts, name: &str, rewrite: Option<&RegexRewrite>) -> Option<u64> {
    let mut values: Vec<String> = match name {
        ":authority" | "host" => authority(parts).into_iter().collect(),
        ":path" => parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .into_iter()
            .collect(),
        ":method" => vec![parts.method.as_str().to_owned()],
        _ => parts
            .headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_owned)
            .collect(),
    };
    if values.is_empty() {
        return None;
    }
    if let Some(r) = rewrite {
        for v in &mut values {
            *v = r.apply(v);
        }
    }
    values.sort_unstable();
    Some(crate::upstream::lb::xxhash64(values.concat().as_bytes(), 0))
}

/// Envoy's `parseCookieValue`: the first cookie `name` of the `cookie` headers, without the
/// double quotes a value may be wrapped in (the generated cookie is set quoted).
fn request_cookie<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim_start_matches(' ').split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| {
            v.strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v)
        })
}

/// The value Envoy's router makes up for a missing hash cookie (`addDownstreamSetCookie`):
/// xxHash64 of the connection's remote then local address, as 16 hex digits. It is the same for
/// every stream of a connection, so concurrent requests on it get the same cookie.
fn generated_cookie(ctx: &ConnContext) -> String {
    let addresses = format!("{}{}", ctx.remote, ctx.local);
    format!(
        "{:016x}",
        crate::upstream::lb::xxhash64(addresses.as_bytes(), 0)
    )
}

/// Opens a byte stream to a host of `rt` (CONNECT termination, tcp_proxy).
pub async fn open_tcp(
    dp: &Arc<DataPlane>,
    rt: &ClusterRt,
    origin: &Origin,
    ctx: &ConnContext,
    timeout: Option<std::time::Duration>,
    upstream: Option<&super::stream_info::UpstreamSlot>,
) -> Result<BoxIo, ProxyError> {
    if let Some(u) = upstream {
        u.set_cluster(&rt.cluster);
    }
    let target = pick_target(rt, ctx, None, &[], None)?;
    if let Some(u) = upstream {
        u.attempt(target.host.as_ref(), &target.address);
    }
    // `max_connections`: held for the connection's life.
    let cx = rt.tcp_connection_slot()?;
    let fut = connect(dp, &rt.cluster, &target.address, &target.metadata, origin);
    let r = match timeout {
        Some(t) => tokio::time::timeout(t, fut)
            .await
            .unwrap_or_else(|_| Err(ProxyError::ConnectFailure("connect timeout".into()))),
        None => fut.await,
    };
    if r.is_err() {
        rt.stats.cx_connect_fail.inc();
    }
    rt.report_connect(target.host.as_deref(), &r);
    r.map(|io| Box::new(crate::upstream::breaker::HoldingIo::new(io, cx)) as BoxIo)
}

/// The header operation levels, most specific first (route, virtual host, route table).
fn layers<'a>(call: &'a Call<'_>, response: bool) -> [&'a HeaderMutations; 3] {
    let pick = |p: &'a crate::config::headers::HeaderPolicy| {
        if response { &p.response } else { &p.request }
    };
    [
        pick(&call.route.headers),
        pick(&call.vh.headers),
        pick(&call.rc.headers),
    ]
}

/// Sends a routed request upstream.
pub async fn forward(
    call: Call<'_>,
    mut parts: Parts,
    body: Body,
) -> Result<Response<Body>, ProxyError> {
    let Call {
        dp, ctx, hcm, fwd, ..
    } = &call;
    // Where the stream's upstream side is recorded (Istio metrics), when someone observes it.
    let info = parts
        .extensions
        .remove::<Arc<super::stream_info::StreamInfo>>();
    let (name, weighted) = cluster_name(&fwd.target, &parts).map_err(|e| match e {
        ProxyError::NoCluster(n) => ProxyError::NoCluster(n),
        other => other,
    })?;
    // Clusters and endpoints are the current ones, not those of the connection's snapshot (as in
    // Envoy, where CDS/EDS updates reach every connection; a long-lived HTTP/2 or gRPC connection
    // must not keep sending to removed endpoints).
    let rt = dp
        .clusters
        .get(dp, &dp.server.config.snapshot(), &name)
        .ok_or_else(|| ProxyError::NoCluster(name.clone()))?;
    if let Some(i) = &info {
        i.upstream.set_cluster(&rt.cluster);
    }
    let weighted = weighted.and_then(|i| match &fwd.target {
        ClusterTarget::Weighted { clusters, .. } => clusters.get(i),
        _ => None,
    });
    let upgrade = upgrade_of(&parts, hcm, fwd);
    let downstream_upgrade = if upgrade.is_some() {
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };
    let downstream_version = parts.version;
    let original_authority = authority(&parts).unwrap_or_default();
    request::strip_hop_by_hop(&mut parts.headers, upgrade.is_some());
    // Header operations and rewrites.
    {
        let values = ConnValues {
            conn: ctx,
            stream_state: Some(&call.state),
            request: None,
        };
        let mut headers = std::mem::take(&mut parts.headers);
        // A weighted cluster's own operations come first (Envoy), then the levels.
        if let Some(w) = weighted {
            request::apply_header_ops(&mut headers, &w.headers.request, &values);
        }
        request::apply_policies(
            &mut headers,
            &layers(&call, false),
            call.rc.most_specific_header_mutations_wins,
            &values,
        );
        parts.headers = headers;
    }
    // Host rewrite first (a path-regex host rewrite reads the original path), then the path.
    let rewritten = if let Some(literal) = weighted.and_then(|w| w.host_rewrite_literal.as_deref())
    {
        request::update_authority(&mut parts, literal, fwd.append_x_forwarded_host);
        true
    } else if let Some(rewrite) = &fwd.host_rewrite {
        request::rewrite_host(&mut parts, rewrite, None, fwd.append_x_forwarded_host);
        true
    } else {
        false
    };
    let host = if rewritten {
        authority(&parts).unwrap_or(original_authority)
    } else {
        original_authority
    };
    let rewritten_pq = request::rewrite_path(
        parts.uri.path_and_query().map_or("/", PathAndQuery::as_str),
        fwd,
        &call.route.matcher,
    );
    let proto = if upgrade.is_some() {
        Proto::Http1
    } else {
        rt.protocol(downstream_version)
    };
    // The upstream request's URI, made before any mirror sees the request: a host or path that
    // cannot form one fails the request, and mirrors get exactly the path the primary sends.
    let uri = upstream_uri(proto, &parts.uri, &host, rewritten_pq.as_deref())
        .map_err(|e| ProxyError::BadRequest(format!("upstream URI: {e}")))?;
    let pq = uri.path_and_query().map_or("/", PathAndQuery::as_str);
    let header_dst = parts
        .headers
        .get(&ORIGINAL_DST_HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // Only ring hash and Maglev ask for the hash (and so only they generate cookies), as in Envoy.
    let hashing = matches!(
        rt.cluster.lb_policy,
        LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. }
    );
    let RequestHash { hash, set_cookies } = if hashing {
        request_hash(&fwd.hash_policy, &parts, ctx, &call.state)
    } else {
        RequestHash::default()
    };
    let target = pick_target(&rt, ctx, header_dst.as_deref(), &[], hash)?;
    let mut shared = ctx.filter_state.shared_with_upstream();
    for (k, o) in call.state.shared_with_upstream().iter() {
        shared.set(k, o.clone());
    }
    let origin = Origin {
        shared,
        source: Some(ctx.remote.clone()),
    };
    // Mirrors copy the request as it leaves; the primary sends the tee (see `mirror`).
    let body = if upgrade.is_none() {
        super::mirror::start_routed(&call, &parts, &host, pq, &origin, body)
    } else {
        body
    };
    // The upstream request.
    parts.uri = uri;
    match proto {
        Proto::Http1 => {
            parts.version = http::Version::HTTP_11;
            // An HTTP/1.1 request usually carries the one Host already.
            let mut hosts = parts.headers.get_all(header::HOST).iter();
            let has_host = hosts
                .next()
                .is_some_and(|v| v.as_bytes() == host.as_bytes())
                && hosts.next().is_none();
            if !has_host && let Ok(v) = HeaderValue::from_str(&host) {
                parts.headers.insert(header::HOST, v);
            }
        }
        Proto::Http2 => {
            parts.version = http::Version::HTTP_2;
            parts.headers.remove(header::HOST);
        }
    }
    if let Some(v) = hcm
        .via
        .as_deref()
        .filter(|v| !v.is_empty())
        .and_then(|v| HeaderValue::from_str(v).ok())
    {
        parts.headers.append(header::VIA, v);
    }
    let retry_config = fwd.retry_policy.as_ref().or(call.vh.retry_policy.as_ref());
    // Envoy keeps retry state for a request when the policy names conditions (`retry_on`) and
    // the request matches `retriable_request_headers`; with `num_retries: 0` a retriable failure
    // is still reported `URX`.
    let policy = retry_config.filter(|p| !p.retry_on.is_empty() && upgrade.is_none());
    // Timeouts (Envoy's `finalTimeout`, which also consumes the `x-envoy-*` timeout headers and
    // sets `x-envoy-expected-rq-timeout-ms`), upgrades included: an upgrade's route timeout
    // covers its handshake (see `attempt_watch`).
    let timeouts = {
        let router_filter = router_config(hcm);
        let grpc = super::stream_info::is_grpc(&parts.headers);
        timeout::route_timeouts(
            &timeout::RouteTimeoutConfig {
                timeout: fwd.timeout,
                new_timeouts: fwd.max_stream_duration.present,
                max_grpc_timeout: fwd.max_grpc_timeout,
                grpc_timeout_offset: fwd.grpc_timeout_offset,
                per_try_timeout: retry_config.and_then(|p| p.per_try_timeout),
                per_try_idle_timeout: retry_config.and_then(|p| p.per_try_idle_timeout),
            },
            &mut parts.headers,
            grpc,
            !router_filter.is_some_and(|r| r.suppress_envoy_headers),
            router_filter.is_some_and(|r| r.respect_expected_rq_timeout),
        )
    };
    // The cluster's `max_stream_duration`: each upstream stream's lifetime, an upgraded one's
    // tunnel included (Envoy's upstream request keeps its duration timer after the 101).
    let upstream_duration = rt
        .cluster
        .http
        .as_ref()
        .and_then(|h| h.common.max_stream_duration)
        .filter(|d| !d.is_zero());
    // The stream's activity: the HCM's when it watches the stream, else ours when a timer needs it.
    let needs_activity =
        timeouts != timeout::RouteTimeouts::default() || upstream_duration.is_some();
    let (activity, body) = match parts.extensions.remove::<Arc<Activity>>() {
        Some(a) => (Some(a), body),
        // An upgrade's request does not end with its (empty) body: what follows the 101 is its
        // payload (Envoy's HTTP/1 codec pauses at the upgrade's headers without ending them).
        None if needs_activity && upgrade.is_some() => (Some(Activity::new()), body),
        None if needs_activity => {
            let a = Activity::new();
            let b = timeout::observe_request(body, &a);
            (Some(a), b)
        }
        None => (None, body),
    };
    let forward_start = tokio::time::Instant::now();
    let retry = policy.filter(|p| {
        retry::request_retriable(p, &super::route_select::RequestView::from_parts(&parts))
    });
    let (body, replay) = if retry.is_some_and(|p| p.num_retries > 0) {
        let (b, r) = retry::ReplayBody::wrap(body);
        (b, Some(r))
    } else {
        (body, None)
    };
    let template = replay.as_ref().map(|_| Template {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
    });
    let mut next = Some(Request::from_parts(parts, body));
    // The route timeout runs from the request's end to the response's end, across attempts;
    // the per-try timers run per attempt (see `attempt_watch`).
    let route_expired = |a: &Activity| {
        timeouts.global.is_some_and(|g| {
            a.request_ended()
                .is_some_and(|end| end.max(forward_start) + g <= tokio::time::Instant::now())
        })
    };
    let mut watch: Option<Watch> = None;
    let mut target = target;
    let mut tried: Vec<Arc<Host>> = Vec::new();
    // The retry priority's state (`previous_priorities`): the priorities attempts went to.
    let mut priorities = retry
        .and_then(|p| p.retry_priority)
        .map(|p| PreviousPriorities::new(p.update_frequency));
    let mut attempt: u32 = 1;
    // The route's circuit breakers (`max_requests`, `max_pending_requests`, `max_connections`).
    let limits = rt.limits(fwd.high_priority);
    rt.stats.rq_total.inc();
    let resp = loop {
        let Some(mut req) = next.take() else {
            break Err(ProxyError::UpstreamReset("no request to retry".into()));
        };
        if call.vh.include_request_attempt_count {
            req.headers_mut()
                .insert(ATTEMPT_COUNT, HeaderValue::from(attempt));
        }
        if let Some(h) = &target.host {
            tried.push(h.clone());
            if let Some(p) = priorities.as_mut() {
                p.attempted(h.priority);
            }
        }
        if let Some(i) = &info {
            i.upstream.attempt(target.host.as_ref(), &target.address);
        }
        let pool = match rt.pool(
            &target.key,
            proto,
            origin.shared.sharing_hash(),
            fwd.high_priority,
        ) {
            Ok(p) => p,
            Err(e) => break Err(e),
        };
        let dial = dialer(dp, &rt, &target, &origin);
        watch = activity
            .as_ref()
            .map(|a| {
                attempt_watch(
                    a,
                    &timeouts,
                    upstream_duration,
                    forward_start,
                    tokio::time::Instant::now(),
                    upgrade.is_some(),
                )
            })
            .filter(|w| !w.is_empty());
        // Counted while the attempt waits; a guard, so a cancelled downstream request (the
        // future dropped mid-wait) still decrements.
        let active = ActiveGuard::new(&rt.stats.rq_active);
        // The send future is made where it is awaited: a local holding it across the await
        // would take its size again in this (large) future.
        let mut expired = None;
        let outcome = match watch.as_mut() {
            Some(w) => match w
                .run(std::pin::pin!(pool.send(
                    req,
                    dial,
                    upgrade.is_some(),
                    &limits
                )))
                .await
            {
                Ok(r) => r,
                Err(kind) => {
                    expired = Some(kind);
                    count_expiry(&rt.stats, kind);
                    Err(SendError {
                        error: expiry_error(kind, activity.as_deref()),
                        request: None,
                    })
                }
            },
            None => pool.send(req, dial, upgrade.is_some(), &limits).await,
        };
        drop(active);
        record_outcome(dp, &rt, &target, &outcome);
        // The route timeout is final: Envoy's route timer answers 504 `UT` itself, never retries.
        let overall_expired =
            expired == Some(Expired::Route) || activity.as_deref().is_some_and(route_expired);
        let wants = !overall_expired
            && retry.is_some_and(|p| match &outcome {
                Ok(r) => retry::retriable_response(p, r.status(), r.headers()),
                Err(e) => retry::retriable_error(p, &e.error, e.request.is_some()),
            });
        if !wants {
            // Envoy counts a retried request whose last outcome asks for no retry a success (its
            // route timer ends a request without asking).
            if attempt > 1 && !overall_expired {
                rt.stats.retry_success.inc();
            }
            break outcome.map_err(|e| e.error);
        }
        // Envoy's `RetryState::shouldRetry`: the route's `num_retries` first, then the
        // `max_retries` breaker; a refused retry returns the outcome with `URX` or `UO`.
        let retry_slot = if retry.is_some_and(|p| attempt > p.num_retries) {
            rt.stats.retry_limit_exceeded.inc();
            break not_retried(outcome, ResponseFlag::UpstreamRetryLimitExceeded, attempt);
        } else if let Some(slot) = rt.retry_slot(fwd.high_priority) {
            slot
        } else {
            rt.stats.retry_overflow.inc();
            break not_retried(outcome, ResponseFlag::UpstreamOverflow, attempt);
        };
        // The next attempt: an unsent request as it is, else a copy with the replayed body; a
        // body that outgrew the replay buffer (or was still streaming) cannot be sent again.
        let next_req = match outcome {
            Ok(r) => match (replay.as_ref().and_then(|r| r.body()), &template) {
                (Some(b), Some(t)) => t.rebuild(b),
                _ => break Ok(r),
            },
            Err(SendError { error, request }) => match request.or_else(|| {
                let b = replay.as_ref().and_then(|r| r.body())?;
                template.as_ref().map(|t| t.rebuild(b))
            }) {
                Some(r) => r,
                None => break Err(error),
            },
        };
        // Back off, then a fresh host. The failed attempt no longer counts as active on its host
        // (Envoy ends the upstream request before scheduling the retry), so a least-request
        // pick for the retry sees that host as idle as it is.
        rt.stats.rq_retry.inc();
        target.guard = None;
        if let Some(p) = retry {
            tokio::time::sleep(retry::backoff(p, attempt, rand::random())).await;
        }
        drop(retry_slot);
        attempt += 1;
        let exclude: &[Arc<Host>] = if retry.is_some_and(|p| p.avoid_previous_hosts) {
            &tried
        } else {
            &[]
        };
        let skip_priorities: &[u32] = match priorities.as_mut() {
            Some(p) => p.excluded_for_retry(|skip| rt.hosts.load().has_load_without(skip)),
            None => &[],
        };
        target = match pick_retry_target(
            &rt,
            ctx,
            header_dst.as_deref(),
            exclude,
            skip_priorities,
            hash,
        ) {
            Ok(t) => t,
            Err(e) => break Err(e),
        };
        next = Some(next_req);
    };
    let mut resp = resp?;
    if let Some(a) = &activity {
        a.start_response();
    }
    let switching = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    // An upgrade the upstream accepted: the bytes that follow are joined end to end, and the
    // response's body becomes the tunnel's lifetime, so the timers guarding it (below, and the
    // HCM's) and the stream's report run until the tunnel ends (see `UpgradedBody`).
    let tunnel = match downstream_upgrade {
        Some(down) if switching && upgrade.is_some() => {
            let up = hyper::upgrade::on(&mut resp);
            // The upstream stream (its `max_requests` slot, its connection's count) and the
            // host's active request last as long as the tunnel.
            let (head, upstream) = resp.into_parts();
            let (body, ended) = UpgradedBody::open(TunnelHold {
                _upstream: upstream,
                _host: target.guard.take(),
            });
            resp = Response::from_parts(head, body);
            resp.extensions_mut().insert(Upgraded);
            Some((down, up, ended))
        }
        _ => None,
    };
    // The last attempt's timers go on guarding the response body (the route timeout, the per-try
    // idle timeout and the cluster's stream duration run until the response ends).
    if let Some(w) = watch.take() {
        let stats = rt.stats.clone();
        let (head, body) = resp.into_parts();
        // A timer cutting the started response names itself in the details (Envoy's
        // `sendLocalReply` after the headers: reset, details set).
        let noted = info.clone();
        let on_expire: timeout::OnExpire = Box::new(move |k| {
            count_expiry(&stats, k);
            if let Some(i) = noted {
                i.responded(k.code_details());
            }
        });
        resp = Response::from_parts(head, TimedBody::wrap(body, w, true, Some(on_expire)));
    }
    if call.vh.include_attempt_count_in_response {
        resp.headers_mut()
            .insert(ATTEMPT_COUNT, HeaderValue::from(attempt));
    }
    // Response shaping.
    if !switching {
        request::strip_hop_by_hop(resp.headers_mut(), false);
    }
    // Cookies a hash policy made up go on the upstream's response (never on a local reply),
    // before the route's response header operations, as Envoy's router adds them. Envoy makes
    // them up in `computeHashKey`, which its ring hash and Maglev balancers call on every host
    // pick — the first and each retry's — appending to one list the final response gets whole:
    // a retried request's answer carries the cookie once per attempt. The value hashes the
    // downstream connection's addresses, never the host that answered.
    for _ in 0..attempt {
        for c in &set_cookies {
            resp.headers_mut().append(header::SET_COOKIE, c.clone());
        }
    }
    {
        let values = ConnValues {
            conn: ctx,
            stream_state: Some(&call.state),
            request: None,
        };
        let mut headers = std::mem::take(resp.headers_mut());
        if let Some(w) = weighted {
            request::apply_header_ops(&mut headers, &w.headers.response, &values);
        }
        request::apply_policies(
            &mut headers,
            &layers(&call, true),
            call.rc.most_specific_header_mutations_wins,
            &values,
        );
        *resp.headers_mut() = headers;
    }
    request::server_header(resp.headers_mut(), hcm.server_header, &hcm.server_name);
    // Envoy sets it only once the whole request was received, which an upgrade's never is
    // before its 101.
    if upgrade.is_none() {
        let ms = u64::try_from(call.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        resp.headers_mut()
            .insert(UPSTREAM_SERVICE_TIME, HeaderValue::from(ms));
    }
    if let Some((down, up, ended)) = tunnel {
        tokio::spawn(splice(down, up, activity, ended));
    }
    Ok(resp)
}

/// Marks the response of an upgraded stream, whose body is an [`UpgradedBody`]: the HCM hands
/// hyper an empty 101 and polls that body itself until the tunnel ends.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Upgraded;

/// The body of an upgraded stream's 101: no frames; it ends when the tunnel ends. Dropping it
/// (a timer guarding it fired) ends the tunnel.
struct UpgradedBody {
    ended: tokio::sync::oneshot::Receiver<()>,
    /// Released when the tunnel ends.
    held: Option<TunnelHold>,
}

/// What an upgraded stream holds while its tunnel is open.
struct TunnelHold {
    /// The upstream's 101 body: its `max_requests` slot and its connection's stream count.
    _upstream: Body,
    /// The host's active request (least request).
    _host: Option<crate::upstream::lb::RequestGuard>,
}

impl UpgradedBody {
    /// The body holding `held`, and the sender the tunnel drops when it ends.
    fn open(held: TunnelHold) -> (Body, tokio::sync::oneshot::Sender<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let body = UpgradedBody {
            ended: rx,
            held: Some(held),
        };
        (http_body_util::combinators::BoxBody::new(body), tx)
    }
}

impl hyper::body::Body for UpgradedBody {
    type Data = bytes::Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, super::BoxError>>> {
        use std::future::Future as _;
        if self.held.is_none() {
            return std::task::Poll::Ready(None);
        }
        // Sent or dropped, the tunnel is over either way.
        std::task::ready!(std::pin::Pin::new(&mut self.ended).poll(cx)).ok();
        self.held = None;
        std::task::Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none()
    }
}

/// Joins an upgraded downstream connection to the upstream's once both sides switched, until
/// either ends it or the stream's body is dropped (a timer fired). Bytes either way count as the
/// stream's activity, so `stream_idle_timeout` and the route's `idle_timeout` go on applying to
/// the tunnel as Envoy's HCM does for upgrade payload (every data frame resets its idle timer).
async fn splice(
    down: hyper::upgrade::OnUpgrade,
    up: hyper::upgrade::OnUpgrade,
    activity: Option<Arc<Activity>>,
    mut ended: tokio::sync::oneshot::Sender<()>,
) {
    let joined = async {
        match tokio::try_join!(down, up) {
            Ok((d, u)) => {
                let d = hyper_util::rt::TokioIo::new(d);
                let mut u = hyper_util::rt::TokioIo::new(u);
                let activity = activity.unwrap_or_else(Activity::new);
                let mut d = timeout::WatchedIo::new(d, Watch::new(activity), None);
                if let (_, _, Some(e)) = crate::io::join(&mut d, &mut u).await {
                    tracing::debug!(target: "http", "upgraded stream ended: {e}");
                }
            }
            Err(e) => tracing::debug!(target: "http", "upgrade failed: {e}"),
        }
    };
    tokio::select! {
        () = joined => {}
        () = ended.closed() => {
            tracing::debug!(target: "http", "upgraded stream ended by its timers");
        }
    }
}

/// A retriable outcome that is not retried: a response goes back with `flag` added, a failure
/// becomes [`ProxyError::NotRetried`] (its own status, body and flags, plus `flag`).
fn not_retried(
    outcome: Result<Response<Body>, SendError>,
    flag: ResponseFlag,
    attempt: u32,
) -> Result<Response<Body>, ProxyError> {
    match outcome {
        Ok(mut r) => {
            ResponseFlags::add_to(&mut r, flag);
            Ok(r)
        }
        Err(e) => Err(ProxyError::NotRetried {
            last: Box::new(e.error),
            flag,
            retried: attempt > 1,
        }),
    }
}

/// The router filter's settings (`suppress_envoy_headers`, `respect_expected_rq_timeout`).
fn router_config(hcm: &HttpConnectionManager) -> Option<&crate::config::filters::http::Router> {
    hcm.http_filters.iter().find_map(|f| match &f.kind {
        crate::config::filters::http::HttpFilterKind::Router(r) => Some(r),
        _ => None,
    })
}

/// The timers of one upstream attempt started at `attempt_start`: the route timeout (from the
/// request's end, across attempts), `per_try_timeout` (from the later of the request's end and
/// the attempt's start, until response headers), `per_try_idle_timeout` (from the attempt's
/// start, response body included) and the cluster's `max_stream_duration`.
///
/// An `upgrade`'s request does not end before its 101, so its route timeout runs from the
/// attempt's start until the response's headers (Envoy ≥ 1.36, envoyproxy/envoy#41075: the
/// router arms it when the upgrade goes upstream and the upstream codec filter disarms it, with
/// the per-try timeouts, on the 101); the per-try timers (retries do not apply to upgrades) are
/// not armed; the cluster's `max_stream_duration` goes on capping the tunnel.
fn attempt_watch(
    activity: &Arc<Activity>,
    t: &timeout::RouteTimeouts,
    upstream_duration: Option<std::time::Duration>,
    forward_start: tokio::time::Instant,
    attempt_start: tokio::time::Instant,
    upgrade: bool,
) -> Watch {
    let mut w = Watch::new(activity.clone());
    if upgrade {
        if let Some(g) = t.global {
            w = w.response_by(attempt_start + g, Expired::Route);
        }
        if let Some(d) = upstream_duration {
            w = w.at(attempt_start + d, Expired::UpstreamDuration);
        }
        return w;
    }
    if let Some(g) = t.global {
        w = w.after_request(g, forward_start, false, Expired::Route);
    }
    if let Some(p) = t.per_try {
        w = w.after_request(p, attempt_start, true, Expired::PerTry);
    }
    if let Some(i) = t.per_try_idle {
        w = w.idle(i, attempt_start, Expired::PerTryIdle);
    }
    if let Some(d) = upstream_duration {
        w = w.at(attempt_start + d, Expired::UpstreamDuration);
    }
    w
}

/// Counts a router timer in the cluster's stats.
fn count_expiry(stats: &crate::upstream::cluster_manager::ClusterStats, kind: Expired) {
    match kind {
        Expired::Route => stats.rq_timeout.inc(),
        Expired::PerTry => stats.rq_per_try_timeout.inc(),
        Expired::PerTryIdle => stats.rq_per_try_idle_timeout.inc(),
        Expired::UpstreamDuration => stats.rq_max_duration_reached.inc(),
        _ => {}
    }
}

/// The failure of an attempt ended by a router timer: 504 `UT` for the route and per-try
/// timeouts, each with its own details (`upstream_response_timeout`, `upstream_per_try_timeout`,
/// `upstream_per_try_idle_timeout`); for the cluster's stream duration Envoy's 408/504 `UMSDR`.
fn expiry_error(kind: Expired, activity: Option<&Activity>) -> ProxyError {
    match kind {
        Expired::Route => ProxyError::Timeout,
        _ => ProxyError::StreamTimeout {
            kind,
            request_complete: activity.is_some_and(|a| a.request_ended().is_some()),
        },
    }
}

/// Holds one count in a gauge until dropped.
pub(super) struct ActiveGuard(Arc<crate::stats::Stat>);

impl ActiveGuard {
    pub(super) fn new(gauge: &Arc<crate::stats::Stat>) -> Self {
        gauge.add(1);
        ActiveGuard(gauge.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use waypoint_proto::{
        envoy::config::route::v3::route_action::hash_policy::Cookie as RawCookie,
        google::protobuf::Duration as PbDuration,
    };

    use super::*;
    use crate::{
        config::{Snapshot, route::CookiePolicy},
        listener::conn::Addr,
    };

    fn conn(remote: &str) -> ConnContext {
        ConnContext::new(
            "l",
            Addr::Socket("10.0.0.2:8080".parse().expect("addr")),
            Addr::Socket(remote.parse().expect("addr")),
            Arc::new(Snapshot::default()),
        )
    }

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut b = Request::builder().uri("/app?user=u1");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    fn cookie_policy(ttl: Option<i64>, terminal: bool) -> HashPolicy {
        let raw = RawCookie {
            name: "sticky".into(),
            ttl: ttl.map(|seconds| PbDuration { seconds, nanos: 0 }),
            path: "/".into(),
            attributes: vec![],
        };
        HashPolicy {
            kind: HashKind::Cookie(CookiePolicy::compile(&raw, "cookie").expect("compiles")),
            terminal,
        }
    }

    fn xx(s: &str) -> u64 {
        crate::upstream::lb::xxhash64(s.as_bytes(), 0)
    }

    #[test]
    fn cookies_are_read_as_envoy_parses_them() {
        let p = parts(&[
            ("cookie", "a=1; sticky=\"00ff\"; sticky=second"),
            ("cookie", "other=x"),
        ]);
        assert_eq!(request_cookie(&p.headers, "sticky"), Some("00ff"));
        assert_eq!(request_cookie(&p.headers, "other"), Some("x"));
        assert_eq!(request_cookie(&p.headers, "stick"), None);
        let p = parts(&[("cookie", "sticky=plain")]);
        assert_eq!(request_cookie(&p.headers, "sticky"), Some("plain"));
    }

    #[test]
    fn a_missing_cookie_with_a_ttl_is_generated_and_hashed() {
        let ctx = conn("10.0.0.1:5000");
        let state = FilterState::default();
        let policies = [cookie_policy(Some(60), false)];
        let first = request_hash(&policies, &parts(&[]), &ctx, &state);
        let value = generated_cookie(&ctx);
        assert_eq!(value.len(), 16);
        assert!(
            value
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        // Envoy: xxHash64 of remote then local address.
        assert_eq!(value, format!("{:016x}", xx("10.0.0.1:500010.0.0.2:8080")));
        assert_eq!(first.hash, Some(xx(&value)));
        let set: Vec<&str> = first
            .set_cookies
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        assert_eq!(
            set,
            [format!("sticky=\"{value}\"; Max-Age=60; Path=/; HttpOnly")]
        );
        // The follow-up carries the cookie as set (quoted): same hash, nothing set.
        let cookie = format!("sticky=\"{value}\"");
        let again = request_hash(
            &policies,
            &parts(&[("cookie", &cookie)]),
            &conn("10.0.0.9:6000"),
            &state,
        );
        assert_eq!(again.hash, first.hash);
        assert!(again.set_cookies.is_empty());
        // Another connection gets another cookie.
        assert_ne!(generated_cookie(&conn("10.0.0.1:5001")), value);
        // Without a ttl a missing cookie gives no hash and sets nothing.
        let none = request_hash(&[cookie_policy(None, false)], &parts(&[]), &ctx, &state);
        assert_eq!((none.hash, none.set_cookies.len()), (None, 0));
        // An empty cookie counts as missing.
        let empty = request_hash(&policies, &parts(&[("cookie", "sticky=")]), &ctx, &state);
        assert_eq!(empty.hash, Some(xx(&value)));
    }

    #[test]
    fn policies_combine_and_terminal_stops_once_a_hash_exists() {
        let ctx = conn("10.0.0.1:5000");
        let state = FilterState::default();
        let query = HashPolicy {
            kind: HashKind::QueryParameter("user".into()),
            terminal: false,
        };
        let header = |terminal| HashPolicy {
            kind: HashKind::Header {
                name: "x-user".into(),
                rewrite: None,
            },
            terminal,
        };
        let p = parts(&[("x-user", "b"), ("x-user", "a")]);
        // Several values of one header: sorted, hashed as one string.
        assert_eq!(
            request_hash(&[header(false)], &p, &ctx, &state).hash,
            Some(xx("ab"))
        );
        // Two policies: rotate-left-1 of the first, xor the second.
        let both = request_hash(&[header(false), query.clone()], &p, &ctx, &state);
        assert_eq!(both.hash, Some(xx("ab").rotate_left(1) ^ xx("u1")));
        // A terminal policy with a hash ends the walk; a terminal one without a value and no
        // hash so far does not.
        let stop = request_hash(&[header(true), query.clone()], &p, &ctx, &state);
        assert_eq!(stop.hash, Some(xx("ab")));
        let absent = request_hash(&[header(true), query], &parts(&[]), &ctx, &state);
        assert_eq!(absent.hash, Some(xx("u1")));
        // A terminal cookie policy that generated a cookie stops there too.
        let generated = request_hash(
            &[cookie_policy(Some(0), true), header(false)],
            &p,
            &ctx,
            &state,
        );
        assert_eq!(generated.hash, Some(xx(&generated_cookie(&ctx))));
        let set = generated.set_cookies[0]
            .to_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            !set.contains("Max-Age"),
            "a zero ttl is a session cookie: {set}"
        );
    }

    fn uri(s: &str) -> Uri {
        s.parse().expect("uri")
    }

    #[test]
    fn the_upstream_uri_keeps_the_received_path_unless_rewritten() {
        let origin = uri("/a/b?c=d");
        let up = upstream_uri(Proto::Http1, &origin, "svc", None).expect("h1");
        assert_eq!(up.to_string(), "/a/b?c=d");
        assert!(up.authority().is_none(), "HTTP/1.1 sends origin-form");
        // Absolute-form in: origin-form out.
        let absolute = uri("http://svc:8000/x?y");
        let up = upstream_uri(Proto::Http1, &absolute, "svc:8000", None).expect("h1");
        assert_eq!(up.to_string(), "/x?y");
        // A rewritten path replaces the received one.
        let up = upstream_uri(Proto::Http1, &origin, "svc", Some("/v2/b?c=d")).expect("rw");
        assert_eq!(up.to_string(), "/v2/b?c=d");
        // No path at all (CONNECT's authority-form): `/`, as before.
        let connect = uri("svc:443");
        let up = upstream_uri(Proto::Http1, &connect, "svc:443", None).expect("connect");
        assert_eq!(up.to_string(), "/");
    }

    #[test]
    fn the_upstream_uri_for_http2_carries_the_host_as_authority() {
        // The received authority is reused when it is the host sent…
        let received = uri("http://svc.ns:8000/p?q");
        let up = upstream_uri(Proto::Http2, &received, "svc.ns:8000", None).expect("same");
        assert_eq!(up.to_string(), "http://svc.ns:8000/p?q");
        // …and replaced by a rewritten host.
        let up = upstream_uri(Proto::Http2, &received, "other:80", None).expect("rewritten");
        assert_eq!(up.authority().map(|a| a.as_str()), Some("other:80"));
        assert_eq!(up.path(), "/p");
        // A request without an authority (HTTP/1.1 in origin-form) takes the Host.
        let up = upstream_uri(Proto::Http2, &uri("/p"), "h", Some("/r")).expect("host");
        assert_eq!(up.to_string(), "http://h/r");
    }

    #[test]
    fn an_upstream_uri_that_cannot_be_formed_is_an_error() {
        let origin = uri("/admin");
        // A Host with a path in it must not become part of the upstream path.
        assert!(upstream_uri(Proto::Http2, &origin, "svc/admin", None).is_err());
        assert!(upstream_uri(Proto::Http2, &origin, "", None).is_err());
        // A rewrite that leaves no leading slash.
        assert!(upstream_uri(Proto::Http1, &origin, "svc", Some("users")).is_err());
        assert!(upstream_uri(Proto::Http2, &origin, "svc", Some("users")).is_err());
    }
}
