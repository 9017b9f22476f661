//! HTTP connection pools per (cluster, host, protocol, shared filter state): HTTP/1.1 keeps idle
//! connections and hands each one to one request at a time (a connection goes back to the pool
//! when its response body ends); HTTP/2 multiplexes every request over one connection, reopened
//! when it breaks. The cluster's `common_http_protocol_options` apply as in Envoy: a connection
//! without streams for `idle_timeout` (default 1 h) is closed (`upstream_cx_idle_timeout`), one
//! past `max_connection_duration` takes no new requests and closes when its streams are done
//! (`upstream_cx_max_duration_reached`), and one that served `max_requests_per_connection`
//! requests is retired the same way (`upstream_cx_max_requests`). HTTP/2 keepalive PINGs
//! (`connection_keepalive`) are sent whether or not streams are open, as Envoy's are.
//!
//! Circuit breakers apply as in Envoy's connection pools: a request first takes a
//! `max_requests` slot (held until its response ends); one that needs a new connection is
//! pending (`max_pending_requests`) until it has one; a new connection takes a
//! `max_connections` slot (held while it is open), except that a pool without any connection
//! opens one regardless, so its requests can be served at all. Without a slot the request waits
//! for a connection to come back to the pool or for a slot to free up. Overflows fail the
//! request with [`ProxyError::Overflow`] (503 `UO`) and are counted in the cluster's
//! `upstream_rq_pending_overflow` / `upstream_cx_overflow`.

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use hyper::{
    body::{Body as HttpBody, Frame, SizeHint},
    client::conn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sync_wrapper::SyncWrapper;

use super::{
    breaker::{Breakers, Holding, ResourceManager, Slot},
    cluster_manager::ClusterStats,
    h1,
};
use crate::{
    config::{Cluster, protocol::UpstreamProtocol},
    flags::ProxyError,
    http::{
        Body, BoxError,
        timeout::{self, ConnActivity},
    },
    listener::conn::BoxIo,
    stats::Stat,
};

/// The circuit breakers (of one routing priority) and counters a request goes through.
#[derive(Clone)]
pub struct Limits {
    /// The cluster's breakers.
    pub manager: Arc<Breakers>,
    /// HIGH routing priority.
    pub high: bool,
    /// The cluster's counters.
    pub stats: Arc<ClusterStats>,
}

impl Limits {
    fn resources(&self) -> &ResourceManager {
        self.manager.for_priority(self.high)
    }

    /// A `max_requests` slot, or the overflow (counted in `upstream_rq_pending_overflow`, as
    /// Envoy counts it).
    fn request(&self) -> Result<Slot, ProxyError> {
        self.resources().requests.try_acquire().ok_or_else(|| {
            self.stats.rq_pending_overflow.inc();
            ProxyError::Overflow("max_requests".into())
        })
    }

    /// A `max_pending_requests` slot, counted in `upstream_rq_pending_*`.
    fn pending(&self) -> Result<Pending, ProxyError> {
        match self.resources().pending.try_acquire() {
            Some(slot) => {
                self.stats.rq_pending_total.inc();
                self.stats.rq_pending_active.inc();
                Ok(Pending {
                    _slot: slot,
                    active: self.stats.rq_pending_active.clone(),
                })
            }
            None => {
                self.stats.rq_pending_overflow.inc();
                Err(ProxyError::Overflow("max_pending_requests".into()))
            }
        }
    }
}

/// A request waiting for a connection.
struct Pending {
    _slot: Slot,
    active: Arc<Stat>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.active.dec();
    }
}

/// One open (or opening) connection: its `max_connections` slot and its place in the pool's
/// and the cluster's counts, given back when the connection ends.
struct Connection {
    _slot: Slot,
    open: Arc<AtomicU64>,
    active: Arc<Stat>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.active.dec();
    }
}

/// Upstream protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 (prior knowledge).
    Http2,
}

/// HTTP/2 client settings.
#[derive(Debug, Clone, Default)]
pub struct H2ClientSettings {
    /// Initial stream window.
    pub initial_stream_window: Option<u32>,
    /// Initial connection window.
    pub initial_connection_window: Option<u32>,
    /// PING interval.
    pub keepalive_interval: Option<Duration>,
    /// PING timeout.
    pub keepalive_timeout: Option<Duration>,
}

/// The marker `upstream_error` puts in front of a refused-stream reset (retry_on `refused-stream`).
pub const REFUSED_STREAM: &str = "refused_stream";

/// Envoy's default upstream idle timeout (`common_http_protocol_options.idle_timeout`: 1h).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// A pool's connection settings, from the cluster's `HttpProtocolOptions`.
#[derive(Debug, Clone, Default)]
pub struct PoolSettings {
    /// `idle_timeout` (`None`: Envoy's 1 h; zero: never).
    pub idle_timeout: Option<Duration>,
    /// `max_connection_duration` (`None` or zero: none).
    pub max_connection_duration: Option<Duration>,
    /// `max_requests_per_connection` (`None` or zero: none).
    pub max_requests_per_connection: Option<u32>,
    /// HTTP/2 settings.
    pub h2: H2ClientSettings,
}

impl PoolSettings {
    /// The settings of `cluster`'s pools (`typed_extension_protocol_options`; the deprecated
    /// `Cluster.max_requests_per_connection` when the options do not set it).
    pub fn for_cluster(cluster: &Cluster) -> PoolSettings {
        let http = cluster.http.as_ref();
        let h2 = match http.map(|h| &h.protocol) {
            Some(UpstreamProtocol::Http2(o)) => Some(o),
            Some(UpstreamProtocol::UseDownstream { http2, .. }) => http2.as_ref(),
            _ => None,
        };
        PoolSettings {
            idle_timeout: http.and_then(|h| h.common.idle_timeout),
            max_connection_duration: http.and_then(|h| h.common.max_connection_duration),
            max_requests_per_connection: http
                .and_then(|h| h.common.max_requests_per_connection)
                .or(cluster.max_requests_per_connection),
            h2: H2ClientSettings {
                initial_stream_window: h2.and_then(|o| o.initial_stream_window_size),
                initial_connection_window: h2.and_then(|o| o.initial_connection_window_size),
                keepalive_interval: h2.and_then(|o| o.keepalive_interval),
                keepalive_timeout: h2.and_then(|o| o.keepalive_timeout),
            },
        }
    }
}

