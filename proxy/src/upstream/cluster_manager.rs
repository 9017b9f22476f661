//! Clusters at run time: for each cluster of the current snapshot, its host set (from the
//! cluster's `load_assignment` or EDS) with a load balancer, its HTTP pools, and for clusters that
//! tunnel (`connect_originate`) an HBONE client keyed by the TLS identity in use, its circuit
//! breakers and its outlier detector. A runtime is rebuilt when its cluster or its endpoints
//! change; the host set (with its ejections), pools, breaker counts and detector carry over.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, Weak},
};

use arc_swap::ArcSwap;

use super::{
    breaker::{Breakers, ResourceManager, Slot},
    lb::{Host, Hosts},
    outlier::{Outcome, OutlierDetector},
    pool::{Limits, Pool, PoolSettings, Proto},
};
use crate::{
    config::{
        Cluster, LoadAssignment, Snapshot,
        cluster::{Discovery, OriginalDstConfig},
        protocol::UpstreamProtocol,
        tls::TransportSocket,
    },
    dataplane::DataPlane,
    flags::ProxyError,
    hbone::{H2Settings, client::HboneClient},
    listener::conn::ConnContext,
    stats::{Stat, Stats},
};

/// Streams per pooled HBONE connection before another one is opened (istiod's sinks announce
/// 100 concurrent streams).
const HBONE_MAX_STREAMS_PER_CONNECTION: usize = 100;

/// Pool identity: host, protocol, and the shared filter state hash.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    host: Arc<str>,
    proto: Proto,
    sharing: u64,
    /// The worker thread using the pool (see `crate::workers::current`).
    worker: usize,
}

/// Per-cluster counters (Envoy's `cluster.<name>.*`).
pub struct ClusterStats {
    /// `upstream_rq_total`.
    pub rq_total: Arc<Stat>,
    /// `upstream_rq_active`.
    pub rq_active: Arc<Stat>,
    /// `upstream_cx_connect_fail`.
    pub cx_connect_fail: Arc<Stat>,
    /// `upstream_rq_timeout`.
    pub rq_timeout: Arc<Stat>,
    /// `upstream_cx_none_healthy`.
    pub none_healthy: Arc<Stat>,
    /// `upstream_rq_retry`.
    pub rq_retry: Arc<Stat>,
    /// `upstream_rq_retry_success`.
    pub retry_success: Arc<Stat>,
    /// `upstream_rq_retry_overflow`.
    pub retry_overflow: Arc<Stat>,
    /// `upstream_rq_retry_limit_exceeded`.
    pub retry_limit_exceeded: Arc<Stat>,
    /// `upstream_cx_total`.
    pub cx_total: Arc<Stat>,
    /// `upstream_cx_active`.
    pub cx_active: Arc<Stat>,
    /// `upstream_cx_overflow`: a connection was needed but `max_connections` was reached.
    pub cx_overflow: Arc<Stat>,
    /// `upstream_cx_pool_overflow`: `max_connection_pools` was reached.
    pub cx_pool_overflow: Arc<Stat>,
    /// `upstream_rq_pending_total`.
    pub rq_pending_total: Arc<Stat>,
    /// `upstream_rq_pending_active`.
    pub rq_pending_active: Arc<Stat>,
    /// `upstream_rq_pending_overflow`: `max_pending_requests` or `max_requests` overflowed.
    pub rq_pending_overflow: Arc<Stat>,
    /// Upstream responses by code (`upstream_rq_<code>`, `upstream_rq_<N>xx`,
    /// `upstream_rq_completed`).
    pub codes: crate::stats::CodeStats,
    /// `upstream_rq_per_try_timeout`.
    pub rq_per_try_timeout: Arc<Stat>,
    /// `upstream_rq_per_try_idle_timeout`.
    pub rq_per_try_idle_timeout: Arc<Stat>,
    /// `upstream_rq_max_duration_reached`: the cluster's `max_stream_duration` ended a stream.
    pub rq_max_duration_reached: Arc<Stat>,
    /// `upstream_cx_idle_timeout`: pooled connections closed by `idle_timeout`.
    pub cx_idle_timeout: Arc<Stat>,
    /// `upstream_cx_max_duration_reached`: connections drained by `max_connection_duration`.
    pub cx_max_duration_reached: Arc<Stat>,
    /// `upstream_cx_max_requests`: connections retired by `max_requests_per_connection`.
    pub cx_max_requests: Arc<Stat>,
}

