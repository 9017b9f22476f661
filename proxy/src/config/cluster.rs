//! Clusters: discovery (STATIC, EDS, ORIGINAL_DST, STRICT_DNS, LOGICAL_DNS), load balancing (round robin, least request,
//! random, ring hash, maglev, cluster-provided), connect timeout, circuit breakers, outlier
//! detection, transport socket, HTTP protocol options and Istio service metadata.

use std::{collections::BTreeMap, ops::Deref, sync::Arc, time::Duration};

use serde_json::Value as Json;
use waypoint_proto::envoy::{
    config::{
        cluster::v3::{
            CircuitBreakers as RawCircuitBreakers, Cluster as RawCluster,
            OutlierDetection as RawOutlierDetection,
            cluster::{
                ClusterDiscoveryType, DiscoveryType, LbConfig, LbPolicy as RawLbPolicy,
                common_lb_config::LocalityConfigSpecifier,
            },
        },
        core::v3::RoutingPriority,
    },
    extensions::upstreams::http::v3::HttpProtocolOptions,
};

use super::{
    CompileResult, ConfigError, duration,
    endpoint::{LoadAssignment, metadata},
    field, index, key, opt_duration,
    protocol::UpstreamHttpOptions,
    source::{ConfigSourceSpec, Source},
    supported::ExtensionKind,
    tls::{Side, TransportSocket},
    typed::Typed,
};

/// Envoy's default `connect_timeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The only `typed_extension_protocol_options` key we understand.
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// `original_dst_lb_config`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OriginalDstConfig {
    /// `use_http_header`: the destination comes from a request header.
    pub use_http_header: bool,
    /// `http_header_name` (default `x-envoy-original-dst-host`).
    pub http_header_name: Option<String>,
    /// `upstream_port_override` (15008 for HBONE).
    pub port_override: Option<u16>,
    /// `metadata_key`: (namespace, path) in dynamic/host metadata holding `ip:port`.
    pub metadata_key: Option<(String, Vec<String>)>,
}

/// How endpoints are found.
#[derive(Debug, Clone, PartialEq)]
pub enum Discovery {
    /// `load_assignment` in the cluster.
    Static(LoadAssignment),
    /// EDS by service name.
    Eds {
        /// `eds_cluster_config.service_name` (default: the cluster name).
        service_name: String,
        /// `eds_cluster_config.eds_config`.
        source: ConfigSourceSpec,
    },
    /// The connection's original destination.
    OriginalDst(OriginalDstConfig),
    /// STRICT_DNS / LOGICAL_DNS: `load_assignment` hostnames resolved at run time
    /// (`crate::upstream::dns`).
    Dns(Arc<DnsConfig>),
}

/// Which DNS cluster type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsKind {
    /// `STRICT_DNS`: every resolved address is a host.
    Strict,
    /// `LOGICAL_DNS`: one host at the first address of the latest resolution.
    Logical,
}

/// `dns_lookup_family`, as Envoy defines the values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupFamily {
    /// IPv6 addresses if there are any, else IPv4.
    Auto,
    /// IPv4 only.
    V4Only,
    /// IPv6 only.
    V6Only,
    /// IPv4 addresses if there are any, else IPv6.
    V4Preferred,
    /// Both families (IPv4 first).
    All,
}

/// One endpoint's DNS name and port (`endpoint.address.socket_address`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsTarget {
    /// The name to resolve.
    pub name: String,
    /// `port_value`.
    pub port: u16,
}

/// The resolver to use (`typed_dns_resolver_config`, or the deprecated `dns_resolvers`,
/// `use_tcp_for_dns_lookups`, `dns_resolution_config`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResolverSpec {
    /// Name servers replacing `/etc/resolv.conf`'s (empty: the system's).
    pub name_servers: Vec<std::net::SocketAddr>,
    /// `use_resolvers_as_fallback`: the name servers only when the system has none.
    pub servers_as_fallback: bool,
    /// `use_tcp_for_dns_lookups`.
    pub use_tcp: bool,
    /// `no_default_search_domain`: no `search` list from `/etc/resolv.conf`.
    pub no_default_search_domain: bool,
    /// `query_timeout_seconds` (Envoy's c-ares default 5 s).
    pub timeout: Option<Duration>,
    /// `query_tries` / getaddrinfo `num_retries` + 1.
    pub attempts: Option<u32>,
}

/// A DNS cluster's discovery settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DnsConfig {
    /// STRICT or LOGICAL.
    pub kind: DnsKind,
    /// `load_assignment` with every endpoint address still unresolved (the IP is a placeholder,
    /// the port is the configured one): weights, health, locality, priority and metadata.
    pub template: LoadAssignment,
    /// Per locality of `template`, per endpoint: what to resolve.
    pub targets: Vec<Vec<DnsTarget>>,
    /// `dns_lookup_family`.
    pub family: LookupFamily,
    /// `dns_refresh_rate` (default 5 s).
    pub refresh_rate: Duration,
    /// `dns_jitter`: a random extra delay up to this, added to each refresh.
    pub jitter: Option<Duration>,
    /// `dns_failure_refresh_rate` (base, max) for the back-off after failures; without it
    /// failures retry at `refresh_rate`.
    pub failure_refresh: Option<(Duration, Duration)>,
    /// `respect_dns_ttl`: refresh at the records' TTL instead.
    pub respect_ttl: bool,
    /// The resolver.
    pub resolver: ResolverSpec,
    /// `wait_for_warm_on_init` (default true): the server does not go LIVE before the first
    /// resolution of every endpoint has completed.
    pub wait_for_warm: bool,
}

/// Envoy's default `dns_refresh_rate`.
const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(5);
/// The c-ares resolver config type.
const CARES: &str = "envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig";
/// The getaddrinfo resolver config type.
const GETADDRINFO: &str =
    "envoy.extensions.network.dns_resolver.getaddrinfo.v3.GetAddrInfoDnsResolverConfig";

fn positive_ms(d: Duration, path: &str) -> CompileResult<Duration> {
    if d < Duration::from_millis(1) {
        return Err(ConfigError::new(path, "must be at least 1ms"));
    }
    Ok(d)
}

