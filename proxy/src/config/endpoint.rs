//! Endpoints (`ClusterLoadAssignment`, from EDS or a STATIC cluster's `load_assignment`): addresses
//! (socket, pipe or internal listener), health, weights, locality/priority and metadata — for
//! waypoints the `envoy.filters.listener.original_dst.local` target of each tunnelled endpoint.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use serde_json::Value as Json;
use waypoint_proto::envoy::config::{
    core::v3::{Address, HealthStatus, Metadata, address},
    endpoint::v3::{ClusterLoadAssignment, lb_endpoint::HostIdentifier},
};

use super::{
    CompileResult, ConfigError, field, index, key, listener::socket_address, typed::struct_to_json,
};

/// Envoy's default overprovisioning factor (percent).
const DEFAULT_OVERPROVISIONING: u32 = 140;

/// Where an endpoint is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointAddress {
    /// A TCP address.
    Socket(SocketAddr),
    /// A Unix socket.
    Pipe(PathBuf),
    /// An internal listener, with an optional endpoint id (`<podIP>:<port>` for waypoints).
    Internal {
        /// `server_listener_name`.
        listener: String,
        /// `endpoint_id`.
        endpoint_id: Option<String>,
    },
}

/// Compiles an endpoint `Address`.
pub fn endpoint_address(a: &Address, path: &str) -> CompileResult<EndpointAddress> {
    match &a.address {
        Some(address::Address::Pipe(p)) => {
            if p.path.is_empty() {
                return Err(ConfigError::new(
                    field(&field(path, "pipe"), "path"),
                    "path is required",
                ));
            }
            Ok(EndpointAddress::Pipe(PathBuf::from(&p.path)))
        }
        Some(address::Address::EnvoyInternalAddress(i)) => {
            use waypoint_proto::envoy::config::core::v3::envoy_internal_address::AddressNameSpecifier;
            let ipath = field(path, "envoy_internal_address");
            match &i.address_name_specifier {
                Some(AddressNameSpecifier::ServerListenerName(n)) if !n.is_empty() => {
                    Ok(EndpointAddress::Internal {
                        listener: n.clone(),
                        endpoint_id: (!i.endpoint_id.is_empty()).then(|| i.endpoint_id.clone()),
                    })
                }
                _ => Err(ConfigError::new(
                    field(&ipath, "server_listener_name"),
                    "server_listener_name is required",
                )),
            }
        }
        _ => socket_address(a, path).map(|(s, _)| EndpointAddress::Socket(s)),
    }
}

/// Health as reported by EDS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not reported (treated as healthy).
    Unknown,
    /// Healthy.
    Healthy,
    /// Unhealthy.
    Unhealthy,
    /// Draining (no new requests).
    Draining,
    /// Timed out health checks (unhealthy).
    Timeout,
    /// Degraded (used only without healthy hosts).
    Degraded,
}

impl Health {
    /// Whether the endpoint takes new traffic normally.
    pub fn is_healthy(self) -> bool {
        matches!(self, Health::Unknown | Health::Healthy)
    }
}

/// Metadata `filter_metadata` as JSON per namespace.
pub fn metadata(m: Option<&Metadata>, path: &str) -> CompileResult<BTreeMap<String, Json>> {
    let mut out = BTreeMap::new();
    if let Some(m) = m {
        for (ns, s) in &m.filter_metadata {
            out.insert(
                ns.clone(),
                struct_to_json(s, &key(path, "filter_metadata", ns))?,
            );
        }
    }
    Ok(out)
}

/// A compiled endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// `endpoint.address`.
    pub address: EndpointAddress,
    /// `endpoint.additional_addresses` (dual stack).
    pub additional_addresses: Vec<SocketAddr>,
    /// `endpoint.hostname`.
    pub hostname: Option<String>,
    /// `health_status`.
    pub health: Health,
    /// `load_balancing_weight` (default 1).
    pub weight: u32,
    /// `metadata.filter_metadata`.
    pub metadata: BTreeMap<String, Json>,
    /// `metadata["envoy.filters.listener.original_dst"].local`: where a tunnelled endpoint really is.
    pub original_dst: Option<SocketAddr>,
}

/// A locality group.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalityEndpoints {
    /// `locality` (region, zone, sub_zone).
    pub locality: Option<(String, String, String)>,
    /// `priority` (0 is highest).
    pub priority: u32,
    /// `load_balancing_weight` of the locality.
    pub weight: Option<u32>,
    /// The endpoints.
    pub endpoints: Vec<Endpoint>,
}

/// A compiled `ClusterLoadAssignment`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadAssignment {
    /// `cluster_name`.
    pub cluster_name: String,
    /// `endpoints`.
    pub localities: Vec<LocalityEndpoints>,
    /// `policy.overprovisioning_factor`.
    pub overprovisioning_factor: u32,
}