impl ClusterStats {
    /// The counters of cluster `name` (its stat name) in `s`.
    pub fn new(s: &Stats, name: &str) -> Self {
        let c = |n: &str| s.counter(&format!("cluster.{name}.{n}"));
        ClusterStats {
            rq_total: c("upstream_rq_total"),
            rq_active: s.gauge(&format!("cluster.{name}.upstream_rq_active")),
            cx_connect_fail: c("upstream_cx_connect_fail"),
            rq_timeout: c("upstream_rq_timeout"),
            none_healthy: c("upstream_cx_none_healthy"),
            rq_retry: c("upstream_rq_retry"),
            retry_success: c("upstream_rq_retry_success"),
            retry_overflow: c("upstream_rq_retry_overflow"),
            retry_limit_exceeded: c("upstream_rq_retry_limit_exceeded"),
            cx_total: c("upstream_cx_total"),
            cx_active: s.gauge(&format!("cluster.{name}.upstream_cx_active")),
            cx_overflow: c("upstream_cx_overflow"),
            cx_pool_overflow: c("upstream_cx_pool_overflow"),
            rq_pending_total: c("upstream_rq_pending_total"),
            rq_pending_active: s.gauge(&format!("cluster.{name}.upstream_rq_pending_active")),
            rq_pending_overflow: c("upstream_rq_pending_overflow"),
            codes: crate::stats::CodeStats::new(s, &format!("cluster.{name}.upstream_rq")),
            rq_per_try_timeout: c("upstream_rq_per_try_timeout"),
            rq_per_try_idle_timeout: c("upstream_rq_per_try_idle_timeout"),
            rq_max_duration_reached: c("upstream_rq_max_duration_reached"),
            cx_idle_timeout: c("upstream_cx_idle_timeout"),
            cx_max_duration_reached: c("upstream_cx_max_duration_reached"),
            cx_max_requests: c("upstream_cx_max_requests"),
        }
    }
}

type HboneSlot = Option<(Arc<rustls::ClientConfig>, Arc<HboneClient>)>;

/// One cluster at run time.
pub struct ClusterRt {
    /// The compiled cluster.
    pub cluster: Arc<Cluster>,
    assignment: Option<Arc<LoadAssignment>>,
    /// Hosts and the load balancer (the set is replaced on ejections and EDS updates).
    pub hosts: Arc<Hosts>,
    /// Looked up on every request: foldhash (seeded) rather than SipHash.
    pools: Arc<Mutex<HashMap<PoolKey, Arc<Pool>, foldhash::fast::RandomState>>>,
    hbone: Arc<Mutex<HboneSlot>>,
    /// Counters.
    pub stats: Arc<ClusterStats>,
    /// Circuit breakers per priority.
    pub breakers: Arc<Breakers>,
    /// Outlier detection, when the cluster configures it.
    pub outlier: Option<Arc<OutlierDetector>>,
}

impl ClusterRt {
    /// A retry slot of the route's priority (`high`), given back when dropped; `None` when the
    /// `max_retries` breaker (or the retry budget) is open. Held while the retry backs off, as
    /// Envoy holds its retry resource.
    pub fn retry_slot(&self, high: bool) -> Option<Slot> {
        self.breakers.for_priority(high).try_retry()
    }

    /// The circuit breakers a request of the route's priority (`high`) goes through.
    pub fn limits(&self, high: bool) -> Limits {
        Limits {
            manager: self.breakers.clone(),
            high,
            stats: self.stats.clone(),
        }
    }

    /// The resources of a priority.
    pub fn resources(&self, high: bool) -> &ResourceManager {
        self.breakers.for_priority(high)
    }

    /// Reports one attempt's outcome on `host` to outlier detection (nothing without it).
    pub fn report(&self, host: &Host, outcome: Outcome) {
        if let Some(d) = &self.outlier {
            d.report(host, outcome);
        }
    }

