//! Outlier detection (Envoy's passive health checking): the router and `tcp_proxy` report each
//! attempt's outcome to the host's [`HostMonitor`]; consecutive failures eject a host inline,
//! success-rate and failure-percentage statistics eject at every `interval`, when ejected hosts
//! whose time is up also return. An ejected host counts as unhealthy to the load balancer (so
//! the panic threshold applies to ejections too); the cluster's [`Hosts`] is rebuilt on every
//! ejection and return.
//!
//! Envoy's rules, as its architecture overview and `OutlierDetection` proto describe them:
//!
//! * **Origins.** By default local-origin results (connect failure, reset, timeout) count as HTTP
//!   codes (503, 503, 504) in the same consecutive and success-rate counters as upstream
//!   responses. With `split_external_local_origin_errors` they have their own consecutive counter
//!   (`consecutive_local_origin_failure`) and success-rate bucket.
//! * **Consecutive failures.** A 5xx bumps `consecutive_5xx`; a 502/503/504 also bumps the gateway
//!   counter (a different 5xx resets it); anything else resets both. Reaching a threshold is a
//!   detection (`ejections_detected_*`), ejected with the `enforcing_*` probability, and the
//!   counter starts again. An already ejected host is not ejected again.
//! * **Max ejection percent.** A host is ejected only while `(ejected + 1) / hosts` stays within
//!   `max_ejection_percent`, or when nothing is ejected and `always_eject_one_host` is set;
//!   otherwise `ejections_overflow`.
//! * **Ejection time.** `base_ejection_time × multiplier` (+ up to `max_ejection_time_jitter`),
//!   the multiplier growing by one per ejection while the product is below `max_ejection_time`
//!   (default 300 s or the base, whichever is larger) and shrinking by one at every interval the
//!   host is not ejected. A host returns at the first interval after its time.
//! * **Success rate.** Over the hosts (not ejected) with at least `success_rate_request_volume`
//!   requests in the interval, when there are at least `success_rate_minimum_hosts` of them: a host
//!   whose rate is below `mean − stdev × success_rate_stdev_factor / 1000` is an outlier.
//! * **Failure percentage.** Over hosts with at least `failure_percentage_request_volume` requests,
//!   when there are at least `failure_percentage_minimum_hosts`: a host failing at least
//!   `failure_percentage_threshold` percent is an outlier.
//!
//! Unlike Envoy, a returning host's consecutive counters start from zero, so that a host still
//! failing after its ejection is ejected again after `consecutive_5xx` more failures.

use std::{
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::time::Instant;

use super::lb::{Host, Hosts};
use crate::{
    config::cluster::OutlierDetection,
    flags::ProxyError,
    stats::{Stat, Stats},
};

/// What one attempt on a host came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered with this status (externally originated).
    Http(u16),
    /// The connection could not be opened, or broke (reset) before the response.
    LocalConnectFailed,
    /// The attempt timed out.
    LocalTimeout,
    /// The connection opened; a protocol result follows on it (HTTP).
    LocalConnectSuccess,
    /// The connection opened and nothing else will be reported (TCP proxy).
    LocalConnectSuccessFinal,
}

impl Outcome {
    /// The outcome of a failed attempt, or `None` when the failure is not the host's (an open
    /// circuit breaker, a missing cluster, …).
    pub fn of_error(e: &ProxyError) -> Option<Outcome> {
        match e {
            ProxyError::ConnectFailure(_)
            | ProxyError::UpstreamReset(_)
            | ProxyError::UpstreamProtocol(_) => Some(Outcome::LocalConnectFailed),
            // The route timeout and the router's per-try timers (Envoy reports both).
            ProxyError::Timeout
            | ProxyError::StreamTimeout {
                kind:
                    crate::http::timeout::Expired::PerTry | crate::http::timeout::Expired::PerTryIdle,
                ..
            } => Some(Outcome::LocalTimeout),
            _ => None,
        }
    }

    /// Envoy's mapping of a result to an HTTP code when origins are not split.
    fn as_http(self) -> Option<u16> {
        match self {
            Outcome::Http(c) => Some(c),
            Outcome::LocalConnectFailed => Some(503),
            Outcome::LocalTimeout => Some(504),
            Outcome::LocalConnectSuccess => None,
            Outcome::LocalConnectSuccessFinal => Some(200),
        }
    }
}

/// Why a host was ejected (Envoy's `OutlierEjectionType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EjectionType {
    /// `consecutive_5xx`.
    Consecutive5xx,
    /// `consecutive_gateway_failure`.
    ConsecutiveGatewayFailure,
    /// `consecutive_local_origin_failure`.
    ConsecutiveLocalOriginFailure,
    /// Success rate (external origin, or all with origins not split).
    SuccessRate,
    /// Success rate of local-origin results.
    SuccessRateLocalOrigin,
    /// Failure percentage.
    FailurePercentage,
    /// Failure percentage of local-origin results.
    FailurePercentageLocalOrigin,
}

impl EjectionType {
    const ALL: [EjectionType; 7] = [
        EjectionType::Consecutive5xx,
        EjectionType::ConsecutiveGatewayFailure,
        EjectionType::ConsecutiveLocalOriginFailure,
        EjectionType::SuccessRate,
        EjectionType::SuccessRateLocalOrigin,
        EjectionType::FailurePercentage,
        EjectionType::FailurePercentageLocalOrigin,
    ];