fn resolver_addresses(
    list: &[waypoint_proto::envoy::config::core::v3::Address],
    path: &str,
    name: &str,
) -> CompileResult<Vec<std::net::SocketAddr>> {
    list.iter()
        .enumerate()
        .map(|(i, a)| {
            let p = index(path, name, i);
            let (mut addr, _) = super::listener::socket_address(a, &p)?;
            // c-ares's default DNS port when none is given.
            if addr.port() == 0 {
                addr.set_port(53);
            }
            Ok(addr)
        })
        .collect()
}

impl DnsConfig {
    // The DNS fields of `Cluster` are deprecated in favour of the `envoy.clusters.dns` extension,
    // but istiod still sets them.
    #[allow(deprecated)]
    fn compile(c: &RawCluster, kind: DnsKind, path: &str) -> CompileResult<Self> {
        use waypoint_proto::envoy::config::{
            cluster::v3::cluster::DnsLookupFamily,
            core::v3::{address, socket_address::PortSpecifier},
        };
        let lpath = field(path, "load_assignment");
        let mut raw_la = c.load_assignment.clone().unwrap_or_default();
        let mut targets = Vec::with_capacity(raw_la.endpoints.len());
        for (i, group) in raw_la.endpoints.iter_mut().enumerate() {
            let gpath = index(&lpath, "endpoints", i);
            let mut names = Vec::with_capacity(group.lb_endpoints.len());
            for (j, lb) in group.lb_endpoints.iter_mut().enumerate() {
                use waypoint_proto::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
                let apath = field(
                    &field(&index(&gpath, "lb_endpoints", j), "endpoint"),
                    "address",
                );
                let sa = match &mut lb.host_identifier {
                    Some(HostIdentifier::Endpoint(e)) => {
                        match e.address.as_mut().and_then(|a| a.address.as_mut()) {
                            Some(address::Address::SocketAddress(sa)) => sa,
                            _ => {
                                return Err(ConfigError::new(
                                    field(&apath, "socket_address"),
                                    "a DNS cluster's endpoints need a socket_address",
                                ));
                            }
                        }
                    }
                    // LoadAssignment::compile reports the other shapes.
                    _ => continue,
                };
                let spath = field(&apath, "socket_address");
                if sa.address.is_empty() {
                    return Err(ConfigError::new(
                        field(&spath, "address"),
                        "address is required",
                    ));
                }
                if !sa.resolver_name.is_empty() {
                    return Err(ConfigError::new(
                        field(&spath, "resolver_name"),
                        "custom resolvers are not supported",
                    ));
                }
                let port = match sa.port_specifier {
                    Some(PortSpecifier::PortValue(p)) => u16::try_from(p).map_err(|_| {
                        ConfigError::new(
                            field(&spath, "port_value"),
                            format!("port {p} out of range"),
                        )
                    })?,
                    _ => {
                        return Err(ConfigError::new(
                            field(&spath, "port_value"),
                            "a DNS cluster's endpoints need a port_value",
                        ));
                    }
                };
                names.push(DnsTarget {
                    name: std::mem::replace(&mut sa.address, "0.0.0.0".to_owned()),
                    port,
                });
            }
            targets.push(names);
        }
        if kind == DnsKind::Logical
            && (raw_la.endpoints.len() != 1 || raw_la.endpoints[0].lb_endpoints.len() != 1)
        {
            return Err(ConfigError::new(
                lpath,
                "LOGICAL_DNS clusters must have a single locality_lb_endpoint and a single lb_endpoint",
            ));
        }
        let template = LoadAssignment::compile(&raw_la, &lpath)?;
        let family = match DnsLookupFamily::try_from(c.dns_lookup_family) {
            Ok(DnsLookupFamily::Auto) => LookupFamily::Auto,
            Ok(DnsLookupFamily::V4Only) => LookupFamily::V4Only,
            Ok(DnsLookupFamily::V6Only) => LookupFamily::V6Only,
            Ok(DnsLookupFamily::V4Preferred) => LookupFamily::V4Preferred,
            Ok(DnsLookupFamily::All) => LookupFamily::All,
            Err(_) => {
                return Err(ConfigError::new(
                    field(path, "dns_lookup_family"),
                    format!("unknown value {}", c.dns_lookup_family),
                ));
            }
        };
        let refresh_rate = match &c.dns_refresh_rate {
            Some(d) => positive_ms(
                duration(d, &field(path, "dns_refresh_rate"))?,
                &field(path, "dns_refresh_rate"),
            )?,
            None => DEFAULT_DNS_REFRESH,
        };
        let jitter = opt_duration(c.dns_jitter.as_ref(), &field(path, "dns_jitter"))?
            .filter(|d| !d.is_zero());
        let failure_refresh = match &c.dns_failure_refresh_rate {
            None => None,
            Some(r) => {
                let rpath = field(path, "dns_failure_refresh_rate");
                let base = r
                    .base_interval
                    .as_ref()
                    .ok_or_else(|| ConfigError::new(field(&rpath, "base_interval"), "required"))?;
                let base = positive_ms(
                    duration(base, &field(&rpath, "base_interval"))?,
                    &field(&rpath, "base_interval"),
                )?;
                let max = opt_duration(r.max_interval.as_ref(), &field(&rpath, "max_interval"))?
                    .unwrap_or(base * 10);
                if max < base {
                    return Err(ConfigError::new(
                        field(&rpath, "max_interval"),
                        "must not be below base_interval",
                    ));
                }
                Some((base, max))
            }
        };
        Ok(DnsConfig {
            kind,
            template,
            targets,
            family,
            refresh_rate,
            jitter,
            failure_refresh,
            respect_ttl: c.respect_dns_ttl,
            resolver: ResolverSpec::compile(c, path)?,
            wait_for_warm: c.wait_for_warm_on_init.is_none_or(|b| b.value),
        })
    }
}