    /// Reports an HTTP attempt on `host`: the response status (after a connection success), or
    /// the failure when it is the host's (connect failure, reset, timeout; not an overflow).
    pub fn report_attempt(&self, host: Option<&Host>, result: Result<u16, &ProxyError>) {
        let (Some(d), Some(host)) = (&self.outlier, host) else {
            return;
        };
        match result {
            Ok(status) => {
                d.report(host, Outcome::LocalConnectSuccess);
                d.report(host, Outcome::Http(status));
            }
            Err(e) => {
                if let Some(o) = Outcome::of_error(e) {
                    d.report(host, o);
                }
            }
        }
    }

    /// Reports a TCP connect to `host` (`tcp_proxy`, CONNECT): success is final, failures are
    /// local-origin.
    pub fn report_connect<T>(&self, host: Option<&Host>, result: &Result<T, ProxyError>) {
        let (Some(d), Some(host)) = (&self.outlier, host) else {
            return;
        };
        match result {
            Ok(_) => d.report(host, Outcome::LocalConnectSuccessFinal),
            Err(e) => {
                if let Some(o) = Outcome::of_error(e) {
                    d.report(host, o);
                }
            }
        }
    }

    /// A `max_connections` slot (DEFAULT priority) for a connection that is not pooled
    /// (`tcp_proxy`); over the limit the connection is refused and counted in
    /// `upstream_cx_overflow`.
    pub fn tcp_connection_slot(&self) -> Result<Slot, ProxyError> {
        self.breakers
            .default
            .connections
            .try_acquire()
            .ok_or_else(|| {
                self.stats.cx_overflow.inc();
                ProxyError::Overflow(format!("{}: max_connections", self.cluster.name))
            })
    }

    /// The pool for `host` speaking `proto` with the given shared filter state hash. A new pool
    /// beyond `max_connection_pools` (of the route's priority, `high`) is an overflow; pools
    /// without connections are forgotten first to make room.
    pub fn pool(
        &self,
        host: &Arc<str>,
        proto: Proto,
        sharing: u64,
        high: bool,
    ) -> Result<Arc<Pool>, ProxyError> {
        let mut pools = match self.pools.lock() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        };
        let key = PoolKey {
            host: host.clone(),
            proto,
            sharing,
            worker: crate::workers::current(),
        };
        if let Some(p) = pools.get(&key) {
            return Ok(p.clone());
        }
        let limit = &self.breakers.for_priority(high).pools;
        if pools.len() as u64 >= limit.max() {
            pools.retain(|_, p| Arc::strong_count(p) > 1 || !p.is_idle());
            if pools.len() as u64 >= limit.max() {
                limit.set_count(pools.len() as u64);
                self.stats.cx_pool_overflow.inc();
                return Err(ProxyError::Overflow(format!(
                    "{}: max_connection_pools",
                    self.cluster.name
                )));
            }
        }
        let pool = pools
            .entry(key)
            .or_insert_with(|| Arc::new(Pool::new(proto, PoolSettings::for_cluster(&self.cluster))))
            .clone();
        limit.set_count(pools.len() as u64);
        Ok(pool)
    }

    /// Which protocol to speak upstream for a downstream request of `downstream` version.
    pub fn protocol(&self, downstream: http::Version) -> Proto {
        match self.cluster.http.as_ref().map(|h| &h.protocol) {
            Some(UpstreamProtocol::Http2(_)) => Proto::Http2,
            Some(UpstreamProtocol::UseDownstream { http2, .. }) => {
                if downstream == http::Version::HTTP_2 && http2.is_some() {
                    Proto::Http2
                } else {
                    Proto::Http1
                }
            }
            _ => Proto::Http1,
        }
    }

    /// The HBONE client of a tunneling cluster, for the TLS identity in use now (a rotated
    /// certificate starts a new client; tunnels on the old one finish undisturbed).
    pub fn hbone_client(&self, dp: &DataPlane) -> Result<Arc<HboneClient>, ProxyError> {
        let tls = match &self.cluster.transport_socket {
            Some(TransportSocket::UpstreamTls(t)) => t,
            _ => {
                return Err(ProxyError::Unsupported(format!(
                    "cluster '{}': tunneling needs a TLS transport socket (HBONE)",
                    self.cluster.name
                )));
            }
        };
        let config = dp
            .tls
            .client_config(tls)
            .map_err(|e| ProxyError::ConnectFailure(format!("TLS context: {e}")))?;
        let mut slot = match self.hbone.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        if let Some((c, client)) = slot.as_ref()
            && Arc::ptr_eq(c, &config)
        {
            return Ok(client.clone());
        }
        let mut settings = H2Settings::default();
        if let Some(UpstreamProtocol::Http2(o)) = self.cluster.http.as_ref().map(|h| &h.protocol) {
            if let Some(w) = o.initial_stream_window_size {
                settings.initial_stream_window = w;
            }
            if let Some(w) = o.initial_connection_window_size {
                settings.initial_connection_window = w;
            }
            settings.keepalive_interval = o.keepalive_interval;
            if let Some(t) = o.keepalive_timeout {
                settings.keepalive_timeout = t;
            }
        }
        if !self.cluster.connect_timeout.is_zero() {
            settings.handshake_timeout = self.cluster.connect_timeout;
        }
        // Connection lifecycle as the cluster's pools have it (idle timeout, default 1 h;
        // max connection duration) and the upstream sockets' TCP keepalive.
        let pool = PoolSettings::for_cluster(&self.cluster);
        settings.idle_timeout = match pool.idle_timeout {
            None => Some(crate::upstream::pool::DEFAULT_IDLE_TIMEOUT),
            Some(d) => Some(d).filter(|d| !d.is_zero()),
        };
        settings.max_connection_duration = pool.max_connection_duration;
        settings.max_requests_per_connection = self
            .cluster
            .http
            .as_ref()
            .and_then(|h| h.common.max_requests_per_connection)
            .filter(|n| *n > 0);
        settings.tcp_keepalive = self.cluster.tcp_keepalive;
        let max_streams = self
            .cluster
            .max_requests_per_connection
            .map(|m| m as usize)
            .unwrap_or(HBONE_MAX_STREAMS_PER_CONNECTION);
        let client = Arc::new(HboneClient::new(config.clone(), settings, max_streams));
        *slot = Some((config, client.clone()));
        Ok(client)
    }
}

