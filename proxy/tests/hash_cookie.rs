//! Cookie hash policies through a real proxy (static bootstrap, two echo backends behind a ring
//! hash cluster, 127.0.0.1): a request without the cookie gets one made up (Envoy's
//! `Set-Cookie: name="<16 hex>"; Max-Age=<ttl>; Path=<path>; HttpOnly`) and lands on the host
//! that cookie hashes to, so a follow-up carrying it lands there again; a zero ttl sets a session
//! cookie with the configured attributes; without a ttl, or on a cluster that does not hash
//! (round robin), nothing is set. A retried request's answer carries the made-up cookie once per
//! attempt (Envoy's ring hash balancer asks the router for the hash, which adds the cookie, on
//! every host pick), and the cookie names the connection, never the host that answered.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{StaticProxy, WAIT, echo};
use serde_json::Value as Json;
use waypoint_testbed::echo::{EchoConfig, EchoFault, EchoServer};

const BOOTSTRAP: &str = r#"
node: {id: "hc~127.0.0.1~hc.default~default.svc.cluster.local", cluster: hc}
admin: {address: {socket_address: {address: 127.0.0.1, port_value: ${ADMIN}}}}
static_resources:
  listeners:
  - name: hc
    address: {socket_address: {address: 127.0.0.1, port_value: ${LISTEN}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: hc
          route_config:
            name: hc
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: /ring}
                route:
                  cluster: ring
                  hash_policy: [{cookie: {name: sticky, ttl: 60s, path: /}}]
              - match: {prefix: /session}
                route:
                  cluster: ring
                  hash_policy:
                  - cookie:
                      name: sess
                      ttl: 0s
                      attributes: [{name: SameSite, value: Lax}, {name: Secure}]
              - match: {prefix: /no-ttl}
                route:
                  cluster: ring
                  hash_policy: [{cookie: {name: sticky}}]
              - match: {prefix: /round-robin}
                route:
                  cluster: rr
                  hash_policy: [{cookie: {name: sticky, ttl: 60s}}]
            - name: retries
              domains: ["retry.local"]
              include_attempt_count_in_response: true
              routes:
              - match: {prefix: /retry}
                route:
                  cluster: flaky
                  hash_policy: [{cookie: {name: sticky, ttl: 60s, path: /}}]
                  retry_policy:
                    retry_on: 5xx
                    num_retries: 1
                    retry_back_off: {base_interval: 0.01s, max_interval: 0.02s}
                    host_selection_retry_max_attempts: 5
                    retry_host_predicate:
                    - name: envoy.retry_host_predicates.previous_hosts
                      typed_config:
                        "@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate
              - match: {prefix: /probe}
                route:
                  cluster: flaky
                  hash_policy: [{cookie: {name: sticky, ttl: 60s, path: /}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: ring
    type: STATIC
    connect_timeout: 1s
    lb_policy: RING_HASH
    load_assignment:
      cluster_name: ring
      endpoints: [{lb_endpoints: [
        {endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${ECHO_A}}}}},
        {endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${ECHO_B}}}}}]}]
  - name: flaky
    type: STATIC
    connect_timeout: 1s
    lb_policy: RING_HASH
    load_assignment:
      cluster_name: flaky
      endpoints: [{lb_endpoints: [
        {endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${FAILING}}}}},
        {endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${ECHO_B}}}}}]}]
  - name: rr
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: rr
      endpoints: [{lb_endpoints: [
        {endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${ECHO_A}}}}},
        {endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${ECHO_B}}}}}]}]
"#;

/// What one answer says: which backend, and the `Set-Cookie` headers.
struct Answer {
    server: String,
    set_cookies: Vec<String>,
}

