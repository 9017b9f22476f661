//! `/clusters` and `/listeners` in Envoy's text and JSON (`?format=json`) shapes, built from the
//! bootstrap's static resources and the accepted xDS resources (EDS hosts included). Once the
//! data path has used a cluster, its live hosts add outlier ejections (`/failed_outlier_check`),
//! success rates and active requests; other host traffic counters are zero.

use std::collections::BTreeMap;

use http::{Response, StatusCode};
use prost::Message as _;
use waypoint_proto::{
    envoy::{
        admin::v3::{
            ClusterStatus, Clusters, HostHealthStatus, HostStatus, ListenerStatus, Listeners,
            SimpleMetric, simple_metric,
        },
        config::{
            cluster::v3::{
                CircuitBreakers, Cluster,
                circuit_breakers::Thresholds,
                cluster::{ClusterDiscoveryType, DiscoveryType},
            },
            core::v3::{
                Address, EnvoyInternalAddress, HealthStatus, Locality, RoutingPriority, address,
                envoy_internal_address::AddressNameSpecifier, socket_address::PortSpecifier,
            },
            endpoint::v3::{ClusterLoadAssignment, lb_endpoint::HostIdentifier},
            listener::v3::Listener,
        },
    },
    google::protobuf::UInt32Value,
    resource::ResourceKind,
};

use super::{Admin, Body, json, text};
use crate::{
    config::endpoint::EndpointAddress,
    upstream::{cluster_manager::live_hosts, lb::Host},
};

/// Envoy's circuit-breaker defaults.
const DEFAULT_MAX_CONNECTIONS: u32 = 1024;
const DEFAULT_MAX_PENDING: u32 = 1024;
const DEFAULT_MAX_REQUESTS: u32 = 1024;
const DEFAULT_MAX_RETRIES: u32 = 3;

/// Envoy's `Address::asString()`.
pub fn address_string(addr: Option<&Address>) -> String {
    match addr.and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(sa)) => {
            let port = match &sa.port_specifier {
                Some(PortSpecifier::PortValue(p)) => p.to_string(),
                Some(PortSpecifier::NamedPort(n)) => n.clone(),
                None => "0".to_owned(),
            };
            if sa.address.contains(':') {
                format!("[{}]:{port}", sa.address)
            } else {
                format!("{}:{port}", sa.address)
            }
        }
        Some(address::Address::Pipe(p)) => p.path.clone(),
        Some(address::Address::EnvoyInternalAddress(EnvoyInternalAddress {
            address_name_specifier,
            endpoint_id,
        })) => {
            let name = match address_name_specifier {
                Some(AddressNameSpecifier::ServerListenerName(n)) => n.as_str(),
                None => "",
            };
            format!("envoy://{name}/{endpoint_id}")
        }
        None => String::new(),
    }
}

/// One cluster as `/clusters` shows it.
struct ClusterView {
    cluster: Cluster,
    added_via_api: bool,
    eds_service_name: Option<String>,
    hosts: Vec<HostStatus>,
}

fn is_eds(c: &Cluster) -> bool {
    matches!(&c.cluster_discovery_type, Some(ClusterDiscoveryType::Type(t)) if *t == DiscoveryType::Eds as i32)
}

fn is_original_dst(c: &Cluster) -> bool {
    matches!(&c.cluster_discovery_type, Some(ClusterDiscoveryType::Type(t)) if *t == DiscoveryType::OriginalDst as i32)
}

pub fn is_dns(c: &Cluster) -> bool {
    matches!(&c.cluster_discovery_type, Some(ClusterDiscoveryType::Type(t))
        if *t == DiscoveryType::StrictDns as i32 || *t == DiscoveryType::LogicalDns as i32)
}

/// A STRICT_DNS / LOGICAL_DNS cluster's hosts are its latest resolution (the live host set),
/// named by the DNS name as Envoy shows them; none before the first resolution.
fn dns_hosts(admin: &Admin, name: &str) -> Vec<HostStatus> {
    dns_assignment(&admin.server.stats, name)
        .map(|cla| hosts_of(&cla))
        .unwrap_or_default()
}

