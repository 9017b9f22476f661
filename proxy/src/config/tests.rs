//! Tests of the whole pipeline (allowlist walk + compile + per-resource store semantics) on the
//! reconstructed waypoint snapshot and the ambient bootstrap golden.

use std::{net::IpAddr, time::Duration};

use serde_json::{Value as Json, json};
use waypoint_proto::{json as pjson, resource::ResourceKind};

use super::{
    ConfigStore, Update,
    cluster::{Discovery, LbPolicy},
    endpoint::EndpointAddress,
    filters::hcm::Routes,
    filters::{NetworkFilterKind, http::HttpFilterKind},
    listener::Bind,
    matcher::ConnectionInfo,
    protocol::UpstreamProtocol,
    tls::TransportSocket,
};

fn fixture() -> Json {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/istio/waypoint_xds_reconstructed_example.yaml"
    ))
    .expect("fixture");
    pjson::yaml_to_json(&text).expect("yaml")
}

fn update(kind: ResourceKind, doc: &Json) -> Update {
    let name = kind.name_in_json(doc).expect("named").to_owned();
    Update {
        name,
        version: "1".into(),
        resource: pjson::any_from_json(kind.type_url(), doc).expect("encodes"),
    }
}

fn resources(kind: ResourceKind) -> Vec<Json> {
    fixture()[kind.file_key()].as_array().expect("list").clone()
}

fn named(kind: ResourceKind, name: &str) -> Json {
    resources(kind)
        .into_iter()
        .find(|r| kind.name_in_json(r) == Some(name))
        .expect("resource in fixture")
}

/// Applies one resource and returns the NACK message, if any.
fn reject(kind: ResourceKind, doc: &Json) -> Option<String> {
    let store = ConfigStore::default();
    store
        .apply(kind, &[update(kind, doc)], &[])
        .into_iter()
        .next()
        .map(|e| e.message)
}

fn applied_store() -> ConfigStore {
    let store = ConfigStore::default();
    for kind in [
        ResourceKind::Cluster,
        ResourceKind::Endpoint,
        ResourceKind::Listener,
    ] {
        let updates: Vec<Update> = resources(kind).iter().map(|r| update(kind, r)).collect();
        let errors = store.apply(kind, &updates, &[]);
        assert!(errors.is_empty(), "{kind:?}: {errors:#?}");
    }
    store
}

#[test]
fn every_resource_of_the_reference_snapshot_compiles() {
    let store = applied_store();
    let snap = store.snapshot();
    assert_eq!(
        snap.listeners.keys().collect::<Vec<_>>(),
        ["connect_originate", "connect_terminate", "main_internal"]
    );
    assert_eq!(snap.clusters.len(), 4);
    assert_eq!(snap.endpoints.len(), 1);
}

#[test]
fn connect_terminate_maps_its_settings() {
    let snap = applied_store().snapshot();
    let l = &snap.listeners["connect_terminate"];
    assert_eq!(
        l.bind,
        Bind::Socket {
            addr: "0.0.0.0:15008".parse().expect("addr"),
            ipv4_compat: false
        }
    );
    // The admin code reads the raw listener through Deref.
    assert!(l.address.is_some());
    let chain = &l.filter_chains[0];
    let Some(TransportSocket::DownstreamTls(tls)) = &chain.transport_socket else {
        panic!("tls expected")
    };
    assert!(tls.require_client_certificate);
    assert_eq!(tls.common.alpn, ["h2"]);
    assert_eq!(tls.common.certificates[0].name, "default");
    let validation = tls.common.validation.as_ref().expect("validation");
    assert_eq!(validation.trust.as_ref().expect("rootca").name, "ROOTCA");
    assert!(
        validation.san_matchers[0]
            .matcher
            .matches("spiffe://cluster.local/ns/a/sa/b")
    );
    let NetworkFilterKind::HttpConnectionManager(hcm) = &chain.filters[0].kind else {
        panic!("hcm expected")
    };
    assert_eq!(hcm.http2.max_concurrent_streams, Some(100));
    assert!(hcm.http2.allow_connect);
    assert_eq!(hcm.http2.keepalive_interval, Some(Duration::from_secs(10)));
    assert_eq!(hcm.http2.keepalive_timeout, Some(Duration::from_secs(20)));
    assert_eq!(hcm.stream_idle_timeout, Some(Duration::ZERO));
    assert_eq!(hcm.server_name, "istio-envoy");
    assert_eq!(hcm.upgrades[0].upgrade_type, "CONNECT");
    assert!(matches!(
        hcm.http_filters[0].kind,
        HttpFilterKind::PeerMetadata(ref p) if p.shared_with_upstream
    ));
    let HttpFilterKind::SetFilterState(sfs) = &hcm.http_filters[1].kind else {
        panic!("sfs expected")
    };
    assert_eq!(sfs.values.len(), 5);
    assert_eq!(
        sfs.values[1].factory.as_deref(),
        Some("istio.hashable_string")
    );
    let Routes::Inline(routes) = &hcm.routes else {
        panic!("inline routes")
    };
    let route = &routes.virtual_hosts[0].routes[0];
    assert!(route.matcher.matches_path("10.96.0.100:8000", true));
    assert!(!route.matcher.matches_path("/", false));
}

#[test]
fn main_internal_matcher_selects_the_service_chain() {
    let snap = applied_store().snapshot();
    let l = &snap.listeners["main_internal"];
    assert_eq!(l.bind, Bind::Internal);
    let matcher = l.chain_matcher.as_ref().expect("matcher");
    let no_state = |_: &str| None;
    let info = |ip: &str, port: u16| ConnectionInfo {
        destination_ip: ip.parse::<IpAddr>().expect("ip"),
        destination_port: port,
        source_ip: "10.244.0.9".parse().expect("ip"),
        server_name: None,
        transport_protocol: "raw_buffer",
        application_protocols: &[],
        filter_state: &no_state,
    };
    assert_eq!(
        matcher.select(&info("10.96.0.100", 8000)),
        Some("inbound-vip|8000|http|httpbin.default.svc.cluster.local")
    );
    assert_eq!(matcher.select(&info("10.96.0.100", 9000)), None);
    assert_eq!(matcher.select(&info("10.96.0.101", 8000)), None);
    let inspector = &l.listener_filters[1];
    let disabled = inspector.disabled.as_ref().expect("filter_disabled");
    assert!(disabled.matches(8000));
    assert!(!disabled.matches(8001));
    let http = l
        .chain("inbound-vip|8000|http|httpbin.default.svc.cluster.local")
        .expect("chain");
    let NetworkFilterKind::HttpConnectionManager(hcm) = &http.filters[0].kind else {
        panic!("hcm")
    };
    let Routes::Inline(routes) = &hcm.routes else {
        panic!("inline")
    };
    let super::route::Action::Forward(fwd) = &routes.virtual_hosts[0].routes[0].action else {
        panic!("forward")
    };
    let retry = fwd.retry_policy.as_ref().expect("retry");
    assert_eq!(retry.num_retries, 2);
    assert!(retry.avoid_previous_hosts);
    assert_eq!(retry.host_selection_retry_max_attempts, 5);
    assert_eq!(fwd.timeout, Some(Duration::ZERO));
    let names: Vec<&str> = hcm.http_filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names.last(), Some(&"envoy.filters.http.router"));
    let direct_tcp = l.chain("direct-tcp").expect("direct-tcp");
    assert!(matches!(
        direct_tcp.filters[1].kind,
        NetworkFilterKind::MetadataExchange(_)
    ));
    let NetworkFilterKind::IstioStats(stats) = &direct_tcp.filters[2].kind else {
        panic!("stats")
    };
    assert!(stats.disable_host_header_fallback);
}

