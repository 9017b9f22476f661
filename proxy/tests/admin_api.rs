//! The admin handlers in-process (no sockets): states, methods, stats formats and the config dump
//! of a proxy that loaded Istio's golden waypoint bootstrap and has no xDS yet.

use std::sync::Arc;

use http::{Method, StatusCode};
use http_body_util::BodyExt as _;
use proxy::{
    admin::{self, Admin},
    bootstrap, cli,
    server::{Server, ServerState},
    xds::sds::SecretStore,
};
use serde_json::Value as Json;

fn admin() -> Arc<Admin> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/istio/bootstrap_ambient_golden.json"
    ))
    .expect("fixture");
    let loaded = bootstrap::from_json(serde_json::from_str(&text).expect("json")).expect("loads");
    let options = cli::parse(&["-c".to_owned(), "envoy-rev.json".to_owned()]).expect("options");
    let server = Server::new(options, loaded);
    // As at start-up: the bootstrap's static listeners and clusters join the snapshot (no data
    // plane here, so nothing is bound).
    let compiled =
        proxy::config::bootstrap::compile(&server.bootstrap.bootstrap).expect("compiles");
    let problems = server
        .config
        .seed_static(compiled.listeners, compiled.clusters);
    assert!(problems.is_empty(), "{problems:?}");
    Admin::new(server, Arc::new(SecretStore::default()), None)
}

