//! Config updates reach connections that are already open, as in Envoy (the `proxy` binary on
//! delta ADS from istiod-lite's store, in process over plaintext gRPC):
//!
//! - **RDS**: a RouteConfiguration update applies to the next request of an open HTTP/2
//!   connection; the connection is not drained (the HCM reads the route table per request).
//! - **in-place filter chain update** (LDS, routes inline as istiod renders a waypoint's
//!   `main_internal`): the connections of the chain whose config changed drain — HTTP/2 gets
//!   GOAWAY, its request in flight completes on the old route, then the connection ends;
//!   HTTP/1.1 gets `Connection: close` on the response in flight — while new connections get the
//!   new route; a sibling chain whose config did not change keeps its connection untouched.
//! - **through the waypoint**: the same for a VirtualService change of `main_internal` reached
//!   over HBONE (the drained inner connection ends the CONNECT stream; the client reconnects),
//!   while a connection on the unchanged TCP service chain carries on.
//! - **listener removal**: an HTTP/2 connection with a request in flight and a tcp_proxy
//!   connection (which Envoy does not drain gracefully) keep running until `--drain-time-s` is
//!   over, then both are closed.
//!
//! A backend whose `/slow` requests wait for the test to open their gate makes "in flight"
//! exact; every wait is a bounded poll of a condition.

mod common;

use std::{
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    process::{Child, Stdio},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{PlainAds, WAIT, distinct_ports, eventually, free_port, http, temp_dir};
use http::{Request, Response};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value as Json, json};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{mpsc, watch},
};
use waypoint_proto::resource::ResourceKind;
use waypoint_testbed::{
    istiod_lite::Resource,
    scenarios::{self, Fixture, HOST, service_hcm, service_vhost},
    waypoint::{MeshOptions, WaypointMesh, agent_beside},
};

const NODE_ID: &str = "router~127.0.0.1~updates.default~default.svc.cluster.local";

// ---------------------------------------------------------------------------------------------
// The backend: `/slow` waits until its gate (`x-gate: N`) is open; anything else answers at once.

struct Backend {
    addr: SocketAddr,
    /// The gate number of each `/slow` request that arrived.
    arrived: mpsc::UnboundedReceiver<u32>,
    /// Gates up to this number are open.
    open: watch::Sender<u32>,
}

impl Backend {
    async fn start() -> Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (arrived_tx, arrived) = mpsc::unbounded_channel();
        let (open, open_rx) = watch::channel(0u32);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (arrived, open) = (arrived_tx.clone(), open_rx.clone());
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (arrived, mut open) = (arrived.clone(), open.clone());
                    async move {
                        let gate: u32 = req
                            .headers()
                            .get("x-gate")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        let body = if req.uri().path() == "/slow" {
                            let _ = arrived.send(gate);
                            let _ = open.wait_for(|g| *g >= gate).await;
                            "slow"
                        } else {
                            "fast"
                        };
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(body.as_bytes()),
                        )))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service),
                );
            }
        });
        Backend {
            addr,
            arrived,
            open,
        }
    }

    /// Waits (bounded) until the `/slow` request of gate `gate` is at the backend.
    async fn wait_arrival(&mut self, gate: u32) {
        let got = tokio::time::timeout(WAIT, self.arrived.recv())
            .await
            .expect("the slow request reaches the backend in time");
        assert_eq!(got, Some(gate));
    }

    fn cluster(&self) -> Json {
        json!({
            "name": "backend",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": self.addr.port()}}}}
            ]}]}
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy, on delta ADS, with the flags the test gives.

struct Proxy {
    child: Child,
    dir: PathBuf,
    admin: u16,
}

