//! Load balancers over a cluster's hosts.
//!
//! A [`HostSet`] is compiled once from a cluster's [`LoadAssignment`], its [`LbPolicy`] and its
//! [`CommonLb`] settings, and then shared by every request of the cluster: the balancer state
//! (round-robin positions, EDF schedules) lives inside it, behind atomics or a short-held mutex.
//! A new assignment means a new `HostSet` ([`HostSet::rebuild`] keeps unchanged hosts, and so their
//! live request counts).
//!
//! The behaviour follows Envoy's load-balancing architecture overview:
//!
//! * **Health.** `HEALTHY` and `UNKNOWN` endpoints are healthy, `DEGRADED` ones are used only for the
//!   share of traffic the healthy ones cannot take, `UNHEALTHY`, `DRAINING` and `TIMEOUT` ones are
//!   left out (except in panic). A host ejected by outlier detection counts as unhealthy
//!   ([`Host::lb_health`]); [`Hosts`] swaps in a rebuilt set on every ejection and return.
//! * **Priority levels.** Each level's health is `min(100, overprovisioning_factor * healthy /
//!   hosts)` (integer percent, as Envoy computes it), likewise for degraded hosts; the levels' loads
//!   are distributed from P=0 down, first to healthy and then to degraded hosts, normalised by the
//!   total availability, with any rounding remainder going to the first available level.
//! * **Panic.** When the normalised total availability is below 100%, a level whose available
//!   (healthy + degraded) share is below `healthy_panic_threshold` (default 50%, 0 disables) is in
//!   panic: traffic sent to it goes to all its hosts regardless of health. When every level is in
//!   panic, load is distributed by host count.
//! * **Localities.** Without `locality_weighted_lb_config`, localities are ignored: the hosts of a
//!   level form one pool. With it, the round robin, least request and random balancers first choose
//!   a locality (weighted random over `locality weight * min(1, overprovisioning * available /
//!   hosts)`; a locality without a weight gets none; when no locality has a weight, the level's
//!   hosts form one pool as Envoy does), then a host inside it. Ring hash and Maglev fold the
//!   locality weights into the host weights of a single table, as Envoy does (also in panic,
//!   where the other balancers pick among all the level's hosts regardless of locality).
//! * **Policies.** Round robin is a strict rotation when the weights are equal and an EDF schedule
//!   otherwise. Least request samples `choice_count` hosts (with replacement) and takes the one
//!   with the fewest active requests when the weights are equal, and otherwise runs an EDF schedule
//!   whose weight is `weight / (active_requests + 1)` (an `active_request_bias` of 1.0) at insertion
//!   time. Random ignores weights, as Envoy's does. Ring hash is Ketama over xxHash64 of
//!   `<key>_<n>`, sized like Envoy's ring; Maglev is Envoy's weighted Maglev table (offset and skip
//!   from xxHash64 with seeds 0 and 1). The hash key of a host is its `envoy.lb` `hash_key`
//!   metadata, else its hostname when `use_hostname_for_hashing`, else its address (`ip:port`,
//!   the pipe path or `envoy://<listener>/<endpoint id>`). Unlike Envoy, degraded hosts get their
//!   own hash table instead of being unreachable for hash policies. `CLUSTER_PROVIDED` clusters
//!   pick their destination elsewhere; their (normally empty) host set is balanced round robin.
//! * **Retries.** [`PickContext::exclude`] lists hosts to avoid (Envoy's `previous_hosts` retry
//!   predicate). The balancer avoids them while another host of the chosen source is available,
//!   and otherwise returns an excluded host rather than nothing. [`HostSet::pick_for_retry`] also
//!   leaves out priority levels (Envoy's `previous_priorities` retry priority, see
//!   [`super::retry_priority`]).
//!
//! Not implemented here: `hash_balance_factor` (bounded loads), slow start, zone-aware routing.

use std::{
    cmp::Ordering,
    collections::{BTreeMap, BinaryHeap, HashMap, hash_map::DefaultHasher},
    fmt::{self, Write as _},
    hash::{Hash, Hasher},
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{self, AtomicU64, AtomicUsize},
    },
};

use serde_json::Value as Json;

use arc_swap::ArcSwap;

use super::{
    outlier::HostMonitor,
    retry_priority::{self, LevelAvailability, PriorityLoad},
};
use crate::config::{
    cluster::{CommonLb, LbPolicy},
    endpoint::{Endpoint, EndpointAddress, Health, LoadAssignment},
};

/// Envoy's default `healthy_panic_threshold` (percent).
const DEFAULT_PANIC_THRESHOLD: f64 = 50.0;
/// Envoy's default Maglev table size (prime).
const DEFAULT_MAGLEV_TABLE_SIZE: u64 = 65_537;
/// Envoy's largest Maglev table size.
const MAX_MAGLEV_TABLE_SIZE: u64 = 5_000_011;
/// Envoy's largest ring.
const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;
/// How many rehashes Maglev tries to get off an excluded host before scanning.
const MAGLEV_RETRY_ATTEMPTS: u64 = 16;
/// The metadata namespace and key of a host's hash key override.
const ENVOY_LB: &str = "envoy.lb";
/// See [`ENVOY_LB`].
const HASH_KEY: &str = "hash_key";

/// A locality: region, zone, sub-zone.
pub type Locality = (String, String, String);

/// One endpoint of a cluster, with its live counters.
#[derive(Debug)]
pub struct Host {
    /// Where the endpoint is.
    pub address: EndpointAddress,
    /// Further addresses (dual stack).
    pub additional_addresses: Vec<SocketAddr>,
    /// `endpoint.hostname`.
    pub hostname: Option<String>,
    /// Load-balancing weight, at least 1 (a configured 0 counts as 1).
    pub weight: u32,
    /// Health as reported by EDS.
    pub health: Health,
    /// `metadata.filter_metadata`, per namespace.
    pub metadata: Arc<BTreeMap<String, Json>>,
    /// Where a tunnelled endpoint really is (`envoy.filters.listener.original_dst` `local`).
    pub original_dst: Option<SocketAddr>,
    /// Priority level (0 is highest).
    pub priority: u32,
    /// Locality, when the assignment names one.
    pub locality: Option<Locality>,
    /// Requests in flight to this host; moved by [`RequestGuard`]s.
    pub active_requests: AtomicU64,
    /// Connections open to this host; moved by [`ConnectionGuard`]s.
    pub active_connections: AtomicU64,
    /// Outlier detection state (ejection), kept across host set rebuilds.
    pub outlier: Arc<HostMonitor>,
    /// The address as text, the key of this host's connection pools (formatted once here, not
    /// per request).
    pub key: Arc<str>,
}

/// The text of `address` that keys connection pools.
pub fn address_key(address: &EndpointAddress) -> Arc<str> {
    match address {
        EndpointAddress::Socket(a) => a.to_string().into(),
        EndpointAddress::Pipe(p) => p.display().to_string().into(),
        EndpointAddress::Internal {
            listener,
            endpoint_id,
        } => format!("{listener}/{}", endpoint_id.as_deref().unwrap_or("")).into(),
    }
}

impl Host {
    /// A host for `ep`, found at `priority` in `locality`.
    pub fn from_endpoint(ep: &Endpoint, priority: u32, locality: Option<&Locality>) -> Self {
        Host {
            address: ep.address.clone(),
            additional_addresses: ep.additional_addresses.clone(),
            hostname: ep.hostname.clone(),
            weight: ep.weight.max(1),
            health: ep.health,
            metadata: Arc::new(ep.metadata.clone()),
            original_dst: ep.original_dst,
            priority,
            locality: locality.cloned(),
            active_requests: AtomicU64::new(0),
            active_connections: AtomicU64::new(0),
            outlier: Arc::default(),
            key: address_key(&ep.address),
        }
    }

    /// Counts a request as active on this host until the guard is dropped.
    pub fn start_request(self: &Arc<Self>) -> RequestGuard {
        self.active_requests.fetch_add(1, atomic::Ordering::Relaxed);
        RequestGuard { host: self.clone() }
    }

    /// Counts a connection as open to this host until the guard is dropped.
    pub fn start_connection(self: &Arc<Self>) -> ConnectionGuard {
        self.active_connections
            .fetch_add(1, atomic::Ordering::Relaxed);
        ConnectionGuard { host: self.clone() }
    }

    /// Requests in flight to this host.
    pub fn active_requests(&self) -> u64 {
        self.active_requests.load(atomic::Ordering::Relaxed)
    }

    /// Connections open to this host.
    pub fn active_connections(&self) -> u64 {
        self.active_connections.load(atomic::Ordering::Relaxed)
    }

    /// Whether the host takes traffic outside panic.
    pub fn is_healthy(&self) -> bool {
        self.lb_health().is_healthy()
    }

    /// The health the load balancer goes by: EDS health, except that a host ejected by outlier
    /// detection is unhealthy (Envoy's `FAILED_OUTLIER_CHECK`).
    pub fn lb_health(&self) -> Health {
        if self.outlier.is_ejected() {
            Health::Unhealthy
        } else {
            self.health
        }
    }