/// One GET on a fresh connection (so each gets its own made-up cookie), with `cookie` if given.
async fn get(proxy: &StaticProxy, path: &str, cookie: Option<&str>) -> Answer {
    let headers: Vec<(&str, &str)> = cookie.map(|c| ("cookie", c)).into_iter().collect();
    let r = common::request(proxy.addr(), "svc.local", path, &headers).await;
    assert_eq!(r.status, 200, "{path}");
    let set_cookies = r
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().expect("ASCII").to_owned())
        .collect();
    let json: Json = r.json();
    Answer {
        server: json["server"].as_str().expect("server").to_owned(),
        set_cookies,
    }
}

/// The value of a generated `name="<16 lower-case hex>"...` cookie, checking its shape.
fn generated_value<'a>(set_cookie: &'a str, name: &str, rest: &str) -> &'a str {
    let value = set_cookie
        .strip_prefix(&format!("{name}=\""))
        .and_then(|s| s.strip_suffix(rest))
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or_else(|| panic!("unexpected Set-Cookie {set_cookie:?}"));
    assert_eq!(value.len(), 16, "{set_cookie}");
    assert!(
        value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{set_cookie}"
    );
    value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_cookie_keeps_the_client_on_its_host() {
    let (a, b) = (echo("echo-a").await, echo("echo-b").await);
    let proxy = StaticProxy::start("hash-cookie", BOOTSTRAP, &[("ECHO_A", a), ("ECHO_B", b)]).await;

    // Without the cookie: one is made up, and the request went where that cookie hashes to
    // (eight rounds: a host picked at random would match the cookie's by chance 1 in 256).
    for _ in 0..8 {
        let first = get(&proxy, "/ring", None).await;
        assert_eq!(first.set_cookies.len(), 1, "{:?}", first.set_cookies);
        let value = generated_value(
            &first.set_cookies[0],
            "sticky",
            "; Max-Age=60; Path=/; HttpOnly",
        );
        let cookie = format!("sticky=\"{value}\"");
        for _ in 0..3 {
            let next = get(&proxy, "/ring", Some(&cookie)).await;
            assert_eq!(next.server, first.server, "cookie {value} moved");
            assert!(next.set_cookies.is_empty(), "{:?}", next.set_cookies);
        }
    }

    // The cookie decides the host: each value sticks, and values spread over both hosts.
    let mut hosts: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for i in 0..24u64 {
        let cookie = format!("a=1; sticky={:016x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for _ in 0..2 {
            let answer = get(&proxy, "/ring", Some(&cookie)).await;
            hosts
                .entry(cookie.clone())
                .or_default()
                .insert(answer.server);
        }
    }
    assert!(
        hosts.values().all(|s| s.len() == 1),
        "a cookie moved between hosts: {hosts:?}"
    );
    let used: BTreeSet<&String> = hosts.values().flatten().collect();
    assert_eq!(used.len(), 2, "24 cookies over both hosts: {hosts:?}");

    // A zero ttl: a session cookie (no Max-Age), with the attributes before HttpOnly.
    let session = get(&proxy, "/session", None).await;
    assert_eq!(session.set_cookies.len(), 1, "{:?}", session.set_cookies);
    generated_value(
        &session.set_cookies[0],
        "sess",
        "; SameSite=Lax; Secure; HttpOnly",
    );

    // No ttl, or a cluster that does not hash: no cookie is made up.
    assert!(get(&proxy, "/no-ttl", None).await.set_cookies.is_empty());
    assert!(
        get(&proxy, "/round-robin", None)
            .await
            .set_cookies
            .is_empty()
    );
}

/// An echo server named `name` that answers every request with 503 (its JSON body still says
/// who answered); its port.
async fn failing_echo(name: &str) -> u16 {
    let fault = EchoFault::new();
    fault.fail_with(http::StatusCode::SERVICE_UNAVAILABLE);
    let server = EchoServer::bind(&EchoConfig {
        name: name.into(),
        http: "127.0.0.1:0".parse().expect("addr"),
        grpc: None,
    })
    .await
    .expect("echo binds")
    .with_fault(fault);
    let port = server.http_addr().port();
    tokio::spawn(server.run());
    port
}

