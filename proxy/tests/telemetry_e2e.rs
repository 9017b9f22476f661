//! Istio's standard metrics through the real waypoint (agent + proxy, istiod-lite's reference
//! config, the sleep client's HBONE forwarder from the sleep pod's IP, the echo standing in for
//! httpbin): after N requests, `istio_requests_total` with all 25 labels in Istio's order and a
//! waypoint's values, the duration/size histograms, a 503 series with its response code, TCP
//! counters from the TCP service port, on the proxy's admin, its `:15090` listener and the
//! agent's merged `:15020` — and `promtool check metrics` accepts each exposition.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

mod common;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use waypoint_proto::resource::ResourceKind;
use waypoint_testbed::{
    istiod_lite::store::Resource,
    waypoint::{MeshOptions, WaypointMesh, http_get},
};

/// Requests sent for the 200 series.
const N: usize = 5;
/// Bound for metrics to show what was sent.
const SCRAPE: Duration = Duration::from_secs(20);
/// The TCP service port of the fixture.
const TCP_PORT: u16 = 9000;

const SOURCE: &str = "reporter=\"waypoint\",source_workload=\"sleep\",source_canonical_service=\"sleep\",\
source_canonical_revision=\"latest\",source_workload_namespace=\"default\",\
source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\",source_app=\"sleep\",\
source_version=\"latest\",source_cluster=\"Kubernetes\"";
const DESTINATION: &str = "destination_workload=\"httpbin\",destination_workload_namespace=\"default\",\
destination_principal=\"spiffe://cluster.local/ns/default/sa/httpbin\",destination_app=\"httpbin\",\
destination_version=\"v1\",destination_service=\"httpbin.default.svc.cluster.local\",\
destination_canonical_service=\"httpbin\",destination_canonical_revision=\"v1\",\
destination_service_name=\"httpbin\",destination_service_namespace=\"default\",\
destination_cluster=\"Kubernetes\"";

fn agent_bin() -> PathBuf {
    waypoint_testbed::waypoint::agent_beside(Path::new(env!("CARGO_BIN_EXE_proxy")))
}

fn http_series(code: u16) -> String {
    format!(
        "{{{SOURCE},{DESTINATION},request_protocol=\"http\",response_code=\"{code}\",\
grpc_response_status=\"\",response_flags=\"-\",connection_security_policy=\"mutual_tls\"}}"
    )
}

fn tcp_series() -> String {
    format!(
        "{{{SOURCE},{DESTINATION},request_protocol=\"tcp\",response_flags=\"-\",\
connection_security_policy=\"mutual_tls\"}}"
    )
}

/// The value of the sample `name{labels}` in an exposition.
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{labels} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
}

async fn scrape(addr: SocketAddr, path: &str) -> String {
    match http_get(addr, path).await {
        Ok((200, body)) => body,
        Ok((status, body)) => panic!("GET {addr}{path}: {status} {body}"),
        Err(e) => panic!("GET {addr}{path}: {e}"),
    }
}

