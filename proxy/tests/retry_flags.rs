//! Response flags of retried requests, as Envoy's router sets them, seen in the access log of a
//! real proxy (static bootstrap, echo backend, a dead port) on 127.0.0.1:
//!
//! * a retriable status after the last retry goes back as the upstream sent it, flagged `URX`
//!   (also with `num_retries: 0`, where the first retriable answer is already over the limit);
//! * a connect failure after the last retry is a 503 `UF,URX` naming the latest reset;
//! * a per-try timeout on the last try is a 504 `UT,URX`;
//! * a retry refused by the `max_retries` breaker returns the upstream's answer flagged `UO`;
//! * a retry that succeeds, or a response the policy does not cover, carries no flag;
//! * `retriable_request_headers`: only requests carrying a matching header are retried.
//!
//! Also, in the same way:
//!
//! * the retry priority `previous_priorities` (Istio's `retryRemoteLocalities`): with P0 always
//!   failing, a retry leaves P0 out and is answered by P1 (`update_frequency: 1`), or only from
//!   the third attempt on (`update_frequency: 2`, Istio's); without it, retries go to P0 again;
//! * `%RESPONSE_CODE_DETAILS%` of the router's timers: `upstream_per_try_timeout`,
//!   `upstream_per_try_idle_timeout` and the route's `upstream_response_timeout`.

mod common;

use std::sync::Arc;

use common::{StaticProxy, echo};
use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use waypoint_testbed::echo::{EchoConfig, EchoFault, EchoJournal, EchoServer, SERVER_HEADER};

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
    let (status, _, body) = get_with(proxy, path, &[]).await;
    (status, body)
}

/// One GET with `headers` on a fresh connection: (status, `x-echo-server`, body).
async fn get_with(
    proxy: &StaticProxy,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let tcp = TcpStream::connect(proxy.addr()).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .uri(path)
        .header("host", "svc.local");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = tokio::time::timeout(common::WAIT, send.send_request(req))
        .await
        .expect("answered in time")
        .expect("response");
    let status = resp.status().as_u16();
    let server = resp
        .headers()
        .get(SERVER_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, server, String::from_utf8_lossy(&body).into_owned())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_requests_with_a_retriable_request_header_are_retried() {
    let backend = echo("backend").await;
    let template = BOOTSTRAP.replace(
        "              - match: {prefix: /plain}",
        "              - match: {prefix: /by-header}
                route:
                  cluster: backend
                  retry_policy: {retry_on: \"5xx\", num_retries: 1,
                                 retry_back_off: {base_interval: 0.001s, max_interval: 0.002s},
                                 retriable_request_headers: [{name: x-retry-me, present_match: true}]}
              - match: {prefix: /plain}",
    );
    let proxy =
        StaticProxy::start("retry-request-headers", &template, &[("BACKEND", backend)]).await;
    // With the header: retried, the retry used up.
    let path = "/by-header?x-echo-status=503&x-echo-key=with";
    let (status, _, body) = get_with(&proxy, path, &[("x-retry-me", "1")]).await;
    assert_eq!(status, 503);
    assert!(body.contains("\"request_count\":2"), "{body}");
    proxy
        .wait_log("access.log", &format!("{path} 503 URX 2"))
        .await;
    // Without: no retry state at all (no URX).
    let path = "/by-header?x-echo-status=503&x-echo-key=without";
    let (status, _, body) = get_with(&proxy, path, &[]).await;
    assert_eq!(status, 503);
    assert!(body.contains("\"request_count\":1"), "{body}");
    proxy
        .wait_log("access.log", &format!("{path} 503 - 1"))
        .await;
}

/// A cluster with a priority 0 and a priority 1 host, and routes retrying 5xx with and without
/// `previous_priorities`.
const PRIORITIES: &str = r#"
node: {id: "rp~127.0.0.1~rp.default~default.svc.cluster.local", cluster: rp}
admin: {address: {socket_address: {address: 127.0.0.1, port_value: ${ADMIN}}}}
static_resources:
  listeners:
  - name: rp
    address: {socket_address: {address: 127.0.0.1, port_value: ${LISTEN}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: rp
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: ${DIR}/access.log
              log_format: {text_format_source: {inline_string: "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %UPSTREAM_REQUEST_ATTEMPT_COUNT%\n"}}
          route_config:
            name: rp
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: /every-retry}
                route:
                  cluster: tiers
                  retry_policy:
                    retry_on: 5xx
                    num_retries: 1
                    retry_back_off: {base_interval: 0.001s, max_interval: 0.002s}
                    retry_priority:
                      name: envoy.retry_priorities.previous_priorities
                      typed_config:
                        "@type": type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig
                        update_frequency: 1
              - match: {prefix: /istio}
                route:
                  cluster: tiers
                  retry_policy:
                    retry_on: 5xx
                    num_retries: 2
                    retry_back_off: {base_interval: 0.001s, max_interval: 0.002s}
                    retry_priority:
                      name: envoy.retry_priorities.previous_priorities
                      typed_config:
                        "@type": type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig
                        update_frequency: 2
              - match: {prefix: /plain}
                route:
                  cluster: tiers
                  retry_policy: {retry_on: 5xx, num_retries: 1,
                                 retry_back_off: {base_interval: 0.001s, max_interval: 0.002s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: tiers
    type: STATIC
    connect_timeout: 1s
    lb_policy: ROUND_ROBIN
    load_assignment:
      cluster_name: tiers
      endpoints:
      - priority: 0
        lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${P0}}}}}]
      - priority: 1
        lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${P1}}}}}]