    /// The key ring hash and Maglev place this host by: the `envoy.lb` `hash_key` metadata when
    /// set, else the hostname when `use_hostname` (and one is set), else the address.
    pub fn hash_key(&self, use_hostname: bool) -> String {
        if let Some(Json::String(k)) = self.metadata.get(ENVOY_LB).and_then(|m| m.get(HASH_KEY))
            && !k.is_empty()
        {
            return k.clone();
        }
        if use_hostname
            && let Some(h) = &self.hostname
            && !h.is_empty()
        {
            return h.clone();
        }
        match &self.address {
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

    /// Whether this host is `ep` at `priority` in `locality`, in every field.
    fn is_endpoint(&self, ep: &Endpoint, priority: u32, locality: Option<&Locality>) -> bool {
        self.address == ep.address
            && self.priority == priority
            && self.weight == ep.weight.max(1)
            && self.health == ep.health
            && self.hostname == ep.hostname
            && self.original_dst == ep.original_dst
            && self.additional_addresses == ep.additional_addresses
            && self.locality.as_ref() == locality
            && *self.metadata == ep.metadata
    }

    /// Whether this host is one of `exclude` (the same object, or the same address after an
    /// update replaced the object).
    fn is_in(&self, exclude: &[Arc<Host>]) -> bool {
        exclude
            .iter()
            .any(|e| std::ptr::eq(Arc::as_ptr(e), self) || e.address == self.address)
    }
}

/// Keeps a request counted in [`Host::active_requests`] while alive.
#[derive(Debug)]
#[must_use = "the request is counted only while the guard is held"]
pub struct RequestGuard {
    host: Arc<Host>,
}

impl RequestGuard {
    /// The host the request went to.
    pub fn host(&self) -> &Arc<Host> {
        &self.host
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.host
            .active_requests
            .fetch_sub(1, atomic::Ordering::Relaxed);
    }
}

/// Keeps a connection counted in [`Host::active_connections`] while alive.
#[derive(Debug)]
#[must_use = "the connection is counted only while the guard is held"]
pub struct ConnectionGuard {
    host: Arc<Host>,
}

impl ConnectionGuard {
    /// The host the connection goes to.
    pub fn host(&self) -> &Arc<Host> {
        &self.host
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.host
            .active_connections
            .fetch_sub(1, atomic::Ordering::Relaxed);
    }
}

/// What one pick needs from the request.
#[derive(Debug, Clone, Copy, Default)]
pub struct PickContext<'a> {
    /// The request hash (route `hash_policy`) for ring hash and Maglev; `None` picks at random.
    pub hash: Option<u64>,
    /// Hosts to avoid, such as those already tried by earlier attempts of this request.
    pub exclude: &'a [Arc<Host>],
    /// A fresh random number; every random choice of the pick is derived from it.
    pub random: u64,
}

/// The load and panic state of one priority level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PriorityState {
    /// The priority.
    pub priority: u32,
    /// Hosts at this level.
    pub hosts: usize,
    /// Healthy (or unknown) hosts.
    pub healthy: usize,
    /// Degraded hosts.
    pub degraded: usize,
    /// Percent of traffic sent to this level's healthy hosts.
    pub healthy_load: u32,
    /// Percent of traffic sent to this level's degraded hosts.
    pub degraded_load: u32,
    /// Whether traffic to this level ignores health.
    pub panic: bool,
}

/// A cluster's hosts and its load balancer, shared by all requests of the cluster.
pub struct HostSet {
    cluster_name: String,
    policy: LbPolicy,
    hosts: Vec<Arc<Host>>,
    levels: Vec<Level>,
}

impl fmt::Debug for HostSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostSet")
            .field("cluster_name", &self.cluster_name)
            .field("policy", &self.policy)
            .field("hosts", &self.hosts.len())
            .field(
                "levels",
                &self.levels.iter().map(|l| l.state).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl HostSet {
    /// Compiles `la` for `policy` and `common`.
    pub fn new(la: &LoadAssignment, policy: LbPolicy, common: &CommonLb) -> Self {
        Self::build(la, policy, common, None)
    }

    /// Like [`HostSet::new`], but endpoints that did not change keep their [`Host`] (and so its
    /// active request and connection counts, which least request relies on).
    pub fn rebuild(&self, la: &LoadAssignment, policy: LbPolicy, common: &CommonLb) -> Self {
        Self::build(la, policy, common, Some(self))
    }

    /// The cluster's name.
    pub fn cluster_name(&self) -> &str {
        &self.cluster_name
    }

    /// The load-balancing policy.
    pub fn policy(&self) -> LbPolicy {
        self.policy
    }

    /// Every host, in assignment order.
    pub fn hosts(&self) -> &[Arc<Host>] {
        &self.hosts
    }

    /// Whether there are no hosts at all.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The state of each non-empty priority level, highest priority first.
    pub fn priorities(&self) -> impl Iterator<Item = PriorityState> + '_ {
        self.levels.iter().map(|l| l.state)
    }

    /// Picks a host for one request, or `None` when no host may take traffic.
    pub fn pick(&self, ctx: &PickContext<'_>) -> Option<Arc<Host>> {
        self.pick_for_retry(ctx, &[])
    }

    /// Like [`HostSet::pick`], for a retry whose retry priority (`previous_priorities`) leaves
    /// the levels of `skip_priorities` out: the load is redistributed over the other levels
    /// ([`retry_priority::loads_excluding`]); when none of them is available the usual load
    /// applies. Ring hash and Maglev ignore `skip_priorities`, as Envoy's hash balancers never
    /// consult the retry priority.
    pub fn pick_for_retry(
        &self,
        ctx: &PickContext<'_>,
        skip_priorities: &[u32],
    ) -> Option<Arc<Host>> {
        let mut rng = SplitMix64(ctx.random);
        let hashing = self.hashing();
        // Hash policies choose the level by the request hash too, so that a hash keeps its host
        // while the levels' loads hold.
        let roll = match ctx.hash {
            Some(h) if hashing => h,
            _ => rng.next(),
        };
        let adjusted = if skip_priorities.is_empty() || hashing {
            None
        } else {
            retry_priority::loads_excluding(&self.availability(), skip_priorities)
        };
        let source = self.choose_source(roll, adjusted.as_ref())?;
        let hash = match ctx.hash {
            Some(h) => h,
            None => rng.next(),
        };
        source.pick(ctx, &mut rng, hash).cloned()
    }

    /// Whether a level outside `skip_priorities` has any availability (a retry priority that
    /// leaves them out has somewhere to send the retry).
    pub fn has_load_without(&self, skip_priorities: &[u32]) -> bool {
        retry_priority::loads_excluding(&self.availability(), skip_priorities).is_some()
    }

    fn hashing(&self) -> bool {
        matches!(
            self.policy,
            LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. }
        )
    }

    /// Each level's availability, highest priority first.
    fn availability(&self) -> Vec<LevelAvailability> {
        self.levels.iter().map(|l| l.availability).collect()
    }

    /// Envoy's `choosePriority` and `hostSourceToUse`, over the levels' loads or `adjusted` ones
    /// (indexed like the levels).
    fn choose_source(&self, roll: u64, adjusted: Option<&PriorityLoad>) -> Option<&Source> {
        let point = roll % 100 + 1;
        let mut acc = 0u64;
        let load = |own: u32, i: usize, pick: fn(&PriorityLoad) -> &[u32]| {
            adjusted.map_or(own, |a| pick(a).get(i).copied().unwrap_or(0))
        };
        for (i, level) in self.levels.iter().enumerate() {
            acc += u64::from(load(level.state.healthy_load, i, |a| &a.healthy));
            if point <= acc {
                return level.source(Availability::Healthy);
            }
        }
        for (i, level) in self.levels.iter().enumerate() {
            acc += u64::from(load(level.state.degraded_load, i, |a| &a.degraded));
            if point <= acc {
                return level.source(Availability::Degraded);
            }
        }
        None
    }

    fn build(
        la: &LoadAssignment,
        policy: LbPolicy,
        common: &CommonLb,
        previous: Option<&HostSet>,
    ) -> Self {
        let mut reusable: HashMap<u64, Vec<Arc<Host>>> = HashMap::new();
        if let Some(prev) = previous {
            for h in &prev.hosts {
                reusable
                    .entry(address_hash(&h.address))
                    .or_default()
                    .push(h.clone());
            }
        }
        let mut hosts = Vec::new();
        let mut by_priority: BTreeMap<u32, Vec<Group>> = BTreeMap::new();
        for loc in &la.localities {
            let mut group = Group {
                weight: loc.weight,
                hosts: Vec::with_capacity(loc.endpoints.len()),
            };
            for ep in &loc.endpoints {
                let locality = loc.locality.as_ref();
                let kept = reusable
                    .get_mut(&address_hash(&ep.address))
                    .and_then(|candidates| {
                        let i = candidates
                            .iter()
                            .position(|h| h.is_endpoint(ep, loc.priority, locality))?;
                        Some(candidates.swap_remove(i))
                    });
                let host = kept.unwrap_or_else(|| {
                    let mut h = Host::from_endpoint(ep, loc.priority, locality);
                    // An endpoint whose other fields changed keeps its outlier state.
                    if let Some(prev) = reusable
                        .get(&address_hash(&ep.address))
                        .and_then(|c| c.iter().find(|p| p.address == ep.address))
                    {
                        h.outlier = prev.outlier.clone();
                    }
                    Arc::new(h)
                });
                hosts.push(host.clone());
                group.hosts.push(host);
            }
            if !group.hosts.is_empty() {
                by_priority.entry(loc.priority).or_default().push(group);
            }
        }

        let counts: Vec<Counts> = by_priority
            .values()
            .map(|groups| {
                let mut c = Counts::default();
                for h in groups.iter().flat_map(|g| &g.hosts) {
                    c.total += 1;
                    match h.lb_health() {
                        Health::Healthy | Health::Unknown => c.healthy += 1,
                        Health::Degraded => c.degraded += 1,
                        Health::Unhealthy | Health::Draining | Health::Timeout => {}
                    }
                }
                c
            })
            .collect();
        let threshold = common
            .healthy_panic_threshold
            .unwrap_or(DEFAULT_PANIC_THRESHOLD);
        let loads = compute_loads(&counts, la.overprovisioning_factor, threshold);

        let mut seeds = SplitMix64(rand::random());
        let build = BuildCtx {
            policy,
            common,
            overprovisioning: la.overprovisioning_factor,
        };
        let levels = by_priority
            .iter()
            .zip(&counts)
            .enumerate()
            .map(|(i, ((&priority, groups), c))| {
                let state = PriorityState {
                    priority,
                    hosts: c.total,
                    healthy: c.healthy,
                    degraded: c.degraded,
                    healthy_load: loads.healthy.get(i).copied().unwrap_or(0),
                    degraded_load: loads.degraded.get(i).copied().unwrap_or(0),
                    panic: loads.panic.get(i).copied().unwrap_or(false),
                };
                // Only the sources that can be chosen are built (hash tables are large). A retry
                // priority can send load to any level with available hosts, except under the
                // hash policies, which ignore it.
                let retry_reachable =
                    !matches!(policy, LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. });
                let (healthy, degraded, all) = if state.panic {
                    (
                        None,
                        None,
                        Source::build(groups, Availability::All, &build, &mut seeds),
                    )
                } else {
                    (
                        (state.healthy_load > 0 || (retry_reachable && c.healthy > 0))
                            .then(|| {
                                Source::build(groups, Availability::Healthy, &build, &mut seeds)
                            })
                            .flatten(),
                        (state.degraded_load > 0 || (retry_reachable && c.degraded > 0))
                            .then(|| {
                                Source::build(groups, Availability::Degraded, &build, &mut seeds)
                            })
                            .flatten(),
                        None,
                    )
                };
                Level {
                    state,
                    availability: LevelAvailability {
                        priority,
                        healthy: availability(c.healthy, c.total, la.overprovisioning_factor),
                        degraded: availability(c.degraded, c.total, la.overprovisioning_factor),
                    },
                    healthy,
                    degraded,
                    all,
                }
            })
            .collect();
        HostSet {
            cluster_name: la.cluster_name.clone(),
            policy,
            hosts,
            levels,
        }
    }
}

