//! HTTP connection pools per (cluster, host, protocol, shared filter state): HTTP/1.1 keeps idle
//! connections and hands each one to one request at a time (a connection goes back to the pool
//! when its response body ends); HTTP/2 multiplexes every request over one connection, reopened
//! when it breaks. Idle connections older than the cluster's `idle_timeout` are closed.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use hyper::{
    body::{Body as HttpBody, Frame, Incoming, SizeHint},
    client::conn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::{
    flags::ProxyError,
    http::{Body, BoxError},
    listener::conn::BoxIo,
};

/// Upstream protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 (prior knowledge).
    Http2,
}

/// HTTP/2 client settings.
#[derive(Debug, Clone, Default)]
pub struct H2ClientSettings {
    /// Initial stream window.
    pub initial_stream_window: Option<u32>,
    /// Initial connection window.
    pub initial_connection_window: Option<u32>,
    /// PING interval.
    pub keepalive_interval: Option<Duration>,
    /// PING timeout.
    pub keepalive_timeout: Option<Duration>,
}

/// The marker `upstream_error` puts in front of a refused-stream reset (retry_on `refused-stream`).
pub const REFUSED_STREAM: &str = "refused_stream";

/// Envoy's default upstream idle timeout (`common_http_protocol_options.idle_timeout`: 1h).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

struct Idle {
    send: conn::http1::SendRequest<Body>,
    since: Instant,
}

/// One pool.
pub struct Pool {
    proto: Proto,
    idle_timeout: Duration,
    h2_settings: H2ClientSettings,
    idle: Mutex<Vec<Idle>>,
    h2: tokio::sync::Mutex<Option<conn::http2::SendRequest<Body>>>,
}

/// How a new connection is opened (the pool does not know hosts or transports).
pub type Dial<'a> =
    Pin<Box<dyn std::future::Future<Output = Result<BoxIo, ProxyError>> + Send + 'a>>;

impl Pool {
    /// A pool speaking `proto`.
    pub fn new(
        proto: Proto,
        idle_timeout: Option<Duration>,
        h2_settings: H2ClientSettings,
    ) -> Self {
        Pool {
            proto,
            idle_timeout: match idle_timeout {
                Some(d) if d.is_zero() => Duration::MAX,
                Some(d) => d,
                None => DEFAULT_IDLE_TIMEOUT,
            },
            h2_settings,
            idle: Mutex::new(Vec::new()),
            h2: tokio::sync::Mutex::new(None),
        }
    }

    fn take_idle(&self) -> Option<conn::http1::SendRequest<Body>> {
        let mut idle = match self.idle.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let now = Instant::now();
        while let Some(c) = idle.pop() {
            if c.send.is_closed() || now.duration_since(c.since) > self.idle_timeout {
                continue;
            }
            if c.send.is_ready() {
                return Some(c.send);
            }
        }
        None
    }

    fn put_idle(&self, send: conn::http1::SendRequest<Body>) {
        if send.is_closed() {
            return;
        }
        let mut idle = match self.idle.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        idle.push(Idle {
            send,
            since: Instant::now(),
        });
    }