    /// The suffix of Envoy's `ejections_{detected,enforced}_<suffix>` stats.
    pub fn stat_suffix(self) -> &'static str {
        match self {
            EjectionType::Consecutive5xx => "consecutive_5xx",
            EjectionType::ConsecutiveGatewayFailure => "consecutive_gateway_failure",
            EjectionType::ConsecutiveLocalOriginFailure => "consecutive_local_origin_failure",
            EjectionType::SuccessRate => "success_rate",
            EjectionType::SuccessRateLocalOrigin => "local_origin_success_rate",
            EjectionType::FailurePercentage => "failure_percentage",
            EjectionType::FailurePercentageLocalOrigin => "failure_percentage_local_origin",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The detector's settings with Envoy's defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// `consecutive_5xx` (5).
    pub consecutive_5xx: u32,
    /// `consecutive_gateway_failure` (5).
    pub consecutive_gateway_failure: u32,
    /// `consecutive_local_origin_failure` (5).
    pub consecutive_local_origin_failure: u32,
    /// `interval` (10 s).
    pub interval: Duration,
    /// `base_ejection_time` (30 s).
    pub base_ejection_time: Duration,
    /// `max_ejection_time` (300 s, or the base when larger).
    pub max_ejection_time: Duration,
    /// `max_ejection_time_jitter` (0).
    pub max_ejection_time_jitter: Duration,
    /// `max_ejection_percent` (10).
    pub max_ejection_percent: u32,
    /// `enforcing_consecutive_5xx` (100).
    pub enforcing_consecutive_5xx: u32,
    /// `enforcing_consecutive_gateway_failure` (0).
    pub enforcing_consecutive_gateway_failure: u32,
    /// `enforcing_consecutive_local_origin_failure` (100).
    pub enforcing_consecutive_local_origin_failure: u32,
    /// `enforcing_success_rate` (100).
    pub enforcing_success_rate: u32,
    /// `enforcing_local_origin_success_rate` (100).
    pub enforcing_local_origin_success_rate: u32,
    /// `success_rate_minimum_hosts` (5).
    pub success_rate_minimum_hosts: u32,
    /// `success_rate_request_volume` (100).
    pub success_rate_request_volume: u32,
    /// `success_rate_stdev_factor` (1900, i.e. 1.9).
    pub success_rate_stdev_factor: u32,
    /// `failure_percentage_threshold` (85).
    pub failure_percentage_threshold: u32,
    /// `enforcing_failure_percentage` (0).
    pub enforcing_failure_percentage: u32,
    /// `enforcing_failure_percentage_local_origin` (0).
    pub enforcing_failure_percentage_local_origin: u32,
    /// `failure_percentage_minimum_hosts` (5).
    pub failure_percentage_minimum_hosts: u32,
    /// `failure_percentage_request_volume` (50).
    pub failure_percentage_request_volume: u32,
    /// `split_external_local_origin_errors`.
    pub split_external_local_origin_errors: bool,
    /// `always_eject_one_host`.
    pub always_eject_one_host: bool,
}

/// Envoy's default `max_ejection_time`.
const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
/// The shortest interval we run (Envoy requires a positive one; a zero would spin).
const MIN_INTERVAL: Duration = Duration::from_millis(1);

impl From<&OutlierDetection> for Settings {
    fn from(o: &OutlierDetection) -> Settings {
        let base = o.base_ejection_time.unwrap_or(Duration::from_secs(30));
        Settings {
            consecutive_5xx: o.consecutive_5xx.unwrap_or(5),
            consecutive_gateway_failure: o.consecutive_gateway_failure.unwrap_or(5),
            consecutive_local_origin_failure: o.consecutive_local_origin_failure.unwrap_or(5),
            interval: o
                .interval
                .unwrap_or(Duration::from_secs(10))
                .max(MIN_INTERVAL),
            base_ejection_time: base,
            max_ejection_time: o
                .max_ejection_time
                .unwrap_or(DEFAULT_MAX_EJECTION_TIME.max(base)),
            max_ejection_time_jitter: o.max_ejection_time_jitter.unwrap_or_default(),
            max_ejection_percent: o.max_ejection_percent.unwrap_or(10),
            enforcing_consecutive_5xx: o.enforcing_consecutive_5xx.unwrap_or(100),
            enforcing_consecutive_gateway_failure: o
                .enforcing_consecutive_gateway_failure
                .unwrap_or(0),
            enforcing_consecutive_local_origin_failure: o
                .enforcing_consecutive_local_origin_failure
                .unwrap_or(100),
            enforcing_success_rate: o.enforcing_success_rate.unwrap_or(100),
            enforcing_local_origin_success_rate: o
                .enforcing_local_origin_success_rate
                .unwrap_or(100),
            success_rate_minimum_hosts: o.success_rate_minimum_hosts.unwrap_or(5),
            success_rate_request_volume: o.success_rate_request_volume.unwrap_or(100),
            success_rate_stdev_factor: o.success_rate_stdev_factor.unwrap_or(1900),
            failure_percentage_threshold: o.failure_percentage_threshold.unwrap_or(85),
            enforcing_failure_percentage: o.enforcing_failure_percentage.unwrap_or(0),
            enforcing_failure_percentage_local_origin: o
                .enforcing_failure_percentage_local_origin
                .unwrap_or(0),
            failure_percentage_minimum_hosts: o.failure_percentage_minimum_hosts.unwrap_or(5),
            failure_percentage_request_volume: o.failure_percentage_request_volume.unwrap_or(50),
            split_external_local_origin_errors: o.split_external_local_origin_errors,
            always_eject_one_host: o.always_eject_one_host,
        }
    }
}

impl Settings {
    fn enforcing(&self, t: EjectionType) -> u32 {
        match t {
            EjectionType::Consecutive5xx => self.enforcing_consecutive_5xx,
            EjectionType::ConsecutiveGatewayFailure => self.enforcing_consecutive_gateway_failure,
            EjectionType::ConsecutiveLocalOriginFailure => {
                self.enforcing_consecutive_local_origin_failure
            }
            EjectionType::SuccessRate => self.enforcing_success_rate,
            EjectionType::SuccessRateLocalOrigin => self.enforcing_local_origin_success_rate,
            EjectionType::FailurePercentage => self.enforcing_failure_percentage,
            EjectionType::FailurePercentageLocalOrigin => {
                self.enforcing_failure_percentage_local_origin
            }
        }
    }
}

/// Requests and successes in the current interval.
#[derive(Debug, Default)]
struct Bucket {
    total: AtomicU64,
    success: AtomicU64,
}

impl Bucket {
    fn record(&self, success: bool) {
        self.total.fetch_add(1, Ordering::Relaxed);
        if success {
            self.success.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The interval's (total, successes), starting the next interval.
    fn take(&self) -> (u64, u64) {
        let success = self.success.swap(0, Ordering::Relaxed);
        let total = self.total.swap(0, Ordering::Relaxed);
        (total, success.min(total))
    }
}

/// Ejection bookkeeping of one host (touched on ejections and interval ticks only).
#[derive(Debug, Default)]
struct EjectionState {
    ejected_at: Option<Instant>,
    jitter: Duration,
    multiplier: u32,
    num_ejections: u32,
    success_rate: Option<f64>,
    local_success_rate: Option<f64>,
}

/// The outlier state of one host, kept while the host stays in the cluster (also across EDS
/// updates that change other fields of the endpoint).
#[derive(Debug, Default)]
pub struct HostMonitor {
    ejected: AtomicBool,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    external: Bucket,
    local: Bucket,
    state: Mutex<EjectionState>,
}

impl HostMonitor {
    /// Whether the host is ejected now.
    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Acquire)
    }