impl Proxy {
    async fn start(tag: &str, ads: &PlainAds, backend: &Backend, args: &[&str]) -> Proxy {
        let dir = temp_dir(tag);
        let admin = free_port();
        let bootstrap = json!({
            "node": {"id": NODE_ID, "cluster": "updates.default"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {"clusters": [ads.cluster()]},
            "dynamic_resources": {
                "ads_config": {
                    "api_type": "DELTA_GRPC",
                    "transport_api_version": "V3",
                    "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]
                },
                "cds_config": {"ads": {}, "resource_api_version": "V3"},
                "lds_config": {"ads": {}, "resource_api_version": "V3"}
            }
        });
        // Over CDS: a delta stream answers a type only once it has resources.
        push(ads, ResourceKind::Cluster, backend.cluster()).await;
        std::fs::write(dir.join("bootstrap.json"), bootstrap.to_string()).expect("write");
        let log = std::fs::File::create(dir.join("proxy.log")).expect("log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_proxy"))
            .args(["-c", "bootstrap.json", "-l", "debug"])
            .args(args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("proxy starts");
        let proxy = Proxy { child, dir, admin };
        eventually(
            "the proxy LIVE",
            || proxy.log_tail(),
            || async {
                (http(admin, "GET", "/ready").await == (200, "LIVE\n".into())).then_some(())
            },
        )
        .await;
        proxy
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("proxy.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// One counter or gauge from `/stats` (0 when absent).
    async fn stat(&self, name: &str) -> u64 {
        let (_, body) = http(self.admin, "GET", "/stats").await;
        let prefix = format!("{name}: ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Waits (bounded) until stat `name` is `want`.
    async fn wait_stat(&self, name: &str, want: u64) {
        eventually(
            &format!("{name} = {want}"),
            || self.log_tail(),
            || async { (self.stat(name).await == want).then_some(()) },
        )
        .await;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Resources.

async fn push(ads: &PlainAds, kind: ResourceKind, doc: Json) {
    let r = Resource::from_json(kind, &doc).unwrap_or_else(|e| panic!("{doc}: {e}"));
    ads.store.push(r).await;
}

fn hcm(stat_prefix: &str, routes: Json) -> Json {
    let mut config = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix,
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    });
    if let (Some(obj), Some(routes)) = (config.as_object_mut(), routes.as_object()) {
        obj.extend(routes.clone());
    }
    json!({"name": "envoy.filters.network.http_connection_manager", "typed_config": config})
}

/// A route table sending everything to `backend`, marking responses `x-route-version: version`.
fn backend_routes(name: &str, version: &str) -> Json {
    json!({"name": name, "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
        "match": {"prefix": "/"},
        "route": {"cluster": "backend", "timeout": "0s"},
        "response_headers_to_add": [{"header": {"key": "x-route-version", "value": version}}]
    }]}]})
}

/// Listener `main` on `port`: the `h2` chain takes h2c connections, the `h1` chain HTTP/1.1
/// ones (sniffed by `http_inspector`), each with its routes inline.
fn two_chain_listener(port: u16, h2_version: &str, h1_version: &str) -> Json {
    json!({
        "name": "main",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "listener_filters": [{"name": "envoy.filters.listener.http_inspector", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"}}],
        "filter_chains": [
            {"name": "h2", "filter_chain_match": {"application_protocols": ["h2c"]},
             "filters": [hcm("h2", json!({"route_config": backend_routes("h2", h2_version)}))]},
            {"name": "h1", "filter_chain_match": {"application_protocols": ["http/1.1"]},
             "filters": [hcm("h1", json!({"route_config": backend_routes("h1", h1_version)}))]}
        ]
    })
}

// ---------------------------------------------------------------------------------------------
// Clients.

type H2 = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;
type H1 = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// A client socket that notes when the connection ended: a read sees EOF or an error, or the
/// client gave the socket up (hyper does once the proxy's GOAWAY or `Connection: close` leaves
/// it nothing to do). hyper's client task alone cannot tell: it ends as soon as a GOAWAY
/// arrives, while streams still run.
struct Watched {
    inner: TcpStream,
    closed: watch::Sender<bool>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        match &r {
            Poll::Ready(Ok(())) if buf.filled().len() == before => {
                self.closed.send_replace(true);
            }
            Poll::Ready(Err(_)) => {
                self.closed.send_replace(true);
            }
            _ => {}
        }
        r
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.closed.send_replace(true);
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Whether a client connection ended.
struct Closed(watch::Receiver<bool>);

impl Closed {
    fn now(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits (bounded) until the connection ended.
    async fn wait(&mut self, what: &str) {
        tokio::time::timeout(WAIT, self.0.wait_for(|c| *c))
            .await
            .unwrap_or_else(|_| panic!("{what} still open after {WAIT:?}"))
            .expect("socket watch");
    }
}

/// `127.0.0.1:port`.
fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

async fn connect(addr: SocketAddr) -> (TokioIo<Watched>, Closed) {
    let inner = TcpStream::connect(addr).await.expect("connect");
    let (closed, rx) = watch::channel(false);
    (TokioIo::new(Watched { inner, closed }), Closed(rx))
}

/// An h2c connection to `addr`.
async fn h2_conn(addr: SocketAddr) -> (H2, Closed) {
    let (io, closed) = connect(addr).await;
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    (send, closed)
}

/// An HTTP/1.1 keep-alive connection to `addr`.
async fn h1_conn(addr: SocketAddr) -> (H1, Closed) {
    let (io, closed) = connect(addr).await;
    let (send, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    (send, closed)
}

/// What a test looks at in a response.
#[derive(Debug)]
struct Answer {
    status: u16,
    version: String,
    connection: String,
    body: String,
}

fn request(path: &str, gate: u32) -> Request<Empty<Bytes>> {
    request_to("svc.local", path, gate)
}

fn request_to(authority: &str, path: &str, gate: u32) -> Request<Empty<Bytes>> {
    Request::builder()
        .uri(format!("http://{authority}{path}"))
        .header("host", authority)
        .header("x-gate", gate.to_string())
        .body(Empty::new())
        .expect("request")
}

async fn answer(resp: Result<Response<Incoming>, hyper::Error>) -> Result<Answer, String> {
    let resp = resp.map_err(|e| e.to_string())?;
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (status, version, connection) = (
        resp.status().as_u16(),
        header("x-route-version"),
        header("connection"),
    );
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Answer {
        status,
        version,
        connection,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Bound of one exchange (a gated one included).
const EXCHANGE: Duration = Duration::from_secs(10);

async fn h2_get(send: &mut H2, path: &str, gate: u32) -> Result<Answer, String> {
    h2_send(send, request(path, gate)).await
}

async fn h2_send(send: &mut H2, req: Request<Empty<Bytes>>) -> Result<Answer, String> {
    let exchange = async {
        send.ready().await.map_err(|e| e.to_string())?;
        answer(send.send_request(req).await).await
    };
    tokio::time::timeout(EXCHANGE, exchange)
        .await
        .map_err(|_| format!("no answer in {EXCHANGE:?}"))?
}

async fn h1_get(send: &mut H1, path: &str, gate: u32) -> Result<Answer, String> {
    h1_send(send, request(path, gate)).await
}

async fn h1_send(send: &mut H1, req: Request<Empty<Bytes>>) -> Result<Answer, String> {
    let exchange = async {
        send.ready().await.map_err(|e| e.to_string())?;
        answer(send.send_request(req).await).await
    };
    tokio::time::timeout(EXCHANGE, exchange)
        .await
        .map_err(|_| format!("no answer in {EXCHANGE:?}"))?
}

/// Waits (bounded) until a NEW h2c (or HTTP/1.1) connection is routed by `want`.
async fn wait_new_connections(proxy: &Proxy, port: u16, h2: bool, want: &str) {
    let addr = local(port);
    eventually(
        &format!("a new connection routed by {want}"),
        || proxy.log_tail(),
        || async {
            // Each probe is dropped (closed) before the next one.
            let got = if h2 {
                let (mut send, _closed) = h2_conn(addr).await;
                h2_get(&mut send, "/fast", 0).await
            } else {
                let (mut send, _closed) = h1_conn(addr).await;
                h1_get(&mut send, "/fast", 0).await
            };
            got.ok().filter(|a| a.version == want).map(|_| ())
        },
    )
    .await;
}

/// `listener.<127.0.0.1_port>.downstream_cx_active`.
fn active(port: u16) -> String {
    format!("listener.127.0.0.1_{port}.downstream_cx_active")
}

async fn refuses(port: u16) -> bool {
    matches!(
        TcpStream::connect(("127.0.0.1", port)).await,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

// ---------------------------------------------------------------------------------------------

/// (a) An RDS update reaches the next request of an open HTTP/2 connection, which keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rds_update_reaches_the_next_request_on_an_open_connection() {
    let ads = PlainAds::start().await;
    let backend = Backend::start().await;
    let port = free_port();
    let direct = |body: &str| {
        json!({"name": "r", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": body}}}
        ]}]})
    };
    push(&ads, ResourceKind::Route, direct("route v1")).await;
    push(
        &ads,
        ResourceKind::Listener,
        json!({
            "name": "rds",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [hcm("rds", json!({"rds": {
                "route_config_name": "r",
                "config_source": {"ads": {}, "resource_api_version": "V3"}}}))]}]
        }),
    )
    .await;
    let proxy = Proxy::start("updates-rds", &ads, &backend, &[]).await;
    let (mut send, conn) = eventually(
        "the listener serving",
        || proxy.log_tail(),
        || async {
            let (mut send, conn) = h2_conn(local(port)).await;
            let a = h2_get(&mut send, "/", 0).await.ok()?;
            (a.body == "route v1").then_some((send, conn))
        },
    )
    .await;

    push(&ads, ResourceKind::Route, direct("route v2")).await;
    // A new connection sees the update once it is applied ...
    eventually(
        "a new connection routed by v2",
        || proxy.log_tail(),
        || async {
            let (mut send, _conn) = h2_conn(local(port)).await;
            let a = h2_get(&mut send, "/", 0).await.ok()?;
            (a.body == "route v2").then_some(())
        },
    )
    .await;
    // ... and so does the next request on the connection opened before it.
    let a = h2_get(&mut send, "/", 0).await.expect("same connection");
    assert_eq!((a.status, a.body.as_str()), (200, "route v2"));
    assert!(!conn.now(), "an RDS update does not drain");
    assert_eq!(proxy.stat("http.rds.downstream_cx_drain_close").await, 0);
    assert_eq!(
        proxy
            .stat("listener_manager.listener_in_place_updated")
            .await,
        0
    );
}

/// (b) + (c) An in-place filter chain update drains the connections of the changed chain only;
/// the request in flight there completes on the old route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_chain_drains_its_connections_and_an_unchanged_sibling_keeps_them() {
    let ads = PlainAds::start().await;
    let mut backend = Backend::start().await;
    let port = free_port();
    push(
        &ads,
        ResourceKind::Listener,
        two_chain_listener(port, "h2-v1", "h1-v1"),
    )
    .await;
    let proxy = Proxy::start("updates-inline", &ads, &backend, &["--drain-time-s", "600"]).await;
    wait_new_connections(&proxy, port, true, "h2-v1").await;

    // The sibling: an HTTP/1.1 keep-alive connection on the `h1` chain.
    let (mut h1, mut h1_closed) = h1_conn(local(port)).await;
    let a = h1_get(&mut h1, "/fast", 0).await.expect("h1");
    assert_eq!(a.version, "h1-v1");
    // The h2c connection on the `h2` chain, with a request in flight.
    let (mut h2, mut h2_closed) = h2_conn(local(port)).await;
    assert_eq!(
        h2_get(&mut h2, "/fast", 0).await.expect("h2").version,
        "h2-v1"
    );
    let in_flight = {
        let mut send = h2.clone();
        tokio::spawn(async move { h2_get(&mut send, "/slow", 1).await })
    };
    backend.wait_arrival(1).await;
    // Only these two are open (the probes are gone), so the drain counts below are theirs.
    proxy.wait_stat(&active(port), 2).await;

    // Only the `h2` chain changes (a VirtualService change of one service).
    push(
        &ads,
        ResourceKind::Listener,
        two_chain_listener(port, "h2-v2", "h1-v1"),
    )
    .await;
    // Applied (probing with new connections instead could race the update: one accepted by the
    // old version just before it is drained at once, and counted).
    proxy
        .wait_stat("listener_manager.listener_in_place_updated", 1)
        .await;
    wait_new_connections(&proxy, port, true, "h2-v2").await;
    proxy
        .wait_stat("http.h2.downstream_cx_drain_close", 1)
        .await;
    // GOAWAY: the old connection takes no new stream (one sent before the GOAWAY got out is
    // still served by the old chain).
    eventually(
        "the drained connection refusing new streams",
        || proxy.log_tail(),
        || {
            let mut h2 = h2.clone();
            async move {
                match h2_get(&mut h2, "/fast", 0).await {
                    Ok(a) => {
                        assert_eq!(a.version, "h2-v1", "the old connection keeps its chain");
                        None
                    }
                    Err(_) => Some(()),
                }
            }
        },
    )
    .await;
    assert!(
        !h2_closed.now(),
        "the stream in flight holds the connection open"
    );
    // The unchanged sibling chain's connection is untouched.
    let a = h1_get(&mut h1, "/fast", 0)
        .await
        .expect("sibling connection");
    assert_eq!((a.version.as_str(), a.connection.as_str()), ("h1-v1", ""));
    assert_eq!(proxy.stat("http.h1.downstream_cx_drain_close").await, 0);

    // (c) The request in flight completes normally, on the route it started with; then the
    // drained connection ends.
    backend.open.send_replace(1);
    let a = tokio::time::timeout(WAIT, in_flight)
        .await
        .expect("in time")
        .expect("task")
        .expect("the in-flight request completes");
    assert_eq!(
        (a.status, a.version.as_str(), a.body.as_str()),
        (200, "h2-v1", "slow")
    );
    h2_closed.wait("the drained h2 connection").await;
    assert_eq!(
        proxy
            .stat("listener_manager.listener_in_place_updated")
            .await,
        1
    );
    assert_eq!(
        proxy
            .stat("listener_manager.total_filter_chains_draining")
            .await,
        1
    );

    // HTTP/1.1: now the `h1` chain changes under a request in flight, whose response carries
    // `Connection: close`.
    let in_flight = tokio::spawn(async move {
        let a = h1_get(&mut h1, "/slow", 2).await;
        (a, h1)
    });
    backend.wait_arrival(2).await;
    proxy.wait_stat(&active(port), 1).await;
    push(
        &ads,
        ResourceKind::Listener,
        two_chain_listener(port, "h2-v2", "h1-v3"),
    )
    .await;
    proxy
        .wait_stat("listener_manager.listener_in_place_updated", 2)
        .await;
    wait_new_connections(&proxy, port, false, "h1-v3").await;
    proxy
        .wait_stat("http.h1.downstream_cx_drain_close", 1)
        .await;
    backend.open.send_replace(2);
    let (a, _h1) = tokio::time::timeout(WAIT, in_flight)
        .await
        .expect("in time")
        .expect("task");
    let a = a.expect("the in-flight HTTP/1.1 request completes");
    assert_eq!(
        (a.status, a.version.as_str(), a.connection.as_str()),
        (200, "h1-v1", "close")
    );
    h1_closed.wait("the drained HTTP/1.1 connection").await;
    // The `h2` chain did not change this time: the connection opened on v2 keeps serving.
    assert_eq!(proxy.stat("http.h2.downstream_cx_drain_close").await, 1);
    assert_eq!(
        proxy
            .stat("listener_manager.total_filter_chains_draining")
            .await,
        2
    );
}

/// A removed listener drains its connections and closes what is left once the drain time is
/// over: an HTTP/2 connection with a request that never completes, and a tcp_proxy connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_listener_closes_its_connections_after_the_drain_time() {
    const DRAIN: Duration = Duration::from_secs(2);
    let ads = PlainAds::start().await;
    let mut backend = Backend::start().await;
    let [web, tcp] = distinct_ports();
    let socket = |p: u16| json!({"socket_address": {"address": "127.0.0.1", "port_value": p}});
    push(
        &ads,
        ResourceKind::Listener,
        json!({"name": "web", "address": socket(web), "filter_chains": [{"filters": [
            hcm("web", json!({"route_config": backend_routes("web", "web-v1")}))]}]}),
    )
    .await;
    push(
        &ads,
        ResourceKind::Listener,
        json!({"name": "tcp", "address": socket(tcp), "filter_chains": [{"filters": [
            {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": "tcp", "cluster": "backend"}}]}]}),
    )
    .await;
    let proxy = Proxy::start("updates-removal", &ads, &backend, &["--drain-time-s", "2"]).await;
    wait_new_connections(&proxy, web, true, "web-v1").await;

    let (mut h2, mut h2_closed) = h2_conn(local(web)).await;
    let in_flight = tokio::spawn(async move { h2_get(&mut h2, "/slow", 1).await });
    backend.wait_arrival(1).await;
    // HTTP/1.1 to the backend through the tcp_proxy: the bytes pass unchanged.
    let (mut raw, mut raw_closed) = h1_conn(local(tcp)).await;
    assert_eq!(
        h1_get(&mut raw, "/fast", 0).await.expect("tcp").body,
        "fast"
    );
    proxy.wait_stat(&active(web), 1).await;

    let removed = Instant::now();
    ads.store.remove(ResourceKind::Listener, "web").await;
    ads.store.remove(ResourceKind::Listener, "tcp").await;
    // Applied before probing the ports: a probe the old listener accepted would be drained too.
    proxy
        .wait_stat("listener_manager.listener_removed", 2)
        .await;
    eventually(
        "both listeners gone",
        || proxy.log_tail(),
        || async { (refuses(web).await && refuses(tcp).await).then_some(()) },
    )
    .await;
    // Envoy's tcp_proxy does not drain: the connection runs on during the drain time.
    let a = h1_get(&mut raw, "/fast", 0).await;
    if removed.elapsed() < DRAIN {
        assert_eq!(
            a.expect("tcp connection within the drain time").body,
            "fast"
        );
    }
    raw_closed.wait("the tcp_proxy connection").await;
    let raw_after = removed.elapsed();
    let r = tokio::time::timeout(WAIT, in_flight)
        .await
        .expect("in time")
        .expect("task");
    // Cut by the proxy closing the connection, not by this client giving up on it.
    assert!(
        r.as_ref().is_err_and(|e| !e.starts_with("no answer")),
        "the request still in flight is cut: {r:?}"
    );
    h2_closed.wait("the h2 connection").await;
    let h2_after = removed.elapsed();
    assert!(
        raw_after >= DRAIN && h2_after >= DRAIN,
        "closed only once the drain time is over: tcp {raw_after:?}, h2 {h2_after:?}"
    );
    assert_eq!(proxy.stat("http.web.downstream_cx_drain_close").await, 1);
    assert!(
        proxy
            .stat(&format!("listener.127.0.0.1_{tcp}.downstream_cx_destroy"))
            .await
            >= 1
    );
    drop(backend.open);
}

/// (b) through the real waypoint (agent + proxy, istiod-lite, HBONE forwarder and sink): a
/// VirtualService change reaches the waypoint as a new `main_internal` with the service's routes
/// inline. The h2c connection opened before it — a CONNECT stream through the waypoint into
/// `main_internal` — is drained (GOAWAY inside the tunnel, then the tunnel ends) and the client
/// reconnects onto the new route; a connection on the unchanged TCP service chain carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtual_service_change_drains_the_old_connection_through_the_waypoint() {
    let proxy_bin = std::path::Path::new(env!("CARGO_BIN_EXE_proxy"));
    let options = MeshOptions::new("updates", proxy_bin, &agent_beside(proxy_bin));
    let mesh = WaypointMesh::start(options)
        .await
        .unwrap_or_else(|e| panic!("the mesh did not start: {e}"));
    if let Err(e) = mesh.wait_hbone_ready(Duration::from_secs(30)).await {
        panic!("{e}");
    }
    let fixture = Fixture::of(&mesh).expect("fixture");
    let get = |path: &str| request_to(HOST, path, 0);

    let (mut old, mut old_closed) = h2_conn(mesh.client_addr()).await;
    let a = h2_send(&mut old, get("/get"))
        .await
        .expect("h2c through the waypoint");
    assert_eq!((a.status, a.version.as_str()), (200, ""));
    let forwarder = mesh.service_forwarder(9000).await.expect("TCP forwarder");
    let (mut tcp, tcp_closed) = h1_conn(forwarder.addr).await;
    let a = h1_send(&mut tcp, get("/tcp"))
        .await
        .expect("the TCP service port");
    assert_eq!(a.status, 200);

    // The VirtualService now adds a response header to the service's routes.
    let mut l = fixture.main_internal();
    let vhost = service_vhost(service_hcm(&mut l).expect("service HCM")).expect("virtual host");
    vhost["response_headers_to_add"] =
        json!([{"header": {"key": "x-route-version", "value": "vs-v2"}}]);
    scenarios::push(
        &mesh,
        ResourceKind::Listener,
        &l,
        "main_internal, VirtualService changed",
    )
    .await
    .expect("the proxy ACKs");

    eventually(
        "a new connection through the waypoint routed by the new VirtualService",
        || mesh.log_tail(40),
        || async {
            let (mut send, _closed) = h2_conn(mesh.client_addr()).await;
            let a = h2_send(&mut send, get("/get")).await.ok()?;
            (a.status == 200 && a.version == "vs-v2").then_some(())
        },
    )
    .await;
    // Without the drain the old connection would idle on for an hour.
    old_closed
        .wait("the connection opened before the update")
        .await;
    assert!(h2_send(&mut old, get("/get")).await.is_err());
    // The TCP chain did not change: its connection is not drained.
    let a = h1_send(&mut tcp, get("/tcp"))
        .await
        .expect("the TCP connection carries on");
    assert_eq!(a.status, 200);
    assert!(!tcp_closed.now());
}
