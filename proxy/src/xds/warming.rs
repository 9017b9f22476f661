//! Listener warming on SDS secrets, as Envoy's listener manager does it: a new or updated listener
//! whose TLS transport sockets name SDS secrets that have not arrived is *warming* — not accepting
//! (an update leaves the version it replaces serving) — until every such secret has arrived or its
//! config source's `initial_fetch_timeout` (Envoy's default 15 s; `0s`: wait forever) has expired,
//! after which it goes active anyway (and its handshakes fail until the secret comes).
//!
//! [`WarmingListeners`] is the record the listener manager keeps and the admin API reads
//! (`/config_dump`'s `warming_state`, `listener_manager.total_listeners_warming`); the server's
//! initial `LIVE` waits for it to drain. Only secrets the SDS client fetches (served by a bootstrap
//! gRPC cluster) are waited for: a secret nothing will ever deliver would hold a listener for good.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};

use crate::{
    config::{listener::Listener, source::Source, tls::TransportSocket},
    stats::Stat,
    xds::Entry,
};

/// Envoy's default `initial_fetch_timeout`.
pub const DEFAULT_INITIAL_FETCH_TIMEOUT: Duration = Duration::from_secs(15);

/// A secret a listener waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingSecret {
    /// The secret name.
    pub name: String,
    /// When the wait ends anyway (`None`: never, `initial_fetch_timeout: 0s`).
    pub deadline: Option<Instant>,
}

/// One warming listener.
#[derive(Debug, Clone)]
pub struct WarmingListener {
    /// The version that is warming.
    pub listener: Arc<Listener>,
    /// What it waits for.
    pub pending: Vec<PendingSecret>,
    /// When it started warming.
    pub since: Instant,
    /// Whether another version of it is serving meanwhile.
    pub replaces_active: bool,
    /// That serving version as xDS delivered it (for `/config_dump`'s `active_state`).
    pub active: Option<Entry>,
}

/// The SDS secrets `listener`'s TLS transport sockets name that the SDS client fetches (their
/// `sds_config` names one of `grpc_clusters`), each with its `initial_fetch_timeout` (`None`: wait
/// forever).
pub fn needed_secrets(
    listener: &Listener,
    grpc_clusters: &BTreeSet<String>,
) -> BTreeMap<String, Option<Duration>> {
    let mut out: BTreeMap<String, Option<Duration>> = BTreeMap::new();
    let chains = listener
        .filter_chains
        .iter()
        .chain(listener.default_filter_chain.iter());
    for chain in chains {
        let Some(TransportSocket::DownstreamTls(tls)) = &chain.transport_socket else {
            continue;
        };
        let secrets = tls.common.certificates.iter().chain(
            tls.common
                .validation
                .as_ref()
                .and_then(|v| v.trust.as_ref()),
        );
        for s in secrets {
            let Source::Grpc { cluster, .. } = &s.source.source else {
                continue;
            };
            if !grpc_clusters.contains(cluster) {
                continue;
            }
            let timeout = match s.source.initial_fetch_timeout {
                None => Some(DEFAULT_INITIAL_FETCH_TIMEOUT),
                Some(t) if t.is_zero() => None,
                Some(t) => Some(t),
            };
            // Several references to one secret: the longest wait wins (forever beats any).
            out.entry(s.name.clone())
                .and_modify(|t| {
                    *t = match (*t, timeout) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        _ => None,
                    }
                })
                .or_insert(timeout);
        }
    }
    out
}

/// Which of `needed` still hold a listener that started warming at `since`: not arrived and not
/// timed out at `now`.
pub fn pending(
    needed: &BTreeMap<String, Option<Duration>>,
    has_secret: impl Fn(&str) -> bool,
    since: Instant,
    now: Instant,
) -> Vec<PendingSecret> {
    needed
        .iter()
        .filter(|(name, _)| !has_secret(name))
        .map(|(name, timeout)| PendingSecret {
            name: name.clone(),
            deadline: timeout.map(|t| since + t),
        })
        .filter(|p| p.deadline.is_none_or(|d| d > now))
        .collect()
}

/// Listeners warming now, by name.
#[derive(Debug)]
pub struct WarmingListeners {
    inner: Mutex<BTreeMap<String, WarmingListener>>,
    gauge: Arc<Stat>,
    changed: watch::Sender<u64>,
}

