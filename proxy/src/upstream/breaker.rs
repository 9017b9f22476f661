//! Circuit breakers (Envoy's per-priority `ResourceManager`): connections, pending requests,
//! requests, retries and connection pools of one cluster, each a lock-free count against a
//! maximum. A resource is taken as a [`Slot`] that gives it back when dropped, so a cancelled
//! request (its future dropped mid-wait) can never leave a count behind.
//!
//! Every resource publishes Envoy's `circuit_breakers.<priority>.<x>_open` gauge (1 while the
//! count is at its maximum) and, with `track_remaining`, `remaining_<x>` (maximum − count).
//! Overflow counters (`upstream_cx_overflow`, `upstream_rq_pending_overflow`, …) are the caller's:
//! Envoy counts them where the overflow is handled, not where the limit is checked.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::Notify;

use crate::{
    config::cluster::{CircuitBreakers, Thresholds},
    stats::{Stat, Stats},
};

/// One limited resource.
pub struct Resource {
    max: AtomicU64,
    count: AtomicU64,
    open: Arc<Stat>,
    /// `remaining_<x>`, created once `track_remaining` is configured (Envoy has no such gauge
    /// otherwise).
    remaining: std::sync::OnceLock<Arc<Stat>>,
    remaining_name: String,
    /// Woken when a slot is given back (requests waiting for a connection listen here).
    released: Notify,
    /// Whether anyone may wait on `released` (only connections: waking takes a lock, which the
    /// other resources need not pay per request).
    wakes: bool,
}

impl Resource {
    fn new(stats: &Stats, prefix: &str, open: &str, remaining: &str, wakes: bool) -> Arc<Resource> {
        Arc::new(Resource {
            max: AtomicU64::new(u64::MAX),
            count: AtomicU64::new(0),
            open: stats.gauge(&format!("{prefix}.{open}")),
            remaining: std::sync::OnceLock::new(),
            remaining_name: format!("{prefix}.{remaining}"),
            released: Notify::new(),
            wakes,
        })
    }

    /// The configured maximum.
    pub fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }

    /// Slots in use.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// Whether another slot may be taken now.
    pub fn can_create(&self) -> bool {
        self.count() < self.max()
    }

    fn configure(&self, stats: &Stats, max: u64, track_remaining: bool) {
        self.max.store(max, Ordering::Relaxed);
        if track_remaining {
            let _ = self
                .remaining
                .get_or_init(|| stats.gauge(&self.remaining_name));
        }
        self.publish(self.count());
    }

    fn publish(&self, count: u64) {
        let max = self.max();
        self.open.set(u64::from(count >= max));
        if let Some(r) = self.remaining.get() {
            r.set(max.saturating_sub(count));
        }
    }

    /// Takes a slot, or `None` when the resource is at its maximum.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let max = self.max();
        let mut current = self.count.load(Ordering::Acquire);
        loop {
            if current >= max {
                return None;
            }
            match self.count.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.publish(current + 1);
                    return Some(Slot(self.clone()));
                }
                Err(now) => current = now,
            }
        }
    }

    /// Takes a slot over the maximum (Envoy opens a pool's first connection even when the
    /// cluster is at `max_connections`, so that its pending requests can be served at all).
    pub fn force(self: &Arc<Self>) -> Slot {
        let now = self.count.fetch_add(1, Ordering::AcqRel) + 1;
        self.publish(now);
        Slot(self.clone())
    }

    /// Sets the count directly (connection pools are counted by the pool map's size).
    pub fn set_count(&self, n: u64) {
        self.count.store(n, Ordering::Release);
        self.publish(n);
    }

    /// A future that completes when a slot is next given back (connections only); call
    /// [`tokio::sync::futures::Notified::enable`] on it before re-checking.
    pub fn released(&self) -> tokio::sync::futures::Notified<'_> {
        self.released.notified()
    }
}

/// One unit of a [`Resource`], given back on drop.
#[must_use = "the resource is held only while the slot is alive"]
pub struct Slot(Arc<Resource>);

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slot")
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let now = self
            .0
            .count
            .fetch_sub(1, Ordering::AcqRel)
            .saturating_sub(1);
        self.0.publish(now);
        if self.0.wakes {
            self.0.released.notify_waiters();
        }
    }
}

/// The resources of one priority.
pub struct ResourceManager {
    /// `max_connections`.
    pub connections: Arc<Resource>,
    /// `max_pending_requests`.
    pub pending: Arc<Resource>,
    /// `max_requests`.
    pub requests: Arc<Resource>,
    /// `max_retries` (or the retry budget).
    pub retries: Arc<Resource>,
    /// `max_connection_pools`.
    pub pools: Arc<Resource>,
    /// `retry_budget`: (percent of active + pending requests, minimum concurrency).
    budget: std::sync::Mutex<Option<(f64, u32)>>,
    /// `per_host_thresholds.max_connections`.
    per_host_connections: AtomicU64,
}