/// One upstream connection's lifecycle: its streams (idle timeout), requests served and whether
/// it still takes new ones.
struct ConnMeta {
    activity: Arc<ConnActivity>,
    served: std::sync::atomic::AtomicU32,
    /// No new requests (`max_connection_duration` or `max_requests_per_connection` reached).
    retired: std::sync::atomic::AtomicBool,
}

impl ConnMeta {
    fn new() -> Arc<ConnMeta> {
        Arc::new(ConnMeta {
            activity: ConnActivity::new(),
            served: std::sync::atomic::AtomicU32::new(0),
            retired: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Counts a request sent on the connection; retires it at `max_requests_per_connection`.
    fn request(&self, max: Option<u32>, stats: &ClusterStats) {
        let n = self.served.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        if max.is_some_and(|m| n >= m) && !self.retired.swap(true, Ordering::AcqRel) {
            stats.cx_max_requests.inc();
        }
    }
}

/// The pool's bookkeeping for one HTTP/1.1 connection.
struct H1State {
    _cx: Connection,
    opened: tokio::time::Instant,
    /// Requests sent on it.
    served: u32,
    stats: Arc<ClusterStats>,
}

type H1Conn = h1::Conn<H1State>;

/// An HTTP/1.1 connection waiting for a request.
struct Idle {
    conn: H1Conn,
    since: tokio::time::Instant,
}

/// The idle HTTP/1.1 connections and their reaper: a task per pool, running while there are
/// idle connections, that closes them at the idle timeout or `max_connection_duration` and when
/// the server closes one (each idle connection's read side wakes it).
#[derive(Default)]
struct IdleList {
    conns: Vec<Idle>,
    reaper: Option<Waker>,
    reaping: bool,
    /// When the reaper wakes next (`None`: only when a connection closes).
    next: Option<tokio::time::Instant>,
}

/// One pool.
pub struct Pool {
    proto: Proto,
    idle_timeout: Duration,
    max_connection_duration: Option<Duration>,
    max_requests: Option<u32>,
    h2_settings: H2ClientSettings,
    idle: Mutex<IdleList>,
    h2: tokio::sync::Mutex<Option<(conn::http2::SendRequest<Body>, Arc<ConnMeta>)>>,
    /// The HTTP/2 connection is being opened (dial and handshake, under the `h2` lock).
    h2_connecting: AtomicBool,
    /// Connections open or opening.
    open: Arc<AtomicU64>,
    /// Woken when an HTTP/1.1 connection comes back idle.
    returned: tokio::sync::Notify,
}

/// How a new connection is opened (the pool does not know hosts or transports).
pub type Dial<'a> =
    Pin<Box<dyn std::future::Future<Output = Result<BoxIo, ProxyError>> + Send + 'a>>;

/// Which limit ended an upstream connection's watch.
enum Limit {
    /// `idle_timeout` with no stream.
    Idle,
    /// `max_connection_duration`: no new streams; the ones in flight finish.
    Retire,
}
impl Pool {
    /// A pool speaking `proto`.
    pub fn new(proto: Proto, settings: PoolSettings) -> Self {
        Pool {
            proto,
            idle_timeout: match settings.idle_timeout {
                Some(d) if d.is_zero() => Duration::MAX,
                Some(d) => d,
                None => DEFAULT_IDLE_TIMEOUT,
            },
            max_connection_duration: settings.max_connection_duration.filter(|d| !d.is_zero()),
            max_requests: settings.max_requests_per_connection.filter(|n| *n > 0),
            h2_settings: settings.h2,
            idle: Mutex::new(IdleList::default()),
            h2: tokio::sync::Mutex::new(None),
            h2_connecting: AtomicBool::new(false),
            open: Arc::new(AtomicU64::new(0)),
            returned: tokio::sync::Notify::new(),
        }
    }

    /// Whether the pool has no connection open (it can be forgotten).
    pub fn is_idle(&self) -> bool {
        self.open.load(Ordering::Acquire) == 0
    }

    /// Connections open or opening.
    pub fn connections(&self) -> u64 {
        self.open.load(Ordering::Acquire)
    }

    /// A slot for a new connection: within `max_connections` and the per-host limit, or over
    /// them when this pool has no connection at all (Envoy's rule, so that pending requests
    /// are not stranded). `None`: wait for a connection or a slot.
    fn connection(&self, limits: &Limits, overflow_counted: &mut bool) -> Option<Connection> {
        let res = limits.resources();
        let open = self.open.load(Ordering::Acquire);
        let slot = if open < res.per_host_connections() {
            res.connections.try_acquire()
        } else {
            None
        };
        let slot = match slot {
            Some(s) => s,
            None => {
                if !std::mem::replace(overflow_counted, true) {
                    limits.stats.cx_overflow.inc();
                }
                if open > 0 {
                    return None;
                }
                res.connections.force()
            }
        };
        self.open.fetch_add(1, Ordering::AcqRel);
        limits.stats.cx_total.inc();
        limits.stats.cx_active.inc();
        Some(Connection {
            _slot: slot,
            open: self.open.clone(),
            active: limits.stats.cx_active.clone(),
        })
    }

    fn idle_list(&self) -> std::sync::MutexGuard<'_, IdleList> {
        match self.idle.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn has_idle(&self) -> bool {
        !self.idle_list().conns.is_empty()
    }

    /// Which limit, if any, an idle connection has reached at `now` (counted).
    fn expired(&self, c: &Idle, now: tokio::time::Instant) -> bool {
        if self.past_max_duration(c.conn.state(), now) {
            true
        } else if now.saturating_duration_since(c.since) >= self.idle_timeout {
            c.conn.state().stats.cx_idle_timeout.inc();
            true
        } else {
            false
        }
    }

    /// Whether the connection is past `max_connection_duration` (counted).
    fn past_max_duration(&self, s: &H1State, now: tokio::time::Instant) -> bool {
        let past = self
            .max_connection_duration
            .is_some_and(|d| now.saturating_duration_since(s.opened) >= d);
        if past {
            s.stats.cx_max_duration_reached.inc();
        }
        past
    }

    /// When an idle connection reaches a limit.
    fn deadline(&self, c: &Idle) -> Option<tokio::time::Instant> {
        let idle = c.since.checked_add(self.idle_timeout);
        let duration = self
            .max_connection_duration
            .and_then(|d| c.conn.state().opened.checked_add(d));
        match (idle, duration) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The most recently returned idle connection that can still take a request.
    fn take_idle(&self) -> Option<H1Conn> {
        let now = tokio::time::Instant::now();
        let mut noop = Context::from_waker(Waker::noop());
        loop {
            let mut c = self.idle_list().conns.pop()?;
            // The reaper closes connections at their limits; this covers the moment in between,
            // and a server that closed the connection since (its close may not be read yet).
            if !self.expired(&c, now) && c.conn.poll_usable(&mut noop) {
                return Some(c.conn);
            }
        }
    }

    /// Puts a connection whose exchange ended cleanly back into the pool.
    fn put_idle(self: &Arc<Self>, mut conn: H1Conn) {
        let now = tokio::time::Instant::now();
        if self.past_max_duration(conn.state(), now)
            || self.max_requests.is_some_and(|m| conn.state().served >= m)
        {
            return;
        }
        let mut list = self.idle_list();
        // The read side is watched by the reaper's waker from now on (a server that closes the
        // connection wakes it); the connection is dropped at once if the server already did.
        let usable = match list.reaper.as_ref() {
            Some(w) => conn.poll_usable(&mut Context::from_waker(w)),
            None => conn.poll_usable(&mut Context::from_waker(Waker::noop())),
        };
        if !usable {
            drop(list);
            return;
        }
        let idle = Idle { conn, since: now };
        // A connection whose limit comes before the reaper's next wake-up moves it earlier.
        let wake = self
            .deadline(&idle)
            .filter(|d| list.next.is_none_or(|n| *d < n))
            .and(list.reaper.clone());
        list.conns.push(idle);
        let start = !list.reaping;
        // Started only inside the runtime (a body dropped elsewhere leaves it to the next one).
        let runtime = tokio::runtime::Handle::try_current().ok().filter(|_| start);
        list.reaping |= runtime.is_some();
        drop(list);
        if let Some(rt) = runtime {
            rt.spawn(Self::reap(Arc::downgrade(self)));
        }
        if let Some(w) = wake {
            w.wake();
        }
        self.returned.notify_waiters();
    }

    /// The idle connections' reaper (see [`IdleList`]): ends when none is left.
    async fn reap(pool: std::sync::Weak<Pool>) {
        let sleep = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(sleep);
        std::future::poll_fn(|cx| {
            loop {
                let Some(pool) = pool.upgrade() else {
                    return Poll::Ready(());
                };
                let now = tokio::time::Instant::now();
                let mut doomed = Vec::new();
                let mut next: Option<tokio::time::Instant> = None;
                {
                    let mut list = pool.idle_list();
                    if !list
                        .reaper
                        .as_ref()
                        .is_some_and(|w| w.will_wake(cx.waker()))
                    {
                        list.reaper = Some(cx.waker().clone());
                    }
                    let mut i = 0;
                    while let Some(c) = list.conns.get_mut(i) {
                        if pool.expired(c, now) || !c.conn.poll_usable(cx) {
                            doomed.push(list.conns.remove(i));
                            continue;
                        }
                        if let Some(d) = pool.deadline(c) {
                            next = Some(next.map_or(d, |n| n.min(d)));
                        }
                        i += 1;
                    }
                    if list.conns.is_empty() {
                        list.reaping = false;
                        list.reaper = None;
                        list.next = None;
                        drop(list);
                        return Poll::Ready(());
                    }
                    list.next = next;
                }
                // Closed outside the lock.
                drop(doomed);
                let Some(at) = next else {
                    return Poll::Pending;
                };
                sleep.as_mut().reset(at);
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
        })
        .await;
    }

    /// Runs one upstream connection until it ends, closing it at the pool's idle timeout and
    /// retiring it at `max_connection_duration` (then it closes once its streams are done).
    async fn run_connection<F>(
        conn: F,
        meta: Arc<ConnMeta>,
        idle: Duration,
        max_duration: Option<Duration>,
        stats: Arc<ClusterStats>,
    ) where
        F: std::future::Future<Output = Result<(), hyper::Error>>,
    {
        tokio::pin!(conn);
        let opened = tokio::time::Instant::now();
        let watch = || {
            let activity = meta.activity.clone();
            timeout::Watchdog::spawn(async move {
                let retire = async {
                    match max_duration.and_then(|d| opened.checked_add(d)) {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                let idle_closed = async {
                    if idle == Duration::MAX {
                        std::future::pending::<()>().await;
                    }
                    activity.idle_for(idle).await;
                };
                tokio::select! {
                    _ = idle_closed => Limit::Idle,
                    _ = retire => Limit::Retire,
                }
            })
        };
        let mut watchdog = watch();
        loop {
            tokio::select! {
                biased;
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::trace!(target: "upstream", "connection ended: {e}");
                    }
                    return;
                }
                limit = &mut watchdog => match limit {
                    // The watch found no stream, but a request may have taken the connection
                    // since (the pool only checks that it is open): close it only if it is
                    // still idle now, in this poll, where no request can start.
                    Some(Limit::Idle) if meta.activity.active() > 0 => watchdog = watch(),
                    Some(Limit::Idle) => {
                        stats.cx_idle_timeout.inc();
                        tracing::trace!(target: "upstream", "idle timeout: closing the connection");
                        return;
                    }
                    Some(Limit::Retire) => {
                        meta.retired.store(true, Ordering::Release);
                        stats.cx_max_duration_reached.inc();
                        break;
                    }
                    None => {
                        tracing::warn!(target: "upstream", "connection limit task failed; serving without limits");
                        if let Err(e) = conn.await {
                            tracing::trace!(target: "upstream", "connection ended: {e}");
                        }
                        return;
                    }
                },
            }
        }
        // Retired: the streams in flight finish, then the connection closes.
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::trace!(target: "upstream", "connection ended: {e}");
                }
            }
            _ = meta.activity.idle_for(Duration::ZERO) => {}
        }
    }

    /// Sends `req` on a pooled or new connection (opened with `dial`). `upgrade` keeps the
    /// connection out of the pool (it becomes the upgraded tunnel). A request that never left
    /// (the connection could not be opened, or a pooled one was found closed) comes back in the
    /// error, so it can be retried without replaying its body.
    ///
    /// `limits` are the cluster's circuit breakers: see the module documentation.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<Body>,
        dial: impl FnOnce() -> Dial<'static>,
        upgrade: bool,
        limits: &Limits,
    ) -> Result<Response<Body>, SendError> {
        let rq = match limits.request() {
            Ok(s) => s,
            Err(e) => return Err(SendError::unsent(e, req)),
        };
        match self.proto {
            Proto::Http1 => self.send_h1(req, dial, upgrade, limits, rq).await,
            Proto::Http2 => self.send_h2(req, dial, limits, rq).await,
        }
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut req: Request<Body>,
        dial: impl FnOnce() -> Dial<'static>,
        upgrade: bool,
        limits: &Limits,
        rq: Slot,
    ) -> Result<Response<Body>, SendError> {
        let mut pending: Option<Pending> = None;
        let mut overflow_counted = false;
        // A reused connection may have been closed by the server as the request went out: a
        // request that can be sent again unchanged comes back, and goes out once more, on a new
        // connection (a server that fails on reading it is not sent it a third time).
        let mut resent = false;
        let cx = loop {
            while !resent && let Some(conn) = self.take_idle() {
                if upgrade {
                    return self.upgrade_h1(conn, req, rq).await;
                }
                match self.exchange(conn, req, true).await {
                    Ok((head, ex)) => return Ok(self.h1_response(head, ex, rq)),
                    Err(h1::Failure {
                        request: Some(r), ..
                    }) => {
                        req = r;
                        resent = true;
                    }
                    Err(f) => return Err(SendError::sent(h1_error(f.error))),
                }
            }
            if pending.is_none() {
                match limits.pending() {
                    Ok(p) => pending = Some(p),
                    Err(e) => return Err(SendError::unsent(e, req)),
                }
            }
            // Registered before the checks, so that a release between them is not missed.
            let released = limits.resources().connections.released();
            let returned = self.returned.notified();
            tokio::pin!(released, returned);
            released.as_mut().enable();
            returned.as_mut().enable();
            if let Some(cx) = self.connection(limits, &mut overflow_counted) {
                break cx;
            }
            if self.has_idle() && !resent {
                continue;
            }
            tokio::select! {
                _ = released => {}
                _ = returned => {}
            }
        };
        // Opening a connection is the rare path: boxed, so that its future does not make every
        // request's future larger.
        let conn = match Box::pin(self.open_h1(dial, limits, cx)).await {
            Ok(c) => c,
            Err(e) => return Err(SendError::unsent(e, req)),
        };
        drop(pending);
        if upgrade {
            return self.upgrade_h1(conn, req, rq).await;
        }
        match self.exchange(conn, req, false).await {
            Ok((head, ex)) => Ok(self.h1_response(head, ex, rq)),
            Err(f) => Err(SendError {
                error: h1_error(f.error),
                request: f.request,
            }),
        }
    }

    /// Sends `req` on `conn` and reads the response head (see [`h1::Exchange::start`] for
    /// `reused`).
    async fn exchange(
        &self,
        mut conn: H1Conn,
        req: Request<Body>,
        reused: bool,
    ) -> Result<(http::response::Parts, h1::Exchange<H1State>), h1::Failure> {
        let s = conn.state_mut();
        s.served = s.served.saturating_add(1);
        if self.max_requests == Some(s.served) {
            s.stats.cx_max_requests.inc();
        }
        let mut ex = h1::Exchange::start(conn, req, reused)?;
        let head = std::future::poll_fn(|cx| ex.poll_head(cx)).await?;
        Ok((head, ex))
    }

    fn h1_response(
        self: &Arc<Self>,
        head: http::response::Parts,
        ex: h1::Exchange<H1State>,
        rq: Slot,
    ) -> Response<Body> {
        let body = H1Body::new(ex, self.clone(), rq);
        Response::from_parts(head, http_body_util::BodyExt::boxed(body))
    }

    /// Opens an HTTP/1.1 connection with `dial` (the connection holds `cx`).
    async fn open_h1(
        &self,
        dial: impl FnOnce() -> Dial<'static>,
        limits: &Limits,
        cx: Connection,
    ) -> Result<H1Conn, ProxyError> {
        let io = dial().await?;
        Ok(h1::Conn::new(
            io,
            H1State {
                _cx: cx,
                opened: tokio::time::Instant::now(),
                served: 0,
                stats: limits.stats.clone(),
            },
        ))
    }

    /// An upgrade (WebSocket, CONNECT): the connection goes to hyper's client, whose upgrade
    /// hands the tunnel to the router, and never comes back to the pool.
    async fn upgrade_h1(
        &self,
        conn: H1Conn,
        req: Request<Body>,
        rq: Slot,
    ) -> Result<Response<Body>, SendError> {
        let Some((io, state)) = conn.into_io() else {
            let e = ProxyError::UpstreamReset("connection termination: unread bytes".into());
            return Err(SendError::unsent(e, req));
        };
        let (mut send, connection) = match conn::http1::Builder::new()
            .handshake::<_, Body>(TokioIo::new(io))
            .await
        {
            Ok(c) => c,
            Err(e) => {
                let e = ProxyError::ConnectFailure(format!("HTTP/1.1 handshake: {e}"));
                return Err(SendError::unsent(e, req));
            }
        };
        tokio::spawn(async move {
            let _state = state;
            if let Err(e) = connection.with_upgrades().await {
                tracing::trace!(target: "upstream", "connection ended: {e}");
            }
        });
        let resp = match send.try_send_request(req).await {
            Ok(r) => r,
            // Not written (the connection closed first): it can go out again as it is.
            Err(mut e) => {
                let request = e.take_message();
                return Err(SendError {
                    error: upstream_error(e.into_error()),
                    request,
                });
            }
        };
        Ok(resp.map(|b| {
            http_body_util::BodyExt::boxed(http_body_util::BodyExt::map_err(
                Holding::new(b, Some(rq)),
                |e| Box::new(e) as BoxError,
            ))
        }))
    }

    async fn send_h2(
        self: &Arc<Self>,
        req: Request<Body>,
        dial: impl FnOnce() -> Dial<'static>,
        limits: &Limits,
        rq: Slot,
    ) -> Result<Response<Body>, SendError> {
        // Requests that find the connection being opened wait for it as pending requests, as
        // in Envoy's HTTP/2 pool: counted in `upstream_rq_pending_*`, refused with an overflow
        // past `max_pending_requests`.
        let mut waiting = if self.h2_connecting.load(Ordering::Acquire) {
            match limits.pending() {
                Ok(p) => Some(p),
                Err(e) => return Err(SendError::unsent(e, req)),
            }
        } else {
            None
        };
        let (mut send, meta) = {
            let mut slot = self.h2.lock().await;
            match slot.as_ref() {
                Some((s, m)) if !s.is_closed() && !m.retired() => (s.clone(), m.clone()),
                _ => {
                    // The request that opens the connection is pending until it is up (a
                    // waiter whose connection failed keeps its slot); the pool's one
                    // connection is opened even over `max_connections`.
                    let pending = match waiting.take().map_or_else(|| limits.pending(), Ok) {
                        Ok(p) => p,
                        Err(e) => return Err(SendError::unsent(e, req)),
                    };
                    let _connecting = Flag::raise(&self.h2_connecting);
                    let mut overflow_counted = false;
                    let cx = match self.connection(limits, &mut overflow_counted) {
                        Some(cx) => cx,
                        None => {
                            let res = limits.resources();
                            self.open.fetch_add(1, Ordering::AcqRel);
                            limits.stats.cx_total.inc();
                            limits.stats.cx_active.inc();
                            Connection {
                                _slot: res.connections.force(),
                                open: self.open.clone(),
                                active: limits.stats.cx_active.clone(),
                            }
                        }
                    };
                    // Boxed, as for HTTP/1.1: the rare path keeps its futures to itself.
                    let (send, meta) = match Box::pin(self.open_h2(dial, limits, cx)).await {
                        Ok(c) => c,
                        Err(e) => return Err(SendError::unsent(e, req)),
                    };
                    drop(pending);
                    *slot = Some((send.clone(), meta.clone()));
                    (send, meta)
                }
            }
        };
        drop(waiting);
        // Counted before the send, so the connection is not idle while the request waits.
        let stream = meta.activity.stream();
        meta.request(self.max_requests, &limits.stats);
        if let Err(e) = send.ready().await {
            return Err(SendError::unsent(upstream_error(e), req));
        }
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| SendError::sent(upstream_error(e)))?;
        Ok(resp.map(|b| {
            let body = http_body_util::BodyExt::boxed(http_body_util::BodyExt::map_err(
                Holding::new(b, Some(rq)),
                |e| Box::new(e) as BoxError,
            ));
            // The stream counts for the connection's idle timeout until its response ends.
            timeout::hold(body, stream)
        }))
    }
    /// Opens an HTTP/2 connection with `dial` and starts its task (which holds `cx`).
    async fn open_h2(
        &self,
        dial: impl FnOnce() -> Dial<'static>,
        limits: &Limits,
        cx: Connection,
    ) -> Result<(conn::http2::SendRequest<Body>, Arc<ConnMeta>), ProxyError> {
        let io = dial().await?;
        let mut b = conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new());
        if let Some(w) = self.h2_settings.initial_stream_window {
            b.initial_stream_window_size(w);
        }
        if let Some(w) = self.h2_settings.initial_connection_window {
            b.initial_connection_window_size(w);
        }
        if let Some(i) = self.h2_settings.keepalive_interval {
            // Envoy PINGs on its interval whether or not streams are open.
            b.keep_alive_interval(i).keep_alive_while_idle(true);
            if let Some(t) = self.h2_settings.keepalive_timeout {
                b.keep_alive_timeout(t);
            }
        }
        let (send, connection) = b
            .handshake::<_, Body>(TokioIo::new(io))
            .await
            .map_err(|e| ProxyError::ConnectFailure(format!("HTTP/2 handshake: {e}")))?;
        let meta = ConnMeta::new();
        let (idle, max_duration) = (self.idle_timeout, self.max_connection_duration);
        let (task_meta, stats) = (meta.clone(), limits.stats.clone());
        tokio::spawn(async move {
            let _cx = cx;
            Self::run_connection(connection, task_meta, idle, max_duration, stats).await;
        });
        Ok((send, meta))
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // The reaper holds the pool weakly: woken, it finds the pool gone and ends.
        if let Some(w) = self.idle_list().reaper.take() {
            w.wake();
        }
    }
}

