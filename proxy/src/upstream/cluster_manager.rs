//! Clusters at run time: for each cluster of the current snapshot, its host set (from the
//! cluster's `load_assignment` or EDS) with a load balancer, its HTTP pools, and for clusters that
//! tunnel (`connect_originate`) an HBONE client keyed by the TLS identity in use. A runtime is
//! rebuilt when its cluster or its endpoints change; pools survive EDS updates.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;

use super::{
    lb::HostSet,
    pool::{H2ClientSettings, Pool, Proto},
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
    stats::Stat,
};

/// Streams per pooled HBONE connection before another one is opened (istiod's sinks announce
/// 100 concurrent streams).
const HBONE_MAX_STREAMS_PER_CONNECTION: usize = 100;

/// Pool identity: host, protocol, and the shared filter state hash.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    host: String,
    proto: Proto,
    sharing: u64,
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
}

impl ClusterStats {
    fn new(dp: &DataPlane, name: &str) -> Self {
        let s = &dp.server.stats;
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
        }
    }
}

type HboneSlot = Option<(Arc<rustls::ClientConfig>, Arc<HboneClient>)>;

/// One cluster at run time.
pub struct ClusterRt {
    /// The compiled cluster.
    pub cluster: Arc<Cluster>,
    assignment: Option<Arc<LoadAssignment>>,
    /// Hosts and the load balancer.
    pub hosts: HostSet,
    pools: Arc<Mutex<HashMap<PoolKey, Arc<Pool>>>>,
    hbone: Arc<Mutex<HboneSlot>>,
    /// Counters.
    pub stats: Arc<ClusterStats>,
    /// Retries in progress (the `max_retries` circuit breaker).
    retries_active: Arc<std::sync::atomic::AtomicU32>,
}

impl ClusterRt {
    /// Counts one retry against the cluster's `max_retries` breaker; `false` when it is open.
    pub fn try_start_retry(&self) -> bool {
        use std::sync::atomic::Ordering;
        let max = self.cluster.circuit_breakers.default.max_retries;
        let prev = self.retries_active.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            self.retries_active.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Ends a retry started by [`ClusterRt::try_start_retry`].
    pub fn finish_retry(&self) {
        self.retries_active
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// The pool for `host` speaking `proto` with the given shared filter state hash.
    pub fn pool(&self, host: &str, proto: Proto, sharing: u64) -> Arc<Pool> {
        let mut pools = match self.pools.lock() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        };
        pools
            .entry(PoolKey {
                host: host.to_owned(),
                proto,
                sharing,
            })
            .or_insert_with(|| {
                let http = self.cluster.http.as_ref();
                let h2 = match http.map(|h| &h.protocol) {
                    Some(UpstreamProtocol::Http2(o)) => Some(o),
                    Some(UpstreamProtocol::UseDownstream { http2, .. }) => http2.as_ref(),
                    _ => None,
                };
                Arc::new(Pool::new(
                    proto,
                    http.and_then(|h| h.common.idle_timeout),
                    H2ClientSettings {
                        initial_stream_window: h2.and_then(|o| o.initial_stream_window_size),
                        initial_connection_window: h2
                            .and_then(|o| o.initial_connection_window_size),
                        keepalive_interval: h2.and_then(|o| o.keepalive_interval),
                        keepalive_timeout: h2.and_then(|o| o.keepalive_timeout),
                    },
                ))
            })
            .clone()
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
    runtimes: ArcSwap<HashMap<String, Arc<ClusterRt>>>,
    write: Mutex<()>,
}

impl ClusterManager {
    /// The runtime of cluster `name` in `snapshot` (built or rebuilt on demand).
    pub fn get(&self, dp: &DataPlane, snapshot: &Snapshot, name: &str) -> Option<Arc<ClusterRt>> {
        let cluster = snapshot.clusters.get(name)?;
        let assignment = match &cluster.discovery {
            Discovery::Eds { service_name, .. } => snapshot.endpoints.get(service_name).cloned(),
            _ => None,
        };
        let fresh = |rt: &ClusterRt| {
            Arc::ptr_eq(&rt.cluster, cluster)
                && match (&rt.assignment, &assignment) {
                    (None, None) => true,
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    _ => false,
                }
        };
        if let Some(rt) = self.runtimes.load().get(name)
            && fresh(rt)
        {
            return Some(rt.clone());
        }
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
            (Discovery::Eds { .. }, Some(a)) => a,
            _ => &empty,
        };
        let previous = current.get(name);
        // Envoy names a cluster's stats by `alt_stat_name` when set (istiod sets `<name>;`).
        let stat_name = if cluster.raw.alt_stat_name.is_empty() {
            name
        } else {
            cluster.raw.alt_stat_name.as_str()
        };
        let rt = Arc::new(ClusterRt {
            cluster: cluster.clone(),
            assignment: assignment.clone(),
            // Unchanged hosts keep their identity and live counters (least request needs them).
            hosts: match previous {
                Some(p) => p.hosts.rebuild(la, cluster.lb_policy, &cluster.common_lb),
                None => HostSet::new(la, cluster.lb_policy, &cluster.common_lb),
            },
            pools: previous.map(|p| p.pools.clone()).unwrap_or_default(),
            hbone: previous.map(|p| p.hbone.clone()).unwrap_or_default(),
            stats: previous
                .map(|p| p.stats.clone())
                .unwrap_or_else(|| Arc::new(ClusterStats::new(dp, stat_name))),
            retries_active: previous
                .map(|p| p.retries_active.clone())
                .unwrap_or_default(),
        });
        let mut next: HashMap<String, Arc<ClusterRt>> = current
            .iter()
            .filter(|(n, _)| snapshot.clusters.contains_key(n.as_str()))
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect();
        next.insert(name.to_owned(), rt.clone());
        self.runtimes.store(Arc::new(next));
        Some(rt)
    }
}