async fn call(admin: &Admin, method: Method, uri: &str) -> (StatusCode, String) {
    let resp = admin::handle(admin, &method, &uri.parse().expect("uri"));
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn ready_follows_the_server_state() {
    let a = admin();
    assert_eq!(
        call(&a, Method::GET, "/ready").await,
        (StatusCode::SERVICE_UNAVAILABLE, "PRE_INITIALIZING\n".into())
    );
    a.server.set_state(ServerState::Live);
    assert_eq!(
        call(&a, Method::GET, "/ready").await,
        (StatusCode::OK, "LIVE\n".into())
    );
    let (status, _) = call(&a, Method::GET, "/drain_listeners?graceful").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        call(&a, Method::POST, "/drain_listeners?graceful").await,
        (StatusCode::OK, "OK\n".into())
    );
    assert!(*a.server.drain.borrow());
    assert_eq!(
        call(&a, Method::GET, "/ready").await,
        (StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n".into())
    );
    let (_, stats) = call(
        &a,
        Method::GET,
        "/stats?usedonly&filter=%5E(server%5C.(state%7Clive)%7Clistener_manager%5C.total_listeners_draining)%24",
    )
    .await;
    assert_eq!(
        stats,
        "listener_manager.total_listeners_draining: 2\nserver.live: 0\nserver.state: 1\n"
    );
    let (status, _) = call(&a, Method::POST, "/quitquitquit").await;
    assert_eq!(status, StatusCode::OK);
    assert!(*a.server.shutdown.borrow());
}

#[tokio::test]
async fn stats_formats_and_filters() {
    let a = admin();
    a.server
        .stats
        .counter("cluster.xds-grpc;.upstream_cx_total")
        .add(3);
    a.server
        .stats
        .counter("cluster.agent;.upstream_cx_total")
        .inc();
    // (the clusters' membership gauges match `^cluster\.` too). Istio's bootstrap includes only
    // `cluster.xds-grpc` of the cluster stats: `cluster.agent;.*` does not exist for /stats, as
    // in Envoy.
    let (status, text) = call(
        &a,
        Method::GET,
        "/stats?filter=%5Ecluster%5C..*upstream_cx_total",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(text, "cluster.xds-grpc;.upstream_cx_total: 3\n");
    let (_, json) = call(
        &a,
        Method::GET,
        "/stats?format=json&filter=%5Eserver%5C.uptime%24",
    )
    .await;
    let doc: Json = serde_json::from_str(&json).expect("json");
    assert_eq!(doc["stats"][0]["name"], "server.uptime");
    let (_, gauges) = call(&a, Method::GET, "/stats?type=Gauges&filter=cds").await;
    assert_eq!(gauges, "");
    assert_eq!(
        call(&a, Method::GET, "/stats?type=Bogus").await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        call(&a, Method::GET, "/stats?filter=(").await.0,
        StatusCode::BAD_REQUEST
    );

    let (_, prom) = call(&a, Method::GET, "/stats/prometheus").await;
    // Istio's cluster_name extractor (`^cluster(\.(.+);)`) applies; the stats matcher leaves
    // one series (`agent` is outside Istio's inclusion list).
    let family: Vec<&str> = prom
        .lines()
        .filter(|l| l.contains("envoy_cluster_upstream_cx_total"))
        .collect();
    assert_eq!(
        family,
        [
            "# HELP envoy_cluster_upstream_cx_total cluster.upstream_cx_total",
            "# TYPE envoy_cluster_upstream_cx_total counter",
            "envoy_cluster_upstream_cx_total{cluster_name=\"xds-grpc\"} 3",
        ]
    );
    let types = prom.lines().filter(|l| l.starts_with("# TYPE ")).count();
    let mut names: Vec<&str> = prom
        .lines()
        .filter(|l| l.starts_with("# TYPE "))
        .map(|l| l.split(' ').nth(2).unwrap_or_default())
        .collect();
    names.dedup();
    assert_eq!(names.len(), types, "a family has two TYPE lines");
    assert!(prom.contains("envoy_server_state{} 2\n"), "{prom}");
}

#[tokio::test]
async fn config_dump_and_listing_shapes() {
    let a = admin();
    let (status, text) = call(&a, Method::GET, "/config_dump?include_eds").await;
    assert_eq!(status, StatusCode::OK);
    let doc: Json = serde_json::from_str(&text).expect("json");
    let types: Vec<&str> = doc["configs"]
        .as_array()
        .expect("configs")
        .iter()
        .filter_map(|c| c["@type"].as_str())
        .collect();
    assert_eq!(
        types,
        [
            "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
            "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
            "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump",
            "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
            "type.googleapis.com/envoy.admin.v3.ScopedRoutesConfigDump",
            "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
            "type.googleapis.com/envoy.admin.v3.SecretsConfigDump",
        ]
    );
    // The static listeners' HCM route configs show as static route configs.
    let routes = &doc["configs"][5]["static_route_configs"];
    assert_eq!(routes.as_array().map(Vec::len), Some(2), "{routes}");
    let (_, masked) = call(
        &a,
        Method::GET,
        "/config_dump?resource=static_clusters&mask=cluster.name",
    )
    .await;
    let masked: Json = serde_json::from_str(&masked).expect("json");
    assert_eq!(masked["configs"].as_array().map(Vec::len), Some(4));
    assert_eq!(
        masked["configs"][0],
        serde_json::json!({
            "@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump.StaticCluster",
            "cluster": {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "prometheus_stats"}
        })
    );
    assert_eq!(
        call(&a, Method::GET, "/config_dump?resource=nope").await.0,
        StatusCode::NOT_FOUND
    );

    let (_, listeners) = call(&a, Method::GET, "/listeners").await;
    assert_eq!(
        listeners,
        "0.0.0.0_15090::0.0.0.0:15090\n0.0.0.0_15021::0.0.0.0:15021\n"
    );
    let (_, clusters) = call(&a, Method::GET, "/clusters").await;
    assert!(clusters.starts_with("prometheus_stats::observability_name::prometheus_stats;\nprometheus_stats::default_priority::max_connections::1024\n"), "{clusters}");
    assert!(
        clusters.contains("xds-grpc::/tmp/XDS::health_flags::healthy\n"),
        "{clusters}"
    );
    let (_, info) = call(&a, Method::GET, "/server_info").await;
    let info: Json = serde_json::from_str(&info).expect("json");
    assert_eq!(info["state"], "PRE_INITIALIZING");
    assert_eq!(info["hot_restart_version"], "disabled");
    let (_, certs) = call(&a, Method::GET, "/certs").await;
    assert_eq!(
        serde_json::from_str::<Json>(&certs).expect("json"),
        serde_json::json!({"certificates": []})
    );
    assert_eq!(
        call(&a, Method::GET, "/logging").await.0,
        StatusCode::NOT_IMPLEMENTED
    );
    assert_eq!(
        call(&a, Method::GET, "/nope").await.0,
        StatusCode::NOT_FOUND
    );
}