/// An [`AtomicBool`] raised while the guard lives (lowered on every way out).
struct Flag<'a>(&'a AtomicBool);

impl<'a> Flag<'a> {
    fn raise(flag: &'a AtomicBool) -> Self {
        flag.store(true, Ordering::Release);
        Flag(flag)
    }
}

impl Drop for Flag<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A failed send: why, and the request when it never left.
pub struct SendError {
    /// Why.
    pub error: ProxyError,
    /// The request, if it was not sent (safe to retry without a body replay).
    pub request: Option<Request<Body>>,
}

impl SendError {
    fn unsent(error: ProxyError, req: Request<Body>) -> Self {
        SendError {
            error,
            request: Some(req),
        }
    }

    fn sent(error: ProxyError) -> Self {
        SendError {
            error,
            request: None,
        }
    }
}

/// Whether an upstream failure was an HTTP/2 `REFUSED_STREAM` (the request was not processed).
fn refused_stream(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = s.source();
    }
    false
}

fn upstream_error(e: hyper::Error) -> ProxyError {
    if refused_stream(&e) {
        ProxyError::UpstreamReset(format!("{REFUSED_STREAM}: {e}"))
    } else if e.is_canceled() || e.is_closed() || e.is_incomplete_message() {
        ProxyError::UpstreamReset(format!("connection termination: {e}"))
    } else if e.is_parse() || e.is_user() {
        ProxyError::UpstreamProtocol(e.to_string())
    } else {
        ProxyError::UpstreamReset(e.to_string())
    }
}

