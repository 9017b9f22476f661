//! Access logs through the real proxy from a static bootstrap: an HCM writing Istio's text format,
//! a stable text format and a JSON format to files, and tcp_proxy listeners logging at connection
//! close (a proxied connection, and one whose upstream refuses: `UF`). Real processes and
//! sockets on 127.0.0.1; every wait polls with a deadline.

mod common;

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{StaticProxy, WAIT};
use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use serde_json::{Value as Json, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const ISTIO_FORMAT: &str = r#"[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n"#;

const BOOTSTRAP: &str = r#"
node: {id: "al~127.0.0.1~al.default~default.svc.cluster.local", cluster: al}
admin: {address: {socket_address: {address: 127.0.0.1, port_value: ${ADMIN}}}}
static_resources:
  listeners:
  - name: http
    address: {socket_address: {address: 127.0.0.1, port_value: ${HTTP}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: http
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: ${DIR}/istio.log
              log_format: {text_format_source: {inline_string: "${ISTIO_FORMAT}"}}
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: ${DIR}/text.log
              log_format:
                text_format: "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %BYTES_RECEIVED% %BYTES_SENT% \"%REQ(X-CUSTOM):6%\" \"%RESP(X-ROUTE)%\" %UPSTREAM_HOST% %UPSTREAM_CLUSTER% %UPSTREAM_REQUEST_ATTEMPT_COUNT% %ROUTE_NAME% %DOWNSTREAM_REMOTE_ADDRESS% %FILTER_STATE(test.key:PLAIN)%\n"
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: ${DIR}/json.log
              log_format:
                json_format:
                  start: "%START_TIME%"
                  epoch: "%START_TIME(%s)%"
                  method: "%REQ(:METHOD)%"
                  path: "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"
                  code: "%RESPONSE_CODE%"
                  flags: "%RESPONSE_FLAGS%"
                  details: "%RESPONSE_CODE_DETAILS%"
                  received: "%BYTES_RECEIVED%"
                  sent: "%BYTES_SENT%"
                  duration: "%DURATION%"
                  upstream: "%UPSTREAM_HOST%"
                  cluster: "%UPSTREAM_CLUSTER%"
                  custom: "%REQ(X-CUSTOM)%"
                  route: "route=%ROUTE_NAME%"
          - name: uh-only
            filter: {response_flag_filter: {flags: [UH]}}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: ${DIR}/uh.log
              log_format: {text_format: "%RESPONSE_FLAGS% %REQ(:PATH)%\n"}
          route_config:
            name: local
            virtual_hosts:
            - name: default
              domains: ["*"]
              routes:
              - name: to-empty
                match: {prefix: /empty}
                route: {cluster: empty}
              - name: to-backend
                match: {prefix: /}
                route: {cluster: backend}
                response_headers_to_add:
                - header: {key: x-route, value: backend-route}
          http_filters:
          - name: envoy.filters.http.set_filter_state
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config
              on_request_headers:
              - object_key: test.key
                format_string: {text_format_source: {inline_string: "%REQ(:METHOD)%-state"}}
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  - name: tcp
    address: {socket_address: {address: 127.0.0.1, port_value: ${TCP}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: backend
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: ${DIR}/tcp.log
              log_format: {text_format: "tcp %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %UPSTREAM_HOST% %UPSTREAM_CLUSTER% %RESPONSE_CODE% %PROTOCOL% %DOWNSTREAM_REMOTE_ADDRESS%\n"}
  - name: tcp-dead
    address: {socket_address: {address: 127.0.0.1, port_value: ${TCP_DEAD}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp_dead
          cluster: dead
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: ${DIR}/tcp.log
              log_format: {text_format: "dead %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %UPSTREAM_HOST% %UPSTREAM_CLUSTER% %DOWNSTREAM_REMOTE_ADDRESS%\n"}
  - name: no-chain
    address: {socket_address: {address: 127.0.0.1, port_value: ${NO_CHAIN}}}
    access_log:
    - name: envoy.access_loggers.file
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
        path: ${DIR}/tcp.log
        log_format: {text_format: "listener %RESPONSE_FLAGS% %BYTES_RECEIVED% %DOWNSTREAM_REMOTE_ADDRESS%\n"}
    filter_chains:
    - filter_chain_match: {destination_port: 1}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: never
          cluster: backend
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: backend
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${BACKEND}}}}}]}]
  - name: empty
    type: STATIC
    connect_timeout: 2s
  - name: dead
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: dead
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${DEAD}}}}}]}]
"#;

