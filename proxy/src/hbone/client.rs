//! The HBONE client: mTLS HTTP/2 CONNECT to `podIP:15008` with `:authority` = `podIP:targetPort`.
//! Connections are pooled per destination address (one identity per client) and reused until they
//! carry `max_streams_per_connection` tunnels; broken connections are evicted.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio::{net::TcpStream, sync::Mutex};

use super::{H2Settings, HboneError, stream::H2Stream};

/// One pooled HTTP/2 connection.
struct PooledConn {
    send: h2::client::SendRequest<Bytes>,
    active: Arc<AtomicUsize>,
}

/// A tunnel plus the guard that counts it against its connection.
pub struct Tunnel {
    /// The byte stream.
    pub stream: H2Stream,
    _guard: StreamGuard,
}

struct StreamGuard(Arc<AtomicUsize>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// HBONE client with a connection pool.
pub struct HboneClient {
    tls: Arc<rustls::ClientConfig>,
    settings: H2Settings,
    max_streams_per_connection: usize,
    /// Per destination; the inner lock is held while dialing so concurrent tunnels to a new
    /// destination share the first connection instead of each opening one.
    pool: Mutex<HashMap<SocketAddr, Arc<Mutex<Vec<PooledConn>>>>>,
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
            .handshake::<_, Bytes>(tls)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(target: "hbone", %addr, "HBONE client connection ended: {e}");
            }
        });
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
        Ok(PooledConn {
            send,
            active: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// A ready connection to `addr` with room for one more stream (reused or new).
    async fn checkout(
        &self,
        addr: SocketAddr,
    ) -> Result<(h2::client::SendRequest<Bytes>, StreamGuard), HboneError> {
        let slot = self.pool.lock().await.entry(addr).or_default().clone();
        let mut conns = slot.lock().await;
        // Evict connections whose HTTP/2 side is gone.
        conns.retain_mut(|c| {
            futures::FutureExt::now_or_never(std::future::poll_fn(|cx| c.send.poll_ready(cx)))
                .is_none_or(|r| r.is_ok())
        });
        if let Some(c) = conns
            .iter()
            .find(|c| c.active.load(Ordering::Relaxed) < self.max_streams_per_connection)
        {
            c.active.fetch_add(1, Ordering::Relaxed);
            return Ok((c.send.clone(), StreamGuard(c.active.clone())));
        }
        let conn = self.dial(addr).await?;
        conn.active.fetch_add(1, Ordering::Relaxed);
        let out = (conn.send.clone(), StreamGuard(conn.active.clone()));
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