fn h1_error(e: h1::Error) -> ProxyError {
    match e {
        h1::Error::Io(_) | h1::Error::Closed(_) => ProxyError::UpstreamReset(e.to_string()),
        h1::Error::Parse(_) | h1::Error::Request(_) | h1::Error::RequestBody(_) => {
            ProxyError::UpstreamProtocol(e.to_string())
        }
    }
}

/// An HTTP/1.1 response body, read from the connection by whoever polls it; the connection goes
/// back into the pool when the body ends. It also holds the request's `max_requests` slot until
/// then. (The exchange is only reached through `&mut`, so the body is `Sync` although the
/// connection is not; what `&self` asks is kept beside it.)
struct H1Body {
    ex: Option<SyncWrapper<h1::Exchange<H1State>>>,
    ended: bool,
    size: SizeHint,
    pool: Arc<Pool>,
    rq: Option<Slot>,
}

impl H1Body {
    fn new(ex: h1::Exchange<H1State>, pool: Arc<Pool>, rq: Slot) -> Self {
        H1Body {
            ended: ex.is_end_stream(),
            size: ex.size_hint(),
            ex: Some(SyncWrapper::new(ex)),
            pool,
            rq: Some(rq),
        }
    }

    fn finish(&mut self) {
        self.rq = None;
        self.ended = true;
        self.size = SizeHint::with_exact(0);
        if let Some(conn) = self.ex.take().and_then(|e| e.into_inner().into_reusable()) {
            self.pool.put_idle(conn);
        }
    }
}

