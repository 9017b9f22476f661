//! The stats store: named counters and gauges with Envoy's names (`cluster_manager.cds.update_success`,
//! `server.state`, ...). Handles are `Arc<AtomicU64>`s: the registry lock is taken only to create or list
//! a stat, never per request.
//!
//! The bootstrap's `stats_config.stats_matcher` ([`StatsMatcher`]) is applied once per stat, when it
//! is created: a rejected stat gets a handle like any other (callers need not care) but is marked
//! hidden, and every listing ([`Stats::snapshot`], hence `/stats` and `/stats/prometheus`) leaves it
//! out, as Envoy never instantiates it.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use crate::stats_matcher::StatsMatcher;

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
    /// Rejected by the stats matcher: counted (code that reads a value keeps working) but never
    /// listed.
    hidden: bool,
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

    /// Whether the stats matcher rejected it (left out of every listing).
    pub fn hidden(&self) -> bool {
        self.hidden
    }
}

/// The registry.
#[derive(Debug, Default)]
pub struct Stats {
    // std RwLock: held only for map lookups/inserts, never across an await.
    map: RwLock<BTreeMap<String, Arc<Stat>>>,
    /// Istio's standard metrics (labelled series, rendered into `/stats/prometheus`).
    pub istio: crate::telemetry::istio::IstioMetrics,
    /// Which stats exist (the bootstrap's `stats_config.stats_matcher`; all by default).
    matcher: StatsMatcher,
}

impl Stats {
    /// A registry whose stats are judged by `matcher` when they are created; Istio's standard
    /// metrics are judged by their Envoy names (`istiocustom.istio_requests_total`) now.
    pub fn with_matcher(matcher: StatsMatcher) -> Stats {
        let stats = Stats {
            matcher,
            ..Stats::default()
        };
        stats.istio.hide(|name| stats.matcher.rejects(name));
        stats
    }

    /// The stats matcher in force.
    pub fn matcher(&self) -> &StatsMatcher {
        &self.matcher
    }

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
                    // The one matcher evaluation of this stat's life.
                    hidden: self.matcher.rejects(name),
                })
            })
            .clone()
    }

    /// Every stat the stats matcher lets exist, sorted by name: (name, kind, value, used).
    pub fn snapshot(&self) -> Vec<(String, Kind, u64, bool)> {
        let map = match self.map.read() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.iter()
            .filter(|(_, s)| !s.hidden)
            .map(|(n, s)| (n.clone(), s.kind, s.get(), s.used()))
            .collect()
    }
}

/// Counters by response code, as Envoy keeps them per cluster (`upstream_rq_200`,
/// `upstream_rq_2xx`, `upstream_rq_completed`) and per HCM (`downstream_rq_2xx`): the class
/// counters are fixed handles, an exact code's handle is made on first use and cached (a read lock
/// of this set of codes, never the registry's, on the request path).
pub struct CodeStats {
    prefix: String,
    classes: [Arc<Stat>; 5],
    completed: Arc<Stat>,
    exact: RwLock<BTreeMap<u16, Arc<Stat>>>,
    /// Also count exact codes (clusters do; HCMs count classes only).
    by_code: bool,
}

impl std::fmt::Debug for CodeStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodeStats")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl CodeStats {
    /// The counters `<prefix>_<code>`, `<prefix>_<N>xx` and `<prefix>_completed` in `s`.
    pub fn new(s: &Stats, prefix: &str) -> CodeStats {
        let class = |n: u8| s.counter(&format!("{prefix}_{n}xx"));
        CodeStats {
            prefix: prefix.to_owned(),
            classes: [class(1), class(2), class(3), class(4), class(5)],
            completed: s.counter(&format!("{prefix}_completed")),
            exact: RwLock::default(),
            by_code: true,
        }
    }

    /// Class counters and `_completed` only (Envoy's HCM `downstream_rq_<N>xx`).
    pub fn classes_only(s: &Stats, prefix: &str) -> CodeStats {
        CodeStats {
            by_code: false,
            ..CodeStats::new(s, prefix)
        }
    }

    /// Counts one response with `code` (`registry` makes an exact code's counter the first time).
    pub fn record(&self, registry: &Stats, code: u16) {
        self.completed.inc();
        if let Some(c) = (code / 100)
            .checked_sub(1)
            .and_then(|i| self.classes.get(usize::from(i)))
        {
            c.inc();
        }
        if !self.by_code {
            return;
        }
        let cached = self.exact.read().ok().and_then(|m| m.get(&code).cloned());
        let stat = match cached {
            Some(s) => s,
            None => {
                let s = registry.counter(&format!("{}_{code}", self.prefix));
                if let Ok(mut m) = self.exact.write() {
                    m.insert(code, s.clone());
                }
                s
            }
        };
        stat.inc();
    }
}