/// A cluster's current [`HostSet`], replaced whole when endpoints change or a host is ejected
/// or returns (Envoy recomputes the healthy host lists and priority loads on either), so a pick
/// reads one consistent set without locking.
pub struct Hosts {
    current: ArcSwap<HostSet>,
    source: Mutex<(LoadAssignment, LbPolicy, CommonLb)>,
}

impl fmt::Debug for Hosts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.current.load().fmt(f)
    }
}

impl Hosts {
    /// The hosts of `la` balanced by `policy`.
    pub fn new(la: &LoadAssignment, policy: LbPolicy, common: &CommonLb) -> Hosts {
        Hosts {
            current: ArcSwap::from_pointee(HostSet::new(la, policy, common)),
            source: Mutex::new((la.clone(), policy, *common)),
        }
    }

    /// Picks a host (see [`HostSet::pick`]).
    pub fn pick(&self, ctx: &PickContext<'_>) -> Option<Arc<Host>> {
        self.current.load().pick(ctx)
    }

    /// Picks a host for a retry that leaves some priorities out (see
    /// [`HostSet::pick_for_retry`]).
    pub fn pick_for_retry(
        &self,
        ctx: &PickContext<'_>,
        skip_priorities: &[u32],
    ) -> Option<Arc<Host>> {
        self.current.load().pick_for_retry(ctx, skip_priorities)
    }

    /// The current set.
    pub fn load(&self) -> Arc<HostSet> {
        self.current.load_full()
    }

    /// Every host of the current set.
    pub fn hosts(&self) -> Vec<Arc<Host>> {
        self.current.load().hosts().to_vec()
    }

    /// Rebuilds the set from new endpoints or settings (unchanged hosts are kept).
    pub fn update(&self, la: &LoadAssignment, policy: LbPolicy, common: &CommonLb) {
        let mut source = self.source.lock().unwrap_or_else(PoisonError::into_inner);
        let next = self.current.load().rebuild(la, policy, common);
        self.current.store(Arc::new(next));
        *source = (la.clone(), policy, *common);
    }

    /// Rebuilds the set from the same endpoints, after an ejection or a return.
    pub fn refresh(&self) {
        let source = self.source.lock().unwrap_or_else(PoisonError::into_inner);
        let (la, policy, common) = &*source;
        let next = self.current.load().rebuild(la, *policy, common);
        self.current.store(Arc::new(next));
    }
}

/// A hash of an address, to find a previous host for an endpoint.
fn address_hash(a: &EndpointAddress) -> u64 {
    let mut h = DefaultHasher::new();
    match a {
        EndpointAddress::Socket(s) => {
            0u8.hash(&mut h);
            s.hash(&mut h);
        }
        EndpointAddress::Pipe(p) => {
            1u8.hash(&mut h);
            p.hash(&mut h);
        }
        EndpointAddress::Internal {
            listener,
            endpoint_id,
        } => {
            2u8.hash(&mut h);
            listener.hash(&mut h);
            endpoint_id.hash(&mut h);
        }
    }
    h.finish()
}

/// One `LocalityLbEndpoints` entry of a level.
struct Group {
    weight: Option<u32>,
    hosts: Vec<Arc<Host>>,
}

/// Host counts of one level.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    total: usize,
    healthy: usize,
    degraded: usize,
}

/// A level's availability (percent) for `count` of its `total` hosts: `min(100,
/// overprovisioning_factor × count / total)`, in integers as Envoy computes it.
fn availability(count: usize, total: usize, overprovisioning: u32) -> u32 {
    if total == 0 {
        return 0;
    }
    let pct = u64::from(overprovisioning).saturating_mul(count as u64) / total as u64;
    // Capped at 100, so the cast cannot truncate.
    pct.min(100) as u32
}

/// Per-level loads (percent) and panic flags.
#[derive(Debug, PartialEq, Eq)]
struct Loads {
    healthy: Vec<u32>,
    degraded: Vec<u32>,
    panic: Vec<bool>,
}

/// Envoy's `recalculatePerPriorityState` and `recalculatePerPriorityPanic` over the non-empty
/// levels, highest priority first (empty levels take no load and are always in panic, so leaving
/// them out changes nothing).
fn compute_loads(levels: &[Counts], overprovisioning: u32, panic_threshold: f64) -> Loads {
    let n = levels.len();
    let mut out = Loads {
        healthy: vec![0; n],
        degraded: vec![0; n],
        panic: vec![false; n],
    };
    if n == 0 {
        return out;
    }
    let health: Vec<u32> = levels
        .iter()
        .map(|c| availability(c.healthy, c.total, overprovisioning))
        .collect();
    let degraded: Vec<u32> = levels
        .iter()
        .map(|c| availability(c.degraded, c.total, overprovisioning))
        .collect();
    let normalized = health
        .iter()
        .chain(&degraded)
        .map(|&v| u64::from(v))
        .sum::<u64>()
        .min(100) as u32;

    if normalized > 0 {
        let distribute = |out: &mut [u32], avail: &[u32], mut remaining: u32| {
            let mut first = None;
            for (i, (slot, &a)) in out.iter_mut().zip(avail).enumerate() {
                if first.is_none() && a > 0 {
                    first = Some(i);
                }
                *slot = remaining.min(a * 100 / normalized);
                remaining -= *slot;
            }
            (first, remaining)
        };
        let (first_healthy, remaining) = distribute(&mut out.healthy, &health, 100);
        let (first_degraded, remaining) = distribute(&mut out.degraded, &degraded, remaining);
        if remaining > 0 {
            if let Some(i) = first_healthy {
                out.healthy[i] += remaining;
            } else if let Some(i) = first_degraded {
                out.degraded[i] += remaining;
            }
        }
    }

    // Envoy rounds the configured percentage to an integer.
    let threshold = panic_threshold.round().clamp(0.0, 100.0);
    if threshold == 0.0 && normalized == 0 {
        // Panic is disabled and nothing is available: the load must still add up to 100, and the
        // first level will find no host.
        out.healthy[0] = 100;
        return out;
    }
    if normalized == 100 {
        return out;
    }
    for (flag, c) in out.panic.iter_mut().zip(levels) {
        let available = 100.0 * (c.healthy + c.degraded) as f64 / c.total.max(1) as f64;
        *flag = available < threshold;
    }
    if out.panic.iter().all(|&p| p) {
        // Total panic: every level takes load in proportion to its host count.
        let total: usize = levels.iter().map(|c| c.total).sum();
        if total == 0 {
            out.healthy[0] = 100;
            return out;
        }
        let mut remaining = 100u32;
        for (i, c) in levels.iter().enumerate() {
            // At most 100, so the cast cannot truncate.
            let load = (100 * c.total / total) as u32;
            out.healthy[i] = load;
            out.degraded[i] = 0;
            remaining -= load;
        }
        if let Some(i) = levels.iter().position(|c| c.total > 0) {
            out.healthy[i] += remaining;
        }
    }
    out
}

/// Which hosts of a level a source holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Availability {
    Healthy,
    Degraded,
    All,
}

impl Availability {
    fn admits(self, h: Health) -> bool {
        match self {
            Availability::Healthy => h.is_healthy(),
            Availability::Degraded => h == Health::Degraded,
            Availability::All => true,
        }
    }
}

/// One priority level.
struct Level {
    state: PriorityState,
    /// What a retry priority redistributes the load by.
    availability: LevelAvailability,
    healthy: Option<Source>,
    degraded: Option<Source>,
    /// All hosts, built only when the level is in panic.
    all: Option<Source>,
}

impl Level {
    fn source(&self, availability: Availability) -> Option<&Source> {
        if self.state.panic {
            return self.all.as_ref();
        }
        match availability {
            Availability::Healthy => self.healthy.as_ref(),
            Availability::Degraded => self.degraded.as_ref(),
            Availability::All => self.all.as_ref(),
        }
    }
}

struct BuildCtx<'a> {
    policy: LbPolicy,
    common: &'a CommonLb,
    overprovisioning: u32,
}

/// The hosts a pick can land on once the level and availability are chosen: one pool, or one per
/// locality with locality weighting.
struct Source {
    pools: Vec<Pool>,
    /// Cumulative locality weights, one per pool, when there is more than one pool.
    cumulative: Vec<f64>,
}

