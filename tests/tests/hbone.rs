//! HBONE workloads end to end on 127.0.0.1: istiod-lite issues the `sleep` and `waypoint`
//! certificates over gRPC/TLS; traffic goes client → hbone-forward → hbone-sink → echo.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Empty, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
    process::Command,
};
use waypoint_shared::identity::SpiffeId;
use waypoint_testbed::{
    echo::{EchoConfig, EchoServer},
    hbone::{
        ClientTls, ForwarderConfig, HboneError, HboneForwarder, HbonePool, HboneSink,
        IstiodRequest, PeerMatch, PoolSettings, SinkConfig, WorkloadIdentity,
    },
    istiod_lite::{Config, IstiodLite},
};

const WAIT: Duration = Duration::from_secs(20);
const AUTHORITY: &str = "10.96.0.100:8080";
const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const WAYPOINT: &str = "spiffe://cluster.local/ns/default/sa/waypoint";

type TestBody = BoxBody<Bytes, Infallible>;

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hbone-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// istiod-lite, the `sleep` and `waypoint` identities it issued, and an echo backend.
struct Bed {
    dir: PathBuf,
    istiod: IstiodLite,
    sleep: Arc<WorkloadIdentity>,
    waypoint: Arc<WorkloadIdentity>,
    echo: SocketAddr,
}

impl Bed {
    async fn start(tag: &str) -> Bed {
        let dir = temp_dir(tag);
        let istiod = IstiodLite::start(Config::for_test(&dir.join("ca")))
            .await
            .expect("istiod-lite starts");
        let issue = |sa: &str| {
            IstiodRequest::new(
                istiod.addr,
                istiod.root_cert_pem(),
                SpiffeId::new("cluster.local", "default", sa),
            )
        };
        let sleep = WorkloadIdentity::from_istiod(&issue("sleep"))
            .await
            .expect("sleep certificate");
        let waypoint = WorkloadIdentity::from_istiod(&issue("waypoint"))
            .await
            .expect("waypoint certificate");
        assert_eq!(sleep.spiffe_id(), SLEEP);
        assert_eq!(waypoint.spiffe_id(), WAYPOINT);
        let echo = EchoServer::bind(&EchoConfig {
            name: "echo".to_owned(),
            http: "127.0.0.1:0".parse().expect("addr"),
            grpc: None,
        })
        .await
        .expect("echo binds");
        let echo_addr = echo.http_addr();
        tokio::spawn(echo.run());
        Bed {
            dir,
            istiod,
            sleep: Arc::new(sleep),
            waypoint: Arc::new(waypoint),
            echo: echo_addr,
        }
    }

    /// A sink presenting `waypoint`, mapping port 8080 to echo.
    fn sink_config(&self) -> SinkConfig {
        let mut config = SinkConfig::new(local0(), self.waypoint.clone());
        config.port_map.insert(8080, self.echo);
        config
    }

    /// A forwarder presenting `sleep`, expecting the waypoint identity at `sink`.
    fn forwarder_config(&self, sink: SocketAddr) -> ForwarderConfig {
        let mut config = ForwarderConfig::new(local0(), sink, AUTHORITY, self.sleep.clone());
        config.expect_peer = PeerMatch::Exact(WAYPOINT.to_owned());
        config
    }
}

fn local0() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

fn empty() -> TestBody {
    Empty::new().boxed()
}

/// An HTTP/1.1 connection to `addr`; returns the sender and the client's local address.
async fn h1(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<TestBody>,
    SocketAddr,
) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let local = stream.local_addr().expect("local addr");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    (sender, local)
}

async fn get_json(
    sender: &mut hyper::client::conn::http1::SendRequest<TestBody>,
    path: &str,
) -> Value {
    let req = Request::get(path)
        .header("host", "echo.default.svc")
        .body(empty())
        .expect("request");
    let resp = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("answer in time")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    serde_json::from_slice(&body).expect("json")
}