impl ResolverSpec {
    fn compile(c: &RawCluster, path: &str) -> CompileResult<Self> {
        let mut spec = ResolverSpec::default();
        if let Some(t) = &c.typed_dns_resolver_config {
            let tpath = field(path, "typed_dns_resolver_config");
            let cpath = field(&tpath, "typed_config");
            let any = t
                .typed_config
                .as_ref()
                .ok_or_else(|| ConfigError::new(&cpath, "typed_config is required"))?;
            let typed = Typed::new(any, &cpath)?;
            let name = typed
                .check_kind(&[ExtensionKind::DnsResolver], "a DNS resolver", &cpath)?
                .to_owned();
            let ipath = typed.inner_path(&cpath);
            if name == CARES {
                use waypoint_proto::envoy::extensions::network::dns_resolver::cares::v3::CaresDnsResolverConfig;
                let cfg: CaresDnsResolverConfig = typed.decode(&name, &cpath)?;
                spec.name_servers = resolver_addresses(&cfg.resolvers, &ipath, "resolvers")?;
                spec.servers_as_fallback = cfg.use_resolvers_as_fallback;
                if let Some(o) = &cfg.dns_resolver_options {
                    spec.use_tcp = o.use_tcp_for_dns_lookups;
                    spec.no_default_search_domain = o.no_default_search_domain;
                }
                spec.timeout = cfg
                    .query_timeout_seconds
                    .map(|v| Duration::from_secs(v.value))
                    .filter(|d| !d.is_zero());
                spec.attempts = cfg.query_tries.map(|v| v.value).filter(|n| *n > 0);
            } else if name == GETADDRINFO {
                use waypoint_proto::envoy::extensions::network::dns_resolver::getaddrinfo::v3::GetAddrInfoDnsResolverConfig;
                let cfg: GetAddrInfoDnsResolverConfig = typed.decode(&name, &cpath)?;
                spec.attempts = cfg.num_retries.map(|v| v.value.saturating_add(1));
            }
            return Ok(spec);
        }
        // The deprecated spellings, honoured only without typed_dns_resolver_config (as Envoy).
        #[allow(deprecated)]
        {
            if let Some(r) = &c.dns_resolution_config {
                let rpath = field(path, "dns_resolution_config");
                spec.name_servers = resolver_addresses(&r.resolvers, &rpath, "resolvers")?;
                if let Some(o) = &r.dns_resolver_options {
                    spec.use_tcp = o.use_tcp_for_dns_lookups;
                    spec.no_default_search_domain = o.no_default_search_domain;
                }
            } else {
                spec.name_servers = resolver_addresses(&c.dns_resolvers, path, "dns_resolvers")?;
                spec.use_tcp = c.use_tcp_for_dns_lookups;
            }
        }
        Ok(spec)
    }
}

/// Load balancing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    /// Weighted round robin.
    RoundRobin,
    /// Power of `choice_count` choices (default 2).
    LeastRequest {
        /// `least_request_lb_config.choice_count`.
        choice_count: u32,
    },
    /// Random.
    Random,
    /// Ketama ring.
    RingHash {
        /// `minimum_ring_size` (default 1024).
        min_ring_size: u64,
        /// `maximum_ring_size` (default 8M).
        max_ring_size: u64,
    },
    /// Maglev.
    Maglev {
        /// `table_size` (default 65537, prime).
        table_size: u64,
    },
    /// The cluster picks (ORIGINAL_DST).
    ClusterProvided,
}

/// One circuit breaker threshold set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// `max_connections` (default 1024).
    pub max_connections: u32,
    /// `max_pending_requests` (default 1024).
    pub max_pending_requests: u32,
    /// `max_requests` (default 1024).
    pub max_requests: u32,
    /// `max_retries` (default 3).
    pub max_retries: u32,
    /// `max_connection_pools` (unlimited by default).
    pub max_connection_pools: Option<u32>,
    /// `retry_budget`: (budget percent, min retry concurrency).
    pub retry_budget: Option<(f64, u32)>,
    /// `track_remaining`: publish the `remaining_*` gauges.
    pub track_remaining: bool,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            max_connection_pools: None,
            retry_budget: None,
            track_remaining: false,
        }
    }
}

/// Circuit breakers per priority.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CircuitBreakers {
    /// DEFAULT priority.
    pub default: Thresholds,
    /// HIGH priority.
    pub high: Thresholds,
    /// `per_host_thresholds.max_connections`.
    pub per_host_max_connections: Option<u32>,
}

impl CircuitBreakers {
    fn compile(c: &RawCircuitBreakers, path: &str) -> CompileResult<Self> {
        let mut out = CircuitBreakers::default();
        let mut seen = [false, false];
        for (i, t) in c.thresholds.iter().enumerate() {
            let tpath = index(path, "thresholds", i);
            let high = RoutingPriority::try_from(t.priority) == Ok(RoutingPriority::High);
            if std::mem::replace(&mut seen[usize::from(high)], true) {
                return Err(ConfigError::new(
                    tpath,
                    "a priority may have one threshold set",
                ));
            }
            let d = Thresholds::default();
            let budget = match &t.retry_budget {
                None => None,
                Some(b) => {
                    let pct = b.budget_percent.as_ref().map_or(20.0, |p| p.value);
                    if !(0.0..=100.0).contains(&pct) {
                        return Err(ConfigError::new(
                            field(&field(&tpath, "retry_budget"), "budget_percent"),
                            format!("{pct} is outside [0, 100]"),
                        ));
                    }
                    Some((pct, b.min_retry_concurrency.as_ref().map_or(3, |v| v.value)))
                }
            };
            let th = Thresholds {
                max_connections: t
                    .max_connections
                    .as_ref()
                    .map_or(d.max_connections, |v| v.value),
                max_pending_requests: t
                    .max_pending_requests
                    .as_ref()
                    .map_or(d.max_pending_requests, |v| v.value),
                max_requests: t.max_requests.as_ref().map_or(d.max_requests, |v| v.value),
                max_retries: t.max_retries.as_ref().map_or(d.max_retries, |v| v.value),
                max_connection_pools: t.max_connection_pools.as_ref().map(|v| v.value),
                retry_budget: budget,
                track_remaining: t.track_remaining,
            };
            if high {
                out.high = th;
            } else {
                out.default = th;
            }
        }
        if let Some(t) = c.per_host_thresholds.first() {
            out.per_host_max_connections = t.max_connections.as_ref().map(|v| v.value);
        }
        if c.per_host_thresholds.len() > 1 {
            return Err(ConfigError::new(
                index(path, "per_host_thresholds", 1),
                "only one per-host threshold set is supported",
            ));
        }
        Ok(out)
    }
}