impl WarmingListeners {
    /// An empty record mirrored in `gauge` (`listener_manager.total_listeners_warming`).
    pub fn new(gauge: Arc<Stat>) -> Self {
        gauge.set(0);
        let (changed, _) = watch::channel(0);
        WarmingListeners {
            inner: Mutex::new(BTreeMap::new()),
            gauge,
            changed,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, WarmingListener>> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn publish(&self, map: &BTreeMap<String, WarmingListener>) {
        self.gauge.set(map.len() as u64);
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// `listener` warms (replacing a warming version of it, whose serving version stays known).
    pub fn begin(
        &self,
        listener: Arc<Listener>,
        pending: Vec<PendingSecret>,
        replaces_active: bool,
        since: Instant,
    ) {
        let mut map = self.lock();
        let active = map
            .get(&listener.name)
            .filter(|_| replaces_active)
            .and_then(|w| w.active.clone());
        map.insert(
            listener.name.clone(),
            WarmingListener {
                listener,
                pending,
                since,
                replaces_active,
                active,
            },
        );
        self.publish(&map);
    }

    /// Updates what a warming listener still waits for.
    pub fn set_pending(&self, name: &str, pending: Vec<PendingSecret>) {
        if let Some(w) = self.lock().get_mut(name) {
            w.pending = pending;
        }
    }

    /// `name` stops warming (it went active or was removed).
    pub fn finish(&self, name: &str) -> Option<WarmingListener> {
        let mut map = self.lock();
        let gone = map.remove(name);
        if gone.is_some() {
            self.publish(&map);
        }
        gone
    }

    /// Records the xDS entry of the version a warming update replaces (it keeps serving).
    pub fn remember_active(&self, name: &str, entry: Entry) {
        if let Some(w) = self.lock().get_mut(name)
            && w.replaces_active
            && w.active.is_none()
        {
            w.active = Some(entry);
        }
    }

    /// Every warming listener.
    pub fn all(&self) -> BTreeMap<String, WarmingListener> {
        self.lock().clone()
    }

    /// The warming version of `name`, if it is warming.
    pub fn get(&self, name: &str) -> Option<WarmingListener> {
        self.lock().get(name).cloned()
    }

    /// How many listeners are warming.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// The earliest time a warming listener stops waiting anyway.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.lock()
            .values()
            .flat_map(|w| w.pending.iter().filter_map(|p| p.deadline))
            .min()
    }

    /// A receiver that changes whenever the set changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Stats;

    fn tls_listener(timeout: &str, cluster: &str) -> Listener {
        let doc = serde_json::json!({
            "name": "tls",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
            "filter_chains": [{
                "filters": [{"name": "tcp", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": "t", "cluster": "c"}}],
                "transport_socket": {"name": "tls", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "common_tls_context": {
                        "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": {
                            "api_config_source": {"api_type": "GRPC", "grpc_services": [{"envoy_grpc": {"cluster_name": cluster}}]},
                            "initial_fetch_timeout": timeout}}],
                        "combined_validation_context": {
                            "default_validation_context": {},
                            "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": {
                                "api_config_source": {"api_type": "GRPC", "grpc_services": [{"envoy_grpc": {"cluster_name": cluster}}]}}}
                        }
                    }}}
            }]
        });
        let raw = waypoint_proto::json::from_json(&doc).expect("listener JSON");
        Listener::compile(raw, "").expect("compiles")
    }

    #[test]
    fn needed_secrets_follow_the_sds_sources() {
        let clusters: BTreeSet<String> = ["sds-grpc".to_owned()].into();
        let l = tls_listener("0s", "sds-grpc");
        let needed = needed_secrets(&l, &clusters);
        assert_eq!(
            needed,
            BTreeMap::from([
                ("ROOTCA".to_owned(), Some(DEFAULT_INITIAL_FETCH_TIMEOUT)),
                ("default".to_owned(), None),
            ])
        );
        let l = tls_listener("2s", "sds-grpc");
        assert_eq!(
            needed_secrets(&l, &clusters).get("default"),
            Some(&Some(Duration::from_secs(2)))
        );
        // A source nothing fetches is not waited for.
        let l = tls_listener("0s", "elsewhere");
        assert!(needed_secrets(&l, &clusters).is_empty());
    }

    #[test]
    fn pending_until_arrival_or_timeout() {
        let needed = BTreeMap::from([
            ("a".to_owned(), None),
            ("b".to_owned(), Some(Duration::from_secs(1))),
        ]);
        let t0 = Instant::now();
        let p = pending(&needed, |_| false, t0, t0);
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].deadline, Some(t0 + Duration::from_secs(1)));
        // `b` timed out; `a` waits forever until it arrives.
        let p = pending(&needed, |_| false, t0, t0 + Duration::from_secs(2));
        assert_eq!(p.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["a"]);
        assert!(pending(&needed, |n| n == "a", t0, t0 + Duration::from_secs(2)).is_empty());
    }

    #[test]
    fn record_keeps_the_serving_version_and_the_gauge() {
        let stats = Stats::default();
        let w = WarmingListeners::new(stats.gauge("listener_manager.total_listeners_warming"));
        let l = Arc::new(tls_listener("0s", "sds-grpc"));
        let entry = Entry {
            version: "1".into(),
            resource: None,
            last_updated: std::time::SystemTime::now(),
            error: None,
        };
        w.begin(l.clone(), vec![], true, Instant::now());
        w.remember_active("tls", entry.clone());
        assert_eq!(
            stats
                .gauge("listener_manager.total_listeners_warming")
                .get(),
            1
        );
        // A newer warming version keeps the serving one.
        w.begin(l.clone(), vec![], true, Instant::now());
        assert_eq!(
            w.get("tls").and_then(|x| x.active).map(|e| e.version),
            Some("1".into())
        );
        // A brand-new listener has none to remember.
        w.begin(l, vec![], false, Instant::now());
        w.remember_active("tls", entry);
        assert!(w.get("tls").is_some_and(|x| x.active.is_none()));
        assert!(w.finish("tls").is_some());
        assert!(w.is_empty());
        assert_eq!(
            stats
                .gauge("listener_manager.total_listeners_warming")
                .get(),
            0
        );
    }
}