impl Source {
    fn build(
        groups: &[Group],
        availability: Availability,
        ctx: &BuildCtx<'_>,
        seeds: &mut SplitMix64,
    ) -> Option<Source> {
        let eligible: Vec<(Option<u32>, usize, Vec<Arc<Host>>)> = groups
            .iter()
            .map(|g| {
                let hosts: Vec<Arc<Host>> = g
                    .hosts
                    .iter()
                    .filter(|h| availability.admits(h.lb_health()))
                    .cloned()
                    .collect();
                (g.weight, g.hosts.len(), hosts)
            })
            .filter(|(_, _, hosts)| !hosts.is_empty())
            .collect();
        if eligible.is_empty() {
            return None;
        }
        let locality_weighted = ctx.common.locality_weighted
            && eligible.iter().any(|(w, _, _)| w.is_some_and(|w| w > 0));

        if matches!(
            ctx.policy,
            LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. }
        ) {
            // Normalised weights: host weight within its locality times the locality's share.
            let mut hosts = Vec::new();
            let mut weights = Vec::new();
            let locality_total: f64 = eligible
                .iter()
                .map(|(w, _, _)| f64::from(w.unwrap_or(0)))
                .sum();
            for (lw, _, group) in &eligible {
                let share = if locality_weighted {
                    f64::from(lw.unwrap_or(0)) / locality_total
                } else {
                    1.0
                };
                if share <= 0.0 {
                    continue;
                }
                let group_total: f64 = group.iter().map(|h| f64::from(h.weight)).sum();
                for h in group {
                    hosts.push(h.clone());
                    weights.push(share * f64::from(h.weight) / group_total);
                }
            }
            let total: f64 = weights.iter().sum();
            for w in &mut weights {
                *w /= total;
            }
            let pool = Pool::hashed(hosts, &weights, ctx);
            return Some(Source {
                pools: vec![pool],
                cumulative: Vec::new(),
            });
        }

        if locality_weighted && availability != Availability::All {
            let factor = f64::from(ctx.overprovisioning) / 100.0;
            let mut pools = Vec::new();
            let mut cumulative = Vec::new();
            let mut acc = 0.0;
            for (lw, total, group) in &eligible {
                let ratio = (factor * group.len() as f64 / (*total).max(1) as f64).min(1.0);
                let effective = f64::from(lw.unwrap_or(0)) * ratio;
                if effective > 0.0 {
                    acc += effective;
                    cumulative.push(acc);
                    pools.push(Pool::new(group.clone(), ctx, seeds.next()));
                }
            }
            if !pools.is_empty() {
                return Some(Source { pools, cumulative });
            }
        }

        let all: Vec<Arc<Host>> = eligible.into_iter().flat_map(|(_, _, h)| h).collect();
        Some(Source {
            pools: vec![Pool::new(all, ctx, seeds.next())],
            cumulative: Vec::new(),
        })
    }

    fn pick<'s>(
        &'s self,
        ctx: &PickContext<'_>,
        rng: &mut SplitMix64,
        hash: u64,
    ) -> Option<&'s Arc<Host>> {
        let first = match self.cumulative.last() {
            Some(&total) if self.pools.len() > 1 => {
                let point = rng.unit() * total;
                self.cumulative
                    .iter()
                    .position(|&c| point < c)
                    .unwrap_or(self.pools.len() - 1)
            }
            _ => 0,
        };
        let host = self.pools.get(first)?.pick(ctx, rng, hash)?;
        if ctx.exclude.is_empty() || self.pools.len() == 1 || !host.is_in(ctx.exclude) {
            return Some(host);
        }
        // Every host of the chosen locality was excluded: try the other localities.
        let n = self.pools.len();
        for k in 1..n {
            if let Some(other) = self.pools[(first + k) % n].pick(ctx, rng, hash)
                && !other.is_in(ctx.exclude)
            {
                return Some(other);
            }
        }
        Some(host)
    }
}

/// Hosts balanced by one balancer.
struct Pool {
    hosts: Vec<Arc<Host>>,
    picker: Picker,
}

enum Picker {
    /// Equal weights, round robin: a strict rotation.
    Rotation(AtomicUsize),
    /// Unequal weights, round robin.
    WeightedRoundRobin(Mutex<Edf>),
    /// Equal weights, least request: the best of `n` random choices.
    Choices(u32),
    /// Unequal weights, least request: EDF over `weight / (active + 1)`.
    WeightedLeastRequest(Mutex<Edf>),
    /// Random.
    Random,
    /// Ketama ring, sorted by hash.
    Ring(Vec<RingEntry>),
    /// Maglev lookup table of host indexes.
    Maglev(Vec<u32>),
}

impl Pool {
    fn new(hosts: Vec<Arc<Host>>, ctx: &BuildCtx<'_>, seed: u64) -> Pool {
        let n = hosts.len().max(1);
        let equal = hosts.windows(2).all(|w| w[0].weight == w[1].weight);
        // Start at a random place so that proxies (and host set rebuilds) do not all send their
        // first requests to the same host.
        let start = (seed % n as u64) as usize;
        let picker = match ctx.policy {
            LbPolicy::RoundRobin | LbPolicy::ClusterProvided if equal => {
                Picker::Rotation(AtomicUsize::new(start))
            }
            LbPolicy::RoundRobin | LbPolicy::ClusterProvided => {
                Picker::WeightedRoundRobin(Mutex::new(Edf::new(&hosts, start, round_robin_weight)))
            }
            LbPolicy::LeastRequest { choice_count } if equal => {
                Picker::Choices(choice_count.max(1))
            }
            LbPolicy::LeastRequest { .. } => {
                Picker::WeightedLeastRequest(Mutex::new(Edf::new(&hosts, 0, least_request_weight)))
            }
            LbPolicy::Random => Picker::Random,
            LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. } => {
                let weights: Vec<f64> = {
                    let total: f64 = hosts.iter().map(|h| f64::from(h.weight)).sum();
                    hosts.iter().map(|h| f64::from(h.weight) / total).collect()
                };
                return Pool::hashed(hosts, &weights, ctx);
            }
        };
        Pool { hosts, picker }
    }

    /// A ring hash or Maglev pool over `hosts` with normalised `weights`.
    fn hashed(hosts: Vec<Arc<Host>>, weights: &[f64], ctx: &BuildCtx<'_>) -> Pool {
        let use_hostname = ctx.common.use_hostname_for_hashing;
        let keys: Vec<String> = hosts.iter().map(|h| h.hash_key(use_hostname)).collect();
        let picker = match ctx.policy {
            LbPolicy::Maglev { table_size } => {
                Picker::Maglev(build_maglev(&keys, weights, table_size))
            }
            LbPolicy::RingHash {
                min_ring_size,
                max_ring_size,
            } => Picker::Ring(build_ring(&keys, weights, min_ring_size, max_ring_size)),
            // Not reached: callers build hashed pools only for hash policies.
            _ => Picker::Random,
        };
        Pool { hosts, picker }
    }

    fn pick(&self, ctx: &PickContext<'_>, rng: &mut SplitMix64, hash: u64) -> Option<&Arc<Host>> {
        let n = self.hosts.len();
        if n == 0 {
            return None;
        }
        let exclude = ctx.exclude;
        let index = match &self.picker {
            Picker::Rotation(next) => {
                let start = next.fetch_add(1, atomic::Ordering::Relaxed) % n;
                self.first_allowed(start, exclude)
            }
            Picker::Random => self.first_allowed(rng.below(n), exclude),
            Picker::Choices(count) => {
                let mut best: Option<usize> = None;
                for _ in 0..*count {
                    let sampled = self.first_allowed(rng.below(n), exclude);
                    best = match best {
                        Some(b)
                            if self.hosts[b].active_requests()
                                <= self.hosts[sampled].active_requests() =>
                        {
                            Some(b)
                        }
                        _ => Some(sampled),
                    };
                }
                best?
            }
            Picker::WeightedRoundRobin(edf) => {
                lock(edf).pick(&self.hosts, |h| !h.is_in(exclude), round_robin_weight)?
            }
            Picker::WeightedLeastRequest(edf) => {
                lock(edf).pick(&self.hosts, |h| !h.is_in(exclude), least_request_weight)?
            }
            Picker::Ring(ring) => self.ring_pick(ring, hash, exclude)?,
            Picker::Maglev(table) => self.maglev_pick(table, hash, exclude)?,
        };
        self.hosts.get(index)
    }

    /// `start`, or the first host after it that is not excluded; `start` when all are.
    fn first_allowed(&self, start: usize, exclude: &[Arc<Host>]) -> usize {
        if exclude.is_empty() {
            return start;
        }
        let n = self.hosts.len();
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| !self.hosts[i].is_in(exclude))
            .unwrap_or(start)
    }

    fn any_allowed(&self, exclude: &[Arc<Host>]) -> bool {
        self.hosts.iter().any(|h| !h.is_in(exclude))
    }

    fn ring_pick(&self, ring: &[RingEntry], hash: u64, exclude: &[Arc<Host>]) -> Option<usize> {
        let len = ring.len();
        if len == 0 {
            return None;
        }
        // Ketama: the first entry at or after the hash, wrapping around.
        let mut pos = ring.partition_point(|e| e.hash < hash);
        if pos == len {
            pos = 0;
        }
        let at = |p: usize| ring[p % len].index as usize;
        if !exclude.is_empty() && self.hosts[at(pos)].is_in(exclude) && self.any_allowed(exclude) {
            // Walk on along the ring, as if the excluded hosts were not on it.
            if let Some(i) = (1..len)
                .map(|k| at(pos + k))
                .find(|&i| !self.hosts[i].is_in(exclude))
            {
                return Some(i);
            }
        }
        Some(at(pos))
    }

    fn maglev_pick(&self, table: &[u32], hash: u64, exclude: &[Arc<Host>]) -> Option<usize> {
        let size = table.len() as u64;
        if size == 0 {
            return None;
        }
        let at = |h: u64| table[(h % size) as usize] as usize;
        let first = at(hash);
        if exclude.is_empty() || !self.hosts[first].is_in(exclude) || !self.any_allowed(exclude) {
            return Some(first);
        }
        // Envoy's retry rehash: xor with a value that has most bits set.
        for attempt in 1..=MAGLEV_RETRY_ATTEMPTS {
            let i = at(hash ^ attempt.wrapping_neg());
            if !self.hosts[i].is_in(exclude) {
                return Some(i);
            }
        }
        Some(self.first_allowed((first + 1) % self.hosts.len(), exclude))
    }
}

