//! Turning Envoy v3 JSON into the xDS updates the ADS client hands to the config store, as the
//! compiler's own tests do (`proxy/src/config/tests.rs`).

use proxy::config::{ConfigStore, Update};
use serde_json::Value as Json;
use waypoint_proto::{json as pjson, resource::ResourceKind};

/// istiod's reference waypoint snapshot
/// (`tests/fixtures/istio/waypoint_xds_reconstructed_example.yaml`) as proto3-JSON, the template
/// the generated resources are cut from.
pub fn reference_snapshot() -> Json {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/istio/waypoint_xds_reconstructed_example.yaml"
    ))
    .expect("reference waypoint fixture");
    pjson::yaml_to_json(&text).expect("fixture is YAML")
}

/// The resource of `kind` named `name` in the reference snapshot.
pub fn reference(kind: ResourceKind, name: &str) -> Json {
    reference_snapshot()[kind.file_key()]
        .as_array()
        .expect("resource list")
        .iter()
        .find(|r| kind.name_in_json(r) == Some(name))
        .cloned()
        .expect("resource in the reference snapshot")
}

/// `doc` encoded as the `Any` an xDS response carries.
pub fn update(kind: ResourceKind, doc: &Json) -> Update {
    Update {
        name: kind.name_in_json(doc).expect("named resource").to_owned(),
        version: "1".into(),
        resource: pjson::any_from_json(kind.type_url(), doc).expect("resource encodes"),
    }
}

/// A store holding `docs`, every one of them accepted.
pub fn applied(kind: ResourceKind, docs: &[Json]) -> ConfigStore {
    let store = ConfigStore::default();
    let updates: Vec<Update> = docs.iter().map(|d| update(kind, d)).collect();
    let errors = store.apply(kind, &updates, &[]);
    assert!(errors.is_empty(), "{kind:?} NACKed: {errors:#?}");
    store
}