impl Drop for H1Body {
    fn drop(&mut self) {
        // A body without bytes may never be polled: the connection is still reusable.
        if self.ended {
            self.finish();
        }
    }
}

impl HttpBody for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(ex) = this.ex.as_mut().map(SyncWrapper::get_mut) else {
            return Poll::Ready(None);
        };
        let polled = ex.poll_data(cx);
        this.ended = ex.is_end_stream();
        this.size = ex.size_hint();
        match &polled {
            Poll::Ready(Some(Err(_))) => {
                this.ex = None;
                this.rq = None;
                this.ended = true;
            }
            Poll::Ready(_) if this.ended => this.finish(),
            _ => {}
        }
        polled.map(|f| f.map(|r| r.map_err(|e| Box::new(e) as BoxError)))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use http_body_util::BodyExt as _;
    use tokio::sync::Semaphore;

    use http::Uri;

    use super::*;
    use crate::{config::cluster::CircuitBreakers, stats::Stats};

    /// An HTTP/1.1 server on loopback that answers each request once `gate` gives a permit.
    async fn gated_server(gate: Arc<Semaphore>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let gate = gate.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| {
                        let gate = gate.clone();
                        async move {
                            if let Ok(p) = gate.acquire().await {
                                p.forget();
                            }
                            Response::builder()
                                .status(200)
                                .body(http_body_util::Full::new(Bytes::from_static(b"ok")))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        addr
    }

    fn dialer(addr: SocketAddr) -> impl FnOnce() -> Dial<'static> {
        move || {
            Box::pin(async move {
                let tcp = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| ProxyError::ConnectFailure(e.to_string()))?;
                Ok(Box::new(tcp) as BoxIo)
            })
        }
    }

    fn limits(stats: &Stats, f: impl FnOnce(&mut CircuitBreakers)) -> Limits {
        let mut cb = CircuitBreakers::default();
        f(&mut cb);
        let manager = Arc::new(Breakers::new(stats, "c"));
        manager.configure(stats, &cb);
        Limits {
            manager,
            high: false,
            stats: Arc::new(ClusterStats::new(stats, "c")),
        }
    }

    fn request() -> Request<Body> {
        let mut r = Request::new(crate::http::empty());
        *r.uri_mut() = Uri::from_static("/");
        r.headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_static("test"));
        r
    }

    async fn body(r: Response<Body>) -> Bytes {
        r.into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn max_connections_queues_requests_as_pending_then_overflows() {
        let gate = Arc::new(Semaphore::new(0));
        let addr = gated_server(gate.clone()).await;
        let stats = Stats::default();
        let limits = limits(&stats, |cb| {
            cb.default.max_connections = 1;
            cb.default.max_pending_requests = 1;
        });
        let pool = Arc::new(Pool::new(Proto::Http1, PoolSettings::default()));
        let first = {
            let (pool, limits) = (pool.clone(), limits.clone());
            tokio::spawn(async move { pool.send(request(), dialer(addr), false, &limits).await })
        };
        // Wait (bounded) for the first request to hold the connection and leave pending.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while limits.stats.rq_pending_active.get() != 0 || pool.connections() != 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "first request stuck"
            );
            tokio::task::yield_now().await;
        }
        // The second waits for the one connection: pending.
        let second = {
            let (pool, limits) = (pool.clone(), limits.clone());
            tokio::spawn(async move { pool.send(request(), dialer(addr), false, &limits).await })
        };
        while limits.stats.rq_pending_active.get() != 1 {
            assert!(tokio::time::Instant::now() < deadline, "second not pending");
            tokio::task::yield_now().await;
        }
        assert_eq!(limits.stats.cx_overflow.get(), 1);
        // The third finds the pending queue full.
        let third = pool.send(request(), dialer(addr), false, &limits).await;
        let Err(SendError {
            error: ProxyError::Overflow(what),
            request: Some(_),
        }) = third
        else {
            panic!("expected an unsent overflow");
        };
        assert_eq!(what, "max_pending_requests");
        assert_eq!(limits.stats.rq_pending_overflow.get(), 1);
        // The first answers; its connection serves the second.
        gate.add_permits(2);
        for task in [first, second] {
            let resp = match task.await.expect("joined") {
                Ok(r) => r,
                Err(e) => panic!("send failed: {}", e.error),
            };
            assert_eq!(resp.status(), 200);
            assert_eq!(body(resp).await, "ok");
        }
        assert_eq!(limits.stats.cx_total.get(), 1, "one connection served both");
        assert_eq!(limits.stats.rq_pending_total.get(), 2);
        assert_eq!(limits.stats.rq_pending_active.get(), 0);
        assert_eq!(limits.manager.default.requests.count(), 0);
    }

    /// An HTTP/2 server on loopback answering `ok` at once.
    async fn h2_server() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Response::builder()
                            .status(200)
                            .body(http_body_util::Full::new(Bytes::from_static(b"ok")))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn h2_requests_waiting_for_the_connection_are_pending() {
        let addr = h2_server().await;
        let stats = Stats::default();
        let limits = limits(&stats, |cb| cb.default.max_pending_requests = 2);
        let pool = Arc::new(Pool::new(Proto::Http2, PoolSettings::default()));
        // The first request opens the connection, whose dial waits for the gate.
        let gate = Arc::new(Semaphore::new(0));
        let first = {
            let (pool, limits, gate) = (pool.clone(), limits.clone(), gate.clone());
            let dial = move || -> Dial<'static> {
                Box::pin(async move {
                    let _ = gate.acquire().await;
                    dialer(addr)().await
                })
            };
            tokio::spawn(async move { pool.send(request(), dial, false, &limits).await })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !pool.h2_connecting.load(Ordering::Acquire) {
            assert!(tokio::time::Instant::now() < deadline, "first not dialing");
            tokio::task::yield_now().await;
        }
        // The second waits for that connection: pending too.
        let second = {
            let (pool, limits) = (pool.clone(), limits.clone());
            tokio::spawn(async move { pool.send(request(), dialer(addr), false, &limits).await })
        };
        while limits.stats.rq_pending_active.get() != 2 {
            assert!(tokio::time::Instant::now() < deadline, "second not pending");
            tokio::task::yield_now().await;
        }
        // The third finds the pending queue full.
        let third = pool.send(request(), dialer(addr), false, &limits).await;
        let Err(SendError {
            error: ProxyError::Overflow(what),
            request: Some(_),
        }) = third
        else {
            panic!("expected an unsent overflow");
        };
        assert_eq!(what, "max_pending_requests");
        gate.add_permits(1);
        for task in [first, second] {
            let resp = match task.await.expect("joined") {
                Ok(r) => r,
                Err(e) => panic!("send failed: {}", e.error),
            };
            assert_eq!(body(resp).await, "ok");
        }
        assert_eq!(limits.stats.cx_total.get(), 1, "one connection served both");
        assert_eq!(limits.stats.rq_pending_total.get(), 2);
        assert_eq!(limits.stats.rq_pending_overflow.get(), 1);
        assert_eq!(limits.stats.rq_pending_active.get(), 0);
        assert!(!pool.h2_connecting.load(Ordering::Acquire));
    }

    #[tokio::test]
    async fn max_requests_holds_until_the_response_ends() {
        let gate = Arc::new(Semaphore::new(10));
        let addr = gated_server(gate).await;
        let stats = Stats::default();
        let limits = limits(&stats, |cb| cb.default.max_requests = 1);
        let pool = Arc::new(Pool::new(Proto::Http1, PoolSettings::default()));
        let resp = match pool.send(request(), dialer(addr), false, &limits).await {
            Ok(r) => r,
            Err(e) => panic!("send failed: {}", e.error),
        };
        // Headers are in, the body is not read: the request still counts.
        assert_eq!(limits.manager.default.requests.count(), 1);
        let over = pool.send(request(), dialer(addr), false, &limits).await;
        assert!(matches!(
            over,
            Err(SendError {
                error: ProxyError::Overflow(_),
                ..
            })
        ));
        assert_eq!(limits.stats.rq_pending_overflow.get(), 1);
        assert_eq!(body(resp).await, "ok");
        assert_eq!(limits.manager.default.requests.count(), 0);
        assert!(
            pool.send(request(), dialer(addr), false, &limits)
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn a_pool_opens_its_first_connection_over_the_cluster_limit() {
        let gate = Arc::new(Semaphore::new(10));
        let addr = gated_server(gate).await;
        let stats = Stats::default();
        let limits = limits(&stats, |cb| cb.default.max_connections = 1);
        // Another pool of the cluster holds the only connection slot.
        let held = limits
            .manager
            .default
            .connections
            .try_acquire()
            .expect("slot");
        let pool = Arc::new(Pool::new(Proto::Http1, PoolSettings::default()));
        let resp = match pool.send(request(), dialer(addr), false, &limits).await {
            Ok(r) => r,
            Err(e) => panic!("send failed: {}", e.error),
        };
        assert_eq!(body(resp).await, "ok");
        assert_eq!(
            limits.stats.cx_overflow.get(),
            1,
            "counted, then opened anyway"
        );
        assert_eq!(limits.manager.default.connections.count(), 2);
        drop(held);
    }

    #[tokio::test]
    async fn a_failed_dial_gives_every_slot_back() {
        let stats = Stats::default();
        let limits = limits(&stats, |_| {});
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        for proto in [Proto::Http1, Proto::Http2] {
            let pool = Arc::new(Pool::new(proto, PoolSettings::default()));
            let r = pool.send(request(), dialer(dead), false, &limits).await;
            assert!(matches!(
                r,
                Err(SendError {
                    error: ProxyError::ConnectFailure(_),
                    request: Some(_),
                })
            ));
            assert!(pool.is_idle());
        }
        let m = &limits.manager.default;
        assert_eq!(
            (m.connections.count(), m.pending.count(), m.requests.count()),
            (0, 0, 0)
        );
        assert_eq!(limits.stats.cx_active.get(), 0);
        assert_eq!(limits.stats.rq_pending_active.get(), 0);
    }

    /// An HTTP/1.1 or h2c server that answers `ok` and reports each connection's end.
    async fn closing_server(
        proto: Proto,
    ) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Response::builder()
                            .status(200)
                            .body(http_body_util::Full::new(Bytes::from_static(b"ok")))
                    });
                    let _ = match proto {
                        Proto::Http1 => {
                            hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tcp), service)
                                .await
                        }
                        Proto::Http2 => {
                            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(tcp), service)
                                .await
                        }
                    };
                    let _ = tx.send(());
                });
            }
        });
        (addr, rx)
    }

    async fn ok(pool: &Arc<Pool>, addr: SocketAddr, limits: &Limits) {
        match pool.send(request(), dialer(addr), false, limits).await {
            Ok(r) => assert_eq!(body(r).await, "ok"),
            Err(e) => panic!("send failed: {}", e.error),
        }
    }

    async fn wait_for(what: &str, f: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn idle_connections_close_at_the_idle_timeout() {
        for proto in [Proto::Http1, Proto::Http2] {
            let (addr, mut closed) = closing_server(proto).await;
            let stats = Stats::default();
            let limits = limits(&stats, |_| {});
            let settings = PoolSettings {
                idle_timeout: Some(Duration::from_millis(200)),
                ..PoolSettings::default()
            };
            let pool = Arc::new(Pool::new(proto, settings));
            ok(&pool, addr, &limits).await;
            let idle_from = std::time::Instant::now();
            tokio::time::timeout(Duration::from_secs(10), closed.recv())
                .await
                .expect("closed in time");
            assert!(
                idle_from.elapsed() >= Duration::from_millis(150),
                "{proto:?}"
            );
            wait_for("idle timeout counted", || {
                limits.stats.cx_idle_timeout.get() == 1
            })
            .await;
            wait_for("no connection left", || pool.is_idle()).await;
            // The next request opens a new connection.
            ok(&pool, addr, &limits).await;
            assert_eq!(limits.stats.cx_total.get(), 2, "{proto:?}");
        }
    }

    #[tokio::test]
    async fn a_zero_idle_timeout_keeps_connections() {
        let (addr, mut closed) = closing_server(Proto::Http1).await;
        let stats = Stats::default();
        let limits = limits(&stats, |_| {});
        let settings = PoolSettings {
            idle_timeout: Some(Duration::ZERO),
            ..PoolSettings::default()
        };
        let pool = Arc::new(Pool::new(Proto::Http1, settings));
        ok(&pool, addr, &limits).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(400), closed.recv())
                .await
                .is_err(),
            "still open"
        );
        ok(&pool, addr, &limits).await;
        assert_eq!(limits.stats.cx_total.get(), 1, "reused");
        assert_eq!(limits.stats.cx_idle_timeout.get(), 0);
    }

    #[tokio::test]
    async fn max_requests_per_connection_retires_connections() {
        for proto in [Proto::Http1, Proto::Http2] {
            let (addr, mut closed) = closing_server(proto).await;
            let stats = Stats::default();
            let limits = limits(&stats, |_| {});
            let settings = PoolSettings {
                max_requests_per_connection: Some(1),
                ..PoolSettings::default()
            };
            let pool = Arc::new(Pool::new(proto, settings));
            ok(&pool, addr, &limits).await;
            ok(&pool, addr, &limits).await;
            assert_eq!(
                limits.stats.cx_total.get(),
                2,
                "{proto:?}: one request each"
            );
            assert_eq!(limits.stats.cx_max_requests.get(), 2, "{proto:?}");
            // A retired connection closes once its request is done.
            tokio::time::timeout(Duration::from_secs(10), closed.recv())
                .await
                .expect("the first connection closed");
        }
    }

    #[tokio::test]
    async fn max_connection_duration_retires_connections() {
        for proto in [Proto::Http1, Proto::Http2] {
            let (addr, mut closed) = closing_server(proto).await;
            let stats = Stats::default();
            let limits = limits(&stats, |_| {});
            let settings = PoolSettings {
                max_connection_duration: Some(Duration::from_millis(200)),
                ..PoolSettings::default()
            };
            let pool = Arc::new(Pool::new(proto, settings));
            ok(&pool, addr, &limits).await;
            wait_for("duration reached", || {
                limits.stats.cx_max_duration_reached.get() == 1
            })
            .await;
            tokio::time::timeout(Duration::from_secs(10), closed.recv())
                .await
                .expect("the idle, retired connection closed");
            ok(&pool, addr, &limits).await;
            assert_eq!(limits.stats.cx_total.get(), 2, "{proto:?}");
        }
    }

    /// An HTTP/1.1 server on loopback written by hand: each connection answers `ok` to its first
    /// request, then, after its second request arrives, closes without answering (a server
    /// closing an idle connection just as a request goes out) or, with `close_idle`, closes
    /// right after the first answer.
    async fn racing_server(close_idle: bool) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = tcp
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    if close_idle {
                        return;
                    }
                    let _ = tcp.read(&mut buf).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_request_the_server_closed_on_goes_out_again_once_on_a_new_connection() {
        let addr = racing_server(false).await;
        let stats = Stats::default();
        let limits = limits(&stats, |_| {});
        let pool = Arc::new(Pool::new(Proto::Http1, PoolSettings::default()));
        // Two idle connections, each of which fails its second request.
        tokio::join!(ok(&pool, addr, &limits), ok(&pool, addr, &limits));
        assert_eq!(limits.stats.cx_total.get(), 2);
        // The request takes an idle connection, which the server closes on reading it (the
        // keep-alive race): the GET goes out again, on a new connection, not on the other idle
        // one (which stays open).
        ok(&pool, addr, &limits).await;
        assert_eq!(limits.stats.cx_total.get(), 3);
        assert_eq!(pool.connections(), 2);
    }

    #[tokio::test]
    async fn an_idle_connection_the_server_closes_is_closed_and_uncounted() {
        let addr = racing_server(true).await;
        let stats = Stats::default();
        let limits = limits(&stats, |_| {});
        let pool = Arc::new(Pool::new(Proto::Http1, PoolSettings::default()));
        ok(&pool, addr, &limits).await;
        // The reaper watches the idle connection: the server's close is seen without a request.
        wait_for("the closed connection left the pool", || pool.is_idle()).await;
        assert_eq!(limits.stats.cx_active.get(), 0);
        assert_eq!(limits.stats.cx_idle_timeout.get(), 0);
        ok(&pool, addr, &limits).await;
        assert_eq!(limits.stats.cx_total.get(), 2);
    }
}
