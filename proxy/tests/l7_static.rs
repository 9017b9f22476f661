//! The proxy as a plain L7 proxy from a static Envoy bootstrap (no agent, no xDS): routing by
//! virtual host and path, direct responses, redirects, prefix rewrites, header operations, RBAC
//! (HTTP filter with a per-route override), local replies with Envoy's statuses (404 NR, 503 UF,
//! 503 NC), HTTP/1.1 and h2c downstream, and a static listener whose port is taken refusing to
//! start. Real processes and sockets on 127.0.0.1.

mod common;

use std::{
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{Ports, StaticProxy, distinct_ports, echo};
use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value as Json;
use tokio::{net::TcpStream, process::Command};

/// `${DEAD}` is picked free and left so: a port nothing listens on.
const BOOTSTRAP: &str = r#"
node: {id: "l7~127.0.0.1~l7.default~default.svc.cluster.local", cluster: l7}
admin: {address: {socket_address: {address: 127.0.0.1, port_value: ${ADMIN}}}}
static_resources:
  listeners:
  - name: l7
    address: {socket_address: {address: 127.0.0.1, port_value: ${LISTEN}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: l7
          codec_type: AUTO
          server_name: l7-proxy
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: ${DIR}/access.log
              log_format: {text_format_source: {inline_string: "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS%\n"}}
          route_config:
            name: l7
            validate_clusters: false
            request_headers_to_add:
            - header: {key: x-from-table, value: "table"}
            virtual_hosts:
            - name: other
              domains: ["other.example", "other.example:*"]
              routes:
              - match: {prefix: /}
                direct_response: {status: 204}
            - name: default
              domains: ["*"]
              routes:
              - match: {path: /direct}
                direct_response: {status: 200, body: {inline_string: hello}}
              - match: {prefix: /redirect}
                redirect: {host_redirect: example.org, path_redirect: /moved}
              - match: {prefix: /dead}
                route: {cluster: dead}
              - match: {prefix: /nocluster}
                route: {cluster: missing}
              - match: {prefix: /open/admin}
                route: {cluster: backend}
                typed_per_filter_config:
                  envoy.filters.http.rbac:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute
              - match: {prefix: /retry-connect}
                route:
                  cluster: flaky
                  retry_policy:
                    retry_on: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
                    num_retries: 2
                    retry_host_predicate: [{name: envoy.retry_host_predicates.previous_hosts,
                                            typed_config: {"@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}}]
                    host_selection_retry_max_attempts: 5
              - match: {prefix: /retry-5xx}
                route:
                  cluster: backend
                  retry_policy: {retry_on: "5xx", num_retries: 2, retry_back_off: {base_interval: 0.001s, max_interval: 0.002s}}
              - match: {prefix: /fault-abort}
                route: {cluster: backend}
                typed_per_filter_config:
                  envoy.filters.http.fault:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
                    abort: {http_status: 418, percentage: {numerator: 100, denominator: HUNDRED}}
              - match: {prefix: /fault-grpc}
                route: {cluster: backend}
                typed_per_filter_config:
                  envoy.filters.http.fault:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
                    delay: {fixed_delay: 0.05s, percentage: {numerator: 100}}
                    abort: {grpc_status: 14, percentage: {numerator: 100}}
              - match: {prefix: /sticky}
                route:
                  cluster: ring
                  hash_policy: [{header: {header_name: x-user}}]
              - match: {prefix: /rewrite/}
                route: {cluster: backend, prefix_rewrite: /rewritten/}
              - match: {prefix: /limited}
                route: {cluster: limited}
              - match: {prefix: /queued}
                route: {cluster: queued}
              - match: {prefix: /outlier}
                route: {cluster: outlier}
              - match: {prefix: /}
                route: {cluster: backend}
                request_headers_to_add:
                - header: {key: x-peer, value: "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}
                response_headers_to_add:
                - header: {key: x-route, value: default}
          http_filters:
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: DENY
                policies:
                  deny-admin:
                    permissions: [{url_path: {path: {prefix: /admin}}}, {url_path: {path: {prefix: /open/admin}}}]
                    principals: [{any: true}]
          - name: envoy.filters.http.fault
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault}
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: backend
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${BACKEND}}}}}]}]
  - name: flaky
    type: STATIC
    connect_timeout: 2s
    lb_policy: ROUND_ROBIN
    load_assignment:
      cluster_name: flaky
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${DEAD}}}}},
                                  {endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${BACKEND}}}}}]}]
  - name: ring
    type: STATIC
    lb_policy: RING_HASH
    load_assignment:
      cluster_name: ring
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${BACKEND}}}}},
                                  {endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${BACKEND2}}}}}]}]
  - name: limited
    type: STATIC
    connect_timeout: 2s
    circuit_breakers:
      thresholds: [{max_requests: 1, max_pending_requests: 1, track_remaining: true}]
    load_assignment:
      cluster_name: limited
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${BACKEND}}}}}]}]
  - name: queued
    type: STATIC
    connect_timeout: 2s
    circuit_breakers:
      thresholds: [{max_connections: 1, max_pending_requests: 1}]
    load_assignment:
      cluster_name: queued
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${BACKEND}}}}}]}]
  - name: outlier
    type: STATIC
    connect_timeout: 2s
    lb_policy: ROUND_ROBIN
    outlier_detection: {consecutive_5xx: 3, interval: 0.1s, base_ejection_time: 1s, max_ejection_percent: 50}
    load_assignment:
      cluster_name: outlier
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${BACKEND}}}}},
                                  {endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${BACKEND2}}}}}]}]
  - name: dead
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: dead
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${DEAD}}}}}]}]
"#;