/// Outlier detection (Envoy's defaults apply to `None` fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutlierDetection {
    /// `consecutive_5xx`.
    pub consecutive_5xx: Option<u32>,
    /// `consecutive_gateway_failure`.
    pub consecutive_gateway_failure: Option<u32>,
    /// `consecutive_local_origin_failure`.
    pub consecutive_local_origin_failure: Option<u32>,
    /// `interval`.
    pub interval: Option<Duration>,
    /// `base_ejection_time`.
    pub base_ejection_time: Option<Duration>,
    /// `max_ejection_time`.
    pub max_ejection_time: Option<Duration>,
    /// `max_ejection_time_jitter`.
    pub max_ejection_time_jitter: Option<Duration>,
    /// `max_ejection_percent`.
    pub max_ejection_percent: Option<u32>,
    /// `enforcing_consecutive_5xx`.
    pub enforcing_consecutive_5xx: Option<u32>,
    /// `enforcing_consecutive_gateway_failure`.
    pub enforcing_consecutive_gateway_failure: Option<u32>,
    /// `enforcing_consecutive_local_origin_failure`.
    pub enforcing_consecutive_local_origin_failure: Option<u32>,
    /// `enforcing_success_rate`.
    pub enforcing_success_rate: Option<u32>,
    /// `enforcing_local_origin_success_rate`.
    pub enforcing_local_origin_success_rate: Option<u32>,
    /// `success_rate_minimum_hosts`.
    pub success_rate_minimum_hosts: Option<u32>,
    /// `success_rate_request_volume`.
    pub success_rate_request_volume: Option<u32>,
    /// `success_rate_stdev_factor`.
    pub success_rate_stdev_factor: Option<u32>,
    /// `failure_percentage_threshold`.
    pub failure_percentage_threshold: Option<u32>,
    /// `enforcing_failure_percentage`.
    pub enforcing_failure_percentage: Option<u32>,
    /// `enforcing_failure_percentage_local_origin`.
    pub enforcing_failure_percentage_local_origin: Option<u32>,
    /// `failure_percentage_minimum_hosts`.
    pub failure_percentage_minimum_hosts: Option<u32>,
    /// `failure_percentage_request_volume`.
    pub failure_percentage_request_volume: Option<u32>,
    /// `split_external_local_origin_errors`.
    pub split_external_local_origin_errors: bool,
    /// `always_eject_one_host`.
    pub always_eject_one_host: bool,
}

impl OutlierDetection {
    fn compile(o: &RawOutlierDetection, path: &str) -> CompileResult<Self> {
        let v =
            |x: &Option<waypoint_proto::google::protobuf::UInt32Value>| x.as_ref().map(|v| v.value);
        let pct = |x: &Option<waypoint_proto::google::protobuf::UInt32Value>,
                   name: &str|
         -> CompileResult<Option<u32>> {
            match v(x) {
                Some(p) if p > 100 => Err(ConfigError::new(
                    field(path, name),
                    format!("{p} is above 100"),
                )),
                other => Ok(other),
            }
        };
        Ok(OutlierDetection {
            consecutive_5xx: v(&o.consecutive_5xx),
            consecutive_gateway_failure: v(&o.consecutive_gateway_failure),
            consecutive_local_origin_failure: v(&o.consecutive_local_origin_failure),
            interval: opt_duration(o.interval.as_ref(), &field(path, "interval"))?,
            base_ejection_time: opt_duration(
                o.base_ejection_time.as_ref(),
                &field(path, "base_ejection_time"),
            )?,
            max_ejection_time: opt_duration(
                o.max_ejection_time.as_ref(),
                &field(path, "max_ejection_time"),
            )?,
            max_ejection_time_jitter: opt_duration(
                o.max_ejection_time_jitter.as_ref(),
                &field(path, "max_ejection_time_jitter"),
            )?,
            max_ejection_percent: pct(&o.max_ejection_percent, "max_ejection_percent")?,
            enforcing_consecutive_5xx: pct(
                &o.enforcing_consecutive_5xx,
                "enforcing_consecutive_5xx",
            )?,
            enforcing_consecutive_gateway_failure: pct(
                &o.enforcing_consecutive_gateway_failure,
                "enforcing_consecutive_gateway_failure",
            )?,
            enforcing_consecutive_local_origin_failure: pct(
                &o.enforcing_consecutive_local_origin_failure,
                "enforcing_consecutive_local_origin_failure",
            )?,
            enforcing_success_rate: pct(&o.enforcing_success_rate, "enforcing_success_rate")?,
            enforcing_local_origin_success_rate: pct(
                &o.enforcing_local_origin_success_rate,
                "enforcing_local_origin_success_rate",
            )?,
            success_rate_minimum_hosts: v(&o.success_rate_minimum_hosts),
            success_rate_request_volume: v(&o.success_rate_request_volume),
            success_rate_stdev_factor: v(&o.success_rate_stdev_factor),
            failure_percentage_threshold: pct(
                &o.failure_percentage_threshold,
                "failure_percentage_threshold",
            )?,
            enforcing_failure_percentage: pct(
                &o.enforcing_failure_percentage,
                "enforcing_failure_percentage",
            )?,
            enforcing_failure_percentage_local_origin: pct(
                &o.enforcing_failure_percentage_local_origin,
                "enforcing_failure_percentage_local_origin",
            )?,
            failure_percentage_minimum_hosts: v(&o.failure_percentage_minimum_hosts),
            failure_percentage_request_volume: v(&o.failure_percentage_request_volume),
            split_external_local_origin_errors: o.split_external_local_origin_errors,
            always_eject_one_host: o.always_eject_one_host.is_some_and(|b| b.value),
        })
    }
}

