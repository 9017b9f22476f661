//! The HBONE server: one TLS connection carries many CONNECT streams; each accepted stream becomes a
//! byte tunnel handed to a [`ConnectHandler`], which decides where it goes (the waypoint routes it to
//! `main_internal`) or refuses it with a status.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
};

use super::{H2Settings, HboneError, Keepalive, keepalive_dead, stream::H2Stream};
use crate::http::timeout::ConnActivity;

/// A byte stream the tunnel is joined to.
pub use crate::io::Stream as Tunnel;

/// What we know about the HBONE connection a request arrived on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// The peer's TCP address (`%DOWNSTREAM_REMOTE_ADDRESS%`).
    pub remote: SocketAddr,
    /// Our TCP address.
    pub local: SocketAddr,
    /// The peer's SPIFFE URI SAN (`%DOWNSTREAM_PEER_URI_SAN%`).
    pub peer_identity: Option<String>,
    /// Our own URI SAN (`%DOWNSTREAM_LOCAL_URI_SAN%`).
    pub local_identity: Option<String>,
}

/// One CONNECT request.
#[derive(Debug)]
pub struct ConnectRequest {
    /// `:authority` (`ip:port`).
    pub authority: String,
    /// Request headers (`forwarded`, `baggage`, `traceparent`, ...).
    pub headers: http::HeaderMap,
    /// The connection it came on.
    pub conn: Arc<ConnInfo>,
}

/// The handler's answer.
pub enum Decision {
    /// Answer 200 and join the tunnel to this stream.
    Tunnel(Box<dyn Tunnel>),
    /// Answer with this status and end the stream; the flag is Envoy's response flag for logs.
    Refuse(StatusCode, &'static str),
}

/// Why the server drains or drops a connection on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnEvent {
    /// No stream for `idle_timeout`: GOAWAY.
    IdleTimeout,
    /// `max_connection_duration` reached: GOAWAY, in-flight tunnels finish.
    MaxDuration,
    /// `max_requests_per_connection` streams served: GOAWAY.
    MaxRequests,
    /// A keepalive PING went unanswered: the connection is closed.
    KeepaliveTimeout,
}

/// Decides what to do with CONNECT requests.
pub trait ConnectHandler: Send + Sync + 'static {
    /// Handles one request.
    fn connect(&self, req: ConnectRequest) -> Pin<Box<dyn Future<Output = Decision> + Send>>;

    /// Told when the server drains or drops a connection on its own (for stats).
    fn event(&self, _event: ConnEvent) {}
}

fn h2_builder(s: &H2Settings) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.max_concurrent_streams(s.max_concurrent_streams)
        .max_header_list_size(s.max_header_list_size)
        .initial_window_size(s.initial_stream_window)
        .initial_connection_window_size(s.initial_connection_window)
        .max_pending_accept_reset_streams(s.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(Some(s.max_local_error_reset_streams));
    b
}