/// The address an ORIGINAL_DST cluster connects to for `conn`: the metadata key's value if set
/// (`envoy.filters.listener.original_dst` → `waypoint` in istiod's config), else the connection's
/// (restored) local address; then `upstream_port_override`.
pub fn original_destination(
    cfg: &OriginalDstConfig,
    conn: &ConnContext,
    header: Option<&str>,
) -> Option<SocketAddr> {
    let from_header = if cfg.use_http_header {
        header.and_then(|h| h.parse::<SocketAddr>().ok())
    } else {
        None
    };
    let from_metadata = cfg.metadata_key.as_ref().and_then(|(ns, path)| {
        conn.metadata_value(ns, path)
            .and_then(|v| v.as_str())
            .and_then(|s| s.parse::<SocketAddr>().ok())
    });
    let mut addr = from_header
        .or(from_metadata)
        .or_else(|| conn.local.socket())?;
    if let Some(p) = cfg.port_override {
        addr.set_port(p);
    }
    Some(addr)
}

/// Clusters at run time, by name. Lookups are lock-free.
#[derive(Default)]
pub struct ClusterManager {
    runtimes: ArcSwap<HashMap<String, Arc<ClusterRt>, foldhash::fast::RandomState>>,
    write: Mutex<()>,
    /// STRICT_DNS / LOGICAL_DNS resolution, per cluster.
    pub dns: super::dns::DnsClusters,
}