/// `common_lb_config`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CommonLb {
    /// `healthy_panic_threshold` percent (default 50).
    pub healthy_panic_threshold: Option<f64>,
    /// `locality_weighted_lb_config` set.
    pub locality_weighted: bool,
    /// `close_connections_on_host_set_change`.
    pub close_connections_on_host_set_change: bool,
    /// `consistent_hashing_lb_config.use_hostname_for_hashing`.
    pub use_hostname_for_hashing: bool,
    /// `consistent_hashing_lb_config.hash_balance_factor`.
    pub hash_balance_factor: Option<u32>,
}

/// TCP keepalive for upstream connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpKeepalive {
    /// `keepalive_probes`.
    pub probes: Option<u32>,
    /// `keepalive_time` (seconds idle before probing).
    pub time: Option<u32>,
    /// `keepalive_interval` (seconds between probes).
    pub interval: Option<u32>,
}

/// An Istio service this cluster belongs to (`metadata.filter_metadata.istio.services[]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IstioService {
    /// `host` (FQDN).
    pub host: String,
    /// `name`.
    pub name: String,
    /// `namespace`.
    pub namespace: String,
}

/// A compiled cluster.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// The resource as received (for `/config_dump` and the admin API).
    pub raw: Arc<RawCluster>,
    /// `name`.
    pub name: String,
    /// `type` and its config.
    pub discovery: Discovery,
    /// `lb_policy` and its config.
    pub lb_policy: LbPolicy,
    /// `connect_timeout` (5s default).
    pub connect_timeout: Duration,
    /// `per_connection_buffer_limit_bytes`.
    pub per_connection_buffer_limit_bytes: Option<u32>,
    /// `max_requests_per_connection` (deprecated field; the HTTP options' value wins).
    pub max_requests_per_connection: Option<u32>,
    /// `circuit_breakers`.
    pub circuit_breakers: CircuitBreakers,
    /// `outlier_detection`.
    pub outlier_detection: Option<OutlierDetection>,
    /// `cleanup_interval` (ORIGINAL_DST host expiry; 5s default).
    pub cleanup_interval: Option<Duration>,
    /// `common_lb_config`.
    pub common_lb: CommonLb,
    /// `transport_socket` (`None`: plaintext).
    pub transport_socket: Option<TransportSocket>,
    /// `typed_extension_protocol_options[HttpProtocolOptions]` (`None`: HTTP/1.1 defaults).
    pub http: Option<UpstreamHttpOptions>,
    /// `upstream_connection_options.tcp_keepalive`.
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// `close_connections_on_host_health_failure`.
    pub close_connections_on_host_health_failure: bool,
    /// `ignore_health_on_host_removal`.
    pub ignore_health_on_host_removal: bool,
    /// `metadata.filter_metadata`.
    pub filter_metadata: BTreeMap<String, Json>,
    /// `metadata.filter_metadata.istio.services`.
    pub services: Vec<IstioService>,
    /// The destination service labels of Istio's metrics (from `services[0]`), built once.
    pub service_labels: Arc<crate::telemetry::istio::ServiceLabels>,
}

/// Transitional: code written against the raw Envoy cluster keeps working
/// (`c.cluster_discovery_type`, `c.eds_cluster_config`).
impl Deref for Cluster {
    type Target = RawCluster;
    fn deref(&self) -> &RawCluster {
        &self.raw
    }
}

