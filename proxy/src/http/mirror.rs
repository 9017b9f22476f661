//! Request mirroring (`request_mirror_policies` of the route, else of the virtual host, else of
//! the route table), as Envoy's router shadows requests:
//!
//! * each policy mirrors its `runtime_fraction` of requests (the default value: there is no
//!   runtime layer) to its `cluster`, or to the cluster named by the first value of its
//!   `cluster_header` (no header: no mirror); a cluster that does not exist is skipped;
//! * the mirror carries the request as the primary leaves (after the route's header operations
//!   and rewrites), with `-shadow` appended to the host part of the authority
//!   (`httpbin:8000` → `httpbin-shadow:8000`) unless `disable_shadow_host_suffix_append`, or with
//!   `host_rewrite_literal` as the authority;
//! * it goes through the mirror cluster's load balancer, pools and circuit breakers like any
//!   upstream request, is counted in that cluster's `upstream_rq_*` stats, and is bounded by the
//!   route timeout; its response is read and discarded;
//! * the request body streams to the primary and every mirror at once: the mirrors get copies of
//!   the frames the primary reads, never slowing it. A mirror that falls more than the buffer
//!   limit (the listener's `per_connection_buffer_limit_bytes`, Envoy's 1 MiB by default) behind is
//!   aborted — its upstream request is reset, not truncated — and the primary goes on;
//! * CONNECT and upgraded (WebSocket) requests are not mirrored (Envoy's async client cannot
//!   carry them).
//!
//! `trace_sampled` only concerns tracing spans, which are not emitted.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Uri, Version, header, request::Parts};
use http_body_util::BodyExt as _;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::mpsc;

use super::{Body, BoxError, router};
use crate::{
    config::route::{ClusterRef, Mirror},
    dataplane::DataPlane,
    listener::conn::ConnContext,
    upstream::{cluster_manager::ClusterRt, connect::Origin, pool::Proto},
};

/// Envoy's default per-connection buffer limit, the mirror's bound when the listener sets none.
pub const DEFAULT_BUFFER_LIMIT: usize = 1 << 20;

/// One mirror to start.
struct Shadow {
    rt: Arc<ClusterRt>,
    authority: String,
}

/// The request as it leaves for the primary, which mirrors copy.
pub struct Leaving<'a> {
    /// Method.
    pub method: &'a Method,
    /// The downstream HTTP version (picks the mirror cluster's protocol as for the primary).
    pub version: Version,
    /// Headers after the route's operations (hop-by-hop removed).
    pub headers: &'a HeaderMap,
    /// The authority after host rewrites.
    pub authority: &'a str,
    /// Path and query after rewrites.
    pub path_and_query: &'a str,
    /// The route timeout (`None`: none).
    pub timeout: Option<Duration>,
    /// Filter state shared with upstream connections, and the downstream source.
    pub origin: &'a Origin,
}

/// `host` with `-shadow` appended to its host part (before a port; IPv6 literals keep their
/// brackets).
pub fn shadow_host(host: &str) -> String {
    let port_start = if host.starts_with('[') {
        host.find("]:").map(|i| i + 1)
    } else {
        host.rfind(':')
    };
    match port_start {
        Some(i) => format!("{}-shadow{}", &host[..i], &host[i..]),
        None => format!("{host}-shadow"),
    }
}

/// The mirror policies that apply to a route (the route's, else the virtual host's, else the
/// route table's).
pub fn policies<'a>(route: &'a [Mirror], vhost: &'a [Mirror], table: &'a [Mirror]) -> &'a [Mirror] {
    if !route.is_empty() {
        route
    } else if !vhost.is_empty() {
        vhost
    } else {
        table
    }
}