#[tokio::test]
async fn request_through_forwarder_and_sink_reaches_echo() {
    let bed = Bed::start("basic").await;
    let sink = HboneSink::start(bed.sink_config()).await.expect("sink");
    let mut fwd_config = bed.forwarder_config(sink.addr);
    fwd_config.baggage = Some("k8s.namespace.name=default,k8s.deployment.name=sleep".to_owned());
    let forwarder = HboneForwarder::start(fwd_config).await.expect("forwarder");

    let (mut sender, client) = h1(forwarder.addr).await;
    let json = get_json(&mut sender, "/hello?x=1").await;
    assert_eq!(json["server"], "echo");
    assert_eq!(json["path"], "/hello?x=1");
    assert_eq!(json["headers"]["host"], "echo.default.svc");
    // A second request on the same client connection uses the same tunnel.
    let json = get_json(&mut sender, "/again").await;
    assert_eq!(json["path"], "/again");

    let streams = sink.wait_for_streams(1, WAIT).await.expect("recorded");
    assert_eq!(streams.len(), 1, "{streams:?}");
    let s = &streams[0];
    assert_eq!(s.peer_identity, SLEEP);
    assert_eq!(s.method, "CONNECT");
    assert_eq!(s.authority.as_deref(), Some(AUTHORITY));
    assert_eq!(s.status, 200);
    assert_eq!(s.target, Some(bed.echo));
    assert_eq!(s.forwarded, Some(format!("for=\"{client}\"")));
    assert_eq!(
        s.baggage.as_deref(),
        Some("k8s.namespace.name=default,k8s.deployment.name=sleep")
    );
    let tp = s.traceparent.as_deref().expect("traceparent");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!((parts[0], parts[1].len(), parts[2].len()), ("00", 32, 16));

    let stats = forwarder.stats();
    assert_eq!((stats.accepted, stats.established, stats.failed), (1, 1, 0));
    drop(sender);
    bed.istiod.shutdown().await;
}

#[tokio::test]
async fn concurrent_connections_share_pooled_h2_connections() {
    const N: usize = 20;
    let bed = Bed::start("pool").await;
    let sink = HboneSink::start(bed.sink_config()).await.expect("sink");
    let forwarder = HboneForwarder::start(bed.forwarder_config(sink.addr))
        .await
        .expect("forwarder");
    // Every client keeps its connection (and so its tunnel) until all have answers: 20 streams
    // are open at once.
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..N {
        let (addr, barrier) = (forwarder.addr, barrier.clone());
        clients.spawn(async move {
            let (mut sender, _) = h1(addr).await;
            let json = get_json(&mut sender, &format!("/c{i}")).await;
            assert_eq!(json["path"], format!("/c{i}"));
            barrier.wait().await;
        });
    }
    while let Some(done) = tokio::time::timeout(WAIT, clients.join_next())
        .await
        .expect("clients finish in time")
    {
        done.expect("client ok");
    }
    let stats = forwarder.stats();
    assert_eq!(stats.streams, N as u64, "{stats:?}");
    assert_eq!(stats.established, N as u64, "{stats:?}");
    assert!(
        stats.streams > stats.h2_connections && stats.h2_connections >= 1,
        "{stats:?}"
    );
    eprintln!(
        "{N} tunnels over {} HTTP/2 connection(s)",
        stats.h2_connections
    );
    let streams = sink.wait_for_streams(N, WAIT).await.expect("recorded");
    let mut conns: Vec<u64> = streams.iter().map(|s| s.connection_id).collect();
    conns.sort_unstable();
    conns.dedup();
    assert!(
        conns.len() < N,
        "{} connections for {N} streams",
        conns.len()
    );
    assert_eq!(conns.len() as u64, sink.stats().connections);
    assert!(
        streams
            .iter()
            .all(|s| s.peer_identity == SLEEP && s.status == 200)
    );
    bed.istiod.shutdown().await;
}