fn istio_services(md: &BTreeMap<String, Json>, path: &str) -> CompileResult<Vec<IstioService>> {
    let Some(list) = md.get("istio").and_then(|v| v.get("services")) else {
        return Ok(Vec::new());
    };
    let spath = format!("{}.services", key(path, "filter_metadata", "istio"));
    let Json::Array(items) = list else {
        return Err(ConfigError::new(spath, "services must be a list"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let text = |k: &str| {
                s.get(k)
                    .and_then(Json::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            let svc = IstioService {
                host: text("host"),
                name: text("name"),
                namespace: text("namespace"),
            };
            if svc.host.is_empty() {
                return Err(ConfigError::new(
                    format!("{spath}[{i}].host"),
                    "host is required",
                ));
            }
            Ok(svc)
        })
        .collect()
}

impl Cluster {
    /// Compiles `c` (paths from `path`, empty for an xDS resource).
    pub fn compile(c: RawCluster, path: &str) -> CompileResult<Self> {
        if c.name.is_empty() {
            return Err(ConfigError::new(field(path, "name"), "name is required"));
        }
        let kind = match &c.cluster_discovery_type {
            None => DiscoveryType::Static,
            Some(ClusterDiscoveryType::Type(t)) => DiscoveryType::try_from(*t)
                .map_err(|_| ConfigError::new(field(path, "type"), format!("unknown type {t}")))?,
            Some(ClusterDiscoveryType::ClusterType(_)) => {
                return Err(ConfigError::new(
                    field(path, "cluster_type"),
                    "custom cluster types are not supported",
                ));
            }
        };
        let raw_lb = RawLbPolicy::try_from(c.lb_policy)
            .map_err(|_| ConfigError::new(field(path, "lb_policy"), "unknown lb_policy"))?;
        let lb_cfg_path = |name: &str| field(path, name);
        let discovery = match kind {
            DiscoveryType::Static => {
                // Without load_assignment a STATIC cluster simply has no hosts, as in Envoy.
                let la = c.load_assignment.clone().unwrap_or_default();
                Discovery::Static(LoadAssignment::compile(
                    &la,
                    &field(path, "load_assignment"),
                )?)
            }
            DiscoveryType::Eds => {
                let epath = field(path, "eds_cluster_config");
                let eds = c.eds_cluster_config.as_ref().ok_or_else(|| {
                    ConfigError::new(&epath, "an EDS cluster needs eds_cluster_config")
                })?;
                let cfg = eds.eds_config.as_ref().ok_or_else(|| {
                    ConfigError::new(
                        field(&epath, "eds_config"),
                        "an EDS cluster needs eds_config",
                    )
                })?;
                let source = ConfigSourceSpec::compile(cfg, &field(&epath, "eds_config"))?;
                if source.source != Source::Ads {
                    return Err(ConfigError::new(
                        field(&epath, "eds_config"),
                        "EDS is only fetched over ADS",
                    ));
                }
                if c.load_assignment.is_some() {
                    return Err(ConfigError::new(
                        field(path, "load_assignment"),
                        "load_assignment is not used by EDS clusters",
                    ));
                }
                Discovery::Eds {
                    service_name: if eds.service_name.is_empty() {
                        c.name.clone()
                    } else {
                        eds.service_name.clone()
                    },
                    source,
                }
            }
            DiscoveryType::OriginalDst => {
                if raw_lb != RawLbPolicy::ClusterProvided {
                    return Err(ConfigError::new(
                        field(path, "lb_policy"),
                        "an ORIGINAL_DST cluster needs lb_policy CLUSTER_PROVIDED",
                    ));
                }
                if c.load_assignment.is_some() {
                    return Err(ConfigError::new(
                        field(path, "load_assignment"),
                        "an ORIGINAL_DST cluster has no load_assignment",
                    ));
                }
                let cfg = match &c.lb_config {
                    Some(LbConfig::OriginalDstLbConfig(o)) => {
                        let opath = lb_cfg_path("original_dst_lb_config");
                        if !o.http_header_name.is_empty() && !o.use_http_header {
                            return Err(ConfigError::new(
                                field(&opath, "http_header_name"),
                                "needs use_http_header",
                            ));
                        }
                        let port_override =
                            o.upstream_port_override
                                .as_ref()
                                .map(|p| {
                                    u16::try_from(p.value).ok().filter(|p| *p > 0).ok_or_else(
                                        || {
                                            ConfigError::new(
                                                field(&opath, "upstream_port_override"),
                                                format!("port {} out of range", p.value),
                                            )
                                        },
                                    )
                                })
                                .transpose()?;
                        let metadata_key = match &o.metadata_key {
                            None => None,
                            Some(k) => {
                                use waypoint_proto::envoy::r#type::metadata::v3::metadata_key::path_segment::Segment;
                                let kpath = field(&opath, "metadata_key");
                                if k.key.is_empty() {
                                    return Err(ConfigError::new(
                                        field(&kpath, "key"),
                                        "key is required",
                                    ));
                                }
                                let segs = k
                                    .path
                                    .iter()
                                    .enumerate()
                                    .map(|(i, s)| match &s.segment {
                                        Some(Segment::Key(x)) => Ok(x.clone()),
                                        _ => Err(ConfigError::new(
                                            index(&kpath, "path", i),
                                            "key is required",
                                        )),
                                    })
                                    .collect::<CompileResult<Vec<_>>>()?;
                                Some((k.key.clone(), segs))
                            }
                        };
                        OriginalDstConfig {
                            use_http_header: o.use_http_header,
                            http_header_name: (!o.http_header_name.is_empty())
                                .then(|| o.http_header_name.clone()),
                            port_override,
                            metadata_key,
                        }
                    }
                    _ => OriginalDstConfig::default(),
                };
                Discovery::OriginalDst(cfg)
            }
            DiscoveryType::StrictDns => {
                Discovery::Dns(Arc::new(DnsConfig::compile(&c, DnsKind::Strict, path)?))
            }
            DiscoveryType::LogicalDns => {
                Discovery::Dns(Arc::new(DnsConfig::compile(&c, DnsKind::Logical, path)?))
            }
        };
        if raw_lb == RawLbPolicy::ClusterProvided && kind != DiscoveryType::OriginalDst {
            return Err(ConfigError::new(
                field(path, "lb_policy"),
                "value CLUSTER_PROVIDED of envoy.config.cluster.v3.Cluster.lb_policy is only supported on ORIGINAL_DST clusters",
            ));
        }
        let mismatch = |name: &str| {
            Err(ConfigError::new(
                lb_cfg_path(name),
                format!(
                    "{name} does not apply to lb_policy {}",
                    raw_lb.as_str_name()
                ),
            ))
        };
        let lb_policy = match raw_lb {
            RawLbPolicy::RoundRobin => match &c.lb_config {
                None | Some(LbConfig::RoundRobinLbConfig(_)) => LbPolicy::RoundRobin,
                Some(LbConfig::OriginalDstLbConfig(_)) => {
                    return mismatch("original_dst_lb_config");
                }
                Some(LbConfig::RingHashLbConfig(_)) => return mismatch("ring_hash_lb_config"),
                Some(LbConfig::MaglevLbConfig(_)) => return mismatch("maglev_lb_config"),
                Some(LbConfig::LeastRequestLbConfig(_)) => {
                    return mismatch("least_request_lb_config");
                }
            },
            RawLbPolicy::LeastRequest => match &c.lb_config {
                None => LbPolicy::LeastRequest { choice_count: 2 },
                Some(LbConfig::LeastRequestLbConfig(l)) => {
                    let n = l.choice_count.as_ref().map_or(2, |v| v.value);
                    if n < 2 {
                        return Err(ConfigError::new(
                            field(&lb_cfg_path("least_request_lb_config"), "choice_count"),
                            "must be at least 2",
                        ));
                    }
                    LbPolicy::LeastRequest { choice_count: n }
                }
                Some(_) => return mismatch("lb config"),
            },
            RawLbPolicy::Random => match &c.lb_config {
                None => LbPolicy::Random,
                Some(_) => return mismatch("lb config"),
            },
            RawLbPolicy::RingHash => match &c.lb_config {
                None => LbPolicy::RingHash {
                    min_ring_size: 1024,
                    max_ring_size: 8 * 1024 * 1024,
                },
                Some(LbConfig::RingHashLbConfig(r)) => {
                    let min = r.minimum_ring_size.as_ref().map_or(1024, |v| v.value);
                    let max = r
                        .maximum_ring_size
                        .as_ref()
                        .map_or(8 * 1024 * 1024, |v| v.value);
                    if min > max || max > 8 * 1024 * 1024 {
                        return Err(ConfigError::new(
                            lb_cfg_path("ring_hash_lb_config"),
                            format!("ring sizes [{min}, {max}] are invalid (max 8M)"),
                        ));
                    }
                    LbPolicy::RingHash {
                        min_ring_size: min,
                        max_ring_size: max,
                    }
                }
                Some(_) => return mismatch("lb config"),
            },
            RawLbPolicy::Maglev => match &c.lb_config {
                None => LbPolicy::Maglev { table_size: 65_537 },
                Some(LbConfig::MaglevLbConfig(m)) => {
                    let size = m.table_size.as_ref().map_or(65_537, |v| v.value);
                    if !is_prime(size) || size > 5_000_011 {
                        return Err(ConfigError::new(
                            field(&lb_cfg_path("maglev_lb_config"), "table_size"),
                            format!("{size} must be a prime no larger than 5000011"),
                        ));
                    }
                    LbPolicy::Maglev { table_size: size }
                }
                Some(_) => return mismatch("lb config"),
            },
            RawLbPolicy::ClusterProvided => LbPolicy::ClusterProvided,
            other => {
                return Err(ConfigError::new(
                    field(path, "lb_policy"),
                    format!(
                        "value {} of envoy.config.cluster.v3.Cluster.lb_policy is not supported",
                        other.as_str_name()
                    ),
                ));
            }
        };
        let connect_timeout =
            opt_duration(c.connect_timeout.as_ref(), &field(path, "connect_timeout"))?
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        if connect_timeout.is_zero() {
            return Err(ConfigError::new(
                field(path, "connect_timeout"),
                "must be positive",
            ));
        }
        let mut http = None;
        let mut keys: Vec<&String> = c.typed_extension_protocol_options.keys().collect();
        keys.sort();
        for k in keys {
            let opath = key(path, "typed_extension_protocol_options", k);
            if k != HTTP_PROTOCOL_OPTIONS {
                return Err(ConfigError::new(
                    opath,
                    format!("protocol options '{k}' are not supported"),
                ));
            }
            let t = Typed::new(&c.typed_extension_protocol_options[k], &opath)?;
            let name = t
                .check_kind(
                    &[ExtensionKind::ProtocolOptions],
                    "protocol options",
                    &opath,
                )?
                .to_owned();
            let o: HttpProtocolOptions = t.decode(&name, &opath)?;
            http = Some(UpstreamHttpOptions::compile(&o, &t.inner_path(&opath))?);
        }
        let common_lb = match &c.common_lb_config {
            None => CommonLb::default(),
            Some(l) => {
                let lpath = field(path, "common_lb_config");
                let panic = l.healthy_panic_threshold.as_ref().map(|p| p.value);
                if let Some(p) = panic
                    && !(0.0..=100.0).contains(&p)
                {
                    return Err(ConfigError::new(
                        field(&lpath, "healthy_panic_threshold"),
                        format!("{p} is outside [0, 100]"),
                    ));
                }
                CommonLb {
                    healthy_panic_threshold: panic,
                    locality_weighted: matches!(
                        l.locality_config_specifier,
                        Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(_))
                    ),
                    close_connections_on_host_set_change: l.close_connections_on_host_set_change,
                    use_hostname_for_hashing: l
                        .consistent_hashing_lb_config
                        .as_ref()
                        .is_some_and(|h| h.use_hostname_for_hashing),
                    hash_balance_factor: l
                        .consistent_hashing_lb_config
                        .as_ref()
                        .and_then(|h| h.hash_balance_factor.as_ref())
                        .map(|v| v.value),
                }
            }
        };
        let filter_metadata = metadata(c.metadata.as_ref(), &field(path, "metadata"))?;
        let services = istio_services(&filter_metadata, &field(path, "metadata"))?;
        #[allow(deprecated)]
        let max_requests_per_connection = c.max_requests_per_connection.as_ref().map(|v| v.value);
        Ok(Cluster {
            name: c.name.clone(),
            discovery,
            lb_policy,
            connect_timeout,
            per_connection_buffer_limit_bytes: c.per_connection_buffer_limit_bytes.map(|v| v.value),
            max_requests_per_connection,
            circuit_breakers: c
                .circuit_breakers
                .as_ref()
                .map(|cb| CircuitBreakers::compile(cb, &field(path, "circuit_breakers")))
                .transpose()?
                .unwrap_or_default(),
            outlier_detection: c
                .outlier_detection
                .as_ref()
                .map(|o| OutlierDetection::compile(o, &field(path, "outlier_detection")))
                .transpose()?,
            cleanup_interval: c
                .cleanup_interval
                .as_ref()
                .map(|d| duration(d, &field(path, "cleanup_interval")))
                .transpose()?,
            common_lb,
            transport_socket: c
                .transport_socket
                .as_ref()
                .map(|t| {
                    TransportSocket::compile(t, Side::Upstream, &field(path, "transport_socket"))
                })
                .transpose()?,
            http,
            tcp_keepalive: c
                .upstream_connection_options
                .as_ref()
                .and_then(|o| o.tcp_keepalive.as_ref())
                .map(|k| TcpKeepalive {
                    probes: k.keepalive_probes.map(|v| v.value),
                    time: k.keepalive_time.map(|v| v.value),
                    interval: k.keepalive_interval.map(|v| v.value),
                }),
            close_connections_on_host_health_failure: c.close_connections_on_host_health_failure,
            ignore_health_on_host_removal: c.ignore_health_on_host_removal,
            filter_metadata,
            service_labels: Arc::new(crate::telemetry::istio::ServiceLabels::for_cluster(
                &c.name,
                services
                    .iter()
                    .map(|s| (s.host.as_str(), s.name.as_str(), s.namespace.as_str())),
            )),
            services,
            raw: Arc::new(c),
        })
    }

    /// The EDS resource name this cluster needs, if it is an EDS cluster.
    pub fn eds_service_name(&self) -> Option<&str> {
        match &self.discovery {
            Discovery::Eds { service_name, .. } => Some(service_name),
            _ => None,
        }
    }
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut i = 2u64;
    while i * i <= n {
        if n.is_multiple_of(i) {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use waypoint_proto::{json as pjson, resource::ResourceKind};

    use super::*;
    use crate::config::{ConfigStore, Update};

    fn apply(store: &ConfigStore, doc: &Json) -> Vec<String> {
        let kind = ResourceKind::Cluster;
        let update = Update {
            name: kind.name_in_json(doc).expect("named").to_owned(),
            version: "1".into(),
            resource: pjson::any_from_json(kind.type_url(), doc).expect("encodes"),
        };
        store
            .apply(kind, &[update], &[])
            .into_iter()
            .map(|e| e.message)
            .collect()
    }

    fn cluster(outlier: Json) -> Json {
        json!({"name": "c", "type": "STATIC", "connect_timeout": "1s",
            "circuit_breakers": {"thresholds": [
                {"max_connections": 10, "max_pending_requests": 2, "max_requests": 3,
                 "max_retries": 1, "max_connection_pools": 4, "track_remaining": true},
                {"priority": "HIGH", "max_requests": 7}]},
            "outlier_detection": outlier})
    }

    #[test]
    fn outlier_detection_and_circuit_breakers_are_accepted_and_compiled() {
        let store = ConfigStore::default();
        let errors = apply(
            &store,
            &cluster(
                json!({"consecutive_5xx": 3, "interval": "0.5s", "base_ejection_time": "2s",
                "max_ejection_time": "20s", "max_ejection_time_jitter": "1s",
                "max_ejection_percent": 50, "split_external_local_origin_errors": true,
                "consecutive_local_origin_failure": 4, "enforcing_failure_percentage": 100,
                "always_eject_one_host": true}),
            ),
        );
        assert!(errors.is_empty(), "{errors:?}");
        let snap = store.snapshot();
        let c = &snap.clusters["c"];
        let od = c.outlier_detection.expect("outlier_detection");
        assert_eq!(od.consecutive_5xx, Some(3));
        assert_eq!(od.interval, Some(Duration::from_millis(500)));
        assert_eq!(od.max_ejection_time_jitter, Some(Duration::from_secs(1)));
        assert!(od.split_external_local_origin_errors && od.always_eject_one_host);
        let cb = &c.circuit_breakers;
        assert_eq!(
            (
                cb.default.max_connections,
                cb.default.max_pending_requests,
                cb.default.max_requests,
                cb.default.max_retries,
                cb.default.max_connection_pools,
            ),
            (10, 2, 3, 1, Some(4))
        );
        assert!(cb.default.track_remaining);
        assert_eq!(cb.high.max_requests, 7);
        assert!(!cb.high.track_remaining);
    }

    /// A DNS ServiceEntry's cluster as istiod renders it (cluster_builder.go).
    fn dns_cluster(kind: &str, cares: Json) -> Json {
        json!({"name": "outbound|80||example.com", "type": kind, "connect_timeout": "10s",
            "lb_policy": "LEAST_REQUEST", "dns_lookup_family": "V4_ONLY",
            "dns_refresh_rate": "60s", "respect_dns_ttl": true,
            "dns_failure_refresh_rate": {"base_interval": "1s", "max_interval": "10s"},
            "typed_dns_resolver_config": {"name": "envoy.network.dns_resolver.cares",
                "typed_config": cares},
            "load_assignment": {"cluster_name": "outbound|80||example.com", "endpoints": [{
                "locality": {"region": "r"},
                "lb_endpoints": [{"endpoint": {"address": {"socket_address":
                    {"address": "example.com", "port_value": 80}}},
                    "load_balancing_weight": 2}]}]}})
    }

    #[test]
    fn dns_clusters_are_accepted_and_compiled() {
        let store = ConfigStore::default();
        let cares = json!({
            "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
            "resolvers": [{"socket_address": {"address": "127.0.0.53", "port_value": 53}}],
            "dns_resolver_options": {"use_tcp_for_dns_lookups": true, "no_default_search_domain": true},
            "udp_max_queries": 100});
        for kind in ["STRICT_DNS", "LOGICAL_DNS"] {
            let errors = apply(&store, &dns_cluster(kind, cares.clone()));
            assert!(errors.is_empty(), "{kind}: {errors:?}");
            let snap = store.snapshot();
            let Discovery::Dns(d) = &snap.clusters["outbound|80||example.com"].discovery else {
                panic!("{kind}: not a DNS cluster");
            };
            assert_eq!(d.refresh_rate, Duration::from_secs(60));
            assert!(d.respect_ttl);
            assert_eq!(d.family, LookupFamily::V4Only);
            assert_eq!(
                d.failure_refresh,
                Some((Duration::from_secs(1), Duration::from_secs(10)))
            );
            assert_eq!(
                d.resolver.name_servers,
                vec!["127.0.0.53:53".parse().expect("addr")]
            );
            assert!(d.resolver.use_tcp && d.resolver.no_default_search_domain);
            assert_eq!(d.targets[0][0].name, "example.com");
            assert_eq!(d.template.localities[0].endpoints[0].weight, 2);
        }
    }

    #[test]
    fn dns_cluster_settings_we_do_not_implement_are_nacked() {
        let store = ConfigStore::default();
        let cares = json!({
            "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
            "filter_unroutable_families": true});
        let errors = apply(&store, &dns_cluster("STRICT_DNS", cares));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("typed_dns_resolver_config.typed_config.filter_unroutable_families"),
            "{errors:?}"
        );
        let mut two = dns_cluster(
            "LOGICAL_DNS",
            json!({"@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig"}),
        );
        let ep = two["load_assignment"]["endpoints"][0]["lb_endpoints"][0].clone();
        two["load_assignment"]["endpoints"][0]["lb_endpoints"] = json!([ep.clone(), ep]);
        let errors = apply(&store, &two);
        assert!(
            errors
                .iter()
                .any(|e| e.contains("load_assignment") && e.contains("single")),
            "{errors:?}"
        );
    }

    #[test]
    fn unimplemented_outlier_fields_are_nacked_with_their_path() {
        let store = ConfigStore::default();
        let errors = apply(&store, &cluster(json!({"detect_degraded_hosts": true})));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("outlier_detection.detect_degraded_hosts"),
            "{errors:?}"
        );
        let errors = apply(&store, &cluster(json!({"max_ejection_percent": 101})));
        assert!(
            errors.iter().any(|e| e.contains("max_ejection_percent")),
            "{errors:?}"
        );
    }
}