/// Starts the mirrors of a routed request leaving with `parts` (after the route's header
/// operations), `authority` and `path_and_query`; returns the body the primary sends.
pub fn start_routed(
    call: &router::Call<'_>,
    parts: &Parts,
    authority: &str,
    path_and_query: &str,
    origin: &Origin,
    body: Body,
) -> Body {
    let policies = policies(&call.fwd.mirrors, &call.vh.mirrors, &call.rc.mirrors);
    if policies.is_empty() {
        return body;
    }
    let timeout = match call.fwd.timeout {
        Some(t) if t.is_zero() => None,
        Some(t) => Some(t),
        None => Some(router::DEFAULT_ROUTE_TIMEOUT),
    };
    let leaving = Leaving {
        method: &parts.method,
        version: parts.version,
        headers: &parts.headers,
        authority,
        path_and_query,
        timeout,
        origin,
    };
    start(call.dp, call.ctx, policies, &leaving, body)
}

/// Starts the mirrors of `policies` for a request leaving as `req`; returns the body the
/// primary sends (a tee when some mirror takes a copy of it). Mirrors run on their own tasks and
/// never report back.
pub fn start(
    dp: &Arc<DataPlane>,
    ctx: &Arc<ConnContext>,
    policies: &[Mirror],
    req: &Leaving<'_>,
    body: Body,
) -> Body {
    if policies.is_empty() || req.method == Method::CONNECT {
        return body;
    }
    let shadows: Vec<Shadow> = policies
        .iter()
        .filter(|m| m.fraction.sample(rand::random()))
        .filter_map(|m| {
            let name = match &m.cluster {
                ClusterRef::Name(n) => n.clone(),
                ClusterRef::Header(h) => req.headers.get(h.as_str())?.to_str().ok()?.to_owned(),
            };
            let Some(rt) = dp.clusters.get(dp, &dp.server.config.snapshot(), &name) else {
                tracing::debug!(target: "http", "shadow cluster '{name}' does not exist");
                return None;
            };
            let authority = match (&m.host_rewrite_literal, m.disable_shadow_host_suffix_append) {
                (Some(literal), _) => literal.clone(),
                (None, true) => req.authority.to_owned(),
                (None, false) => shadow_host(req.authority),
            };
            Some(Shadow { rt, authority })
        })
        .collect();
    if shadows.is_empty() {
        return body;
    }
    let (primary, mut copies) = if body.is_end_stream() {
        (body, Vec::new())
    } else {
        let limit = ctx
            .snapshot
            .listeners
            .get(&ctx.listener)
            .and_then(|l| l.per_connection_buffer_limit_bytes)
            .map_or(DEFAULT_BUFFER_LIMIT, |b| b as usize);
        let (tee, copies) = Tee::new(body, shadows.len(), limit);
        (tee.boxed(), copies)
    };
    for shadow in shadows {
        let body = copies.pop().unwrap_or_else(super::empty);
        let request = match build(req, &shadow, body) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(target: "http", "mirror request not built: {e}");
                continue;
            }
        };
        let (dp, ctx, origin, timeout) = (dp.clone(), ctx.clone(), req.origin.clone(), req.timeout);
        let header_dst = req
            .headers
            .get(&super::router::ORIGINAL_DST_HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        tokio::spawn(async move {
            let send = send(
                &dp,
                &ctx,
                &shadow.rt,
                &origin,
                header_dst.as_deref(),
                request,
            );
            let done = match timeout {
                Some(t) => tokio::time::timeout(t, send).await.is_ok(),
                None => {
                    send.await;
                    true
                }
            };
            if !done {
                shadow.rt.stats.rq_timeout.inc();
            }
        });
    }
    primary
}

/// The mirror request, shaped for the mirror cluster's protocol.
fn build(
    req: &Leaving<'_>,
    shadow: &Shadow,
    body: Body,
) -> Result<(Proto, Request<Body>), BoxError> {
    let proto = shadow.rt.protocol(req.version);
    let mut r = Request::new(body);
    *r.method_mut() = req.method.clone();
    *r.headers_mut() = req.headers.clone();
    let pq = req.path_and_query;
    match proto {
        Proto::Http1 => {
            *r.uri_mut() = pq.parse::<Uri>()?;
            *r.version_mut() = Version::HTTP_11;
            r.headers_mut()
                .insert(header::HOST, HeaderValue::from_str(&shadow.authority)?);
        }
        Proto::Http2 => {
            *r.uri_mut() = format!("http://{}{pq}", shadow.authority).parse::<Uri>()?;
            *r.version_mut() = Version::HTTP_2;
            r.headers_mut().remove(header::HOST);
        }
    }
    Ok((proto, r))
}

