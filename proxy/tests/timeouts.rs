//! Envoy's timeouts and keepalives through the proxy process, from a static bootstrap: the route
//! timeout (headers and body), per-try and per-try idle timeouts, `stream_idle_timeout` and the
//! route's `idle_timeout`, `request_timeout`, `max_stream_duration` (route, HCM, `grpc-timeout`),
//! istiod's `max_grpc_timeout: 0s`, the `x-envoy-upstream-rq-timeout-ms` header, the downstream
//! connection's `idle_timeout`, `max_connection_duration` and `max_requests_per_connection`,
//! HTTP/2 keepalive PINGs (a client that never answers them is dropped), and tcp_proxy's
//! `idle_timeout` and `max_downstream_connection_duration`. Each fires with Envoy's status, flag
//! and stat, and does not fire when set to zero. Real processes and sockets on 127.0.0.1.

mod common;

use std::{
    convert::Infallible,
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{StaticProxy, WAIT};
use http_body_util::BodyExt as _;
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use serde_json::Value as Json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

const BOOTSTRAP: &str = r#"
node: {id: "t~127.0.0.1~t.default~default.svc.cluster.local", cluster: t}
admin: {address: {socket_address: {address: 127.0.0.1, port_value: ${ADMIN}}}}
static_resources:
  listeners:
  - name: timers
    address: {socket_address: {address: 127.0.0.1, port_value: ${TIMERS}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: timers
          stream_idle_timeout: 0.5s
          request_timeout: 1s
          common_http_protocol_options: {idle_timeout: 0.8s, max_stream_duration: 4s}
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: ${DIR}/timers.log
              log_format: {text_format_source: {inline_string: "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS%\n"}}
          route_config:
            name: timers
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: /route-timeout}
                route: {cluster: backend, timeout: 0.3s}
              - match: {prefix: /no-timeout}
                route: {cluster: backend, timeout: 0s, idle_timeout: 0s}
              - match: {prefix: /idle}
                route: {cluster: backend, timeout: 0s}
              - match: {prefix: /route-idle}
                route: {cluster: backend, timeout: 0s, idle_timeout: 1.5s}
              - match: {prefix: /drip}
                route: {cluster: drip, timeout: 0s}
              - match: {prefix: /stall}
                route: {cluster: drip, timeout: 0s}
              - match: {prefix: /route-body}
                route: {cluster: drip, timeout: 1s, idle_timeout: 0s, prefix_rewrite: /drip}
              - match: {prefix: /per-try-idle}
                route:
                  cluster: drip
                  timeout: 0s
                  idle_timeout: 0s
                  prefix_rewrite: /stall
                  retry_policy: {retry_on: 5xx, num_retries: 0, per_try_idle_timeout: 0.3s}
              - match: {prefix: /per-try}
                route:
                  cluster: backend
                  timeout: 0s
                  idle_timeout: 0s
                  retry_policy: {retry_on: 5xx, num_retries: 1, per_try_timeout: 0.3s,
                                 retry_back_off: {base_interval: 0.01s, max_interval: 0.02s}}
              - match: {prefix: /grpc-msd}
                route: {cluster: backend, timeout: 0s, idle_timeout: 0s,
                        max_stream_duration: {grpc_timeout_header_max: 0s}}
              - match: {prefix: /grpc}
                route: {cluster: backend, timeout: 0s, idle_timeout: 0s, max_grpc_timeout: 0s}
              - match: {prefix: /route-msd}
                route: {cluster: backend, timeout: 0s, idle_timeout: 0s,
                        max_stream_duration: {max_stream_duration: 0.4s}}
              - match: {prefix: /}
                route: {cluster: backend}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  - name: plain
    address: {socket_address: {address: 127.0.0.1, port_value: ${PLAIN}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: plain
          stream_idle_timeout: 0s
          common_http_protocol_options: {idle_timeout: 0s}
          route_config:
            name: plain
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: /}
                route: {cluster: backend, timeout: 0s}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  - name: limits
    address: {socket_address: {address: 127.0.0.1, port_value: ${LIMITS}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: limits
          common_http_protocol_options: {max_connection_duration: 2s, max_requests_per_connection: 2}
          route_config:
            name: limits
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: /}
                route: {cluster: backend}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  - name: keepalive
    address: {socket_address: {address: 127.0.0.1, port_value: ${KEEPALIVE}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: keepalive
          codec_type: HTTP2
          http2_protocol_options: {connection_keepalive: {interval: 0.2s, timeout: 0.3s}}
          route_config:
            name: keepalive
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: /}
                route: {cluster: backend}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  - name: tcpidle
    address: {socket_address: {address: 127.0.0.1, port_value: ${TCPIDLE}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcpidle
          cluster: tcp_echo
          idle_timeout: 0.5s
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: ${DIR}/tcp.log
              log_format: {text_format_source: {inline_string: "tcpidle %RESPONSE_FLAGS%\n"}}
  - name: tcpdur
    address: {socket_address: {address: 127.0.0.1, port_value: ${TCPDUR}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcpdur
          cluster: tcp_echo
          idle_timeout: 0s
          max_downstream_connection_duration: 1.5s
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: ${DIR}/tcp.log
              log_format: {text_format_source: {inline_string: "tcpdur %RESPONSE_FLAGS%\n"}}
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: backend
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${BACKEND}}}}}]}]
  - name: drip
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: drip
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${DRIP}}}}}]}]
  - name: tcp_echo
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: tcp_echo
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${TCPECHO}}}}}]}]
"#;