#[test]
fn clusters_and_endpoints_map_their_settings() {
    let snap = applied_store().snapshot();
    let co = &snap.clusters["connect_originate"];
    let Discovery::OriginalDst(od) = &co.discovery else {
        panic!("original dst")
    };
    assert_eq!(od.port_override, Some(15008));
    assert_eq!(
        od.metadata_key,
        Some((
            "envoy.filters.listener.original_dst".to_owned(),
            vec!["waypoint".to_owned()]
        ))
    );
    assert_eq!(co.lb_policy, LbPolicy::ClusterProvided);
    assert_eq!(co.connect_timeout, Duration::from_secs(10));
    assert_eq!(co.cleanup_interval, Some(Duration::from_secs(60)));
    let http = co.http.as_ref().expect("protocol options");
    assert_eq!(http.common.idle_timeout, Some(Duration::from_secs(3600)));
    assert!(matches!(&http.protocol, UpstreamProtocol::Http2(h2) if h2.allow_connect));
    assert!(matches!(
        co.transport_socket,
        Some(TransportSocket::UpstreamTls(_))
    ));
    assert_eq!(co.circuit_breakers.default.max_connections, u32::MAX);

    let main = &snap.clusters["main_internal"];
    let Discovery::Static(la) = &main.discovery else {
        panic!("static")
    };
    assert_eq!(
        la.endpoints().next().map(|e| &e.address),
        Some(&EndpointAddress::Internal {
            listener: "main_internal".into(),
            endpoint_id: None
        })
    );
    assert!(matches!(
        &main.http.as_ref().expect("opts").protocol,
        UpstreamProtocol::UseDownstream { http2: Some(_), .. }
    ));

    let vip = &snap.clusters["inbound-vip|8000|http|httpbin.default.svc.cluster.local"];
    assert_eq!(
        vip.eds_service_name(),
        Some("inbound-vip|8000|http|httpbin.default.svc.cluster.local")
    );
    assert_eq!(vip.lb_policy, LbPolicy::LeastRequest { choice_count: 2 });
    assert_eq!(vip.services[0].host, "httpbin.default.svc.cluster.local");
    let Some(TransportSocket::InternalUpstream { passthrough, inner }) = &vip.transport_socket
    else {
        panic!("internal upstream")
    };
    assert_eq!(passthrough.len(), 2);
    assert!(matches!(**inner, TransportSocket::RawBuffer));

    let cla = &snap.endpoints["inbound-vip|8000|http|httpbin.default.svc.cluster.local"];
    let ep = cla.endpoints().next().expect("endpoint");
    assert_eq!(
        ep.address,
        EndpointAddress::Internal {
            listener: "connect_originate".into(),
            endpoint_id: Some("10.244.1.5:8080".into())
        }
    );
    assert_eq!(
        ep.original_dst,
        Some("10.244.1.5:8080".parse().expect("addr"))
    );
    assert!(ep.health.is_healthy());
}

#[test]
fn lua_filter_is_rejected_with_its_path() {
    let mut l = named(ResourceKind::Listener, "connect_terminate");
    let filters = l["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
        .as_array_mut()
        .expect("http filters");
    filters.insert(
        2,
        json!({"name": "envoy.filters.http.lua", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": "function envoy_on_request(h) end"}
        }}),
    );
    let message = reject(ResourceKind::Listener, &l).expect("rejected");
    assert_eq!(
        message,
        "filter_chains[0].filters[0].typed_config.http_filters[2].typed_config: extension \
         type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua is not supported"
    );
}

#[test]
fn optional_unknown_http_filter_is_skipped() {
    let mut l = named(ResourceKind::Listener, "connect_terminate");
    l["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
        .as_array_mut()
        .expect("http filters")
        .insert(
            0,
            json!({"name": "lua", "is_optional": true, "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"}}),
        );
    assert_eq!(reject(ResourceKind::Listener, &l), None);
}

#[test]
fn unimplemented_fields_are_rejected_by_name() {
    let mut l = named(ResourceKind::Listener, "connect_terminate");
    l["enable_reuse_port"] = json!(true);
    assert_eq!(
        reject(ResourceKind::Listener, &l).as_deref(),
        Some(
            "enable_reuse_port: field 'enable_reuse_port' of envoy.config.listener.v3.Listener is not supported"
        )
    );
    let mut c = named(ResourceKind::Cluster, "main_internal");
    c["lrs_server"] = json!({"self": {}});
    assert_eq!(
        reject(ResourceKind::Cluster, &c).as_deref(),
        Some("lrs_server: field 'lrs_server' of envoy.config.cluster.v3.Cluster is not supported")
    );
    // Nested: a field of the HCM inside the typed_config.
    let mut l = named(ResourceKind::Listener, "connect_terminate");
    l["filter_chains"][0]["filters"][0]["typed_config"]["local_reply_config"] = json!({});
    let msg = reject(ResourceKind::Listener, &l).expect("rejected");
    assert!(
        msg.starts_with("filter_chains[0].filters[0].typed_config.local_reply_config: field 'local_reply_config' of envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"),
        "{msg}"
    );
}

#[test]
fn istio_stats_overrides_compile_and_unsupported_cel_is_refused() {
    use super::filters::{NetworkFilterKind, istio::StatsConfig};
    use crate::telemetry::{expr::Expr, istio::tag_index};
    let mut l = named(ResourceKind::Listener, "main_internal");
    let (chain, fi) = l["filter_chains"]
        .as_array()
        .and_then(|c| {
            c.iter().enumerate().find_map(|(i, c)| {
                c["filters"]
                    .as_array()?
                    .iter()
                    .position(|f| f["name"] == "istio.stats")
                    .map(|f| (i, f))
            })
        })
        .expect("a chain with the network istio.stats");
    l["filter_chains"][chain]["filters"][fi]["typed_config"]["metrics"] = json!([
        {"name": "tcp_connections_opened_total", "tags_to_remove": ["source_principal", "not_a_tag"],
         "dimensions": {"destination_port": "string(destination.port)", "source_workload": "'x'"}},
        {"name": "tcp_sent_bytes_total", "drop": true}
    ]);
    assert_eq!(reject(ResourceKind::Listener, &l), None);
    let store = ConfigStore::default();
    assert!(
        store
            .apply(
                ResourceKind::Listener,
                &[update(ResourceKind::Listener, &l)],
                &[]
            )
            .is_empty()
    );
    let snap = store.snapshot();
    let NetworkFilterKind::IstioStats(StatsConfig { plan, .. }) =
        &snap.listeners["main_internal"].filter_chains[chain].filters[fi].kind
    else {
        panic!("istio.stats")
    };
    let opened = crate::telemetry::istio::Metric::TcpOpened as usize;
    assert_eq!(
        plan.dimensions,
        vec![
            Expr::Destination(crate::telemetry::expr::AddrField::Port),
            Expr::Literal("x".into())
        ]
    );
    assert_eq!(
        plan.overrides[opened].get(&tag_index("source_principal").unwrap_or(99)),
        Some(&None)
    );
    assert_eq!(
        plan.overrides[opened].get(&tag_index("source_workload").unwrap_or(99)),
        Some(&Some(1))
    );
    assert_eq!(
        plan.additions[opened],
        vec![("destination_port".to_owned(), 0)]
    );
    assert!(plan.drop[crate::telemetry::istio::Metric::TcpSent as usize]);
    // A CEL form outside the supported attribute paths: NACK naming the dimension.
    l["filter_chains"][chain]["filters"][fi]["typed_config"]["metrics"] = json!([
        {"dimensions": {"x": "has(request.headers.x) ? 'a' : 'b'"}}]);
    let msg = reject(ResourceKind::Listener, &l).expect("refused");
    assert!(
        msg.contains("metrics[0]")
            && msg.contains("dimensions")
            && msg.contains("has(request.headers.x)"),
        "{msg}"
    );
    // An override of a metric that is neither standard nor defined changes nothing, as in
    // istio_stats; a defined custom metric takes its dimensions, and a value expression the
    // evaluator cannot compute is refused naming the definition.
    l["filter_chains"][chain]["filters"][fi]["typed_config"]["metrics"] = json!([
        {"name": "my_metric", "dimensions": {"a": "request.host"}}]);
    assert_eq!(reject(ResourceKind::Listener, &l), None);
    l["filter_chains"][chain]["filters"][fi]["typed_config"]["definitions"] = json!([
        {"name": "my_metric", "value": "1"},
        {"name": "my_sizes", "value": "response.total_size", "type": "HISTOGRAM"}]);
    // A named entry adds its dimensions to that metric (a standard tag too, as a label of its
    // own); an unnamed one adds to every custom metric; `tags_to_remove` and `drop` leave
    // custom metrics alone.
    l["filter_chains"][chain]["filters"][fi]["typed_config"]["metrics"] = json!([
        {"name": "my_metric", "dimensions": {"a": "request.host", "reporter": "'proxy'"},
         "tags_to_remove": ["a"]},
        {"name": "my_sizes", "drop": true},
        {"dimensions": {"z": "'all'"}}]);
    assert_eq!(reject(ResourceKind::Listener, &l), None);
    let store = ConfigStore::default();
    assert!(
        store
            .apply(
                ResourceKind::Listener,
                &[update(ResourceKind::Listener, &l)],
                &[]
            )
            .is_empty()
    );
    let snap = store.snapshot();
    let NetworkFilterKind::IstioStats(StatsConfig { plan, .. }) =
        &snap.listeners["main_internal"].filter_chains[chain].filters[fi].kind
    else {
        panic!("istio.stats")
    };
    let labels = |i: usize| -> Vec<(String, Expr)> {
        plan.custom[i]
            .labels
            .iter()
            .map(|(t, d)| (t.clone(), plan.dimensions[*d].clone()))
            .collect()
    };
    assert_eq!(plan.custom.len(), 2);
    assert_eq!(
        labels(0),
        [
            ("a".to_owned(), Expr::RequestHost),
            ("reporter".to_owned(), Expr::Literal("proxy".into())),
            ("z".to_owned(), Expr::Literal("all".into())),
        ]
    );
    assert_eq!(labels(1), [("z".to_owned(), Expr::Literal("all".into()))]);
    l["filter_chains"][chain]["filters"][fi]["typed_config"]["definitions"] = json!([
        {"name": "ok", "value": "1"},
        {"name": "latency", "value": "request.total_size * 2", "type": "HISTOGRAM"}]);
    let msg = reject(ResourceKind::Listener, &l).expect("refused");
    assert!(
        msg.contains("definitions[1].value") && msg.contains("'latency'"),
        "{msg}"
    );
}

