//! Envoy's stream timers on upgraded (WebSocket) streams, through the proxy process from a static
//! bootstrap, with a raw upstream that answers the upgrade (at once or late) and then echoes,
//! pushes or swallows bytes:
//!
//! * `stream_idle_timeout`, and the route's `idle_timeout` that replaces it, go on applying to
//!   the tunnel after the 101; bytes either way keep it open, silence ends it with `SI` (the
//!   access log line is written when the tunnel ends, with the 101, the flag and the timer's
//!   details);
//! * the route `timeout` covers the handshake only: a late 101 is a 504 `UT`, a tunnel outlives
//!   the timeout once switched;
//! * `request_timeout` is over once the 101 starts the response (an upgrade's request never
//!   completes before it: a late 101 is a 408);
//! * the route's `max_stream_duration` and the cluster's still cap the tunnel (`-` and `UMSDR`).
//!
//! Real processes and sockets on 127.0.0.1; every wait is bounded.

mod common;

use std::time::{Duration, Instant};

use common::{StaticProxy, WAIT};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

const BOOTSTRAP: &str = r#"
node: {id: "u~127.0.0.1~u.default~default.svc.cluster.local", cluster: u}
admin: {address: {socket_address: {address: 127.0.0.1, port_value: ${ADMIN}}}}
static_resources:
  listeners:
  - name: ws
    address: {socket_address: {address: 127.0.0.1, port_value: ${WS}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ws
          stream_idle_timeout: 0.6s
          upgrade_configs: [{upgrade_type: websocket}]
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: ${DIR}/ws.log
              log_format: {text_format_source: {inline_string: "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%\n"}}
          route_config:
            name: ws
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: /idle}
                route: {cluster: upstream, timeout: 0s}
              - match: {prefix: /route-idle}
                route: {cluster: upstream, timeout: 0s, idle_timeout: 1.5s}
              - match: {prefix: /handshake}
                route: {cluster: upstream, timeout: 0.4s}
              - match: {prefix: /msd}
                route: {cluster: upstream, timeout: 0s, idle_timeout: 0s,
                        max_stream_duration: {max_stream_duration: 1s}}
              - match: {prefix: /capped}
                route: {cluster: capped, timeout: 0s, idle_timeout: 0s}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  - name: rq
    address: {socket_address: {address: 127.0.0.1, port_value: ${RQ}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: rq
          stream_idle_timeout: 0s
          request_timeout: 0.5s
          upgrade_configs: [{upgrade_type: websocket}]
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: ${DIR}/rq.log
              log_format: {text_format_source: {inline_string: "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%\n"}}
          route_config:
            name: rq
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: /}
                route: {cluster: upstream, timeout: 0s}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints: [{lb_endpoints: [
        {endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${UPSTREAM}}}}}]}]
  - name: capped
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        common_http_protocol_options: {max_stream_duration: 0.8s}
        explicit_http_config: {http_protocol_options: {}}
    load_assignment:
      cluster_name: capped
      endpoints: [{lb_endpoints: [
        {endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${UPSTREAM}}}}}]}]
"#;

/// The request head's end.
const HEAD_END: &[u8] = b"\r\n\r\n";

/// Reads up to the end of an HTTP head; the bytes after it stay unread only if none came with
/// it (the tests send nothing after a head before reading the answer).
async fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(HEAD_END) {
        match tokio::time::timeout(WAIT, s.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// A header's value in a head (names compared without case).
fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A raw upstream that switches every request's protocol, after `x-delay-ms` if asked, then by
/// `x-mode`: `echo` sends back what it reads, `push` writes one byte every 150 ms `x-count`
/// times then only reads, `sink` only reads. Everything ends when the peer closes.
async fn upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Some(head) = read_head(&mut s).await else {
                    return;
                };
                let delay: u64 = header(&head, "x-delay-ms")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(delay)).await;
                let switched = b"HTTP/1.1 101 Switching Protocols\r\n\
                    connection: upgrade\r\nupgrade: websocket\r\n\r\n";
                if s.write_all(switched).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 1024];
                match header(&head, "x-mode").unwrap_or("echo") {
                    "echo" => loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    },
                    "push" => {
                        let count: u32 = header(&head, "x-count")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        for _ in 0..count {
                            tokio::time::sleep(Duration::from_millis(150)).await;
                            if s.write_all(b"p").await.is_err() {
                                return;
                            }
                        }
                        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                    }
                    _ => while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {},
                }
            });
        }
    });
    port
}