impl ClusterManager {
    /// Brings every cluster that has a runtime up to `snapshot` right after it is published, as
    /// Envoy applies a CDS/EDS update when it arrives: what an update changes (outlier detection
    /// removed and its ejections lifted, endpoints gone from `/clusters`, breaker limits) shows
    /// at once, not on the cluster's next request. Clusters no longer in `snapshot` are dropped.
    pub fn refresh(&self, dp: &DataPlane, snapshot: &Snapshot) {
        // DNS clusters resolve from the moment they are published (not from their first
        // request), and get a runtime so that resolutions reach their host set and `/clusters`.
        self.dns.sync(snapshot);
        if dp.server.state() == crate::server::ServerState::PreInitializing {
            self.hold_init_for_dns(dp, snapshot);
        }
        let mut names: Vec<String> = self.runtimes.load().keys().cloned().collect();
        let dns_clusters: Vec<String> = snapshot
            .clusters
            .iter()
            .filter(|(n, c)| {
                matches!(c.discovery, Discovery::Dns(_)) && !names.iter().any(|x| x == *n)
            })
            .map(|(n, _)| n.to_string())
            .collect();
        names.extend(dns_clusters);
        for name in &names {
            // A removed cluster yields None here; the next rebuild's filter drops its runtime.
            let _ = self.get(dp, snapshot, name);
        }
        let current = self.runtimes.load_full();
        if current
            .keys()
            .any(|n| !snapshot.clusters.contains_key(n.as_str()))
        {
            let _guard = match self.write.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            let current = self.runtimes.load_full();
            let kept: HashMap<String, Arc<ClusterRt>, foldhash::fast::RandomState> = current
                .iter()
                .filter(|(n, _)| snapshot.clusters.contains_key(n.as_str()))
                .map(|(n, r)| (n.clone(), r.clone()))
                .collect();
            self.runtimes.store(Arc::new(kept));
        }
    }

    /// Holds the server's LIVE until the DNS clusters of `snapshot` that `wait_for_warm_on_init`
    /// have completed their first resolution (successful or not), as Envoy initializes a DNS
    /// cluster after its first resolution and goes LIVE after its cluster manager initialized.
    fn hold_init_for_dns(&self, dp: &DataPlane, snapshot: &Snapshot) {
        for c in snapshot.clusters.values() {
            let Some(d) = self.dns.ensure(c) else {
                continue;
            };
            if !d.hold_init() {
                continue;
            }
            dp.server.cluster_initializing();
            let server = dp.server.clone();
            // The first resolution ends with an answer or the resolver's own timeout; a cluster
            // replaced or removed meanwhile ends the wait too.
            let warmed = d.warmed();
            tokio::spawn(async move {
                warmed.await;
                server.cluster_initialized();
            });
        }
    }