#[test]
fn tracing_sampling_is_accepted_and_a_tracer_is_refused() {
    let mut l = named(ResourceKind::Listener, "connect_terminate");
    let hcm = &mut l["filter_chains"][0]["filters"][0]["typed_config"];
    // What istiod sends with no tracing provider: sampling settings and custom tags.
    hcm["tracing"] = json!({"client_sampling": {"value": 100}, "random_sampling": {"value": 1},
        "overall_sampling": {"value": 100},
        "custom_tags": [{"tag": "istio.mesh_id", "literal": {"value": "cluster.local"}}]});
    assert_eq!(reject(ResourceKind::Listener, &l), None);
    l["filter_chains"][0]["filters"][0]["typed_config"]["tracing"]["provider"] = json!({"name": "envoy.tracers.opentelemetry", "typed_config": {
        "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
        "service_name": "waypoint"}});
    let msg = reject(ResourceKind::Listener, &l).expect("a tracer is refused");
    assert!(
        msg.starts_with(
            "filter_chains[0].filters[0].typed_config.tracing.provider: field 'provider'"
        ),
        "{msg}"
    );
}

#[test]
fn unimplemented_enum_values_are_named() {
    let mut c = named(ResourceKind::Cluster, "main_internal");
    c["lb_policy"] = json!("LOAD_BALANCING_POLICY_CONFIG");
    let msg = reject(ResourceKind::Cluster, &c).expect("rejected");
    assert!(
        msg.starts_with(
            "lb_policy: value LOAD_BALANCING_POLICY_CONFIG of envoy.config.cluster.v3.Cluster.lb_policy is not supported"
        ),
        "{msg}"
    );
    let mut c = named(
        ResourceKind::Cluster,
        "inbound-vip|8000|http|httpbin.default.svc.cluster.local",
    );
    c["lb_policy"] = json!("CLUSTER_PROVIDED");
    let msg = reject(ResourceKind::Cluster, &c).expect("rejected");
    assert!(
        msg.starts_with("lb_policy: value CLUSTER_PROVIDED"),
        "{msg}"
    );
    let mut l = named(ResourceKind::Listener, "connect_terminate");
    l["filter_chains"][0]["filters"][0]["typed_config"]["codec_type"] = json!("HTTP3");
    let msg = reject(ResourceKind::Listener, &l).expect("rejected");
    assert!(msg.contains("value HTTP3 of"), "{msg}");
}