    /// Sends `req` on a pooled or new connection (opened with `dial`). `upgrade` keeps the
    /// connection out of the pool (it becomes the upgraded tunnel). A request that never left
    /// (the connection could not be opened, or a pooled one was found closed) comes back in the
    /// error, so it can be retried without replaying its body.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<Body>,
        dial: impl FnOnce() -> Dial<'static>,
        upgrade: bool,
    ) -> Result<Response<Body>, SendError> {
        match self.proto {
            Proto::Http1 => self.send_h1(req, dial, upgrade).await,
            Proto::Http2 => self.send_h2(req, dial).await,
        }
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut req: Request<Body>,
        dial: impl FnOnce() -> Dial<'static>,
        upgrade: bool,
    ) -> Result<Response<Body>, SendError> {
        // A reused connection may have been closed by the server while idle: the request comes
        // back unsent and goes out on a new connection.
        while let Some(mut send) = self.take_idle() {
            match send.try_send_request(req).await {
                Ok(resp) => return Ok(self.finish_h1(resp, send, upgrade)),
                Err(mut e) => match e.take_message() {
                    Some(r) => req = r,
                    None => return Err(SendError::sent(upstream_error(e.into_error()))),
                },
            }
        }
        let io = match dial().await {
            Ok(io) => io,
            Err(e) => return Err(SendError::unsent(e, req)),
        };
        let (mut send, connection) = match conn::http1::Builder::new()
            .handshake::<_, Body>(TokioIo::new(io))
            .await
        {
            Ok(c) => c,
            Err(e) => {
                return Err(SendError::unsent(
                    ProxyError::ConnectFailure(format!("HTTP/1.1 handshake: {e}")),
                    req,
                ));
            }
        };
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::trace!(target: "upstream", "HTTP/1.1 connection ended: {e}");
            }
        });
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| SendError::sent(upstream_error(e)))?;
        Ok(self.finish_h1(resp, send, upgrade))
    }

    fn finish_h1(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        send: conn::http1::SendRequest<Body>,
        upgrade: bool,
    ) -> Response<Body> {
        let back = if upgrade || resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            None
        } else {
            Some((self.clone(), send))
        };
        resp.map(|b| {
            let body = Returning { inner: b, back };
            http_body_util::BodyExt::boxed(http_body_util::BodyExt::map_err(body, |e| {
                Box::new(e) as BoxError
            }))
        })
    }

    async fn send_h2(
        self: &Arc<Self>,
        req: Request<Body>,
        dial: impl FnOnce() -> Dial<'static>,
    ) -> Result<Response<Body>, SendError> {
        let mut send = {
            let mut slot = self.h2.lock().await;
            match slot.as_ref() {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    let io = match dial().await {
                        Ok(io) => io,
                        Err(e) => return Err(SendError::unsent(e, req)),
                    };
                    let mut b = conn::http2::Builder::new(TokioExecutor::new());
                    b.timer(TokioTimer::new());
                    if let Some(w) = self.h2_settings.initial_stream_window {
                        b.initial_stream_window_size(w);
                    }
                    if let Some(w) = self.h2_settings.initial_connection_window {
                        b.initial_connection_window_size(w);
                    }
                    if let Some(i) = self.h2_settings.keepalive_interval {
                        b.keep_alive_interval(i);
                        if let Some(t) = self.h2_settings.keepalive_timeout {
                            b.keep_alive_timeout(t);
                        }
                    }
                    let (send, connection) = match b.handshake::<_, Body>(TokioIo::new(io)).await {
                        Ok(c) => c,
                        Err(e) => {
                            return Err(SendError::unsent(
                                ProxyError::ConnectFailure(format!("HTTP/2 handshake: {e}")),
                                req,
                            ));
                        }
                    };
                    tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            tracing::trace!(target: "upstream", "HTTP/2 connection ended: {e}");
                        }
                    });
                    *slot = Some(send.clone());
                    send
                }
            }
        };
        if let Err(e) = send.ready().await {
            return Err(SendError::unsent(upstream_error(e), req));
        }
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| SendError::sent(upstream_error(e)))?;
        Ok(resp.map(|b| {
            http_body_util::BodyExt::boxed(http_body_util::BodyExt::map_err(b, |e| {
                Box::new(e) as BoxError
            }))
        }))
    }
}

/// A failed send: why, and the request when it never left.
pub struct SendError {
    /// Why.
    pub error: ProxyError,
    /// The request, if it was not sent (safe to retry without a body replay).
    pub request: Option<Request<Body>>,
}

impl SendError {
    fn unsent(error: ProxyError, req: Request<Body>) -> Self {
        SendError {
            error,
            request: Some(req),
        }
    }

    fn sent(error: ProxyError) -> Self {
        SendError {
            error,
            request: None,
        }
    }
}

/// Whether an upstream failure was an HTTP/2 `REFUSED_STREAM` (the request was not processed).
fn refused_stream(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = s.source();
    }
    false
}

fn upstream_error(e: hyper::Error) -> ProxyError {
    if refused_stream(&e) {
        ProxyError::UpstreamReset(format!("{REFUSED_STREAM}: {e}"))
    } else if e.is_canceled() || e.is_closed() || e.is_incomplete_message() {
        ProxyError::UpstreamReset(format!("connection termination: {e}"))
    } else if e.is_parse() || e.is_user() {
        ProxyError::UpstreamProtocol(e.to_string())
    } else {
        ProxyError::UpstreamReset(e.to_string())
    }
}

/// A response body that puts its HTTP/1.1 connection back into the pool when it ends.
struct Returning {
    inner: Incoming,
    back: Option<(Arc<Pool>, conn::http1::SendRequest<Body>)>,
}

impl Returning {
    fn give_back(&mut self) {
        if let Some((pool, send)) = self.back.take() {
            pool.put_idle(send);
        }
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        // An empty body may never be polled: the connection is still reusable.
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}

impl HttpBody for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
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