/// Scrapes `addr` until `check` holds (bounded), returning the last body.
async fn scrape_until(addr: SocketAddr, path: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + SCRAPE;
    loop {
        let body = scrape(addr, path).await;
        if check(&body) || Instant::now() > deadline {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `promtool check metrics` on `text` (Debian's prometheus package; `.ci/run` installs it).
fn promtool(what: &str, text: &str) {
    use std::io::Write as _;
    let mut child = match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!("promtool (apt install prometheus) is needed: {e}"),
    };
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes()).expect("promtool stdin");
    }
    let out = child.wait_with_output().expect("promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Naming-convention lints about names Envoy and Istio fixed (Envoy counters without
    // `_total`, `istio_request_duration_milliseconds`, `envoy_server_days_until_first_cert_expiring`)
    // are what dashboards query, so they stay; anything else (syntax, duplicate or missing TYPE,
    // histogram shape, label problems) fails.
    const NAMING_LINTS: &[&str] = &[
        "counter metrics should have \"_total\" suffix",
        "use base unit \"seconds\" instead of",
        // Envoy's `membership_total` gauge.
        "non-counter metrics should not have \"_total\" suffix",
    ];
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !NAMING_LINTS.iter().any(|n| l.contains(n)))
        .collect();
    assert!(
        problems.is_empty(),
        "promtool check metrics on {what}:\n{}",
        problems.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_metrics_through_the_waypoint() {
    let options = MeshOptions::new(
        "telemetry",
        Path::new(env!("CARGO_BIN_EXE_proxy")),
        &agent_bin(),
    );
    let mesh = match WaypointMesh::start(options).await {
        Ok(m) => m,
        Err(e) => panic!("the mesh did not start: {e}"),
    };
    if let Err(e) = mesh.wait_hbone_ready(Duration::from_secs(30)).await {
        panic!("{e}");
    }

    // N successful requests and one 503 from the backend, over HTTP/1.1 through the forwarder.
    for i in 0..N {
        match http_get(mesh.client_addr(), "/get").await {
            Ok((200, _)) => {}
            other => panic!("request {i} through the waypoint: {other:?}"),
        }
    }
    match http_get(mesh.client_addr(), "/status?x-echo-status=503").await {
        Ok((503, _)) => {}
        other => panic!("503 request through the waypoint: {other:?}"),
    }

    // A TCP connection through the TCP service port: an HTTP exchange carried as bytes.
    let forwarder = mesh
        .service_forwarder(TCP_PORT)
        .await
        .expect("TCP forwarder");
    let request = b"GET /tcp HTTP/1.1\r\nhost: httpbin\r\nconnection: close\r\n\r\n";
    let mut s = tokio::net::TcpStream::connect(forwarder.addr)
        .await
        .expect("connect");
    s.write_all(request).await.expect("write");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut reply))
        .await
        .expect("TCP exchange in time")
        .expect("read");
    assert!(
        reply.starts_with(b"HTTP/1.1 200"),
        "TCP service port: {}",
        String::from_utf8_lossy(&reply[..reply.len().min(200)])
    );
    drop(s);

    let ok = http_series(200);
    let failed = http_series(503);
    let tcp_labels = tcp_series();
    let admin = mesh.admin_addr();
    let text = scrape_until(admin, "/stats/prometheus", |t| {
        sample(t, "istio_requests_total", &ok) == Some(N as f64)
            && sample(t, "istio_tcp_connections_closed_total", &tcp_labels) == Some(1.0)
    })
    .await;
    let rq = |labels: &str| sample(&text, "istio_requests_total", labels);
    assert_eq!(
        rq(&ok),
        Some(N as f64),
        "istio_requests_total{ok} after {N} requests:\n{}",
        istio_lines(&text)
    );
    assert_eq!(rq(&failed), Some(1.0), "{}", istio_lines(&text));
    // Histograms: _count and the +Inf bucket equal N; buckets are cumulative.
    let count = sample(&text, "istio_request_duration_milliseconds_count", &ok);
    assert_eq!(count, Some(N as f64), "{}", istio_lines(&text));
    let inf = ok.replacen('}', ",le=\"+Inf\"}", 1);
    for h in [
        "istio_request_duration_milliseconds",
        "istio_request_bytes",
        "istio_response_bytes",
    ] {
        assert_eq!(
            sample(&text, &format!("{h}_bucket"), &inf),
            Some(N as f64),
            "{h}: {}",
            istio_lines(&text)
        );
        let sum = sample(&text, &format!("{h}_sum"), &ok).unwrap_or(-1.0);
        assert!(sum >= 0.0, "{h}_sum missing");
    }
    // Each request carried at least its request line and Host header; each response a body.
    assert!(sample(&text, "istio_request_bytes_sum", &ok).unwrap_or(0.0) >= (N * 30) as f64);
    assert!(sample(&text, "istio_response_bytes_sum", &ok).unwrap_or(0.0) >= (N * 100) as f64);
    // TCP: one connection opened and closed, bytes both ways.
    for (m, at_least) in [
        ("istio_tcp_connections_opened_total", 1.0),
        ("istio_tcp_connections_closed_total", 1.0),
        ("istio_tcp_received_bytes_total", request.len() as f64),
        ("istio_tcp_sent_bytes_total", reply.len() as f64),
    ] {
        let v = sample(&text, m, &tcp_labels).unwrap_or(-1.0);
        assert!(
            v >= at_least,
            "{m}{tcp_labels} = {v}:\n{}",
            istio_lines(&text)
        );
    }
    assert!(
        text.contains("istio_build{component=\"proxy\",tag=\""),
        "istio_build missing"
    );
    promtool("the proxy's /stats/prometheus", &text);

    // Envoy's own names for the same traffic (what operators grep in /stats).
    let (_, stats) = mesh.admin_get("/stats").await.expect("/stats");
    let stat = |name: &str| -> Option<u64> {
        stats.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(": ")?
                .trim()
                .parse()
                .ok()
        })
    };
    let cluster = "cluster.inbound-vip|8000|http|httpbin.default.svc.cluster.local;";
    for (name, want) in [
        (format!("{cluster}.upstream_rq_200"), N as u64),
        (format!("{cluster}.upstream_rq_2xx"), N as u64),
        (format!("{cluster}.upstream_rq_503"), 1),
        (format!("{cluster}.upstream_rq_completed"), N as u64 + 1),
        (format!("{cluster}.membership_total"), 1),
        (format!("{cluster}.membership_healthy"), 1),
        (
            "http.inbound_0.0.0.0_8000;.downstream_rq_2xx".to_owned(),
            N as u64,
        ),
        ("http.inbound_0.0.0.0_8000;.downstream_rq_5xx".to_owned(), 1),
        (
            "http.inbound_0.0.0.0_8000;.downstream_rq_total".to_owned(),
            N as u64 + 1,
        ),
        (
            "http.inbound_0.0.0.0_8000;.downstream_rq_active".to_owned(),
            0,
        ),
        // Every CONNECT (the HTTP requests' and the TCP connection's) got its tunnel.
        (
            "http.connect_terminate.downstream_rq_2xx".to_owned(),
            N as u64 + 2,
        ),
    ] {
        assert_eq!(stat(&name), Some(want), "{name}");
    }
    assert!(
        stat("cluster_manager.cds.version").unwrap_or(0) > 0,
        "cluster_manager.cds.version"
    );
    assert!(stat("listener_manager.lds.version").unwrap_or(0) > 0);

    // The same through the :15090 listener and the agent's merged :15020 scrape.
    for (what, addr) in [
        (
            "the proxy's :15090",
            SocketAddr::from(([127, 0, 0, 1], mesh.ports.prometheus)),
        ),
        (
            "the agent's :15020",
            SocketAddr::from(([127, 0, 0, 1], mesh.ports.status)),
        ),
    ] {
        let body = scrape(addr, "/stats/prometheus").await;
        assert_eq!(
            sample(&body, "istio_requests_total", &ok),
            Some(N as f64),
            "{what}:\n{}",
            istio_lines(&body)
        );
        promtool(what, &body);
    }

    // Telemetry API overrides, pushed by istiod as a new `main_internal`: `tagOverrides`
    // REMOVE source_principal, and two dimensions (a new tag per expression, in tag order).
    push_istio_stats(&mesh, |config| {
        config["metrics"] = serde_json::json!([{
            "name": "requests_total",
            "tags_to_remove": ["source_principal"],
            "dimensions": {
                "request_host": "request.host",
                "destination_port": "string(destination.port)"
            }
        }]);
    })
    .await;
    for _ in 0..2 {
        let (status, _) = raw_get(
            mesh.client_addr(),
            "/headers",
            "httpbin.default.svc.cluster.local:8000",
        )
        .await;
        assert_eq!(status, 200);
    }
    let overridden = format!(
        "{{{},{DESTINATION},request_protocol=\"http\",response_code=\"200\",\
grpc_response_status=\"\",response_flags=\"-\",connection_security_policy=\"mutual_tls\",\
destination_port=\"8000\",request_host=\"httpbin.default.svc.cluster.local:8000\"}}",
        SOURCE.replace(
            ",source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"",
            ""
        )
    );
    let text = scrape_until(admin, "/stats/prometheus", |t| {
        sample(t, "istio_requests_total", &overridden) == Some(2.0)
    })
    .await;
    assert_eq!(
        sample(&text, "istio_requests_total", &overridden),
        Some(2.0),
        "overridden series {overridden}:\n{}",
        istio_lines(&text)
    );
    // The earlier series stay as they were; the duration histogram keeps the standard labels.
    assert_eq!(sample(&text, "istio_requests_total", &ok), Some(N as f64));
    promtool("the proxy's /stats/prometheus with overrides", &text);
}

