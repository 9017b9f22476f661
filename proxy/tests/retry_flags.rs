//! Response flags of retried requests, as Envoy's router sets them, seen in the access log of a
//! real proxy (static bootstrap, echo backend, a dead port) on 127.0.0.1:
//!
//! * a retriable status after the last retry goes back as the upstream sent it, flagged `URX`
//!   (also with `num_retries: 0`, where the first retriable answer is already over the limit);
//! * a connect failure after the last retry is a 503 `UF,URX` naming the latest reset;
//! * a per-try timeout on the last try is a 504 `UT,URX`;
//! * a retry refused by the `max_retries` breaker returns the upstream's answer flagged `UO`;
//! * a retry that succeeds, or a response the policy does not cover, carries no flag.

mod common;

use common::{StaticProxy, echo};
use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// `${DEAD}` is picked free and left so: a port nothing listens on.
const BOOTSTRAP: &str = r#"
node: {id: "rf~127.0.0.1~rf.default~default.svc.cluster.local", cluster: rf}
admin: {address: {socket_address: {address: 127.0.0.1, port_value: ${ADMIN}}}}
static_resources:
  listeners:
  - name: rf
    address: {socket_address: {address: 127.0.0.1, port_value: ${LISTEN}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: rf
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: ${DIR}/access.log
              log_format: {text_format_source: {inline_string: "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %UPSTREAM_REQUEST_ATTEMPT_COUNT%\n"}}
          route_config:
            name: rf
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: /5xx}
                route:
                  cluster: backend
                  retry_policy: {retry_on: "5xx", num_retries: 2,
                                 retry_back_off: {base_interval: 0.001s, max_interval: 0.002s}}
              - match: {prefix: /zero}
                route:
                  cluster: backend
                  retry_policy: {retry_on: "retriable-status-codes", retriable_status_codes: [503],
                                 num_retries: 0}
              - match: {prefix: /dead}
                route:
                  cluster: dead
                  retry_policy: {retry_on: "connect-failure", num_retries: 1,
                                 retry_back_off: {base_interval: 0.001s, max_interval: 0.002s}}
              - match: {prefix: /per-try}
                route:
                  cluster: backend
                  timeout: 20s
                  retry_policy: {retry_on: "5xx", num_retries: 1, per_try_timeout: 0.2s,
                                 retry_back_off: {base_interval: 0.001s, max_interval: 0.002s}}
              - match: {prefix: /overflow}
                route:
                  cluster: no-retries
                  retry_policy: {retry_on: "5xx", num_retries: 2}
              - match: {prefix: /plain}
                route: {cluster: backend}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${BACKEND}}}}}]}]
  - name: no-retries
    type: STATIC
    connect_timeout: 1s
    circuit_breakers: {thresholds: [{max_retries: 0}]}
    load_assignment:
      cluster_name: no-retries
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${BACKEND}}}}}]}]
  - name: dead
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: dead
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${DEAD}}}}}]}]
"#;

/// One GET on a fresh connection: (status, body).
async fn get(proxy: &StaticProxy, path: &str) -> (u16, String) {
    let tcp = TcpStream::connect(proxy.addr()).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri(path)
        .header("host", "svc.local")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = tokio::time::timeout(common::WAIT, send.send_request(req))
        .await
        .expect("answered in time")
        .expect("response");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_outcomes_carry_envoys_flags() {
    let backend = echo("backend").await;
    let proxy = StaticProxy::start("retry-flags", BOOTSTRAP, &[("BACKEND", backend)]).await;

    // A retriable 503 three times (num_retries: 2): the upstream's answer, flagged URX.
    let path = "/5xx?x-echo-status=503&x-echo-key=5xx";
    let (status, body) = get(&proxy, path).await;
    assert_eq!(status, 503);
    assert!(body.contains("\"server\":\"backend\""), "{body}");
    assert!(
        body.contains("\"request_count\":3"),
        "three attempts: {body}"
    );
    proxy
        .wait_log("access.log", &format!("{path} 503 URX 3"))
        .await;
    assert_eq!(
        proxy
            .stat("cluster.backend.upstream_rq_retry_limit_exceeded")
            .await,
        1
    );
    assert_eq!(proxy.stat("cluster.backend.upstream_rq_retry").await, 2);

    // num_retries: 0 keeps Envoy's retry state: the first retriable answer is over the limit.
    let path = "/zero?x-echo-status=503";
    assert_eq!(get(&proxy, path).await.0, 503);
    proxy
        .wait_log("access.log", &format!("{path} 503 URX 1"))
        .await;

    // Connect failures until the retry is used up: 503 UF,URX naming the latest reset.
    let (status, body) = get(&proxy, "/dead").await;
    assert_eq!(status, 503);
    assert!(
        body.starts_with(
            "upstream connect error or disconnect/reset before headers. retried and the latest \
             reset reason: connection failure"
        ),
        "{body}"
    );
    proxy.wait_log("access.log", "/dead 503 UF,URX 2").await;

    // Both tries time out (per_try_timeout 0.2s): the timeout's 504, UT,URX.
    let path = "/per-try?x-echo-delay-ms=5000";
    let (status, body) = get(&proxy, path).await;
    assert_eq!((status, body.as_str()), (504, "upstream request timeout"));
    proxy
        .wait_log("access.log", &format!("{path} 504 UT,URX 2"))
        .await;
    assert_eq!(
        proxy
            .stat("cluster.backend.upstream_rq_per_try_timeout")
            .await,
        2
    );

    // The max_retries breaker (0) refuses the retry: the upstream's 503 goes back flagged UO.
    let path = "/overflow?x-echo-status=503";
    let (status, body) = get(&proxy, path).await;
    assert_eq!(status, 503);
    assert!(body.contains("\"server\":\"backend\""), "{body}");
    proxy
        .wait_log("access.log", &format!("{path} 503 UO 1"))
        .await;
    assert_eq!(
        proxy
            .stat("cluster.no-retries.upstream_rq_retry_overflow")
            .await,
        1
    );

    // A retry that succeeds, and a 503 on a route without retries: no flag.
    let path = "/5xx?x-echo-fail-first=1&x-echo-key=once";
    assert_eq!(get(&proxy, path).await.0, 200);
    proxy
        .wait_log("access.log", &format!("{path} 200 - 2"))
        .await;
    assert_eq!(
        proxy
            .stat("cluster.backend.upstream_rq_retry_success")
            .await,
        1
    );
    let path = "/plain?x-echo-status=503";
    assert_eq!(get(&proxy, path).await.0, 503);
    proxy
        .wait_log("access.log", &format!("{path} 503 - 1"))
        .await;
}
