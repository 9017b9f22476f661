//! Loading the Envoy v3 bootstrap (JSON or YAML, `--config-yaml` merged over the file) and reading
//! the settings the control side needs: node, admin address, and how to reach the ADS and SDS
//! servers (static gRPC clusters, usually Unix `pipe` addresses to the agent).

use std::{net::SocketAddr, path::PathBuf};

use serde_json::Value as Json;
use waypoint_proto::{
    envoy::config::{
        bootstrap::v3::Bootstrap,
        cluster::v3::Cluster,
        core::v3::{Node, address, grpc_service::TargetSpecifier},
    },
    json,
};

/// Why a bootstrap cannot be used; every variant names the JSON path or file.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// File.
        path: String,
        /// I/O error.
        source: std::io::Error,
    },
    /// Not valid JSON/YAML or not a Bootstrap.
    #[error("{0}")]
    Parse(#[from] json::JsonError),
    /// A setting we need is missing or unsupported.
    #[error("{path}: {reason}")]
    Invalid {
        /// JSON path.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

fn invalid(path: &str, reason: impl Into<String>) -> BootstrapError {
    BootstrapError::Invalid {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Where a gRPC xDS server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcTarget {
    /// A Unix socket path.
    Pipe(PathBuf),
    /// A TCP address (plaintext HTTP/2).
    Tcp(SocketAddr),
}

/// How the proxy reaches ADS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdsSettings {
    /// Delta xDS (`DELTA_GRPC`); otherwise state of the world (`GRPC`, and as in Envoy every other
    /// gRPC api_type).
    pub delta: bool,
    /// The server.
    pub target: GrpcTarget,
    /// The static cluster name.
    pub cluster: String,
}

/// A loaded bootstrap and what we read from it.
#[derive(Debug, Clone)]
pub struct LoadedBootstrap {
    /// The full message (for `/config_dump`).
    pub bootstrap: Bootstrap,
    /// The JSON it came from, after `--config-yaml` merging.
    pub json: Json,
    /// `node`.
    pub node: Node,
    /// Admin listen address.
    pub admin: Option<SocketAddr>,
    /// ADS, when `dynamic_resources.ads_config` is set.
    pub ads: Option<AdsSettings>,
    /// Static gRPC clusters by name (for SDS configs that name `sds-grpc`).
    pub grpc_clusters: Vec<(String, GrpcTarget)>,
}

/// Reads and checks a bootstrap.
pub fn load(
    path: Option<&std::path::Path>,
    overlay_yaml: Option<&str>,
) -> Result<LoadedBootstrap, BootstrapError> {
    let mut doc = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| BootstrapError::Read {
                path: p.display().to_string(),
                source,
            })?;
            json::yaml_to_json(&text)?
        }
        None => Json::Object(Default::default()),
    };
    if let Some(overlay) = overlay_yaml {
        merge(&mut doc, json::yaml_to_json(overlay)?);
    }
    from_json(doc)
}