/// The proxy with an echo backend behind `backend`; `${DEAD}` is picked free and left so.
async fn start(tag: &str) -> StaticProxy {
    let backend = common::echo("backend").await;
    // ISTIO_FORMAT is written escaped for the double-quoted YAML scalar it goes into.
    let template = BOOTSTRAP.replace("${ISTIO_FORMAT}", ISTIO_FORMAT);
    StaticProxy::start(
        &format!("access-log-{tag}"),
        &template,
        &[("BACKEND", backend)],
    )
    .await
}

/// The lines of `path` once it has at least `n` (bounded wait).
async fn lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} has {} of {n} lines: {text}",
            path.display(),
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `s` matches `pattern`, where each `*` stands for one or more characters other than
/// a space.
fn glob(pattern: &str, s: &str) -> bool {
    let Some((head, rest)) = pattern.split_once('*') else {
        return pattern == s;
    };
    let Some(tail) = s.strip_prefix(head) else {
        return false;
    };
    let word = tail.find(' ').unwrap_or(tail.len());
    (1..=word).any(|n| glob(rest, &tail[n..]))
}

struct Reply {
    status: u16,
    body: Bytes,
    local: SocketAddr,
}

/// One HTTP/1.1 request on a new connection.
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let local = tcp.local_addr().expect("local");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "svc.local");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Full::new(Bytes::from(body.to_owned())))
        .expect("request");
    let resp = send.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .expect("body");
    Reply {
        status,
        body,
        local,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_streams_are_logged_as_text_and_json() {
    let proxy = start("http").await;
    let ok = send(
        proxy.addr_of("HTTP"),
        "GET",
        "/hello?x=1",
        &[
            ("user-agent", "al-test/1"),
            ("x-request-id", "4b5e6f70-0000-4000-8000-000000000001"),
        ],
        "",
    )
    .await;
    assert_eq!(ok.status, 200);
    let uh = send(proxy.addr_of("HTTP"), "GET", "/empty/x", &[], "").await;
    assert_eq!(uh.status, 503);
    assert_eq!(&uh.body[..], b"no healthy upstream");
    let posted = send(
        proxy.addr_of("HTTP"),
        "POST",
        "/upload",
        &[
            ("x-custom", "custom-value-long"),
            ("user-agent", "al-test/2"),
        ],
        "0123456789",
    )
    .await;
    assert_eq!(posted.status, 200);

    // Stable text format: every field exact.
    let text = lines(&proxy.path("text.log"), 3).await;
    let b = proxy.port("BACKEND");
    assert_eq!(
        text,
        [
            format!(
                "GET /hello?x=1 HTTP/1.1 200 - via_upstream 0 {} \"-\" \"backend-route\" 127.0.0.1:{b} backend 1 to-backend {} GET-state",
                ok.body.len(),
                ok.local
            ),
            format!(
                "GET /empty/x HTTP/1.1 503 UH no_healthy_upstream 0 {} \"-\" \"-\" - empty 0 to-empty {} GET-state",
                uh.body.len(),
                uh.local
            ),
            format!(
                "POST /upload HTTP/1.1 200 - via_upstream 10 {} \"custom\" \"backend-route\" 127.0.0.1:{b} backend 1 to-backend {} POST-state",
                posted.body.len(),
                posted.local
            ),
        ]
    );

    // Istio's default format, as istiod sends it; time and duration vary.
    let istio = lines(&proxy.path("istio.log"), 3).await;
    let want = [
        format!(
            "[*] \"GET /hello?x=1 HTTP/1.1\" 200 - via_upstream - \"-\" 0 {} * * \"*\" \"al-test/1\" \"*\" \"svc.local\" \"127.0.0.1:{b}\" backend - {} {} - to-backend",
            ok.body.len(),
            proxy.addr_of("HTTP"),
            ok.local
        ),
        format!(
            "[*] \"GET /empty/x HTTP/1.1\" 503 UH no_healthy_upstream - \"-\" 0 {} * - \"*\" \"-\" \"*\" \"svc.local\" \"-\" empty - {} {} - to-empty",
            uh.body.len(),
            proxy.addr_of("HTTP"),
            uh.local
        ),
    ];
    for (line, want) in istio.iter().zip(&want) {
        assert!(glob(want, line), "\n{line}\n{want}");
    }
    assert!(
        istio[0]
            .replace(|c: char| c.is_ascii_digit(), "?")
            .starts_with("[????-??-??T??:??:??.???Z] "),
        "{}",
        istio[0]
    );

    // JSON: typed numbers, null for a missing single value, text for a mixed one.
    let json_lines = lines(&proxy.path("json.log"), 3).await;
    let parsed: Vec<Json> = json_lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("a JSON object per line"))
        .collect();
    for v in &parsed {
        assert!(v["duration"].is_u64(), "{v}");
        let start = v["start"].as_str().expect("start");
        assert!(
            glob(
                "????-??-??T??:??:??.???Z",
                &start.replace(|c: char| c.is_ascii_digit(), "?")
            ),
            "{start}"
        );
        let epoch: u64 = v["epoch"]
            .as_str()
            .expect("epoch")
            .parse()
            .expect("seconds");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        assert!(now.abs_diff(epoch) < 600, "{epoch} vs {now}");
    }
    let strip = |v: &Json| {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            for k in ["start", "epoch", "duration"] {
                o.remove(k);
            }
        }
        v
    };
    assert_eq!(
        strip(&parsed[0]),
        json!({"method": "GET", "path": "/hello?x=1", "code": 200, "flags": "-",
               "details": "via_upstream", "received": 0, "sent": ok.body.len(),
               "upstream": format!("127.0.0.1:{b}"), "cluster": "backend", "custom": null,
               "route": "route=to-backend"})
    );
    assert_eq!(
        strip(&parsed[1]),
        json!({"method": "GET", "path": "/empty/x", "code": 503, "flags": "UH",
               "details": "no_healthy_upstream", "received": 0, "sent": uh.body.len(),
               "upstream": null, "cluster": "empty", "custom": null, "route": "route=to-empty"})
    );
    assert_eq!(parsed[2]["custom"], "custom-value-long");
    assert_eq!(parsed[2]["received"], 10);

    // The response-flag filter let only the UH stream through.
    assert_eq!(lines(&proxy.path("uh.log"), 1).await, ["UH /empty/x"]);
    assert_eq!(
        std::fs::read_to_string(proxy.path("uh.log")).expect("uh.log"),
        "UH /empty/x\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_are_logged_at_close() {
    let proxy = start("tcp").await;
    // Proxied: one HTTP/1.1 exchange over the TCP proxy; the backend closes after it.
    let request = b"GET /tcp HTTP/1.1\r\nHost: svc.local\r\nConnection: close\r\n\r\n";
    let mut conn = TcpStream::connect(proxy.addr_of("TCP"))
        .await
        .expect("connect");
    let local = conn.local_addr().expect("local");
    conn.write_all(request).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, conn.read_to_end(&mut response))
        .await
        .expect("response in time")
        .expect("read");
    assert!(
        response.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&response)
    );
    drop(conn);
    // Lines are found by the client's address (other connections may be logged too).
    let tcp_log = proxy.path("tcp.log");
    assert_eq!(
        line_of(&tcp_log, local).await,
        format!(
            "tcp - {} {} 127.0.0.1:{} backend 0 - {local}",
            request.len(),
            response.len(),
            proxy.port("BACKEND")
        )
    );

    // The upstream refuses: UF, nothing moved.
    let mut conn = TcpStream::connect(proxy.addr_of("TCP_DEAD"))
        .await
        .expect("connect");
    let local = conn.local_addr().expect("local");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, conn.read_to_end(&mut buf))
        .await
        .expect("closed in time");
    assert!(buf.is_empty());
    assert_eq!(
        line_of(&tcp_log, local).await,
        format!("dead UF 0 0 127.0.0.1:{} dead {local}", proxy.port("DEAD"))
    );

    // No filter chain takes the connection: the listener's own access log, flag NR.
    let mut conn = TcpStream::connect(proxy.addr_of("NO_CHAIN"))
        .await
        .expect("connect");
    let local = conn.local_addr().expect("local");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, conn.read_to_end(&mut buf))
        .await
        .expect("closed in time");
    assert!(buf.is_empty());
    assert_eq!(
        line_of(&tcp_log, local).await,
        format!("listener NR 0 {local}")
    );
}

/// The one line of `path` ending with the client address `local` (bounded wait).
async fn line_of(path: &Path, local: SocketAddr) -> String {
    let suffix = format!(" {local}");
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let found: Vec<&str> = text.lines().filter(|l| l.ends_with(&suffix)).collect();
        match found.as_slice() {
            [one] => return (*one).to_owned(),
            [] => {}
            many => panic!("several lines for {local}: {many:?}"),
        }
        assert!(Instant::now() < deadline, "no line for {local} in {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
