//! `/config_dump` in Envoy's `envoy.admin.v3.ConfigDump` shape: built from the admin protos and
//! written with the proto3-JSON writer, so `istioctl proxy-config` and `xds-protos` read it.
//!
//! Order and content as Envoy: bootstrap, clusters (static, dynamic active), endpoints (with
//! `?include_eds`), listeners (static, dynamic with active/warming/error state), scoped routes
//! (empty), routes (the inline route configurations of the HTTP connection managers, as Envoy's
//! static route configs), secrets (SDS, private keys redacted). A listener warming on SDS secrets
//! shows under `warming_state`, with the version it replaces (still serving) under
//! `active_state`. Supports `?resource=<repeated field>`, `?mask=<comma-separated paths>` and
//! `?name_regex=`.

use std::time::SystemTime;

use http::{Response, StatusCode};
use prost::Message as _;
use serde_json::Value as Json;
use waypoint_proto::{
    envoy::{
        admin::v3::{
            BootstrapConfigDump, ClientResourceStatus, ClustersConfigDump, ConfigDump,
            EndpointsConfigDump, ListenersConfigDump, RoutesConfigDump, ScopedRoutesConfigDump,
            SecretsConfigDump, UpdateFailureState,
            clusters_config_dump::{DynamicCluster, StaticCluster},
            endpoints_config_dump::{DynamicEndpointConfig, StaticEndpointConfig},
            listeners_config_dump::{DynamicListener, DynamicListenerState, StaticListener},
            routes_config_dump::StaticRouteConfig,
            secrets_config_dump::DynamicSecret,
        },
        config::{
            cluster::v3::Cluster,
            endpoint::v3::ClusterLoadAssignment,
            listener::v3::{Listener, filter::ConfigType},
        },
        extensions::filters::network::http_connection_manager::v3::{
            HttpConnectionManager, http_connection_manager::RouteSpecifier,
        },
    },
    google::protobuf::{Any, Timestamp},
    json::{self, JsonError},
    resource::ResourceKind,
};

use super::{Admin, Body, json as json_response, text};
use crate::xds::sds::redacted;

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

fn failure(err: &Option<(String, String, SystemTime)>) -> Option<UpdateFailureState> {
    err.as_ref()
        .map(|(details, version, when)| UpdateFailureState {
            failed_configuration: None,
            last_update_attempt: Some(ts(*when)),
            details: details.clone(),
            version_info: version.clone(),
        })
}

fn status(err: &Option<(String, String, SystemTime)>) -> i32 {
    if err.is_some() {
        ClientResourceStatus::Nacked as i32
    } else {
        ClientResourceStatus::Acked as i32
    }
}

/// The inline route configurations of a listener's HTTP connection managers.
fn inline_routes(l: &Listener, out: &mut Vec<Any>) {
    let chains = l.filter_chains.iter().chain(l.default_filter_chain.iter());
    for chain in chains {
        for filter in &chain.filters {
            let Some(ConfigType::TypedConfig(any)) = &filter.config_type else {
                continue;
            };
            if json::type_name_of_url(&any.type_url)
                != "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
            {
                continue;
            }
            if let Ok(hcm) = HttpConnectionManager::decode(any.value.as_slice())
                && let Some(RouteSpecifier::RouteConfig(rc)) = hcm.route_specifier
            {
                out.push(pack(&rc));
            }
        }
    }
}