fn lock(m: &Mutex<Edf>) -> std::sync::MutexGuard<'_, Edf> {
    // The schedule is valid after any panic in `pick` (entries are only moved between the heap
    // and the scratch list), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn round_robin_weight(h: &Host) -> f64 {
    f64::from(h.weight)
}

/// Envoy's least request weight with an `active_request_bias` of 1.0.
fn least_request_weight(h: &Host) -> f64 {
    f64::from(h.weight) / (h.active_requests().saturating_add(1)) as f64
}

/// Earliest-deadline-first schedule (Envoy's `EdfScheduler`): each host is due `1 / weight` after
/// its last pick; ties go to the host scheduled first.
///
/// A `std::sync::Mutex` guards it: the critical section is a few heap operations and never spans
/// an `.await`.
struct Edf {
    heap: BinaryHeap<EdfEntry>,
    now: f64,
    order: u64,
    /// Entries popped for excluded hosts, put back after the pick (kept to avoid allocating).
    skipped: Vec<EdfEntry>,
}

#[derive(Debug, Clone, Copy)]
struct EdfEntry {
    deadline: f64,
    order: u64,
    index: usize,
}

impl PartialEq for EdfEntry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for EdfEntry {}

impl PartialOrd for EdfEntry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for EdfEntry {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest deadline.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .deadline
            .total_cmp(&self.deadline)
            .then(other.order.cmp(&self.order))
    }
}

impl Edf {
    /// A schedule over `hosts`, advanced by `skip` picks.
    fn new(hosts: &[Arc<Host>], skip: usize, weight: fn(&Host) -> f64) -> Edf {
        let mut edf = Edf {
            heap: BinaryHeap::with_capacity(hosts.len()),
            now: 0.0,
            order: 0,
            skipped: Vec::new(),
        };
        for (i, h) in hosts.iter().enumerate() {
            edf.add(i, weight(h));
        }
        for _ in 0..skip {
            edf.pick(hosts, |_| true, weight);
        }
        edf
    }

    fn add(&mut self, index: usize, weight: f64) {
        // A weight of 0 (or less) would never be due; keep it schedulable but last.
        let weight = if weight.is_finite() && weight > 0.0 {
            weight
        } else {
            f64::MIN_POSITIVE
        };
        self.heap.push(EdfEntry {
            deadline: self.now + 1.0 / weight,
            order: self.order,
            index,
        });
        self.order += 1;
    }

    /// The first due host that `accept`s (the first due host when none does), rescheduled with
    /// its current `weight`.
    fn pick(
        &mut self,
        hosts: &[Arc<Host>],
        accept: impl Fn(&Host) -> bool,
        weight: fn(&Host) -> f64,
    ) -> Option<usize> {
        let mut chosen = None;
        while let Some(e) = self.heap.pop() {
            if hosts.get(e.index).is_some_and(|h| accept(h)) {
                chosen = Some(e);
                break;
            }
            self.skipped.push(e);
        }
        self.heap.extend(self.skipped.drain(..));
        let chosen = match chosen {
            Some(c) => c,
            None => self.heap.pop()?,
        };
        self.now = chosen.deadline;
        let w = hosts.get(chosen.index).map_or(1.0, |h| weight(h));
        self.add(chosen.index, w);
        Some(chosen.index)
    }
}

#[derive(Debug, Clone, Copy)]
struct RingEntry {
    hash: u64,
    index: u32,
}

/// Envoy's ring: scaled so that the lightest host gets at least one entry (ring at least
/// `min_size`, at most `max_size`), each host getting `scale * weight` entries by running sums.
fn build_ring(keys: &[String], weights: &[f64], min_size: u64, max_size: u64) -> Vec<RingEntry> {
    let min_weight = weights.iter().copied().fold(f64::INFINITY, f64::min);
    if keys.is_empty() || min_weight.is_nan() || min_weight <= 0.0 {
        return Vec::new();
    }
    let max_size = max_size.clamp(1, MAX_RING_SIZE);
    let min_size = min_size.clamp(1, max_size);
    let scale = ((min_weight * min_size as f64).ceil() / min_weight).min(max_size as f64);
    let mut ring = Vec::with_capacity(scale.ceil() as usize);
    let mut key = String::new();
    let mut current = 0.0;
    let mut target = 0.0;
    for (index, (k, w)) in (0u32..).zip(keys.iter().zip(weights)) {
        target += scale * w;
        let mut n = 0u64;
        while current < target {
            key.clear();
            // Writing to a `String` cannot fail.
            let _ = write!(key, "{k}_{n}");
            ring.push(RingEntry {
                hash: xxhash64(key.as_bytes(), 0),
                index,
            });
            n += 1;
            current += 1.0;
        }
    }
    ring.sort_unstable_by_key(|e| (e.hash, e.index));
    ring
}

/// Envoy's weighted Maglev table (Eisenbud et al., NSDI 2016): hosts take turns claiming the next
/// free slot of their permutation, a host of weight `w` taking a turn every `max_weight / w`
/// rounds.
fn build_maglev(keys: &[String], weights: &[f64], table_size: u64) -> Vec<u32> {
    if keys.is_empty() {
        return Vec::new();
    }
    // The permutations cover the table only when its size is prime; the config checks this, and a
    // bad size falls back to the default rather than looping forever.
    let size = if (2..=MAX_MAGLEV_TABLE_SIZE).contains(&table_size) && is_prime(table_size) {
        table_size
    } else {
        DEFAULT_MAGLEV_TABLE_SIZE
    };
    struct Entry {
        weight: f64,
        target: f64,
        position: u64,
        skip: u64,
    }
    let max_weight = weights.iter().copied().fold(0.0, f64::max);
    let mut entries: Vec<Entry> = keys
        .iter()
        .zip(weights)
        .map(|(k, &weight)| Entry {
            weight,
            target: 0.0,
            position: xxhash64(k.as_bytes(), 0) % size,
            skip: xxhash64(k.as_bytes(), 1) % (size - 1) + 1,
        })
        .collect();
    if max_weight.is_nan() || max_weight <= 0.0 {
        return Vec::new();
    }
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    let mut round = 1u64;
    while filled < size {
        for (index, e) in (0u32..).zip(entries.iter_mut()) {
            if filled >= size {
                break;
            }
            if (round as f64) * e.weight < e.target {
                continue;
            }
            e.target += max_weight;
            loop {
                let slot = e.position as usize;
                e.position = (e.position + e.skip) % size;
                if table[slot] == u32::MAX {
                    table[slot] = index;
                    break;
                }
            }
            filled += 1;
        }
        round += 1;
    }
    table
}

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// SplitMix64: expands the one random number of a pick into as many as it needs.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const XXH_P1: u64 = 0x9E37_79B1_85EB_CA87;
const XXH_P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const XXH_P3: u64 = 0x1656_67B1_9E37_79F9;
const XXH_P4: u64 = 0x85EB_CA77_C2B2_AE63;
const XXH_P5: u64 = 0x27D4_EB2F_1656_67C5;

fn xxh_round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(XXH_P2))
        .rotate_left(31)
        .wrapping_mul(XXH_P1)
}

fn xxh_merge(acc: u64, lane: u64) -> u64 {
    (acc ^ xxh_round(0, lane))
        .wrapping_mul(XXH_P1)
        .wrapping_add(XXH_P4)
}