/// Envoy's `--config-yaml` merge: objects merge recursively, everything else (lists too) replaces.
fn merge(base: &mut Json, overlay: Json) {
    match (base, overlay) {
        (Json::Object(b), Json::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// Checks a bootstrap document and extracts the control settings.
pub fn from_json(doc: Json) -> Result<LoadedBootstrap, BootstrapError> {
    let bootstrap: Bootstrap = json::from_json(&doc)?;
    let dynamic = json::dynamic_from_json("envoy.config.bootstrap.v3.Bootstrap", &doc)?;
    json::visit_anys(&dynamic, &mut |_, _| {})?;

    let node = bootstrap.node.clone().unwrap_or_default();
    let admin = match bootstrap
        .admin
        .as_ref()
        .and_then(|a| a.address.as_ref())
        .and_then(|a| a.address.as_ref())
    {
        None => None,
        Some(address::Address::SocketAddress(sa)) => Some(socket_addr(
            &sa.address,
            sa.port_specifier.as_ref(),
            "admin.address.socket_address",
        )?),
        Some(_) => return Err(invalid("admin.address", "only socket_address is supported")),
    };

    let statics = bootstrap.static_resources.as_ref();
    let mut grpc_clusters = Vec::new();
    for (i, c) in statics
        .map(|s| s.clusters.as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        if let Some(target) = cluster_target(c, &format!("static_resources.clusters[{i}]"))? {
            grpc_clusters.push((c.name.clone(), target));
        }
    }

    let ads = match bootstrap
        .dynamic_resources
        .as_ref()
        .and_then(|d| d.ads_config.as_ref())
    {
        None => None,
        Some(cfg) => {
            let Some(delta) = crate::config::source::ads_is_delta(cfg.api_type) else {
                return Err(invalid(
                    "dynamic_resources.ads_config.api_type",
                    "ADS needs a gRPC api_type: GRPC (state of the world) or DELTA_GRPC",
                ));
            };
            let cluster = match cfg
                .grpc_services
                .first()
                .and_then(|g| g.target_specifier.as_ref())
            {
                Some(TargetSpecifier::EnvoyGrpc(e)) => e.cluster_name.clone(),
                Some(TargetSpecifier::GoogleGrpc(_)) => {
                    return Err(invalid(
                        "dynamic_resources.ads_config.grpc_services[0].google_grpc",
                        "google_grpc is not supported; use envoy_grpc with a static cluster",
                    ));
                }
                None => {
                    return Err(invalid(
                        "dynamic_resources.ads_config.grpc_services",
                        "no gRPC service",
                    ));
                }
            };
            let target = grpc_clusters
                .iter()
                .find(|(n, _)| *n == cluster)
                .map(|(_, t)| t.clone())
                .ok_or_else(|| {
                    invalid(
                        "dynamic_resources.ads_config.grpc_services[0].envoy_grpc.cluster_name",
                        format!("static cluster '{cluster}' not found or has no usable address"),
                    )
                })?;
            Some(AdsSettings {
                delta,
                target,
                cluster,
            })
        }
    };
    Ok(LoadedBootstrap {
        bootstrap,
        json: doc,
        node,
        admin,
        ads,
        grpc_clusters,
    })
}

fn socket_addr(
    address: &str,
    port: Option<&waypoint_proto::envoy::config::core::v3::socket_address::PortSpecifier>,
    path: &str,
) -> Result<SocketAddr, BootstrapError> {
    use waypoint_proto::envoy::config::core::v3::socket_address::PortSpecifier;
    let port = match port {
        Some(PortSpecifier::PortValue(p)) => {
            u16::try_from(*p).map_err(|_| invalid(path, format!("port {p} out of range")))?
        }
        Some(PortSpecifier::NamedPort(n)) => {
            return Err(invalid(path, format!("named port '{n}' is not supported")));
        }
        None => 0,
    };
    let ip: std::net::IpAddr = address
        .parse()
        .map_err(|_| invalid(path, format!("address '{address}' is not an IP address")))?;
    Ok(SocketAddr::new(ip, port))
}

/// The single endpoint of a STATIC cluster, if it is a pipe or socket address.
fn cluster_target(c: &Cluster, path: &str) -> Result<Option<GrpcTarget>, BootstrapError> {
    use waypoint_proto::envoy::config::cluster::v3::cluster::{
        ClusterDiscoveryType, DiscoveryType,
    };
    // A DNS cluster's endpoints are names resolved at run time (upstream/dns.rs), not gRPC
    // targets for the bootstrap's own clients.
    if let Some(ClusterDiscoveryType::Type(t)) = &c.cluster_discovery_type
        && (*t == DiscoveryType::StrictDns as i32 || *t == DiscoveryType::LogicalDns as i32)
    {
        return Ok(None);
    }
    let Some(la) = c.load_assignment.as_ref() else {
        return Ok(None);
    };
    let Some(addr) = la
        .endpoints
        .first()
        .and_then(|e| e.lb_endpoints.first())
        .and_then(|l| match &l.host_identifier {
            Some(
                waypoint_proto::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(
                    e,
                ),
            ) => e.address.as_ref(),
            _ => None,
        })
    else {
        return Ok(None);
    };
    Ok(match &addr.address {
        Some(address::Address::Pipe(p)) => Some(GrpcTarget::Pipe(PathBuf::from(&p.path))),
        Some(address::Address::SocketAddress(sa)) => Some(GrpcTarget::Tcp(socket_addr(
            &sa.address,
            sa.port_specifier.as_ref(),
            &format!("{path}.load_assignment"),
        )?)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden() -> Json {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/istio/bootstrap_ambient_golden.json"
        ))
        .expect("fixture");
        serde_json::from_str(&text).expect("json")
    }

    #[test]
    fn istio_golden_bootstrap_loads() {
        let b = from_json(golden()).expect("loads");
        let ads = b.ads.expect("ads");
        assert!(ads.delta);
        assert_eq!(ads.cluster, "xds-grpc");
        assert!(matches!(ads.target, GrpcTarget::Pipe(_)));
        assert_eq!(b.admin, Some("127.0.0.1:15000".parse().expect("addr")));
        assert!(b.grpc_clusters.iter().any(|(n, _)| n == "sds-grpc"));
    }

    #[test]
    fn errors_name_the_path() {
        let mut doc = golden();
        doc["dynamic_resources"]["ads_config"]["grpc_services"][0]["envoy_grpc"]["cluster_name"] =
            "nope".into();
        let err = from_json(doc).expect_err("missing cluster");
        assert!(
            err.to_string().starts_with(
                "dynamic_resources.ads_config.grpc_services[0].envoy_grpc.cluster_name:"
            ),
            "{err}"
        );
        let mut doc = golden();
        doc["admin"]["address"]["socket_address"]["adress"] = "x".into();
        let err = from_json(doc).expect_err("typo");
        assert!(
            err.to_string()
                .contains("admin.address.socket_address.adress"),
            "{err}"
        );
    }

    #[test]
    fn ads_api_types_as_envoy_reads_them() {
        for (api_type, delta) in [
            ("GRPC", false),
            ("AGGREGATED_GRPC", false),
            ("AGGREGATED_DELTA_GRPC", false),
            ("DELTA_GRPC", true),
        ] {
            let mut doc = golden();
            doc["dynamic_resources"]["ads_config"]["api_type"] = api_type.into();
            let b = from_json(doc).unwrap_or_else(|e| panic!("{api_type}: {e}"));
            assert_eq!(b.ads.map(|a| a.delta), Some(delta), "{api_type}");
        }
        let mut doc = golden();
        doc["dynamic_resources"]["ads_config"]["api_type"] = "REST".into();
        let err = from_json(doc).expect_err("REST refused");
        assert!(
            err.to_string()
                .starts_with("dynamic_resources.ads_config.api_type: ADS needs a gRPC api_type"),
            "{err}"
        );
    }

    #[test]
    fn config_yaml_overlay_merges() {
        let mut base = serde_json::json!({"a": {"b": 1, "c": [1]}, "d": 1});
        merge(&mut base, serde_json::json!({"a": {"c": [2], "e": 3}}));
        assert_eq!(
            base,
            serde_json::json!({"a": {"b": 1, "c": [2], "e": 3}, "d": 1})
        );
    }
}