    /// The runtime of cluster `name` in `snapshot` (built or rebuilt on demand).
    pub fn get(&self, dp: &DataPlane, snapshot: &Snapshot, name: &str) -> Option<Arc<ClusterRt>> {
        let cluster = snapshot.clusters.get(name)?;
        let eds = match &cluster.discovery {
            Discovery::Eds { service_name, .. } => snapshot.endpoints.get(service_name).cloned(),
            _ => None,
        };
        // A DNS cluster's resolutions go straight into its host set (`DnsCluster::bind`), so
        // its runtime stays current as long as the cluster itself does: no lock per request.
        let is_dns = matches!(cluster.discovery, Discovery::Dns(_));
        let fresh = |rt: &ClusterRt| {
            Arc::ptr_eq(&rt.cluster, cluster)
                && (is_dns
                    || match (&rt.assignment, &eds) {
                        (None, None) => true,
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                        _ => false,
                    })
        };
        if let Some(rt) = self.runtimes.load().get(name)
            && fresh(rt)
        {
            return Some(rt.clone());
        }
        // Started by `refresh` when the snapshot was published; looked up only, so that a
        // request on an older snapshot does not restart the resolver with older settings.
        let dns = self.dns.find(cluster);
        let assignment = match &dns {
            // A DNS cluster serves its resolution only once warm (see `DnsCluster::bind`).
            Some(d) => d.latest().filter(|_| d.is_warm()),
            None => eds.clone(),
        };
        let _guard = match self.write.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let current = self.runtimes.load_full();
        if let Some(rt) = current.get(name)
            && fresh(rt)
        {
            return Some(rt.clone());
        }
        let empty = LoadAssignment {
            cluster_name: name.to_owned(),
            localities: vec![],
            overprovisioning_factor: 140,
        };
        let la: &LoadAssignment = match (&cluster.discovery, &assignment) {
            (Discovery::Static(la), _) => la,
            (Discovery::Eds { .. } | Discovery::Dns(_), Some(a)) => a,
            _ => &empty,
        };
        let previous = current.get(name);
        // Envoy names a cluster's stats by `alt_stat_name` when set (istiod sets `<name>;`).
        let stat_name = if cluster.raw.alt_stat_name.is_empty() {
            name
        } else {
            cluster.raw.alt_stat_name.as_str()
        };
        let stats = &dp.server.stats;
        // The host set, breakers and detector carry over: unchanged hosts keep their identity,
        // live counters (least request needs them) and ejections; counts in use stay counted.
        // A DNS cluster's host set is updated by `DnsCluster::bind` below, and only once the
        // cluster is warm: one whose DNS settings changed resolves anew while the previous hosts
        // keep serving, as Envoy keeps the old cluster active while the new one warms.
        let hosts = match previous {
            Some(p) => {
                if !is_dns {
                    p.hosts.update(la, cluster.lb_policy, &cluster.common_lb);
                }
                p.hosts.clone()
            }
            None => Arc::new(Hosts::new(la, cluster.lb_policy, &cluster.common_lb)),
        };
        let breakers = previous
            .map(|p| p.breakers.clone())
            .unwrap_or_else(|| Arc::new(Breakers::new(stats, stat_name)));
        breakers.configure(stats, &cluster.circuit_breakers);
        let outlier = match (
            &cluster.outlier_detection,
            previous.and_then(|p| p.outlier.clone()),
        ) {
            (Some(cfg), Some(d)) => {
                d.configure(cfg);
                Some(d)
            }
            (Some(cfg), None) => Some(OutlierDetector::new(cfg, hosts.clone(), stats, stat_name)),
            (None, Some(d)) => {
                d.uneject_all();
                None
            }
            (None, None) => None,
        };
        if previous.is_none_or(|p| !Arc::ptr_eq(&p.hosts, &hosts)) {
            register(stats, name, &hosts);
        }
        if let Some(d) = &dns {
            // From here the host set follows the resolutions (the latest one now, if warm).
            d.bind(&hosts, cluster.lb_policy, cluster.common_lb);
        }
        let rt = Arc::new(ClusterRt {
            cluster: cluster.clone(),
            assignment: assignment.clone(),
            hosts,
            pools: previous.map(|p| p.pools.clone()).unwrap_or_default(),
            hbone: previous.map(|p| p.hbone.clone()).unwrap_or_default(),
            stats: previous
                .map(|p| p.stats.clone())
                .unwrap_or_else(|| Arc::new(ClusterStats::new(stats, stat_name))),
            breakers,
            outlier,
        });
        let mut next: HashMap<String, Arc<ClusterRt>, foldhash::fast::RandomState> = current
            .iter()
            .filter(|(n, _)| snapshot.clusters.contains_key(n.as_str()))
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect();
        next.insert(name.to_owned(), rt.clone());
        self.runtimes.store(Arc::new(next));
        Some(rt)
    }
}

/// Live host sets by (stats store, cluster name), for `/clusters` (ejections, success rates).
///
/// The admin API holds the [`Server`](crate::server::Server) but not the data plane, so the
/// cluster manager publishes its host sets here, keyed by the server's stats store (one per
/// proxy, also when tests run several proxies in one process). Entries are weak: a dropped
/// cluster or server leaves nothing behind.
type LiveEntry = (Weak<Stats>, String, Weak<Hosts>);
static LIVE: Mutex<Vec<LiveEntry>> = Mutex::new(Vec::new());

fn register(stats: &Arc<Stats>, name: &str, hosts: &Arc<Hosts>) {
    let mut live = LIVE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    live.retain(|(s, n, h)| {
        s.strong_count() > 0
            && h.strong_count() > 0
            && !(std::ptr::eq(s.as_ptr(), Arc::as_ptr(stats)) && n == name)
    });
    live.push((
        Arc::downgrade(stats),
        name.to_owned(),
        Arc::downgrade(hosts),
    ));
}

