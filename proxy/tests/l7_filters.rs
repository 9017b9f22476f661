//! Request mirroring, CORS and local rate limiting through the real proxy process, started from a
//! static bootstrap with echo backends and recording mirror backends on 127.0.0.1:
//!
//! * every mirrored request reaches the mirror cluster with the `-shadow` host (or the policy's
//!   `host_rewrite_literal`) and the same path, headers and body; a dead or a stalled mirror
//!   changes neither the primary's status nor its body, and the stalled one not its latency; a
//!   50% `runtime_fraction` mirrors half of 1,000 requests (± 5%);
//! * CORS preflights from allowed origins are answered by the proxy, others are forwarded;
//!   simple requests get `Access-Control-Allow-Origin` / `-Expose-Headers`; a shadow policy
//!   counts origins without acting; `http.<prefix>.cors.origin_*` count;
//! * the local rate limit lets `max_tokens` through, then answers 429 `local_rate_limited` with
//!   flag `RL` and its headers, refills, and a route's own config (its own bucket) overrides the
//!   filter's.

mod common;

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{Launch, StaticProxy, echo, eventually, free_port};
use futures::StreamExt as _;
use http::HeaderMap;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value as Json, json};
use tokio::{net::TcpStream, sync::mpsc};

const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const CORS_POLICY: &str = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy";
const LOCAL_RATE_LIMIT: &str =
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";

/// A request a recording backend saw (body read to the end).
#[derive(Debug)]
struct Seen {
    host: String,
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

/// A backend that records every request it receives and answers 200; with `stall`, it never
/// reads a body nor answers (a mirror that cannot keep up).
async fn recorder(stall: bool) -> (u16, mpsc::UnboundedReceiver<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let tx = tx.clone();
                        async move {
                            if stall {
                                // Holds the request (and its unread body) well past the test.
                                tokio::time::sleep(Duration::from_secs(300)).await;
                            }
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let host = parts
                                .headers
                                .get(http::header::HOST)
                                .and_then(|v| v.to_str().ok())
                                .or(parts.uri.authority().map(|a| a.as_str()))
                                .unwrap_or_default()
                                .to_owned();
                            let _ = tx.send(Seen {
                                host,
                                path: parts
                                    .uri
                                    .path_and_query()
                                    .map_or("/", |p| p.as_str())
                                    .to_owned(),
                                headers: parts.headers,
                                body,
                            });
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from_static(b"recorded"),
                            )))
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (port, rx)
}

fn cluster(name: &str, port: u16) -> Json {
    json!({
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}
    })
}

fn mirror_route(prefix: &str, mirrors: Json) -> Json {
    json!({"match": {"prefix": prefix},
           "route": {"cluster": "backend", "request_mirror_policies": mirrors}})
}

