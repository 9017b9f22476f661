//! The waypoint data path end to end, through the real `agent` and `proxy` binaries: one
//! [`WaypointMesh`] per test (istiod-lite with `tests/fixtures/mesh/waypoint.yaml`, echo on
//! `POD_IP:8080`, HBONE sink on `POD_IP:15008`, the sleep client's forwarder, the agent spawning
//! this crate's proxy), all on a loopback /24 of the test's own.
//!
//! ```text
//! client ─TCP─▶ forwarder ─HBONE─▶ WAYPOINT_IP:15008 ─▶ main_internal ─▶ VIP route ─▶ EDS
//!        ─▶ connect_originate ─HBONE (as the waypoint)─▶ POD_IP:15008 sink ─TCP─▶ echo
//! ```
//!
//! * `harness_self_test`: everything but the waypoint's data path — start-up, readiness, ACKs, the
//!   loopback addresses in the proxy's config, identities — and every traffic check of the other
//!   tests run against the sink directly (forwarder → sink → echo), so a failure in the tests below
//!   points at the waypoint, not at the test bed.
//! * `http_through_the_waypoint`: curl HTTP/1.1 and h2c, h2load, WebSocket, 431 for an oversized
//!   header list, two CONNECT streams on one HBONE connection.
//! * `hbone_port_refuses_bad_clients`: TLS refusals (no client certificate, another root, a SAN
//!   outside the trust domain), a non-CONNECT request, an authority no filter chain matches, an
//!   HTTP/2 rapid-reset burst (GOAWAY); the proxy serves afterwards.
//! * `large_bodies_in_bounded_memory`: 200 MiB up and down with the proxy's peak RSS growing less
//!   than 32 MiB.
//!
//! The agent's supervision of this proxy (`kill -9` → restart, backoff, drain on SIGTERM with
//! requests in flight, PID 1) is tested with the same mesh in `agent/tests/`.
//!
//! A failing test prints the mesh's diagnostics (agent/proxy log tail, `/listeners`, dynamic
//! listeners of `/config_dump`, what the sink saw) when the mesh is dropped. External tools: Debian's
//! `curl` and `h2load` (nghttp2-client). The agent binary sits next to the proxy binary (`cargo
//! build -p agent`) or is named by `AGENT_BIN`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::Empty;
use waypoint_proto::resource::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, WORKLOAD_TYPE};
use waypoint_shared::identity::SpiffeId;
use waypoint_testbed::{
    hbone::{ClientTls, HbonePool, HboneStream, PeerMatch, PoolSettings},
    waypoint::{
        EchoSeen, HTTPBIN_IDENTITY, MeshOptions, PatternBody, SLEEP_IDENTITY, TlsProbe,
        VIP_CLUSTER, WAYPOINT_IDENTITY, WaypointMesh, WsClient, anonymous_client_config,
        foreign_identity, http1_request, rapid_reset, read_body, read_pattern, run_tool, tls_probe,
        ws_opcode,
    },
};

/// What the waypoint answers a CONNECT whose `:authority` no `main_internal` filter chain matches
/// (`VIP:9999`). Envoy answers 503 with response flag `NR` (or `UF` when the internal connection
/// fails) for CONNECT routed to `main_internal`; change here if the proxy settles on another
/// status. A stream reset instead of an answer fails the test with a message saying so.
const UNMATCHED_CONNECT_STATUS: u16 = 503;
/// Bound for the waypoint to serve HBONE once the agent is ready (the listener is bound when LDS
/// is applied, which readiness already waited for).
const HBONE_READY: Duration = Duration::from_secs(30);
/// Bound for one request.
const REQUEST: Duration = Duration::from_secs(30);
/// The large transfers through the waypoint.
const LARGE_BODY: u64 = 200 << 20;
/// The transfers of the self-test (the same code, smaller).
const SELF_TEST_BODY: u64 = 16 << 20;
/// Bound for one large transfer (a debug-built proxy on a shared 2-core machine).
const LARGE_BODY_TIME: Duration = Duration::from_secs(300);
/// Allowed growth of the proxy's peak RSS over the large transfers.
const RSS_GROWTH_LIMIT_KIB: u64 = 32 * 1024;
/// Most streams opened and reset at once in the rapid-reset burst (Envoy's premature-reset check
/// fires after 500; h2's pending-accept budget after 20).
const RAPID_RESET_STREAMS: usize = 2000;
/// Envoy's default `max_request_headers_kb` is 60: a 100 KiB header is over it, and under hyper's
/// 400 KiB read buffer in the echo server (the self-test checks the echo takes it), so a 431 can
/// only come from the waypoint.
const OVERSIZED_HEADER: usize = 100 * 1024;
/// The `Host` of requests sent through the forwarder.
const HOST: &str = "httpbin.default.svc.cluster.local:8000";