/// The live host set of cluster `name` of the proxy whose stats store is `stats`, once a
/// request has used the cluster.
pub fn live_hosts(stats: &Arc<Stats>, name: &str) -> Option<Arc<Hosts>> {
    let live = LIVE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    live.iter()
        .rev()
        .find(|(s, n, _)| std::ptr::eq(s.as_ptr(), Arc::as_ptr(stats)) && n == name)
        .and_then(|(_, _, h)| h.upgrade())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::cluster::LbPolicy;

    fn runtime(stats: &Arc<Stats>, cluster: serde_json::Value) -> ClusterRt {
        let raw: waypoint_proto::envoy::config::cluster::v3::Cluster =
            waypoint_proto::json::from_json(&cluster).expect("decodes");
        let cluster = Arc::new(Cluster::compile(raw, "").expect("compiles"));
        let la = LoadAssignment {
            cluster_name: cluster.name.clone(),
            localities: vec![],
            overprovisioning_factor: 140,
        };
        let breakers = Arc::new(Breakers::new(stats, &cluster.name));
        breakers.configure(stats, &cluster.circuit_breakers);
        ClusterRt {
            assignment: None,
            hosts: Arc::new(Hosts::new(&la, LbPolicy::RoundRobin, &Default::default())),
            pools: Arc::default(),
            hbone: Arc::default(),
            stats: Arc::new(ClusterStats::new(stats, &cluster.name)),
            breakers,
            outlier: None,
            cluster,
        }
    }

    #[test]
    fn max_connection_pools_overflows_after_forgetting_unused_pools() {
        let stats = Arc::new(Stats::default());
        let rt = runtime(
            &stats,
            serde_json::json!({"name": "c", "type": "STATIC", "circuit_breakers":
                {"thresholds": [{"max_connection_pools": 2}]}}),
        );
        let a = rt.pool(&Arc::from("a"), Proto::Http1, 0, false).expect("a");
        let b = rt.pool(&Arc::from("b"), Proto::Http1, 0, false).expect("b");
        assert!(Arc::ptr_eq(
            &a,
            &rt.pool(&Arc::from("a"), Proto::Http1, 0, false)
                .expect("a again")
        ));
        assert_eq!(
            stats
                .gauge("cluster.c.circuit_breakers.default.cx_pool_open")
                .get(),
            1
        );
        // Both pools are in use (held): a third overflows.
        let over = rt.pool(&Arc::from("c"), Proto::Http1, 0, false);
        assert!(matches!(over, Err(ProxyError::Overflow(_))));
        assert_eq!(rt.stats.cx_pool_overflow.get(), 1);
        // `b` is no longer used and has no connection: it makes room.
        drop(b);
        assert!(rt.pool(&Arc::from("c"), Proto::Http1, 0, false).is_ok());
        // HIGH priority keeps Envoy's default (unlimited).
        assert!(rt.pool(&Arc::from("d"), Proto::Http1, 0, true).is_ok());
        drop(a);
    }

    #[test]
    fn tcp_connections_count_against_max_connections() {
        let stats = Arc::new(Stats::default());
        let rt = runtime(
            &stats,
            serde_json::json!({"name": "c", "type": "STATIC", "circuit_breakers":
                {"thresholds": [{"max_connections": 1}]}}),
        );
        let first = rt.tcp_connection_slot().expect("first");
        assert!(matches!(
            rt.tcp_connection_slot(),
            Err(ProxyError::Overflow(_))
        ));
        assert_eq!(rt.stats.cx_overflow.get(), 1);
        drop(first);
        assert!(rt.tcp_connection_slot().is_ok());
    }

    #[test]
    fn retry_slots_follow_max_retries() {
        let stats = Arc::new(Stats::default());
        let rt = runtime(
            &stats,
            serde_json::json!({"name": "c", "type": "STATIC", "circuit_breakers":
                {"thresholds": [{"max_retries": 1}, {"priority": "HIGH", "max_retries": 0}]}}),
        );
        let r = rt.retry_slot(false).expect("one retry");
        assert!(rt.retry_slot(false).is_none());
        assert!(rt.retry_slot(true).is_none(), "HIGH allows none");
        drop(r);
        assert!(rt.retry_slot(false).is_some());
        assert_eq!(
            stats
                .gauge("cluster.c.circuit_breakers.default.rq_retry_open")
                .get(),
            0
        );
    }
}
