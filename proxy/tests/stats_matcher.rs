//! The bootstrap's `stats_config.stats_matcher` on the real proxy process (static bootstrap, echo
//! backends from the test bed, real sockets on 127.0.0.1): a rejected stat does not exist in
//! `/stats`, `/stats?format=json` nor `/stats/prometheus`, while the included ones (and `usedonly` /
//! `filter=` on them) behave as before; Istio's standard metrics are judged by their Envoy names
//! (`istiocustom.istio_requests_total`); the exposition stays valid for `promtool`; a matcher we
//! cannot honour refuses the bootstrap with its field path.

mod common;

use std::{net::Ipv4Addr, time::Instant};

use common::{Launch, StaticProxy};
use serde_json::{Value as Json, json};

/// A static bootstrap: listener `in` on `ip:listen` (HCM stat prefix `in`, `istio.stats` then the
/// router) with `/hidden` → cluster `hidden` and `/kept` → cluster `kept`, both the echo backend
/// on `127.0.0.1:backend`, admin on `ip:admin`, and `stats_config` as given.
fn bootstrap(ip: Ipv4Addr, listen: u16, admin: u16, backend: u16, stats_config: Json) -> Json {
    let cluster = |name: &str| {
        json!({
            "name": name,
            "type": "STATIC",
            "connect_timeout": "2s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": backend}}}}]}]}
        })
    };
    json!({
        "node": {"id": "stats-matcher", "cluster": "test"},
        "admin": {"address": {"socket_address": {"address": ip.to_string(), "port_value": admin}}},
        "stats_config": stats_config,
        "static_resources": {
            "listeners": [{
                "name": "in",
                "address": {"socket_address": {"address": ip.to_string(), "port_value": listen}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "in",
                        "route_config": {"name": "r", "virtual_hosts": [{
                            "name": "all", "domains": ["*"],
                            "routes": [
                                {"match": {"prefix": "/hidden"}, "route": {"cluster": "hidden"}},
                                {"match": {"prefix": "/kept"}, "route": {"cluster": "kept"}}
                            ]}]},
                        "http_filters": [
                            {"name": "istio.stats", "typed_config": {
                                "@type": "type.googleapis.com/stats.PluginConfig",
                                "disable_host_header_fallback": true, "reporter": "SERVER_GATEWAY"}},
                            {"name": "envoy.filters.http.router", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
                        ]
                    }
                }]}]
            }],
            "clusters": [cluster("hidden"), cluster("kept")]
        }
    })
}

/// An echo backend, the proxy with `stats_config`, and one request to each cluster (both 200).
struct Bed {
    proxy: StaticProxy,
}

impl Bed {
    /// Starts the bed with the proxy on loopback address `ip` (one per test, so the tests of this
    /// binary running in parallel cannot take each other's ports in between).
    async fn start(tag: &str, ip: Ipv4Addr, stats_config: Json) -> Bed {
        let backend = common::echo(&format!("{tag}-echo")).await;
        // Started once LIVE: the static listener is bound and its workers accept.
        let proxy = Launch::new(tag)
            .ip(ip)
            .level("debug")
            .start(&["LISTEN", "ADMIN"], |_, ports| {
                bootstrap(
                    ip,
                    ports.get("LISTEN"),
                    ports.get("ADMIN"),
                    backend,
                    stats_config.clone(),
                )
                .to_string()
            })
            .await;
        for path in ["/hidden", "/kept"] {
            let answer = common::http_at(proxy.addr(), "GET", path).await;
            assert!(
                matches!(answer, (200, _)),
                "GET {path}: {answer:?}\n{}",
                proxy.log_tail()
            );
        }
        Bed { proxy }
    }

    async fn get(&self, path: &str) -> String {
        match self.proxy.admin_get(path).await {
            (200, body) => body,
            other => panic!("admin GET {path}: {other:?}\n{}", self.proxy.log_tail()),
        }
    }