fn agent_bin() -> PathBuf {
    waypoint_testbed::waypoint::agent_beside(Path::new(env!("CARGO_BIN_EXE_proxy")))
}

/// A mesh whose agent is ready.
async fn mesh(name: &str) -> WaypointMesh {
    let options = MeshOptions::new(name, Path::new(env!("CARGO_BIN_EXE_proxy")), &agent_bin());
    match WaypointMesh::start(options).await {
        Ok(mesh) => mesh,
        Err(e) => panic!("the mesh did not start: {e}"),
    }
}

/// A mesh whose waypoint serves HBONE on `WAYPOINT_IP:15008`.
async fn serving_mesh(name: &str) -> WaypointMesh {
    let mesh = mesh(name).await;
    if let Err(e) = mesh.wait_hbone_ready(HBONE_READY).await {
        panic!("{e}");
    }
    mesh
}

/// An HBONE server the checks below talk to directly: the waypoint, or (self-test) the sink.
struct Hop {
    name: &'static str,
    addr: SocketAddr,
    tls: ClientTls,
    /// The authority that gets a tunnel.
    authority: String,
}

impl Hop {
    fn waypoint(mesh: &WaypointMesh) -> Self {
        Hop {
            name: "the waypoint",
            addr: mesh.addrs.waypoint_hbone(),
            tls: mesh.client_tls().expect("client TLS"),
            authority: mesh.addrs.service().to_string(),
        }
    }