/// The bootstrap: HCM `l7f` with cors → local_ratelimit → router; virtual host `rl.example`
/// rate limited (filter config, and a route with its own), every other host not.
fn bootstrap(dir: &Path, listen: u16, admin: u16, clusters: &[(&str, u16)]) -> Json {
    let cors_policy = json!({
        "@type": CORS_POLICY,
        "allow_origin_string_match": [{"exact": "https://a.example"}],
        "allow_methods": "GET,POST", "allow_headers": "x-a", "expose_headers": "x-exposed",
        "max_age": "600", "allow_credentials": true
    });
    let shadow_policy = json!({
        "@type": CORS_POLICY,
        "allow_origin_string_match": [{"exact": "https://a.example"}],
        "allow_methods": "GET",
        "filter_enabled": {"default_value": {"numerator": 0}},
        "shadow_enabled": {"default_value": {"numerator": 100}}
    });
    let route_limit = json!({
        "@type": LOCAL_RATE_LIMIT, "stat_prefix": "rl_route",
        "token_bucket": {"max_tokens": 3, "tokens_per_fill": 3, "fill_interval": "1s"},
        "filter_enabled": {"default_value": {"numerator": 100}},
        "filter_enforced": {"default_value": {"numerator": 100}},
        "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
        "response_headers_to_add": [{"append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            "header": {"key": "x-local-rate-limit", "value": "true"}}]
    });
    let route_config = json!({
        "name": "l7f",
        "virtual_hosts": [
            {"name": "rl", "domains": ["rl.example"], "routes": [
                {"match": {"prefix": "/rl/route"}, "route": {"cluster": "backend"},
                 "typed_per_filter_config": {"envoy.filters.http.local_ratelimit": route_limit}},
                {"match": {"prefix": "/rl/filter"}, "route": {"cluster": "backend"}}
            ]},
            {"name": "default", "domains": ["*"],
             "typed_per_filter_config": {"envoy.filters.http.local_ratelimit": {
                "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": true}},
             "routes": [
                {"match": {"prefix": "/cors-shadow"}, "route": {"cluster": "backend"},
                 "typed_per_filter_config": {"envoy.filters.http.cors": shadow_policy}},
                {"match": {"prefix": "/cors"}, "route": {"cluster": "backend"},
                 "typed_per_filter_config": {"envoy.filters.http.cors": cors_policy}},
                mirror_route("/mirror-half", json!([{"cluster": "half",
                    "runtime_fraction": {"default_value": {"numerator": 50}}}])),
                mirror_route("/mirror-dead", json!([{"cluster": "dead"}])),
                mirror_route("/mirror-slow", json!([{"cluster": "slow"}])),
                mirror_route("/mirror-literal", json!([{"cluster": "recorder",
                    "host_rewrite_literal": "mirror.example"}])),
                mirror_route("/mirror-header", json!([{"cluster_header": "x-mirror-to",
                    "disable_shadow_host_suffix_append": true}])),
                mirror_route("/mirror", json!([{"cluster": "recorder"}])),
                {"match": {"prefix": "/"}, "route": {"cluster": "backend"}}
            ]}
        ]
    });
    let hcm = json!({
        "@type": HCM, "stat_prefix": "l7f", "codec_type": "AUTO",
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": dir.join("access.log").display().to_string(),
            "log_format": {"text_format_source": {
                "inline_string": "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS%\n"}}}}],
        "route_config": route_config,
        "http_filters": [
            {"name": "envoy.filters.http.cors", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}},
            {"name": "envoy.filters.http.local_ratelimit", "typed_config": {
                "@type": LOCAL_RATE_LIMIT, "stat_prefix": "rl_filter",
                "token_bucket": {"max_tokens": 2, "tokens_per_fill": 2, "fill_interval": "3600s"},
                "filter_enabled": {"default_value": {"numerator": 100}},
                "filter_enforced": {"default_value": {"numerator": 100}}}},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
        ]
    });
    json!({
        "node": {"id": "l7f~127.0.0.1~l7f.default~default.svc.cluster.local", "cluster": "l7f"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{
                "name": "l7f",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm}]}]
            }],
            "clusters": clusters.iter().map(|(n, p)| cluster(n, *p)).collect::<Vec<_>>()
        }
    })
}

/// The proxy under test, with `clusters` (name, port) in its bootstrap.
async fn start(tag: &str, clusters: &[(&str, u16)]) -> StaticProxy {
    Launch::new(&format!("l7f-{tag}"))
        .level("debug")
        .start(&["LISTEN", "ADMIN"], |dir, ports| {
            bootstrap(dir, ports.get("LISTEN"), ports.get("ADMIN"), clusters).to_string()
        })
        .await
}

struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Json {
        serde_json::from_slice(&self.body).unwrap_or(Json::Null)
    }
}