async fn setup(tag: &str) -> StaticProxy {
    let up = upstream().await;
    StaticProxy::start(tag, BOOTSTRAP, &[("UPSTREAM", up)]).await
}

/// Asks `port` to upgrade `path` with `extra` header lines; the answer's status and the
/// connection (a tunnel after a 101).
async fn upgrade(
    proxy: &StaticProxy,
    listener: &str,
    path: &str,
    extra: &[&str],
) -> (u16, TcpStream) {
    let mut s = TcpStream::connect(proxy.addr_of(listener))
        .await
        .expect("connect");
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nhost: ws.local\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
    );
    for h in extra {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let head = read_head(&mut s).await.expect("an answer");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line of {head:?}"));
    (status, s)
}

/// Sends one byte and reads its echo.
async fn ping(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    s.write_all(b"x").await.is_ok()
        && matches!(tokio::time::timeout(WAIT, s.read(&mut b)).await, Ok(Ok(1)))
}

/// Reads until the proxy closes the tunnel; how long that took.
async fn closed_after(s: &mut TcpStream) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the tunnel stayed open for {WAIT:?}"),
        }
    }
}

/// Whether nothing closed the tunnel within `after` (no bytes are expected meanwhile).
async fn open_for(s: &mut TcpStream, after: Duration) -> bool {
    let mut b = [0u8; 1];
    tokio::time::timeout(after, s.read(&mut b)).await.is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timers_keep_applying_to_the_tunnel() {
    let proxy = setup("upgrade-idle").await;

    // HCM `stream_idle_timeout: 0.6s`: echoes every 0.25 s keep the tunnel up well past it.
    let (status, mut s) = upgrade(&proxy, "WS", "/idle", &["x-mode: echo"]).await;
    assert_eq!(status, 101);
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(ping(&mut s).await, "the tunnel closed while active");
    }
    // Then silence: closed about 0.6 s later, with the 101 and SI in the access log.
    let idle = closed_after(&mut s).await;
    assert!(idle >= Duration::from_millis(450), "closed after {idle:?}");
    proxy
        .wait_log("ws.log", "/idle 101 SI stream_idle_timeout")
        .await;
    proxy
        .wait_stat("http.ws.downstream_rq_idle_timeout", 1)
        .await;

    // Upstream-to-client bytes alone keep it up too: 8 pushes 0.15 s apart (1.2 s).
    let (status, mut s) =
        upgrade(&proxy, "WS", "/idle/push", &["x-mode: push", "x-count: 8"]).await;
    assert_eq!(status, 101);
    let start = Instant::now();
    let mut got = 0;
    let mut b = [0u8; 1];
    while got < 8 {
        match tokio::time::timeout(WAIT, s.read(&mut b)).await {
            Ok(Ok(1)) => got += 1,
            other => panic!("push {got} of 8: {other:?} after {:?}", start.elapsed()),
        }
    }
    // Closed after a silence as long as the idle timeout (not while the pushes went on).
    let idle = closed_after(&mut s).await;
    assert!(idle >= Duration::from_millis(450), "closed after {idle:?}");
    proxy
        .wait_log("ws.log", "/idle/push 101 SI stream_idle_timeout")
        .await;

    // And client-to-upstream bytes alone (the upstream answers nothing).
    let (status, mut s) = upgrade(&proxy, "WS", "/idle/sink", &["x-mode: sink"]).await;
    assert_eq!(status, 101);
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        s.write_all(b"x")
            .await
            .expect("tunnel open while the client writes");
    }
    // A tunnel cut while the client wrote would read its end at once.
    let idle = closed_after(&mut s).await;
    assert!(idle >= Duration::from_millis(450), "closed after {idle:?}");
    proxy
        .wait_log("ws.log", "/idle/sink 101 SI stream_idle_timeout")
        .await;

    // The route's `idle_timeout: 1.5s` replaces the HCM's 0.6 s: a 1 s silence is survived.
    let (status, mut s) = upgrade(&proxy, "WS", "/route-idle", &["x-mode: echo"]).await;
    assert_eq!(status, 101);
    assert!(open_for(&mut s, Duration::from_millis(1000)).await);
    assert!(
        ping(&mut s).await,
        "the tunnel closed under the route's idle timeout"
    );
    let idle = closed_after(&mut s).await;
    assert!(idle >= Duration::from_millis(1200), "closed after {idle:?}");
    proxy
        .wait_log("ws.log", "/route-idle 101 SI stream_idle_timeout")
        .await;
    proxy
        .wait_stat("http.ws.downstream_rq_idle_timeout", 4)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_covers_the_handshake_only() {
    let proxy = setup("upgrade-route").await;

    // A 101 later than the route's `timeout: 0.4s`: 504 UT.
    let (status, _s) = upgrade(&proxy, "WS", "/handshake/late", &["x-delay-ms: 1500"]).await;
    assert_eq!(status, 504);
    proxy
        .wait_log("ws.log", "/handshake/late 504 UT upstream_response_timeout")
        .await;
    proxy
        .wait_stat("cluster.upstream.upstream_rq_timeout", 1)
        .await;

    // A 101 in time: the route timeout is over; the tunnel lives on (bytes every 0.25 s keep
    // the HCM's idle timer off) for three times the route timeout.
    let (status, mut s) = upgrade(&proxy, "WS", "/handshake/fast", &["x-mode: echo"]).await;
    assert_eq!(status, 101);
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(ping(&mut s).await, "the tunnel closed after its 101");
    }
    drop(s);
    // Closed by the client: no flag.
    proxy
        .wait_log("ws.log", "/handshake/fast 101 - via_upstream")
        .await;
    assert_eq!(proxy.stat("cluster.upstream.upstream_rq_timeout").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_ends_at_the_101() {
    let proxy = setup("upgrade-request").await;

    // HCM `request_timeout: 0.5s`, a 101 after 1.5 s: the request never completed, 408.
    let (status, _s) = upgrade(&proxy, "RQ", "/late", &["x-delay-ms: 1500"]).await;
    assert_eq!(status, 408);
    proxy
        .wait_log("rq.log", "/late 408 - request_overall_timeout")
        .await;
    proxy.wait_stat("http.rq.downstream_rq_timeout", 1).await;

    // A 101 in time: the request timeout is over, the (idle-timer-free) tunnel stays up past it.
    let (status, mut s) = upgrade(&proxy, "RQ", "/fast", &["x-mode: echo"]).await;
    assert_eq!(status, 101);
    assert!(open_for(&mut s, Duration::from_millis(1200)).await);
    assert!(ping(&mut s).await);
    drop(s);
    proxy.wait_log("rq.log", "/fast 101 - via_upstream").await;
    assert_eq!(proxy.stat("http.rq.downstream_rq_timeout").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_stream_duration_caps_the_tunnel() {
    let proxy = setup("upgrade-duration").await;

    // The route's `max_stream_duration: 1s`, traffic every 0.2 s: cut at about 1 s.
    let (status, mut s) = upgrade(&proxy, "WS", "/msd", &["x-mode: push", "x-count: 100"]).await;
    assert_eq!(status, 101);
    let lived = closed_after(&mut s).await;
    assert!(
        lived >= Duration::from_millis(800) && lived < Duration::from_secs(5),
        "closed after {lived:?}"
    );
    proxy
        .wait_log("ws.log", "/msd 101 - max_duration_timeout")
        .await;
    proxy
        .wait_stat("http.ws.downstream_rq_max_duration_reached", 1)
        .await;

    // The cluster's `max_stream_duration: 0.8s` caps the upstream stream: UMSDR.
    let (status, mut s) = upgrade(&proxy, "WS", "/capped", &["x-mode: push", "x-count: 100"]).await;
    assert_eq!(status, 101);
    let lived = closed_after(&mut s).await;
    assert!(
        lived >= Duration::from_millis(600) && lived < Duration::from_secs(5),
        "closed after {lived:?}"
    );
    proxy
        .wait_log(
            "ws.log",
            "/capped 101 UMSDR upstream_max_stream_duration_reached",
        )
        .await;
    proxy
        .wait_stat("cluster.capped.upstream_rq_max_duration_reached", 1)
        .await;
}
