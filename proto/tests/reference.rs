//! The reference Istio files (copied from ../shared/reference/istio into tests/fixtures/istio) parse
//! into their Envoy types with every nested Any decoded, and survive a JSON round trip.

use waypoint_proto::envoy::config::bootstrap::v3::Bootstrap;
use waypoint_proto::json::{self, JsonError};
use waypoint_proto::resource::ResourceKind;

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/../tests/fixtures/istio/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// Counts `"@type"` keys in a JSON value: how many Anys the document spells out.
fn count_type_keys(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Object(m) => m
            .iter()
            .map(|(k, v)| usize::from(k == "@type") + count_type_keys(v))
            .sum(),
        serde_json::Value::Array(a) => a.iter().map(count_type_keys).sum(),
        _ => 0,
    }
}

/// Parses `doc` as `type_name`, decodes every Any (TypedStruct values too), round-trips through
/// JSON and returns how many Anys were visited.
fn check_document(type_name: &str, doc: &serde_json::Value) -> Result<usize, JsonError> {
    let msg = json::dynamic_from_json(type_name, doc)?;
    let mut anys = 0;
    json::visit_anys(&msg, &mut |_, _| anys += 1)?;
    let written = json::dynamic_to_json(&msg)?;
    let reread = json::dynamic_from_json(type_name, &written)?;
    let rewritten = json::dynamic_to_json(&reread)?;
    assert_eq!(
        written, rewritten,
        "{type_name} changes across a JSON round trip"
    );
    Ok(anys)
}

#[test]
fn ambient_bootstrap_parses_into_bootstrap() {
    let doc: serde_json::Value =
        serde_json::from_str(&fixture("bootstrap_ambient_golden.json")).expect("json");
    let anys =
        check_document("envoy.config.bootstrap.v3.Bootstrap", &doc).expect("bootstrap parses");
    // Every spelled-out Any is decoded, plus the two TypedStruct payloads of known types.
    assert!(
        anys >= count_type_keys(&doc),
        "visited {anys} Anys, document has {}",
        count_type_keys(&doc)
    );
    let bootstrap: Bootstrap = json::from_json(&doc).expect("typed bootstrap");
    let node = bootstrap.node.expect("node");
    assert!(!node.id.is_empty());
    let ads = bootstrap
        .dynamic_resources
        .and_then(|d| d.ads_config)
        .expect("ads_config");
    assert_eq!(ads.api_type, 3, "DELTA_GRPC");
    let names: Vec<_> = bootstrap
        .static_resources
        .expect("static")
        .clusters
        .into_iter()
        .map(|c| c.name)
        .collect();
    for want in ["prometheus_stats", "agent", "sds-grpc", "xds-grpc"] {
        assert!(
            names.iter().any(|n| n == want),
            "missing static cluster {want}: {names:?}"
        );
    }
}

#[test]
fn every_reference_waypoint_resource_parses() {
    let doc =
        json::yaml_to_json(&fixture("waypoint_xds_reconstructed_example.yaml")).expect("yaml");
    let mut resources = 0;
    let mut anys = 0;
    let mut spelled = 0;
    for (key, list) in doc.as_object().expect("top-level map") {
        let kind =
            ResourceKind::from_file_key(key).unwrap_or_else(|| panic!("unexpected key {key}"));
        for item in list.as_array().expect("list") {
            let name = kind.name_in_json(item).expect("named resource");
            anys += check_document(kind.message_name(), item)
                .unwrap_or_else(|e| panic!("{key} {name}: {e}"));
            spelled += count_type_keys(item);
            resources += 1;
        }
    }
    assert_eq!(resources, 3 + 4 + 1, "3 listeners, 4 clusters, 1 endpoint");
    // TypedStructs of Istio-only types are accepted as Structs and not counted twice.
    assert!(
        anys >= spelled,
        "visited {anys} Anys, fixture spells {spelled}"
    );
}

#[test]
fn typed_resources_decode_into_envoy_types() {
    use waypoint_proto::envoy::config::{cluster::v3::Cluster, listener::v3::Listener};
    let doc =
        json::yaml_to_json(&fixture("waypoint_xds_reconstructed_example.yaml")).expect("yaml");
    let listeners: Vec<Listener> = doc["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .map(|l| json::from_json(l).expect("listener"))
        .collect();
    let names: Vec<_> = listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(
        names,
        ["connect_terminate", "main_internal", "connect_originate"]
    );
    let clusters: Vec<Cluster> = doc["clusters"]
        .as_array()
        .expect("clusters")
        .iter()
        .map(|c| json::from_json(c).expect("cluster"))
        .collect();
    let originate = clusters
        .iter()
        .find(|c| c.name == "connect_originate")
        .expect("connect_originate");
    use waypoint_proto::envoy::config::cluster::v3::cluster::LbConfig;
    let port = match &originate.lb_config {
        Some(LbConfig::OriginalDstLbConfig(c)) => c.upstream_port_override.map(|p| p.value),
        _ => None,
    };
    assert_eq!(port, Some(15008));
}

#[test]
fn unknown_type_in_a_listener_is_named_by_path() {
    let doc = serde_json::json!({
        "name": "l",
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "x",
            "http_filters": [{"name": "istio.stats", "typed_config": {
                "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                "type_url": "type.googleapis.com/made.up.Config", "value": {}}}]
        }}]}]
    });
    let err =
        check_document("envoy.config.listener.v3.Listener", &doc).expect_err("unknown inner type");
    assert_eq!(
        err.to_string(),
        "filter_chains[0].filters[0].typed_config.http_filters[0].typed_config: TypedStruct names unknown type_url 'type.googleapis.com/made.up.Config'"
    );
}