/// The proxy with `backend` behind every cluster but `ring` and `outlier`, which balance over
/// `backend` and `backend2`.
async fn start2(tag: &str, backend: u16, backend2: u16) -> StaticProxy {
    StaticProxy::start(
        &format!("l7-{tag}"),
        BOOTSTRAP,
        &[("BACKEND", backend), ("BACKEND2", backend2)],
    )
    .await
}

async fn start(tag: &str, backend: u16) -> StaticProxy {
    start2(tag, backend, backend).await
}

struct Reply {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Json {
        serde_json::from_slice(&self.body).unwrap_or(Json::Null)
    }
}

async fn get(addr: SocketAddr, host: &str, path: &str, h2: bool) -> Reply {
    send(addr, host, "GET", path, h2, Bytes::new()).await
}

async fn send(
    addr: SocketAddr,
    host: &str,
    method: &str,
    path: &str,
    h2: bool,
    body: Bytes,
) -> Reply {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let io = TokioIo::new(tcp);
    let req = http::Request::builder()
        .method(method)
        .uri(if h2 {
            format!("http://{host}{path}")
        } else {
            path.to_owned()
        })
        .header("x-test", "1");
    let req = if h2 { req } else { req.header("host", host) };
    let req = req.body(http_body_util::Full::new(body)).expect("request");
    let resp = if h2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        send.send_request(req).await.expect("h2 request")
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("h1 handshake");
        tokio::spawn(conn);
        send.send_request(req).await.expect("h1 request")
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Reply {
        status,
        headers,
        body,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_rewrites_header_ops_and_local_replies() {
    let backend = echo("backend").await;
    let proxy = start("routes", backend).await;
    for h2 in [false, true] {
        let proto = if h2 { "h2c" } else { "HTTP/1.1" };
        // Proxied, with header operations at route and table level.
        let r = get(proxy.addr(), "svc.local", "/hello?x=1", h2).await;
        assert_eq!(r.status, 200, "{proto}: {:?}", r.body);
        let seen = r.json();
        assert_eq!(seen["path"], "/hello?x=1", "{proto}");
        assert_eq!(seen["headers"]["x-peer"], "127.0.0.1", "{proto}: {seen}");
        assert_eq!(seen["headers"]["x-from-table"], "table", "{proto}: {seen}");
        assert_eq!(seen["headers"]["host"], "svc.local", "{proto}: {seen}");
        assert!(
            seen["headers"]["x-request-id"].is_string(),
            "{proto}: {seen}"
        );
        assert!(
            seen["headers"]["x-forwarded-proto"].is_string(),
            "{proto}: {seen}"
        );
        assert_eq!(r.headers["x-route"], "default", "{proto}");
        assert_eq!(r.headers["server"], "l7-proxy", "{proto}");
        // Whole milliseconds.
        let service_ms = r.headers["x-envoy-upstream-service-time"]
            .to_str()
            .ok()
            .and_then(|v| v.parse::<u64>().ok());
        assert!(service_ms.is_some(), "{proto}: {:?}", r.headers);
        // Prefix rewrite keeps the rest of the path and the query.
        let r = get(proxy.addr(), "svc.local", "/rewrite/a/b?q=2", h2).await;
        assert_eq!(r.json()["path"], "/rewritten/a/b?q=2", "{proto}");
        // Direct response, redirect, other virtual host.
        let r = get(proxy.addr(), "svc.local", "/direct", h2).await;
        assert_eq!((r.status, &r.body[..]), (200, &b"hello"[..]), "{proto}");
        let r = get(proxy.addr(), "svc.local", "/redirect/x", h2).await;
        assert_eq!(r.status, 301, "{proto}");
        assert_eq!(r.headers["location"], "http://example.org/moved", "{proto}");
        let r = get(proxy.addr(), "other.example", "/anything", h2).await;
        assert_eq!(r.status, 204, "{proto}");
        // Fault injection from per-route configs (istiod's VirtualService `fault`).
        let r = get(proxy.addr(), "svc.local", "/fault-abort", h2).await;
        assert_eq!(
            (r.status, &r.body[..]),
            (418, &b"fault filter abort"[..]),
            "{proto}"
        );
        let t = Instant::now();
        let r = get(proxy.addr(), "svc.local", "/fault-grpc", h2).await;
        assert_eq!(r.status, 200, "{proto}");
        assert_eq!(r.headers["grpc-status"], "14", "{proto}");
        assert!(
            t.elapsed() >= Duration::from_millis(50),
            "{proto}: the delay was applied"
        );
        // RBAC: denied by the listener-level policy, allowed where the route disables the filter.
        let r = get(proxy.addr(), "svc.local", "/admin/users", h2).await;
        assert_eq!(r.status, 403, "{proto}");
        assert_eq!(&r.body[..], b"RBAC: access denied", "{proto}");
        let r = get(proxy.addr(), "svc.local", "/open/admin", h2).await;
        assert_eq!(r.status, 200, "{proto}: per-route RBAC override");
        // Local replies: no healthy connection (UF) and no cluster (NC) are 503s.
        let r = get(proxy.addr(), "svc.local", "/dead", h2).await;
        assert_eq!(r.status, 503, "{proto}");
        assert!(
            String::from_utf8_lossy(&r.body).contains("connection failure"),
            "{proto}: {:?}",
            r.body
        );
        let r = get(proxy.addr(), "svc.local", "/nocluster", h2).await;
        assert_eq!(r.status, 503, "{proto}");
    }
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_listener_on_a_taken_port_stops_the_proxy() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let dir = common::temp_dir("l7-taken");
    let [admin, backend, dead] = distinct_ports();
    let ports = Ports::new(&[
        ("LISTEN", port),
        ("ADMIN", admin),
        ("BACKEND", backend),
        ("BACKEND2", backend),
        ("DEAD", dead),
    ]);
    let path = dir.join("bootstrap.yaml");
    std::fs::write(&path, common::render(BOOTSTRAP, &dir, &ports)).expect("write bootstrap");
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new(env!("CARGO_BIN_EXE_proxy"))
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("proxy exits")
    .expect("run proxy");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot bind 127.0.0.1:{port}")),
        "{stderr}"
    );
}

/// The launcher's answer to the race between picking a free port and the proxy binding it: the
/// proxy exits with `cannot bind`, and it is started again on newly picked ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_picked_port_taken_before_the_bind_is_picked_again() {
    let backend = echo("backend").await;
    for taken in ["LISTEN", "ADMIN"] {
        let proxy = common::Launch::new(&format!("l7-picked-again-{taken}"))
            .concurrency(1)
            .taken_first(taken)
            .template(BOOTSTRAP, &[("BACKEND", backend), ("BACKEND2", backend)])
            .await;
        assert_eq!(proxy.attempts(), 2, "{taken}");
        let r = get(proxy.addr(), "svc.local", "/hello", false).await;
        assert_eq!(r.status, 200, "{taken}: {:?}", r.body);
        assert_eq!(r.json()["server"], "backend", "{taken}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_follow_the_route_policy() {
    let backend = echo("backend").await;
    let proxy = start("retries", backend).await;
    // istiod's default waypoint policy: a dead endpoint is retried on another host (previous_hosts),
    // so every request succeeds although round robin sends every other first try to the dead one.
    for i in 0..6 {
        let r = send(
            proxy.addr(),
            "svc.local",
            "POST",
            "/retry-connect",
            i % 2 == 0,
            Bytes::from_static(b"payload"),
        )
        .await;
        assert_eq!(r.status, 200, "request {i}: {:?}", r.body);
        assert_eq!(
            r.json()["body_len"],
            7,
            "request {i}: the body reached the backend whole"
        );
    }
    let retried = proxy.stat("cluster.flaky.upstream_rq_retry").await;
    assert!(retried >= 2, "connect failures were retried: {retried}");
    // 5xx: two retries, then the upstream's answer goes back (Envoy passes the last response).
    let before = proxy.stat("cluster.backend.upstream_rq_retry").await;
    let r = send(
        proxy.addr(),
        "svc.local",
        "POST",
        "/retry-5xx?x-echo-status=503",
        false,
        Bytes::from_static(b"again"),
    )
    .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["body_len"], 5, "the replayed body is whole");
    let after = proxy.stat("cluster.backend.upstream_rq_retry").await;
    assert_eq!(after - before, 2, "num_retries: 2");
    assert!(
        proxy
            .stat("cluster.backend.upstream_rq_retry_limit_exceeded")
            .await
            >= 1
    );
    // Not retried when the policy does not cover the status.
    let r = get(proxy.addr(), "svc.local", "/hello?x-echo-status=503", false).await;
    assert_eq!(r.status, 503);
    assert_eq!(proxy.stat("cluster.backend.upstream_rq_retry").await, after);
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_keeps_a_key_on_one_host() {
    let ports = [echo("echo-a").await, echo("echo-b").await];
    let proxy = start2("ring", ports[0], ports[1]).await;
    let mut seen = std::collections::BTreeMap::new();
    for user in 0..20 {
        let mut servers = std::collections::BTreeSet::new();
        for _ in 0..3 {
            let tcp = TcpStream::connect(proxy.addr()).await.expect("connect");
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            let req = http::Request::builder()
                .uri("/sticky")
                .header("host", "svc.local")
                .header("x-user", format!("user-{user}"))
                .body(http_body_util::Empty::<Bytes>::new())
                .expect("request");
            let resp = send.send_request(req).await.expect("response");
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            let json: Json = serde_json::from_slice(&body).expect("json");
            servers.insert(json["server"].as_str().unwrap_or_default().to_owned());
        }
        assert_eq!(
            servers.len(),
            1,
            "user-{user} moved between hosts: {servers:?}"
        );
        *seen
            .entry(servers.into_iter().next().unwrap_or_default())
            .or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "20 keys spread over both hosts: {seen:?}");
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_requests_leave_the_active_gauge() {
    let backend = echo("backend").await;
    let proxy = start("gauge", backend).await;
    // Slow upstream answers; the clients give up first (their connections close mid-request).
    for h2 in [false, true] {
        let _ = tokio::time::timeout(
            Duration::from_millis(300),
            get(proxy.addr(), "svc.local", "/slow?x-echo-delay-ms=2000", h2),
        )
        .await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let active = proxy.stat("cluster.backend.upstream_rq_active").await;
        if active == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "upstream_rq_active stuck at {active}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(proxy.stat("cluster.backend.upstream_rq_total").await >= 2);
    drop(proxy);
}

/// Waits (bounded) until `check` holds, polling.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breakers_overflow_with_503_uo() {
    let backend = echo("backend").await;
    let proxy = start("breakers", backend).await;
    // max_requests: 1: one slow request holds the only slot.
    let listen = proxy.addr();
    let slow = tokio::spawn(async move {
        get(listen, "svc.local", "/limited?x-echo-delay-ms=1500", false).await
    });
    eventually("the slow request to hold the max_requests slot", || async {
        proxy
            .stat("cluster.limited.circuit_breakers.default.rq_open")
            .await
            == 1
    })
    .await;
    assert_eq!(
        proxy
            .stat("cluster.limited.circuit_breakers.default.remaining_rq")
            .await,
        0
    );
    for h2 in [false, true] {
        let r = get(proxy.addr(), "svc.local", "/limited/extra", h2).await;
        assert_eq!(r.status, 503, "h2 {h2}: {:?}", r.body);
        assert_eq!(
            String::from_utf8_lossy(&r.body),
            "upstream connect error or disconnect/reset before headers. reset reason: overflow"
        );
        // Envoy marks replies of an open circuit breaker for the client.
        assert_eq!(
            r.headers.get("x-envoy-overloaded").map(|v| v.as_bytes()),
            Some(&b"true"[..]),
            "h2 {h2}"
        );
    }
    assert_eq!(
        proxy
            .stat("cluster.limited.upstream_rq_pending_overflow")
            .await,
        2
    );
    // The slow one is unaffected, and its slot comes back.
    let r = slow.await.expect("slow request");
    assert_eq!(r.status, 200);
    eventually("the max_requests slot to come back", || async {
        proxy
            .stat("cluster.limited.circuit_breakers.default.remaining_rq")
            .await
            == 1
    })
    .await;
    let r = get(proxy.addr(), "svc.local", "/limited/again", false).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        proxy
            .stat("cluster.limited.circuit_breakers.default.rq_open")
            .await,
        0
    );
    // The access log carries Envoy's flag.
    let log = proxy.path("access.log");
    eventually("the overflows in the access log", || async {
        std::fs::read_to_string(&log)
            .map(|t| t.lines().filter(|l| *l == "/limited/extra 503 UO").count() == 2)
            .unwrap_or(false)
    })
    .await;
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_queues_requests_until_max_pending_overflows() {
    let backend = echo("backend").await;
    let proxy = start("queued", backend).await;
    // max_connections: 1: the first slow request holds the one connection, the second waits
    // for it (pending), the third finds max_pending_requests: 1 full.
    let listen = proxy.addr();
    let slow = |path: &'static str| {
        tokio::spawn(async move { get(listen, "svc.local", path, false).await })
    };
    // Long enough that the waits below see the queue even on a loaded machine.
    let first = slow("/queued/1?x-echo-delay-ms=3000");
    eventually("the first request's connection", || async {
        proxy.stat("cluster.queued.upstream_cx_active").await == 1
    })
    .await;
    let second = slow("/queued/2?x-echo-delay-ms=100");
    eventually("the second request to be pending", || async {
        proxy
            .stat("cluster.queued.upstream_rq_pending_active")
            .await
            == 1
    })
    .await;
    assert_eq!(
        proxy
            .stat("cluster.queued.circuit_breakers.default.rq_pending_open")
            .await,
        1
    );
    let third = get(proxy.addr(), "svc.local", "/queued/3", false).await;
    assert_eq!(third.status, 503);
    assert_eq!(
        proxy
            .stat("cluster.queued.upstream_rq_pending_overflow")
            .await,
        1
    );
    assert!(proxy.stat("cluster.queued.upstream_cx_overflow").await >= 1);
    // Both queued requests are served, over the one connection.
    for task in [first, second] {
        let r = task.await.expect("request");
        assert_eq!(r.status, 200);
    }
    assert_eq!(proxy.stat("cluster.queued.upstream_cx_total").await, 1);
    assert_eq!(
        proxy
            .stat("cluster.queued.upstream_rq_pending_active")
            .await,
        0
    );
    drop(proxy);
}

/// An upstream that answers every request with 503.
async fn failing_backend() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    http::Response::builder()
                        .status(503)
                        .header("x-echo-server", "failing")
                        .body(http_body_util::Full::new(Bytes::from_static(b"down")))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    port
}

/// The `health_flags` of each host of `cluster` in the `/clusters` text, by address.
async fn health_flags(
    proxy: &StaticProxy,
    cluster: &str,
) -> std::collections::BTreeMap<String, String> {
    let (_, body) = proxy.admin_get("/clusters").await;
    body.lines()
        .filter_map(|l| l.strip_prefix(&format!("{cluster}::")))
        .filter_map(|l| l.split_once("::health_flags::"))
        .map(|(addr, flags)| (addr.to_owned(), flags.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_a_failing_host_and_brings_it_back() {
    let healthy = echo("healthy").await;
    let failing = failing_backend().await;
    let proxy = start2("outlier", healthy, failing).await;
    let failing_addr = format!("127.0.0.1:{failing}");
    // Round robin over both hosts: the failing one answers 503 until its third 503 ejects it.
    let mut failures = 0;
    for _ in 0..6 {
        if get(proxy.addr(), "svc.local", "/outlier", false)
            .await
            .status
            == 503
        {
            failures += 1;
        }
    }
    assert_eq!(failures, 3, "consecutive_5xx: 3, then no more 503s");
    assert_eq!(
        proxy
            .stat("cluster.outlier.outlier_detection.ejections_enforced_consecutive_5xx")
            .await,
        1
    );
    assert_eq!(
        proxy
            .stat("cluster.outlier.outlier_detection.ejections_active")
            .await,
        1
    );
    let flags = health_flags(&proxy, "outlier").await;
    assert_eq!(
        flags.get(&failing_addr).map(String::as_str),
        Some("/failed_outlier_check"),
        "{flags:?}"
    );
    assert_eq!(
        flags
            .get(&format!("127.0.0.1:{healthy}"))
            .map(String::as_str),
        Some("healthy")
    );
    // While it is out, everything goes to the healthy host.
    for _ in 0..6 {
        let r = get(proxy.addr(), "svc.local", "/outlier", false).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["server"], "healthy");
    }
    // base_ejection_time 1 s, swept every 0.1 s: it comes back.
    let started = Instant::now();
    eventually("the failing host to return", || async {
        health_flags(&proxy, "outlier")
            .await
            .get(&failing_addr)
            .map(String::as_str)
            == Some("healthy")
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "not before its ejection time"
    );
    assert_eq!(
        proxy
            .stat("cluster.outlier.outlier_detection.ejections_active")
            .await,
        0
    );
    // Back in rotation: it fails again (and is ejected again after three more 503s).
    let mut servers = std::collections::BTreeSet::new();
    for _ in 0..2 {
        let r = get(proxy.addr(), "svc.local", "/outlier", false).await;
        servers.insert(if r.status == 503 {
            "failing".to_owned()
        } else {
            r.json()["server"].as_str().unwrap_or_default().to_owned()
        });
    }
    assert_eq!(
        servers.len(),
        2,
        "both hosts take traffic again: {servers:?}"
    );
    drop(proxy);
}