#[test]
fn semantic_errors_name_their_paths() {
    let cases: Vec<(ResourceKind, Json, &str)> = vec![
        (
            ResourceKind::Listener,
            json!({"name": "l", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 1}},
                   "filter_chains": [{"name": "a"}]}),
            "filter_chains[0].filters: a filter chain needs at least one filter",
        ),
        (
            ResourceKind::Listener,
            json!({"name": "l", "internal_listener": {}, "filter_chains": [{"filters": [{"name": "t", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": "s"}}]}]}),
            "filter_chains[0].filters[0].typed_config: tcp_proxy needs a cluster or weighted_clusters",
        ),
        (
            ResourceKind::Listener,
            json!({"name": "l", "internal_listener": {}, "filter_chains": [{"filters": [{"name": "h", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "s", "http_filters": [{"name": "r", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}),
            "filter_chains[0].filters[0].typed_config: an HTTP connection manager needs route_config or rds",
        ),
        (
            ResourceKind::Listener,
            json!({"name": "l", "internal_listener": {}, "filter_chains": [{"filters": [{"name": "h", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "s", "rds": {"route_config_name": "r", "config_source": {"api_config_source": {
                    "api_type": "GRPC", "transport_api_version": "V3",
                    "grpc_services": [{"envoy_grpc": {"cluster_name": "x"}}]}}},
                "http_filters": [{"name": "r", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}),
            "filter_chains[0].filters[0].typed_config.rds.config_source: RDS is supported over ADS only (config_source: {ads: {}})",
        ),
        (
            ResourceKind::Listener,
            json!({"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
                "filter_chains": [{"transport_socket": {"name": "tls", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "session_timeout": "10s",
                    "common_tls_context": {"tls_certificate_sds_secret_configs": [{"name": "default",
                        "sds_config": {"ads": {}}}]}}},
                "filters": [{"name": "t", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": "s", "cluster": "c"}}]}]}),
            "filter_chains[0].transport_socket.typed_config.session_timeout: rustls session lifetimes are not configurable",
        ),
        (
            ResourceKind::Listener,
            json!({"name": "l", "internal_listener": {}, "filter_chains": [
                {"name": "a", "filter_chain_match": {"destination_port": 1}, "filters": [{"name": "t", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": "s", "cluster": "c"}}]},
                {"name": "a", "filter_chain_match": {"destination_port": 2}, "filters": [{"name": "t", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": "s", "cluster": "c"}}]}]}),
            "filter_chains[1].name: duplicate filter chain name 'a' (also filter_chains[0])",
        ),
        (
            ResourceKind::Cluster,
            json!({"name": "c", "type": "EDS"}),
            "eds_cluster_config: an EDS cluster needs eds_cluster_config",
        ),
        (
            ResourceKind::Cluster,
            json!({"name": "c", "type": "EDS", "eds_cluster_config": {"service_name": "x"}}),
            "eds_cluster_config.eds_config: an EDS cluster needs eds_config",
        ),
        (
            ResourceKind::Cluster,
            json!({"name": "c", "type": "ORIGINAL_DST"}),
            "lb_policy: an ORIGINAL_DST cluster needs lb_policy CLUSTER_PROVIDED",
        ),
        (
            ResourceKind::Listener,
            json!({"name": "l", "internal_listener": {}, "filter_chains": [
                {"filter_chain_match": {"prefix_ranges": [{"address_prefix": "10.0.0.256", "prefix_len": 32}]},
                 "filters": [{"name": "t", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": "s", "cluster": "c"}}]}]}),
            "filter_chains[0].filter_chain_match.prefix_ranges[0].address_prefix: '10.0.0.256' is not an IP address",
        ),
    ];
    for (kind, doc, want) in cases {
        assert_eq!(reject(kind, &doc).as_deref(), Some(want), "{doc}");
    }
}

#[test]
fn bad_regex_and_bad_matcher_target_are_rejected() {
    let mut l = named(ResourceKind::Listener, "main_internal");
    l["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
        [0]["match"] = json!({"safe_regex": {"regex": "/api/(v1"}});
    let msg = reject(ResourceKind::Listener, &l).expect("rejected");
    assert!(
        msg.starts_with(
            "filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0].routes[0].match.safe_regex.regex: invalid regex '/api/(v1'"
        ),
        "{msg}"
    );
    let mut l = named(ResourceKind::Listener, "main_internal");
    l["filter_chains"][0]["name"] = json!("renamed");
    let msg = reject(ResourceKind::Listener, &l).expect("rejected");
    assert!(
        msg.contains("filter_chain_matcher.matcher_tree.custom_match.typed_config.range_matchers[0].on_match.matcher.matcher_tree.exact_match_map.map[\"8000\"].action.typed_config: no filter chain named"),
        "{msg}"
    );
}

#[test]
fn typed_struct_forms_are_checked() {
    // Istio 1.21 wrapped stats.PluginConfig in a TypedStruct.
    let mut l = named(ResourceKind::Listener, "main_internal");
    l["filter_chains"][1]["filters"][2]["typed_config"] = json!({
        "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
        "type_url": "type.googleapis.com/stats.PluginConfig",
        "value": {"reporter": "SERVER_GATEWAY", "disable_host_header_fallback": true}
    });
    assert_eq!(reject(ResourceKind::Listener, &l), None);
    // An unknown key in a struct-only Istio config.
    let mut l = named(ResourceKind::Listener, "connect_terminate");
    l["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]["typed_config"]["value"]
        ["istio_headers"] = json!({});
    assert_eq!(
        reject(ResourceKind::Listener, &l).as_deref(),
        Some(
            "filter_chains[0].filters[0].typed_config.http_filters[0].typed_config.value.istio_headers: field 'istio_headers' of io.istio.http.peer_metadata.Config is not supported"
        )
    );
    // A TypedStruct of a type we do not implement (the upstream half of baggage mode).
    let mut l = named(ResourceKind::Listener, "connect_terminate");
    l["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]["typed_config"] = json!({
        "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
        "type_url": "type.googleapis.com/io.istio.http.peer_metadata.UpstreamConfig",
        "value": {}
    });
    assert_eq!(
        reject(ResourceKind::Listener, &l).as_deref(),
        Some(
            "filter_chains[0].filters[0].typed_config.http_filters[0].typed_config: extension \
              type.googleapis.com/io.istio.http.peer_metadata.UpstreamConfig (in a TypedStruct) is not supported"
        )
    );
}

#[test]
fn a_bad_resource_is_rejected_alone_and_its_last_good_version_stays() {
    let store = applied_store();
    let mut bad = named(ResourceKind::Listener, "connect_terminate");
    bad["enable_reuse_port"] = json!(true);
    let mut good = named(ResourceKind::Listener, "connect_originate");
    good["filter_chains"][0]["filters"][0]["typed_config"]["stat_prefix"] = json!("v2");
    let errors = store.apply(
        ResourceKind::Listener,
        &[
            update(ResourceKind::Listener, &bad),
            update(ResourceKind::Listener, &good),
        ],
        &[],
    );
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].name, "connect_terminate");
    let snap = store.snapshot();
    assert!(
        snap.listeners["connect_terminate"]
            .raw
            .enable_reuse_port
            .is_none()
    );
    let NetworkFilterKind::TcpProxy(t) =
        &snap.listeners["connect_originate"].filter_chains[0].filters[0].kind
    else {
        panic!("tcp proxy")
    };
    assert_eq!(t.stat_prefix, "v2");
    // A name that differs from the delivered name is rejected too.
    let mut renamed = update(ResourceKind::Listener, &good);
    renamed.name = "other".into();
    let errors = store.apply(ResourceKind::Listener, &[renamed], &[]);
    assert_eq!(
        errors[0].message,
        "name: 'connect_originate' differs from the xDS resource name 'other'"
    );
}

#[test]
fn workloads_compile() {
    let store = ConfigStore::default();
    let w = json!({"uid": "Kubernetes//Pod/default/httpbin-1", "name": "httpbin-1", "namespace": "default",
                   "addresses": ["CvQBBQ=="], "service_account": "httpbin", "canonical_name": "httpbin",
                   "canonical_revision": "v1", "tunnel_protocol": "HBONE"});
    let errors = store.apply(
        ResourceKind::Workload,
        &[update(ResourceKind::Workload, &w)],
        &[],
    );
    assert!(errors.is_empty(), "{errors:?}");
    let snap = store.snapshot();
    let wl = &snap.workloads["Kubernetes//Pod/default/httpbin-1"];
    assert_eq!(wl.addresses, ["10.244.1.5".parse::<IpAddr>().expect("ip")]);
    assert!(wl.hbone);
    assert_eq!(wl.identity, "spiffe://cluster.local/ns/default/sa/httpbin");

    // Fields and enum values newer than our subset of workload.proto are tolerated: a waypoint
    // field (8, a message) and tunnel_protocol 2.
    let mut u = update(ResourceKind::Workload, &w);
    u.resource
        .value
        .extend_from_slice(&[0x42, 0x00, 0x28, 0x02]);
    let errors = store.apply(ResourceKind::Workload, &[u], &[]);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(!store.snapshot().workloads["Kubernetes//Pod/default/httpbin-1"].hbone);
}

#[test]
fn unknown_field_numbers_of_envoy_messages_are_rejected() {
    let mut u = update(
        ResourceKind::Cluster,
        &named(ResourceKind::Cluster, "main_internal"),
    );
    // Field 999 (varint) is not in our Cluster schema: a newer Envoy field we cannot honour.
    u.resource.value.extend_from_slice(&[0xb8, 0x3e, 0x01]);
    let errors = ConfigStore::default().apply(ResourceKind::Cluster, &[u], &[]);
    assert_eq!(
        errors[0].message,
        "field number 999 of envoy.config.cluster.v3.Cluster is not in this proxy's schema"
    );
}

#[test]
fn ambient_bootstrap_golden_validates() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/istio/bootstrap_ambient_golden.json"
    ))
    .expect("fixture");
    let b: waypoint_proto::envoy::config::bootstrap::v3::Bootstrap =
        pjson::from_json(&serde_json::from_str(&text).expect("json")).expect("bootstrap");
    let compiled = super::bootstrap::compile(&b).unwrap_or_else(|p| panic!("{p:#?}"));
    assert_eq!(compiled.listeners.len(), 2);
    assert_eq!(compiled.clusters.len(), 4);
    assert!(compiled.workload_discovery.is_some());
    assert_eq!(
        compiled.max_active_downstream_connections,
        Some(2_147_483_647)
    );
    let stats = &compiled.listeners[0];
    let NetworkFilterKind::HttpConnectionManager(hcm) = &stats.filter_chains[0].filters[0].kind
    else {
        panic!("hcm")
    };
    assert!(matches!(
        hcm.http_filters[0].kind,
        HttpFilterKind::Compressor(_)
    ));
    let xds = compiled
        .clusters
        .iter()
        .find(|c| c.name == "xds-grpc")
        .expect("xds");
    assert_eq!(xds.max_requests_per_connection, Some(1));
    assert_eq!(xds.circuit_breakers.high.max_requests, 100_000);
    assert_eq!(xds.tcp_keepalive.and_then(|k| k.time), Some(300));
}

#[test]
fn bootstrap_problems_carry_bootstrap_paths() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/istio/bootstrap_ambient_golden.json"
    ))
    .expect("fixture");
    let mut doc: Json = serde_json::from_str(&text).expect("json");
    doc["static_resources"]["listeners"][1]["enable_reuse_port"] = json!(true);
    // Every cluster type is implemented now; an lb_policy we do not implement stands in.
    doc["static_resources"]["clusters"][0]["lb_policy"] = json!("LOAD_BALANCING_POLICY_CONFIG");
    doc["watchdogs"] = json!({});
    let b: waypoint_proto::envoy::config::bootstrap::v3::Bootstrap =
        pjson::from_json(&doc).expect("bootstrap");
    let problems: Vec<String> = super::bootstrap::validate(&b)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        problems.contains(&"static_resources.listeners[1].enable_reuse_port: field 'enable_reuse_port' of envoy.config.listener.v3.Listener is not supported".to_owned()),
        "{problems:#?}"
    );
    assert!(
        problems.iter().any(|p| p.starts_with(
            "static_resources.clusters[0].lb_policy: value LOAD_BALANCING_POLICY_CONFIG"
        )),
        "{problems:#?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("watchdogs: field 'watchdogs'")),
        "{problems:#?}"
    );
}

#[test]
fn table_summary_is_reported() {
    let (messages, implemented, harmless, extensions) = super::supported::summary();
    println!(
        "supported table: {messages} messages, {implemented} implemented fields, {harmless} harmless fields, {extensions} extension types"
    );
    assert!(messages > 100 && implemented > 400 && harmless > 30 && extensions > 40);
}

const TCP_PROXY: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

fn sds(name: &str) -> Json {
    json!({"name": name, "sds_config": {"api_config_source": {"api_type": "GRPC",
        "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}],
        "set_node_on_first_message_only": true, "transport_api_version": "V3"},
        "resource_api_version": "V3"}})
}

fn action(chain: &str) -> Json {
    json!({"action": {"name": chain, "typed_config": {
        "@type": "type.googleapis.com/google.protobuf.StringValue", "value": chain}}})
}

/// A listener with what AuthorizationPolicy, RequestAuthentication, VirtualService and the
/// multi-network / auto-protocol matchers make istiod send.
fn policy_matcher() -> Json {
    let app_protocol = json!({"matcher": {"matcher_tree": {
        "input": {"name": "application-protocol", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.ApplicationProtocolInput"}},
        "exact_match_map": {"map": {"'h2c'": action("http"), "'http/1.1'": action("http")}}},
        "on_no_match": action("tcp")}});
    let ports = json!({"matcher": {"matcher_tree": {
        "input": {"name": "port", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.DestinationPortInput"}},
        "exact_match_map": {"map": {"9000": app_protocol}}}}});
    let ips = json!({"matcher": {"matcher_tree": {
        "input": {"name": "ip", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.DestinationIPInput"}},
        "custom_match": {"name": "ip", "typed_config": {
            "@type": "type.googleapis.com/xds.type.matcher.v3.IPMatcher",
            "range_matchers": [{"ranges": [{"address_prefix": "10.96.0.50", "prefix_len": 32}],
                "on_match": ports}]}}}}});
    json!({
        "matcher_tree": {
            "input": {"name": "authority", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.FilterStateInput",
                "key": "io.istio.connect_authority"}},
            "exact_match_map": {"map": {"reviews.default.svc.cluster.local:9000": action("tcp")}}
        },
        "on_no_match": ips
    })
}

fn policy_http_filters() -> Json {
    let jwt = json!({"name": "envoy.filters.http.jwt_authn", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                        "providers": {"origins-0": {"issuer": "testing@secure.istio.io",
                            "local_jwks": {"inline_string": "{\"keys\":[{\"kty\":\"RSA\",\"e\":\"AQAB\",\"n\":\"xyz\"}]}"},
                            "forward": true, "payload_in_metadata": "testing@secure.istio.io"}},
                        "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": [
                            {"provider_name": "origins-0"}, {"allow_missing": {}}]}}}],
                        "bypass_cors_preflight": true}});
    let rbac = json!({"name": "envoy.filters.http.rbac", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                        "rules": {"action": "DENY", "policies": {"ns[default]-policy[deny]-rule[0]": {
                            "permissions": [{"and_rules": {"rules": [{"or_rules": {"rules": [
                                {"url_path": {"path": {"prefix": "/admin"}}},
                                {"header": {"name": ":method", "string_match": {"exact": "DELETE"}}}]}}]}}],
                            "principals": [{"and_ids": {"ids": [{"or_ids": {"ids": [
                                {"filter_state": {"key": "io.istio.peer_principal",
                                    "string_match": {"exact": "spiffe://cluster.local/ns/default/sa/sleep"}}},
                                {"metadata": {"filter": "envoy.filters.http.jwt_authn",
                                    "path": [{"key": "testing@secure.istio.io"}, {"key": "sub"}],
                                    "value": {"string_match": {"exact": "alice"}}}},
                                {"remote_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}}]}}]}}]}}},
                        "shadow_rules_stat_prefix": "istio_dry_run_allow_"}});
    let rest = json!([{"name": "envoy.filters.http.local_ratelimit", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "http_local_rate_limiter",
            "token_bucket": {"max_tokens": 10, "tokens_per_fill": 10, "fill_interval": "60s"},
            "filter_enabled": {"runtime_key": "local_rate_limit_enabled",
                "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            "filter_enforced": {"runtime_key": "local_rate_limit_enforced",
                "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            "response_headers_to_add": [{"append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                "header": {"key": "x-local-rate-limit", "value": "true"}}]}},
        {"name": "envoy.filters.http.grpc_stats", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
            "emit_filter_state": true, "stats_for_all_methods": false}},
        {"name": "envoy.filters.http.fault", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}},
        {"name": "envoy.filters.http.cors", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}},
        {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
            "start_child_span": false, "suppress_envoy_headers": true}}
    ]);
    let mut all = vec![jwt, rbac];
    all.extend(rest.as_array().cloned().unwrap_or_default());
    Json::Array(all)
}

fn policy_routes() -> Json {
    let vs_route = json!({"name": "vs", "match": {"prefix": "/api", "case_sensitive": false,
                            "headers": [{"name": "x-user", "string_match": {"exact": "a"}}],
                            "query_parameters": [{"name": "debug", "present_match": true}]},
                         "route": {"weighted_clusters": {"clusters": [
                                {"name": "inbound-vip|9000|http|reviews.default.svc.cluster.local", "weight": 90},
                                {"name": "inbound-vip|9000|http/v2|reviews.default.svc.cluster.local", "weight": 10,
                                 "request_headers_to_add": [{"header": {"key": "x-canary", "value": "1"},
                                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]}]},
                            "timeout": "5s",
                            "retry_policy": {"retry_on": "5xx,connect-failure,retriable-status-codes",
                                "num_retries": 3, "per_try_timeout": "1s",
                                "retriable_status_codes": [503], "retry_back_off": {"base_interval": "0.1s"}},
                            "request_mirror_policies": [{"cluster": "outbound|9000||mirror.default.svc.cluster.local",
                                "runtime_fraction": {"default_value": {"numerator": 50}}, "trace_sampled": false}],
                            "hash_policy": [{"header": {"header_name": "x-user"}},
                                {"connection_properties": {"source_ip": true}}],
                            "prefix_rewrite": "/v2",
                            "host_rewrite_literal": "reviews.internal",
                            "upgrade_configs": [{"upgrade_type": "websocket"}],
                            "max_stream_duration": {"max_stream_duration": "0s", "grpc_timeout_header_max": "0s"}},
                         "request_headers_to_add": [{"header": {"key": "x-peer", "value": "%DOWNSTREAM_REMOTE_ADDRESS%"},
                            "append_action": "APPEND_IF_EXISTS_OR_ADD"}],
                         "response_headers_to_remove": ["x-internal"],
                         "decorator": {"operation": "reviews:9000/api*"},
                         "typed_per_filter_config": {
                            "envoy.filters.http.fault": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
                                "delay": {"fixed_delay": "1s", "percentage": {"numerator": 10}},
                                "abort": {"http_status": 503, "percentage": {"numerator": 5}}},
                            "envoy.filters.http.cors": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
                                "allow_origin_string_match": [{"exact": "https://a.example"}],
                                "allow_methods": "GET,POST", "max_age": "60",
                                "filter_enabled": {"default_value": {"numerator": 100}}}}});
    let others = json!([{"match": {"path": "/old"},
         "redirect": {"path_redirect": "/new", "response_code": "FOUND", "https_redirect": true}},
        {"match": {"safe_regex": {"regex": "/health.*"}},
         "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}
    ]);
    let mut routes = vec![vs_route];
    routes.extend(others.as_array().cloned().unwrap_or_default());
    json!({"name": "r", "validate_clusters": false, "virtual_hosts": [{
        "name": "inbound|http|9000", "domains": ["*"],
        "retry_policy": {"retry_on": "connect-failure", "num_retries": 1},
        "routes": routes}]})
}

/// A listener with what AuthorizationPolicy, RequestAuthentication, VirtualService and the
/// multi-network / auto-protocol matchers make istiod send.
fn policy_listener() -> Json {
    let hcm = json!({
        "@type": HCM,
        "stat_prefix": "inbound_0.0.0.0_9000;",
        "request_id_extension": {"typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
            "use_request_id_for_trace_sampling": true}},
        "tracing": {"random_sampling": {"value": 1}},
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": "/dev/stdout",
            "log_format": {"text_format_source": {"inline_string": "[%START_TIME%] %REQ(:METHOD)% %RESPONSE_CODE%\n"}}}}],
        "http_filters": policy_http_filters(),
        "route_config": policy_routes()
    });
    let tcp = json!([
        {"name": "envoy.filters.network.rbac", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
            "stat_prefix": "tcp.",
            "rules": {"policies": {"ns[default]-policy[allow]-rule[0]": {
                "permissions": [{"and_rules": {"rules": [{"or_rules": {"rules": [{"destination_port": 9000}]}}]}}],
                "principals": [{"and_ids": {"ids": [{"any": true}]}}]}}}}},
        {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
            "@type": TCP_PROXY, "stat_prefix": "tcp", "idle_timeout": "3600s",
            "weighted_clusters": {"clusters": [{"name": "a", "weight": 1}, {"name": "b", "weight": 3}]},
            "hash_policy": [{"source_ip": {}}]}}
    ]);
    json!({
        "name": "main_internal",
        "internal_listener": {},
        "listener_filters": [
            {"name": "envoy.filters.listener.original_dst", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}},
            {"name": "envoy.filters.listener.tls_inspector", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
                "initial_read_buffer_size": 512},
             "filter_disabled": {"or_match": {"rules": [
                {"destination_port_range": {"start": 8000, "end": 8001}},
                {"destination_port_range": {"start": 9000, "end": 9001}}]}}},
            {"name": "envoy.filters.listener.http_inspector", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"}}
        ],
        "filter_chain_matcher": policy_matcher(),
        "filter_chains": [
            {"name": "http", "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]},
            {"name": "tcp", "filters": tcp}
        ]
    })
}

#[test]
fn istio_policy_and_traffic_features_compile() {
    use super::{
        filters::{http::PerFilterConfig, rbac::Action as RbacAction},
        route::{Action, ClusterTarget, HashKind, RedirectPath},
    };
    let store = ConfigStore::default();
    let l = policy_listener();
    let errors = store.apply(
        ResourceKind::Listener,
        &[update(ResourceKind::Listener, &l)],
        &[],
    );
    // Mirroring, CORS policies and local rate limits run on the data path: all accepted.
    assert!(errors.is_empty(), "{errors:#?}");
    let raw: super::RawListener = waypoint_proto::json::from_json(&l).expect("decodes");
    let compiled = super::Listener::compile(raw, "").expect("compiles");
    let l = &compiled;

    let matcher = l.chain_matcher.as_ref().expect("matcher");
    let state = |k: &str| {
        (k == "io.istio.connect_authority")
            .then(|| "reviews.default.svc.cluster.local:9000".to_owned())
    };
    let none = |_: &str| None;
    let http11 = ["http/1.1".to_owned()];
    let mut info = ConnectionInfo {
        destination_ip: "10.96.0.50".parse().expect("ip"),
        destination_port: 9000,
        source_ip: "10.0.0.1".parse().expect("ip"),
        server_name: None,
        transport_protocol: "raw_buffer",
        application_protocols: &http11,
        filter_state: &state,
    };
    assert_eq!(
        matcher.select(&info),
        Some("tcp"),
        "filter state wins first"
    );
    info.filter_state = &none;
    assert_eq!(matcher.select(&info), Some("http"));
    info.application_protocols = &[];
    assert_eq!(
        matcher.select(&info),
        Some("tcp"),
        "no HTTP sniffed: on_no_match"
    );

    let NetworkFilterKind::HttpConnectionManager(hcm) =
        &l.chain("http").expect("chain").filters[0].kind
    else {
        panic!("hcm")
    };
    assert!(!hcm.pack_trace_reason || hcm.generate_request_id);
    assert_eq!(hcm.access_log.len(), 1);
    let HttpFilterKind::JwtAuthn(jwt) = &hcm.http_filters[0].kind else {
        panic!("jwt")
    };
    assert_eq!(jwt.providers["origins-0"].issuer, "testing@secure.istio.io");
    assert_eq!(
        jwt.providers["origins-0"].clock_skew,
        Duration::from_secs(60)
    );
    let HttpFilterKind::Rbac(rbac) = &hcm.http_filters[1].kind else {
        panic!("rbac")
    };
    let rules = rbac.rules.as_ref().expect("rules");
    assert_eq!(rules.action, RbacAction::Deny);
    assert_eq!(rules.policies[0].name, "ns[default]-policy[deny]-rule[0]");
    let HttpFilterKind::LocalRateLimit(rl) = &hcm.http_filters[2].kind else {
        panic!("local rate limit")
    };
    assert_eq!(rl.bucket.map(|b| b.max_tokens), Some(10));
    assert_eq!((rl.enabled.numerator, rl.enforced.numerator), (100, 100));
    assert_eq!(rl.response_headers.add[0].name, "x-local-rate-limit");
    assert!(matches!(hcm.http_filters[5].kind, HttpFilterKind::Cors));
    let HttpFilterKind::Router(router) = &hcm.http_filters[6].kind else {
        panic!("router")
    };
    assert!(router.suppress_envoy_headers);

    let Routes::Inline(rc) = &hcm.routes else {
        panic!("inline")
    };
    let vh = rc
        .virtual_host("reviews.default.svc.cluster.local")
        .expect("vhost");
    assert_eq!(vh.retry_policy.as_ref().map(|r| r.num_retries), Some(1));
    let r0 = &vh.routes[0];
    assert!(
        r0.matcher.matches_path("/API/v1?x=1", false),
        "case-insensitive prefix"
    );
    let Action::Forward(fwd) = &r0.action else {
        panic!("forward")
    };
    let ClusterTarget::Weighted { clusters, .. } = &fwd.target else {
        panic!("weighted")
    };
    assert_eq!(clusters.iter().map(|c| c.weight).sum::<u32>(), 100);
    assert_eq!(clusters[1].headers.request.add[0].name, "x-canary");
    assert_eq!(fwd.timeout, Some(Duration::from_secs(5)));
    let retry = fwd.retry_policy.as_ref().expect("retry");
    assert_eq!(
        retry.retry_on,
        ["5xx", "connect-failure", "retriable-status-codes"]
    );
    assert_eq!(
        retry.back_off,
        (Duration::from_millis(100), Duration::from_secs(1))
    );
    assert_eq!(fwd.mirrors[0].fraction.numerator, 50);
    assert!(matches!(fwd.hash_policy[1].kind, HashKind::SourceIp));
    assert_eq!(fwd.prefix_rewrite.as_deref(), Some("/v2"));
    assert!(matches!(
        r0.per_filter["envoy.filters.http.fault"],
        PerFilterConfig::Fault(_)
    ));
    let PerFilterConfig::Cors(cors) = &r0.per_filter["envoy.filters.http.cors"] else {
        panic!("cors policy")
    };
    assert_eq!(
        (cors.allow_origins.len(), cors.allow_methods.as_str()),
        (1, "GET,POST")
    );
    assert_eq!(r0.headers.response.remove, ["x-internal"]);
    let Action::Redirect(rd) = &vh.routes[1].action else {
        panic!("redirect")
    };
    assert_eq!((rd.status, rd.scheme.as_deref()), (302, Some("https")));
    assert!(matches!(&rd.path, RedirectPath::Path(p) if p == "/new"));
    let Action::DirectResponse(dr) = &vh.routes[2].action else {
        panic!("direct response")
    };
    assert_eq!((dr.status, dr.body.as_deref()), (200, Some("ok")));
    assert!(vh.routes[2].matcher.matches_path("/healthz", false));

    let tcp = l.chain("tcp").expect("tcp");
    let NetworkFilterKind::Rbac(net_rbac) = &tcp.filters[0].kind else {
        panic!("network rbac")
    };
    assert_eq!(
        net_rbac.rules.as_ref().map(|r| r.action),
        Some(RbacAction::Allow)
    );
}

#[test]
fn unimplemented_mirror_and_rate_limit_fields_are_refused_by_name() {
    let hcm_path = "filter_chains[0].filters[0].typed_config";
    // Local rate limit descriptors and route-driven `rate_limits` are not implemented.
    for (field, value) in [
        (
            "descriptors",
            json!([{"entries": [{"key": "k", "value": "v"}],
                "token_bucket": {"max_tokens": 1, "fill_interval": "1s"}}]),
        ),
        (
            "rate_limits",
            json!([{"actions": [{"remote_address": {}}]}]),
        ),
    ] {
        let mut l = policy_listener();
        l["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][2]["typed_config"]
            [field] = value;
        let msg = reject(ResourceKind::Listener, &l).expect("rejected");
        assert!(
            msg.starts_with(&format!(
                "{hcm_path}.http_filters[2].typed_config.{field}: field '{field}' of \
                 envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit is not supported"
            )),
            "{msg}"
        );
    }
    // Mirror header mutations are not implemented.
    let mut l = policy_listener();
    l["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
        [0]["route"]["request_mirror_policies"][0]["request_headers_mutations"] =
        json!([{"remove": "x-a"}]);
    let msg = reject(ResourceKind::Listener, &l).expect("rejected");
    assert!(
        msg.contains("request_mirror_policies[0].request_headers_mutations: field 'request_headers_mutations'"),
        "{msg}"
    );
    // A per-route local rate limit needs its own bucket (Envoy refuses it otherwise).
    let mut l = policy_listener();
    l["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
        [0]["typed_per_filter_config"]["envoy.filters.http.local_ratelimit"] = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": "route"});
    let msg = reject(ResourceKind::Listener, &l).expect("rejected");
    assert!(msg.contains("token_bucket"), "{msg}");
}

#[test]
fn destination_rule_cluster_compiles() {
    let c = json!({
        "name": "outbound|80||reviews.default.svc.cluster.local",
        "type": "EDS",
        "eds_cluster_config": {"service_name": "outbound|80||reviews.default.svc.cluster.local",
            "eds_config": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}},
        "connect_timeout": "10s",
        "lb_policy": "RING_HASH",
        "ring_hash_lb_config": {"minimum_ring_size": "2048"},
        "circuit_breakers": {"thresholds": [{"max_connections": 100, "max_pending_requests": 10,
            "max_requests": 1000, "max_retries": 3, "track_remaining": true,
            "retry_budget": {"budget_percent": {"value": 25}, "min_retry_concurrency": 5}}]},
        "outlier_detection": {"consecutive_5xx": 5, "interval": "10s", "base_ejection_time": "30s",
            "max_ejection_percent": 50, "enforcing_consecutive_5xx": 100, "enforcing_success_rate": 0,
            "consecutive_gateway_failure": 5, "enforcing_consecutive_gateway_failure": 0},
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}, "locality_weighted_lb_config": {}},
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": "reviews.example",
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "tls_certificate_sds_secret_configs": [sds("file-cert:/certs/cert.pem~/certs/key.pem")],
                "combined_validation_context": {
                    "default_validation_context": {"match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": "reviews.example"}}]},
                    "validation_context_sds_secret_config": sds("file-root:/certs/ca.pem")}}}},
        "upstream_connection_options": {"tcp_keepalive": {"keepalive_time": 300}},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"max_requests_per_connection": 1, "idle_timeout": "3600s"},
            "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": 1073741824}}}},
        "metadata": {"filter_metadata": {"istio": {"services": [{"host": "reviews.default.svc.cluster.local",
            "name": "reviews", "namespace": "default"}], "config": "/apis/networking.istio.io/v1/namespaces/default/destination-rule/reviews"}}}
    });
    // The DestinationRule's outlier detection is accepted and enforced.
    let store = ConfigStore::default();
    let errors = store.apply(
        ResourceKind::Cluster,
        &[update(ResourceKind::Cluster, &c)],
        &[],
    );
    assert!(errors.is_empty(), "{errors:#?}");
    let snap = store.snapshot();
    let c = &snap.clusters["outbound|80||reviews.default.svc.cluster.local"];
    assert_eq!(
        c.lb_policy,
        LbPolicy::RingHash {
            min_ring_size: 2048,
            max_ring_size: 8 * 1024 * 1024
        }
    );
    assert_eq!(c.circuit_breakers.default.max_pending_requests, 10);
    assert_eq!(c.circuit_breakers.default.retry_budget, Some((25.0, 5)));
    assert_eq!(
        c.circuit_breakers.high.max_connections, 1024,
        "HIGH keeps Envoy's default"
    );
    let od = c
        .outlier_detection
        .as_ref()
        .expect("outlier detection compiled");
    assert_eq!(od.base_ejection_time, Some(Duration::from_secs(30)));
    assert_eq!(od.enforcing_success_rate, Some(0));
    assert_eq!(c.common_lb.healthy_panic_threshold, Some(0.0));
    assert!(c.common_lb.locality_weighted);
    let Some(TransportSocket::UpstreamTls(tls)) = &c.transport_socket else {
        panic!("tls")
    };
    assert_eq!(tls.sni.as_deref(), Some("reviews.example"));
    assert_eq!(tls.common.min_version, super::tls::TlsVersion::Tls12);
    let http = c.http.as_ref().expect("http");
    assert_eq!(http.common.max_requests_per_connection, Some(1));
    assert!(
        matches!(&http.protocol, UpstreamProtocol::Http2(h2) if h2.max_concurrent_streams == Some(1_073_741_824))
    );

    // Maglev needs a prime table size.
    let mut m = json!({"name": "m", "type": "STATIC", "lb_policy": "MAGLEV", "maglev_lb_config": {"table_size": "65536"}});
    assert_eq!(
        reject(ResourceKind::Cluster, &m).as_deref(),
        Some("maglev_lb_config.table_size: 65536 must be a prime no larger than 5000011")
    );
    m["maglev_lb_config"]["table_size"] = json!("65537");
    assert_eq!(reject(ResourceKind::Cluster, &m), None);
    // An lb config that does not fit the policy.
    let r = json!({"name": "r", "type": "STATIC", "lb_policy": "ROUND_ROBIN", "ring_hash_lb_config": {}});
    assert_eq!(
        reject(ResourceKind::Cluster, &r).as_deref(),
        Some("ring_hash_lb_config: ring_hash_lb_config does not apply to lb_policy ROUND_ROBIN")
    );
}

#[test]
fn rbac_claims_or_match_is_accepted() {
    // istiod's translation of `request.auth.claims[groups]: [admin]` (or_match of string and list).
    let value = json!({"or_match": {"value_matchers": [
        {"string_match": {"exact": "admin"}},
        {"list_match": {"one_of": {"string_match": {"exact": "admin"}}}}]}});
    let principal = json!({"metadata": {"filter": "envoy.filters.http.jwt_authn",
        "path": [{"key": "payload"}, {"key": "groups"}], "value": value}});
    let rbac = json!({"name": "envoy.filters.http.rbac", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
        "rules": {"action": "ALLOW", "policies": {"claims": {
            "permissions": [{"any": true}], "principals": [principal]}}}}});
    let router = json!({"name": "r", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}});
    let hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "s", "route_config": {"name": "r"}, "http_filters": [rbac, router]});
    let l = json!({"name": "l", "internal_listener": {},
        "filter_chains": [{"filters": [{"name": "h", "typed_config": hcm}]}]});
    let store = ConfigStore::default();
    let errors = store.apply(
        ResourceKind::Listener,
        &[update(ResourceKind::Listener, &l)],
        &[],
    );
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn timeout_fields_we_cannot_apply_are_refused_and_envoys_unimplemented_ones_ignored() {
    // drain_timeout / delayed_close_timeout: not applied by our codecs, so refused by name.
    for field in ["drain_timeout", "delayed_close_timeout"] {
        let mut l = named(ResourceKind::Listener, "connect_terminate");
        l["filter_chains"][0]["filters"][0]["typed_config"][field] = json!("5s");
        let msg = reject(ResourceKind::Listener, &l).expect("rejected");
        assert!(
            msg.starts_with(&format!(
                "filter_chains[0].filters[0].typed_config.{field}: field '{field}'"
            )),
            "{msg}"
        );
    }
    // Keepalive jitter cannot be given to hyper's PINGs.
    let mut l = named(ResourceKind::Listener, "connect_terminate");
    l["filter_chains"][0]["filters"][0]["typed_config"]["http2_protocol_options"]["connection_keepalive"]
        ["interval_jitter"] = json!({"value": 5});
    let msg = reject(ResourceKind::Listener, &l).expect("rejected");
    assert!(
        msg.contains("connection_keepalive.interval_jitter"),
        "{msg}"
    );
    // tcp_proxy's downstream/upstream_idle_timeout are [#not-implemented-hide:] in Envoy:
    // accepted and ignored, as Envoy does.
    let mut l = named(ResourceKind::Listener, "main_internal");
    let chains = l["filter_chains"].as_array_mut().expect("chains");
    let chain = chains
        .iter_mut()
        .find(|c| c["name"] == "direct-tcp")
        .expect("direct-tcp chain");
    let tcp = chain["filters"]
        .as_array_mut()
        .expect("filters")
        .iter_mut()
        .find(|f| f["name"] == "envoy.filters.network.tcp_proxy")
        .expect("tcp_proxy");
    tcp["typed_config"]["downstream_idle_timeout"] = json!("10s");
    tcp["typed_config"]["upstream_idle_timeout"] = json!("10s");
    tcp["typed_config"]["idle_timeout"] = json!("0s");
    tcp["typed_config"]["max_downstream_connection_duration"] = json!("60s");
    assert_eq!(reject(ResourceKind::Listener, &l), None);
}

#[test]
fn route_max_stream_duration_presence_is_kept() {
    use crate::config::route::Action;
    let mut l = named(ResourceKind::Listener, "connect_terminate");
    let route = &mut l["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"]
        [0]["routes"][0]["route"];
    route["max_stream_duration"] = json!({});
    route["idle_timeout"] = json!("0s");
    route["retry_policy"] = json!({"retry_on": "5xx", "per_try_idle_timeout": "2s"});
    let store = ConfigStore::default();
    assert!(
        store
            .apply(
                ResourceKind::Listener,
                &[update(ResourceKind::Listener, &l)],
                &[]
            )
            .is_empty()
    );
    let snap = store.snapshot();
    let chain = &snap.listeners["connect_terminate"].filter_chains[0];
    let NetworkFilterKind::HttpConnectionManager(hcm) = &chain.filters[0].kind else {
        panic!("hcm expected")
    };
    let crate::config::filters::hcm::Routes::Inline(rc) = &hcm.routes else {
        panic!("inline routes");
    };
    let Action::Forward(fwd) = &rc.virtual_hosts[0].routes[0].action else {
        panic!("forward");
    };
    assert!(
        fwd.max_stream_duration.present,
        "an empty message still counts"
    );
    assert_eq!(fwd.max_stream_duration.max, None);
    assert_eq!(fwd.idle_timeout, Some(Duration::ZERO));
    assert_eq!(
        fwd.retry_policy
            .as_ref()
            .and_then(|p| p.per_try_idle_timeout),
        Some(Duration::from_secs(2))
    );
}

/// A listener whose HCM has `rbac_rules` as its RBAC filter's rules and `route` as its one route.
fn hcm_listener(rbac_rules: Json, route: Json) -> Json {
    let rbac = json!({"name": "envoy.filters.http.rbac", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
        "rules": rbac_rules}});
    let router = json!({"name": "r", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}});
    let hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "s",
        "route_config": {"name": "r", "virtual_hosts": [{"name": "v", "domains": ["*"],
            "routes": [route]}]},
        "http_filters": [rbac, router]});
    json!({"name": "l", "internal_listener": {},
        "filter_chains": [{"filters": [{"name": "h", "typed_config": hcm}]}]})
}

#[test]
fn uri_template_permissions_and_cookie_attributes_are_accepted_and_bad_ones_named() {
    let template = |t: &str| {
        json!({"action": "ALLOW", "policies": {"p": {
            "permissions": [{"uri_template": {"name": "uri-template", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig",
                "path_template": t}}}],
            "principals": [{"any": true}]}}})
    };
    let route = |cookie: Json| {
        json!({"match": {"prefix": "/"}, "route": {"cluster": "c",
            "hash_policy": [{"cookie": cookie}]}})
    };
    let good_cookie = json!({"name": "sticky", "ttl": "60s", "path": "/",
        "attributes": [{"name": "SameSite", "value": "Lax"}, {"name": "Secure"}]});
    let l = hcm_listener(template("/api/*/items/**"), route(good_cookie.clone()));
    assert_eq!(reject(ResourceKind::Listener, &l), None);
    let l = hcm_listener(template("/api/**/*"), route(good_cookie));
    let msg = reject(ResourceKind::Listener, &l).expect("rejected");
    assert!(
        msg.contains("permissions[0].uri_template.typed_config.path_template: path template"),
        "{msg}"
    );
    let bad_cookie = json!({"name": "sticky", "ttl": "1s", "attributes": [{"value": "x"}]});
    let l = hcm_listener(template("/x"), route(bad_cookie));
    let msg = reject(ResourceKind::Listener, &l).expect("rejected");
    assert!(
        msg.contains("hash_policy[0].cookie.attributes[0].name: name is required"),
        "{msg}"
    );
}