impl ResourceManager {
    fn new(stats: &Stats, cluster: &str, priority: &str) -> ResourceManager {
        let p = format!("cluster.{cluster}.circuit_breakers.{priority}");
        ResourceManager {
            connections: Resource::new(stats, &p, "cx_open", "remaining_cx", true),
            pending: Resource::new(stats, &p, "rq_pending_open", "remaining_pending", false),
            requests: Resource::new(stats, &p, "rq_open", "remaining_rq", false),
            retries: Resource::new(stats, &p, "rq_retry_open", "remaining_retries", false),
            pools: Resource::new(stats, &p, "cx_pool_open", "remaining_cx_pools", false),
            budget: std::sync::Mutex::new(None),
            per_host_connections: AtomicU64::new(u64::MAX),
        }
    }

    fn configure(&self, stats: &Stats, t: &Thresholds, per_host: Option<u32>) {
        let track = t.track_remaining;
        self.connections
            .configure(stats, u64::from(t.max_connections), track);
        self.pending
            .configure(stats, u64::from(t.max_pending_requests), track);
        self.requests
            .configure(stats, u64::from(t.max_requests), track);
        self.pools.configure(
            stats,
            t.max_connection_pools.map_or(u64::MAX, u64::from),
            track,
        );
        *self
            .budget
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = t.retry_budget;
        self.retries.configure(
            stats,
            self.retry_limit(t.retry_budget, t.max_retries),
            track,
        );
        self.per_host_connections
            .store(per_host.map_or(u64::MAX, u64::from), Ordering::Relaxed);
    }

    /// Envoy's retry limit: `max_retries`, or with a retry budget `budget_percent` of the
    /// active and pending requests, but at least `min_retry_concurrency`.
    fn retry_limit(&self, budget: Option<(f64, u32)>, max_retries: u32) -> u64 {
        match budget {
            None => u64::from(max_retries),
            Some((pct, min)) => {
                let outstanding = (self.requests.count() + self.pending.count()) as f64;
                // Truncation is Envoy's too; the value is non-negative and bounded.
                ((pct / 100.0 * outstanding) as u64).max(u64::from(min))
            }
        }
    }

    /// Takes a retry slot, or `None` when the retry breaker (or budget) is open.
    pub fn try_retry(&self) -> Option<Slot> {
        let budget = *self
            .budget
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if budget.is_some() {
            // The budget follows the load: recompute the limit before each retry.
            let limit = self.retry_limit(budget, 0);
            self.retries.max.store(limit, Ordering::Relaxed);
        }
        self.retries.try_acquire()
    }

    /// `per_host_thresholds.max_connections` (unlimited by default).
    pub fn per_host_connections(&self) -> u64 {
        self.per_host_connections.load(Ordering::Relaxed)
    }
}

/// A cluster's circuit breakers, for both routing priorities.
pub struct Breakers {
    /// DEFAULT priority.
    pub default: ResourceManager,
    /// HIGH priority.
    pub high: ResourceManager,
}

impl Breakers {
    /// Breakers publishing into `stats` under `cluster.<stat_name>.circuit_breakers.*`.
    pub fn new(stats: &Stats, stat_name: &str) -> Breakers {
        Breakers {
            default: ResourceManager::new(stats, stat_name, "default"),
            high: ResourceManager::new(stats, stat_name, "high"),
        }
    }

    /// Applies `cb` (the counts in use are kept, so a CDS update does not reset them).
    pub fn configure(&self, stats: &Stats, cb: &CircuitBreakers) {
        self.default
            .configure(stats, &cb.default, cb.per_host_max_connections);
        self.high
            .configure(stats, &cb.high, cb.per_host_max_connections);
    }

    /// The resources of a route's priority.
    pub fn for_priority(&self, high: bool) -> &ResourceManager {
        if high { &self.high } else { &self.default }
    }
}

/// A body that holds a [`Slot`] until it ends or is dropped (a request counts against
/// `max_requests` until its response is complete, as in Envoy).
pub struct Holding<B> {
    inner: B,
    slot: Option<Slot>,
}

impl<B> Holding<B> {
    /// `inner`, holding `slot`.
    pub fn new(inner: B, slot: Option<Slot>) -> Self {
        Holding { inner, slot }
    }
}