impl LoadAssignment {
    /// Compiles `c` (at `path`).
    pub fn compile(c: &ClusterLoadAssignment, path: &str) -> CompileResult<Self> {
        let mut localities = Vec::with_capacity(c.endpoints.len());
        for (i, group) in c.endpoints.iter().enumerate() {
            let gpath = index(path, "endpoints", i);
            let weight = group.load_balancing_weight.as_ref().map(|w| w.value);
            if weight == Some(0) {
                return Err(ConfigError::new(
                    field(&gpath, "load_balancing_weight"),
                    "must be at least 1",
                ));
            }
            let mut endpoints = Vec::with_capacity(group.lb_endpoints.len());
            for (j, lb) in group.lb_endpoints.iter().enumerate() {
                let epath = index(&gpath, "lb_endpoints", j);
                let ep = match &lb.host_identifier {
                    Some(HostIdentifier::Endpoint(e)) => e,
                    Some(HostIdentifier::EndpointName(_)) => {
                        return Err(ConfigError::new(
                            field(&epath, "endpoint_name"),
                            "named endpoints are not supported",
                        ));
                    }
                    None => {
                        return Err(ConfigError::new(
                            field(&epath, "endpoint"),
                            "endpoint is required",
                        ));
                    }
                };
                let apath = field(&field(&epath, "endpoint"), "address");
                let addr = ep
                    .address
                    .as_ref()
                    .ok_or_else(|| ConfigError::new(&apath, "address is required"))?;
                let additional_addresses = ep
                    .additional_addresses
                    .iter()
                    .enumerate()
                    .map(|(k, a)| {
                        let p = field(
                            &index(&field(&epath, "endpoint"), "additional_addresses", k),
                            "address",
                        );
                        let a = a
                            .address
                            .as_ref()
                            .ok_or_else(|| ConfigError::new(&p, "address is required"))?;
                        socket_address(a, &p).map(|(s, _)| s)
                    })
                    .collect::<CompileResult<_>>()?;
                let weight = lb.load_balancing_weight.as_ref().map_or(1, |w| w.value);
                if weight == 0 {
                    return Err(ConfigError::new(
                        field(&epath, "load_balancing_weight"),
                        "must be at least 1",
                    ));
                }
                let mpath = field(&epath, "metadata");
                let md = metadata(lb.metadata.as_ref(), &mpath)?;
                let original_dst = match md
                    .get("envoy.filters.listener.original_dst")
                    .and_then(|v| v.get("local"))
                {
                    None => None,
                    Some(Json::String(s)) => Some(s.parse::<SocketAddr>().map_err(|_| {
                        ConfigError::new(
                            format!(
                                "{}.local",
                                key(
                                    &mpath,
                                    "filter_metadata",
                                    "envoy.filters.listener.original_dst"
                                )
                            ),
                            format!("'{s}' is not an ip:port address"),
                        )
                    })?),
                    Some(_) => {
                        return Err(ConfigError::new(
                            key(
                                &mpath,
                                "filter_metadata",
                                "envoy.filters.listener.original_dst",
                            ),
                            "local must be a string",
                        ));
                    }
                };
                endpoints.push(Endpoint {
                    address: endpoint_address(addr, &apath)?,
                    additional_addresses,
                    hostname: (!ep.hostname.is_empty()).then(|| ep.hostname.clone()),
                    health: match HealthStatus::try_from(lb.health_status) {
                        Ok(HealthStatus::Healthy) => Health::Healthy,
                        Ok(HealthStatus::Unhealthy) => Health::Unhealthy,
                        Ok(HealthStatus::Draining) => Health::Draining,
                        Ok(HealthStatus::Timeout) => Health::Timeout,
                        Ok(HealthStatus::Degraded) => Health::Degraded,
                        _ => Health::Unknown,
                    },
                    weight,
                    metadata: md,
                    original_dst,
                });
            }
            localities.push(LocalityEndpoints {
                locality: group
                    .locality
                    .as_ref()
                    .map(|l| (l.region.clone(), l.zone.clone(), l.sub_zone.clone())),
                priority: group.priority,
                weight,
                endpoints,
            });
        }
        let overprovisioning_factor = c
            .policy
            .as_ref()
            .and_then(|p| p.overprovisioning_factor.as_ref())
            .map_or(DEFAULT_OVERPROVISIONING, |v| v.value);
        if overprovisioning_factor == 0 {
            return Err(ConfigError::new(
                field(&field(path, "policy"), "overprovisioning_factor"),
                "must be positive",
            ));
        }
        Ok(LoadAssignment {
            cluster_name: c.cluster_name.clone(),
            localities,
            overprovisioning_factor,
        })
    }

    /// All endpoints, in order.
    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.localities.iter().flat_map(|l| l.endpoints.iter())
    }
}