"#;

/// An echo server named `name` whose answers follow `fault`, journaled; its port.
async fn echo_with(name: &str, fault: &Arc<EchoFault>, journal: &Arc<EchoJournal>) -> u16 {
    let server = EchoServer::bind(&EchoConfig {
        name: name.into(),
        http: "127.0.0.1:0".parse().expect("addr"),
        grpc: None,
    })
    .await
    .expect("echo binds")
    .with_fault(fault.clone())
    .with_journal(journal.clone());
    let port = server.http_addr().port();
    tokio::spawn(server.run());
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previous_priorities_send_retries_to_the_next_priority() {
    let (p0_fault, p0_journal) = (EchoFault::new(), EchoJournal::new());
    let (p1_fault, p1_journal) = (EchoFault::new(), EchoJournal::new());
    p0_fault.fail_with(http::StatusCode::SERVICE_UNAVAILABLE);
    let p0 = echo_with("p0", &p0_fault, &p0_journal).await;
    let p1 = echo_with("p1", &p1_fault, &p1_journal).await;
    let proxy = StaticProxy::start("retry-priorities", PRIORITIES, &[("P0", p0), ("P1", p1)]).await;
    const N: usize = 10;

    // Without a retry priority P0 takes all the load, retries included: 503 after two tries.
    for i in 0..N {
        let path = format!("/plain?n={i}");
        let (status, server, _) = get_with(&proxy, &path, &[]).await;
        assert_eq!((status, server.as_str()), (503, "p0"), "{path}");
        proxy
            .wait_log("access.log", &format!("{path} 503 URX 2"))
            .await;
    }
    assert_eq!(
        p1_journal.len(),
        0,
        "P1 got a request without the retry priority"
    );

    // update_frequency 1: the first retry leaves P0 out, so every request is answered by P1.
    for i in 0..N {
        let path = format!("/every-retry?n={i}");
        let (status, server, _) = get_with(&proxy, &path, &[]).await;
        assert_eq!((status, server.as_str()), (200, "p1"), "{path}");
        proxy
            .wait_log("access.log", &format!("{path} 200 - 2"))
            .await;
    }
    assert_eq!(p1_journal.len(), N);

    // update_frequency 2 (what istiod renders): the first retry keeps the load (P0 again), the
    // second leaves out the priorities of the first two attempts.
    for i in 0..N {
        let path = format!("/istio?n={i}");
        let (status, server, _) = get_with(&proxy, &path, &[]).await;
        assert_eq!((status, server.as_str()), (200, "p1"), "{path}");
        proxy
            .wait_log("access.log", &format!("{path} 200 - 3"))
            .await;
    }
    assert_eq!(p1_journal.len(), 2 * N);
    // P0: two tries per /plain request, one per /every-retry and two per /istio request.
    assert_eq!(p0_journal.len(), 5 * N);

    // P1 failing too: the retry still goes to P1 (nothing marks it unhealthy), and its 503 goes
    // back flagged URX. (Starting over once no priority is left is unit-tested in
    // `upstream::retry_priority`.)
    p1_fault.fail_with(http::StatusCode::SERVICE_UNAVAILABLE);
    let path = "/every-retry?n=down";
    let (status, server, _) = get_with(&proxy, path, &[]).await;
    assert_eq!((status, server.as_str()), (503, "p1"));
    proxy
        .wait_log("access.log", &format!("{path} 503 URX 2"))
        .await;
}

/// Routes whose router timers fire, logged with `%RESPONSE_CODE_DETAILS%`.
const TIMERS: &str = r#"
node: {id: "tm~127.0.0.1~tm.default~default.svc.cluster.local", cluster: tm}
admin: {address: {socket_address: {address: 127.0.0.1, port_value: ${ADMIN}}}}
static_resources:
  listeners:
  - name: tm
    address: {socket_address: {address: 127.0.0.1, port_value: ${LISTEN}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: tm
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: ${DIR}/access.log
              log_format: {text_format_source: {inline_string: "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %UPSTREAM_REQUEST_ATTEMPT_COUNT%\n"}}
          route_config:
            name: tm
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: /per-try-retried}
                route:
                  cluster: backend
                  timeout: 20s
                  retry_policy: {retry_on: "5xx", num_retries: 1, per_try_timeout: 0.2s,
                                 retry_back_off: {base_interval: 0.001s, max_interval: 0.002s}}
              - match: {prefix: /per-try}
                route:
                  cluster: backend
                  timeout: 20s
                  retry_policy: {per_try_timeout: 0.2s}
              - match: {prefix: /idle}
                route:
                  cluster: backend
                  timeout: 20s
                  retry_policy: {per_try_idle_timeout: 0.2s}
              - match: {prefix: /route}
                route:
                  cluster: backend
                  timeout: 0.2s
                  retry_policy: {retry_on: "5xx", num_retries: 1, per_try_timeout: 10s}
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
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_timers_report_their_own_details() {
    let backend = echo("backend").await;
    let proxy = StaticProxy::start("router-timers", TIMERS, &[("BACKEND", backend)]).await;
    let cases = [
        // A per-try timeout without retry_on: one try, 504 UT.
        (
            "/per-try?x-echo-delay-ms=5000",
            "UT upstream_per_try_timeout 1",
        ),
        // Retried and timed out again: the last try's details, UT,URX.
        (
            "/per-try-retried?x-echo-delay-ms=5000",
            "UT,URX upstream_per_try_timeout 2",
        ),
        // Headers that never come: the per-try idle timer.
        (
            "/idle?x-echo-delay-ms=5000",
            "UT upstream_per_try_idle_timeout 1",
        ),
        // The route timeout fires first (per try 10s): never retried.
        (
            "/route?x-echo-delay-ms=5000",
            "UT upstream_response_timeout 1",
        ),
    ];
    for (path, logged) in cases {
        let (status, _, body) = get_with(&proxy, path, &[]).await;
        assert_eq!(
            (status, body.as_str()),
            (504, "upstream request timeout"),
            "{path}"
        );
        proxy
            .wait_log("access.log", &format!("{path} 504 {logged}"))
            .await;
    }
}