type StreamBody =
    http_body_util::StreamBody<futures::channel::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>>;

/// A backend whose response bodies take their time: `/drip?n=N&ms=M` sends N chunks, one every
/// M ms; `/stall` sends one chunk, then nothing (the stream stays open for a minute).
async fn drip_backend() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: http::Request<_>| async move {
                    let query = req.uri().query().unwrap_or_default().to_owned();
                    let param = |k: &str, default: u64| {
                        query
                            .split('&')
                            .filter_map(|kv| kv.split_once('='))
                            .find(|(name, _)| *name == k)
                            .and_then(|(_, v)| v.parse::<u64>().ok())
                            .unwrap_or(default)
                    };
                    let (n, every) = if req.uri().path().starts_with("/stall") {
                        (1, 60_000)
                    } else {
                        (param("n", 10), param("ms", 200))
                    };
                    let (mut tx, rx) = futures::channel::mpsc::channel(1);
                    tokio::spawn(async move {
                        use futures::SinkExt as _;
                        for i in 0..n {
                            if i > 0 {
                                tokio::time::sleep(Duration::from_millis(every)).await;
                            }
                            if tx
                                .send(Ok(Frame::data(Bytes::from_static(b"chunk\n"))))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        // `/stall`: keep the stream open without sending.
                        if n == 1 {
                            tokio::time::sleep(Duration::from_millis(every)).await;
                        }
                    });
                    Ok::<_, Infallible>(http::Response::new(StreamBody::new(rx)))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    port
}

/// A TCP echo backend; its port.
async fn tcp_echo() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

/// A response: status and the body (`Err` when it broke off).
struct Reply {
    status: u16,
    body: Result<Bytes, String>,
}

impl Reply {
    fn json(&self) -> Json {
        self.body
            .as_ref()
            .ok()
            .and_then(|b| serde_json::from_slice(b).ok())
            .unwrap_or(Json::Null)
    }
}

/// One HTTP/1.1 request on a fresh connection.
async fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "svc.local");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    let resp = tokio::time::timeout(WAIT, send.send_request(req))
        .await
        .expect("response in time")
        .expect("response");
    let status = resp.status().as_u16();
    let body = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .expect("body in time")
        .map(|b| b.to_bytes())
        .map_err(|e| e.to_string());
    Reply { status, body }
}

/// Reads from `s` until EOF (or an error), bounded; the bytes and the time it took.
async fn read_until_closed(s: &mut TcpStream) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (all, start.elapsed()),
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the connection stayed open"),
        }
    }
}