/// Pushes, as istiod would, a new `main_internal` whose HTTP `istio.stats` filters' configs
/// `patch` changed (from the proxy's own config dump), and waits until the proxy applied it
/// (a NACK would leave the old version active).
async fn push_istio_stats(mesh: &WaypointMesh, patch: impl Fn(&mut serde_json::Value)) {
    push_stats_filters(mesh, Chains::Http, patch).await
}

/// Which `istio.stats` filters of `main_internal` a push patches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chains {
    /// The HTTP filters of the HTTP connection managers.
    Http,
    /// The network filters of the TCP chains.
    Tcp,
}

/// As [`push_istio_stats`], for the `istio.stats` filters of `which` chains.
async fn push_stats_filters(
    mesh: &WaypointMesh,
    which: Chains,
    patch: impl Fn(&mut serde_json::Value),
) {
    let dump = mesh
        .config_dump("resource=dynamic_listeners")
        .await
        .expect("config_dump");
    let mut listener = dump["configs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["active_state"]["listener"].clone())
        .find(|l| l["name"] == "main_internal")
        .expect("main_internal in the config dump");
    let mut patched = 0;
    for chain in listener["filter_chains"]
        .as_array_mut()
        .into_iter()
        .flatten()
    {
        for f in chain["filters"].as_array_mut().into_iter().flatten() {
            if which == Chains::Tcp {
                if f["name"] == "istio.stats" {
                    patch(&mut f["typed_config"]);
                    patched += 1;
                }
                continue;
            }
            let Some(filters) = f
                .get_mut("typed_config")
                .and_then(|t| t.get_mut("http_filters"))
                .and_then(|v| v.as_array_mut())
            else {
                continue;
            };
            for hf in filters {
                if hf["name"] == "istio.stats" {
                    patch(&mut hf["typed_config"]);
                    patched += 1;
                }
            }
        }
    }
    assert!(
        patched > 0,
        "no {which:?} istio.stats filter in main_internal"
    );
    // The dump holds it as an Any; istiod-lite takes the message itself.
    if let Some(m) = listener.as_object_mut() {
        m.remove("@type");
    }
    let resource = Resource::from_json(ResourceKind::Listener, &listener).expect("resource");
    let version = resource.version.clone();
    mesh.istiod.store.push(resource).await;
    let deadline = Instant::now() + SCRAPE;
    loop {
        let dump = mesh
            .config_dump("resource=dynamic_listeners")
            .await
            .expect("config_dump");
        let entry = dump["configs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == "main_internal")
            .cloned()
            .unwrap_or_default();
        if entry["active_state"]["version_info"] == version.as_str() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "main_internal version {version} not applied: error_state {}",
            entry["error_state"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Custom metrics (`stats.PluginConfig.definitions`, as an EnvoyFilter on istio.stats adds
/// them): a counter of value "1" labelled by a `metrics[]` dimension, and a histogram of
/// `response.total_size`, each counting the N requests sent after the push. As in istio_stats,
/// they carry only the labels dimensions give them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_metric_definitions_through_the_waypoint() {
    let options = MeshOptions::new(
        "telemetry-custom",
        Path::new(env!("CARGO_BIN_EXE_proxy")),
        &agent_bin(),
    );
    let mesh = match WaypointMesh::start(options).await {
        Ok(m) => m,
        Err(e) => panic!("the mesh did not start: {e}"),
    };
    if let Err(e) = mesh.wait_hbone_ready(Duration::from_secs(30)).await {
        panic!("{e}");
    }
    push_istio_stats(&mesh, |config| {
        config["definitions"] = serde_json::json!([
            {"name": "custom_requests", "value": "1", "type": "COUNTER"},
            {"name": "custom_response_size", "value": "response.total_size", "type": "HISTOGRAM"},
            {"name": "custom_request_body", "value": "request.size", "type": "COUNTER"},
            {"name": "custom_response_body", "value": "response.size", "type": "COUNTER"},
        ]);
        // The peer object's fields and labels map (Istio's documented form).
        config["metrics"] = serde_json::json!([
            {"name": "custom_requests", "dimensions": {
                "reporter": "'custom'",
                "peer_type": "upstream_peer.type",
                "peer_name": "upstream_peer.name",
                "client_name": "downstream_peer.name",
                "client_role": "downstream_peer.labels['role']",
                "peer_app": "upstream_peer.labels['app'].value",
            }},
        ]);
    })
    .await;
    let admin = mesh.admin_addr();
    // Nothing was recorded before the first request.
    let before = scrape(admin, "/stats/prometheus").await;
    assert!(!before.contains("istio_custom_requests"), "{before}");
    let mut body_bytes = 0;
    for i in 0..N {
        match http_get(mesh.client_addr(), "/get").await {
            Ok((200, body)) => body_bytes += body.len(),
            other => panic!("request {i} through the waypoint: {other:?}"),
        }
    }
    // WDS gives the pods' type and names; the peers' `labels` map is empty (istio/proxy fills
    // it from metadata-exchange headers only), so a label reads `unknown`.
    let counter = "{client_name=\"sleep-7f8d9c6b4-fghij\",client_role=\"unknown\",\
peer_app=\"unknown\",peer_name=\"httpbin-6b9c7d8f5-abcde\",peer_type=\"pod\",reporter=\"custom\"}";
    let text = scrape_until(admin, "/stats/prometheus", |t| {
        sample(t, "istio_custom_requests", counter) == Some(N as f64)
            && sample(t, "istio_custom_response_size_count", "{}") == Some(N as f64)
    })
    .await;
    let custom: String = text
        .lines()
        .filter(|l| l.contains("istio_custom"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        sample(&text, "istio_custom_requests", counter),
        Some(N as f64),
        "{custom}"
    );
    assert!(
        text.contains("# TYPE istio_custom_requests counter\n"),
        "{custom}"
    );
    assert!(
        text.contains("# TYPE istio_custom_response_size histogram\n"),
        "{custom}"
    );
    assert_eq!(
        sample(&text, "istio_custom_response_size_count", "{}"),
        Some(N as f64),
        "{custom}"
    );
    assert_eq!(
        sample(&text, "istio_custom_response_size_bucket", "{le=\"+Inf\"}"),
        Some(N as f64),
        "{custom}"
    );
    // Each response's size counts its headers and body.
    let sum = sample(&text, "istio_custom_response_size_sum", "{}").unwrap_or(0.0);
    assert!(
        sum > body_bytes as f64,
        "sum {sum} <= bodies {body_bytes}: {custom}"
    );
    // The histogram is the same count as istio_response_bytes of those requests.
    let ok = http_series(200);
    assert_eq!(
        sample(&text, "istio_response_bytes_sum", &ok),
        Some(sum),
        "{}",
        istio_lines(&text)
    );
    // Body sizes: GETs have no request body; the responses' bodies are part of their totals.
    assert_eq!(
        sample(&text, "istio_custom_request_body", "{}"),
        Some(0.0),
        "{custom}"
    );
    let response_body = sample(&text, "istio_custom_response_body", "{}").unwrap_or(0.0);
    assert!(
        response_body > 0.0 && response_body <= body_bytes as f64 && response_body < sum,
        "response.size {response_body}, bodies read {body_bytes}, total {sum}: {custom}"
    );
    promtool("the proxy's /stats/prometheus with custom metrics", &text);
    // The agent's merged scrape has them too.
    let merged = scrape(
        SocketAddr::from(([127, 0, 0, 1], mesh.ports.status)),
        "/stats/prometheus",
    )
    .await;
    assert_eq!(
        sample(&merged, "istio_custom_requests", counter),
        Some(N as f64)
    );
    // A request body, with its `content-length`.
    let mut s = tokio::net::TcpStream::connect(mesh.client_addr())
        .await
        .expect("connect");
    let post = format!(
        "POST /post HTTP/1.1\r\nhost: httpbin\r\ncontent-length: 123\r\nconnection: close\r\n\r\n{}",
        "x".repeat(123)
    );
    s.write_all(post.as_bytes()).await.expect("write");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut reply))
        .await
        .expect("POST in time")
        .expect("read");
    let text = scrape_until(admin, "/stats/prometheus", |t| {
        sample(t, "istio_custom_request_body", "{}") == Some(123.0)
    })
    .await;
    assert_eq!(
        sample(&text, "istio_custom_request_body", "{}"),
        Some(123.0),
        "{}",
        String::from_utf8_lossy(&reply[..reply.len().min(200)])
    );
}

/// Dimension expressions on the TCP chains' network `istio.stats` (`metrics[].dimensions`, as
/// the Telemetry API's `tagOverrides` reach them): a connection's series carries the values of
/// the upstream peer, the filter state, the destination port and a literal, and `unknown` for
/// a form that needs a request (istio_stats evaluates a connection's expressions without one).
/// Opened, closed and byte counters are one series: the values are the same at every report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_dimension_expressions_through_the_waypoint() {
    let options = MeshOptions::new(
        "telemetry-tcp-dims",
        Path::new(env!("CARGO_BIN_EXE_proxy")),
        &agent_bin(),
    );
    let mesh = match WaypointMesh::start(options).await {
        Ok(m) => m,
        Err(e) => panic!("the mesh did not start: {e}"),
    };
    if let Err(e) = mesh.wait_hbone_ready(Duration::from_secs(30)).await {
        panic!("{e}");
    }
    push_stats_filters(&mesh, Chains::Tcp, |config| {
        config["metrics"] = serde_json::json!([{
            "dimensions": {
                "dest_app": "upstream_peer.app",
                "dest_port": "string(destination.port)",
                "peer": "filter_state['io.istio.peer_principal']",
                "req_host": "request.host",
                "source_version": "'v9'"
            }
        }]);
    })
    .await;

    let forwarder = mesh
        .service_forwarder(TCP_PORT)
        .await
        .expect("TCP forwarder");
    let request = b"GET /tcp HTTP/1.1\r\nhost: httpbin\r\nconnection: close\r\n\r\n";
    let mut s = tokio::net::TcpStream::connect(forwarder.addr)
        .await
        .expect("connect");
    s.write_all(request).await.expect("write");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut reply))
        .await
        .expect("TCP exchange in time")
        .expect("read");
    assert!(reply.starts_with(b"HTTP/1.1 200"), "TCP service port");
    drop(s);

    // A standard tag (source_version) is replaced in place; the others follow, in name order.
    let labels = format!(
        "{{{},{DESTINATION},request_protocol=\"tcp\",response_flags=\"-\",\
connection_security_policy=\"mutual_tls\",dest_app=\"httpbin\",dest_port=\"{TCP_PORT}\",\
peer=\"spiffe://cluster.local/ns/default/sa/sleep\",req_host=\"unknown\"}}",
        SOURCE.replace("source_version=\"latest\"", "source_version=\"v9\"")
    );
    let admin = mesh.admin_addr();
    let text = scrape_until(admin, "/stats/prometheus", |t| {
        sample(t, "istio_tcp_connections_closed_total", &labels) == Some(1.0)
    })
    .await;
    for (m, want) in [
        ("istio_tcp_connections_opened_total", 1.0),
        ("istio_tcp_connections_closed_total", 1.0),
        ("istio_tcp_received_bytes_total", request.len() as f64),
        ("istio_tcp_sent_bytes_total", reply.len() as f64),
    ] {
        assert_eq!(
            sample(&text, m, &labels),
            Some(want),
            "{m}{labels}:\n{}",
            istio_lines(&text)
        );
    }
    // No TCP series without the dimensions: the connection was reported under one series only.
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("istio_tcp_connections_closed_total{"))
            .count(),
        1,
        "{}",
        istio_lines(&text)
    );
    promtool("the proxy's /stats/prometheus with TCP dimensions", &text);
}