/// Sends one mirror request and reads its response to the end (so the connection goes back to
/// the pool); the outcome only feeds the mirror cluster's stats and outlier detection.
async fn send(
    dp: &Arc<DataPlane>,
    ctx: &ConnContext,
    rt: &ClusterRt,
    origin: &Origin,
    header_dst: Option<&str>,
    (proto, request): (Proto, Request<Body>),
) {
    let target = match router::pick_target(rt, ctx, header_dst, &[], None) {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(target: "http", "mirror to {}: {e}", rt.cluster.name);
            return;
        }
    };
    match router::send_single(dp, rt, &target, origin, (proto, request)).await {
        Ok((resp, _active)) => {
            // Discarded, but read through: an unread body would close a pooled connection.
            let mut body = resp.into_body();
            while let Some(frame) = body.frame().await {
                if frame.is_err() {
                    break;
                }
            }
        }
        Err(e) => tracing::debug!(target: "http", "mirror to {}: {e}", rt.cluster.name),
    }
}

/// What a tee and one of its copies share.
#[derive(Debug)]
struct CopyState {
    /// Bytes queued for the mirror and not yet read by it.
    queued: AtomicUsize,
    /// The source body ended cleanly: a closed channel is the end, not an abort.
    complete: AtomicBool,
}

/// One output of a [`Tee`].
struct Output {
    tx: Option<mpsc::UnboundedSender<Frame<Bytes>>>,
    state: Arc<CopyState>,
}

/// The primary's request body, copying every frame it yields to the mirrors' bodies.
struct Tee {
    inner: Body,
    outputs: Vec<Output>,
    limit: usize,
}

impl Tee {
    /// A tee of `inner` with `n` copies, each allowed `limit` bytes behind.
    fn new(inner: Body, n: usize, limit: usize) -> (Tee, Vec<Body>) {
        let hint = inner.size_hint();
        let mut outputs = Vec::with_capacity(n);
        let mut copies = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = mpsc::unbounded_channel();
            let state = Arc::new(CopyState {
                queued: AtomicUsize::new(0),
                complete: AtomicBool::new(false),
            });
            outputs.push(Output {
                tx: Some(tx),
                state: state.clone(),
            });
            copies.push(Copy { rx, state, hint }.boxed());
        }
        (
            Tee {
                inner,
                outputs,
                limit,
            },
            copies,
        )
    }

    /// The body ended: only copies still fed are complete; an aborted one stays aborted.
    fn complete(&mut self) {
        for out in &mut self.outputs {
            if out.tx.take().is_some() {
                out.state.complete.store(true, Ordering::Release);
            }
        }
    }
}

