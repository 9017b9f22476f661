//! The stats store: named counters and gauges with Envoy's names (`cluster_manager.cds.update_success`,
//! `server.state`, ...). Handles are `Arc<AtomicU64>`s: the registry lock is taken only to create or list
//! a stat, never per request.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

/// Counter or gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only grows.
    Counter,
    /// Goes up and down.
    Gauge,
}

/// One stat.
#[derive(Debug)]
pub struct Stat {
    /// Counter or gauge.
    pub kind: Kind,
    value: AtomicU64,
    used: AtomicBool,
}

impl Stat {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
        self.used.store(true, Ordering::Relaxed);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Subtracts one (gauges).
    pub fn dec(&self) {
        self.value.fetch_sub(1, Ordering::Relaxed);
        self.used.store(true, Ordering::Relaxed);
    }

    /// Sets the value (gauges).
    pub fn set(&self, v: u64) {
        self.value.store(v, Ordering::Relaxed);
        self.used.store(true, Ordering::Relaxed);
    }

    /// The value.
    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }

    /// Whether it was ever written (`/stats?usedonly`).
    pub fn used(&self) -> bool {
        self.used.load(Ordering::Relaxed)
    }
}

/// The registry.
#[derive(Debug, Default)]
pub struct Stats {
    // std RwLock: held only for map lookups/inserts, never across an await.
    map: RwLock<BTreeMap<String, Arc<Stat>>>,
    /// Istio's standard metrics (labelled series, rendered into `/stats/prometheus`).
    pub istio: crate::telemetry::istio::IstioMetrics,
}

impl Stats {
    /// The counter `name`, created on first use.
    pub fn counter(&self, name: &str) -> Arc<Stat> {
        self.get_or_create(name, Kind::Counter)
    }

    /// The gauge `name`, created on first use.
    pub fn gauge(&self, name: &str) -> Arc<Stat> {
        self.get_or_create(name, Kind::Gauge)
    }

    fn get_or_create(&self, name: &str, kind: Kind) -> Arc<Stat> {
        if let Ok(map) = self.map.read()
            && let Some(s) = map.get(name)
        {
            return s.clone();
        }
        let mut map = match self.map.write() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Stat {
                    kind,
                    value: AtomicU64::new(0),
                    used: AtomicBool::new(false),
                })
            })
            .clone()
    }

    /// Every stat, sorted by name.
    pub fn snapshot(&self) -> Vec<(String, Kind, u64, bool)> {
        let map = match self.map.read() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.iter()
            .map(|(n, s)| (n.clone(), s.kind, s.get(), s.used()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_shared_and_usedonly_tracks_writes() {
        let stats = Stats::default();
        let a = stats.counter("cluster_manager.cds.update_success");
        let b = stats.counter("cluster_manager.cds.update_success");
        stats.gauge("server.state");
        a.inc();
        b.inc();
        let snap = stats.snapshot();
        assert_eq!(
            snap[0],
            (
                "cluster_manager.cds.update_success".to_owned(),
                Kind::Counter,
                2,
                true
            )
        );
        assert_eq!(snap[1], ("server.state".to_owned(), Kind::Gauge, 0, false));
    }
}