/// Whether `s` is still open `after` (nothing to read, no EOF).
async fn still_open(s: &mut TcpStream, after: Duration) -> bool {
    let mut buf = [0u8; 64];
    tokio::time::timeout(after, s.read(&mut buf)).await.is_err()
}

/// The proxy with its backends: the echo server, the drip backend and the TCP echo.
async fn setup(tag: &str) -> StaticProxy {
    let (backend, drip, tcp) = (
        common::echo("backend").await,
        drip_backend().await,
        tcp_echo().await,
    );
    StaticProxy::start(
        &format!("timeouts-{tag}"),
        BOOTSTRAP,
        &[("BACKEND", backend), ("DRIP", drip), ("TCPECHO", tcp)],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_and_per_try_timeouts() {
    let proxy = setup("route").await;
    let p = proxy.addr_of("TIMERS");
    // The route timeout (0.3 s) fires before a slow upstream answers: 504 UT.
    let r = request(p, "GET", "/route-timeout", &[("x-echo-delay-ms", "2000")]).await;
    assert_eq!(r.status, 504);
    assert_eq!(
        r.body.as_deref().ok(),
        Some(&b"upstream request timeout"[..])
    );
    proxy.wait_log("timers.log", "/route-timeout 504 UT").await;
    proxy
        .wait_stat("cluster.backend.upstream_rq_timeout", 1)
        .await;
    // In time, it does not fire; the upstream is told how long it has.
    let r = request(p, "GET", "/route-timeout/fast", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["headers"]["x-envoy-expected-rq-timeout-ms"], "300");
    // `timeout: 0s` (istiod's): no limit, and no expected-timeout header.
    let r = request(p, "GET", "/no-timeout", &[("x-echo-delay-ms", "1200")]).await;
    assert_eq!(r.status, 200);
    assert!(
        r.json()["headers"]
            .get("x-envoy-expected-rq-timeout-ms")
            .is_none()
    );
    // The route timeout runs until the response ends: a body slower than it is cut, UT.
    let r = request(p, "GET", "/route-body?n=20&ms=150", &[]).await;
    assert_eq!(r.status, 200, "headers came in time");
    assert!(r.body.is_err(), "the body was cut: {:?}", r.body);
    proxy
        .wait_log("timers.log", "/route-body?n=20&ms=150 200 UT")
        .await;
    proxy.wait_stat("cluster.drip.upstream_rq_timeout", 1).await;
    // Per-try timeout (0.3 s) with one retry: both attempts time out, 504 UT.
    let r = request(p, "GET", "/per-try", &[("x-echo-delay-ms", "2000")]).await;
    assert_eq!(r.status, 504);
    proxy
        .wait_stat("cluster.backend.upstream_rq_per_try_timeout", 2)
        .await;
    proxy
        .wait_stat("cluster.backend.upstream_rq_retry", 1)
        .await;
    // Per-try idle timeout (0.3 s): the response started, then went silent: cut, UT.
    let r = request(p, "GET", "/per-try-idle", &[]).await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_err(), "cut: {:?}", r.body);
    proxy
        .wait_stat("cluster.drip.upstream_rq_per_try_idle_timeout", 1)
        .await;
    proxy.wait_log("timers.log", "/per-try-idle 200 UT").await;
    // `x-envoy-upstream-rq-timeout-ms` from an internal client (XFF: a private address) sets
    // the route timeout; it is consumed, not forwarded.
    let internal = ("x-forwarded-for", "10.1.2.3");
    let r = request(
        p,
        "GET",
        "/default/internal",
        &[
            internal,
            ("x-envoy-upstream-rq-timeout-ms", "200"),
            ("x-echo-delay-ms", "1500"),
        ],
    )
    .await;
    assert_eq!(r.status, 504);
    proxy
        .wait_log("timers.log", "/default/internal 504 UT")
        .await;
    let r = request(
        p,
        "GET",
        "/default",
        &[internal, ("x-envoy-upstream-rq-timeout-ms", "5000")],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = r.json();
    assert!(
        seen["headers"]
            .get("x-envoy-upstream-rq-timeout-ms")
            .is_none(),
        "{seen}"
    );
    assert_eq!(seen["headers"]["x-envoy-expected-rq-timeout-ms"], "5000");
    // An external client's header is stripped: the route's 15 s default applies (the delay
    // stays under the HCM's 0.5 s stream idle timeout).
    let r = request(
        p,
        "GET",
        "/default/external",
        &[
            ("x-envoy-upstream-rq-timeout-ms", "100"),
            ("x-echo-delay-ms", "300"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["headers"]["x-envoy-expected-rq-timeout-ms"],
        "15000"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_header_and_max_stream_duration() {
    let proxy = setup("grpc").await;
    let p = proxy.addr_of("TIMERS");
    let grpc = ("content-type", "application/grpc");
    // istiod's route (`timeout: 0s, max_grpc_timeout: 0s`): grpc-timeout is the route timeout.
    let r = request(
        p,
        "POST",
        "/grpc",
        &[grpc, ("grpc-timeout", "300m"), ("x-echo-delay-ms", "2000")],
    )
    .await;
    // A local reply to a gRPC request is a trailers-only status (HTTP 200, as Envoy sends it).
    assert_eq!(r.status, 200);
    proxy.wait_log("timers.log", "/grpc 200 UT").await;
    // Forwarded with the timeout it has (and Envoy's expected-timeout header).
    let r = request(p, "POST", "/grpc", &[grpc, ("grpc-timeout", "2S")]).await;
    assert_eq!(r.status, 200);
    let seen = r.json();
    assert_eq!(seen["headers"]["grpc-timeout"], "2000m", "{seen}");
    assert_eq!(
        seen["headers"]["x-envoy-expected-rq-timeout-ms"], "2000",
        "{seen}"
    );
    // Without the header there is no limit (max_grpc_timeout 0s = uncapped, timeout 0s).
    let r = request(p, "POST", "/grpc", &[grpc, ("x-echo-delay-ms", "1200")]).await;
    assert_eq!(r.status, 200);
    // Not gRPC: the header means nothing to the router.
    let r = request(
        p,
        "GET",
        "/grpc",
        &[("grpc-timeout", "100m"), ("x-echo-delay-ms", "600")],
    )
    .await;
    assert_eq!(r.status, 200);
    // Route `max_stream_duration.grpc_timeout_header_max: 0s`: grpc-timeout is the stream's
    // duration limit (the HCM's timer, no flag); to a gRPC client a trailers-only
    // DEADLINE_EXCEEDED (HTTP 200, no body; the status mapping is unit-tested in conn_manager).
    let r = request(
        p,
        "POST",
        "/grpc-msd",
        &[grpc, ("grpc-timeout", "300m"), ("x-echo-delay-ms", "2000")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.as_deref().ok(), Some(&b""[..]));
    proxy.wait_log("timers.log", "/grpc-msd 200 -").await;
    // Route `max_stream_duration: 0.4s`.
    let r = request(p, "GET", "/route-msd", &[("x-echo-delay-ms", "2000")]).await;
    assert_eq!(r.status, 504);
    proxy.wait_log("timers.log", "/route-msd 504 -").await;
    proxy
        .wait_stat("http.timers.downstream_rq_max_duration_reached", 2)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_idle_and_request_timeouts() {
    let proxy = setup("idle").await;
    let p = proxy.addr_of("TIMERS");
    // stream_idle_timeout (0.5 s): nothing moves while the upstream thinks: 504 SI.
    let r = request(p, "GET", "/idle", &[("x-echo-delay-ms", "2000")]).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.body.as_deref().ok(), Some(&b"stream timeout"[..]));
    proxy.wait_log("timers.log", "/idle 504 SI").await;
    proxy
        .wait_stat("http.timers.downstream_rq_idle_timeout", 1)
        .await;
    // The route's idle_timeout (1.5 s) replaces the HCM's: a 1 s pause is fine.
    let r = request(p, "GET", "/route-idle", &[("x-echo-delay-ms", "1000")]).await;
    assert_eq!(r.status, 200);
    // A streaming response with steady activity (a chunk every 200 ms for 3 s) outlives it.
    let r = request(p, "GET", "/drip?n=15&ms=200", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body.as_ref().map(|b| b.len()).ok(),
        Some(15 * 6),
        "{:?}",
        r.body.as_ref().err()
    );
    // One that goes silent after its first chunk is reset: SI.
    let r = request(p, "GET", "/stall", &[]).await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_err());
    proxy.wait_log("timers.log", "/stall 200 SI").await;
    // stream_idle_timeout: 0s: no limit.
    let r = request(
        proxy.addr_of("PLAIN"),
        "GET",
        "/",
        &[("x-echo-delay-ms", "1200")],
    )
    .await;
    assert_eq!(r.status, 200);
    // A request whose body stops arriving: the stream idle timer answers 408 (not complete).
    let mut s = TcpStream::connect(p).await.expect("connect");
    s.write_all(b"POST /idle HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc")
        .await
        .expect("write");
    let (text, _) = read_until_closed(&mut s).await;
    let text = String::from_utf8_lossy(&text);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    // request_timeout (1 s): the request body keeps trickling (so it is not idle) but never
    // ends: 408, no flag.
    let mut s = TcpStream::connect(p).await.expect("connect");
    s.write_all(b"POST /no-timeout HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n")
        .await
        .expect("write");
    let start = Instant::now();
    let trickle = async {
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if s.write_all(b"x").await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(2500), trickle).await;
    let (text, _) = read_until_closed(&mut s).await;
    let text = String::from_utf8_lossy(&text);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request timeout"), "{text}");
    assert!(start.elapsed() >= Duration::from_millis(900));
    proxy
        .wait_stat("http.timers.downstream_rq_timeout", 1)
        .await;
    proxy.wait_log("timers.log", "/no-timeout 408 -").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downstream_connection_limits() {
    let proxy = setup("conn").await;
    let get = b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n";
    // idle_timeout (0.8 s): a keep-alive connection without requests is closed.
    let mut s = TcpStream::connect(proxy.addr_of("TIMERS"))
        .await
        .expect("connect");
    s.write_all(get).await.expect("write");
    let mut buf = vec![0u8; 8192];
    let n = s.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let (rest, waited) = read_until_closed(&mut s).await;
    assert!(rest.is_empty() || String::from_utf8_lossy(&rest).contains("200"));
    assert!(
        waited >= Duration::from_millis(500),
        "closed after {waited:?}"
    );
    proxy
        .wait_stat("http.timers.downstream_cx_idle_timeout", 1)
        .await;
    // idle_timeout: 0s keeps it (longer than hyper's old default would, too).
    let mut s = TcpStream::connect(proxy.addr_of("PLAIN"))
        .await
        .expect("connect");
    s.write_all(get).await.expect("write");
    let n = s.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert!(still_open(&mut s, Duration::from_millis(1500)).await);
    s.write_all(get).await.expect("write again");
    let n = s.read(&mut buf).await.expect("read again");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // max_requests_per_connection (2): the second response says close, and the connection ends.
    let mut s = TcpStream::connect(proxy.addr_of("LIMITS"))
        .await
        .expect("connect");
    s.write_all(get).await.expect("write");
    let n = s.read(&mut buf).await.expect("read");
    let first = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    assert!(
        first.starts_with("http/1.1 200") && !first.contains("connection: close"),
        "{first}"
    );
    s.write_all(get).await.expect("write");
    let (second, _) = read_until_closed(&mut s).await;
    let second = String::from_utf8_lossy(&second).to_ascii_lowercase();
    assert!(second.starts_with("http/1.1 200"), "{second}");
    assert!(second.contains("connection: close"), "{second}");
    proxy
        .wait_stat("http.limits.downstream_cx_max_requests_reached", 1)
        .await;
    // max_connection_duration (2 s): the connection is drained (closed when idle).
    let mut s = TcpStream::connect(proxy.addr_of("LIMITS"))
        .await
        .expect("connect");
    s.write_all(get).await.expect("write");
    let n = s.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let (_, waited) = read_until_closed(&mut s).await;
    assert!(
        waited >= Duration::from_millis(1000),
        "closed after {waited:?}"
    );
    proxy
        .wait_stat("http.limits.downstream_cx_max_duration_reached", 1)
        .await;
}

/// HTTP/2 frame types and flags used by the raw client below.
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;

fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![
        (len >> 16) as u8,
        (len >> 8) as u8,
        len as u8,
        kind,
        flags,
        0,
        0,
        0,
        0,
    ];
    f.extend_from_slice(payload);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_keepalive_pings_and_drops_a_silent_peer() {
    let proxy = setup("keepalive").await;
    // A raw h2c client: preface and SETTINGS, acknowledges the server's SETTINGS, then never
    // answers a PING.
    let mut s = TcpStream::connect(proxy.addr_of("KEEPALIVE"))
        .await
        .expect("connect");
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(SETTINGS, 0, &[]));
    s.write_all(&hello).await.expect("preface");
    let start = Instant::now();
    let (mut pings, mut goaway) = (0, false);
    let mut head = [0u8; 9];
    loop {
        match tokio::time::timeout(WAIT, s.read_exact(&mut head)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break,
            Err(_) => panic!("the silent peer was not dropped ({pings} PINGs)"),
        }
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        if s.read_exact(&mut payload).await.is_err() {
            break;
        }
        match (head[3], head[4] & ACK) {
            (SETTINGS, 0) => {
                let _ = s.write_all(&frame(SETTINGS, ACK, &[])).await;
            }
            (PING, 0) => pings += 1,
            (GOAWAY, _) => goaway = true,
            _ => {}
        }
    }
    assert!(pings >= 1, "keepalive PINGs were sent");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(400),
        "interval + timeout: {took:?}"
    );
    // The connection went away (GOAWAY before the close is hyper's way; EOF is enough).
    let _ = goaway;
    // A client that answers PINGs keeps its connection.
    let tcp = TcpStream::connect(proxy.addr_of("KEEPALIVE"))
        .await
        .expect("connect");
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .expect("h2");
    let conn = tokio::spawn(conn);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(!conn.is_finished(), "a live peer keeps its connection");
    let req = http::Request::get("http://svc.local/")
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_idle_timeout_and_max_duration() {
    let proxy = setup("tcp").await;
    // idle_timeout (0.5 s): bytes flow, then silence closes both sides.
    let mut s = TcpStream::connect(proxy.addr_of("TCPIDLE"))
        .await
        .expect("connect");
    s.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.expect("echo");
    assert_eq!(&buf, b"ping");
    let (_, waited) = read_until_closed(&mut s).await;
    assert!(
        waited >= Duration::from_millis(300),
        "closed after {waited:?}"
    );
    proxy.wait_stat("tcp.tcpidle.idle_timeout", 1).await;
    proxy.wait_log("tcp.log", "tcpidle -").await;
    // idle_timeout: 0s keeps an idle connection; max_downstream_connection_duration (1.5 s)
    // closes it even while bytes flow, flag DT.
    let mut s = TcpStream::connect(proxy.addr_of("TCPDUR"))
        .await
        .expect("connect");
    let start = Instant::now();
    s.write_all(b"ping").await.expect("write");
    s.read_exact(&mut buf).await.expect("echo");
    assert!(
        still_open(&mut s, Duration::from_millis(700)).await,
        "idle is fine"
    );
    s.write_all(b"pong").await.expect("write");
    s.read_exact(&mut buf).await.expect("echo");
    assert_eq!(&buf, b"pong");
    let (_, _) = read_until_closed(&mut s).await;
    let lived = start.elapsed();
    assert!(
        lived >= Duration::from_millis(1300),
        "closed after {lived:?}"
    );
    proxy
        .wait_stat("tcp.tcpdur.max_downstream_connection_duration", 1)
        .await;
    proxy.wait_log("tcp.log", "tcpdur DT").await;
}