    /// How many times the host was ejected.
    pub fn num_ejections(&self) -> u32 {
        self.state().num_ejections
    }

    /// The success rate computed at the last interval (percent), when the host had the volume.
    pub fn success_rate(&self) -> Option<f64> {
        self.state().success_rate
    }

    /// The local-origin success rate computed at the last interval (split mode).
    pub fn local_success_rate(&self) -> Option<f64> {
        self.state().local_success_rate
    }

    fn state(&self) -> std::sync::MutexGuard<'_, EjectionState> {
        // Plain data: usable after a panic elsewhere.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn reset_consecutive(&self) {
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
        self.consecutive_local.store(0, Ordering::Relaxed);
    }
}

/// Envoy's `cluster.<name>.outlier_detection.*` stats.
struct OutlierStats {
    enforced_total: Arc<Stat>,
    active: Arc<Stat>,
    overflow: Arc<Stat>,
    detected: Vec<Arc<Stat>>,
    enforced: Vec<Arc<Stat>>,
}

impl OutlierStats {
    fn new(stats: &Stats, cluster: &str) -> OutlierStats {
        let name = |n: &str| format!("cluster.{cluster}.outlier_detection.{n}");
        OutlierStats {
            enforced_total: stats.counter(&name("ejections_enforced_total")),
            active: stats.gauge(&name("ejections_active")),
            overflow: stats.counter(&name("ejections_overflow")),
            detected: EjectionType::ALL
                .iter()
                .map(|t| stats.counter(&name(&format!("ejections_detected_{}", t.stat_suffix()))))
                .collect(),
            enforced: EjectionType::ALL
                .iter()
                .map(|t| stats.counter(&name(&format!("ejections_enforced_{}", t.stat_suffix()))))
                .collect(),
        }
    }
}

/// A cluster's outlier detector.
pub struct OutlierDetector {
    settings: ArcSwap<Settings>,
    hosts: Arc<Hosts>,
    stats: OutlierStats,
    /// Serialises ejections and interval sweeps (never held across an `.await`).
    sweep: Mutex<()>,
}