    /// `path` once `ready` holds for it (the last requests are counted when their streams end).
    async fn get_when(&self, path: &str, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + common::WAIT;
        loop {
            let body = self.get(path).await;
            if ready(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "GET {path} never became ready:\n{body}\n{}",
                self.proxy.log_tail()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// The stat names of a text `/stats`.
fn names(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(n, _)| n)
        .collect()
}

/// `promtool check metrics`, tolerating only the naming lints Envoy's and Istio's fixed names
/// cause (counters without `_total`, `milliseconds`, the `membership_total` gauge).
fn promtool(text: &str) {
    use std::io::Write as _;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool (apt install prometheus) is needed: {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes()).expect("promtool stdin");
    }
    let out = child.wait_with_output().expect("promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            !l.contains("counter metrics should have \"_total\" suffix")
                && !l.contains("use base unit \"seconds\" instead of")
                && !l.contains("envoy_cluster_membership_total non-counter metrics")
        })
        .collect();
    assert!(
        problems.is_empty(),
        "promtool:\n{}\n{text}",
        problems.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inclusion_list_hides_the_rest_everywhere() {
    let bed = Bed::start(
        "stats-incl",
        Ipv4Addr::new(127, 0, 61, 1),
        json!({"stats_matcher": {"inclusion_list": {"patterns": [
            {"prefix": "server"},
            {"prefix": "cluster_manager"},
            {"prefix": "listener_manager"},
            {"prefix": "cluster.kept."},
            {"prefix": "http."},
            {"prefix": "istio"}
        ]}}}),
    )
    .await;

    let text = bed
        .get_when("/stats", |t| {
            t.contains("cluster.kept.upstream_rq_completed: 1\n")
                && t.contains("http.in.downstream_rq_completed: 2\n")
        })
        .await;
    for name in names(&text) {
        assert!(
            [
                "server.",
                "cluster_manager.",
                "listener_manager.",
                "cluster.kept.",
                "http."
            ]
            .iter()
            .any(|p| name.starts_with(p)),
            "{name} is outside the inclusion list:\n{text}"
        );
    }
    assert!(
        text.contains("cluster.kept.upstream_rq_total: 1\n"),
        "{text}"
    );
    assert!(text.contains("server.live: 1\n"), "{text}");
    assert!(
        text.contains("cluster_manager.active_clusters: 2\n"),
        "{text}"
    );
    assert!(!text.contains("cluster.hidden."), "{text}");
    // Listener stats exist in the registry but are not included.
    assert!(!text.contains("listener.127.0.0.1_"), "{text}");

    // JSON: the same set.
    let doc: Json = serde_json::from_str(&bed.get("/stats?format=json").await).expect("JSON");
    let json_names: Vec<&str> = doc["stats"]
        .as_array()
        .expect("stats array")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert!(
        json_names.contains(&"cluster.kept.upstream_rq_total"),
        "{doc}"
    );
    assert!(
        !json_names.iter().any(|n| n.starts_with("cluster.hidden.")),
        "{doc}"
    );

    // usedonly and filter= narrow what remains.
    let used = bed.get("/stats?usedonly&filter=upstream_rq_total%24").await;
    assert_eq!(used, "cluster.kept.upstream_rq_total: 1\n");
    let filtered = bed.get("/stats?filter=%5Ecluster%5C.hidden%5C.").await;
    assert_eq!(filtered, "", "a filter cannot bring a rejected stat back");

    // Prometheus: no series of the hidden cluster; Istio's metrics pass `istio`; valid exposition.
    let prom = bed
        .get_when("/stats/prometheus", |t| t.contains("istio_requests_total{"))
        .await;
    assert!(
        prom.contains("envoy_cluster_upstream_rq_total{cluster_name=\"kept\"} 1\n"),
        "{prom}"
    );
    assert!(!prom.contains("cluster_name=\"hidden\""), "{prom}");
    assert!(prom.contains("\nenvoy_server_live{} 1\n"), "{prom}");
    assert!(!prom.contains("listener_address="), "{prom}");
    assert!(
        prom.contains("# TYPE istio_request_duration_milliseconds histogram"),
        "{prom}"
    );
    assert!(prom.contains("istio_build{"), "{prom}");
    assert_eq!(
        bed.get("/stats?format=prometheus")
            .await
            .matches("# TYPE")
            .count(),
        prom.matches("# TYPE").count()
    );
    promtool(&prom);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusion_list_hides_matching_stats_and_istio_metrics() {
    let bed = Bed::start(
        "stats-excl",
        Ipv4Addr::new(127, 0, 61, 2),
        json!({"stats_matcher": {"exclusion_list": {"patterns": [
            {"suffix": "upstream_rq_total"},
            {"exact": "server.live"},
            {"contains": ".HIDDEN.", "ignore_case": true},
            {"safe_regex": {"regex": r"istiocustom\.istio_request_(duration_milliseconds|bytes)"}}
        ]}}}),
    )
    .await;
    let text = bed
        .get_when("/stats", |t| {
            t.contains("cluster.kept.upstream_rq_completed: 1\n")
        })
        .await;
    assert!(!text.contains("upstream_rq_total:"), "{text}");
    assert!(!text.contains("server.live:"), "{text}");
    assert!(!text.contains("cluster.hidden."), "{text}");
    assert!(text.contains("server.state: 0\n"), "{text}");
    assert!(text.contains("cluster.kept.upstream_rq_2xx: 1\n"), "{text}");
    assert!(text.contains("http.in.downstream_rq_total: 2\n"), "{text}");

    let prom = bed
        .get_when("/stats/prometheus", |t| t.contains("istio_requests_total{"))
        .await;
    // The regex rejects the two request histograms; the response one and the counter remain.
    assert!(
        !prom.contains("istio_request_duration_milliseconds"),
        "{prom}"
    );
    assert!(!prom.contains("istio_request_bytes"), "{prom}");
    assert!(
        prom.contains("# TYPE istio_response_bytes histogram"),
        "{prom}"
    );
    assert!(!prom.contains("envoy_server_live"), "{prom}");
    assert!(!prom.contains("cluster_name=\"hidden\""), "{prom}");
    promtool(&prom);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_all_leaves_nothing_to_show() {
    let bed = Bed::start(
        "stats-none",
        Ipv4Addr::new(127, 0, 61, 3),
        json!({"stats_matcher": {"reject_all": true}}),
    )
    .await;
    assert_eq!(bed.get("/stats").await, "");
    let doc: Json = serde_json::from_str(&bed.get("/stats?format=json").await).expect("JSON");
    assert_eq!(doc, json!({"stats": []}));
    assert_eq!(bed.get("/stats/prometheus").await, "");
}

/// `--mode validate` on a bootstrap whose stats matcher cannot be honoured: exit 1 and the path.
#[test]
fn unsupported_matchers_refuse_the_bootstrap() {
    for (stats_config, path) in [
        (json!({"stats_matcher": {}}), "stats_config.stats_matcher"),
        (
            json!({"stats_matcher": {"inclusion_list": {"patterns": []}}}),
            "stats_config.stats_matcher.inclusion_list.patterns",
        ),
        (
            json!({"stats_matcher": {"exclusion_list": {"patterns": [{"safe_regex": {"regex": "("}}]}}}),
            "stats_config.stats_matcher.exclusion_list.patterns[0].safe_regex",
        ),
        (
            json!({"histogram_bucket_settings": [{"match": {"prefix": "istio"}, "buckets": [1, 1]}]}),
            "stats_config.histogram_bucket_settings[0].buckets",
        ),
    ] {
        let dir = common::temp_dir("stats-validate");
        let doc = bootstrap(Ipv4Addr::LOCALHOST, 1, 2, 3, stats_config.clone());
        std::fs::write(dir.join("bootstrap.json"), doc.to_string()).expect("write");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_proxy"))
            .args(["--mode", "validate", "-c", "bootstrap.json"])
            .current_dir(&dir)
            .output()
            .expect("proxy runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(1), "{stats_config}: {text}");
        assert!(
            text.contains(path),
            "{stats_config}: want {path} in\n{text}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