/// Serves HBONE on an established TLS connection until it closes or `drain` fires (then GOAWAY,
/// and in-flight tunnels finish). The connection's own limits drain it the same way (no stream
/// for `idle_timeout`, `max_connection_duration`, `max_requests_per_connection`); a keepalive
/// PING left unanswered closes it at once.
pub async fn serve_connection<IO>(
    io: IO,
    conn: ConnInfo,
    settings: &H2Settings,
    handler: Arc<dyn ConnectHandler>,
    mut drain: watch::Receiver<bool>,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let opened = tokio::time::Instant::now();
    let mut connection = tokio::time::timeout(
        settings.handshake_timeout,
        h2_builder(settings).handshake::<_, Bytes>(crate::io::coalesce::Coalesce::new(io)),
    )
    .await
    .map_err(|_| HboneError::Timeout("HTTP/2 handshake"))??;
    let conn = Arc::new(conn);
    let mut keepalive = Keepalive::start(connection.ping_pong(), settings);
    let activity = ConnActivity::new();
    let (idle, max_duration) = (
        settings.idle_timeout.filter(|d| !d.is_zero()),
        settings.max_connection_duration.filter(|d| !d.is_zero()),
    );
    let mut served: u32 = 0;
    let mut draining = false;
    loop {
        let mut drain_for = None;
        tokio::select! {
            next = connection.accept() => match next {
                Some(Ok((req, respond))) => {
                    let (handler, conn) = (handler.clone(), conn.clone());
                    // The stream counts for the idle timeout until its tunnel closes.
                    let stream = activity.stream();
                    tokio::spawn(async move {
                        let _stream = stream;
                        handle_stream(req, respond, conn, handler).await
                    });
                    served = served.saturating_add(1);
                    if settings.max_requests_per_connection.is_some_and(|m| served >= m) {
                        drain_for = Some(ConnEvent::MaxRequests);
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(target: "hbone", remote = %conn.remote, "connection error: {e}");
                    return Err(e.into());
                }
                None => return Ok(()),
            },
            changed = drain.changed(), if !draining => {
                if changed.is_err() || *drain.borrow() {
                    draining = true;
                    connection.graceful_shutdown();
                }
            }
            _ = async {
                match idle {
                    Some(d) => activity.idle_for(d).await,
                    None => std::future::pending().await,
                }
            }, if !draining => drain_for = Some(ConnEvent::IdleTimeout),
            _ = async {
                match max_duration {
                    Some(d) => tokio::time::sleep_until(opened + d).await,
                    None => std::future::pending().await,
                }
            }, if !draining => drain_for = Some(ConnEvent::MaxDuration),
            _ = keepalive_dead(&mut keepalive) => {
                tracing::debug!(target: "hbone", remote = %conn.remote, "keepalive PING unanswered; closing");
                handler.event(ConnEvent::KeepaliveTimeout);
                // Dropping the connection closes the socket and ends its streams.
                return Err(HboneError::Timeout("keepalive PING"));
            }
        }
        if let Some(event) = drain_for
            && !draining
        {
            tracing::debug!(target: "hbone", remote = %conn.remote, ?event, "draining the connection");
            handler.event(event);
            draining = true;
            connection.graceful_shutdown();
        }
    }
}

fn respond_status(mut respond: h2::server::SendResponse<Bytes>, status: StatusCode) {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    let _ = respond.send_response(resp, true);
}

async fn handle_stream(
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    conn: Arc<ConnInfo>,
    handler: Arc<dyn ConnectHandler>,
) {
    if req.method() != Method::CONNECT {
        return respond_status(respond, StatusCode::METHOD_NOT_ALLOWED);
    }
    // Classic CONNECT only: no :protocol (extended CONNECT), no :path.
    if req.extensions().get::<h2::ext::Protocol>().is_some()
        || req
            .uri()
            .path_and_query()
            .is_some_and(|p| !p.as_str().is_empty() && p.as_str() != "/")
    {
        return respond_status(respond, StatusCode::BAD_REQUEST);
    }
    let Some(authority) = req.uri().authority().map(|a| a.as_str().to_owned()) else {
        return respond_status(respond, StatusCode::BAD_REQUEST);
    };
    let (parts, body) = req.into_parts();
    let decision = handler
        .connect(ConnectRequest {
            authority: authority.clone(),
            headers: parts.headers,
            conn: conn.clone(),
        })
        .await;
    match decision {
        Decision::Refuse(status, flag) => {
            tracing::debug!(target: "hbone", %authority, %status, flag, "CONNECT refused");
            respond_status(respond, status);
        }
        Decision::Tunnel(mut upstream) => {
            let send = match respond.send_response(Response::new(()), false) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(target: "hbone", "stream gone before 200: {e}");
                    return;
                }
            };
            let mut tunnel = H2Stream::new(send, body);
            match crate::io::join(&mut tunnel, &mut upstream).await {
                (up, down, None) => {
                    tracing::trace!(target: "hbone", %authority, up, down, "tunnel closed")
                }
                (up, down, Some(e)) => {
                    tracing::debug!(target: "hbone", %authority, up, down, "tunnel ended: {e}")
                }
            }
        }
    }
}