/// One request on a new connection (HTTP/1.1, or h2c with `h2`).
async fn send(addr: SocketAddr, h2: bool, req: http::request::Builder, body: Bytes) -> Reply {
    let io = TokioIo::new(TcpStream::connect(addr).await.expect("connect"));
    let req = req.body(Full::new(body)).expect("request");
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

/// A request to `host` (authority for h2c, `Host` for HTTP/1.1).
fn request(h2: bool, method: &str, host: &str, path: &str) -> http::request::Builder {
    let b = http::Request::builder().method(method);
    if h2 {
        b.uri(format!("http://{host}{path}"))
    } else {
        b.uri(path).header("host", host)
    }
}

async fn get(addr: SocketAddr, host: &str, path: &str) -> Reply {
    send(addr, false, request(false, "GET", host, path), Bytes::new()).await
}

/// Waits for `n` requests at a recording backend.
async fn recorded(
    rx: &mut mpsc::UnboundedReceiver<Seen>,
    n: usize,
    log: &StaticProxy,
) -> Vec<Seen> {
    let mut seen = Vec::new();
    while seen.len() < n {
        match tokio::time::timeout(common::WAIT, rx.recv()).await {
            Ok(Some(s)) => seen.push(s),
            _ => panic!(
                "{} of {n} mirrored requests arrived\n{}",
                seen.len(),
                log.log_tail()
            ),
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_copy_requests_and_never_affect_the_primary() {
    let backend = echo("backend").await;
    let (recorder_port, mut mirrored) = recorder(false).await;
    let (other_port, mut other) = recorder(false).await;
    let (slow_port, _stalled) = recorder(true).await;
    let dead = free_port();
    let p = start(
        "mirror",
        &[
            ("backend", backend),
            ("recorder", recorder_port),
            ("other", other_port),
            ("slow", slow_port),
            ("dead", dead),
        ],
    )
    .await;

    // Every request reaches the mirror with the -shadow host (before the port), its path,
    // headers and the same body, over HTTP/1.1 and h2c, bodies from empty to 300 KB.
    let sizes = [0usize, 1, 1000, 300_000];
    let mut sent = Vec::new();
    for i in 0..8usize {
        let h2 = i % 2 == 1;
        let body: Bytes = (0..sizes[i % sizes.len()])
            .map(|k| (k * 7 + i) as u8)
            .collect::<Vec<u8>>()
            .into();
        let path = format!("/mirror/{i}?q={i}");
        let req = request(h2, "POST", "svc.local:8080", &path).header("x-seq", i.to_string());
        let r = send(p.addr(), h2, req, body.clone()).await;
        assert_eq!(r.status, 200, "primary {i}: {:?}", r.body);
        assert_eq!(r.json()["server"], "backend", "primary {i}");
        assert_eq!(r.json()["body_len"], body.len(), "primary {i}");
        sent.push((path, body));
    }
    let mut seen = recorded(&mut mirrored, sent.len(), &p).await;
    seen.sort_by_key(|s| {
        s.headers["x-seq"]
            .to_str()
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
    });
    for (i, (s, (path, body))) in seen.iter().zip(&sent).enumerate() {
        assert_eq!(s.host, "svc.local-shadow:8080", "mirror {i}");
        assert_eq!(&s.path, path, "mirror {i}");
        assert_eq!(s.body.len(), body.len(), "mirror {i}");
        assert!(s.body == body, "mirror {i}: the same body");
        assert!(
            s.headers.contains_key("x-request-id"),
            "mirror {i}: the primary's headers"
        );
    }
    // host_rewrite_literal replaces the authority; cluster_header picks the cluster, and
    // disable_shadow_host_suffix_append keeps the host.
    let r = get(p.addr(), "svc.local", "/mirror-literal").await;
    assert_eq!(r.status, 200);
    let s = recorded(&mut mirrored, 1, &p).await;
    assert_eq!(s[0].host, "mirror.example");
    let req = request(false, "GET", "svc.local", "/mirror-header").header("x-mirror-to", "other");
    let r = send(p.addr(), false, req, Bytes::new()).await;
    assert_eq!(r.status, 200);
    let s = recorded(&mut other, 1, &p).await;
    assert_eq!(s[0].host, "svc.local");
    // Mirror requests are counted under the mirror cluster's upstream stats.
    eventually(
        "mirror cluster stats",
        || p.log_tail(),
        || async { (p.stat("cluster.recorder.upstream_rq_200").await == 9).then_some(()) },
    )
    .await;
    assert_eq!(p.stat("cluster.recorder.upstream_rq_total").await, 9);

    // A dead mirror (closed port): the primary is answered as if there were no mirror.
    for h2 in [false, true] {
        let req = request(h2, "POST", "svc.local", "/mirror-dead");
        let r = send(p.addr(), h2, req, Bytes::from_static(b"payload")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(
            (r.json()["server"].as_str(), r.json()["body_len"].as_u64()),
            (Some("backend"), Some(7))
        );
    }
    eventually(
        "the dead mirror's connect failures",
        || p.log_tail(),
        || async { (p.stat("cluster.dead.upstream_cx_connect_fail").await >= 2).then_some(()) },
    )
    .await;

    // A mirror that never reads nor answers: a body far over the mirror's 1 MiB buffer still
    // reaches the primary whole, and the primary does not wait for the mirror (whose answer
    // would take the 15 s route timeout).
    let big: Bytes = vec![b'z'; 8 << 20].into();
    for h2 in [false, true] {
        let started = Instant::now();
        let req = request(h2, "POST", "svc.local", "/mirror-slow");
        let r = send(p.addr(), h2, req, big.clone()).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.json()["body_len"], big.len());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the primary waited for the mirror: {:?}",
            started.elapsed()
        );
    }
    let log = p.read("access.log");
    assert!(
        !log.lines()
            .any(|l| l.starts_with("/mirror") && !l.ends_with(" 200 -")),
        "every primary answered 200 without flags:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_runtime_fraction_mirrors_half_the_requests() {
    let backend = echo("backend").await;
    let (half_port, mut mirrored) = recorder(false).await;
    let p = start("half", &[("backend", backend), ("half", half_port)]).await;
    let io = TokioIo::new(TcpStream::connect(p.addr()).await.expect("connect"));
    let (client, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    const N: usize = 1000;
    let ok = Arc::new(AtomicUsize::new(0));
    futures::stream::iter(0..N)
        .map(|i| {
            let (mut client, ok) = (client.clone(), ok.clone());
            async move {
                let req = http::Request::builder()
                    .uri(format!("http://svc.local/mirror-half/{i}"))
                    .body(Full::new(Bytes::new()))
                    .expect("request");
                if let Ok(r) = client.send_request(req).await
                    && r.status() == 200
                {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
    assert_eq!(ok.load(Ordering::Relaxed), N, "every primary answered");
    // Mirrors finish after their primaries: wait until every mirror sent was recorded.
    let mut count = 0usize;
    let running = &p;
    let total = eventually(
        "the mirrors to settle",
        || p.log_tail(),
        || {
            while mirrored.try_recv().is_ok() {
                count += 1;
            }
            let seen = count;
            async move {
                let total = running.stat("cluster.half.upstream_rq_total").await;
                let active = running.stat("cluster.half.upstream_rq_active").await;
                (total > 0 && active == 0 && total as usize == seen).then_some(total)
            }
        },
    )
    .await;
    assert!(
        (450..=550).contains(&total),
        "{total} of {N} mirrored, expected 50% ± 5%"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_preflights_and_marks_simple_responses() {
    let backend = echo("backend").await;
    let p = start("cors", &[("backend", backend)]).await;
    let preflight = |origin: &str| {
        request(false, "OPTIONS", "svc.local", "/cors")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "x-a")
    };
    // Allowed origin: answered by the proxy (no upstream JSON).
    let r = send(
        p.addr(),
        false,
        preflight("https://a.example"),
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty(), "answered locally: {:?}", r.body);
    let h = &r.headers;
    assert_eq!(h["access-control-allow-origin"], "https://a.example");
    assert_eq!(h["access-control-allow-methods"], "GET,POST");
    assert_eq!(h["access-control-allow-headers"], "x-a");
    assert_eq!(h["access-control-max-age"], "600");
    assert_eq!(h["access-control-allow-credentials"], "true");
    // Another origin: forwarded (forward_not_matching_preflights defaults to true), unmarked.
    let r = send(
        p.addr(),
        false,
        preflight("https://evil.example"),
        Bytes::new(),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["method"].as_str()),
        (200, Some("OPTIONS"))
    );
    assert!(!r.headers.contains_key("access-control-allow-origin"));
    // Simple requests: the allowed origin is echoed with the exposed headers.
    for h2 in [false, true] {
        let req = request(h2, "GET", "svc.local", "/cors").header("origin", "https://a.example");
        let r = send(p.addr(), h2, req, Bytes::new()).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["server"], "backend");
        assert_eq!(
            r.headers["access-control-allow-origin"],
            "https://a.example"
        );
        assert_eq!(r.headers["access-control-expose-headers"], "x-exposed");
        assert_eq!(r.headers["access-control-allow-credentials"], "true");
    }
    let req = request(false, "GET", "svc.local", "/cors").header("origin", "https://evil.example");
    let r = send(p.addr(), false, req, Bytes::new()).await;
    assert_eq!(r.status, 200);
    assert!(!r.headers.contains_key("access-control-allow-origin"));
    let r = get(p.addr(), "svc.local", "/cors").await;
    assert!(
        !r.headers.contains_key("access-control-allow-origin"),
        "no Origin"
    );
    // Shadow only: the preflight goes upstream and nothing is added, but the origin is counted.
    let req = request(false, "OPTIONS", "svc.local", "/cors-shadow")
        .header("origin", "https://a.example")
        .header("access-control-request-method", "GET");
    let r = send(p.addr(), false, req, Bytes::new()).await;
    assert_eq!(
        (r.status, r.json()["method"].as_str()),
        (200, Some("OPTIONS"))
    );
    assert!(!r.headers.contains_key("access-control-allow-origin"));
    assert_eq!(p.stat("http.l7f.cors.origin_valid").await, 4);
    assert_eq!(p.stat("http.l7f.cors.origin_invalid").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_rate_limit_limits_refills_and_is_overridden_per_route() {
    let backend = echo("backend").await;
    let p = start("ratelimit", &[("backend", backend)]).await;
    // The route's bucket: 3 tokens, then 429 with its headers.
    for left in [2, 1, 0] {
        let r = get(p.addr(), "rl.example", "/rl/route").await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.headers["x-ratelimit-limit"], "3");
        assert_eq!(
            r.headers["x-ratelimit-remaining"],
            left.to_string().as_str()
        );
    }
    let r = get(p.addr(), "rl.example", "/rl/route").await;
    assert_eq!((r.status, &r.body[..]), (429, &b"local_rate_limited"[..]));
    assert_eq!(r.headers["x-local-rate-limit"], "true");
    assert_eq!(r.headers["x-ratelimit-remaining"], "0");
    assert!(r.headers.contains_key("x-ratelimit-reset"));
    // The filter's own bucket (2 tokens) is separate from the route's.
    for _ in 0..2 {
        assert_eq!(get(p.addr(), "rl.example", "/rl/filter").await.status, 200);
    }
    let r = get(p.addr(), "rl.example", "/rl/filter").await;
    assert_eq!(r.status, 429);
    assert!(
        !r.headers.contains_key("x-local-rate-limit"),
        "the route's headers are not the filter's"
    );
    // Hosts where the virtual host disables the filter are not limited.
    for _ in 0..5 {
        assert_eq!(get(p.addr(), "svc.local", "/").await.status, 200);
    }
    // The route's bucket refills (3 tokens a second).
    eventually(
        "a refilled token",
        || p.log_tail(),
        || async { (get(p.addr(), "rl.example", "/rl/route").await.status == 200).then_some(()) },
    )
    .await;
    let log = eventually(
        "the access log",
        || p.read("access.log"),
        || async {
            let log = p.read("access.log");
            log.lines().any(|l| l == "/rl/filter 429 RL").then_some(log)
        },
    )
    .await;
    assert!(log.lines().any(|l| l == "/rl/route 429 RL"), "{log}");
    assert!(log.lines().any(|l| l == "/rl/route 200 -"), "{log}");
    assert_eq!(p.stat("rl_filter.http_local_rate_limit.ok").await, 2);
    assert_eq!(
        p.stat("rl_filter.http_local_rate_limit.rate_limited").await,
        1
    );
    assert_eq!(p.stat("rl_filter.http_local_rate_limit.enforced").await, 1);
    let route_limited = p.stat("rl_route.http_local_rate_limit.rate_limited").await;
    assert!(route_limited >= 1);
    assert_eq!(
        p.stat("rl_route.http_local_rate_limit.enabled").await,
        p.stat("rl_route.http_local_rate_limit.ok").await + route_limited
    );
}