/// The latest resolution of DNS cluster `name` as an assignment (one locality entry per host,
/// with its address, DNS name, weight, health, priority and locality); `None` before the cluster
/// has a host set. `/clusters` and config_dump's `static_endpoint_configs` show it.
pub fn dns_assignment(
    stats: &std::sync::Arc<crate::stats::Stats>,
    name: &str,
) -> Option<ClusterLoadAssignment> {
    use waypoint_proto::envoy::config::{
        core::v3::SocketAddress,
        endpoint::v3::{Endpoint, LbEndpoint, LocalityLbEndpoints},
    };
    let live = live_hosts(stats, name)?;
    let endpoints = live
        .hosts()
        .iter()
        .filter_map(|h| {
            let EndpointAddress::Socket(a) = &h.address else {
                return None;
            };
            let health = match h.health {
                crate::config::endpoint::Health::Unknown
                | crate::config::endpoint::Health::Healthy => HealthStatus::Healthy,
                crate::config::endpoint::Health::Unhealthy => HealthStatus::Unhealthy,
                crate::config::endpoint::Health::Draining => HealthStatus::Draining,
                crate::config::endpoint::Health::Timeout => HealthStatus::Timeout,
                crate::config::endpoint::Health::Degraded => HealthStatus::Degraded,
            };
            Some(LocalityLbEndpoints {
                priority: h.priority,
                locality: h
                    .locality
                    .as_ref()
                    .map(|(region, zone, sub_zone)| Locality {
                        region: region.clone(),
                        zone: zone.clone(),
                        sub_zone: sub_zone.clone(),
                    }),
                lb_endpoints: vec![LbEndpoint {
                    health_status: health as i32,
                    load_balancing_weight: Some(UInt32Value { value: h.weight }),
                    host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                        address: Some(Address {
                            address: Some(address::Address::SocketAddress(SocketAddress {
                                address: a.ip().to_string(),
                                port_specifier: Some(PortSpecifier::PortValue(a.port().into())),
                                ..Default::default()
                            })),
                        }),
                        hostname: h.hostname.clone().unwrap_or_default(),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            })
        })
        .collect();
    Some(ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints,
        ..Default::default()
    })
}

fn eds_name(c: &Cluster) -> String {
    c.eds_cluster_config
        .as_ref()
        .map(|e| e.service_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| c.name.clone())
}

fn metric(name: &str, kind: simple_metric::Type) -> SimpleMetric {
    SimpleMetric {
        r#type: kind as i32,
        value: 0,
        name: name.to_owned(),
    }
}

fn hosts_of(cla: &ClusterLoadAssignment) -> Vec<HostStatus> {
    let mut out = Vec::new();
    for group in &cla.endpoints {
        for lb in &group.lb_endpoints {
            let Some(HostIdentifier::Endpoint(ep)) = &lb.host_identifier else {
                continue;
            };
            let mut stats: Vec<SimpleMetric> = [
                "cx_connect_fail",
                "cx_total",
                "rq_error",
                "rq_success",
                "rq_timeout",
                "rq_total",
            ]
            .iter()
            .map(|n| metric(n, simple_metric::Type::Counter))
            .collect();
            stats.extend(
                ["cx_active", "rq_active"]
                    .iter()
                    .map(|n| metric(n, simple_metric::Type::Gauge)),
            );
            out.push(HostStatus {
                address: ep.address.clone(),
                stats,
                health_status: Some(HostHealthStatus {
                    eds_health_status: match HealthStatus::try_from(lb.health_status) {
                        Ok(HealthStatus::Unknown) | Err(_) => HealthStatus::Healthy as i32,
                        Ok(s) => s as i32,
                    },
                    ..Default::default()
                }),
                weight: lb.load_balancing_weight.map(|w| w.value).unwrap_or(1),
                hostname: ep.hostname.clone(),
                priority: group.priority,
                locality: Some(group.locality.clone().unwrap_or_default()),
                ..Default::default()
            });
        }
    }
    out
}

/// Every cluster: static ones first (bootstrap order), then the accepted dynamic ones by name.
fn cluster_views(admin: &Admin) -> Vec<ClusterView> {
    let server = &admin.server;
    let mut out = Vec::new();
    if let Some(statics) = &server.bootstrap.bootstrap.static_resources {
        for c in &statics.clusters {
            let hosts = if is_original_dst(c) {
                Vec::new()
            } else if is_dns(c) {
                dns_hosts(admin, &c.name)
            } else {
                c.load_assignment.as_ref().map(hosts_of).unwrap_or_default()
            };
            out.push(ClusterView {
                cluster: c.clone(),
                added_via_api: false,
                eds_service_name: None,
                hosts,
            });
        }
    }
    let endpoints = server.xds.record(ResourceKind::Endpoint);
    let cds = server.xds.record(ResourceKind::Cluster);
    let mut dynamic: BTreeMap<String, ClusterView> = BTreeMap::new();
    for (name, entry) in &cds.resources {
        let Some(any) = &entry.resource else { continue };
        let Ok(c) = Cluster::decode(any.value.as_slice()) else {
            continue;
        };
        let (eds_service_name, hosts) = if is_eds(&c) {
            let service = eds_name(&c);
            let hosts = endpoints
                .resources
                .get(&service)
                .and_then(|e| e.resource.as_ref())
                .and_then(|a| ClusterLoadAssignment::decode(a.value.as_slice()).ok())
                .map(|cla| hosts_of(&cla))
                .unwrap_or_default();
            (Some(service), hosts)
        } else if is_original_dst(&c) {
            (None, Vec::new())
        } else if is_dns(&c) {
            (None, dns_hosts(admin, &c.name))
        } else {
            (
                None,
                c.load_assignment.as_ref().map(hosts_of).unwrap_or_default(),
            )
        };
        dynamic.insert(
            name.clone(),
            ClusterView {
                cluster: c,
                added_via_api: true,
                eds_service_name,
                hosts,
            },
        );
    }
    out.extend(dynamic.into_values());
    for view in &mut out {
        add_live_state(admin, view);
    }
    out
}

/// The address of a live host as `/clusters` prints it (Envoy's `Address::asString()`).
fn live_address(h: &Host) -> String {
    match &h.address {
        EndpointAddress::Socket(a) => a.to_string(),
        EndpointAddress::Pipe(p) => p.display().to_string(),
        EndpointAddress::Internal {
            listener,
            endpoint_id,
        } => format!(
            "envoy://{listener}/{}",
            endpoint_id.as_deref().unwrap_or("")
        ),
    }
}

/// Fills in what only the data path knows: ejections, success rates, active requests.
fn add_live_state(admin: &Admin, view: &mut ClusterView) {
    let Some(live) = live_hosts(&admin.server.stats, &view.cluster.name) else {
        return;
    };
    let by_address: BTreeMap<String, std::sync::Arc<Host>> = live
        .hosts()
        .into_iter()
        .map(|h| (live_address(&h), h))
        .collect();
    let percent =
        |v: Option<f64>| v.map(|value| waypoint_proto::envoy::r#type::v3::Percent { value });
    for status in &mut view.hosts {
        let Some(h) = by_address.get(&address_string(status.address.as_ref())) else {
            continue;
        };
        if let Some(hs) = status.health_status.as_mut() {
            hs.failed_outlier_check = h.outlier.is_ejected();
        }
        status.success_rate = percent(h.outlier.success_rate());
        status.local_origin_success_rate = percent(h.outlier.local_success_rate());
        for m in &mut status.stats {
            if m.name == "rq_active" {
                m.value = h.active_requests();
            }
        }
    }
}

/// The effective thresholds for one priority, Envoy's defaults filled in.
fn thresholds(c: &Cluster, priority: RoutingPriority) -> Thresholds {
    let configured = c
        .circuit_breakers
        .as_ref()
        .and_then(|cb| cb.thresholds.iter().find(|t| t.priority == priority as i32));
    let pick = |v: Option<&UInt32Value>, default: u32| {
        Some(UInt32Value {
            value: v.map(|v| v.value).unwrap_or(default),
        })
    };
    Thresholds {
        priority: priority as i32,
        max_connections: pick(
            configured.and_then(|t| t.max_connections.as_ref()),
            DEFAULT_MAX_CONNECTIONS,
        ),
        max_pending_requests: pick(
            configured.and_then(|t| t.max_pending_requests.as_ref()),
            DEFAULT_MAX_PENDING,
        ),
        max_requests: pick(
            configured.and_then(|t| t.max_requests.as_ref()),
            DEFAULT_MAX_REQUESTS,
        ),
        max_retries: pick(
            configured.and_then(|t| t.max_retries.as_ref()),
            DEFAULT_MAX_RETRIES,
        ),
        ..Default::default()
    }
}

/// Per cluster (its stat name): hosts in total, healthy (neither EDS-unhealthy nor ejected) and
/// degraded, for Envoy's `membership_total` / `membership_healthy` / `membership_degraded`.
pub fn membership(admin: &Admin) -> Vec<(String, u64, u64, u64)> {
    cluster_views(admin)
        .iter()
        .map(|v| {
            let mut healthy = 0;
            let mut degraded = 0;
            for h in &v.hosts {
                match health_flags(h).as_str() {
                    "healthy" => healthy += 1,
                    "/degraded_eds_health" => degraded += 1,
                    _ => {}
                }
            }
            (
                observability_name(&v.cluster),
                v.hosts.len() as u64,
                healthy,
                degraded,
            )
        })
        .collect()
}

fn observability_name(c: &Cluster) -> String {
    if c.alt_stat_name.is_empty() {
        c.name.clone()
    } else {
        c.alt_stat_name.clone()
    }
}

/// Envoy's `healthFlagsToString`: `healthy`, or `/flag/flag...` (in Envoy's flag order:
/// `failed_outlier_check` before the EDS flags).
fn health_flags(h: &HostStatus) -> String {
    let eds = h
        .health_status
        .as_ref()
        .map(|s| s.eds_health_status)
        .unwrap_or(HealthStatus::Healthy as i32);
    let outlier = h
        .health_status
        .as_ref()
        .is_some_and(|s| s.failed_outlier_check);
    let mut flags = String::new();
    if outlier {
        flags.push_str("/failed_outlier_check");
    }
    flags.push_str(match HealthStatus::try_from(eds) {
        Ok(HealthStatus::Unhealthy) | Ok(HealthStatus::Timeout) => "/failed_eds_health",
        Ok(HealthStatus::Draining) => "/failed_eds_health/eds_status_draining",
        Ok(HealthStatus::Degraded) => "/degraded_eds_health",
        _ => "",
    });
    if flags.is_empty() {
        "healthy".to_owned()
    } else {
        flags
    }
}

/// Envoy prints a success rate not computed (too little volume) as -1.
fn rate_text(p: Option<&waypoint_proto::envoy::r#type::v3::Percent>) -> String {
    p.map_or_else(|| "-1".to_owned(), |p| p.value.to_string())
}

/// `/clusters` text.
pub fn clusters_text(admin: &Admin) -> String {
    let mut out = String::new();
    for view in cluster_views(admin) {
        let name = &view.cluster.name;
        out.push_str(&format!(
            "{name}::observability_name::{}\n",
            observability_name(&view.cluster)
        ));
        for (label, priority) in [
            ("default_priority", RoutingPriority::Default),
            ("high_priority", RoutingPriority::High),
        ] {
            let t = thresholds(&view.cluster, priority);
            let v = |x: &Option<UInt32Value>| x.as_ref().map(|v| v.value).unwrap_or_default();
            out.push_str(&format!(
                "{name}::{label}::max_connections::{}\n",
                v(&t.max_connections)
            ));
            out.push_str(&format!(
                "{name}::{label}::max_pending_requests::{}\n",
                v(&t.max_pending_requests)
            ));
            out.push_str(&format!(
                "{name}::{label}::max_requests::{}\n",
                v(&t.max_requests)
            ));
            out.push_str(&format!(
                "{name}::{label}::max_retries::{}\n",
                v(&t.max_retries)
            ));
        }
        out.push_str(&format!("{name}::added_via_api::{}\n", view.added_via_api));
        if let Some(service) = &view.eds_service_name {
            out.push_str(&format!("{name}::eds_service_name::{service}\n"));
        }
        for host in &view.hosts {
            let addr = address_string(host.address.as_ref());
            let mut stats: Vec<&SimpleMetric> = host.stats.iter().collect();
            stats.sort_by(|a, b| a.name.cmp(&b.name));
            for s in stats {
                out.push_str(&format!("{name}::{addr}::{}::{}\n", s.name, s.value));
            }
            out.push_str(&format!("{name}::{addr}::hostname::{}\n", host.hostname));
            out.push_str(&format!(
                "{name}::{addr}::health_flags::{}\n",
                health_flags(host)
            ));
            out.push_str(&format!("{name}::{addr}::weight::{}\n", host.weight));
            let loc = host.locality.clone().unwrap_or(Locality::default());
            out.push_str(&format!("{name}::{addr}::region::{}\n", loc.region));
            out.push_str(&format!("{name}::{addr}::zone::{}\n", loc.zone));
            out.push_str(&format!("{name}::{addr}::sub_zone::{}\n", loc.sub_zone));
            out.push_str(&format!("{name}::{addr}::canary::false\n"));
            out.push_str(&format!("{name}::{addr}::priority::{}\n", host.priority));
            out.push_str(&format!(
                "{name}::{addr}::success_rate::{}\n",
                rate_text(host.success_rate.as_ref())
            ));
            out.push_str(&format!(
                "{name}::{addr}::local_origin_success_rate::{}\n",
                rate_text(host.local_origin_success_rate.as_ref())
            ));
        }
    }
    out
}

/// `/clusters?format=json` as `envoy.admin.v3.Clusters`.
pub fn clusters_proto(admin: &Admin) -> Clusters {
    Clusters {
        cluster_statuses: cluster_views(admin)
            .into_iter()
            .map(|view| ClusterStatus {
                name: view.cluster.name.clone(),
                added_via_api: view.added_via_api,
                host_statuses: view.hosts,
                circuit_breakers: Some(CircuitBreakers {
                    thresholds: vec![
                        thresholds(&view.cluster, RoutingPriority::Default),
                        thresholds(&view.cluster, RoutingPriority::High),
                    ],
                    ..Default::default()
                }),
                observability_name: observability_name(&view.cluster),
                eds_service_name: view.eds_service_name.unwrap_or_default(),
                ..Default::default()
            })
            .collect(),
    }
}

/// `GET /clusters[?format=json]`.
pub fn handle_clusters(admin: &Admin, format: Option<&str>) -> Response<Body> {
    match format {
        None | Some("text") => text(StatusCode::OK, clusters_text(admin)),
        Some("json") => match waypoint_proto::json::to_json(&clusters_proto(admin)) {
            Ok(v) => json(&v),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        Some(other) => text(
            StatusCode::BAD_REQUEST,
            format!("unknown format '{other}': want text or json\n"),
        ),
    }
}

/// Every active listener: static ones (bootstrap order), then the accepted dynamic ones by name.
fn listeners(admin: &Admin) -> Vec<Listener> {
    let server = &admin.server;
    let mut out: Vec<Listener> = server
        .bootstrap
        .bootstrap
        .static_resources
        .as_ref()
        .map(|s| s.listeners.clone())
        .unwrap_or_default();
    for entry in server.xds.record(ResourceKind::Listener).resources.values() {
        if let Some(l) = entry
            .resource
            .as_ref()
            .and_then(|a| Listener::decode(a.value.as_slice()).ok())
        {
            out.push(l);
        }
    }
    out
}

/// A listener's local address; internal listeners (no socket) are `envoy://<name>/`.
fn listener_address(l: &Listener) -> Address {
    match &l.address {
        Some(a) if a.address.is_some() => a.clone(),
        _ => Address {
            address: Some(address::Address::EnvoyInternalAddress(
                EnvoyInternalAddress {
                    address_name_specifier: Some(AddressNameSpecifier::ServerListenerName(
                        l.name.clone(),
                    )),
                    endpoint_id: String::new(),
                },
            )),
        },
    }
}

/// `GET /listeners[?format=json]`.
pub fn handle_listeners(admin: &Admin, format: Option<&str>) -> Response<Body> {
    let all = listeners(admin);
    match format {
        None | Some("text") => {
            let body: String = all
                .iter()
                .map(|l| {
                    format!(
                        "{}::{}\n",
                        l.name,
                        address_string(Some(&listener_address(l)))
                    )
                })
                .collect();
            text(StatusCode::OK, body)
        }
        Some("json") => {
            let proto = Listeners {
                listener_statuses: all
                    .iter()
                    .map(|l| ListenerStatus {
                        name: l.name.clone(),
                        local_address: Some(listener_address(l)),
                        additional_local_addresses: l
                            .additional_addresses
                            .iter()
                            .filter_map(|a| a.address.clone())
                            .collect(),
                    })
                    .collect(),
            };
            match waypoint_proto::json::to_json(&proto) {
                Ok(v) => json(&v),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        Some(other) => text(
            StatusCode::BAD_REQUEST,
            format!("unknown format '{other}': want text or json\n"),
        ),
    }
}
