//! STRICT_DNS and LOGICAL_DNS clusters at run time: each `load_assignment` endpoint's name is
//! resolved by its own task (hickory, reading `/etc/resolv.conf` and `/etc/hosts`, or the name
//! servers of the cluster's `typed_dns_resolver_config`) every `dns_refresh_rate`, at the records'
//! TTL with `respect_dns_ttl`, or with the `dns_failure_refresh_rate` back-off after a failure (a
//! failed resolution keeps the previous addresses, as Envoy). Every resolution that changes the
//! addresses yields a new [`LoadAssignment`], which goes into the cluster's host set through the
//! same diff as EDS ([`Hosts::update`]): hosts whose address did not change keep their state.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicBool, Ordering as AtomicOrdering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;
use hickory_resolver::{
    Resolver, TokioResolver,
    config::{
        LookupIpStrategy, NameServerConfig, NameServerConfigGroup, ResolveHosts, ResolverConfig,
        ResolverOpts,
    },
    name_server::TokioConnectionProvider,
    proto::xfer::Protocol,
};
use tokio::{sync::watch, task::JoinHandle};

use super::lb::Hosts;
use crate::config::{
    Cluster, LoadAssignment, Snapshot,
    cluster::{CommonLb, Discovery, DnsConfig, DnsKind, LbPolicy, LookupFamily, ResolverSpec},
    endpoint::EndpointAddress,
};

/// Envoy's default c-ares query timeout.
const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Envoy's default c-ares query attempts.
const DEFAULT_QUERY_TRIES: usize = 4;