/// The full dump as a proto.
pub fn build(admin: &Admin, include_eds: bool) -> ConfigDump {
    let server = &admin.server;
    let started = ts(server.started_at);
    let boot = &server.bootstrap.bootstrap;
    let statics = boot.static_resources.clone().unwrap_or_default();
    let mut configs = vec![pack(&BootstrapConfigDump {
        bootstrap: Some(boot.clone()),
        last_updated: Some(started),
    })];

    let cds = server.xds.record(ResourceKind::Cluster);
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
            .values()
            .filter_map(|e| {
                e.resource.as_ref().map(|r| DynamicCluster {
                    version_info: e.version.clone(),
                    cluster: Some(r.clone()),
                    last_updated: Some(ts(e.last_updated)),
                    error_state: failure(&e.error),
                    client_status: status(&e.error),
                })
            })
            .collect(),
        dynamic_warming_clusters: vec![],
    }));

    if include_eds {
        let eds = server.xds.record(ResourceKind::Endpoint);
        // Static clusters show their assignment; DNS clusters (from the bootstrap or CDS) their
        // latest resolution, as Envoy dumps every non-EDS cluster's current hosts.
        let mut static_endpoint_configs: Vec<StaticEndpointConfig> = statics
            .clusters
            .iter()
            .filter(|c| !super::clusters::is_dns(c))
            .filter_map(|c| {
                c.load_assignment.as_ref().map(|la| {
                    let mut la = la.clone();
                    if la.cluster_name.is_empty() {
                        la.cluster_name = c.name.clone();
                    }
                    StaticEndpointConfig {
                        endpoint_config: Some(pack(&la)),
                        last_updated: Some(started),
                    }
                })
            })
            .collect();
        let dynamic_dns = cds.resources.values().filter_map(|e| {
            let any = e.resource.as_ref()?;
            let c = Cluster::decode(any.value.as_slice()).ok()?;
            Some((c, Some(ts(e.last_updated))))
        });
        let static_dns = statics.clusters.iter().map(|c| (c.clone(), Some(started)));
        for (c, last_updated) in static_dns.chain(dynamic_dns) {
            if !super::clusters::is_dns(&c) {
                continue;
            }
            let cla = super::clusters::dns_assignment(&server.stats, &c.name).unwrap_or(
                ClusterLoadAssignment {
                    cluster_name: c.name.clone(),
                    ..Default::default()
                },
            );
            static_endpoint_configs.push(StaticEndpointConfig {
                endpoint_config: Some(pack(&cla)),
                last_updated,
            });
        }
        configs.push(pack(&EndpointsConfigDump {
            static_endpoint_configs,
            dynamic_endpoint_configs: eds
                .resources
                .values()
                .filter_map(|e| {
                    e.resource.as_ref().map(|r| DynamicEndpointConfig {
                        version_info: e.version.clone(),
                        endpoint_config: Some(r.clone()),
                        last_updated: Some(ts(e.last_updated)),
                        error_state: failure(&e.error),
                        client_status: status(&e.error),
                    })
                })
                .collect(),
        }));
    }

    let lds = server.xds.record(ResourceKind::Listener);
    let warming = server.warming.all();
    let mut routes = Vec::new();
    for l in &statics.listeners {
        inline_routes(l, &mut routes);
    }
    for e in lds.resources.values() {
        if let Some(l) = e
            .resource
            .as_ref()
            .and_then(|r| Listener::decode(r.value.as_slice()).ok())
        {
            inline_routes(&l, &mut routes);
        }
    }
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
            .map(|(name, e)| {
                let state = |e: &crate::xds::Entry| {
                    e.resource.as_ref().map(|r| DynamicListenerState {
                        version_info: e.version.clone(),
                        listener: Some(r.clone()),
                        last_updated: Some(ts(e.last_updated)),
                    })
                };
                // A warming listener: the accepted version under `warming_state`, the version
                // still serving (if it replaces one) under `active_state`.
                let (active_state, warming_state) = match warming.get(name) {
                    Some(w) => (w.active.as_ref().and_then(state), state(e)),
                    None => (state(e), None),
                };
                DynamicListener {
                    name: name.clone(),
                    active_state,
                    warming_state,
                    error_state: failure(&e.error),
                    client_status: status(&e.error),
                    ..Default::default()
                }
            })
            .collect(),
    }));

    configs.push(pack(&ScopedRoutesConfigDump::default()));
    configs.push(pack(&RoutesConfigDump {
        static_route_configs: routes
            .into_iter()
            .map(|rc| StaticRouteConfig {
                route_config: Some(rc),
                last_updated: Some(started),
            })
            .collect(),
        dynamic_route_configs: vec![],
    }));

    let secrets = admin.secrets.entries();
    let secret_of = |e: &crate::xds::sds::SecretEntry| DynamicSecret {
        name: e.name.clone(),
        version_info: e.version.clone(),
        last_updated: e.last_updated.map(ts),
        secret: e.secret.as_deref().map(|s| pack(&redacted(s))),
        error_state: e.error.as_ref().map(|f| UpdateFailureState {
            failed_configuration: None,
            last_update_attempt: Some(ts(f.when)),
            details: f.details.clone(),
            version_info: f.version.clone(),
        }),
        client_status: if e.error.is_some() {
            ClientResourceStatus::Nacked as i32
        } else if e.secret.is_some() {
            ClientResourceStatus::Acked as i32
        } else {
            ClientResourceStatus::Requested as i32
        },
    };
    configs.push(pack(&SecretsConfigDump {
        static_secrets: vec![],
        dynamic_active_secrets: secrets
            .values()
            .filter(|e| e.secret.is_some())
            .map(|e| secret_of(e))
            .collect(),
        dynamic_warming_secrets: secrets
            .values()
            .filter(|e| e.secret.is_none())
            .map(|e| secret_of(e))
            .collect(),
    }));
    ConfigDump { configs }
}

/// Why a config dump request cannot be answered.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// Writing JSON failed.
    #[error(transparent)]
    Json(#[from] JsonError),
    /// `?resource=` names no repeated field of any config.
    #[error("{0} is not a valid resource.")]
    UnknownResource(String),
    /// `?name_regex=` does not compile.
    #[error("invalid name_regex: {0}")]
    BadRegex(String),
}