impl OutlierDetector {
    /// A detector over `hosts` with `config`, publishing under `cluster.<stat_name>`. With a Tokio
    /// runtime at hand the interval sweep runs on it until the detector is dropped.
    pub fn new(
        config: &OutlierDetection,
        hosts: Arc<Hosts>,
        stats: &Stats,
        stat_name: &str,
    ) -> Arc<OutlierDetector> {
        let d = Arc::new(OutlierDetector {
            settings: ArcSwap::from_pointee(Settings::from(config)),
            hosts,
            stats: OutlierStats::new(stats, stat_name),
            sweep: Mutex::new(()),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(run(Arc::downgrade(&d)));
        }
        d
    }

    /// Applies a changed `outlier_detection` (ejections in force keep their times).
    pub fn configure(&self, config: &OutlierDetection) {
        let s = Settings::from(config);
        if **self.settings.load() != s {
            self.settings.store(Arc::new(s));
        }
    }

    /// Returns every ejected host (outlier detection was removed from the cluster).
    pub fn uneject_all(&self) {
        let _sweep = self.sweep.lock().unwrap_or_else(PoisonError::into_inner);
        for h in self.hosts.load().hosts() {
            h.outlier.ejected.store(false, Ordering::Release);
            h.outlier.reset_consecutive();
            h.outlier.state().ejected_at = None;
        }
        self.publish_and_rebuild();
    }

    /// The settings in force.
    pub fn settings(&self) -> Settings {
        **self.settings.load()
    }

    /// Records one attempt's `outcome` on `host`; a consecutive-failure threshold reached ejects
    /// it (subject to the enforcement percentage and `max_ejection_percent`).
    pub fn report(&self, host: &Host, outcome: Outcome) {
        let s = self.settings.load();
        let m = &host.outlier;
        if s.split_external_local_origin_errors {
            match outcome {
                Outcome::LocalConnectSuccess | Outcome::LocalConnectSuccessFinal => {
                    m.local.record(true);
                    m.consecutive_local.store(0, Ordering::Relaxed);
                }
                Outcome::LocalConnectFailed | Outcome::LocalTimeout => {
                    m.local.record(false);
                    let n = m.consecutive_local.fetch_add(1, Ordering::Relaxed) + 1;
                    if n == s.consecutive_local_origin_failure {
                        self.on_consecutive(host, EjectionType::ConsecutiveLocalOriginFailure);
                    }
                }
                Outcome::Http(code) => self.http_code(host, &s, code),
            }
        } else if let Some(code) = outcome.as_http() {
            self.http_code(host, &s, code);
        }
    }

    fn http_code(&self, host: &Host, s: &Settings, code: u16) {
        let m = &host.outlier;
        if code >= 500 {
            m.external.record(false);
            if matches!(code, 502..=504) {
                let n = m.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1;
                if n == s.consecutive_gateway_failure {
                    self.on_consecutive(host, EjectionType::ConsecutiveGatewayFailure);
                }
            } else {
                m.consecutive_gateway.store(0, Ordering::Relaxed);
            }
            let n = m.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
            if n == s.consecutive_5xx {
                self.on_consecutive(host, EjectionType::Consecutive5xx);
            }
        } else {
            m.external.record(true);
            m.consecutive_5xx.store(0, Ordering::Relaxed);
            m.consecutive_gateway.store(0, Ordering::Relaxed);
        }
    }

    fn on_consecutive(&self, host: &Host, t: EjectionType) {
        let _sweep = self.sweep.lock().unwrap_or_else(PoisonError::into_inner);
        if host.outlier.is_ejected() {
            return;
        }
        let counter = match t {
            EjectionType::Consecutive5xx => &host.outlier.consecutive_5xx,
            EjectionType::ConsecutiveGatewayFailure => &host.outlier.consecutive_gateway,
            _ => &host.outlier.consecutive_local,
        };
        counter.store(0, Ordering::Relaxed);
        self.stats.detected[t.index()].inc();
        if self.eject(host, t, Instant::now()) {
            self.publish_and_rebuild();
        }
    }

    /// Ejects `host` for `t` unless `max_ejection_percent` or the enforcement roll forbids it.
    /// The caller holds `sweep`.
    fn eject(&self, host: &Host, t: EjectionType, now: Instant) -> bool {
        let s = self.settings.load();
        let set = self.hosts.load();
        let total = set.hosts().len().max(1);
        let active = set
            .hosts()
            .iter()
            .filter(|h| h.outlier.is_ejected())
            .count();
        let percent = 100.0 * (active + 1) as f64 / total as f64;
        let allowed = percent <= f64::from(s.max_ejection_percent)
            || (s.always_eject_one_host && active == 0);
        if !allowed {
            self.stats.overflow.inc();
            return false;
        }
        let enforcing = s.enforcing(t);
        if enforcing < 100 && (enforcing == 0 || rand::random::<u32>() % 100 >= enforcing) {
            return false;
        }
        let m = &host.outlier;
        {
            let mut st = m.state();
            st.ejected_at = Some(now);
            st.num_ejections = st.num_ejections.saturating_add(1);
            if s.base_ejection_time.saturating_mul(st.multiplier) < s.max_ejection_time {
                st.multiplier += 1;
            }
            st.jitter = if s.max_ejection_time_jitter.is_zero() {
                Duration::ZERO
            } else {
                s.max_ejection_time_jitter.mul_f64(rand::random::<f64>())
            };
        }
        m.ejected.store(true, Ordering::Release);
        self.stats.enforced[t.index()].inc();
        self.stats.enforced_total.inc();
        tracing::info!(
            target: "outlier",
            cluster = %set.cluster_name(),
            host = %host.hash_key(false),
            kind = t.stat_suffix(),
            "host ejected"
        );
        true
    }

    fn publish_and_rebuild(&self) {
        self.hosts.refresh();
        let ejected = self
            .hosts
            .load()
            .hosts()
            .iter()
            .filter(|h| h.outlier.is_ejected())
            .count();
        self.stats.active.set(ejected as u64);
    }

    /// One interval sweep at `now`: hosts whose ejection time is over return, the multipliers
    /// of the others decay, and the success-rate and failure-percentage rules run over the
    /// interval's counts.
    pub fn sweep(&self, now: Instant) {
        let _sweep = self.sweep.lock().unwrap_or_else(PoisonError::into_inner);
        let s = **self.settings.load();
        let set = self.hosts.load();
        let mut changed = false;
        for h in set.hosts() {
            let m = &h.outlier;
            let mut st = m.state();
            if m.is_ejected() {
                let time = s
                    .base_ejection_time
                    .saturating_mul(st.multiplier)
                    .min(s.max_ejection_time)
                    + st.jitter;
                if st
                    .ejected_at
                    .is_none_or(|at| now.duration_since(at) >= time)
                {
                    st.ejected_at = None;
                    m.ejected.store(false, Ordering::Release);
                    m.reset_consecutive();
                    changed = true;
                    tracing::info!(target: "outlier", host = %h.hash_key(false), "host returned");
                }
            } else if st.multiplier > 0 {
                st.multiplier -= 1;
            }
        }
        // The interval's counts; ejected hosts take no part.
        let mut external = Vec::new();
        let mut local = Vec::new();
        for h in set.hosts() {
            let (e, l) = (h.outlier.external.take(), h.outlier.local.take());
            if h.outlier.is_ejected() {
                continue;
            }
            external.push((h.clone(), e));
            local.push((h.clone(), l));
        }
        changed |= self.statistics(&s, &external, false, now);
        if s.split_external_local_origin_errors {
            changed |= self.statistics(&s, &local, true, now);
        }
        if changed {
            self.publish_and_rebuild();
        }
    }

    /// Success rate and failure percentage over `counts` ((total, success) per host).
    fn statistics(
        &self,
        s: &Settings,
        counts: &[(Arc<Host>, (u64, u64))],
        local: bool,
        now: Instant,
    ) -> bool {
        let rate = |(total, success): (u64, u64)| 100.0 * success as f64 / total.max(1) as f64;
        let sr_hosts: Vec<(&Arc<Host>, f64)> = counts
            .iter()
            .filter(|(_, c)| c.0 > 0 && c.0 >= u64::from(s.success_rate_request_volume))
            .map(|(h, c)| (h, rate(*c)))
            .collect();
        for (h, _) in counts {
            let mut st = h.outlier.state();
            // Envoy shows -1 (here `None`) for a host without the request volume.
            let value = sr_hosts
                .iter()
                .find(|(x, _)| Arc::ptr_eq(x, h))
                .map(|(_, r)| *r);
            if local {
                st.local_success_rate = value;
            } else {
                st.success_rate = value;
            }
        }
        let mut changed = false;
        if !sr_hosts.is_empty() && sr_hosts.len() >= s.success_rate_minimum_hosts as usize {
            let threshold = success_rate_threshold(
                &sr_hosts.iter().map(|(_, r)| *r).collect::<Vec<_>>(),
                f64::from(s.success_rate_stdev_factor) / 1000.0,
            );
            let t = if local {
                EjectionType::SuccessRateLocalOrigin
            } else {
                EjectionType::SuccessRate
            };
            for (h, r) in &sr_hosts {
                if *r < threshold && !h.outlier.is_ejected() {
                    self.stats.detected[t.index()].inc();
                    changed |= self.eject(h, t, now);
                }
            }
        }
        let fp_hosts: Vec<(&Arc<Host>, f64)> = counts
            .iter()
            .filter(|(_, c)| c.0 > 0 && c.0 >= u64::from(s.failure_percentage_request_volume))
            .map(|(h, c)| (h, rate(*c)))
            .collect();
        if !fp_hosts.is_empty() && fp_hosts.len() >= s.failure_percentage_minimum_hosts as usize {
            let t = if local {
                EjectionType::FailurePercentageLocalOrigin
            } else {
                EjectionType::FailurePercentage
            };
            for (h, r) in &fp_hosts {
                if 100.0 - r >= f64::from(s.failure_percentage_threshold) && !h.outlier.is_ejected()
                {
                    self.stats.detected[t.index()].inc();
                    changed |= self.eject(h, t, now);
                }
            }
        }
        changed
    }
}

/// Envoy's success-rate ejection threshold: `mean − factor × stdev` (population stdev).
pub fn success_rate_threshold(rates: &[f64], factor: f64) -> f64 {
    if rates.is_empty() {
        return 0.0;
    }
    let n = rates.len() as f64;
    let mean = rates.iter().sum::<f64>() / n;
    let variance = rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n;
    mean - factor * variance.sqrt()
}

/// The interval loop: one sweep per `interval` while the detector lives.
async fn run(detector: Weak<OutlierDetector>) {
    loop {
        let interval = match detector.upgrade() {
            Some(d) => d.settings().interval,
            None => return,
        };
        tokio::time::sleep(interval).await;
        match detector.upgrade() {
            Some(d) => d.sweep(Instant::now()),
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::SocketAddr};

    use super::*;
    use crate::{
        config::{
            cluster::{CommonLb, LbPolicy},
            endpoint::{Endpoint, EndpointAddress, Health, LoadAssignment, LocalityEndpoints},
        },
        upstream::lb::PickContext,
    };

    fn assignment(n: u16) -> LoadAssignment {
        LoadAssignment {
            cluster_name: "c".into(),
            localities: vec![LocalityEndpoints {
                locality: None,
                priority: 0,
                weight: None,
                endpoints: (0..n)
                    .map(|i| Endpoint {
                        address: EndpointAddress::Socket(SocketAddr::from((
                            [10, 0, 0, 1],
                            8000 + i,
                        ))),
                        additional_addresses: vec![],
                        hostname: None,
                        health: Health::Healthy,
                        weight: 1,
                        metadata: BTreeMap::new(),
                        original_dst: None,
                    })
                    .collect(),
            }],
            overprovisioning_factor: 140,
        }
    }

    struct Fixture {
        stats: Stats,
        hosts: Arc<Hosts>,
        detector: Arc<OutlierDetector>,
    }

    impl Fixture {
        /// `n` hosts and a detector over them (no runtime here, so no timer: tests sweep).
        fn new(n: u16, config: OutlierDetection) -> Fixture {
            let stats = Stats::default();
            let hosts = Arc::new(Hosts::new(
                &assignment(n),
                LbPolicy::RoundRobin,
                &CommonLb::default(),
            ));
            let detector = OutlierDetector::new(&config, hosts.clone(), &stats, "c");
            Fixture {
                stats,
                hosts,
                detector,
            }
        }

        fn host(&self, i: usize) -> Arc<Host> {
            self.hosts.hosts()[i].clone()
        }

        fn report(&self, i: usize, outcome: Outcome, times: usize) {
            let h = self.host(i);
            for _ in 0..times {
                self.detector.report(&h, outcome);
            }
        }

        fn stat(&self, name: &str) -> u64 {
            self.stats
                .counter(&format!("cluster.c.outlier_detection.{name}"))
                .get()
        }

        fn active(&self) -> u64 {
            self.stats
                .gauge("cluster.c.outlier_detection.ejections_active")
                .get()
        }

        /// Which hosts 100 picks land on.
        fn picked(&self) -> std::collections::BTreeSet<usize> {
            let all = self.hosts.hosts();
            (0..100u64)
                .filter_map(|r| {
                    let h = self.hosts.pick(&PickContext {
                        hash: None,
                        exclude: &[],
                        random: r,
                    })?;
                    all.iter().position(|x| Arc::ptr_eq(x, &h))
                })
                .collect()
        }
    }

    fn od(f: impl FnOnce(&mut OutlierDetection)) -> OutlierDetection {
        let mut o = OutlierDetection::default();
        f(&mut o);
        o
    }

    #[test]
    fn defaults_are_envoys() {
        let s = Settings::from(&OutlierDetection::default());
        assert_eq!(s.consecutive_5xx, 5);
        assert_eq!(s.consecutive_gateway_failure, 5);
        assert_eq!(s.consecutive_local_origin_failure, 5);
        assert_eq!(s.interval, Duration::from_secs(10));
        assert_eq!(s.base_ejection_time, Duration::from_secs(30));
        assert_eq!(s.max_ejection_time, Duration::from_secs(300));
        assert_eq!(s.max_ejection_percent, 10);
        assert_eq!(s.enforcing_consecutive_5xx, 100);
        assert_eq!(s.enforcing_consecutive_gateway_failure, 0);
        assert_eq!(s.enforcing_success_rate, 100);
        assert_eq!(
            (s.success_rate_minimum_hosts, s.success_rate_request_volume),
            (5, 100)
        );
        assert_eq!(s.success_rate_stdev_factor, 1900);
        assert_eq!(s.failure_percentage_threshold, 85);
        assert_eq!(s.enforcing_failure_percentage, 0);
        assert_eq!(
            (
                s.failure_percentage_minimum_hosts,
                s.failure_percentage_request_volume
            ),
            (5, 50)
        );
        // A base above 300 s raises the default maximum to it.
        let s = Settings::from(&od(|o| {
            o.base_ejection_time = Some(Duration::from_secs(400))
        }));
        assert_eq!(s.max_ejection_time, Duration::from_secs(400));
    }

    #[test]
    fn consecutive_5xx_ejects_and_the_balancer_skips_the_host() {
        let f = Fixture::new(
            2,
            od(|o| {
                o.consecutive_5xx = Some(3);
                o.max_ejection_percent = Some(50);
            }),
        );
        f.report(0, Outcome::Http(500), 2);
        f.report(0, Outcome::Http(200), 1);
        f.report(0, Outcome::Http(500), 2);
        assert!(
            !f.host(0).outlier.is_ejected(),
            "a success resets the count"
        );
        f.report(0, Outcome::Http(503), 1);
        assert!(f.host(0).outlier.is_ejected());
        assert_eq!(f.stat("ejections_detected_consecutive_5xx"), 1);
        assert_eq!(f.stat("ejections_enforced_consecutive_5xx"), 1);
        assert_eq!(f.stat("ejections_enforced_total"), 1);
        assert_eq!(f.active(), 1);
        assert_eq!(f.picked(), [1].into(), "only the healthy host is picked");
        assert!(!f.host(0).is_healthy());
    }

    #[test]
    fn ejected_hosts_return_after_base_times_the_ejection_count() {
        let f = Fixture::new(
            2,
            od(|o| {
                o.consecutive_5xx = Some(1);
                o.max_ejection_percent = Some(50);
                o.base_ejection_time = Some(Duration::from_secs(10));
            }),
        );
        let t0 = Instant::now();
        f.report(0, Outcome::Http(500), 1);
        assert!(f.host(0).outlier.is_ejected());
        f.detector.sweep(t0 + Duration::from_secs(9));
        assert!(f.host(0).outlier.is_ejected(), "9 s < 10 s");
        f.detector.sweep(t0 + Duration::from_secs(11));
        assert!(!f.host(0).outlier.is_ejected(), "back after the base time");
        assert_eq!(f.active(), 0);
        assert_eq!(f.picked(), [0, 1].into());
        // Ejected again right away: twice the base time now.
        let t1 = Instant::now();
        f.report(0, Outcome::Http(500), 1);
        assert_eq!(f.host(0).outlier.num_ejections(), 2);
        f.detector.sweep(t1 + Duration::from_secs(15));
        assert!(f.host(0).outlier.is_ejected(), "15 s < 2 × 10 s");
        f.detector.sweep(t1 + Duration::from_secs(21));
        assert!(!f.host(0).outlier.is_ejected());
    }

    #[test]
    fn the_multiplier_is_capped_by_max_ejection_time_and_decays_while_healthy() {
        let f = Fixture::new(
            1,
            od(|o| {
                o.consecutive_5xx = Some(1);
                o.max_ejection_percent = Some(100);
                o.base_ejection_time = Some(Duration::from_secs(10));
                o.max_ejection_time = Some(Duration::from_secs(25));
            }),
        );
        let mut now = Instant::now();
        for _ in 0..5 {
            f.report(0, Outcome::Http(500), 1);
            assert!(f.host(0).outlier.is_ejected());
            now += Duration::from_secs(300);
            f.detector.sweep(now);
        }
        assert_eq!(
            f.host(0).outlier.state().multiplier,
            3,
            "10 × 3 ≥ 25 stops it"
        );
        // Ejection time is min(30, 25) = 25 s.
        let t = Instant::now();
        f.report(0, Outcome::Http(500), 1);
        f.detector.sweep(t + Duration::from_secs(24));
        assert!(f.host(0).outlier.is_ejected());
        f.detector.sweep(t + Duration::from_secs(26));
        assert!(!f.host(0).outlier.is_ejected());
        // Healthy sweeps bring the multiplier down one at a time.
        let m = f.host(0).outlier.state().multiplier;
        f.detector.sweep(t + Duration::from_secs(36));
        assert_eq!(f.host(0).outlier.state().multiplier, m - 1);
        f.detector.sweep(t + Duration::from_secs(46));
        assert_eq!(f.host(0).outlier.state().multiplier, m - 2);
    }

    #[test]
    fn max_ejection_percent_limits_ejections() {
        // Two hosts, default 10 %: ejecting one would be 50 %.
        let f = Fixture::new(2, od(|o| o.consecutive_5xx = Some(2)));
        f.report(0, Outcome::Http(500), 2);
        assert!(!f.host(0).outlier.is_ejected());
        assert_eq!(f.stat("ejections_detected_consecutive_5xx"), 1);
        assert_eq!(f.stat("ejections_overflow"), 1);
        assert_eq!(f.stat("ejections_enforced_total"), 0);
        // always_eject_one_host: the first one goes, the second does not.
        let f = Fixture::new(
            2,
            od(|o| {
                o.consecutive_5xx = Some(2);
                o.always_eject_one_host = true;
            }),
        );
        f.report(0, Outcome::Http(500), 2);
        f.report(1, Outcome::Http(500), 2);
        assert!(f.host(0).outlier.is_ejected());
        assert!(!f.host(1).outlier.is_ejected());
        assert_eq!(f.stat("ejections_overflow"), 1);
        // Ten hosts at 20 %: two may go.
        let f = Fixture::new(
            10,
            od(|o| {
                o.consecutive_5xx = Some(1);
                o.max_ejection_percent = Some(20);
            }),
        );
        for i in 0..4 {
            f.report(i, Outcome::Http(500), 1);
        }
        assert_eq!(f.active(), 2);
    }

    #[test]
    fn gateway_failures_are_detected_but_enforced_only_when_asked() {
        let f = Fixture::new(
            2,
            od(|o| {
                o.consecutive_gateway_failure = Some(2);
                o.max_ejection_percent = Some(100);
            }),
        );
        f.report(0, Outcome::Http(502), 2);
        assert_eq!(f.stat("ejections_detected_consecutive_gateway_failure"), 1);
        assert!(!f.host(0).outlier.is_ejected(), "enforcing defaults to 0");
        let f = Fixture::new(
            2,
            od(|o| {
                o.consecutive_gateway_failure = Some(2);
                o.enforcing_consecutive_gateway_failure = Some(100);
                o.max_ejection_percent = Some(100);
            }),
        );
        f.report(0, Outcome::Http(502), 1);
        f.report(0, Outcome::Http(500), 1);
        f.report(0, Outcome::Http(504), 1);
        assert!(
            !f.host(0).outlier.is_ejected(),
            "a 500 breaks the gateway run"
        );
        f.report(0, Outcome::Http(503), 1);
        assert!(f.host(0).outlier.is_ejected());
        assert_eq!(f.stat("ejections_enforced_consecutive_gateway_failure"), 1);
    }

    #[test]
    fn enforcing_zero_detects_without_ejecting() {
        let f = Fixture::new(
            2,
            od(|o| {
                o.consecutive_5xx = Some(1);
                o.enforcing_consecutive_5xx = Some(0);
                o.max_ejection_percent = Some(100);
            }),
        );
        f.report(0, Outcome::Http(500), 3);
        assert_eq!(f.stat("ejections_detected_consecutive_5xx"), 3);
        assert!(!f.host(0).outlier.is_ejected());
    }

    #[test]
    fn local_origin_failures_count_as_5xx_unless_split() {
        let f = Fixture::new(
            2,
            od(|o| {
                o.consecutive_5xx = Some(3);
                o.max_ejection_percent = Some(100);
            }),
        );
        f.report(0, Outcome::LocalConnectFailed, 1);
        f.report(0, Outcome::LocalTimeout, 1);
        f.report(0, Outcome::LocalConnectSuccess, 1);
        f.report(0, Outcome::Http(500), 1);
        assert!(f.host(0).outlier.is_ejected(), "503 + 504 + 500 in a row");
        // Split: local failures have their own counter, HTTP 5xx theirs.
        let f = Fixture::new(
            2,
            od(|o| {
                o.consecutive_5xx = Some(2);
                o.consecutive_local_origin_failure = Some(2);
                o.split_external_local_origin_errors = true;
                o.max_ejection_percent = Some(100);
            }),
        );
        f.report(0, Outcome::LocalConnectFailed, 1);
        f.report(0, Outcome::Http(500), 1);
        f.report(0, Outcome::LocalConnectSuccess, 1);
        f.report(0, Outcome::LocalConnectFailed, 1);
        assert!(
            !f.host(0).outlier.is_ejected(),
            "a connect success resets the local run"
        );
        f.report(0, Outcome::LocalTimeout, 1);
        assert!(f.host(0).outlier.is_ejected());
        assert_eq!(
            f.stat("ejections_enforced_consecutive_local_origin_failure"),
            1
        );
        assert_eq!(f.stat("ejections_detected_consecutive_5xx"), 0);
    }

    #[test]
    fn errors_map_to_outcomes() {
        assert_eq!(
            Outcome::of_error(&ProxyError::ConnectFailure("x".into())),
            Some(Outcome::LocalConnectFailed)
        );
        assert_eq!(
            Outcome::of_error(&ProxyError::UpstreamReset("x".into())),
            Some(Outcome::LocalConnectFailed)
        );
        assert_eq!(
            Outcome::of_error(&ProxyError::Timeout),
            Some(Outcome::LocalTimeout)
        );
        let per_try = ProxyError::StreamTimeout {
            kind: crate::http::timeout::Expired::PerTry,
            request_complete: true,
        };
        assert_eq!(Outcome::of_error(&per_try), Some(Outcome::LocalTimeout));
        assert_eq!(Outcome::of_error(&ProxyError::Overflow("x".into())), None);
        assert_eq!(
            Outcome::of_error(&ProxyError::NoHealthyUpstream("x".into())),
            None
        );
    }

    #[test]
    fn success_rate_threshold_is_mean_minus_factor_stdev() {
        let t = success_rate_threshold(&[100.0, 100.0, 100.0, 100.0, 50.0], 1.9);
        // mean 90, population stdev 20.
        assert!((t - (90.0 - 1.9 * 20.0)).abs() < 1e-9, "{t}");
        assert_eq!(success_rate_threshold(&[], 1.9), 0.0);
    }

    #[test]
    fn success_rate_ejects_the_outlier_at_the_sweep() {
        let f = Fixture::new(
            6,
            od(|o| {
                o.max_ejection_percent = Some(50);
                o.success_rate_request_volume = Some(10);
                o.consecutive_5xx = Some(1000);
            }),
        );
        for i in 0..5 {
            f.report(i, Outcome::Http(200), 10);
        }
        f.report(5, Outcome::Http(500), 8);
        f.report(5, Outcome::Http(200), 2);
        f.detector.sweep(Instant::now());
        assert!(f.host(5).outlier.is_ejected());
        assert_eq!(f.stat("ejections_enforced_success_rate"), 1);
        assert_eq!(f.host(0).outlier.success_rate(), Some(100.0));
        assert_eq!(f.host(5).outlier.success_rate(), Some(20.0));
        // The next interval starts from zero: not enough volume, no rate.
        f.detector.sweep(Instant::now());
        assert_eq!(f.host(0).outlier.success_rate(), None);
    }

    #[test]
    fn success_rate_needs_minimum_hosts_and_volume() {
        let f = Fixture::new(
            4,
            od(|o| {
                o.max_ejection_percent = Some(100);
                o.success_rate_request_volume = Some(10);
                o.consecutive_5xx = Some(1000);
            }),
        );
        for i in 0..3 {
            f.report(i, Outcome::Http(200), 10);
        }
        f.report(3, Outcome::Http(500), 10);
        f.detector.sweep(Instant::now());
        assert!(!f.host(3).outlier.is_ejected(), "4 hosts < 5 minimum");
        let f = Fixture::new(
            6,
            od(|o| {
                o.max_ejection_percent = Some(100);
                o.consecutive_5xx = Some(1000);
            }),
        );
        for i in 0..5 {
            f.report(i, Outcome::Http(200), 99);
        }
        f.report(5, Outcome::Http(500), 99);
        f.detector.sweep(Instant::now());
        assert!(!f.host(5).outlier.is_ejected(), "99 < 100 requests");
    }

    #[test]
    fn failure_percentage_ejects_over_the_threshold_when_enforced() {
        let config = |enforcing| {
            od(move |o| {
                o.max_ejection_percent = Some(50);
                o.enforcing_success_rate = Some(0);
                o.enforcing_failure_percentage = Some(enforcing);
                o.consecutive_5xx = Some(1000);
            })
        };
        for (enforcing, ejected) in [(0, false), (100, true)] {
            let f = Fixture::new(5, config(enforcing));
            for i in 0..4 {
                f.report(i, Outcome::Http(200), 50);
            }
            f.report(4, Outcome::Http(500), 43);
            f.report(4, Outcome::Http(200), 7);
            f.detector.sweep(Instant::now());
            assert_eq!(
                f.host(4).outlier.is_ejected(),
                ejected,
                "enforcing {enforcing}"
            );
            assert_eq!(f.stat("ejections_detected_failure_percentage"), 1);
        }
        // 84 % failing is under the 85 % threshold.
        let f = Fixture::new(5, config(100));
        for i in 0..4 {
            f.report(i, Outcome::Http(200), 50);
        }
        f.report(4, Outcome::Http(500), 42);
        f.report(4, Outcome::Http(200), 8);
        f.detector.sweep(Instant::now());
        assert!(!f.host(4).outlier.is_ejected());
    }

    #[test]
    fn split_mode_rates_local_origin_separately() {
        let f = Fixture::new(
            5,
            od(|o| {
                o.split_external_local_origin_errors = true;
                o.max_ejection_percent = Some(50);
                o.enforcing_local_origin_success_rate = Some(0);
                o.success_rate_request_volume = Some(50);
                o.enforcing_failure_percentage_local_origin = Some(100);
                o.consecutive_local_origin_failure = Some(1000);
            }),
        );
        for i in 0..4 {
            f.report(i, Outcome::LocalConnectSuccessFinal, 50);
        }
        f.report(4, Outcome::LocalConnectFailed, 50);
        f.detector.sweep(Instant::now());
        assert!(f.host(4).outlier.is_ejected());
        assert_eq!(
            f.stat("ejections_enforced_failure_percentage_local_origin"),
            1
        );
        assert_eq!(f.stat("ejections_detected_local_origin_success_rate"), 1);
        assert_eq!(f.stat("ejections_enforced_local_origin_success_rate"), 0);
        assert_eq!(f.host(4).outlier.local_success_rate(), Some(0.0));
        assert_eq!(
            f.host(4).outlier.success_rate(),
            None,
            "no external results"
        );
    }

    #[test]
    fn all_hosts_ejected_is_panic_and_every_host_is_used() {
        let f = Fixture::new(
            2,
            od(|o| {
                o.consecutive_5xx = Some(1);
                o.max_ejection_percent = Some(100);
            }),
        );
        f.report(0, Outcome::Http(500), 1);
        f.report(1, Outcome::Http(500), 1);
        assert_eq!(f.active(), 2);
        assert!(f.hosts.load().priorities().all(|p| p.panic));
        assert_eq!(f.picked(), [0, 1].into());
    }

    #[test]
    fn ejections_survive_host_set_updates_and_uneject_all_clears_them() {
        let f = Fixture::new(
            3,
            od(|o| {
                o.consecutive_5xx = Some(1);
                o.max_ejection_percent = Some(50);
            }),
        );
        f.report(0, Outcome::Http(500), 1);
        // An EDS update that changes host 0's weight makes a new host object.
        let mut la = assignment(3);
        la.localities[0].endpoints[0].weight = 5;
        f.hosts
            .update(&la, LbPolicy::RoundRobin, &CommonLb::default());
        assert!(f.host(0).outlier.is_ejected());
        assert_eq!(f.host(0).weight, 5);
        assert_eq!(f.picked(), [1, 2].into());
        f.detector.uneject_all();
        assert!(!f.host(0).outlier.is_ejected());
        assert_eq!(f.active(), 0);
        assert_eq!(f.picked(), [0, 1, 2].into());
    }

    #[tokio::test(start_paused = true)]
    async fn the_interval_timer_returns_hosts() {
        let f = Fixture::new(
            2,
            od(|o| {
                o.consecutive_5xx = Some(1);
                o.max_ejection_percent = Some(50);
                o.interval = Some(Duration::from_secs(1));
                o.base_ejection_time = Some(Duration::from_secs(3));
            }),
        );
        f.report(0, Outcome::Http(500), 1);
        assert!(f.host(0).outlier.is_ejected());
        // Paused time: each sleep jumps the clock once the runtime is idle.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(
            f.host(0).outlier.is_ejected(),
            "sweeps at 1 s and 2 s keep it out"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!f.host(0).outlier.is_ejected(), "the 3 s sweep returns it");
        // The timer stops with the detector.
        let weak = Arc::downgrade(&f.detector);
        drop(f);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(weak.upgrade().is_none());
    }
}
