//! HBONE: HTTP/2 CONNECT tunnels over mutual TLS 1.3 (reference/istio-facts.md §3).
//!
//! [`server`] terminates HBONE (the waypoint's `connect_terminate` on :15008): classic CONNECT only,
//! `:authority` = `ip:port`, 200 when the tunnel is up. [`client`] originates HBONE to a destination's
//! `podIP:15008` (`connect_originate`), reusing connections per destination up to a stream cap.
//! [`stream::H2Stream`] turns one HTTP/2 stream into a byte stream with flow-control backpressure.

pub mod client;
pub mod server;
pub mod stream;

use std::time::Duration;

/// HTTP/2 settings for HBONE connections; every limit is explicit (DESIGN §3, STYLE habit 6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct H2Settings {
    /// SETTINGS_MAX_CONCURRENT_STREAMS we advertise (istiod: 100 on connect_terminate).
    pub max_concurrent_streams: u32,
    /// PING interval on idle connections (istiod: 10s); `None` disables.
    pub keepalive_interval: Option<Duration>,
    /// How long a PING may go unanswered before the connection is closed (istiod: 20s).
    pub keepalive_timeout: Duration,
    /// Random extra delay before each PING, in percent of the interval (Envoy's
    /// `interval_jitter` default: 15 %).
    pub keepalive_jitter_percent: u32,
    /// Close the connection after this long without streams (`common_http_protocol_options.
    /// idle_timeout`, Envoy's default 1 h; `None`: never).
    pub idle_timeout: Option<Duration>,
    /// Drain the connection (GOAWAY) this long after it opened (`max_connection_duration`).
    pub max_connection_duration: Option<Duration>,
    /// Streams one connection carries in all (`max_requests_per_connection`): the server drains
    /// it after that many, the client opens a new one.
    pub max_requests_per_connection: Option<u32>,
    /// Client: TCP keepalive on the connection's socket (`upstream_connection_options`).
    pub tcp_keepalive: Option<crate::config::cluster::TcpKeepalive>,
    /// SETTINGS_MAX_HEADER_LIST_SIZE (Envoy default: 60 KiB of request headers).
    pub max_header_list_size: u32,
    /// Initial stream window.
    pub initial_stream_window: u32,
    /// Initial connection window.
    pub initial_connection_window: u32,
    /// Streams reset by the peer before we accepted them, before GOAWAY (rapid-reset defence).
    pub max_pending_accept_reset_streams: usize,
    /// Streams we reset because of peer errors, before GOAWAY.
    pub max_local_error_reset_streams: usize,
    /// TLS + HTTP/2 handshake deadline.
    pub handshake_timeout: Duration,
}