impl HttpBody for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                for out in &mut this.outputs {
                    let Some(tx) = &out.tx else { continue };
                    let copy = if let Some(d) = frame.data_ref() {
                        let queued = out.state.queued.fetch_add(d.len(), Ordering::Relaxed);
                        if queued + d.len() > this.limit {
                            // The mirror fell too far behind: dropping the sender without
                            // `complete` aborts its request.
                            tracing::debug!(target: "http", "mirror dropped: over {} buffered bytes", this.limit);
                            out.tx = None;
                            continue;
                        }
                        Frame::data(d.clone())
                    } else if let Some(t) = frame.trailers_ref() {
                        Frame::trailers(t.clone())
                    } else {
                        continue;
                    };
                    if tx.send(copy).is_err() {
                        out.tx = None;
                    }
                }
                // The last frame: a reader may stop here without asking for the end.
                if this.inner.is_end_stream() {
                    this.complete();
                }
            }
            Poll::Ready(None) => this.complete(),
            // A failed downstream body: the mirrors' senders drop without `complete`.
            Poll::Ready(Some(Err(_))) => {
                for out in &mut this.outputs {
                    out.tx = None;
                }
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

/// A mirror's copy of the request body.
struct Copy {
    rx: mpsc::UnboundedReceiver<Frame<Bytes>>,
    state: Arc<CopyState>,
    hint: SizeHint,
}

/// The copy could not be completed (the mirror fell behind, or the primary's body failed or was
/// dropped): its request is reset.
#[derive(Debug, thiserror::Error)]
#[error("mirrored request body aborted")]
pub struct CopyAborted;

impl HttpBody for Copy {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(frame)) => {
                if let Some(d) = frame.data_ref() {
                    self.state.queued.fetch_sub(d.len(), Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) if self.state.complete.load(Ordering::Acquire) => Poll::Ready(None),
            Poll::Ready(None) => Poll::Ready(Some(Err(Box::new(CopyAborted)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_suffix_goes_before_the_port() {
        assert_eq!(shadow_host("httpbin:8000"), "httpbin-shadow:8000");
        assert_eq!(shadow_host("httpbin"), "httpbin-shadow");
        assert_eq!(shadow_host("[::1]:80"), "[::1]-shadow:80");
        assert_eq!(shadow_host("[::1]"), "[::1]-shadow");
        assert_eq!(shadow_host("10.0.0.1:9080"), "10.0.0.1-shadow:9080");
    }

    #[test]
    fn route_policies_win_over_virtual_host_and_table() {
        let m = |n: &str| Mirror {
            cluster: ClusterRef::Name(n.into()),
            fraction: crate::config::matchers::Fraction::ALWAYS,
            disable_shadow_host_suffix_append: false,
            host_rewrite_literal: None,
        };
        let (r, v, t) = (vec![m("r")], vec![m("v")], vec![m("t")]);
        let name = |p: &[Mirror]| match &p[0].cluster {
            ClusterRef::Name(n) => n.clone(),
            ClusterRef::Header(h) => h.clone(),
        };
        assert_eq!(name(policies(&r, &v, &t)), "r");
        assert_eq!(name(policies(&[], &v, &t)), "v");
        assert_eq!(name(policies(&[], &[], &t)), "t");
        assert!(policies(&[], &[], &[]).is_empty());
    }

    /// A body that yields the given chunks, then ends.
    fn chunks(parts: &[&'static [u8]]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed()
    }

    #[tokio::test]
    async fn every_copy_gets_the_whole_body() {
        let (tee, copies) = Tee::new(chunks(&[b"ab", b"cd", b"e"]), 2, 1024);
        let primary = tee.collect().await.expect("primary").to_bytes();
        assert_eq!(&primary[..], b"abcde");
        for c in copies {
            let got = c.collect().await.expect("copy").to_bytes();
            assert_eq!(&got[..], b"abcde");
        }
    }

    #[tokio::test]
    async fn a_copy_that_falls_behind_is_aborted_and_the_primary_is_whole() {
        let (tee, mut copies) = Tee::new(chunks(&[b"0123", b"4567", b"89"]), 1, 6);
        // The mirror reads nothing while the primary reads everything.
        let primary = tee.collect().await.expect("primary").to_bytes();
        assert_eq!(&primary[..], b"0123456789");
        let copy = copies.pop().expect("copy");
        let err = copy.collect().await.expect_err("aborted");
        assert!(err.to_string().contains("aborted"), "{err}");
    }

    #[tokio::test]
    async fn a_dropped_primary_aborts_the_copies() {
        let (tee, mut copies) = Tee::new(chunks(&[b"x", b"y"]), 1, 1024);
        drop(tee);
        let copy = copies.pop().expect("copy");
        assert!(copy.collect().await.is_err());
    }
}