/// GET `path` with `Host: host` on a fresh connection: (status, body).
async fn raw_get(addr: SocketAddr, path: &str, host: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf))
        .await
        .expect("answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn istio_lines(text: &str) -> String {
    text.lines()
        .filter(|l| l.starts_with("istio_requests_total") || l.starts_with("istio_tcp"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A static bootstrap: one HTTP listener (h2c) with `fault` and `istio.stats` in front of the
/// gRPC echo (HTTP/2 upstream), with a route that aborts calls with gRPC status 14.
fn grpc_bootstrap(listen: u16, admin: u16, grpc: u16) -> serde_json::Value {
    serde_json::json!({
        "node": {"id": "telemetry-grpc", "cluster": "test"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{
                "name": "grpc_in",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "grpc_in",
                        "codec_type": "AUTO",
                        "route_config": {"name": "r", "virtual_hosts": [{
                            "name": "echo", "domains": ["*"],
                            "routes": [
                                {"match": {"prefix": "/waypoint.echo.v1.EchoService/EchoBidi"},
                                 "route": {"cluster": "echo", "timeout": "0s"},
                                 "typed_per_filter_config": {"envoy.filters.http.fault": {
                                     "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
                                     "abort": {"grpc_status": 14, "percentage": {"numerator": 100}}}}},
                                {"match": {"prefix": "/"}, "route": {"cluster": "echo", "timeout": "0s"}}
                            ]}]},
                        "http_filters": [
                            {"name": "envoy.filters.http.fault", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}},
                            {"name": "istio.stats", "typed_config": {
                                "@type": "type.googleapis.com/stats.PluginConfig",
                                "disable_host_header_fallback": true, "reporter": "SERVER_GATEWAY"}},
                            {"name": "envoy.filters.http.router", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
                        ]
                    }
                }]}]
            }],
            "clusters": [{
                "name": "echo",
                "type": "STATIC",
                "connect_timeout": "5s",
                "metadata": {"filter_metadata": {"istio": {"services": [
                    {"host": "echo.default.svc.cluster.local", "name": "echo", "namespace": "default"}]}}},
                "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}},
                "load_assignment": {"cluster_name": "echo", "endpoints": [{"lb_endpoints": [{"endpoint": {
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": grpc}}}}]}]}
            }]
        }
    })
}

/// The labels the gRPC message counters of [`grpc_bootstrap`]'s streams carry: the 20 peer and
/// service labels, known while a stream runs (no source peer: the bootstrap has no WDS).
const GRPC_STREAM_LABELS: &str = "reporter=\"waypoint\",source_workload=\"unknown\",\
source_canonical_service=\"unknown\",source_canonical_revision=\"latest\",\
source_workload_namespace=\"unknown\",source_principal=\"unknown\",source_app=\"unknown\",\
source_version=\"unknown\",source_cluster=\"unknown\",destination_workload=\"unknown\",\
destination_workload_namespace=\"unknown\",destination_principal=\"unknown\",\
destination_app=\"unknown\",destination_version=\"unknown\",\
destination_service=\"echo.default.svc.cluster.local\",destination_canonical_service=\"unknown\",\
destination_canonical_revision=\"unknown\",destination_service_name=\"echo\",\
destination_service_namespace=\"default\",destination_cluster=\"unknown\"";

/// One unary gRPC call over h2c: (HTTP status, grpc-status from trailers or headers).
async fn grpc_call(addr: SocketAddr, method: &str, message: &[u8]) -> (u16, Option<String>) {
    use http_body_util::BodyExt as _;
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://echo.default.svc.cluster.local{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(bytes::Bytes::from(frame)))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(20), send.send_request(req))
        .await
        .expect("answer in time")
        .expect("response");
    let status = resp.status().as_u16();
    let header_status = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let collected = resp.into_body().collect().await.expect("body");
    let trailer_status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, trailer_status.or(header_status))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_report_protocol_and_status() {
    let echo = waypoint_testbed::echo::EchoServer::bind(&waypoint_testbed::echo::EchoConfig {
        name: "grpc-echo".into(),
        http: "127.0.0.1:0".parse().expect("addr"),
        grpc: Some("127.0.0.1:0".parse().expect("addr")),
    })
    .await
    .expect("echo");
    let grpc_port = echo.grpc_addr().expect("grpc port").port();
    tokio::spawn(echo.run());
    let [listen, admin] = common::distinct_ports();
    let dir = common::temp_dir("telemetry-grpc");
    let proxy = common::Proxy::start(&dir, &grpc_bootstrap(listen, admin, grpc_port));
    let addr = SocketAddr::from(([127, 0, 0, 1], listen));
    let deadline = Instant::now() + SCRAPE;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "proxy not listening:\n{}",
            proxy.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    const ECHO: &str = "/waypoint.echo.v1.EchoService/Echo";
    // OK (unary, and server streaming with EchoRequest.reply_count = 3), a status the backend
    // fails with (EchoRequest.status_code = 5), and a fault abort.
    assert_eq!(grpc_call(addr, ECHO, &[]).await, (200, Some("0".into())));
    assert_eq!(
        grpc_call(addr, "/waypoint.echo.v1.EchoService/EchoStream", &[0x28, 3]).await,
        (200, Some("0".into()))
    );
    assert_eq!(
        grpc_call(addr, ECHO, &[0x18, 5]).await,
        (200, Some("5".into()))
    );
    assert_eq!(
        grpc_call(addr, "/waypoint.echo.v1.EchoService/EchoBidi", &[]).await,
        (200, Some("14".into()))
    );
    let series = |grpc: &str, flags: &str| {
        format!(
            "{{reporter=\"waypoint\",source_workload=\"unknown\",source_canonical_service=\"unknown\",\
source_canonical_revision=\"latest\",source_workload_namespace=\"unknown\",source_principal=\"unknown\",\
source_app=\"unknown\",source_version=\"unknown\",source_cluster=\"unknown\",destination_workload=\"unknown\",\
destination_workload_namespace=\"unknown\",destination_principal=\"unknown\",destination_app=\"unknown\",\
destination_version=\"unknown\",destination_service=\"echo.default.svc.cluster.local\",\
destination_canonical_service=\"unknown\",destination_canonical_revision=\"unknown\",\
destination_service_name=\"echo\",destination_service_namespace=\"default\",destination_cluster=\"unknown\",\
request_protocol=\"grpc\",response_code=\"200\",grpc_response_status=\"{grpc}\",response_flags=\"{flags}\",\
connection_security_policy=\"none\"}}"
        )
    };
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    let text = scrape_until(admin_addr, "/stats/prometheus", |t| {
        sample(t, "istio_requests_total", &series("14", "FI")) == Some(1.0)
    })
    .await;
    for (grpc, flags, calls) in [("0", "-", 2.0), ("5", "-", 1.0), ("14", "FI", 1.0)] {
        assert_eq!(
            sample(&text, "istio_requests_total", &series(grpc, flags)),
            Some(calls),
            "grpc-status {grpc}:\n{}\n{}",
            istio_lines(&text),
            proxy.log_tail()
        );
    }
    // Messages: counted per stream without the response's labels (istio_stats adds them while
    // streams run), so the calls share one series: three calls reached the backend with one
    // request message each (the aborted one was answered before its body was read) and got
    // 1 + 3 + 0 replies.
    let messages = format!("{{{GRPC_STREAM_LABELS}}}");
    assert_eq!(
        sample(&text, "istio_request_messages_total", &messages),
        Some(3.0),
        "{}",
        istio_lines(&text)
    );
    assert_eq!(
        sample(&text, "istio_response_messages_total", &messages),
        Some(4.0),
        "{}",
        istio_lines(&text)
    );
    promtool("the proxy's /stats/prometheus (gRPC)", &text);
}

/// A request body fed from a channel, so a test holds a gRPC stream open between messages.
struct ChannelBody(tokio::sync::mpsc::Receiver<bytes::Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|m| m.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// gRPC message counters of a long-lived stream are reported every `tcp_reporting_duration`
/// while it runs (istio_stats's report timer, from the request headers on, once the downstream
/// peer is known: here from `baggage`), with the 20 stream labels and dimensions evaluated
/// without the request headers; the stream's end adds the rest and its `istio_requests_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_message_counts_are_reported_while_a_stream_runs() {
    use http_body_util::BodyExt as _;
    let echo = waypoint_testbed::echo::EchoServer::bind(&waypoint_testbed::echo::EchoConfig {
        name: "grpc-echo".into(),
        http: "127.0.0.1:0".parse().expect("addr"),
        grpc: Some("127.0.0.1:0".parse().expect("addr")),
    })
    .await
    .expect("echo");
    let grpc_port = echo.grpc_addr().expect("grpc port").port();
    tokio::spawn(echo.run());
    let [listen, admin] = common::distinct_ports();
    let mut bootstrap = grpc_bootstrap(listen, admin, grpc_port);
    let hcm = bootstrap
        .pointer_mut("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config")
        .expect("hcm");
    // Without the route that aborts EchoBidi.
    hcm["route_config"]["virtual_hosts"][0]["routes"]
        .as_array_mut()
        .expect("routes")
        .remove(0);
    let filters = hcm["http_filters"].as_array_mut().expect("http_filters");
    filters.insert(
        0,
        serde_json::json!({"name": "peer_metadata", "typed_config": {
            "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
            "type_url": "type.googleapis.com/io.istio.http.peer_metadata.Config",
            "value": {"downstream_discovery": [{"baggage": {}}]}}}),
    );
    let stats = filters
        .iter_mut()
        .find(|f| f["name"] == "istio.stats")
        .expect("istio.stats");
    stats["typed_config"]["tcp_reporting_duration"] = "0.2s".into();
    stats["typed_config"]["metrics"] = serde_json::json!([
        {"name": "request_messages_total", "dimensions": {"x_user": "request.headers['x-user']"}},
    ]);
    let dir = common::temp_dir("telemetry-grpc-periodic");
    let proxy = common::Proxy::start(&dir, &bootstrap);
    let addr = SocketAddr::from(([127, 0, 0, 1], listen));
    let deadline = Instant::now() + SCRAPE;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "proxy not listening:\n{}",
            proxy.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let req = http::Request::builder()
        .method("POST")
        .uri("http://echo.default.svc.cluster.local/waypoint.echo.v1.EchoService/EchoBidi")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-user", "alice")
        .header(
            "baggage",
            "k8s.namespace.name=default,k8s.deployment.name=client,service.name=client",
        )
        .body(ChannelBody(rx))
        .expect("request");
    // An empty EchoRequest: a 5-byte message prefix.
    let message = bytes::Bytes::from_static(&[0, 0, 0, 0, 0]);
    tx.send(message.clone()).await.expect("first message");
    let resp = tokio::time::timeout(Duration::from_secs(20), send.send_request(req))
        .await
        .expect("answer in time")
        .expect("response");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // Each request message gets its reply before the next is sent.
    let mut replies = 0;
    let mut next_reply = async || loop {
        let frame = tokio::time::timeout(Duration::from_secs(20), body.frame())
            .await
            .expect("reply in time")
            .expect("a frame")
            .expect("frame");
        if frame.is_data() {
            return;
        }
    };
    for i in 0..3 {
        if i > 0 {
            tx.send(message.clone()).await.expect("message");
        }
        next_reply().await;
        replies += 1;
    }
    // Periodic reports while the stream is open: 3 messages each way, the request counter with
    // the dimension that reads a request header, which istio_stats evaluates without headers.
    let request_labels = format!("{{{GRPC_STREAM_LABELS},x_user=\"unknown\"}}");
    let response_labels = format!("{{{GRPC_STREAM_LABELS}}}");
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    let text = scrape_until(admin_addr, "/stats/prometheus", |t| {
        sample(t, "istio_request_messages_total", &request_labels) == Some(3.0)
            && sample(t, "istio_response_messages_total", &response_labels) == Some(3.0)
    })
    .await;
    assert_eq!(
        sample(&text, "istio_request_messages_total", &request_labels),
        Some(3.0),
        "{}\n{}",
        istio_lines(&text),
        proxy.log_tail()
    );
    assert_eq!(
        sample(&text, "istio_response_messages_total", &response_labels),
        Some(replies as f64),
        "{}",
        istio_lines(&text)
    );
    assert!(
        !text.contains("istio_requests_total{"),
        "the stream is still open: {}",
        istio_lines(&text)
    );
    // One more message, then the end: the rest is added to the same series.
    tx.send(message).await.expect("last message");
    next_reply().await;
    drop(tx);
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(20), body.frame())
        .await
        .expect("end in time")
    {
        frame.expect("frame");
    }
    let text = scrape_until(admin_addr, "/stats/prometheus", |t| {
        sample(t, "istio_request_messages_total", &request_labels) == Some(4.0)
            && t.contains("istio_requests_total{")
    })
    .await;
    assert_eq!(
        sample(&text, "istio_request_messages_total", &request_labels),
        Some(4.0),
        "{}",
        istio_lines(&text)
    );
    assert_eq!(
        sample(&text, "istio_response_messages_total", &response_labels),
        Some(4.0),
        "{}",
        istio_lines(&text)
    );
    assert!(
        text.contains("request_protocol=\"grpc\",response_code=\"200\",grpc_response_status=\"0\""),
        "{}",
        istio_lines(&text)
    );
    promtool("the proxy's /stats/prometheus (gRPC stream)", &text);
}