    fn sink(mesh: &WaypointMesh) -> Self {
        Hop {
            name: "the sink",
            addr: mesh.addrs.pod_hbone(),
            tls: ClientTls::new(&mesh.sleep, &PeerMatch::Exact(HTTPBIN_IDENTITY.to_owned()))
                .expect("client TLS"),
            authority: mesh.addrs.pod_app().to_string(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Checks shared by the self-test (via the sink) and the waypoint tests
// ---------------------------------------------------------------------------------------------

/// What curl reported.
#[derive(Debug)]
struct Curl {
    status: u16,
    http_version: String,
    body: String,
    stderr: String,
}

/// Runs curl against `url` with `args`; the status and HTTP version come from `-w`.
async fn curl(url: &str, args: &[&str]) -> Curl {
    let mut argv = vec![
        "-sS",
        "--max-time",
        "20",
        "-o",
        "-",
        "-w",
        "\n%{http_code} %{http_version}",
    ];
    argv.extend_from_slice(args);
    argv.push(url);
    let out = run_tool("curl", &argv, REQUEST)
        .await
        .unwrap_or_else(|e| panic!("curl {argv:?}: {e}"));
    let (body, last) = out.stdout.rsplit_once('\n').unwrap_or(("", &out.stdout));
    let mut last = last.split_whitespace();
    Curl {
        status: last.next().and_then(|s| s.parse().ok()).unwrap_or(0),
        http_version: last.next().unwrap_or_default().to_owned(),
        body: body.to_owned(),
        stderr: out.stderr,
    }
}

/// The echo's report in a curl answer that must be a 200.
fn echo_of(what: &str, c: &Curl) -> EchoSeen {
    assert_eq!(
        c.status, 200,
        "{what}: HTTP {} {}; curl stderr: {}; body: {}",
        c.status, c.http_version, c.stderr, c.body
    );
    EchoSeen::parse(c.body.as_bytes()).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// curl GET over HTTP/1.1 and over h2c (prior knowledge) to `client`; returns the HTTP/1.1 echo.
async fn curl_http1_and_h2c(client: SocketAddr, via: &str) -> EchoSeen {
    let c = curl(
        &format!("http://{client}/get?via={via}"),
        &["--http1.1", "-H", "x-test: curl"],
    )
    .await;
    assert_eq!(c.http_version, "1.1", "{c:?}");
    let seen = echo_of(&format!("curl HTTP/1.1 via {via}"), &c);
    assert_eq!(seen.server, "httpbin");
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.path, format!("/get?via={via}"));
    assert_eq!(seen.headers.get("x-test").map(String::as_str), Some("curl"));

    let c = curl(
        &format!("http://{client}/h2c"),
        &["--http2-prior-knowledge"],
    )
    .await;
    assert_eq!(c.http_version, "2", "{c:?}");
    assert_eq!(echo_of(&format!("curl h2c via {via}"), &c).path, "/h2c");
    seen
}

/// h2load `-n 200 -c 4 -m 10` against `client`: every request succeeds.
async fn h2load(client: SocketAddr, via: &str) {
    let url = format!("http://{client}/h2load");
    let out = run_tool(
        "h2load",
        &["-n", "200", "-c", "4", "-m", "10", &url],
        Duration::from_secs(120),
    )
    .await
    .expect("h2load");
    let requests = out
        .stdout
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or_else(|| panic!("no summary from h2load via {via}: {out:?}"));
    assert!(
        requests.contains("200 succeeded") && requests.contains(" 0 failed"),
        "h2load via {via}: {requests}\n{}\n{}",
        out.stdout,
        out.stderr
    );
    let codes = out
        .stdout
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .unwrap_or_default();
    assert!(
        codes.contains("200 2xx"),
        "h2load via {via}: {codes}\n{}",
        out.stdout
    );
}

/// A WebSocket echo through `client`: text, a 70000-byte binary frame, ping/pong, close.
async fn websocket_round_trip(client: SocketAddr, via: &str) {
    let mut ws = WsClient::connect(client, HOST, "/ws", REQUEST)
        .await
        .unwrap_or_else(|e| panic!("WebSocket upgrade via {via}: {e}"));
    let exchange = async {
        ws.send(ws_opcode::TEXT, b"hello waypoint").await?;
        let text = ws.recv().await?;
        let big: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        ws.send(ws_opcode::BINARY, &big).await?;
        let binary = ws.recv().await?;
        ws.send(ws_opcode::PING, b"p").await?;
        let pong = ws.recv().await?;
        ws.send(ws_opcode::CLOSE, &1000u16.to_be_bytes()).await?;
        let close = ws.recv().await?;
        Ok::<_, std::io::Error>((text, binary == (ws_opcode::BINARY, big), pong, close))
    };
    let (text, binary_ok, pong, close) = tokio::time::timeout(REQUEST, exchange)
        .await
        .unwrap_or_else(|_| panic!("WebSocket exchange via {via} within {REQUEST:?}"))
        .unwrap_or_else(|e| panic!("WebSocket exchange via {via}: {e}"));
    assert_eq!(
        text,
        (ws_opcode::TEXT, b"hello waypoint".to_vec()),
        "via {via}"
    );
    assert!(
        binary_ok,
        "the 70000-byte binary frame came back changed via {via}"
    );
    assert_eq!(pong, (ws_opcode::PONG, b"p".to_vec()), "via {via}");
    assert_eq!(
        close,
        (ws_opcode::CLOSE, 1000u16.to_be_bytes().to_vec()),
        "via {via}"
    );
}

/// A GET with one [`OVERSIZED_HEADER`]-byte header through `client`: its status.
async fn oversized_header_status(client: SocketAddr, via: &str) -> StatusCode {
    let req = Request::get("/big-headers")
        .header("host", HOST)
        .header("x-big", "a".repeat(OVERSIZED_HEADER))
        .body(Empty::<Bytes>::new())
        .expect("request");
    http1_request(client, req, REQUEST)
        .await
        .unwrap_or_else(|e| panic!("oversized headers via {via}: {e}"))
        .status()
}

/// `size` bytes up (the echo counts them) and `size` bytes down (every byte checked) through
/// `client`, each as one HTTP/1.1 request.
async fn upload_and_download(client: SocketAddr, size: u64, via: &str) {
    let req = Request::post("/upload")
        .header("host", HOST)
        .header("content-length", size.to_string())
        .header("content-type", "application/octet-stream")
        .body(PatternBody::new(size))
        .expect("request");
    let resp = http1_request(client, req, LARGE_BODY_TIME)
        .await
        .unwrap_or_else(|e| panic!("{size}-byte upload via {via}: {e}"));
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "{size}-byte upload via {via}"
    );
    let body = read_body(resp.into_body(), 64 * 1024, REQUEST)
        .await
        .unwrap_or_else(|e| panic!("upload answer via {via}: {e}"));
    let seen = EchoSeen::parse(&body).expect("echo answer");
    assert_eq!(seen.body_len, size, "bytes the echo received via {via}");

    let req = Request::get("/download")
        .header("host", HOST)
        .header("x-echo-response-size", size.to_string())
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = http1_request(client, req, REQUEST)
        .await
        .unwrap_or_else(|e| panic!("{size}-byte download via {via}: {e}"));
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "{size}-byte download via {via}"
    );
    let got = read_pattern(resp.into_body(), LARGE_BODY_TIME)
        .await
        .unwrap_or_else(|e| panic!("{size}-byte download via {via}: {e}"));
    assert_eq!(got, size, "bytes downloaded via {via}");
}

/// Opens two CONNECT streams on one pooled HTTP/2 connection to `hop`, then sends one HTTP/1.1
/// request in each at the same time (the first one delayed by the echo, so they overlap); each gets
/// its own answer.
async fn two_streams_on_one_connection(hop: &Hop) {
    let pool = HbonePool::new(PoolSettings::default());
    let headers = HeaderMap::new();
    let (a, b) = tokio::join!(
        pool.connect(hop.addr, &hop.tls, &hop.authority, &headers),
        pool.connect(hop.addr, &hop.tls, &hop.authority, &headers)
    );
    let a = a.unwrap_or_else(|e| panic!("CONNECT a to {}: {e}", hop.name));
    let b = b.unwrap_or_else(|e| panic!("CONNECT b to {}: {e}", hop.name));
    assert_eq!(
        (a.status, b.status),
        (StatusCode::OK, StatusCode::OK),
        "{}",
        hop.name
    );
    assert_eq!(
        a.connection_id, b.connection_id,
        "the pool put both streams on one connection to {}",
        hop.name
    );
    assert_eq!(pool.stats().connections, 1, "{:?}", pool.stats());

    let (ra, rb) = tokio::time::timeout(REQUEST, async {
        tokio::join!(
            request_in_stream(a, "/stream-a", 300),
            request_in_stream(b, "/stream-b", 0)
        )
    })
    .await
    .unwrap_or_else(|_| panic!("both streams to {} answered within {REQUEST:?}", hop.name));
    for (want, r) in [("/stream-a", ra), ("/stream-b", rb)] {
        let (status, body) = r.unwrap_or_else(|e| panic!("{} {e}", hop.name));
        assert_eq!(status, StatusCode::OK, "{want} via {}: {body:?}", hop.name);
        let seen = EchoSeen::parse(&body).unwrap_or_else(|e| panic!("{want}: {e}"));
        assert_eq!(seen.path, want, "via {}", hop.name);
    }
}

/// One HTTP/1.1 GET inside an established tunnel.
async fn request_in_stream(
    stream: HboneStream,
    path: &'static str,
    delay_ms: u32,
) -> Result<(StatusCode, Bytes), String> {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let tunnel = tokio::spawn(stream.pipe(theirs));
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(ours))
            .await
            .map_err(|e| format!("{path}: handshake: {e}"))?;
    let driver = tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", HOST)
        .header("x-echo-delay-ms", delay_ms.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let result = async {
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("{path}: {e}"))?;
        let status = resp.status();
        let body = read_body(resp.into_body(), 64 * 1024, REQUEST)
            .await
            .map_err(|e| format!("{path}: {e}"))?;
        Ok((status, body))
    }
    .await;
    driver.abort();
    tunnel.abort();
    result
}

/// TLS clients `hop` must refuse: none, another root's, and the mesh root's with a SAN outside
/// `spiffe://cluster.local/`; the sleep identity is the control that must be served.
async fn tls_refusals(mesh: &WaypointMesh, hop: &Hop) {
    let bound = Duration::from_secs(10);
    let got = tls_probe(hop.addr, hop.tls.config(), bound).await;
    assert_eq!(got, TlsProbe::Served, "the sleep identity at {}", hop.name);

    let none = anonymous_client_config().expect("anonymous TLS");
    let got = tls_probe(hop.addr, none, bound).await;
    assert!(
        matches!(got, TlsProbe::Refused(_)),
        "no client certificate at {}: {got}",
        hop.name
    );

    let foreign = foreign_identity(
        &SpiffeId::new("cluster.local", "default", "sleep"),
        mesh.istiod.root_cert_pem(),
    )
    .expect("foreign identity");
    let config = ClientTls::new(&foreign, &PeerMatch::Any)
        .expect("TLS")
        .config();
    let got = tls_probe(hop.addr, config, bound).await;
    assert!(
        matches!(got, TlsProbe::Refused(_)),
        "a certificate from another root at {}: {got}",
        hop.name
    );

    let outsider = mesh
        .mesh_signed_identity(&SpiffeId::new("evil.local", "default", "sleep"))
        .expect("outsider identity");
    let config = ClientTls::new(&outsider, &PeerMatch::Any)
        .expect("TLS")
        .config();
    let got = tls_probe(hop.addr, config, bound).await;
    assert!(
        matches!(got, TlsProbe::Refused(_)),
        "SAN spiffe://evil.local/... at {}: {got}",
        hop.name
    );
}

/// Opens and immediately resets up to [`RAPID_RESET_STREAMS`] CONNECT streams on one mTLS HTTP/2
/// connection to `hop` (HEADERS + RST_STREAM pairs, see [`rapid_reset`]) and expects GOAWAY and the
/// close of the connection.
async fn rapid_reset_gets_goaway(hop: &Hop) {
    let got = rapid_reset(
        hop.addr,
        hop.tls.config(),
        &hop.authority,
        RAPID_RESET_STREAMS,
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("rapid reset at {}: {e}", hop.name));
    println!("rapid reset at {}: {got:?}", hop.name);
    assert!(
        got.goaway.is_some(),
        "rapid reset at {}: no GOAWAY after {} HEADERS+RST_STREAM pairs: {got:?}",
        hop.name,
        got.sent
    );
    assert!(
        got.closed,
        "rapid reset at {}: GOAWAY but the connection stayed open: {got:?}",
        hop.name
    );
}

/// Every tunnel the sink answered came from the waypoint (none bypassed it), and there was one.
fn assert_only_waypoint_dialled(mesh: &WaypointMesh) {
    let streams = mesh.sink_streams();
    assert!(!streams.is_empty(), "the sink saw no tunnel");
    let others: Vec<_> = streams
        .iter()
        .filter(|s| s.peer_identity != WAYPOINT_IDENTITY)
        .collect();
    assert!(
        others.is_empty(),
        "tunnels not from the waypoint: {others:?}"
    );
}

/// A plain GET through the forwarder answered 200 by the echo: the proxy still serves.
async fn assert_still_serves(mesh: &WaypointMesh, after: &str) {
    let c = curl(&mesh.client_url(&format!("/after-{after}")), &["--http1.1"]).await;
    let seen = echo_of(&format!("GET after {after}"), &c);
    assert_eq!(seen.path, format!("/after-{after}"));
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Everything but the waypoint's data path: the harness must work before the data path lands, and
/// every check of the waypoint tests must pass against the sink alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_self_test() {
    let mesh = mesh("self").await;
    let a = mesh.addrs;

    // The proxy ACKed the four types and NACKed nothing.
    let node = mesh.node_id.clone();
    let acked = mesh
        .istiod
        .book
        .wait_until(Duration::from_secs(30), |conns| {
            conns.iter().any(|c| {
                c.node_id == node
                    && c.connected
                    && [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, WORKLOAD_TYPE]
                        .iter()
                        .all(|t| c.types.get(*t).is_some_and(|s| s.acks >= 1))
            })
        })
        .await;
    if let Err(conns) = acked {
        panic!("no ACKs for CDS/EDS/LDS/WDS from {node}: {conns:#?}");
    }
    let nacks = mesh.nacks().await;
    assert!(nacks.is_empty(), "{nacks:?}");

    // The loopback addresses reached the proxy's config.
    let (_, listeners) = mesh.admin_get("/listeners").await.expect("/listeners");
    assert!(
        listeners.contains(&format!("connect_terminate::{}\n", a.waypoint_hbone())),
        "{listeners}"
    );
    let (_, clusters) = mesh.admin_get("/clusters").await.expect("/clusters");
    assert!(
        clusters.contains(&format!(
            "{VIP_CLUSTER}::envoy://connect_originate/{}::health_flags::healthy\n",
            a.pod_app()
        )),
        "{clusters}"
    );
    let dump = mesh
        .config_dump("resource=dynamic_listeners")
        .await
        .expect("config dump");
    let text = dump.to_string();
    assert!(
        text.contains(&format!("\"{}\"", a.vip)),
        "VIP not in the listeners: {text}"
    );

    // Identities: the proxy's (SDS, from the agent), the sink's and the client's (istiod-lite).
    mesh.wait_for("the waypoint identity in /certs", REQUEST, || async {
        match mesh.admin_get("/certs").await {
            Ok((200, body)) if body.contains(WAYPOINT_IDENTITY) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mesh.sleep.spiffe_id(), SLEEP_IDENTITY);
    assert_eq!(mesh.httpbin.spiffe_id(), HTTPBIN_IDENTITY);

    // The proxy process is found and measurable (the memory test needs it).
    let pid = mesh.proxy_pid().expect("the proxy is the agent's child");
    let mem = mesh.proxy_memory().expect("/proc/<proxy>/status");
    assert!(
        mem.rss_kib > 0 && mem.hwm_kib >= mem.rss_kib,
        "{pid}: {mem:?}"
    );

    // The chain without the waypoint: forwarder → sink → echo, with the sleep identity at the sink.
    let direct = mesh.direct_forwarder().await.expect("direct forwarder");
    let via = "the sink";
    let seen = curl_http1_and_h2c(direct.addr, "sink").await;
    assert_eq!(seen.listener, a.pod_app().to_string());
    let streams = mesh.sink_streams();
    let first = streams.first().expect("the sink saw the tunnel");
    assert_eq!(first.peer_identity, SLEEP_IDENTITY);
    assert_eq!(first.method, "CONNECT");
    assert_eq!(
        first.authority.as_deref(),
        Some(a.pod_app().to_string().as_str())
    );
    assert_eq!(first.status, 200);
    assert!(first.forwarded.is_some(), "{first:?}");

    // The other tests' checks, against the sink.
    h2load(direct.addr, via).await;
    websocket_round_trip(direct.addr, via).await;
    assert_eq!(
        oversized_header_status(direct.addr, via).await,
        StatusCode::OK,
        "the echo must take a {OVERSIZED_HEADER}-byte header, or a 431 would prove nothing"
    );
    upload_and_download(direct.addr, SELF_TEST_BODY, via).await;
    let sink = Hop::sink(&mesh);
    two_streams_on_one_connection(&sink).await;
    tls_refusals(&mesh, &sink).await;
    rapid_reset_gets_goaway(&sink).await;
    assert_eq!(direct.stats().failed, 0, "{:?}", direct.stats());
    drop(direct);

    mesh.shutdown(Duration::from_secs(15)).await;
}

/// HTTP traffic through the waypoint: HTTP/1.1, h2c, load, WebSocket, the header limit, two
/// streams on one HBONE connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_through_the_waypoint() {
    let mesh = serving_mesh("http").await;
    let a = mesh.addrs;
    let client = mesh.client_addr();
    let via = "the waypoint";

    // curl, HTTP/1.1 and h2c: the echo answers, and the sink saw the waypoint as the HBONE client.
    let seen = curl_http1_and_h2c(client, "waypoint").await;
    assert_eq!(seen.listener, a.pod_app().to_string());
    let streams = mesh.sink_streams();
    let hop = streams
        .iter()
        .find(|s| s.status == 200)
        .unwrap_or_else(|| panic!("the sink saw no tunnel: {streams:?}"));
    assert_eq!(hop.peer_identity, WAYPOINT_IDENTITY, "{hop:?}");
    assert_eq!(hop.method, "CONNECT");
    assert_eq!(
        hop.authority.as_deref(),
        Some(a.pod_app().to_string().as_str()),
        "{hop:?}"
    );

    h2load(client, via).await;
    websocket_round_trip(client, via).await;
    two_streams_on_one_connection(&Hop::waypoint(&mesh)).await;
    assert_only_waypoint_dialled(&mesh);

    // A header list over the limit: 431 from the waypoint, and it serves afterwards.
    assert_eq!(
        oversized_header_status(client, via).await,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "a {OVERSIZED_HEADER}-byte header"
    );
    assert_still_serves(&mesh, "431").await;
    // The same over h2c: the stream is refused (RST_STREAM), the connection and proxy live on.
    let big = format!("x-big: {}", "a".repeat(OVERSIZED_HEADER));
    let c = curl(
        &format!("http://{client}/big-headers"),
        &["--http2-prior-knowledge", "-H", &big],
    )
    .await;
    assert_eq!(
        c.status, 0,
        "no response to an oversized h2 header list: {c:?}"
    );
    assert!(
        c.stderr.contains("REFUSED_STREAM")
            || c.stderr.contains("(56)")
            || c.stderr.contains("(92)"),
        "an HTTP/2 stream error: {}",
        c.stderr
    );
    assert_still_serves(&mesh, "h2-header-limit").await;
    mesh.shutdown(Duration::from_secs(15)).await;
}

/// What `connect_terminate` refuses, and that it still serves afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_port_refuses_bad_clients() {
    let mesh = serving_mesh("refuse").await;
    let hop = Hop::waypoint(&mesh);
    tls_refusals(&mesh, &hop).await;

    // A non-CONNECT request on an accepted HBONE connection: 405 or a stream error.
    let io = hop
        .tls
        .connect(hop.addr)
        .await
        .expect("mTLS to the waypoint");
    let (client, conn) = h2::client::handshake(io).await.expect("HTTP/2 handshake");
    let driver = tokio::spawn(conn);
    let get = Request::builder()
        .method(Method::GET)
        .uri(format!("https://{}/", hop.authority))
        .body(())
        .expect("request");
    let answer = tokio::time::timeout(REQUEST, async {
        let mut ready = client.clone().ready().await?;
        let (resp, _) = ready.send_request(get, true)?;
        resp.await
    })
    .await
    .expect("an answer to GET within the bound");
    match answer {
        Ok(resp) => assert_eq!(
            resp.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "GET on :15008"
        ),
        Err(e) => assert!(e.reason().is_some(), "GET on :15008: {e}"),
    }
    drop(client);
    driver.abort();

    // CONNECT to an authority no filter chain of main_internal matches.
    let pool = HbonePool::new(PoolSettings::default());
    let unmatched = format!("{}:9999", mesh.addrs.vip);
    match pool
        .connect(hop.addr, &hop.tls, &unmatched, &HeaderMap::new())
        .await
    {
        Ok(stream) => assert_eq!(
            stream.status.as_u16(),
            UNMATCHED_CONNECT_STATUS,
            "CONNECT {unmatched}"
        ),
        Err(e) => panic!(
            "CONNECT {unmatched} got no answer ({e}); this test wants {UNMATCHED_CONNECT_STATUS} \
             (change UNMATCHED_CONNECT_STATUS if a reset is the intended behaviour)"
        ),
    }

    // An HTTP/2 rapid-reset burst: the connection gets GOAWAY.
    rapid_reset_gets_goaway(&hop).await;

    assert_still_serves(&mesh, "refusals").await;
    assert_only_waypoint_dialled(&mesh);
    mesh.shutdown(Duration::from_secs(15)).await;
}

/// 200 MiB up and 200 MiB down through the waypoint, with the proxy's peak RSS growing by less than
/// 32 MiB: bodies stream with backpressure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_in_bounded_memory() {
    let mesh = serving_mesh("large").await;
    assert_still_serves(&mesh, "warm-up").await;
    let before = mesh.proxy_memory().expect("proxy memory");
    upload_and_download(mesh.client_addr(), LARGE_BODY, "the waypoint").await;
    let after = mesh.proxy_memory().expect("proxy memory");
    assert_only_waypoint_dialled(&mesh);
    let growth = after.hwm_kib.saturating_sub(before.hwm_kib);
    println!("proxy memory: before {before:?}, after {after:?}; peak growth {growth} KiB");
    assert!(
        growth < RSS_GROWTH_LIMIT_KIB,
        "the proxy's peak RSS grew by {growth} KiB (limit {RSS_GROWTH_LIMIT_KIB} KiB): before \
         {before:?}, after {after:?}"
    );
    mesh.shutdown(Duration::from_secs(15)).await;
}