/// The name an item of a repeated dump field carries (for `?name_regex=`).
fn item_name(item: &Json) -> Option<&str> {
    let paths: &[&[&str]] = &[
        &["name"],
        &["cluster", "name"],
        &["listener", "name"],
        &["active_state", "listener", "name"],
        &["warming_state", "listener", "name"],
        &["route_config", "name"],
        &["endpoint_config", "cluster_name"],
        &["secret", "name"],
    ];
    paths.iter().find_map(|path| {
        let mut v = item;
        for p in *path {
            v = v.get(p)?;
        }
        v.as_str()
    })
}

/// The dump as JSON, filtered by `resource`, `mask` and `name_regex` as Envoy does.
pub fn render(
    admin: &Admin,
    resource: Option<&str>,
    mask: Option<&str>,
    name_regex: Option<&str>,
    include_eds: bool,
) -> Result<Json, DumpError> {
    let name_re = name_regex
        .filter(|r| !r.is_empty())
        .map(regex::Regex::new)
        .transpose()
        .map_err(|e| DumpError::BadRegex(e.to_string()))?;
    let dump = build(admin, include_eds);
    let mut configs = Vec::new();
    let mut resource_known = false;
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
                    prost_reflect::Kind::Message(m) if f.is_list() => m.full_name().to_owned(),
                    _ => continue,
                };
                resource_known = true;
                if let Some(Json::Array(items)) = value.get(field) {
                    for item in items {
                        if let Some(re) = &name_re
                            && !item_name(item).is_some_and(|n| re.is_match(n))
                        {
                            continue;
                        }
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
    if let Some(field) = resource
        && !resource_known
    {
        return Err(DumpError::UnknownResource(field.to_owned()));
    }
    if let Some(mask) = mask {
        let paths: Vec<Vec<&str>> = mask
            .split(',')
            .map(str::trim)
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

/// `GET /config_dump`.
pub fn handle(admin: &Admin, params: &[(String, String)]) -> Response<Body> {
    let get = |k: &str| params.iter().find(|(p, _)| p == k).map(|(_, v)| v.as_str());
    let include_eds = params.iter().any(|(p, _)| p == "include_eds");
    match render(
        admin,
        get("resource").filter(|r| !r.is_empty()),
        get("mask").filter(|m| !m.is_empty()),
        get("name_regex"),
        include_eds,
    ) {
        Ok(v) => json_response(&v),
        Err(e @ DumpError::UnknownResource(_)) => text(StatusCode::NOT_FOUND, format!("{e}\n")),
        Err(e @ DumpError::BadRegex(_)) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// Keeps `@type` and the fields named by `paths` (through nested and repeated messages).
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
    match v {
        Json::Object(inner) => {
            let entry = to
                .entry((*first).to_owned())
                .or_insert_with(|| typed_shell(inner));
            if let Json::Object(target) = entry {
                copy_path(inner, rest, target);
            }
        }
        Json::Array(items) => {
            let entry = to.entry((*first).to_owned()).or_insert_with(|| {
                Json::Array(
                    items
                        .iter()
                        .map(|i| match i {
                            Json::Object(o) => typed_shell(o),
                            other => other.clone(),
                        })
                        .collect(),
                )
            });
            if let Json::Array(targets) = entry {
                for (item, target) in items.iter().zip(targets.iter_mut()) {
                    if let (Json::Object(inner), Json::Object(target)) = (item, target) {
                        copy_path(inner, rest, target);
                    }
                }
            }
        }
        _ => {}
    }
}

/// An empty object keeping the `@type` of an Any (so the masked dump still parses).
fn typed_shell(obj: &serde_json::Map<String, Json>) -> Json {
    let mut shell = serde_json::Map::new();
    if let Some(t) = obj.get("@type") {
        shell.insert("@type".to_owned(), t.clone());
    }
    Json::Object(shell)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_traverses_lists_and_keeps_types() {
        let doc = serde_json::json!({
            "@type": "t/Dump",
            "version_info": "1",
            "dynamic_active_clusters": [
                {"version_info": "a", "cluster": {"@type": "t/C", "name": "x", "type": "EDS"}},
                {"version_info": "b", "cluster": {"@type": "t/C", "name": "y"}}
            ]
        });
        let masked = apply_mask(&doc, &[vec!["dynamic_active_clusters", "cluster", "name"]]);
        assert_eq!(
            masked,
            serde_json::json!({
                "@type": "t/Dump",
                "dynamic_active_clusters": [
                    {"cluster": {"@type": "t/C", "name": "x"}},
                    {"cluster": {"@type": "t/C", "name": "y"}}
                ]
            })
        );
        assert_eq!(
            item_name(&serde_json::json!({"active_state": {"listener": {"name": "l"}}})),
            Some("l")
        );
    }
}
