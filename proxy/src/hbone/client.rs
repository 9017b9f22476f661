//! The HBONE client: mTLS HTTP/2 CONNECT to `podIP:15008` with `:authority` = `podIP:targetPort`.
//! Connections are pooled per destination address (one identity per client) and reused until they
//! carry `max_streams_per_connection` tunnels; broken connections are evicted. A connection
//! without tunnels for the cluster's `idle_timeout` is closed, one older than its
//! `max_connection_duration` takes no new tunnels, and keepalive PINGs (when configured) close
//! a connection whose peer stopped answering.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use crate::http::timeout::{ConnActivity, StreamGuard};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio::{net::TcpStream, sync::Mutex};

use super::{H2Settings, HboneError, Keepalive, keepalive_dead, stream::H2Stream};

/// One pooled HTTP/2 connection.
struct PooledConn {
    send: h2::client::SendRequest<Bytes>,
    activity: Arc<ConnActivity>,
    /// After `max_connection_duration`: no new tunnels.
    retire_at: Option<tokio::time::Instant>,
    /// Tunnels opened on it so far (`max_requests_per_connection`).
    served: u32,
}

/// A tunnel plus the guard that counts it against its connection.
pub struct Tunnel {
    /// The byte stream.
    pub stream: H2Stream,
    _guard: StreamGuard,
}

/// The pooled connections to one destination from one worker.
type Slot = Arc<Mutex<Vec<PooledConn>>>;

/// HBONE client with a connection pool.
pub struct HboneClient {
    tls: Arc<rustls::ClientConfig>,
    settings: H2Settings,
    max_streams_per_connection: usize,
    /// Per destination and worker thread (a tunnel and its HTTP/2 connection share a thread, as
    /// Envoy's per-worker pools do); the inner lock is held while dialing so concurrent tunnels
    /// to a new destination share the first connection instead of each opening one.
    pool: Mutex<HashMap<(SocketAddr, usize), Slot>>,
    connections_opened: AtomicUsize,
}

impl HboneClient {
    /// A client presenting the identity in `tls` (see `waypoint_shared::tls::mesh_client_config`).
    pub fn new(
        tls: Arc<rustls::ClientConfig>,
        settings: H2Settings,
        max_streams_per_connection: usize,
    ) -> Self {
        HboneClient {
            tls,
            settings,
            max_streams_per_connection: max_streams_per_connection.max(1),
            pool: Mutex::new(HashMap::new()),
            connections_opened: AtomicUsize::new(0),
        }
    }

    /// How many connections were opened so far.
    pub fn connections_opened(&self) -> usize {
        self.connections_opened.load(Ordering::Relaxed)
    }

    async fn dial(&self, addr: SocketAddr) -> Result<PooledConn, HboneError> {
        let tcp = tokio::time::timeout(self.settings.handshake_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| HboneError::Timeout("TCP connect"))?
            .map_err(|source| HboneError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        if let Some(k) = &self.settings.tcp_keepalive {
            crate::upstream::connect::set_tcp_keepalive(&tcp, k);
        }
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let tls = tokio::time::timeout(
            self.settings.handshake_timeout,
            connector.connect(ServerName::IpAddress(addr.ip().into()), tcp),
        )
        .await
        .map_err(|_| HboneError::Timeout("TLS handshake"))?
        .map_err(|source| HboneError::Tls { addr, source })?;
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(self.settings.initial_stream_window)
            .initial_connection_window_size(self.settings.initial_connection_window)
            .max_header_list_size(self.settings.max_header_list_size)
            .handshake::<_, Bytes>(crate::io::coalesce::Coalesce::new(tls))
            .await?;
        let mut connection = connection;
        let mut keepalive = Keepalive::start(connection.ping_pong(), &self.settings);
        let activity = ConnActivity::new();
        let idle = self.settings.idle_timeout.filter(|d| !d.is_zero());
        let watched = activity.clone();
        tokio::spawn(async move {
            // Dropping the connection (idle, dead peer) closes the socket; the pool sees it
            // closed at the next checkout.
            tokio::select! {
                r = &mut connection => {
                    if let Err(e) = r {
                        tracing::debug!(target: "hbone", %addr, "HBONE client connection ended: {e}");
                    }
                }
                _ = async {
                    match idle {
                        Some(d) => watched.idle_for(d).await,
                        None => std::future::pending().await,
                    }
                } => tracing::debug!(target: "hbone", %addr, "HBONE connection idle; closing"),
                _ = keepalive_dead(&mut keepalive) => {
                    tracing::debug!(target: "hbone", %addr, "keepalive PING unanswered; closing");
                }
            }
        });
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
        Ok(PooledConn {
            send,
            activity,
            served: 0,
            retire_at: self
                .settings
                .max_connection_duration
                .filter(|d| !d.is_zero())
                .map(|d| tokio::time::Instant::now() + d),
        })
    }

    /// A ready connection to `addr` with room for one more stream (reused or new).
    async fn checkout(
        &self,
        addr: SocketAddr,
    ) -> Result<(h2::client::SendRequest<Bytes>, StreamGuard), HboneError> {
        let slot = self
            .pool
            .lock()
            .await
            .entry((addr, crate::workers::current()))
            .or_default()
            .clone();
        let mut conns = slot.lock().await;
        // Evict connections whose HTTP/2 side is gone, and those past `max_connection_duration`
        // (their tunnels finish; the connection closes with its last one).
        let now = tokio::time::Instant::now();
        let max_requests = self.settings.max_requests_per_connection;
        conns.retain_mut(|c| {
            c.retire_at.is_none_or(|t| t > now)
                && max_requests.is_none_or(|m| c.served < m)
                && futures::FutureExt::now_or_never(std::future::poll_fn(|cx| {
                    c.send.poll_ready(cx)
                }))
                .is_none_or(|r| r.is_ok())
        });
        if let Some(c) = conns
            .iter_mut()
            .find(|c| c.activity.active() < self.max_streams_per_connection)
        {
            c.served = c.served.saturating_add(1);
            return Ok((c.send.clone(), c.activity.stream()));
        }
        let mut conn = self.dial(addr).await?;
        conn.served = 1;
        let out = (conn.send.clone(), conn.activity.stream());
        conns.push(conn);
        Ok(out)
    }

    /// Opens a tunnel to `authority` through the HBONE server at `addr`, with extra `headers`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        authority: &str,
        headers: &[(&str, String)],
    ) -> Result<Tunnel, HboneError> {
        let (send, guard) = self.checkout(addr).await?;
        let mut send = send.ready().await?;
        let mut req = Request::builder().method(Method::CONNECT).uri(authority);
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        let req = req
            .body(())
            .map_err(|e| HboneError::Request(e.to_string()))?;
        let (response, send_stream) = send.send_request(req, false)?;
        let response = tokio::time::timeout(self.settings.handshake_timeout, response)
            .await
            .map_err(|_| HboneError::Timeout("CONNECT response"))??;
        if response.status() != StatusCode::OK {
            return Err(HboneError::Refused {
                authority: authority.to_owned(),
                status: response.status(),
            });
        }
        Ok(Tunnel {
            stream: H2Stream::new(send_stream, response.into_body()),
            _guard: guard,
        })
    }
}