#[tokio::test]
async fn pool_respects_the_servers_max_concurrent_streams() {
    const N: usize = 6;
    let bed = Bed::start("maxstreams").await;
    let mut sink_config = bed.sink_config();
    sink_config.max_concurrent_streams = 2;
    let sink = HboneSink::start(sink_config).await.expect("sink");
    let forwarder = HboneForwarder::start(bed.forwarder_config(sink.addr))
        .await
        .expect("forwarder");
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..N {
        let (addr, barrier) = (forwarder.addr, barrier.clone());
        clients.spawn(async move {
            let (mut sender, _) = h1(addr).await;
            get_json(&mut sender, &format!("/m{i}")).await;
            barrier.wait().await;
        });
    }
    while let Some(done) = tokio::time::timeout(WAIT, clients.join_next())
        .await
        .expect("clients finish in time")
    {
        done.expect("client ok");
    }
    let stats = forwarder.stats();
    assert_eq!(stats.established, N as u64, "{stats:?}");
    // All six tunnels are open at once and each connection takes two.
    assert_eq!(stats.h2_connections, (N / 2) as u64, "{stats:?}");
    assert_eq!(sink.stats().connections, (N / 2) as u64);
    bed.istiod.shutdown().await;
}

/// A root of our own and a `sleep` leaf it signed.
fn foreign_identity(mesh_root_pem: &str) -> WorkloadIdentity {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "rogue root");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key).expect("issuer");
    let leaf_key = KeyPair::generate().expect("key");
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name = DistinguishedName::new();
    leaf.subject_alt_names = vec![SanType::URI(SLEEP.try_into().expect("uri"))];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).expect("leaf");
    WorkloadIdentity::from_pem(
        &format!("{}{}", leaf_cert.pem(), ca_cert.pem()),
        &leaf_key.serialize_pem(),
        mesh_root_pem,
    )
    .expect("foreign identity")
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused_at_handshake() {
    let bed = Bed::start("foreign").await;
    let sink = HboneSink::start(bed.sink_config()).await.expect("sink");
    let rogue = Arc::new(foreign_identity(bed.istiod.root_cert_pem()));
    assert_eq!(rogue.spiffe_id(), SLEEP, "same name, other CA");

    // Directly with the pool: no tunnel.
    let pool = HbonePool::new(PoolSettings::default());
    let tls = ClientTls::new(&rogue, &PeerMatch::Exact(WAYPOINT.to_owned())).expect("tls");
    let err = pool
        .connect(sink.addr, &tls, AUTHORITY, &http::HeaderMap::new())
        .await
        .expect_err("refused");
    assert!(!matches!(err, HboneError::Timeout { .. }), "{err}");
    sink.wait_for(|s| s.handshake_failures >= 1, WAIT)
        .await
        .expect("sink saw the failed handshake");
    let errors = sink.handshake_errors();
    assert!(errors[0].contains("UnknownIssuer"), "{errors:?}");

    // Through a forwarder: the client connection is closed without an answer.
    let mut config = ForwarderConfig::new(local0(), sink.addr, AUTHORITY, rogue);
    config.expect_peer = PeerMatch::Exact(WAYPOINT.to_owned());
    let forwarder = HboneForwarder::start(config).await.expect("forwarder");
    let mut client = TcpStream::connect(forwarder.addr).await.expect("connect");
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: echo\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, client.read_to_end(&mut answer))
        .await
        .expect("closed in time");
    assert!(
        read.is_err() || answer.is_empty(),
        "got an answer: {answer:?}"
    );
    assert_eq!(forwarder.stats().failed, 1);
    assert_eq!(forwarder.stats().established, 0);
    let stats = sink
        .wait_for(|s| s.handshake_failures >= 2, WAIT)
        .await
        .expect("sink saw the second failed handshake");
    assert_eq!((stats.connections, stats.streams), (0, 0), "{stats:?}");
    assert!(sink.accepted().is_empty());
    bed.istiod.shutdown().await;
}