/// What one answer on a kept-alive connection says.
struct Attempted {
    status: u16,
    server: String,
    attempts: u32,
    set_cookies: Vec<String>,
}

/// `paths` in turn on one HTTP/1.1 connection to `host`.
async fn on_one_connection(proxy: &StaticProxy, host: &str, paths: &[&str]) -> Vec<Attempted> {
    use http_body_util::BodyExt as _;
    let tcp = tokio::net::TcpStream::connect(proxy.addr())
        .await
        .expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut out = Vec::new();
    for path in paths {
        let req = http::Request::builder()
            .uri(*path)
            .header("host", host)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        // The previous answer's end frees the connection for the next request.
        tokio::time::timeout(WAIT, send.ready())
            .await
            .expect("ready in time")
            .expect("connection kept alive");
        let resp = tokio::time::timeout(WAIT, send.send_request(req))
            .await
            .expect("answered in time")
            .expect("response");
        let status = resp.status().as_u16();
        let attempts = resp
            .headers()
            .get("x-envoy-attempt-count")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("x-envoy-attempt-count");
        let set_cookies = resp
            .headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().expect("ASCII").to_owned())
            .collect();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let json: Json = serde_json::from_slice(&body).expect("JSON");
        out.push(Attempted {
            status,
            server: json["server"].as_str().expect("server").to_owned(),
            attempts,
            set_cookies,
        });
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_answer_carries_the_cookie_of_each_attempt() {
    let (failing, b) = (failing_echo("echo-a").await, echo("echo-b").await);
    let proxy = StaticProxy::start(
        "hash-cookie-retry",
        BOOTSTRAP,
        &[("ECHO_A", failing), ("ECHO_B", b), ("FAILING", failing)],
    )
    .await;

    // Each fresh connection's cookie hashes to one of the two hosts: to the failing one about
    // every other time (then the 503 is retried on the other host), so 32 connections see both
    // cases but with odds of 2^-31.
    let mut retried = 0;
    let mut direct = 0;
    for _ in 0..32 {
        let answers = on_one_connection(&proxy, "retry.local", &["/retry", "/retry"]).await;
        let first = &answers[0];
        assert_eq!((first.status, first.server.as_str()), (200, "echo-b"));
        let value = generated_value(
            &first.set_cookies[0],
            "sticky",
            "; Max-Age=60; Path=/; HttpOnly",
        )
        .to_owned();
        // One Set-Cookie per attempt, all the same.
        assert_eq!(
            first.set_cookies.len(),
            first.attempts as usize,
            "{:?}",
            first.set_cookies
        );
        assert!(
            first.set_cookies.iter().all(|c| *c == first.set_cookies[0]),
            "{:?}",
            first.set_cookies
        );
        // The connection, not the attempt or the host, decides the value.
        let second = &answers[1];
        assert_eq!(second.attempts, first.attempts, "same cookie, same path");
        assert!(
            second
                .set_cookies
                .iter()
                .all(|c| *c == first.set_cookies[0]),
            "{:?} then {:?}",
            first.set_cookies,
            second.set_cookies
        );
        if first.attempts == 2 {
            retried += 1;
            // The cookie names the host that failed, not echo-b that answered: sent back, it
            // leads (without retries) to the failing host.
            let cookie = format!("sticky=\"{value}\"");
            let r = common::request(
                proxy.addr(),
                "retry.local",
                "/probe",
                &[("cookie", cookie.as_str())],
            )
            .await;
            assert_eq!(r.status, 503, "cookie {value}");
            assert_eq!(r.json()["server"], "echo-a");
        } else {
            assert_eq!(first.attempts, 1);
            direct += 1;
        }
    }
    assert!(
        retried > 0 && direct > 0,
        "retried {retried}, direct {direct}"
    );
}