/// The addresses of one resolution chosen per `dns_lookup_family` (Envoy's semantics: AUTO
/// prefers IPv6 and falls back to IPv4, V4_PREFERRED the reverse, ALL keeps both with IPv4
/// first), in answer order without duplicates.
pub fn select(family: LookupFamily, answers: &[IpAddr]) -> Vec<IpAddr> {
    let v4 = || answers.iter().filter(|a| a.is_ipv4());
    let v6 = || answers.iter().filter(|a| a.is_ipv6());
    let chosen: Vec<IpAddr> = match family {
        LookupFamily::V4Only => v4().copied().collect(),
        LookupFamily::V6Only => v6().copied().collect(),
        LookupFamily::Auto if v6().next().is_some() => v6().copied().collect(),
        LookupFamily::Auto => v4().copied().collect(),
        LookupFamily::V4Preferred if v4().next().is_some() => v4().copied().collect(),
        LookupFamily::V4Preferred => v6().copied().collect(),
        LookupFamily::All => v4().chain(v6()).copied().collect(),
    };
    let mut out = Vec::with_capacity(chosen.len());
    for a in chosen {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// The endpoints of `cfg` with each name replaced by its addresses (`resolved[locality][endpoint]`,
/// `None` while unresolved): one host per address for STRICT_DNS, one at the first address for
/// LOGICAL_DNS. Every host keeps its endpoint's weight, health, metadata and locality, and is
/// named by the endpoint's `hostname` or else the DNS name (as Envoy names DNS hosts).
pub fn expand(cfg: &DnsConfig, resolved: &[Vec<Option<Vec<IpAddr>>>]) -> LoadAssignment {
    let mut la = cfg.template.clone();
    for (i, locality) in la.localities.iter_mut().enumerate() {
        let template = std::mem::take(&mut locality.endpoints);
        for (j, ep) in template.into_iter().enumerate() {
            let (Some(target), Some(Some(addrs))) = (
                cfg.targets.get(i).and_then(|t| t.get(j)),
                resolved.get(i).and_then(|r| r.get(j)),
            ) else {
                continue;
            };
            let take = match cfg.kind {
                DnsKind::Strict => addrs.len(),
                DnsKind::Logical => 1,
            };
            for ip in addrs.iter().take(take) {
                let mut host = ep.clone();
                host.address = EndpointAddress::Socket(SocketAddr::new(*ip, target.port));
                if host.hostname.is_none() {
                    host.hostname = Some(target.name.clone());
                }
                locality.endpoints.push(host);
            }
        }
    }
    la
}

/// A hickory resolver for `spec` and `family`. Answers are not cached: each refresh asks again
/// (the refresh timer, not a cache, decides how fresh hosts are, as with Envoy's c-ares).
pub fn resolver(spec: &ResolverSpec, family: LookupFamily) -> TokioResolver {
    let system = hickory_resolver::system_conf::read_system_conf();
    let servers: Vec<NameServerConfig> = spec
        .name_servers
        .iter()
        .map(|a| {
            let proto = if spec.use_tcp {
                Protocol::Tcp
            } else {
                Protocol::Udp
            };
            NameServerConfig::new(*a, proto)
        })
        .collect();
    let (config, mut opts) = match system {
        Ok((sys, opts)) => {
            // `use_resolvers_as_fallback`: ours only when the system has none.
            let use_own =
                !servers.is_empty() && (!spec.servers_as_fallback || sys.name_servers().is_empty());
            let mut ns: Vec<NameServerConfig> = if use_own {
                servers
            } else {
                sys.name_servers().to_vec()
            };
            if spec.use_tcp {
                ns.iter_mut().for_each(|n| n.protocol = Protocol::Tcp);
                ns.dedup_by(|a, b| a.socket_addr == b.socket_addr);
            }
            let (domain, search) = if spec.no_default_search_domain {
                (None, vec![])
            } else {
                (sys.domain().cloned(), sys.search().to_vec())
            };
            (
                ResolverConfig::from_parts(domain, search, NameServerConfigGroup::from(ns)),
                opts,
            )
        }
        // Without /etc/resolv.conf only the configured servers (and /etc/hosts) are used: never
        // a public resolver picked by the library.
        Err(e) if servers.is_empty() => {
            tracing::warn!("no system DNS configuration ({e}); only /etc/hosts answers");
            (
                ResolverConfig::from_parts(None, vec![], NameServerConfigGroup::new()),
                ResolverOpts::default(),
            )
        }
        Err(_) => (
            ResolverConfig::from_parts(None, vec![], NameServerConfigGroup::from(servers)),
            ResolverOpts::default(),
        ),
    };
    opts.ip_strategy = match family {
        LookupFamily::V4Only => LookupIpStrategy::Ipv4Only,
        LookupFamily::V6Only => LookupIpStrategy::Ipv6Only,
        LookupFamily::Auto => LookupIpStrategy::Ipv6thenIpv4,
        LookupFamily::V4Preferred => LookupIpStrategy::Ipv4thenIpv6,
        LookupFamily::All => LookupIpStrategy::Ipv4AndIpv6,
    };
    opts.cache_size = 0;
    opts.use_hosts_file = ResolveHosts::Always;
    opts.timeout = spec.timeout.unwrap_or(DEFAULT_QUERY_TIMEOUT);
    opts.attempts = spec
        .attempts
        .map_or(DEFAULT_QUERY_TRIES, |n| n as usize)
        .max(1);
    let mut builder = Resolver::builder_with_config(config, TokioConnectionProvider::default());
    *builder.options_mut() = opts;
    builder.build()
}

/// The host set a resolution is pushed into, once the cluster has a runtime.
type Bound = Option<(Weak<Hosts>, LbPolicy, CommonLb)>;

/// One DNS cluster's resolution state.
pub struct DnsCluster {
    config: Arc<DnsConfig>,
    /// Addresses per locality, per endpoint (`None`: not resolved yet).
    resolved: Mutex<Vec<Vec<Option<Vec<IpAddr>>>>>,
    /// The latest expansion (`None` before the first resolution).
    latest: ArcSwapOption<LoadAssignment>,
    bound: Mutex<Bound>,
    /// Targets whose first resolution has not completed yet.
    warming: watch::Sender<usize>,
    /// The server's LIVE waits on this cluster (see [`DnsCluster::hold_init`]).
    holds_init: AtomicBool,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for DnsCluster {
    fn drop(&mut self) {
        let tasks = self.tasks.get_mut().unwrap_or_else(PoisonError::into_inner);
        for t in tasks.drain(..) {
            t.abort();
        }
    }
}

impl DnsCluster {
    /// Starts resolving every endpoint of `config` on the current tokio runtime.
    pub fn start(config: Arc<DnsConfig>, cluster: &str) -> Arc<DnsCluster> {
        let resolved = config.targets.iter().map(|t| vec![None; t.len()]).collect();
        let total = config.targets.iter().map(Vec::len).sum();
        let (warming, _) = watch::channel(total);
        let this = Arc::new(DnsCluster {
            config: config.clone(),
            resolved: Mutex::new(resolved),
            latest: ArcSwapOption::empty(),
            bound: Mutex::new(None),
            warming,
            holds_init: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
        });
        let resolver = Arc::new(resolver(&config.resolver, config.family));
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("cluster '{cluster}': no runtime to resolve DNS on");
            return this;
        };
        let mut tasks = Vec::new();
        for (i, group) in config.targets.iter().enumerate() {
            for j in 0..group.len() {
                let weak = Arc::downgrade(&this);
                let resolver = resolver.clone();
                let cluster = cluster.to_owned();
                tasks.push(rt.spawn(async move { run(weak, resolver, i, j, cluster).await }));
            }
        }
        *this.tasks.lock().unwrap_or_else(PoisonError::into_inner) = tasks;
        this
    }

    /// The latest resolved endpoints (`None` before the first resolution).
    pub fn latest(&self) -> Option<Arc<LoadAssignment>> {
        self.latest.load_full()
    }

    /// Whether every endpoint's first resolution has completed (successfully or not), which is
    /// when Envoy considers a DNS cluster initialized.
    pub fn is_warm(&self) -> bool {
        *self.warming.borrow() == 0
    }

    /// A future that ends once the cluster [`is_warm`](Self::is_warm), or is dropped (it holds
    /// no reference to the cluster, so a replaced one can go).
    pub fn warmed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.warming.subscribe();
        async move {
            let _ = rx.wait_for(|n| *n == 0).await;
        }
    }

    /// Whether the server's initialization should now start waiting for this cluster: true once,
    /// for a cluster with `wait_for_warm_on_init` that is still warming.
    pub fn hold_init(&self) -> bool {
        self.config.wait_for_warm
            && !self.is_warm()
            && !self.holds_init.swap(true, AtomicOrdering::SeqCst)
    }

    /// Makes `hosts` follow this cluster's resolutions (so `/clusters` and the balancer see
    /// them without waiting for a request). Nothing is pushed before the cluster is warm (every
    /// endpoint's first resolution ended, successfully or not), as Envoy only uses a DNS cluster
    /// once it is initialized: a cluster that replaces another keeps the other's hosts serving
    /// until then. Once warm, `hosts` gets the latest resolution now and every later one.
    pub fn bind(&self, hosts: &Arc<Hosts>, policy: LbPolicy, common: CommonLb) {
        let mut bound = self.bound.lock().unwrap_or_else(PoisonError::into_inner);
        *bound = Some((Arc::downgrade(hosts), policy, common));
        // Under the lock `record` pushes under: whichever runs last pushes the newest result.
        if self.is_warm()
            && let Some(la) = self.latest.load_full()
        {
            hosts.update(&la, policy, &common);
        }
    }

    /// Stops pushing resolutions anywhere (the cluster was replaced or removed; its own tasks
    /// end when it is dropped).
    pub fn unbind(&self) {
        *self.bound.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Pushes the latest resolution to the bound host set, once warm.
    fn push(&self) {
        let bound = self.bound.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.is_warm() {
            return;
        }
        if let Some((hosts, policy, common)) = bound.as_ref()
            && let Some(h) = hosts.upgrade()
            && let Some(la) = self.latest.load_full()
        {
            h.update(&la, *policy, common);
        }
    }

    /// Records a resolution of target (`i`, `j`); `None` is a failure (the previous addresses
    /// stay). Returns whether the addresses changed.
    fn record(&self, i: usize, j: usize, addrs: Option<Vec<IpAddr>>, first: bool) -> bool {
        let changed = {
            let mut resolved = self.resolved.lock().unwrap_or_else(PoisonError::into_inner);
            let slot = resolved.get_mut(i).and_then(|r| r.get_mut(j));
            match (slot, addrs) {
                (Some(slot), Some(a)) if slot.as_ref() != Some(&a) => {
                    *slot = Some(a);
                    let la = Arc::new(expand(&self.config, &resolved));
                    self.latest.store(Some(la));
                    true
                }
                _ => false,
            }
        };
        if first {
            // An initial failure still ends warming (Envoy initializes a DNS cluster after the
            // first attempt, whatever its outcome); its hosts are then simply empty.
            if self.latest.load().is_none() {
                let resolved = self.resolved.lock().unwrap_or_else(PoisonError::into_inner);
                self.latest
                    .store(Some(Arc::new(expand(&self.config, &resolved))));
            }
            self.warming.send_modify(|n| *n = n.saturating_sub(1));
        }
        if changed || first {
            // The first push happens when the last endpoint's first resolution ends.
            self.push();
        }
        changed
    }
}

/// Resolves target (`i`, `j`) of `cluster` until the cluster is dropped.
async fn run(
    cluster: Weak<DnsCluster>,
    resolver: Arc<TokioResolver>,
    i: usize,
    j: usize,
    name: String,
) {
    let mut failures: u32 = 0;
    let mut first = true;
    loop {
        let Some((cfg, target)) = cluster.upgrade().and_then(|c| {
            let t = c.config.targets.get(i)?.get(j)?.clone();
            Some((c.config.clone(), t))
        }) else {
            return;
        };
        let outcome = resolver.lookup_ip(target.name.as_str()).await;
        let (addrs, ttl) = match outcome {
            Ok(lookup) => {
                let answers: Vec<IpAddr> = lookup.iter().collect();
                let ttl = lookup
                    .valid_until()
                    .saturating_duration_since(Instant::now());
                (Some(select(cfg.family, &answers)), Some(ttl))
            }
            // An empty answer is a successful resolution to no hosts, as with c-ares.
            Err(e) if e.is_no_records_found() => (Some(Vec::new()), None),
            Err(e) => {
                tracing::debug!("cluster '{name}': resolving '{}': {e}", target.name);
                (None, None)
            }
        };
        let ok = addrs.is_some();
        {
            let Some(c) = cluster.upgrade() else { return };
            if c.record(i, j, addrs, first) {
                tracing::debug!("cluster '{name}': '{}' resolved anew", target.name);
            }
        }
        first = false;
        let delay = if ok {
            failures = 0;
            match ttl {
                Some(t) if cfg.respect_ttl && t >= Duration::from_millis(1) => t,
                _ => cfg.refresh_rate,
            }
        } else {
            failures = failures.saturating_add(1);
            failure_delay(&cfg, failures)
        };
        let jitter = cfg.jitter.map_or(Duration::ZERO, |j| {
            Duration::from_millis(rand::random_range(0..=j.as_millis() as u64))
        });
        tokio::time::sleep(delay + jitter).await;
    }
}

/// The wait after the `failures`-th consecutive failure: Envoy's jittered exponential back-off
/// between `dns_failure_refresh_rate`'s base and max, or `dns_refresh_rate` without it.
fn failure_delay(cfg: &DnsConfig, failures: u32) -> Duration {
    let Some((base, max)) = cfg.failure_refresh else {
        return cfg.refresh_rate;
    };
    let exp = base.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
    let cap = exp.min(max).as_millis() as u64;
    let base_ms = base.as_millis() as u64;
    Duration::from_millis(rand::random_range(base_ms.min(cap)..=cap))
}

/// The DNS clusters of a proxy, by name.
#[derive(Default)]
pub struct DnsClusters {
    by_name: Mutex<HashMap<String, Arc<DnsCluster>>>,
}

impl DnsClusters {
    /// The resolution state of `cluster` if it is a DNS cluster, started on first use and
    /// restarted when its DNS settings change (an unchanged cluster re-sent by CDS keeps it).
    pub fn ensure(&self, cluster: &Cluster) -> Option<Arc<DnsCluster>> {
        let Discovery::Dns(cfg) = &cluster.discovery else {
            return None;
        };
        let mut by_name = self.by_name.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(d) = by_name.get(&cluster.name)
            && (Arc::ptr_eq(&d.config, cfg) || *d.config == **cfg)
        {
            return Some(d.clone());
        }
        let d = DnsCluster::start(cfg.clone(), &cluster.name);
        if let Some(old) = by_name.insert(cluster.name.clone(), d.clone()) {
            old.unbind();
        }
        Some(d)
    }

    /// The resolution state of `cluster` if it is a DNS cluster that [`ensure`](Self::ensure)
    /// started with the same DNS settings; never starts or replaces one. The data path uses
    /// this: a request still holding an older snapshot must not restart a resolver with the
    /// settings that snapshot had.
    pub fn find(&self, cluster: &Cluster) -> Option<Arc<DnsCluster>> {
        let Discovery::Dns(cfg) = &cluster.discovery else {
            return None;
        };
        let by_name = self.by_name.lock().unwrap_or_else(PoisonError::into_inner);
        by_name
            .get(&cluster.name)
            .filter(|d| Arc::ptr_eq(&d.config, cfg) || *d.config == **cfg)
            .cloned()
    }

    /// Starts the DNS clusters of `snapshot` and stops those it no longer has.
    pub fn sync(&self, snapshot: &Snapshot) {
        {
            let mut by_name = self.by_name.lock().unwrap_or_else(PoisonError::into_inner);
            by_name.retain(|n, d| {
                let kept = snapshot
                    .clusters
                    .get(n.as_str())
                    .is_some_and(|c| matches!(c.discovery, Discovery::Dns(_)));
                if !kept {
                    d.unbind();
                }
                kept
            });
        }
        for c in snapshot.clusters.values() {
            self.ensure(c);
        }
    }

    /// Whether every DNS cluster has completed its first resolution.
    pub fn all_warm(&self) -> bool {
        self.by_name
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .all(|d| d.is_warm())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::cluster::DnsTarget;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().expect("ip")).collect()
    }

    #[test]
    fn lookup_families_pick_as_envoy() {
        let both = ips(&["10.0.0.1", "::1", "10.0.0.2", "::2", "10.0.0.1"]);
        let v4 = ips(&["10.0.0.1", "10.0.0.2"]);
        let v6 = ips(&["::1", "::2"]);
        assert_eq!(select(LookupFamily::V4Only, &both), v4);
        assert_eq!(select(LookupFamily::V6Only, &both), v6);
        assert_eq!(select(LookupFamily::Auto, &both), v6);
        assert_eq!(
            select(LookupFamily::Auto, &v4),
            v4,
            "AUTO falls back to IPv4"
        );
        assert_eq!(select(LookupFamily::V4Preferred, &both), v4);
        assert_eq!(
            select(LookupFamily::V4Preferred, &v6),
            v6,
            "V4_PREFERRED falls back to IPv6"
        );
        assert_eq!(
            select(LookupFamily::All, &both),
            ips(&["10.0.0.1", "10.0.0.2", "::1", "::2"])
        );
        assert!(select(LookupFamily::V6Only, &v4).is_empty());
    }

    fn config(kind: DnsKind) -> DnsConfig {
        let raw: waypoint_proto::envoy::config::cluster::v3::Cluster =
            waypoint_proto::json::from_json(&serde_json::json!({
                "name": "d", "type": if kind == DnsKind::Strict { "STRICT_DNS" } else { "LOGICAL_DNS" },
                "load_assignment": {"cluster_name": "d", "endpoints": [{"lb_endpoints": [{
                    "endpoint": {"address": {"socket_address": {"address": "svc.test", "port_value": 8080}}},
                    "load_balancing_weight": 3,
                    "metadata": {"filter_metadata": {"istio": {"workload": "w"}}}}]}]}
            }))
            .expect("decodes");
        let c = Cluster::compile(raw, "").expect("compiles");
        match &c.discovery {
            Discovery::Dns(d) => (**d).clone(),
            other => panic!("not a DNS cluster: {other:?}"),
        }
    }

    #[test]
    fn strict_dns_makes_a_host_per_address_keeping_the_endpoint() {
        let cfg = config(DnsKind::Strict);
        assert_eq!(
            cfg.targets,
            vec![vec![DnsTarget {
                name: "svc.test".into(),
                port: 8080
            }]]
        );
        let la = expand(&cfg, &[vec![Some(ips(&["127.0.0.2", "127.0.0.3"]))]]);
        let eps = &la.localities[0].endpoints;
        assert_eq!(eps.len(), 2);
        assert_eq!(
            eps[1].address,
            EndpointAddress::Socket("127.0.0.3:8080".parse().expect("addr"))
        );
        assert!(eps.iter().all(|e| e.weight == 3
            && e.hostname.as_deref() == Some("svc.test")
            && e.metadata.contains_key("istio")));
        // Unresolved: no hosts.
        assert!(
            expand(&cfg, &[vec![None]]).localities[0]
                .endpoints
                .is_empty()
        );
    }

    #[test]
    fn logical_dns_uses_the_first_address_and_refuses_two_endpoints() {
        let cfg = config(DnsKind::Logical);
        let la = expand(&cfg, &[vec![Some(ips(&["127.0.0.4", "127.0.0.5"]))]]);
        assert_eq!(la.localities[0].endpoints.len(), 1);
        assert_eq!(
            la.localities[0].endpoints[0].address,
            EndpointAddress::Socket("127.0.0.4:8080".parse().expect("addr"))
        );
        let ep = serde_json::json!({"endpoint": {"address": {"socket_address":
            {"address": "a.test", "port_value": 1}}}});
        let raw: waypoint_proto::envoy::config::cluster::v3::Cluster =
            waypoint_proto::json::from_json(&serde_json::json!({
                "name": "l", "type": "LOGICAL_DNS",
                "load_assignment": {"cluster_name": "l", "endpoints": [{"lb_endpoints": [ep, ep]}]}
            }))
            .expect("decodes");
        let err = Cluster::compile(raw, "").expect_err("two endpoints");
        assert!(err.to_string().contains("load_assignment"), "{err}");
    }

    #[test]
    fn re_resolution_keeps_unchanged_hosts() {
        let cfg = config(DnsKind::Strict);
        let first = expand(&cfg, &[vec![Some(ips(&["127.0.0.2", "127.0.0.3"]))]]);
        let hosts = Hosts::new(&first, LbPolicy::RoundRobin, &CommonLb::default());
        let before = hosts.hosts();
        let second = expand(&cfg, &[vec![Some(ips(&["127.0.0.3", "127.0.0.4"]))]]);
        hosts.update(&second, LbPolicy::RoundRobin, &CommonLb::default());
        let after = hosts.hosts();
        assert_eq!(after.len(), 2);
        let kept = before
            .iter()
            .find(|h| h.address == EndpointAddress::Socket("127.0.0.3:8080".parse().expect("a")))
            .expect("127.0.0.3 before");
        assert!(
            after.iter().any(|h| Arc::ptr_eq(h, kept)),
            "127.0.0.3 keeps its host"
        );
        assert!(
            !after
                .iter()
                .any(|h| h.address == EndpointAddress::Socket("127.0.0.2:8080".parse().expect("a")))
        );
    }

    #[test]
    fn a_bound_host_set_follows_resolutions_only_once_warm() {
        // Two endpoints: warm once both first resolutions ended.
        let mut cfg = config(DnsKind::Strict);
        let second_target = cfg.targets[0][0].clone();
        cfg.targets[0].push(second_target);
        let second_endpoint = cfg.template.localities[0].endpoints[0].clone();
        cfg.template.localities[0].endpoints.push(second_endpoint);
        let addrs = |h: &Hosts| {
            let mut v: Vec<String> = h
                .hosts()
                .iter()
                .map(|h| match &h.address {
                    EndpointAddress::Socket(a) => a.ip().to_string(),
                    other => format!("{other:?}"),
                })
                .collect();
            v.sort();
            v
        };
        // The host set of the cluster this one replaces.
        let previous = expand(&cfg, &[vec![Some(ips(&["10.0.0.1"])), None]]);
        let hosts = Arc::new(Hosts::new(
            &previous,
            LbPolicy::RoundRobin,
            &CommonLb::default(),
        ));
        // Outside a runtime nothing resolves: the test records resolutions itself.
        let d = DnsCluster::start(Arc::new(cfg), "d");
        d.bind(&hosts, LbPolicy::RoundRobin, CommonLb::default());
        d.record(0, 0, Some(ips(&["10.0.0.2"])), true);
        assert!(!d.is_warm());
        assert_eq!(
            addrs(&hosts),
            ["10.0.0.1"],
            "not warm: the previous hosts serve"
        );
        // The other endpoint's first attempt fails: warm, with what resolved.
        d.record(0, 1, None, true);
        assert!(d.is_warm());
        assert_eq!(addrs(&hosts), ["10.0.0.2"]);
        d.record(0, 1, Some(ips(&["10.0.0.3"])), false);
        assert_eq!(addrs(&hosts), ["10.0.0.2", "10.0.0.3"]);
        // Unbound (replaced): later resolutions go nowhere; a new binding gets the latest.
        d.unbind();
        d.record(0, 0, Some(ips(&["10.0.0.4"])), false);
        assert_eq!(addrs(&hosts), ["10.0.0.2", "10.0.0.3"]);
        d.bind(&hosts, LbPolicy::RoundRobin, CommonLb::default());
        assert_eq!(addrs(&hosts), ["10.0.0.3", "10.0.0.4"]);
    }

    #[test]
    fn find_never_starts_or_replaces_a_cluster() {
        let cluster = |refresh: &str| {
            let raw: waypoint_proto::envoy::config::cluster::v3::Cluster =
                waypoint_proto::json::from_json(&serde_json::json!({
                    "name": "d", "type": "STRICT_DNS", "dns_refresh_rate": refresh,
                    "load_assignment": {"cluster_name": "d", "endpoints": [{"lb_endpoints": [{
                        "endpoint": {"address": {"socket_address": {
                            "address": "svc.test", "port_value": 8080}}}}]}]}
                }))
                .expect("decodes");
            Cluster::compile(raw, "").expect("compiles")
        };
        let (current, older) = (cluster("5s"), cluster("9s"));
        let all = DnsClusters::default();
        assert!(all.find(&current).is_none(), "nothing started yet");
        let started = all.ensure(&current).expect("a DNS cluster");
        let found = all.find(&current).expect("found");
        assert!(Arc::ptr_eq(&started, &found));
        // Another snapshot's settings: not found, and the running one stays.
        assert!(all.find(&older).is_none());
        let still = all.find(&current).expect("still there");
        assert!(Arc::ptr_eq(&started, &still));
    }

    #[test]
    fn failure_back_off_stays_between_base_and_max() {
        let mut cfg = config(DnsKind::Strict);
        assert_eq!(failure_delay(&cfg, 3), cfg.refresh_rate);
        cfg.failure_refresh = Some((Duration::from_millis(100), Duration::from_millis(400)));
        for n in 1..10 {
            let d = failure_delay(&cfg, n);
            assert!(
                d >= Duration::from_millis(100) && d <= Duration::from_millis(400),
                "{d:?}"
            );
        }
    }
}