#[tokio::test]
async fn server_identity_is_checked_by_the_client() {
    let bed = Bed::start("expect").await;
    let sink = HboneSink::start(bed.sink_config()).await.expect("sink");
    let pool = HbonePool::new(PoolSettings::default());
    let other = PeerMatch::Exact("spiffe://cluster.local/ns/default/sa/other".to_owned());
    let tls = ClientTls::new(&bed.sleep, &other).expect("tls");
    let err = pool
        .connect(sink.addr, &tls, AUTHORITY, &http::HeaderMap::new())
        .await
        .expect_err("wrong server identity");
    assert!(err.to_string().contains("is not"), "{err}");
    // The trust domain prefix accepts it.
    let tls = ClientTls::new(&bed.sleep, &PeerMatch::trust_domain("cluster.local")).expect("tls");
    let stream = pool
        .connect(sink.addr, &tls, AUTHORITY, &http::HeaderMap::new())
        .await
        .expect("tunnel");
    assert_eq!(stream.status, StatusCode::OK);
    bed.istiod.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_400_and_unreachable_apps_503() {
    let bed = Bed::start("status").await;
    // Port 9999 maps to a port nobody listens on.
    let closed = {
        let l = TcpListener::bind(local0()).await.expect("bind");
        l.local_addr().expect("addr")
    };
    let mut config = bed.sink_config();
    config.port_map.insert(9999, closed);
    let sink = HboneSink::start(config).await.expect("sink");
    let tls = ClientTls::new(&bed.sleep, &PeerMatch::Exact(WAYPOINT.to_owned())).expect("tls");

    // A plain GET over the same mTLS + h2.
    let stream = tls.connect(sink.addr).await.expect("tls");
    let (send, conn) = h2::client::handshake(stream).await.expect("h2");
    tokio::spawn(conn);
    let mut send = send.ready().await.expect("ready");
    let req = Request::get(format!("https://{AUTHORITY}/"))
        .body(())
        .expect("request");
    let (resp, _) = send.send_request(req, true).expect("send");
    let resp = tokio::time::timeout(WAIT, resp)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    // CONNECT to a name rather than ip:port, and to an unreachable app.
    let pool = HbonePool::new(PoolSettings::default());
    let headers = http::HeaderMap::new();
    let named = pool
        .connect(sink.addr, &tls, "echo.default.svc:8080", &headers)
        .await
        .expect("answered");
    assert_eq!(named.status, StatusCode::BAD_REQUEST);
    let unreachable = pool
        .connect(sink.addr, &tls, "10.96.0.100:9999", &headers)
        .await
        .expect("answered");
    assert_eq!(unreachable.status, StatusCode::SERVICE_UNAVAILABLE);

    let streams = sink.wait_for_streams(3, WAIT).await.expect("recorded");
    let statuses: Vec<(String, u16)> = streams
        .iter()
        .map(|s| (s.method.clone(), s.status))
        .collect();
    assert_eq!(
        statuses,
        [
            ("GET".to_owned(), 400),
            ("CONNECT".to_owned(), 400),
            ("CONNECT".to_owned(), 503)
        ]
    );
    assert_eq!(streams[2].target, Some(closed));
    bed.istiod.shutdown().await;
}

#[tokio::test]
async fn twenty_mib_upload_and_download_round_trip() {
    const SIZE: usize = 20 << 20;
    const CHUNK: usize = 64 << 10;
    let bed = Bed::start("big").await;
    let sink = HboneSink::start(bed.sink_config()).await.expect("sink");
    let forwarder = HboneForwarder::start(bed.forwarder_config(sink.addr))
        .await
        .expect("forwarder");

    // Upload: a streamed body (one shared 64 KiB chunk, sent SIZE / CHUNK times).
    let (mut sender, _) = h1(forwarder.addr).await;
    let chunk = Bytes::from(vec![0x5a; CHUNK]);
    let frames = futures::stream::iter(
        (0..SIZE / CHUNK).map(move |_| Ok::<_, Infallible>(Frame::data(chunk.clone()))),
    );
    let req = Request::post("/upload")
        .header("host", "echo")
        .header("content-length", SIZE)
        .body(StreamBody::new(frames).boxed())
        .expect("request");
    let started = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(120), sender.send_request(req))
        .await
        .expect("upload in time")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let json: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(json["body_len"], SIZE as u64);
    eprintln!("20 MiB upload took {:?}", started.elapsed());

    // Download: counted as it streams.
    let req = Request::get("/download")
        .header("host", "echo")
        .header("x-echo-response-size", SIZE)
        .body(empty())
        .expect("request");
    let resp = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut total = 0usize;
    let mut ok = true;
    let download = async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("frame").into_data() {
                ok &= data
                    .iter()
                    .enumerate()
                    .all(|(i, b)| *b == ((total + i) % 256) as u8);
                total += data.len();
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), download)
        .await
        .expect("download in time");
    assert_eq!(total, SIZE);
    assert!(ok, "downloaded bytes differ from the generated pattern");
    assert_eq!(forwarder.stats().streams, 1, "one tunnel for both requests");
    bed.istiod.shutdown().await;
}

