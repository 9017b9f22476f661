//! `/config_dump` in Envoy's `envoy.admin.v3.ConfigDump` shape: built from the admin protos and
//! written with the proto3-JSON writer, so `istioctl proxy-config` and `xds-protos` read it.
//! Supports `?resource=<repeated field>`, `?mask=<comma-separated paths>` and `?include_eds`.

use std::time::SystemTime;

use serde_json::Value as Json;
use waypoint_proto::{
    envoy::admin::v3::{
        BootstrapConfigDump, ClientResourceStatus, ClustersConfigDump, ConfigDump,
        EndpointsConfigDump, ListenersConfigDump, UpdateFailureState,
        clusters_config_dump::{DynamicCluster, StaticCluster},
        endpoints_config_dump::DynamicEndpointConfig,
        listeners_config_dump::{DynamicListener, DynamicListenerState, StaticListener},
    },
    google::protobuf::{Any, Timestamp},
    json::{self, JsonError},
    resource::ResourceKind,
};

use crate::server::Server;

fn pack<M: prost::Message + prost::Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

fn ts(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn failure(
    err: &Option<(String, String, SystemTime)>,
    resource: Option<&Any>,
) -> Option<UpdateFailureState> {
    err.as_ref()
        .map(|(details, version, when)| UpdateFailureState {
            failed_configuration: resource.cloned(),
            last_update_attempt: Some(ts(*when)),
            details: details.clone(),
            version_info: version.clone(),
        })
}

/// The full dump as a proto.
pub fn build(server: &Server, include_eds: bool) -> ConfigDump {
    let started = ts(server.started_at);
    let boot = &server.bootstrap.bootstrap;
    let mut configs = vec![pack(&BootstrapConfigDump {
        bootstrap: Some(boot.clone()),
        last_updated: Some(started),
    })];

    let cds = server.xds.record(ResourceKind::Cluster);
    let statics = boot.static_resources.clone().unwrap_or_default();
    configs.push(pack(&ClustersConfigDump {
        version_info: cds.version_info.clone(),
        static_clusters: statics
            .clusters
            .iter()
            .map(|c| StaticCluster {
                cluster: Some(pack(c)),
                last_updated: Some(started),
            })
            .collect(),
        dynamic_active_clusters: cds
            .resources
            .iter()
            .filter_map(|(name, e)| {
                e.resource
                    .as_ref()
                    .map(|r| DynamicCluster {
                        version_info: e.version.clone(),
                        cluster: Some(r.clone()),
                        last_updated: Some(ts(e.last_updated)),
                        error_state: failure(&e.error, None),
                        client_status: ClientResourceStatus::Acked as i32,
                    })
                    .or_else(|| {
                        tracing::trace!(%name, "cluster only ever rejected");
                        None
                    })
            })
            .collect(),
        dynamic_warming_clusters: vec![],
    }));

    let lds = server.xds.record(ResourceKind::Listener);
    configs.push(pack(&ListenersConfigDump {
        version_info: lds.version_info.clone(),
        static_listeners: statics
            .listeners
            .iter()
            .map(|l| StaticListener {
                listener: Some(pack(l)),
                last_updated: Some(started),
            })
            .collect(),
        dynamic_listeners: lds
            .resources
            .iter()
            .map(|(name, e)| DynamicListener {
                name: name.clone(),
                active_state: e.resource.as_ref().map(|r| DynamicListenerState {
                    version_info: e.version.clone(),
                    listener: Some(r.clone()),
                    last_updated: Some(ts(e.last_updated)),
                }),
                error_state: failure(&e.error, None),
                client_status: if e.error.is_some() {
                    ClientResourceStatus::Nacked
                } else {
                    ClientResourceStatus::Acked
                } as i32,
                ..Default::default()
            })
            .collect(),
    }));

    if include_eds {
        let eds = server.xds.record(ResourceKind::Endpoint);
        configs.push(pack(&EndpointsConfigDump {
            static_endpoint_configs: vec![],
            dynamic_endpoint_configs: eds
                .resources
                .values()
                .filter_map(|e| {
                    e.resource.as_ref().map(|r| DynamicEndpointConfig {
                        version_info: e.version.clone(),
                        endpoint_config: Some(r.clone()),
                        last_updated: Some(ts(e.last_updated)),
                        ..Default::default()
                    })
                })
                .collect(),
        }));
    }
    ConfigDump { configs }
}

/// The dump as JSON, filtered by `resource` and `mask` as Envoy does.
pub fn render(
    server: &Server,
    resource: Option<&str>,
    mask: Option<&str>,
    include_eds: bool,
) -> Result<Json, JsonError> {
    let dump = build(server, include_eds);
    let mut configs = Vec::new();
    for any in &dump.configs {
        let value = json::any_to_json(any)?;
        match resource {
            None => configs.push(value),
            Some(field) => {
                let desc = json::message_descriptor(&any.type_url)?;
                let Some(f) = desc.get_field_by_name(field) else {
                    continue;
                };
                let item_type = match f.kind() {
                    prost_reflect::Kind::Message(m) => m.full_name().to_owned(),
                    _ => continue,
                };
                if let Some(Json::Array(items)) = value.get(field) {
                    for item in items {
                        let mut obj = serde_json::Map::new();
                        obj.insert(
                            "@type".to_owned(),
                            Json::String(format!("{}{item_type}", json::TYPE_URL_PREFIX)),
                        );
                        if let Json::Object(fields) = item {
                            obj.extend(fields.clone());
                        }
                        configs.push(Json::Object(obj));
                    }
                }
            }
        }
    }
    if let Some(mask) = mask {
        let paths: Vec<Vec<&str>> = mask
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| p.split('.').collect())
            .collect();
        configs = configs
            .into_iter()
            .map(|c| apply_mask(&c, &paths))
            .collect();
    }
    Ok(serde_json::json!({ "configs": configs }))
}

/// Keeps `@type` and the fields named by `paths`.
fn apply_mask(value: &Json, paths: &[Vec<&str>]) -> Json {
    let Json::Object(map) = value else {
        return value.clone();
    };
    let mut out = serde_json::Map::new();
    if let Some(t) = map.get("@type") {
        out.insert("@type".to_owned(), t.clone());
    }
    for path in paths {
        copy_path(map, path, &mut out);
    }
    Json::Object(out)
}

fn copy_path(
    from: &serde_json::Map<String, Json>,
    path: &[&str],
    to: &mut serde_json::Map<String, Json>,
) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let Some(v) = from.get(*first) else { return };
    if rest.is_empty() {
        to.insert((*first).to_owned(), v.clone());
        return;
    }
    if let Json::Object(inner) = v {
        let entry = to
            .entry((*first).to_owned())
            .or_insert_with(|| Json::Object(Default::default()));
        if let Json::Object(target) = entry {
            copy_path(inner, rest, target);
        }
    }
}
