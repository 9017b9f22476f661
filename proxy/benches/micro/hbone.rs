//! HBONE in-process over loopback: the proxy's client (`hbone::client::HboneClient`, as
//! `connect_originate` uses it) against its server (`hbone::server::serve_connection`, as
//! `connect_terminate` runs it) with mutual TLS 1.3 from a test CA (ECDSA P-256 leaves, rcgen). The
//! server's handler joins each tunnel to an in-memory echo, so a round trip crosses both HTTP/2
//! stacks and the server's tunnel copy, but no application socket.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc};

use criterion::Criterion;
use proxy::hbone::{
    H2Settings,
    client::HboneClient,
    server::{ConnInfo, ConnectHandler, ConnectRequest, Decision, serve_connection},
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    runtime::Runtime,
    sync::watch,
};
use waypoint_shared::tls::{Identity, mesh_client_config, mesh_server_config};

/// Bytes sent and echoed per round trip.
const PAYLOAD: usize = 1024;

/// The authority of every CONNECT (a pod's `ip:targetPort`).
const AUTHORITY: &str = "10.244.1.5:8080";

/// A CA and two SPIFFE identities under it: the waypoint (client) and the destination (server).
fn identities() -> (Identity, Identity) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca_params.self_signed(&ca_key).expect("CA cert").pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |uri: &str| {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri.try_into().expect("URI SAN"))];
        let cert = params.signed_by(&key, &issuer).expect("leaf cert");
        Identity {
            cert_chain_pem: format!("{}{}", cert.pem(), ca_pem),
            key_pem: key.serialize_pem(),
            roots_pem: ca_pem.clone(),
        }
    };
    (
        leaf("spiffe://cluster.local/ns/default/sa/waypoint"),
        leaf("spiffe://cluster.local/ns/default/sa/httpbin"),
    )
}

/// Answers every CONNECT with 200 and an echo of the tunnel's bytes.
struct Echo;

impl ConnectHandler for Echo {
    fn connect(&self, _req: ConnectRequest) -> Pin<Box<dyn Future<Output = Decision> + Send>> {
        Box::pin(async {
            let (tunnel, app) = tokio::io::duplex(64 * 1024);
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(app);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
            Decision::Tunnel(Box::new(tunnel))
        })
    }
}

/// Starts the HBONE server on `127.0.0.1:0` inside `rt`; returns its address.
fn start_server(rt: &Runtime, tls: rustls::ServerConfig) -> SocketAddr {
    let listener = rt
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let handler: Arc<dyn ConnectHandler> = Arc::new(Echo);
    // The sender lives as long as the accept loop: no drain during the bench.
    let (drain_tx, drain) = watch::channel(false);
    rt.spawn(async move {
        let _drain_tx = drain_tx;
        while let Ok((tcp, remote)) = listener.accept().await {
            let (acceptor, handler, drain) = (acceptor.clone(), handler.clone(), drain.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let info = ConnInfo {
                    remote,
                    local: addr,
                    peer_identity: None,
                    local_identity: None,
                };
                let _ = serve_connection(tls, info, &H2Settings::default(), handler, drain).await;
            });
        }
    });
    addr
}

/// CONNECT, 200, then `PAYLOAD` bytes out and back; the tunnel is closed after.
async fn round_trip(client: &HboneClient, addr: SocketAddr, buf: &mut [u8]) {
    let mut tunnel = client
        .connect(addr, AUTHORITY, &[])
        .await
        .expect("CONNECT accepted");
    let payload = [0x5a_u8; PAYLOAD];
    tunnel.stream.write_all(&payload).await.expect("write");
    tunnel.stream.read_exact(buf).await.expect("echo");
    let _ = tunnel.stream.shutdown().await;
}

/// `hbone/*`: a tunnel with a 1 KiB round trip on an established connection; a new connection's
/// TCP + mTLS 1.3 + HTTP/2 handshake + CONNECT/200, with a full TLS handshake and with TLS
/// session resumption (the client's default, and what repeated dials to one pod get).
pub fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (waypoint, destination) = identities();
    let server_tls = mesh_server_config(&destination, vec![], &[b"h2"]).expect("server TLS");
    let addr = start_server(&rt, server_tls);
    let client_tls = Arc::new(mesh_client_config(&waypoint, vec![], &[b"h2"]).expect("client TLS"));
    let mut full = (*client_tls).clone();
    full.resumption = rustls::client::Resumption::disabled();
    let full = Arc::new(full);

    let mut group = c.benchmark_group("hbone");
    let pooled = HboneClient::new(client_tls.clone(), H2Settings::default(), 100);
    let mut buf = vec![0_u8; PAYLOAD];
    rt.block_on(round_trip(&pooled, addr, &mut buf));
    assert_eq!(pooled.connections_opened(), 1);
    group.bench_function("stream_connect_1k_echo_pooled_conn", |b| {
        b.to_async(&rt).iter(|| {
            let (pooled, mut buf) = (&pooled, vec![0_u8; PAYLOAD]);
            async move { round_trip(pooled, addr, &mut buf).await }
        })
    });
    assert_eq!(
        pooled.connections_opened(),
        1,
        "tunnels shared one connection"
    );

    for (label, tls) in [
        ("new_conn_full_handshake_connect", full),
        ("new_conn_resumed_connect", client_tls),
    ] {
        group.bench_function(label, |b| {
            b.to_async(&rt).iter(|| {
                let client = HboneClient::new(tls.clone(), H2Settings::default(), 100);
                async move {
                    let tunnel = client
                        .connect(addr, AUTHORITY, &[])
                        .await
                        .expect("CONNECT accepted");
                    drop(tunnel);
                    client.connections_opened()
                }
            })
        });
    }
    group.finish();
}