#[tokio::test]
async fn identity_round_trips_through_files() {
    let bed = Bed::start("files").await;
    let dir = bed.dir.join("sleep");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let (cert, key, root) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("root.pem"),
    );
    std::fs::write(&cert, bed.sleep.chain_pem()).expect("write");
    std::fs::write(&key, bed.sleep.key_pem()).expect("write");
    std::fs::write(&root, bed.sleep.root_pem()).expect("write");
    let loaded = WorkloadIdentity::from_files(&cert, &key, &root).expect("loads");
    assert_eq!(loaded.spiffe_id(), SLEEP);
    assert_eq!(loaded.root_pem().trim(), bed.istiod.root_cert_pem().trim());
    // The root has no SPIFFE id: it cannot be a workload certificate.
    assert!(matches!(
        WorkloadIdentity::from_files(&root, &key, &cert),
        Err(HboneError::NoSpiffeId)
    ));
    bed.istiod.shutdown().await;
}

/// Reads lines from a child's stdout until one starts with `prefix`; returns the address after
/// "ready on ".
async fn ready_addr(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    prefix: &str,
) -> SocketAddr {
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("ready line in time")
        .expect("read stdout")
        .expect("a line before exit");
    let addr = line
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("unexpected first line: {line}"));
    addr.trim().parse().expect("address")
}

#[tokio::test]
async fn binaries_forward_and_report() {
    let bed = Bed::start("bins").await;
    let root = bed.dir.join("ca/root-cert.pem");
    let report = bed.dir.join("streams.jsonl");
    let istiod = bed.istiod.addr.to_string();
    let mut sink = Command::new(env!("CARGO_BIN_EXE_hbone-sink"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--identity-from",
            "istiod-lite",
            &istiod,
        ])
        .arg("--ca-root")
        .arg(&root)
        .args(["--service-account", "waypoint"])
        .args(["--target-port-map", &format!("8080={}", bed.echo)])
        .args(["--allow-peer", "spiffe://cluster.local/ns/default/sa/sleep"])
        .arg("--report-file")
        .arg(&report)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn hbone-sink");
    let mut sink_out = BufReader::new(sink.stdout.take().expect("stdout")).lines();
    let sink_addr = ready_addr(&mut sink_out, "hbone-sink ready on ").await;

    let mut forward = Command::new(env!("CARGO_BIN_EXE_hbone-forward"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--waypoint",
            &sink_addr.to_string(),
        ])
        .args(["--authority", AUTHORITY, "--identity-from", &istiod])
        .arg("--ca-root")
        .arg(&root)
        .args(["--namespace", "default", "--service-account", "sleep"])
        .args(["--expect-peer", WAYPOINT])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn hbone-forward");
    let mut forward_out = BufReader::new(forward.stdout.take().expect("stdout")).lines();
    let forward_addr = ready_addr(&mut forward_out, "hbone-forward ready on ").await;

    let (mut sender, client) = h1(forward_addr).await;
    let json = get_json(&mut sender, "/via-binaries").await;
    assert_eq!(json["path"], "/via-binaries");
    // The sink writes the report line before it answers the CONNECT.
    let text = std::fs::read_to_string(&report).expect("report file");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert_eq!(lines[0]["peer_identity"], SLEEP);
    assert_eq!(lines[0]["authority"], AUTHORITY);
    assert_eq!(lines[0]["forwarded"], format!("for=\"{client}\""));
    assert_eq!(lines[0]["status"], 200);
    drop(sender);
    let _ = forward.start_kill();
    let _ = sink.start_kill();
    let _ = tokio::time::timeout(WAIT, forward.wait()).await;
    let _ = tokio::time::timeout(WAIT, sink.wait()).await;
    bed.istiod.shutdown().await;
}