/// XXH64 of `data` with `seed`: the hash Envoy uses for ring hash, Maglev and hash policies, so
/// that host placement matches Envoy's for the same keys.
pub fn xxhash64(data: &[u8], seed: u64) -> u64 {
    let mut rest = data;
    let mut h = if data.len() >= 32 {
        let mut lanes = [
            seed.wrapping_add(XXH_P1).wrapping_add(XXH_P2),
            seed.wrapping_add(XXH_P2),
            seed,
            seed.wrapping_sub(XXH_P1),
        ];
        while rest.len() >= 32 {
            for lane in &mut lanes {
                if let Some((word, tail)) = rest.split_first_chunk::<8>() {
                    *lane = xxh_round(*lane, u64::from_le_bytes(*word));
                    rest = tail;
                }
            }
        }
        let [v1, v2, v3, v4] = lanes;
        let mut h = v1
            .rotate_left(1)
            .wrapping_add(v2.rotate_left(7))
            .wrapping_add(v3.rotate_left(12))
            .wrapping_add(v4.rotate_left(18));
        for lane in lanes {
            h = xxh_merge(h, lane);
        }
        h
    } else {
        seed.wrapping_add(XXH_P5)
    };
    h = h.wrapping_add(data.len() as u64);
    while let Some((word, tail)) = rest.split_first_chunk::<8>() {
        h ^= xxh_round(0, u64::from_le_bytes(*word));
        h = h.rotate_left(27).wrapping_mul(XXH_P1).wrapping_add(XXH_P4);
        rest = tail;
    }
    if let Some((word, tail)) = rest.split_first_chunk::<4>() {
        h ^= u64::from(u32::from_le_bytes(*word)).wrapping_mul(XXH_P1);
        h = h.rotate_left(23).wrapping_mul(XXH_P2).wrapping_add(XXH_P3);
        rest = tail;
    }
    for &b in rest {
        h ^= u64::from(b).wrapping_mul(XXH_P5);
        h = h.rotate_left(11).wrapping_mul(XXH_P1);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(XXH_P2);
    h ^= h >> 29;
    h = h.wrapping_mul(XXH_P3);
    h ^= h >> 32;
    h
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::endpoint::LocalityEndpoints;

    fn addr(i: u16) -> EndpointAddress {
        EndpointAddress::Socket(SocketAddr::from(([10, 0, 0, 1], 8000 + i)))
    }

    fn ep(i: u16, health: Health, weight: u32) -> Endpoint {
        Endpoint {
            address: addr(i),
            additional_addresses: vec![],
            hostname: None,
            health,
            weight,
            metadata: BTreeMap::new(),
            original_dst: None,
        }
    }

    fn healthy(range: std::ops::Range<u16>) -> Vec<Endpoint> {
        range.map(|i| ep(i, Health::Healthy, 1)).collect()
    }

    fn group(priority: u32, endpoints: Vec<Endpoint>) -> LocalityEndpoints {
        LocalityEndpoints {
            locality: None,
            priority,
            weight: None,
            endpoints,
        }
    }

    fn assignment(localities: Vec<LocalityEndpoints>) -> LoadAssignment {
        LoadAssignment {
            cluster_name: "c".into(),
            localities,
            overprovisioning_factor: 140,
        }
    }

    fn set(localities: Vec<LocalityEndpoints>, policy: LbPolicy) -> HostSet {
        HostSet::new(&assignment(localities), policy, &CommonLb::default())
    }

    fn port(h: &Host) -> u16 {
        match &h.address {
            EndpointAddress::Socket(a) => a.port() - 8000,
            other => panic!("unexpected address {other:?}"),
        }
    }

    fn pick_with(s: &HostSet, random: u64, hash: Option<u64>, exclude: &[Arc<Host>]) -> Arc<Host> {
        s.pick(&PickContext {
            hash,
            exclude,
            random,
        })
        .expect("a host")
    }

    fn pick(s: &HostSet, random: u64) -> Arc<Host> {
        pick_with(s, random, None, &[])
    }

    /// Picks per host (by port) over `n` picks with randoms `0..n`.
    fn histogram(s: &HostSet, n: u64, hash: impl Fn(u64) -> Option<u64>) -> HashMap<u16, u64> {
        let mut out = HashMap::new();
        for r in 0..n {
            *out.entry(port(&pick_with(s, r, hash(r), &[]))).or_default() += 1;
        }
        out
    }

    const RING: LbPolicy = LbPolicy::RingHash {
        min_ring_size: 1024,
        max_ring_size: 8 * 1024 * 1024,
    };
    const MAGLEV: LbPolicy = LbPolicy::Maglev { table_size: 65_537 };

    fn counts(total: usize, healthy: usize, degraded: usize) -> Counts {
        Counts {
            total,
            healthy,
            degraded,
        }
    }

    #[test]
    fn xxhash64_matches_reference_vectors() {
        assert_eq!(xxhash64(b"", 0), 0xEF46_DB37_51D8_E999);
        assert_eq!(xxhash64(b"a", 0), 0xD24E_C4F1_A98C_6E5B);
        assert_eq!(xxhash64(b"abc", 0), 0x44BC_2CF5_AD77_0999);
        assert_eq!(xxhash64(b"xxhash", 0), 0x32DD_3895_2C4B_C720);
        assert_eq!(xxhash64(b"xxhash", 20_141_025), 0xB559_B98D_844E_0635);
        assert_eq!(
            xxhash64(b"Nobody inspects the spammish repetition", 0),
            0xFBCE_A83C_8A37_8BF1
        );
    }

    #[test]
    fn round_robin_rotates_strictly_with_equal_weights() {
        let s = set(vec![group(0, healthy(0..4))], LbPolicy::RoundRobin);
        let picks: Vec<u16> = (0..12).map(|r| port(&pick(&s, r))).collect();
        for window in picks.chunks(4) {
            let mut w = window.to_vec();
            w.sort_unstable();
            assert_eq!(w, vec![0, 1, 2, 3], "picks {picks:?}");
        }
        for i in 0..8 {
            assert_eq!(picks[i], picks[i + 4], "picks {picks:?}");
            assert_eq!((picks[i] + 1) % 4, picks[i + 1], "picks {picks:?}");
        }
    }

    #[test]
    fn round_robin_follows_weights() {
        let s = set(
            vec![group(
                0,
                vec![
                    ep(0, Health::Healthy, 1),
                    ep(1, Health::Healthy, 2),
                    ep(2, Health::Healthy, 3),
                ],
            )],
            LbPolicy::RoundRobin,
        );
        let h = histogram(&s, 600, |_| None);
        for (p, expected) in [(0u16, 100i64), (1, 200), (2, 300)] {
            let got = h.get(&p).copied().unwrap_or(0) as i64;
            assert!((got - expected).abs() <= 1, "host {p}: {got} picks, {h:?}");
        }
        // EDF interleaves: in any 6 consecutive picks the weight-3 host appears 2 to 4 times.
        let picks: Vec<u16> = (0..60).map(|r| port(&pick(&s, r))).collect();
        for w in picks.windows(6) {
            let n = w.iter().filter(|&&p| p == 2).count();
            assert!((2..=4).contains(&n), "picks {picks:?}");
        }
    }

    #[test]
    fn zero_weight_counts_as_one() {
        let s = set(
            vec![group(
                0,
                vec![ep(0, Health::Healthy, 0), ep(1, Health::Healthy, 1)],
            )],
            LbPolicy::RoundRobin,
        );
        assert!(s.hosts().iter().all(|h| h.weight == 1));
        let h = histogram(&s, 100, |_| None);
        assert_eq!(h.get(&0), Some(&50));
    }

    #[test]
    fn request_guard_counts_active_requests() {
        let s = set(vec![group(0, healthy(0..1))], LbPolicy::RoundRobin);
        let host = pick(&s, 0);
        let a = host.start_request();
        let b = host.start_request();
        assert_eq!(host.active_requests(), 2);
        assert!(Arc::ptr_eq(a.host(), &host));
        drop(a);
        assert_eq!(host.active_requests(), 1);
        drop(b);
        assert_eq!(host.active_requests(), 0);
        let c = host.start_connection();
        assert_eq!(host.active_connections(), 1);
        drop(c);
        assert_eq!(host.active_connections(), 0);
    }

    #[test]
    fn least_request_prefers_the_less_loaded_host() {
        let policy = LbPolicy::LeastRequest { choice_count: 2 };
        let s = set(vec![group(0, healthy(0..2))], policy);
        let busy = s.hosts()[0].clone();
        let _guards: Vec<RequestGuard> = (0..5).map(|_| busy.start_request()).collect();
        // Two samples with replacement: the busy host wins only when drawn twice (1 in 4).
        let h = histogram(&s, 1000, |_| None);
        let to_busy = h.get(&0).copied().unwrap_or(0);
        assert!((150..=350).contains(&to_busy), "{h:?}");

        // More choices: the busy host is almost never chosen.
        let s = set(
            vec![group(0, healthy(0..2))],
            LbPolicy::LeastRequest { choice_count: 8 },
        );
        let busy = s.hosts()[0].clone();
        let _guards: Vec<RequestGuard> = (0..5).map(|_| busy.start_request()).collect();
        let h = histogram(&s, 1000, |_| None);
        assert!(h.get(&0).copied().unwrap_or(0) <= 20, "{h:?}");

        // Among three hosts, the idle one takes the most.
        let s = set(vec![group(0, healthy(0..3))], policy);
        let hosts = s.hosts().to_vec();
        let _g0: Vec<RequestGuard> = (0..10).map(|_| hosts[0].start_request()).collect();
        let _g1: Vec<RequestGuard> = (0..5).map(|_| hosts[1].start_request()).collect();
        let h = histogram(&s, 900, |_| None);
        let (a, b, c) = (h.get(&0), h.get(&1), h.get(&2));
        assert!(a < b && b < c, "{h:?}");
    }

    #[test]
    fn least_request_with_weights_scales_by_active_requests() {
        let policy = LbPolicy::LeastRequest { choice_count: 2 };
        let s = set(
            vec![group(
                0,
                vec![ep(0, Health::Healthy, 1), ep(1, Health::Healthy, 3)],
            )],
            policy,
        );
        // Idle: plain weighted round robin.
        let h = histogram(&s, 400, |_| None);
        let heavy = h.get(&1).copied().unwrap_or(0);
        assert!((295..=305).contains(&heavy), "{h:?}");
        // The heavy host is busy: its weight is 3 / 11, below the light host's 1.
        let busy = s.hosts()[1].clone();
        let _guards: Vec<RequestGuard> = (0..10).map(|_| busy.start_request()).collect();
        let h = histogram(&s, 400, |_| None);
        let heavy = h.get(&1).copied().unwrap_or(0);
        assert!((60..=110).contains(&heavy), "{h:?}");
    }

    #[test]
    fn random_spreads_over_healthy_hosts() {
        let s = set(
            vec![group(
                0,
                vec![
                    ep(0, Health::Healthy, 1),
                    ep(1, Health::Healthy, 1),
                    ep(2, Health::Unknown, 1),
                    ep(3, Health::Healthy, 1),
                    ep(4, Health::Unhealthy, 1),
                ],
            )],
            LbPolicy::Random,
        );
        let h = histogram(&s, 4000, |_| None);
        assert_eq!(h.get(&4), None, "{h:?}");
        for p in 0..4 {
            let n = h.get(&p).copied().unwrap_or(0);
            assert!((850..=1150).contains(&n), "{h:?}");
        }
    }

    #[test]
    fn unhealthy_draining_and_timed_out_hosts_are_left_out() {
        let mut eps = healthy(0..4);
        eps[3].health = Health::Unknown;
        eps.push(ep(4, Health::Unhealthy, 1));
        eps.push(ep(5, Health::Draining, 1));
        eps.push(ep(6, Health::Timeout, 1));
        eps.extend(healthy(7..9));
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::LeastRequest { choice_count: 2 },
            LbPolicy::Random,
            RING,
            MAGLEV,
        ] {
            let s = set(vec![group(0, eps.clone())], policy);
            let state = s.priorities().next().expect("a level");
            assert!(!state.panic);
            assert_eq!((state.hosts, state.healthy), (9, 6));
            let h = histogram(&s, 600, |r| Some(xxhash64(&r.to_le_bytes(), 0)));
            for bad in 4..=6 {
                assert_eq!(h.get(&bad), None, "{policy:?}: {h:?}");
            }
            assert_eq!(h.len(), 6, "{policy:?}: {h:?}");
        }
    }

    #[test]
    fn degraded_hosts_take_only_what_healthy_ones_cannot() {
        // 4 healthy of 5: health 112% -> 100, degraded hosts get nothing.
        let mut eps = healthy(0..4);
        eps.push(ep(4, Health::Degraded, 1));
        let s = set(vec![group(0, eps)], LbPolicy::RoundRobin);
        let h = histogram(&s, 100, |_| None);
        assert_eq!(h.get(&4), None, "{h:?}");

        // 1 healthy and 3 degraded: health 35%, degraded availability 105% -> 100; the healthy
        // host takes its 35% and the degraded ones the remaining 65%.
        let mut eps = healthy(0..1);
        eps.extend((1..4).map(|i| ep(i, Health::Degraded, 1)));
        let s = set(vec![group(0, eps)], LbPolicy::RoundRobin);
        let state = s.priorities().next().expect("a level");
        assert_eq!((state.healthy_load, state.degraded_load), (35, 65));
        assert!(!state.panic);
        let h = histogram(&s, 3000, |_| None);
        let to_healthy = h.get(&0).copied().unwrap_or(0);
        assert!((900..=1200).contains(&to_healthy), "{h:?}");
        assert_eq!(h.len(), 4, "{h:?}");
    }

    #[test]
    fn panic_mode_routes_to_every_host() {
        // 1 healthy of 4 is below the 50% threshold: all four take traffic.
        let mut eps: Vec<Endpoint> = (0..4).map(|i| ep(i, Health::Unhealthy, 1)).collect();
        eps[0].health = Health::Healthy;
        let s = set(vec![group(0, eps.clone())], LbPolicy::RoundRobin);
        let state = s.priorities().next().expect("a level");
        assert!(state.panic);
        assert_eq!(state.healthy_load, 100);
        let h = histogram(&s, 400, |_| None);
        assert_eq!(h.len(), 4, "{h:?}");
        assert!(h.values().all(|&n| n == 100), "{h:?}");

        // A threshold of 0 disables panic: only the healthy host.
        let common = CommonLb {
            healthy_panic_threshold: Some(0.0),
            ..CommonLb::default()
        };
        let s = HostSet::new(
            &assignment(vec![group(0, eps.clone())]),
            LbPolicy::RoundRobin,
            &common,
        );
        assert!(!s.priorities().any(|l| l.panic));
        let h = histogram(&s, 100, |_| None);
        assert_eq!(h.len(), 1, "{h:?}");

        // A lower threshold (20%) keeps 25% healthy out of panic.
        let common = CommonLb {
            healthy_panic_threshold: Some(20.0),
            ..CommonLb::default()
        };
        let s = HostSet::new(
            &assignment(vec![group(0, eps.clone())]),
            LbPolicy::RoundRobin,
            &common,
        );
        let h = histogram(&s, 100, |_| None);
        assert_eq!(h.keys().copied().collect::<Vec<_>>(), vec![0], "{h:?}");

        // Nothing healthy and panic disabled: no host.
        let eps: Vec<Endpoint> = (0..2).map(|i| ep(i, Health::Unhealthy, 1)).collect();
        let common = CommonLb {
            healthy_panic_threshold: Some(0.0),
            ..CommonLb::default()
        };
        let s = HostSet::new(
            &assignment(vec![group(0, eps)]),
            LbPolicy::RoundRobin,
            &common,
        );
        assert!(s.pick(&PickContext::default()).is_none());
    }

    #[test]
    fn priority_failover() {
        // P0 all unhealthy: everything goes to P1.
        let p0: Vec<Endpoint> = (0..3).map(|i| ep(i, Health::Unhealthy, 1)).collect();
        let s = set(
            vec![group(0, p0), group(1, healthy(10..13))],
            LbPolicy::RoundRobin,
        );
        let loads: Vec<(u32, u32, bool)> = s
            .priorities()
            .map(|l| (l.priority, l.healthy_load, l.panic))
            .collect();
        assert_eq!(loads, vec![(0, 0, false), (1, 100, false)]);
        let h = histogram(&s, 300, |_| None);
        assert!(h.keys().all(|&p| p >= 10), "{h:?}");
        assert_eq!(h.len(), 3);

        // P0 half healthy: 70% to P0, 30% to P1.
        let mut p0 = healthy(0..4);
        p0[0].health = Health::Unhealthy;
        p0[1].health = Health::Unhealthy;
        let s = set(
            vec![group(0, p0), group(1, healthy(10..12))],
            LbPolicy::RoundRobin,
        );
        let loads: Vec<u32> = s.priorities().map(|l| l.healthy_load).collect();
        assert_eq!(loads, vec![70, 30]);
        let h = histogram(&s, 10_000, |_| None);
        let to_p1: u64 = h.iter().filter(|(p, _)| **p >= 10).map(|(_, n)| n).sum();
        assert!((2700..=3300).contains(&to_p1), "{h:?}");
        assert!(!h.contains_key(&0) && !h.contains_key(&1), "{h:?}");

        // Sparse priorities (only P3) still take all traffic.
        let s = set(vec![group(3, healthy(0..2))], LbPolicy::RoundRobin);
        assert_eq!(histogram(&s, 10, |_| None).len(), 2);
    }

    #[test]
    fn loads_match_envoy() {
        // Envoy's priority table (P=1 fully healthy).
        for (p0_healthy, p0_load) in [(100, 100), (72, 100), (71, 99), (50, 70), (25, 35), (0, 0)] {
            let l = compute_loads(
                &[counts(100, p0_healthy, 0), counts(100, 100, 0)],
                140,
                50.0,
            );
            assert_eq!(l.healthy, vec![p0_load, 100 - p0_load], "P0 {p0_healthy}%");
            assert_eq!(l.panic, vec![false, false]);
        }
        // Both levels at 25%: total health 70%, both in panic, load by host count.
        let l = compute_loads(&[counts(100, 25, 0), counts(100, 25, 0)], 140, 50.0);
        assert_eq!((l.healthy, l.panic), (vec![50, 50], vec![true, true]));
        // 5% and 65%: total 98%, only P0 in panic; the rounding remainder goes to P0.
        let l = compute_loads(&[counts(100, 5, 0), counts(100, 65, 0)], 140, 50.0);
        assert_eq!((l.healthy, l.panic), (vec![8, 92], vec![true, false]));
        // Envoy's degraded example: health 10/20/10, degraded 20/10/0 (panic disabled).
        let l = compute_loads(
            &[counts(14, 1, 2), counts(14, 2, 1), counts(14, 1, 0)],
            140,
            0.0,
        );
        assert_eq!(l.healthy, vec![16, 28, 14]);
        assert_eq!(l.degraded, vec![28, 14, 0]);
        // Total panic by host count: 1 and 3 hosts.
        let l = compute_loads(&[counts(1, 0, 0), counts(3, 0, 0)], 140, 50.0);
        assert_eq!(l.healthy, vec![25, 75]);
        // Overprovisioning 100: 80% healthy keeps 80%.
        let l = compute_loads(&[counts(10, 8, 0), counts(10, 10, 0)], 100, 50.0);
        assert_eq!(l.healthy, vec![80, 20]);
    }

    #[test]
    fn total_panic_spreads_over_all_levels() {
        let p0: Vec<Endpoint> = (0..2).map(|i| ep(i, Health::Unhealthy, 1)).collect();
        let p1: Vec<Endpoint> = (10..12).map(|i| ep(i, Health::Unhealthy, 1)).collect();
        let s = set(vec![group(0, p0), group(1, p1)], LbPolicy::RoundRobin);
        assert!(s.priorities().all(|l| l.panic));
        let h = histogram(&s, 4000, |_| None);
        assert_eq!(h.len(), 4, "{h:?}");
        assert!(h.values().all(|&n| (800..=1200).contains(&n)), "{h:?}");
    }

    fn hash_of(i: u64) -> u64 {
        xxhash64(format!("request-{i}").as_bytes(), 0)
    }

    #[test]
    fn hash_policies_are_stable_and_spread() {
        for policy in [RING, MAGLEV] {
            let s = set(vec![group(0, healthy(0..5))], policy);
            let first: Vec<u16> = (0..2000)
                .map(|i| port(&pick_with(&s, i, Some(hash_of(i)), &[])))
                .collect();
            // Same hash, same host, whatever the random number.
            for (i, p) in first.iter().enumerate() {
                let again = pick_with(&s, 7_777 + i as u64, Some(hash_of(i as u64)), &[]);
                assert_eq!(port(&again), *p, "{policy:?}");
            }
            let h = histogram(&s, 2000, |i| Some(hash_of(i)));
            assert_eq!(h.len(), 5, "{policy:?}: {h:?}");
            assert!(
                h.values().all(|&n| (250..=550).contains(&n)),
                "{policy:?}: {h:?}"
            );
            // A rebuilt set (new tables) maps hashes to the same hosts.
            let again = set(vec![group(0, healthy(0..5))], policy);
            assert!(
                (0..2000).all(
                    |i| port(&pick_with(&again, 1, Some(hash_of(i)), &[])) == first[i as usize]
                ),
                "{policy:?}"
            );
            // Removing a host moves few of the others' hashes.
            let fewer = set(vec![group(0, healthy(0..4))], policy);
            let kept = (0..2000u64)
                .filter(|&i| first[i as usize] != 4)
                .filter(|&i| {
                    port(&pick_with(&fewer, 1, Some(hash_of(i)), &[])) == first[i as usize]
                })
                .count();
            let total = first.iter().filter(|&&p| p != 4).count();
            assert!(kept * 100 >= total * 75, "{policy:?}: {kept} of {total}");
            // No hash: random, but still only healthy hosts.
            assert_eq!(histogram(&s, 500, |_| None).len(), 5);
        }
    }

    #[test]
    fn hash_policies_follow_weights() {
        for policy in [RING, MAGLEV] {
            let s = set(
                vec![group(
                    0,
                    vec![ep(0, Health::Healthy, 1), ep(1, Health::Healthy, 3)],
                )],
                policy,
            );
            let h = histogram(&s, 4000, |i| Some(hash_of(i)));
            let heavy = h.get(&1).copied().unwrap_or(0);
            assert!((2700..=3300).contains(&heavy), "{policy:?}: {h:?}");
        }
    }

    #[test]
    fn ring_hash_uses_hash_key_metadata_and_hostname() {
        let mut a = ep(0, Health::Healthy, 1);
        a.hostname = Some("a.example".into());
        let host = Host::from_endpoint(&a, 0, None);
        assert_eq!(host.hash_key(false), "10.0.0.1:8000");
        assert_eq!(host.hash_key(true), "a.example");
        a.metadata
            .insert(ENVOY_LB.into(), serde_json::json!({ HASH_KEY: "custom" }));
        let host = Host::from_endpoint(&a, 0, None);
        assert_eq!(host.hash_key(true), "custom");
        let internal = Endpoint {
            address: EndpointAddress::Internal {
                listener: "connect_originate".into(),
                endpoint_id: Some("10.1.1.1:80".into()),
            },
            ..ep(0, Health::Healthy, 1)
        };
        assert_eq!(
            Host::from_endpoint(&internal, 0, None).hash_key(false),
            "envoy://connect_originate/10.1.1.1:80"
        );
    }

    #[test]
    fn exclude_is_honoured_while_possible() {
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::LeastRequest { choice_count: 2 },
            LbPolicy::Random,
            RING,
            MAGLEV,
        ] {
            let s = set(vec![group(0, healthy(0..3))], policy);
            for r in 0..100 {
                let first = pick_with(&s, r, Some(hash_of(r)), &[]);
                let exclude = [first.clone()];
                let second = pick_with(&s, r, Some(hash_of(r)), &exclude);
                assert_ne!(port(&second), port(&first), "{policy:?}");
                let exclude = [first.clone(), second.clone()];
                let third = pick_with(&s, r, Some(hash_of(r)), &exclude);
                assert!(!third.is_in(&exclude), "{policy:?}");
                // Everything excluded: still a host.
                let all = s.hosts().to_vec();
                assert!(
                    s.pick(&PickContext {
                        hash: Some(hash_of(r)),
                        exclude: &all,
                        random: r
                    })
                    .is_some()
                );
            }
        }
        // Weighted round robin skips the excluded heavy host without losing its turn.
        let s = set(
            vec![group(
                0,
                vec![ep(0, Health::Healthy, 1), ep(1, Health::Healthy, 5)],
            )],
            LbPolicy::RoundRobin,
        );
        let heavy = [s.hosts()[1].clone()];
        for r in 0..20 {
            assert_eq!(port(&pick_with(&s, r, None, &heavy)), 0);
        }
        // A host of an earlier set (same address) is recognised.
        let other = set(vec![group(0, healthy(0..2))], LbPolicy::RoundRobin);
        let stale = [other.hosts()[0].clone()];
        let s = set(vec![group(0, healthy(0..2))], LbPolicy::RoundRobin);
        for r in 0..10 {
            assert_eq!(port(&pick_with(&s, r, None, &stale)), 1);
        }
    }

    #[test]
    fn locality_weights_when_enabled() {
        let mut a = group(0, healthy(0..2));
        a.locality = Some(("r".into(), "a".into(), String::new()));
        a.weight = Some(1);
        let mut b = group(0, healthy(10..12));
        b.locality = Some(("r".into(), "b".into(), String::new()));
        b.weight = Some(3);
        let la = assignment(vec![a, b]);
        let weighted = CommonLb {
            locality_weighted: true,
            ..CommonLb::default()
        };
        for policy in [LbPolicy::RoundRobin, LbPolicy::Random, RING, MAGLEV] {
            let s = HostSet::new(&la, policy, &weighted);
            let h = histogram(&s, 4000, |i| Some(hash_of(i)));
            let to_b: u64 = h.iter().filter(|(p, _)| **p >= 10).map(|(_, n)| n).sum();
            assert!((2700..=3300).contains(&to_b), "{policy:?}: {h:?}");
            assert_eq!(h.len(), 4, "{policy:?}: {h:?}");
            // Without locality weighting, all four hosts are equal.
            let s = HostSet::new(&la, policy, &CommonLb::default());
            let h = histogram(&s, 4000, |i| Some(hash_of(i)));
            let to_b: u64 = h.iter().filter(|(p, _)| **p >= 10).map(|(_, n)| n).sum();
            assert!((1700..=2300).contains(&to_b), "{policy:?}: {h:?}");
        }
    }

    #[test]
    fn rebuild_keeps_unchanged_hosts_and_their_counters() {
        let la = assignment(vec![group(0, healthy(0..3))]);
        let s = HostSet::new(&la, LbPolicy::RoundRobin, &CommonLb::default());
        let kept = s.hosts()[0].clone();
        let _guard = kept.start_request();
        let mut changed = la.clone();
        changed.localities[0].endpoints[1].health = Health::Unhealthy;
        changed.localities[0]
            .endpoints
            .push(ep(9, Health::Healthy, 1));
        let next = s.rebuild(&changed, LbPolicy::RoundRobin, &CommonLb::default());
        assert!(Arc::ptr_eq(&next.hosts()[0], &kept));
        assert_eq!(next.hosts()[0].active_requests(), 1);
        assert!(!Arc::ptr_eq(&next.hosts()[1], &s.hosts()[1]));
        assert_eq!(next.hosts()[1].health, Health::Unhealthy);
        assert_eq!(next.hosts().len(), 4);
    }

    #[test]
    fn empty_set_picks_nothing() {
        for policy in [LbPolicy::RoundRobin, LbPolicy::Random, RING, MAGLEV] {
            let s = set(vec![], policy);
            assert!(s.is_empty());
            assert!(s.pick(&PickContext::default()).is_none());
            let s = set(vec![group(0, vec![])], policy);
            assert!(s.pick(&PickContext::default()).is_none());
        }
    }

    #[test]
    fn ring_size_follows_bounds_and_weights() {
        let keys: Vec<String> = (0..3).map(|i| format!("h{i}")).collect();
        let ring = build_ring(&keys, &[1.0 / 3.0; 3], 1024, 8 * 1024 * 1024);
        assert_eq!(ring.len(), 1026); // ceil(1024 / 3) per host
        let ring = build_ring(&keys, &[1.0 / 3.0; 3], 1024, 300);
        assert_eq!(ring.len(), 300);
        assert!(ring.windows(2).all(|w| w[0].hash <= w[1].hash));
        let table = build_maglev(&keys, &[1.0 / 3.0; 3], 7);
        assert_eq!(table.len(), 7);
        assert!(table.iter().all(|&i| i < 3));
        // A size that is not prime falls back to the default instead of looping.
        assert_eq!(build_maglev(&keys, &[1.0 / 3.0; 3], 10).len(), 65_537);
    }

    #[test]
    fn a_retry_priority_moves_the_load_off_skipped_levels() {
        let ports = |s: &HostSet, skip: &[u32]| -> std::collections::BTreeSet<u16> {
            (0..200u64)
                .filter_map(|r| {
                    s.pick_for_retry(
                        &PickContext {
                            random: r,
                            ..PickContext::default()
                        },
                        skip,
                    )
                })
                .map(|h| port(&h))
                .collect()
        };
        // P0 takes all the load; P1 (1 of 2 healthy: 70% available) none until P0 is skipped.
        let levels = vec![
            group(0, healthy(0..2)),
            group(
                1,
                vec![ep(10, Health::Healthy, 1), ep(11, Health::Unhealthy, 1)],
            ),
            group(2, healthy(20..21)),
        ];
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::LeastRequest { choice_count: 2 },
            LbPolicy::Random,
        ] {
            let s = set(levels.clone(), policy);
            assert_eq!(ports(&s, &[]), [0, 1].into(), "{policy:?}");
            // P1 takes 70%, the rest spills to P2; P1's unhealthy host stays out.
            assert_eq!(ports(&s, &[0]), [10, 20].into(), "{policy:?}");
            assert_eq!(ports(&s, &[0, 1]), [20].into(), "{policy:?}");
            assert!(s.has_load_without(&[0, 1]));
            // Nothing left: the usual load.
            assert!(!s.has_load_without(&[0, 1, 2]));
            assert_eq!(ports(&s, &[0, 1, 2]), [0, 1].into(), "{policy:?}");
        }
        // The hash balancers ignore the retry priority, as Envoy's do.
        for policy in [RING, MAGLEV] {
            let s = set(levels.clone(), policy);
            assert_eq!(ports(&s, &[0]), [0, 1].into(), "{policy:?}");
        }
        // Panic is the balancer's: a level in panic takes its retry share on all its hosts.
        let mostly_down = |first: u16, n: u16| {
            (first..first + n)
                .map(|i| {
                    let h = if i == first {
                        Health::Healthy
                    } else {
                        Health::Unhealthy
                    };
                    ep(i, h, 1)
                })
                .collect::<Vec<_>>()
        };
        let s = set(
            vec![group(0, mostly_down(0, 3)), group(1, mostly_down(10, 4))],
            LbPolicy::RoundRobin,
        );
        assert!(s.priorities().all(|p| p.panic));
        assert_eq!(ports(&s, &[0]), [10, 11, 12, 13].into());
    }
}
