//! `envoy.filters.http.local_ratelimit` at run time.
//!
//! The token bucket behaves as Envoy's current one (`AtomicTokenBucketImpl`): tokens come back
//! continuously at `tokens_per_fill / fill_interval` per second, up to `max_tokens`, and the bucket
//! starts full. Its whole state is one number — the instant at which the bucket was (or would
//! have been) empty — kept in an atomic and updated with compare-and-swap, so workers share it
//! without a lock. Time is `tokio::time`, so tests can pause it.
//!
//! Per request: `filter_enabled` decides whether the filter runs (`enabled` counted), a token is
//! taken (`ok`) or not (`rate_limited`), and `filter_enforced` decides whether a limited request
//! is answered with the configured status, `local_rate_limited`, response flag `RL` and
//! `response_headers_to_add` (`enforced`), or sent on with
//! `request_headers_to_add_when_not_enforced`. With `enable_x_ratelimit_headers` every response
//! of a request the filter evaluated carries `x-ratelimit-limit`, `-remaining` and `-reset`.

use std::{
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use http::{HeaderMap, HeaderValue};
use tokio::time::Instant;

use crate::{
    config::filters::local_ratelimit::{LocalRateLimit, TokenBucket},
    stats::{Stat, Stats},
};

/// Ids of limiters, the key of a connection's own buckets.
static LIMITER_IDS: AtomicU64 = AtomicU64::new(1);

/// A token bucket shared by whoever holds it.
///
/// Time is kept in whole nanoseconds: a token is worth `cost` nanoseconds of filling (rounded to
/// a nanosecond, at least one — a rate above a token per nanosecond is capped there), a full
/// bucket `cap` nanoseconds. The state is the instant the bucket was empty, shifted by `cap` so
/// that it stays unsigned: `avail = min(now + cap - state, cap)`.
#[derive(Debug)]
pub struct Bucket {
    max_tokens: u32,
    cost: u64,
    cap: u64,
    /// The instant nanoseconds are counted from.
    base: Instant,
    state: AtomicU64,
}

impl Bucket {
    /// A full bucket.
    pub fn new(cfg: &TokenBucket) -> Self {
        let interval = u64::try_from(cfg.fill_interval.as_nanos()).unwrap_or(u64::MAX);
        let per_fill = u64::from(cfg.tokens_per_fill.max(1));
        let cost = ((interval + per_fill / 2) / per_fill).max(1);
        Bucket {
            max_tokens: cfg.max_tokens,
            cost,
            cap: cost.saturating_mul(u64::from(cfg.max_tokens)),
            base: Instant::now(),
            state: AtomicU64::new(0),
        }
    }

    /// `now` in the shifted clock.
    fn clock(&self, now: Instant) -> u64 {
        let since =
            u64::try_from(now.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX);
        since.saturating_add(self.cap)
    }

    /// Nanoseconds of filling in the bucket at `clock` with `state`.
    fn available(&self, clock: u64, state: u64) -> u64 {
        clock.saturating_sub(state).min(self.cap)
    }

    /// Takes one token now; `false` when none is left.
    pub fn try_take(&self) -> bool {
        self.try_take_at(Instant::now())
    }

    /// Takes one token at `now`.
    pub fn try_take_at(&self, now: Instant) -> bool {
        let clock = self.clock(now);
        let mut old = self.state.load(Ordering::Relaxed);
        loop {
            let available = self.available(clock, old);
            if available < self.cost {
                return false;
            }
            // What is left after this token, as the (shifted) instant the bucket was empty.
            let new = clock - (available - self.cost);
            match self
                .state
                .compare_exchange_weak(old, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(current) => old = current,
            }
        }
    }

    /// Whole tokens left at `now`.
    pub fn remaining_at(&self, now: Instant) -> u32 {
        let a = self.available(self.clock(now), self.state.load(Ordering::Relaxed));
        u32::try_from(a / self.cost).unwrap_or(u32::MAX)
    }

    /// How long until a token is available at `now` (zero when one is).
    pub fn next_token_at(&self, now: Instant) -> Duration {
        let a = self.available(self.clock(now), self.state.load(Ordering::Relaxed));
        Duration::from_nanos(self.cost.saturating_sub(a))
    }

    /// `max_tokens`.
    pub fn max_tokens(&self) -> u32 {
        self.max_tokens
    }
}

/// `<stat_prefix>.http_local_rate_limit.*`.
#[derive(Debug)]
struct LimitStats {
    enabled: Arc<Stat>,
    enforced: Arc<Stat>,
    rate_limited: Arc<Stat>,
    ok: Arc<Stat>,
}

/// The run-time side of one compiled config: its shared bucket and its counters.
#[derive(Debug)]
pub struct Limiter {
    id: u64,
    shared: Option<Arc<Bucket>>,
    // Looked up on first use, then kept: the registry is not consulted per request.
    stats: OnceLock<LimitStats>,
}

impl Limiter {
    /// A limiter for a config with `bucket` (a full one).
    pub fn new(bucket: Option<&TokenBucket>) -> Self {
        Limiter {
            id: LIMITER_IDS.fetch_add(1, Ordering::Relaxed),
            shared: bucket.map(|b| Arc::new(Bucket::new(b))),
            stats: OnceLock::new(),
        }
    }

    fn stats(&self, registry: &Stats, prefix: &str) -> &LimitStats {
        self.stats.get_or_init(|| {
            let c = |n: &str| registry.counter(&format!("{prefix}.http_local_rate_limit.{n}"));
            LimitStats {
                enabled: c("enabled"),
                enforced: c("enforced"),
                rate_limited: c("rate_limited"),
                ok: c("ok"),
            }
        })
    }
}

/// The buckets of one downstream connection (`local_rate_limit_per_downstream_connection`), by
/// limiter. A short std lock: taken once per request, never across an await.
#[derive(Debug, Default)]
pub struct ConnBuckets(Mutex<Vec<(u64, Arc<Bucket>)>>);

/// A cloned connection context describes another connection: it starts with its own buckets.
impl Clone for ConnBuckets {
    fn clone(&self) -> Self {
        ConnBuckets::default()
    }
}

impl ConnBuckets {
    fn get(&self, limiter: u64, cfg: &TokenBucket) -> Arc<Bucket> {
        let mut list = match self.0.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some((_, b)) = list.iter().find(|(id, _)| *id == limiter) {
            return b.clone();
        }
        let b = Arc::new(Bucket::new(cfg));
        list.push((limiter, b.clone()));
        b
    }
}

/// What the filter decided for one request.
#[derive(Debug)]
pub enum Verdict {
    /// The filter did not evaluate the request (not enabled, or no bucket).
    Skipped,
    /// A token was taken.
    Allowed(Evaluated),
    /// No token, but not enforced: the request goes on with
    /// `request_headers_to_add_when_not_enforced`.
    NotEnforced(Evaluated),
    /// No token: answer with the configured status.
    Limited(Evaluated),
}

/// A request the filter evaluated: what its response carries.
#[derive(Debug, Clone)]
pub struct Evaluated {
    bucket: Arc<Bucket>,
    x_ratelimit_headers: bool,
    retry_after: bool,
}

impl Evaluated {
    /// Adds the `x-ratelimit-*` headers (when configured), read at response time as Envoy does.
    pub fn apply(&self, headers: &mut HeaderMap) {
        if !self.x_ratelimit_headers {
            return;
        }
        let now = Instant::now();
        // Envoy divides whole milliseconds by 1000 in integers before rounding up: whole seconds.
        let reset = self.bucket.next_token_at(now).as_millis() / 1000;
        for (name, value) in [
            ("x-ratelimit-limit", u128::from(self.bucket.max_tokens())),
            (
                "x-ratelimit-remaining",
                u128::from(self.bucket.remaining_at(now)),
            ),
            ("x-ratelimit-reset", reset),
        ] {
            headers.append(name, HeaderValue::from(value as u64));
        }
    }

    /// `Retry-After` for an enforced 429 (`enable_retry_after_header`): whole seconds until a
    /// token is back, at least 1; a `Retry-After` from `response_headers_to_add` stays.
    pub fn retry_after(&self, status: u16, headers: &mut HeaderMap) {
        if !self.retry_after || status != 429 || headers.contains_key(http::header::RETRY_AFTER) {
            return;
        }
        let secs = self
            .bucket
            .next_token_at(Instant::now())
            .as_secs_f64()
            .ceil()
            .max(1.0) as u64;
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    }
}

/// Evaluates one request against `cfg` (the filter's config or the route's override), with two
/// uniform random draws (`filter_enabled`, `filter_enforced`); counts the stats in `registry`.
pub fn decide(
    cfg: &LocalRateLimit,
    registry: &Stats,
    conn: &ConnBuckets,
    random: (u64, u64),
) -> Verdict {
    let Some(bucket_cfg) = &cfg.bucket else {
        // No token bucket here and none on the route: nothing to limit (Envoy's rule).
        return Verdict::Skipped;
    };
    if !cfg.enabled.sample(random.0) {
        return Verdict::Skipped;
    }
    let stats = cfg.limiter.stats(registry, &cfg.stat_prefix);
    stats.enabled.inc();
    let bucket = match (&cfg.limiter.shared, cfg.per_connection) {
        (Some(shared), false) => shared.clone(),
        _ => conn.get(cfg.limiter.id, bucket_cfg),
    };
    let evaluated = Evaluated {
        x_ratelimit_headers: cfg.x_ratelimit_headers,
        retry_after: cfg.retry_after_header,
        bucket,
    };
    if evaluated.bucket.try_take() {
        stats.ok.inc();
        return Verdict::Allowed(evaluated);
    }
    stats.rate_limited.inc();
    if !cfg.enforced.sample(random.1) {
        return Verdict::NotEnforced(evaluated);
    }
    stats.enforced.inc();
    Verdict::Limited(evaluated)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(max: u32, per_fill: u32, interval_ms: u64) -> TokenBucket {
        TokenBucket {
            max_tokens: max,
            tokens_per_fill: per_fill,
            fill_interval: Duration::from_millis(interval_ms),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_bucket_empties_then_refills_at_the_fill_rate() {
        // 3 tokens, 1 back every 100ms.
        let b = Bucket::new(&bucket(3, 1, 100));
        for _ in 0..3 {
            assert!(b.try_take());
        }
        assert!(!b.try_take(), "empty");
        assert_eq!(b.remaining_at(Instant::now()), 0);
        assert_eq!(b.next_token_at(Instant::now()), Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(99)).await;
        assert!(!b.try_take(), "not yet");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(b.try_take(), "one token after 100ms");
        assert!(!b.try_take());
        // A long pause refills up to max_tokens, not beyond.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(b.remaining_at(Instant::now()), 3);
        for _ in 0..3 {
            assert!(b.try_take());
        }
        assert!(!b.try_take());
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_per_fill_sets_the_rate() {
        // 10 tokens per second.
        let b = Bucket::new(&bucket(10, 10, 1000));
        for _ in 0..10 {
            assert!(b.try_take());
        }
        assert!(!b.try_take());
        tokio::time::advance(Duration::from_millis(500)).await;
        let taken = (0..10).filter(|_| b.try_take()).count();
        assert_eq!(taken, 5, "half an interval: half a fill");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_takers_never_take_more_than_there_is() {
        let b = Arc::new(Bucket::new(&bucket(1000, 1, 60_000)));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || (0..1000).filter(|_| b.try_take()).count())
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().expect("thread")).sum();
        assert_eq!(total, 1000);
    }

    fn config(json: serde_json::Value) -> LocalRateLimit {
        let raw = waypoint_proto::json::from_json(&json).expect("decodes");
        LocalRateLimit::compile(&raw, "", false).expect("compiles")
    }

    #[tokio::test(start_paused = true)]
    async fn verdicts_and_stats_follow_enabled_and_enforced() {
        let registry = Stats::default();
        let conn = ConnBuckets::default();
        let cfg = config(serde_json::json!({
            "stat_prefix": "rl",
            "token_bucket": {"max_tokens": 2, "fill_interval": "1s"},
            "filter_enabled": {"default_value": {"numerator": 100}},
            "filter_enforced": {"default_value": {"numerator": 50}},
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03"
        }));
        assert!(matches!(
            decide(&cfg, &registry, &conn, (0, 0)),
            Verdict::Allowed(_)
        ));
        let Verdict::Allowed(e) = decide(&cfg, &registry, &conn, (0, 0)) else {
            panic!("second token")
        };
        let mut h = HeaderMap::new();
        e.apply(&mut h);
        assert_eq!(h["x-ratelimit-limit"], "2");
        assert_eq!(h["x-ratelimit-remaining"], "0");
        assert_eq!(h["x-ratelimit-reset"], "1");
        // Empty: enforced for draws under 50, not enforced above.
        assert!(matches!(
            decide(&cfg, &registry, &conn, (0, 10)),
            Verdict::Limited(_)
        ));
        assert!(matches!(
            decide(&cfg, &registry, &conn, (0, 60)),
            Verdict::NotEnforced(_)
        ));
        let stat = |n: &str| {
            registry
                .counter(&format!("rl.http_local_rate_limit.{n}"))
                .get()
        };
        assert_eq!(
            (
                stat("enabled"),
                stat("ok"),
                stat("rate_limited"),
                stat("enforced")
            ),
            (4, 2, 2, 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_or_bucketless_configs_skip() {
        let registry = Stats::default();
        let conn = ConnBuckets::default();
        let off = config(serde_json::json!({
            "stat_prefix": "rl",
            "token_bucket": {"max_tokens": 1, "fill_interval": "1s"}
        }));
        assert!(matches!(
            decide(&off, &registry, &conn, (0, 0)),
            Verdict::Skipped
        ));
        let bucketless = config(serde_json::json!({
            "stat_prefix": "rl",
            "filter_enabled": {"default_value": {"numerator": 100}}
        }));
        assert!(matches!(
            decide(&bucketless, &registry, &conn, (0, 0)),
            Verdict::Skipped
        ));
        assert_eq!(
            registry.counter("rl.http_local_rate_limit.enabled").get(),
            0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn per_connection_buckets_are_separate() {
        let registry = Stats::default();
        let cfg = config(serde_json::json!({
            "stat_prefix": "rl",
            "token_bucket": {"max_tokens": 1, "fill_interval": "1s"},
            "filter_enabled": {"default_value": {"numerator": 100}},
            "filter_enforced": {"default_value": {"numerator": 100}},
            "local_rate_limit_per_downstream_connection": true
        }));
        let (a, b) = (ConnBuckets::default(), ConnBuckets::default());
        assert!(matches!(
            decide(&cfg, &registry, &a, (0, 0)),
            Verdict::Allowed(_)
        ));
        assert!(matches!(
            decide(&cfg, &registry, &a, (0, 0)),
            Verdict::Limited(_)
        ));
        assert!(matches!(
            decide(&cfg, &registry, &b, (0, 0)),
            Verdict::Allowed(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_whole_seconds_until_a_token() {
        let cfg = config(serde_json::json!({
            "stat_prefix": "rl",
            "token_bucket": {"max_tokens": 1, "fill_interval": "2.5s"},
            "filter_enabled": {"default_value": {"numerator": 100}},
            "filter_enforced": {"default_value": {"numerator": 100}},
            "enable_retry_after_header": true
        }));
        let (registry, conn) = (Stats::default(), ConnBuckets::default());
        decide(&cfg, &registry, &conn, (0, 0));
        let Verdict::Limited(e) = decide(&cfg, &registry, &conn, (0, 0)) else {
            panic!("limited")
        };
        let mut h = HeaderMap::new();
        e.retry_after(429, &mut h);
        assert_eq!(h["retry-after"], "3");
        let mut h = HeaderMap::new();
        e.retry_after(503, &mut h);
        assert!(h.is_empty(), "only for 429");
    }
}