impl Default for H2Settings {
    fn default() -> Self {
        H2Settings {
            max_concurrent_streams: 100,
            keepalive_interval: Some(Duration::from_secs(10)),
            keepalive_timeout: Duration::from_secs(20),
            keepalive_jitter_percent: 15,
            idle_timeout: Some(Duration::from_secs(3600)),
            max_connection_duration: None,
            max_requests_per_connection: None,
            tcp_keepalive: None,
            max_header_list_size: 60 * 1024,
            initial_stream_window: 4 * 1024 * 1024,
            initial_connection_window: 16 * 1024 * 1024,
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 1024,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// A running keepalive: HTTP/2 PINGs every interval (plus jitter), and a signal when one went
/// unanswered for the timeout (Envoy's `connection_keepalive`). The PINGs run in their own task so
/// that a PING in flight is never cancelled by the connection's loop; dropping this stops them.
pub(crate) struct Keepalive {
    task: tokio::task::JoinHandle<()>,
    /// Taken once it resolved (a finished receiver must not be polled again).
    dead: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Keepalive {
    /// Starts PINGs on `ping_pong` per `s` (`None` without an interval).
    pub(crate) fn start(ping_pong: Option<h2::PingPong>, s: &H2Settings) -> Option<Keepalive> {
        let (interval, mut pp) = (s.keepalive_interval.filter(|i| !i.is_zero())?, ping_pong?);
        let (timeout, jitter) = (s.keepalive_timeout, s.keepalive_jitter_percent);
        let (tx, dead) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            loop {
                let spread = interval.as_millis() * u128::from(jitter) / 100;
                let extra = match u64::try_from(spread) {
                    Ok(0) | Err(_) => 0,
                    Ok(n) => rand::random::<u64>() % n,
                };
                tokio::time::sleep(interval + Duration::from_millis(extra)).await;
                match tokio::time::timeout(timeout, pp.ping(h2::Ping::opaque())).await {
                    Ok(Ok(_)) => {}
                    // The connection is gone; its owner notices by itself.
                    Ok(Err(_)) => return,
                    Err(_) => {
                        let _ = tx.send(());
                        return;
                    }
                }
            }
        });
        Some(Keepalive {
            task,
            dead: Some(dead),
        })
    }

    /// Resolves when a PING went unanswered (never if the connection ended first).
    pub(crate) async fn dead(&mut self) {
        if let Some(rx) = self.dead.as_mut() {
            let r = rx.await;
            self.dead = None;
            if r.is_ok() {
                return;
            }
        }
        std::future::pending::<()>().await;
    }
}

impl Drop for Keepalive {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits on an optional keepalive (forever without one).
pub(crate) async fn keepalive_dead(k: &mut Option<Keepalive>) {
    match k {
        Some(k) => k.dead().await,
        None => std::future::pending().await,
    }
}

/// Errors of HBONE connections and tunnels.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    /// TCP connect failed (Envoy flag `UF`).
    #[error("connect {addr}: {source}")]
    Connect {
        /// Destination.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// TLS handshake failed.
    #[error("TLS with {addr}: {source}")]
    Tls {
        /// Peer.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// HTTP/2 protocol error.
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    /// The peer answered the CONNECT with a non-200 status.
    #[error("CONNECT to {authority} refused with {status}")]
    Refused {
        /// The authority asked for.
        authority: String,
        /// The status received.
        status: http::StatusCode,
    },
    /// A handshake or request did not finish in time.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// A malformed request could not be built.
    #[error("bad request: {0}")]
    Request(String),
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, sync::Arc};

    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
    };
    use waypoint_shared::tls::{Identity, SanMatcher, mesh_client_config, mesh_server_config};

    use super::{
        H2Settings, HboneError,
        client::HboneClient,
        server::{ConnInfo, ConnectHandler, ConnectRequest, Decision, serve_connection},
    };

    fn identities() -> (Identity, Identity) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root = params.self_signed(&key).expect("root");
        let issuer = Issuer::new(params, key);
        let leaf = |uri: &str| {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::default();
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.subject_alt_names = vec![SanType::URI(uri.try_into().expect("uri"))];
            let cert = p.signed_by(&key, &issuer).expect("leaf");
            Identity {
                cert_chain_pem: cert.pem(),
                key_pem: key.serialize_pem(),
                roots_pem: root.pem(),
            }
        };
        (
            leaf("spiffe://cluster.local/ns/default/sa/waypoint"),
            leaf("spiffe://cluster.local/ns/default/sa/sleep"),
        )
    }

    /// Routes `…:7` to a TCP echo server, refuses the rest with 503 (`UH`), and records peers
    /// and connection events.
    struct Router {
        echo: SocketAddr,
        seen: tokio::sync::mpsc::UnboundedSender<(String, Option<String>, Option<String>)>,
        events: Option<tokio::sync::mpsc::UnboundedSender<super::server::ConnEvent>>,
    }

    impl ConnectHandler for Router {
        fn connect(
            &self,
            req: ConnectRequest,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Decision> + Send>> {
            let echo = self.echo;
            let _ = self.seen.send((
                req.authority.clone(),
                req.conn.peer_identity.clone(),
                req.headers
                    .get("forwarded")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            ));
            Box::pin(async move {
                if !req.authority.ends_with(":7") {
                    return Decision::Refuse(http::StatusCode::SERVICE_UNAVAILABLE, "UH");
                }
                match TcpStream::connect(echo).await {
                    Ok(s) => Decision::Tunnel(Box::new(s)),
                    Err(_) => Decision::Refuse(http::StatusCode::SERVICE_UNAVAILABLE, "UF"),
                }
            })
        }

        fn event(&self, event: super::server::ConnEvent) {
            if let Some(tx) = &self.events {
                let _ = tx.send(event);
            }
        }
    }

    async fn tcp_echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn hbone_server(server_id: &Identity, router: Arc<Router>) -> SocketAddr {
        hbone_server_with(server_id, router, H2Settings::default()).await
    }

    async fn hbone_server_with(
        server_id: &Identity,
        router: Arc<Router>,
        settings: H2Settings,
    ) -> SocketAddr {
        let tls = Arc::new(
            mesh_server_config(
                server_id,
                vec![SanMatcher::Prefix("spiffe://cluster.local/".into())],
                &[b"h2"],
            )
            .expect("tls"),
        );
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (_drain_tx, drain_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let _keep = _drain_tx;
            while let Ok((tcp, remote)) = l.accept().await {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
                let (router, drain, settings) =
                    (router.clone(), drain_rx.clone(), settings.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let peer = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| waypoint_shared::tls::uri_sans(c.as_ref()).join(","));
                    let info = ConnInfo {
                        remote,
                        local: addr,
                        peer_identity: peer,
                        local_identity: Some(
                            "spiffe://cluster.local/ns/default/sa/waypoint".into(),
                        ),
                    };
                    let _ = serve_connection(tls, info, &settings, router, drain).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn tunnels_share_a_connection_and_refusals_carry_status() {
        let (waypoint, sleep) = identities();
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let server = hbone_server(
            &waypoint,
            Arc::new(Router {
                echo: tcp_echo().await,
                seen: seen_tx,
                events: None,
            }),
        )
        .await;
        let client_tls = mesh_client_config(
            &sleep,
            vec![SanMatcher::Exact(
                "spiffe://cluster.local/ns/default/sa/waypoint".into(),
            )],
            &[b"h2"],
        )
        .expect("client tls");
        let client = Arc::new(HboneClient::new(
            Arc::new(client_tls),
            H2Settings::default(),
            100,
        ));

        let mut tasks = Vec::new();
        for i in 0..20u8 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut t = client
                    .connect(
                        server,
                        "10.0.0.1:7",
                        &[("forwarded", format!("for=\"127.0.0.1:{i}\""))],
                    )
                    .await
                    .expect("tunnel");
                let msg = vec![i; 100_000];
                t.stream.write_all(&msg).await.expect("write");
                let mut back = vec![0u8; msg.len()];
                t.stream.read_exact(&mut back).await.expect("read");
                assert_eq!(back, msg);
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(
            client.connections_opened(),
            1,
            "20 tunnels over one HBONE connection"
        );
        let (authority, peer, forwarded) = seen.recv().await.expect("seen");
        assert_eq!(authority, "10.0.0.1:7");
        assert_eq!(
            peer.as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/sleep")
        );
        assert!(forwarded.is_some_and(|f| f.starts_with("for=")));

        match client.connect(server, "10.0.0.1:8", &[]).await {
            Err(HboneError::Refused { status, .. }) => {
                assert_eq!(status, http::StatusCode::SERVICE_UNAVAILABLE)
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("refusal expected"),
        }
    }

    #[tokio::test]
    async fn non_connect_is_refused_and_stream_cap_opens_more_connections() {
        let (waypoint, sleep) = identities();
        let (seen_tx, _seen) = tokio::sync::mpsc::unbounded_channel();
        let server = hbone_server(
            &waypoint,
            Arc::new(Router {
                echo: tcp_echo().await,
                seen: seen_tx,
                events: None,
            }),
        )
        .await;
        let client_tls =
            Arc::new(mesh_client_config(&sleep, vec![], &[b"h2"]).expect("client tls"));

        // A plain GET over the same mTLS + h2 is refused with 405.
        let tcp = TcpStream::connect(server).await.expect("tcp");
        let tls = tokio_rustls::TlsConnector::from(client_tls.clone())
            .connect(
                rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
                tcp,
            )
            .await
            .expect("tls");
        let (send, conn) = h2::client::handshake(tls).await.expect("h2");
        tokio::spawn(conn);
        let mut send = send.ready().await.expect("ready");
        let req = http::Request::get("https://10.0.0.1:7/")
            .body(())
            .expect("req");
        let (resp, _) = send.send_request(req, true).expect("send");
        assert_eq!(
            resp.await.expect("response").status(),
            http::StatusCode::METHOD_NOT_ALLOWED
        );

        // With a cap of 2 streams per connection, 3 open tunnels need 2 connections.
        let client = HboneClient::new(client_tls, H2Settings::default(), 2);
        let a = client.connect(server, "10.0.0.1:7", &[]).await.expect("a");
        let b = client.connect(server, "10.0.0.1:7", &[]).await.expect("b");
        let c = client.connect(server, "10.0.0.1:7", &[]).await.expect("c");
        assert_eq!(client.connections_opened(), 2);
        drop((a, b));
        let _d = client.connect(server, "10.0.0.1:7", &[]).await.expect("d");
        assert_eq!(client.connections_opened(), 2, "freed capacity is reused");
        drop(c);
    }

    fn tls_client(id: &Identity) -> Arc<rustls::ClientConfig> {
        Arc::new(mesh_client_config(id, vec![], &[b"h2"]).expect("client tls"))
    }

    #[tokio::test]
    async fn server_keepalive_pings_and_drops_a_peer_that_never_answers() {
        let (waypoint, sleep) = identities();
        let (seen_tx, _seen) = tokio::sync::mpsc::unbounded_channel();
        let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        let settings = H2Settings {
            keepalive_interval: Some(std::time::Duration::from_millis(100)),
            keepalive_timeout: std::time::Duration::from_millis(200),
            ..H2Settings::default()
        };
        let server = hbone_server_with(
            &waypoint,
            Arc::new(Router {
                echo: tcp_echo().await,
                seen: seen_tx,
                events: Some(events_tx),
            }),
            settings,
        )
        .await;
        // A raw HTTP/2 client over mTLS: preface, SETTINGS, an ACK of the server's SETTINGS,
        // and then silence: PINGs are counted, never answered.
        let tcp = TcpStream::connect(server).await.expect("tcp");
        let mut tls = tokio_rustls::TlsConnector::from(tls_client(&sleep))
            .connect(
                rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
                tcp,
            )
            .await
            .expect("tls");
        let frame = |kind: u8, flags: u8| vec![0, 0, 0, kind, flags, 0, 0, 0, 0];
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(frame(0x4, 0));
        tls.write_all(&hello).await.expect("preface");
        let (mut pings, mut head) = (0, [0u8; 9]);
        let closed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while tls.read_exact(&mut head).await.is_ok() {
                let len = (usize::from(head[0]) << 16)
                    | (usize::from(head[1]) << 8)
                    | usize::from(head[2]);
                let mut payload = vec![0u8; len];
                if tls.read_exact(&mut payload).await.is_err() {
                    break;
                }
                match (head[3], head[4] & 1) {
                    (0x4, 0) => {
                        let _ = tls.write_all(&frame(0x4, 1)).await;
                    }
                    (0x6, 0) => pings += 1,
                    _ => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the silent peer was dropped");
        assert!(pings >= 1, "PINGs were sent");
        assert_eq!(
            events.recv().await,
            Some(super::server::ConnEvent::KeepaliveTimeout)
        );
        // A peer that answers (the h2 crate does) keeps its connection past several intervals.
        let client = HboneClient::new(tls_client(&sleep), H2Settings::default(), 100);
        let mut t = client
            .connect(server, "10.0.0.1:7", &[])
            .await
            .expect("tunnel");
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        t.stream.write_all(b"still here").await.expect("write");
        let mut back = [0u8; 10];
        t.stream.read_exact(&mut back).await.expect("read");
        assert_eq!(&back, b"still here");
    }

    #[tokio::test]
    async fn idle_connections_are_closed_on_both_sides() {
        let (waypoint, sleep) = identities();
        let (seen_tx, _seen) = tokio::sync::mpsc::unbounded_channel();
        let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        let server = hbone_server_with(
            &waypoint,
            Arc::new(Router {
                echo: tcp_echo().await,
                seen: seen_tx,
                events: Some(events_tx),
            }),
            H2Settings {
                idle_timeout: Some(std::time::Duration::from_millis(200)),
                ..H2Settings::default()
            },
        )
        .await;
        // The server drains a connection whose last tunnel closed 200 ms ago (GOAWAY).
        let client = HboneClient::new(
            tls_client(&sleep),
            H2Settings {
                idle_timeout: None,
                ..H2Settings::default()
            },
            100,
        );
        let t = client
            .connect(server, "10.0.0.1:7", &[])
            .await
            .expect("tunnel");
        drop(t);
        assert_eq!(
            tokio::time::timeout(std::time::Duration::from_secs(10), events.recv())
                .await
                .expect("in time"),
            Some(super::server::ConnEvent::IdleTimeout)
        );
        // The client notices the GOAWAY and opens a new connection.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let t = client.connect(server, "10.0.0.1:7", &[]).await;
            if t.is_ok() && client.connections_opened() == 2 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "no new connection");
            tokio::task::yield_now().await;
        }
        // The client closes its own idle connections too (the server here never would).
        let quiet = hbone_server(
            &waypoint,
            Arc::new(Router {
                echo: tcp_echo().await,
                seen: tokio::sync::mpsc::unbounded_channel().0,
                events: None,
            }),
        )
        .await;
        let client = HboneClient::new(
            tls_client(&sleep),
            H2Settings {
                idle_timeout: Some(std::time::Duration::from_millis(200)),
                ..H2Settings::default()
            },
            100,
        );
        drop(
            client
                .connect(quiet, "10.0.0.1:7", &[])
                .await
                .expect("tunnel"),
        );
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            // Stay away longer than the idle timeout (the period under test), then come back:
            // the pooled connection is gone and a new one opens.
            tokio::time::sleep(std::time::Duration::from_millis(400)).await;
            drop(
                client
                    .connect(quiet, "10.0.0.1:7", &[])
                    .await
                    .expect("tunnel"),
            );
            if client.connections_opened() == 2 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the idle connection stayed"
            );
        }
    }
}