impl<B> HttpBody for Holding<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_))))
            || self.inner.is_end_stream()
        {
            self.slot = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A byte stream that holds a [`Slot`] while open (a `tcp_proxy` connection counts against
/// `max_connections` for its whole life).
pub struct HoldingIo<T> {
    inner: T,
    _slot: Slot,
}

impl<T> HoldingIo<T> {
    /// `inner`, holding `slot`.
    pub fn new(inner: T, slot: Slot) -> Self {
        HoldingIo { inner, _slot: slot }
    }
}

impl<T: crate::io::Stream> crate::io::Stream for HoldingIo<T> {
    crate::io::pass_chunks!(all: inner);
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for HoldingIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for HoldingIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thresholds(f: impl FnOnce(&mut Thresholds)) -> CircuitBreakers {
        let mut cb = CircuitBreakers::default();
        f(&mut cb.default);
        cb
    }

    #[test]
    fn defaults_are_envoys() {
        let stats = Stats::default();
        let b = Breakers::new(&stats, "c");
        b.configure(&stats, &CircuitBreakers::default());
        assert_eq!(b.default.connections.max(), 1024);
        assert_eq!(b.default.pending.max(), 1024);
        assert_eq!(b.default.requests.max(), 1024);
        assert_eq!(b.default.retries.max(), 3);
        assert_eq!(b.default.pools.max(), u64::MAX);
    }

    #[test]
    fn slots_are_limited_and_given_back_on_drop() {
        let stats = Stats::default();
        let b = Breakers::new(&stats, "c");
        b.configure(
            &stats,
            &thresholds(|t| {
                t.max_requests = 2;
                t.track_remaining = true;
            }),
        );
        let rq = &b.default.requests;
        let open = stats.gauge("cluster.c.circuit_breakers.default.rq_open");
        let remaining = stats.gauge("cluster.c.circuit_breakers.default.remaining_rq");
        assert_eq!(remaining.get(), 2);
        let a = rq.try_acquire().expect("first");
        assert_eq!((open.get(), remaining.get()), (0, 1));
        let c = rq.try_acquire().expect("second");
        assert_eq!((open.get(), remaining.get()), (1, 0));
        assert!(rq.try_acquire().is_none(), "third overflows");
        drop(a);
        assert_eq!((open.get(), remaining.get()), (0, 1));
        assert!(rq.try_acquire().is_some());
        drop(c);
        assert_eq!(rq.count(), 0);
    }

    #[test]
    fn remaining_gauges_only_with_track_remaining() {
        let stats = Stats::default();
        let b = Breakers::new(&stats, "c");
        b.configure(&stats, &thresholds(|t| t.max_connections = 5));
        let _s = b.default.connections.try_acquire();
        let names: Vec<String> = stats.snapshot().into_iter().map(|s| s.0).collect();
        assert!(
            names
                .iter()
                .any(|n| n == "cluster.c.circuit_breakers.default.cx_open"),
            "{names:?}"
        );
        assert!(!names.iter().any(|n| n.contains("remaining_")), "{names:?}");
        b.configure(
            &stats,
            &thresholds(|t| {
                t.max_connections = 5;
                t.track_remaining = true;
            }),
        );
        assert_eq!(
            stats
                .gauge("cluster.c.circuit_breakers.default.remaining_cx")
                .get(),
            4
        );
    }

    #[test]
    fn high_priority_has_its_own_limits() {
        let stats = Stats::default();
        let b = Breakers::new(&stats, "c");
        let mut cb = CircuitBreakers::default();
        cb.default.max_pending_requests = 1;
        cb.high.max_pending_requests = 2;
        b.configure(&stats, &cb);
        let _d = b
            .for_priority(false)
            .pending
            .try_acquire()
            .expect("default");
        assert!(b.for_priority(false).pending.try_acquire().is_none());
        let _h1 = b.for_priority(true).pending.try_acquire().expect("high 1");
        let _h2 = b.for_priority(true).pending.try_acquire().expect("high 2");
        assert!(b.for_priority(true).pending.try_acquire().is_none());
    }

    #[test]
    fn force_goes_over_the_limit_and_opens_the_breaker() {
        let stats = Stats::default();
        let b = Breakers::new(&stats, "c");
        b.configure(&stats, &thresholds(|t| t.max_connections = 1));
        let _a = b.default.connections.try_acquire().expect("one");
        assert!(!b.default.connections.can_create());
        let forced = b.default.connections.force();
        assert_eq!(b.default.connections.count(), 2);
        drop(forced);
        assert_eq!(b.default.connections.count(), 1);
        assert_eq!(
            stats
                .gauge("cluster.c.circuit_breakers.default.cx_open")
                .get(),
            1
        );
    }

    #[test]
    fn retry_budget_scales_with_outstanding_requests() {
        let stats = Stats::default();
        let b = Breakers::new(&stats, "c");
        b.configure(&stats, &thresholds(|t| t.retry_budget = Some((50.0, 1))));
        let m = &b.default;
        // Nothing outstanding: the minimum concurrency (1).
        let r1 = m.try_retry().expect("min concurrency");
        assert!(m.try_retry().is_none());
        drop(r1);
        // Six requests outstanding: 50 % → 3 retries.
        let _rq: Vec<Slot> = (0..6).filter_map(|_| m.requests.try_acquire()).collect();
        let held: Vec<Slot> = (0..3).filter_map(|_| m.try_retry()).collect();
        assert_eq!(held.len(), 3);
        assert!(m.try_retry().is_none());
    }

    #[tokio::test]
    async fn released_wakes_a_waiter() {
        let stats = Stats::default();
        let b = Arc::new(Breakers::new(&stats, "c"));
        b.configure(&stats, &thresholds(|t| t.max_connections = 1));
        let slot = b.default.connections.try_acquire().expect("one");
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move {
                loop {
                    let notified = b.default.connections.released();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    if let Some(s) = b.default.connections.try_acquire() {
                        return s;
                    }
                    notified.await;
                }
            })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(slot);
        let got = waiter.await.expect("joined");
        assert_eq!(b.default.connections.count(), 1);
        drop(got);
    }
}