/// An HCM's request counters (Envoy's `http.<stat_prefix>.downstream_rq_*`), looked up once per
/// connection.
#[derive(Debug)]
pub struct HcmStats {
    /// `downstream_rq_total`.
    pub rq_total: Arc<Stat>,
    /// `downstream_rq_active`.
    pub rq_active: Arc<Stat>,
    /// `downstream_rq_<N>xx`, `downstream_rq_completed`.
    pub codes: CodeStats,
    /// `downstream_rq_idle_timeout`: streams ended by `stream_idle_timeout` / route `idle_timeout`.
    pub rq_idle_timeout: Arc<Stat>,
    /// `downstream_rq_timeout`: streams ended by `request_timeout`.
    pub rq_timeout: Arc<Stat>,
    /// `downstream_rq_max_duration_reached`: streams ended by `max_stream_duration`.
    pub rq_max_duration_reached: Arc<Stat>,
    /// `downstream_cx_idle_timeout`: connections closed by `idle_timeout`.
    pub cx_idle_timeout: Arc<Stat>,
    /// `downstream_cx_max_duration_reached`: connections drained by `max_connection_duration`.
    pub cx_max_duration_reached: Arc<Stat>,
    /// `downstream_cx_max_requests_reached`: connections drained by `max_requests_per_connection`.
    pub cx_max_requests_reached: Arc<Stat>,
}

impl HcmStats {
    /// The counters of the HCM with `stat_prefix` in `s`.
    pub fn new(s: &Stats, stat_prefix: &str) -> HcmStats {
        let p = format!("http.{stat_prefix}.downstream_rq");
        let cx = |n: &str| s.counter(&format!("http.{stat_prefix}.downstream_cx_{n}"));
        HcmStats {
            rq_total: s.counter(&format!("{p}_total")),
            rq_active: s.gauge(&format!("{p}_active")),
            codes: CodeStats::classes_only(s, &p),
            rq_idle_timeout: s.counter(&format!("{p}_idle_timeout")),
            rq_timeout: s.counter(&format!("{p}_timeout")),
            rq_max_duration_reached: s.counter(&format!("{p}_max_duration_reached")),
            cx_idle_timeout: cx("idle_timeout"),
            cx_max_duration_reached: cx("max_duration_reached"),
            cx_max_requests_reached: cx("max_requests_reached"),
        }
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

    #[test]
    fn response_codes_count_by_code_class_and_total() {
        let stats = Stats::default();
        let codes = CodeStats::new(&stats, "cluster.c.upstream_rq");
        for code in [200, 200, 503, 0] {
            codes.record(&stats, code);
        }
        let get = |n: &str| {
            stats
                .snapshot()
                .into_iter()
                .find(|(name, ..)| name == n)
                .map(|(_, _, v, _)| v)
        };
        assert_eq!(get("cluster.c.upstream_rq_200"), Some(2));
        assert_eq!(get("cluster.c.upstream_rq_2xx"), Some(2));
        assert_eq!(get("cluster.c.upstream_rq_503"), Some(1));
        assert_eq!(get("cluster.c.upstream_rq_5xx"), Some(1));
        assert_eq!(get("cluster.c.upstream_rq_completed"), Some(4));
        assert_eq!(get("cluster.c.upstream_rq_4xx"), Some(0));
        let hcm = CodeStats::classes_only(&stats, "http.p.downstream_rq");
        hcm.record(&stats, 404);
        assert_eq!(get("http.p.downstream_rq_4xx"), Some(1));
        assert_eq!(get("http.p.downstream_rq_404"), None);
    }

    #[test]
    fn rejected_stats_count_but_are_never_listed() {
        let matcher = crate::stats_matcher::StatsMatcher::compile(
            &waypoint_proto::json::from_json(&serde_json::json!({
                "inclusion_list": { "patterns": [{ "prefix": "server." }] }
            }))
            .expect("matcher decodes"),
            "stats_matcher",
        )
        .expect("compiles");
        let stats = Stats::with_matcher(matcher);
        let hidden = stats.counter("cluster.c.upstream_rq_total");
        hidden.inc();
        stats.gauge("server.live").set(1);
        // The handle still counts (code reading it keeps working) and is the same handle.
        assert!(hidden.hidden());
        assert_eq!(stats.counter("cluster.c.upstream_rq_total").get(), 1);
        assert!(!stats.gauge("server.live").hidden());
        let names: Vec<String> = stats.snapshot().into_iter().map(|s| s.0).collect();
        assert_eq!(names, ["server.live"]);
    }
}
