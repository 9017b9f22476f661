//! Stream and connection timers with Envoy's semantics (`http_connection_manager.proto`,
//! `route_components.proto`, `protocol.proto`, `tcp_proxy.proto`): what counts as activity, when
//! each timer starts and stops, and which one fired.
//!
//! A stream's [`Activity`] is shared by its request body (every frame, and its end), its response
//! body (every frame) and the [`Watch`]es holding its timers — the HCM's (`stream_idle_timeout` or
//! the route's `idle_timeout`, `request_timeout`, `max_stream_duration`) and the router's (route
//! `timeout`, `per_try_timeout`, `per_try_idle_timeout`, the cluster's `max_stream_duration`).
//! Activity is an atomic timestamp rather than a timer reset per frame: a watch sleeps until the
//! earliest deadline it knows and, when activity has moved that deadline by the time it wakes,
//! sleeps again (the optimisation Envoy's own `resetIdleTimer` comment asks for).
//!
//! An upgraded stream keeps its watches after the 101: the tunnel's bytes either way are its
//! activity and the 101's body lasts as long as the tunnel (see the router's `UpgradedBody`).
//!
//! A connection's [`ConnActivity`] counts its streams in flight and when the last one ended, for
//! the connection `idle_timeout` of HTTP connection managers and upstream pools.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::task::AtomicWaker;
use http::{HeaderMap, HeaderName, HeaderValue};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

use super::{Body, BoxError};
use crate::flags::{ResponseFlag, ResponseFlags};

/// `request_end` before the request has ended.
const NOT_YET: u64 = u64::MAX;

/// gRPC's largest `grpc-timeout` value: at most 8 digits (PROTOCOL-HTTP2.md).
const MAX_GRPC_TIMEOUT_VALUE: u64 = 99_999_999;

/// Which timer fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Expired {
    /// HCM `stream_idle_timeout`, or the route's `idle_timeout` (flag `SI`).
    #[error("stream timeout")]
    StreamIdle,
    /// HCM `request_timeout`: the whole request was not received in time (no flag).
    #[error("request timeout")]
    Request,
    /// `max_stream_duration` (HCM, route, or the `grpc-timeout` header; no flag).
    #[error("downstream duration timeout")]
    StreamDuration,
    /// The route `timeout` (flag `UT`).
    #[error("upstream request timeout")]
    Route,
    /// `per_try_timeout` (flag `UT`; the attempt may be retried).
    #[error("upstream per-try timeout")]
    PerTry,
    /// `per_try_idle_timeout` (flag `UT`; the attempt may be retried before the response).
    #[error("upstream per-try idle timeout")]
    PerTryIdle,
    /// The cluster's `common_http_protocol_options.max_stream_duration` (flag `UMSDR`).
    #[error("upstream max stream duration reached")]
    UpstreamDuration,
    /// A connection or tunnel went idle (tcp_proxy `idle_timeout`, no flag).
    #[error("idle timeout")]
    ConnectionIdle,
    /// tcp_proxy `max_downstream_connection_duration` (flag `DT`).
    #[error("max connection duration")]
    ConnectionDuration,
}

impl Expired {
    /// The response flags Envoy records when this timer ends a stream.
    pub fn response_flags(self) -> ResponseFlags {
        match self {
            Expired::StreamIdle => ResponseFlags::of(ResponseFlag::StreamIdleTimeout),
            Expired::Route | Expired::PerTry | Expired::PerTryIdle => {
                ResponseFlags::of(ResponseFlag::UpstreamRequestTimeout)
            }
            Expired::UpstreamDuration => {
                ResponseFlags::of(ResponseFlag::UpstreamMaxStreamDurationReached)
            }
            Expired::ConnectionDuration => ResponseFlags::of(ResponseFlag::DurationTimeout),
            Expired::Request | Expired::StreamDuration | Expired::ConnectionIdle => {
                ResponseFlags::default()
            }
        }
    }

    /// Envoy's `%RESPONSE_CODE_DETAILS%` for a local reply caused by this timer.
    pub fn code_details(self) -> &'static str {
        match self {
            Expired::StreamIdle => "stream_idle_timeout",
            Expired::Request => "request_overall_timeout",
            Expired::StreamDuration => "max_duration_timeout",
            Expired::Route => "upstream_response_timeout",
            Expired::PerTry => "upstream_per_try_timeout",
            Expired::PerTryIdle => "upstream_per_try_idle_timeout",
            Expired::UpstreamDuration => "upstream_max_stream_duration_reached",
            Expired::ConnectionIdle => "idle_timeout",
            Expired::ConnectionDuration => "max_duration_timeout",
        }
    }

    /// The status of the local reply (Envoy's `maybeRequestTimeoutCode`): 504 once the whole
    /// request was received, 408 while it is still arriving (an HTTP/1 client cannot reuse that
    /// connection anyway). The router's own timeouts always answer 504.
    pub fn status(self, request_complete: bool) -> http::StatusCode {
        match self {
            Expired::Route | Expired::PerTry | Expired::PerTryIdle => {
                http::StatusCode::GATEWAY_TIMEOUT
            }
            _ if request_complete => http::StatusCode::GATEWAY_TIMEOUT,
            _ => http::StatusCode::REQUEST_TIMEOUT,
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos())
        .unwrap_or(NOT_YET - 1)
        .min(NOT_YET - 1)
}

/// What moved on one stream and when.
#[derive(Debug)]
pub struct Activity {
    origin: Instant,
    /// Nanoseconds after `origin` of the last frame either way.
    last: AtomicU64,
    /// Nanoseconds after `origin` of the request's end of stream ([`NOT_YET`] before).
    request_end: AtomicU64,
    response_started: AtomicBool,
    /// Woken when the request ends (arms the timers that start there).
    request_waker: AtomicWaker,
}

impl Activity {
    /// A stream that starts now.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            origin: Instant::now(),
            last: AtomicU64::new(0),
            request_end: AtomicU64::new(NOT_YET),
            response_started: AtomicBool::new(false),
            request_waker: AtomicWaker::new(),
        })
    }

    fn offset(&self, t: Instant) -> u64 {
        nanos(t.saturating_duration_since(self.origin))
    }

    fn at(&self, offset: u64) -> Instant {
        self.origin + Duration::from_nanos(offset)
    }

    /// When the stream started.
    pub fn started(&self) -> Instant {
        self.origin
    }

    /// Something moved (a frame either way, response headers).
    pub fn touch(&self) {
        self.last
            .fetch_max(self.offset(Instant::now()), Ordering::Relaxed);
    }

    /// When something last moved.
    pub fn last(&self) -> Instant {
        self.at(self.last.load(Ordering::Relaxed))
    }

    /// The request reached its end of stream.
    pub fn end_request(&self) {
        let now = self.offset(Instant::now());
        self.last.fetch_max(now, Ordering::Relaxed);
        if self
            .request_end
            .compare_exchange(NOT_YET, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.request_waker.wake();
        }
    }

    /// When the request ended, if it has.
    pub fn request_ended(&self) -> Option<Instant> {
        match self.request_end.load(Ordering::Acquire) {
            NOT_YET => None,
            t => Some(self.at(t)),
        }
    }

    /// Response headers are on their way downstream.
    pub fn start_response(&self) {
        self.touch();
        self.response_started.store(true, Ordering::Release);
    }

    /// Whether the response has started.
    pub fn response_started(&self) -> bool {
        self.response_started.load(Ordering::Acquire)
    }
}

/// When a rule's deadline is.
#[derive(Debug, Clone, Copy)]
enum Clock {
    /// `after` the later of the last activity and `since`.
    Idle { after: Duration, since: Instant },
    /// At a fixed instant.
    At(Instant),
    /// `after` the later of the request's end and `since`: unarmed until the request ends and,
    /// `until_response`, disarmed once the response starts.
    AfterRequest {
        after: Duration,
        since: Instant,
        until_response: bool,
    },
    /// At a fixed instant unless the request ended or the response started first.
    RequestBy(Instant),
    /// At a fixed instant unless the response started first (an upgrade's handshake: its
    /// request never ends).
    ResponseBy(Instant),
}

#[derive(Debug, Clone, Copy)]
struct Rule {
    clock: Clock,
    kind: Expired,
}

/// Rules one watch holds at most (the router's four: route, per-try, per-try idle, upstream
/// duration).
const RULES: usize = 4;

/// The timers of one stream (or attempt, or connection) over its [`Activity`].
pub struct Watch {
    activity: Arc<Activity>,
    rules: [Option<Rule>; RULES],
    /// Made on first need (a watch whose rules stay unarmed never allocates a timer).
    sleep: Option<Pin<Box<Sleep>>>,
    /// The waker `sleep` holds (it was polled pending with it, at its current deadline): until
    /// the sleep elapses or is reset, polling it again with the same waker would only redo the
    /// timer's bookkeeping. The wrapped future is polled on every wake-up of its stream (each
    /// body frame), so this is skipped several times per request.
    armed: Option<std::task::Waker>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

impl Watch {
    /// A watch without timers over `activity`.
    pub fn new(activity: Arc<Activity>) -> Watch {
        Watch {
            activity,
            rules: [None; RULES],
            sleep: None,
            armed: None,
        }
    }

    /// The stream's activity.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    fn push(mut self, clock: Clock, kind: Expired) -> Watch {
        if let Some(slot) = self.rules.iter_mut().find(|r| r.is_none()) {
            *slot = Some(Rule { clock, kind });
        } else {
            debug_assert!(false, "more than {RULES} timers on one watch");
        }
        self
    }

    /// Fires `after` without activity, counting from no earlier than `since`.
    pub fn idle(self, after: Duration, since: Instant, kind: Expired) -> Watch {
        self.push(Clock::Idle { after, since }, kind)
    }

    /// Fires at `at`.
    pub fn at(self, at: Instant, kind: Expired) -> Watch {
        self.push(Clock::At(at), kind)
    }

    /// Fires `after` the request's end (or `since`, if later); with `until_response`, only while
    /// the response has not started.
    pub fn after_request(
        self,
        after: Duration,
        since: Instant,
        until_response: bool,
        kind: Expired,
    ) -> Watch {
        self.push(
            Clock::AfterRequest {
                after,
                since,
                until_response,
            },
            kind,
        )
    }

    /// Fires at `at` unless the request ended or the response started first
    /// ([`Expired::Request`]).
    pub fn request_by(self, at: Instant) -> Watch {
        self.push(Clock::RequestBy(at), Expired::Request)
    }

    /// Fires at `at` unless the response started first: the route timeout of an upgrade, whose
    /// request does not end before its 101 (Envoy's `setupRouteTimeoutForWebsocketUpgrade`,
    /// disarmed by the 101).
    pub fn response_by(self, at: Instant, kind: Expired) -> Watch {
        self.push(Clock::ResponseBy(at), kind)
    }

    /// Whether no timer is set.
    pub fn is_empty(&self) -> bool {
        self.rules.iter().all(Option::is_none)
    }

    /// A rule's deadline now (`None`: not armed, or disarmed).
    fn deadline(&self, rule: &Rule) -> Option<Instant> {
        let a = &self.activity;
        match rule.clock {
            Clock::Idle { after, since } => Some(a.last().max(since) + after),
            Clock::At(t) => Some(t),
            Clock::AfterRequest {
                after,
                since,
                until_response,
            } => {
                if until_response && a.response_started() {
                    return None;
                }
                a.request_ended().map(|end| end.max(since) + after)
            }
            Clock::RequestBy(t) => {
                if a.response_started() || a.request_ended().is_some() {
                    None
                } else {
                    Some(t)
                }
            }
            Clock::ResponseBy(t) => (!a.response_started()).then_some(t),
        }
    }

    /// The earliest armed deadline, or the timer that expired by `now`.
    fn check(&self, now: Instant) -> Result<Option<Instant>, Expired> {
        let mut earliest: Option<(Instant, Expired)> = None;
        for rule in self.rules.iter().flatten() {
            if let Some(d) = self.deadline(rule)
                && earliest.is_none_or(|(e, _)| d < e)
            {
                earliest = Some((d, rule.kind));
            }
        }
        match earliest {
            Some((d, kind)) if d <= now => Err(kind),
            other => Ok(other.map(|(d, _)| d)),
        }
    }

    /// Whether a timer waits for the request to end before it is armed.
    fn waits_for_request(&self) -> bool {
        let a = &self.activity;
        self.rules.iter().flatten().any(|r| {
            matches!(r.clock, Clock::AfterRequest { until_response, .. }
                if !(until_response && a.response_started()))
        }) && a.request_ended().is_none()
    }

    /// Polls for the first timer to fire.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<Expired> {
        loop {
            let next = match self.check(Instant::now()) {
                Err(kind) => return Poll::Ready(kind),
                Ok(next) => next,
            };
            if self.waits_for_request() {
                self.activity.request_waker.register(cx.waker());
                // The request may have ended between the check and the registration.
                if self.activity.request_ended().is_some() {
                    continue;
                }
            }
            let Some(at) = next else {
                return Poll::Pending;
            };
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            // Activity only moves deadlines later: the timer is left to wake early and be
            // re-armed then, instead of being moved on every frame.
            if at < sleep.deadline() || sleep.is_elapsed() {
                sleep.as_mut().reset(at);
                self.armed = None;
            }
            if self.armed.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                return Poll::Pending;
            }
            if sleep.as_mut().poll(cx).is_pending() {
                self.armed = Some(cx.waker().clone());
                return Poll::Pending;
            }
            self.armed = None;
            // The sleep ended: check again (activity may have moved the deadline on).
        }
    }

    /// Waits for the first timer to fire (never, without timers).
    pub async fn expired(&mut self) -> Expired {
        std::future::poll_fn(|cx| self.poll_expired(cx)).await
    }

    /// Runs `f` unless a timer fires first. `f` is pinned by the caller: an async fn's argument
    /// is stored in its future twice (as the argument and as the local it is moved to), and the
    /// router's upstream send is a 2 KB future.
    pub async fn run<F: Future>(&mut self, f: Pin<&mut F>) -> Result<F::Output, Expired> {
        tokio::select! {
            biased;
            r = f => Ok(r),
            k = self.expired() => Err(k),
        }
    }
}

/// The HCM's view of a request body: its frames count as activity and its end is noted.
struct RequestActivity(Arc<Activity>);

impl super::RequestObserver for RequestActivity {
    fn progress(&mut self) {
        self.0.touch();
    }

    fn end(&mut self) {
        self.0.end_request();
    }
}

/// Wraps a request `body` so its frames and its end reach `activity`.
pub fn observe_request(body: Body, activity: &Arc<Activity>) -> Body {
    super::observe_request_body(body, RequestActivity(activity.clone()))
}

/// What to do when a watch fires on a response body (count the stat, note the flag).
pub type OnExpire = Box<dyn FnOnce(Expired) + Send + Sync>;

/// A response body guarded by a [`Watch`]: when a timer fires the body ends with the
/// [`Expired`] error, which resets the downstream stream (HTTP/2) or closes the connection
/// (HTTP/1.1) — Envoy's reset of a stream whose response already started.
pub struct TimedBody {
    inner: Body,
    watch: Watch,
    /// Frames count as activity (the innermost guard does it; outer ones only watch).
    touch: bool,
    on_expire: Option<OnExpire>,
    done: bool,
}

impl TimedBody {
    /// Guards `body` with `watch`; `touch` makes its frames count as activity.
    pub fn wrap(body: Body, watch: Watch, touch: bool, on_expire: Option<OnExpire>) -> Body {
        if body.is_end_stream() {
            return body;
        }
        http_body_util::combinators::BoxBody::new(TimedBody {
            inner: body,
            watch,
            touch,
            on_expire,
            done: false,
        })
    }
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        // The timers first: a body that is always ready must still end at its deadline.
        if let Poll::Ready(kind) = self.watch.poll_expired(cx) {
            self.done = true;
            if let Some(f) = self.on_expire.take() {
                f(kind);
            }
            return Poll::Ready(Some(Err(Box::new(kind))));
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if self.touch && matches!(polled, Poll::Ready(Some(Ok(_)))) {
            self.watch.activity.touch();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A byte stream (an upgraded or CONNECT tunnel) whose reads and writes count as activity and
/// that fails with [`Expired`] (as an I/O error) when its watch fires, ending the tunnel.
pub struct WatchedIo<T> {
    inner: T,
    watch: Watch,
    expired: Option<Expired>,
    on_expire: Option<OnExpire>,
}

impl<T> WatchedIo<T> {
    /// Guards `inner` with `watch`; `on_expire` runs once when a timer fires.
    pub fn new(inner: T, watch: Watch, on_expire: Option<OnExpire>) -> Self {
        WatchedIo {
            inner,
            watch,
            expired: None,
            on_expire,
        }
    }

    /// The timer that ended the stream, if one did.
    pub fn expired(&self) -> Option<Expired> {
        self.expired
    }

    fn check(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        if self.expired.is_none()
            && let Poll::Ready(kind) = self.watch.poll_expired(cx)
        {
            self.expired = Some(kind);
            if let Some(f) = self.on_expire.take() {
                f(kind);
            }
        }
        self.expired
            .map(|k| std::io::Error::new(std::io::ErrorKind::TimedOut, k))
    }
}

impl<T: crate::io::Stream> crate::io::Stream for WatchedIo<T> {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Option<Poll<std::io::Result<bytes::Bytes>>> {
        if let Some(e) = self.check(cx) {
            return Some(Poll::Ready(Err(e)));
        }
        let polled = self.inner.poll_read_chunk(cx)?;
        if matches!(&polled, Poll::Ready(Ok(chunk)) if !chunk.is_empty()) {
            self.watch.activity.touch();
        }
        Some(polled)
    }

    fn takes_chunks(&self) -> bool {
        self.inner.takes_chunks()
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut bytes::Bytes,
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        let polled = self.inner.poll_write_chunk(cx, chunk);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.watch.activity.touch();
        }
        polled
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WatchedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        // The timers first: a tunnel whose reads are always ready must still end at its
        // deadline (`max_stream_duration`).
        if let Some(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if polled.is_ready() && buf.filled().len() > before {
            self.watch.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WatchedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.watch.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The streams of one connection: how many are in flight and when the last one ended.
#[derive(Debug)]
pub struct ConnActivity {
    origin: Instant,
    active: AtomicUsize,
    /// Nanoseconds after `origin` when the connection last became idle.
    idle_since: AtomicU64,
    /// Set once something waits for the last stream to end ([`ConnActivity::idle_for`] with a
    /// zero timeout); until then ending a stream wakes nobody.
    watched: AtomicBool,
    /// Woken when the last stream ends (once `watched`).
    became_idle: tokio::sync::Notify,
}

impl ConnActivity {
    /// A connection that opens now, idle.
    pub fn new() -> Arc<ConnActivity> {
        Arc::new(ConnActivity {
            origin: Instant::now(),
            active: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            watched: AtomicBool::new(false),
            became_idle: tokio::sync::Notify::new(),
        })
    }

    /// Counts a stream until the guard is dropped.
    pub fn stream(self: &Arc<Self>) -> StreamGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        StreamGuard(self.clone())
    }

    /// Streams in flight.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Resolves once the connection has had no stream for `idle` (at once for zero when no
    /// stream is in flight; never when `idle` is too long to be a deadline).
    ///
    /// Streams starting and ending do not touch the timer: it is set for the earliest moment the
    /// connection could be idle that long, and on firing looks at the streams again (a stream in
    /// flight now cannot end before now, so `now + idle` is never late). A connection that is busy
    /// for an hour with a one-hour timeout wakes its task once, not once per request.
    pub async fn idle_for(&self, idle: Duration) {
        if idle.is_zero() {
            return self.no_stream().await;
        }
        let sleep = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(sleep);
        loop {
            let now = Instant::now();
            let next = if self.active() == 0 {
                let since =
                    self.origin + Duration::from_nanos(self.idle_since.load(Ordering::SeqCst));
                since.checked_add(idle)
            } else {
                now.checked_add(idle)
            };
            let Some(at) = next else {
                return std::future::pending().await;
            };
            if at <= now && self.active() == 0 {
                return;
            }
            sleep.as_mut().reset(at);
            sleep.as_mut().await;
        }
    }

    /// Resolves once no stream is in flight.
    async fn no_stream(&self) {
        self.watched.store(true, Ordering::SeqCst);
        loop {
            // Registered before the count is read, so a last stream ending in between wakes us.
            let became_idle = self.became_idle.notified();
            tokio::pin!(became_idle);
            became_idle.as_mut().enable();
            if self.active() == 0 {
                return;
            }
            became_idle.await;
        }
    }
}

/// One stream in flight on a connection (see [`ConnActivity::stream`]).
#[derive(Debug)]
pub struct StreamGuard(Arc<ConnActivity>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let c = &self.0;
        // Stamp before the count drops, so a watcher that sees zero also sees the new stamp.
        let now = nanos(Instant::now().saturating_duration_since(c.origin));
        c.idle_since.fetch_max(now, Ordering::SeqCst);
        // SeqCst with `no_stream`'s flag store and count load: either it sees the count at zero
        // or this sees the flag and wakes it.
        if c.active.fetch_sub(1, Ordering::SeqCst) == 1 && c.watched.load(Ordering::SeqCst) {
            c.became_idle.notify_waiters();
        }
    }
}

/// A connection's limit timers (idle, duration, drain) run in a task of their own beside it: in
/// a `select!` with the connection they would be polled on each of its wake-ups, several per
/// request, while they fire about never. Resolves with the task's output; dropping it stops the
/// task.
pub struct Watchdog<T>(tokio::task::JoinHandle<T>);

impl<T: Send + 'static> Watchdog<T> {
    /// Runs `watch` on this runtime (the connection's worker).
    pub fn spawn<F>(watch: F) -> Watchdog<T>
    where
        F: Future<Output = T> + Send + 'static,
    {
        Watchdog(tokio::spawn(watch))
    }
}

impl<T> Future for Watchdog<T> {
    /// `None` if the task panicked.
    type Output = Option<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        Pin::new(&mut self.0).poll(cx).map(Result::ok)
    }
}

impl<T> Drop for Watchdog<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A body that holds a value (a [`StreamGuard`]) until it ends or is dropped.
pub struct Held<T> {
    inner: Body,
    held: Option<T>,
}

/// Keeps `held` alive until `body` ends or is dropped.
pub fn hold<T: Send + Sync + Unpin + 'static>(body: Body, held: T) -> Body {
    http_body_util::combinators::BoxBody::new(Held {
        inner: body,
        held: Some(held),
    })
}

impl<T: Unpin> HttpBody for Held<T> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.held = None,
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.held = None,
            _ => {}
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

/// The `grpc-timeout` request header as a duration (gRPC over HTTP/2: 1–8 digits and a unit of
/// `H`, `M`, `S`, `m`, `u` or `n`; sub-millisecond values round up to whole milliseconds, as
/// Envoy's `Grpc::Common::getGrpcTimeout` does). `None` when absent or malformed.
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(&GRPC_TIMEOUT)?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let ms_ceil = |nanos: u64| Duration::from_millis(nanos.div_ceil(1_000_000));
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => ms_ceil(n * 1000),
        "n" => ms_ceil(n),
        _ => return None,
    })
}

/// `t` as a `grpc-timeout` value in the smallest unit that fits 8 digits (Envoy's
/// `toGrpcTimeout`: milliseconds, then seconds, minutes, hours; clipped at 99999999H).
pub fn grpc_timeout_value(t: Duration) -> HeaderValue {
    let mut n = u64::try_from(t.as_millis()).unwrap_or(u64::MAX);
    let units = [b'm', b'S', b'M', b'H'];
    let mut unit = 0;
    if n > MAX_GRPC_TIMEOUT_VALUE {
        n /= 1000;
        unit = 1;
    }
    while n > MAX_GRPC_TIMEOUT_VALUE {
        if unit == units.len() - 1 {
            n = MAX_GRPC_TIMEOUT_VALUE;
        } else {
            n /= 60;
            unit += 1;
        }
    }
    let mut s = n.to_string();
    s.push(char::from(units[unit]));
    HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static("0m"))
}

/// The router's timeouts for one request (`None`: no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RouteTimeouts {
    /// The route (global) timeout, from the request's end to the response's end.
    pub global: Option<Duration>,
    /// `per_try_timeout`: each attempt's wait for response headers.
    pub per_try: Option<Duration>,
    /// `per_try_idle_timeout`: each attempt's longest silence, body included.
    pub per_try_idle: Option<Duration>,
}

/// The route's settings that decide its timeouts.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteTimeoutConfig {
    /// `timeout` (`None`: Envoy's 15 s; zero: none).
    pub timeout: Option<Duration>,
    /// Whether the route sets `max_stream_duration` (Envoy's "new timeouts": the route
    /// `timeout` and the legacy gRPC fields no longer apply).
    pub new_timeouts: bool,
    /// `max_grpc_timeout` (legacy).
    pub max_grpc_timeout: Option<Duration>,
    /// `grpc_timeout_offset` (legacy).
    pub grpc_timeout_offset: Option<Duration>,
    /// The retry policy's `per_try_timeout`.
    pub per_try_timeout: Option<Duration>,
    /// The retry policy's `per_try_idle_timeout`.
    pub per_try_idle_timeout: Option<Duration>,
}

/// Envoy's route timeout when the route sets none.
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);

// Parsed names: a `&str` key is parsed (lower-cased, validated, hashed) on every lookup.
/// `x-envoy-expected-rq-timeout-ms`.
const EXPECTED_RQ_TIMEOUT: HeaderName = HeaderName::from_static("x-envoy-expected-rq-timeout-ms");
/// `x-envoy-upstream-rq-timeout-ms`.
const UPSTREAM_RQ_TIMEOUT: HeaderName = HeaderName::from_static("x-envoy-upstream-rq-timeout-ms");
/// `x-envoy-upstream-rq-per-try-timeout-ms`.
const PER_TRY_TIMEOUT: HeaderName =
    HeaderName::from_static("x-envoy-upstream-rq-per-try-timeout-ms");
/// `grpc-timeout`.
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// Envoy's `FilterUtility::finalTimeout`: the route's timeouts for one request, from the route,
/// the `grpc-timeout` header (legacy `max_grpc_timeout`), and the `x-envoy-upstream-rq-timeout-ms`
/// / `x-envoy-upstream-rq-per-try-timeout-ms` headers (consumed here; an external client's were
/// already stripped) or, with `respect_expected`, `x-envoy-expected-rq-timeout-ms`. Then, unless
/// `suppress_envoy_headers`, the upstream request gets `x-envoy-expected-rq-timeout-ms`, and a
/// gRPC request under the legacy fields gets its `grpc-timeout` rewritten to the expected timeout.
pub fn route_timeouts(
    cfg: &RouteTimeoutConfig,
    headers: &mut HeaderMap,
    grpc: bool,
    insert_expected: bool,
    respect_expected: bool,
) -> RouteTimeouts {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    // Milliseconds; 0 is "no limit", as in Envoy.
    let mut global: u64 = 0;
    if !cfg.new_timeouts {
        match cfg.max_grpc_timeout {
            Some(max) if grpc => {
                let mut t = grpc_timeout(headers).map_or(0, ms);
                if let Some(offset) = cfg.grpc_timeout_offset.map(ms)
                    && offset < t
                {
                    t -= offset;
                }
                let max = ms(max);
                if max != 0 && (t == 0 || t > max) {
                    t = max;
                }
                global = t;
            }
            _ => global = ms(cfg.timeout.unwrap_or(DEFAULT_ROUTE_TIMEOUT)),
        }
    }
    let header_ms = |headers: &HeaderMap, name: &HeaderName| -> Option<u64> {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    // The timeout headers are all `x-envoy-*`: one pass over the names (a request has few)
    // spares hashing three long names for lookups that nearly always miss.
    let has_envoy = headers.keys().any(|n| n.as_str().starts_with("x-envoy-"));
    if has_envoy {
        if respect_expected && headers.contains_key(&EXPECTED_RQ_TIMEOUT) {
            if let Some(t) = header_ms(headers, &EXPECTED_RQ_TIMEOUT) {
                global = t;
            }
        } else if headers.contains_key(&UPSTREAM_RQ_TIMEOUT) {
            if let Some(t) = header_ms(headers, &UPSTREAM_RQ_TIMEOUT) {
                global = t;
            }
            headers.remove(&UPSTREAM_RQ_TIMEOUT);
        }
    }
    let mut per_try = cfg.per_try_timeout.map_or(0, ms);
    if has_envoy && headers.contains_key(&PER_TRY_TIMEOUT) {
        if let Some(t) = header_ms(headers, &PER_TRY_TIMEOUT) {
            per_try = t;
        }
        headers.remove(&PER_TRY_TIMEOUT);
    }
    if per_try >= global && global != 0 {
        per_try = 0;
    }
    // The timeout the upstream may count on (`setTimeoutHeaders` with nothing elapsed yet).
    let expected_ms = if per_try == 0 { global } else { per_try };
    if expected_ms > 0 {
        if insert_expected {
            headers.insert(EXPECTED_RQ_TIMEOUT, HeaderValue::from(expected_ms));
        }
        if grpc && !cfg.new_timeouts && cfg.max_grpc_timeout.is_some() {
            headers.insert(
                GRPC_TIMEOUT,
                grpc_timeout_value(Duration::from_millis(expected_ms)),
            );
        }
    }
    let nonzero = |t: u64| (t != 0).then(|| Duration::from_millis(t));
    RouteTimeouts {
        global: nonzero(global),
        per_try: nonzero(per_try),
        per_try_idle: cfg.per_try_idle_timeout.filter(|d| !d.is_zero()),
    }
}

/// A route's `max_stream_duration` settings, as they decide a stream's duration limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamDurationConfig {
    /// The route sets `max_stream_duration` at all.
    pub present: bool,
    /// `max_stream_duration.max_stream_duration`.
    pub max: Option<Duration>,
    /// `grpc_timeout_header_max`.
    pub grpc_timeout_header_max: Option<Duration>,
    /// `grpc_timeout_header_offset`.
    pub grpc_timeout_header_offset: Option<Duration>,
}

/// Envoy's `refreshDurationTimeout`: the stream's duration limit (`None`: none) from the route's
/// `max_stream_duration` (zero disables the HCM's), the HCM's `max_stream_duration`, or — with
/// `grpc_timeout_header_max` set — the request's `grpc-timeout` (capped unless the cap is zero,
/// less the offset). With the route's "new timeouts" a gRPC request's `grpc-timeout` is rewritten
/// to the limit in force.
pub fn stream_duration(
    route: &StreamDurationConfig,
    hcm: Option<Duration>,
    headers: &mut HeaderMap,
    grpc: bool,
) -> Option<Duration> {
    let header = grpc_timeout(headers);
    let limit = match (header, route.grpc_timeout_header_max) {
        (Some(mut t), Some(cap)) => {
            if !cap.is_zero() && t > cap {
                t = cap;
            }
            if !t.is_zero()
                && let Some(offset) = route.grpc_timeout_header_offset
            {
                t = t.saturating_sub(offset);
            }
            // Zero here is an immediate expiry (Envoy arms the timer with 0), not "none".
            Some(t)
        }
        _ => match route.max {
            Some(m) if m.is_zero() => None,
            Some(m) => Some(m),
            None => hcm.filter(|d| !d.is_zero()),
        },
    };
    if route.present && grpc {
        match limit {
            Some(t) => {
                headers.insert(GRPC_TIMEOUT, grpc_timeout_value(t));
            }
            None => {
                headers.remove(&GRPC_TIMEOUT);
            }
        }
    }
    limit
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn grpc_timeout_parses_every_unit_and_rejects_malformed_values() {
        let t = |v: &str| grpc_timeout(&headers(&[("grpc-timeout", v)]));
        assert_eq!(t("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(t("3M"), Some(Duration::from_secs(180)));
        assert_eq!(t("5S"), Some(Duration::from_secs(5)));
        assert_eq!(t("250m"), Some(Duration::from_millis(250)));
        assert_eq!(t("1500u"), Some(Duration::from_millis(2)));
        assert_eq!(t("1n"), Some(Duration::from_millis(1)));
        assert_eq!(t("0m"), Some(Duration::ZERO));
        assert_eq!(t("99999999S"), Some(Duration::from_secs(99_999_999)));
        for bad in ["", "S", "5", "5s", "123456789m", "-1S", "1.5S", "+1S"] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
    }

    #[test]
    fn grpc_timeout_values_use_the_smallest_unit_that_fits() {
        let v = |d: Duration| grpc_timeout_value(d).to_str().expect("ascii").to_owned();
        assert_eq!(v(Duration::from_millis(1500)), "1500m");
        assert_eq!(v(Duration::from_millis(99_999_999)), "99999999m");
        assert_eq!(v(Duration::from_millis(100_000_000)), "100000S");
        assert_eq!(v(Duration::from_secs(100_000_000)), "1666666M");
        assert_eq!(v(Duration::from_secs(u64::MAX / 4)), "99999999H");
    }

    fn cfg() -> RouteTimeoutConfig {
        RouteTimeoutConfig::default()
    }

    #[test]
    fn route_timeout_defaults_to_15s_and_zero_disables() {
        let mut h = HeaderMap::new();
        let t = route_timeouts(&cfg(), &mut h, false, true, false);
        assert_eq!(t.global, Some(Duration::from_secs(15)));
        assert_eq!(
            h.get("x-envoy-expected-rq-timeout-ms")
                .and_then(|v| v.to_str().ok()),
            Some("15000")
        );
        let mut h = HeaderMap::new();
        let zero = RouteTimeoutConfig {
            timeout: Some(Duration::ZERO),
            ..cfg()
        };
        let t = route_timeouts(&zero, &mut h, false, true, false);
        assert_eq!(t, RouteTimeouts::default());
        assert!(h.is_empty(), "no expected timeout for an unlimited request");
    }

    #[test]
    fn istio_max_grpc_timeout_zero_honours_the_grpc_timeout_header_uncapped() {
        // istiod: `timeout: 0s, max_grpc_timeout: 0s`.
        let istio = RouteTimeoutConfig {
            timeout: Some(Duration::ZERO),
            max_grpc_timeout: Some(Duration::ZERO),
            ..cfg()
        };
        let mut h = headers(&[("grpc-timeout", "2S")]);
        let t = route_timeouts(&istio, &mut h, true, true, false);
        assert_eq!(t.global, Some(Duration::from_secs(2)));
        assert_eq!(
            h.get("grpc-timeout").and_then(|v| v.to_str().ok()),
            Some("2000m")
        );
        // No header: no limit.
        let mut h = HeaderMap::new();
        assert_eq!(
            route_timeouts(&istio, &mut h, true, true, false).global,
            None
        );
        // Not gRPC: the route timeout (none).
        let mut h = headers(&[("grpc-timeout", "2S")]);
        assert_eq!(
            route_timeouts(&istio, &mut h, false, true, false).global,
            None
        );
    }

    #[test]
    fn max_grpc_timeout_caps_and_offset_subtracts() {
        let c = RouteTimeoutConfig {
            max_grpc_timeout: Some(Duration::from_secs(10)),
            grpc_timeout_offset: Some(Duration::from_millis(500)),
            ..cfg()
        };
        let run = |v: Option<&str>| {
            let mut h = v.map_or_else(HeaderMap::new, |v| headers(&[("grpc-timeout", v)]));
            route_timeouts(&c, &mut h, true, false, false).global
        };
        assert_eq!(run(Some("2S")), Some(Duration::from_millis(1500)));
        assert_eq!(run(Some("1M")), Some(Duration::from_secs(10)));
        assert_eq!(run(None), Some(Duration::from_secs(10)), "absent: the cap");
        // An offset at least the header's value is not applied (it would mean "no limit").
        assert_eq!(run(Some("400m")), Some(Duration::from_millis(400)));
    }

    #[test]
    fn new_timeouts_ignore_the_route_timeout_and_legacy_grpc_fields() {
        let c = RouteTimeoutConfig {
            timeout: Some(Duration::from_secs(3)),
            new_timeouts: true,
            max_grpc_timeout: Some(Duration::ZERO),
            ..cfg()
        };
        let mut h = headers(&[("grpc-timeout", "2S")]);
        assert_eq!(route_timeouts(&c, &mut h, true, true, false).global, None);
    }

    #[test]
    fn envoy_timeout_headers_override_and_are_consumed() {
        let mut h = headers(&[
            ("x-envoy-upstream-rq-timeout-ms", "250"),
            ("x-envoy-upstream-rq-per-try-timeout-ms", "100"),
        ]);
        let t = route_timeouts(&cfg(), &mut h, false, true, false);
        assert_eq!(t.global, Some(Duration::from_millis(250)));
        assert_eq!(t.per_try, Some(Duration::from_millis(100)));
        assert!(!h.contains_key("x-envoy-upstream-rq-timeout-ms"));
        assert!(!h.contains_key("x-envoy-upstream-rq-per-try-timeout-ms"));
        assert_eq!(
            h.get("x-envoy-expected-rq-timeout-ms")
                .and_then(|v| v.to_str().ok()),
            Some("100")
        );
        // respect_expected_rq_timeout: the upstream Envoy's expectation wins.
        let mut h = headers(&[
            ("x-envoy-expected-rq-timeout-ms", "700"),
            ("x-envoy-upstream-rq-timeout-ms", "250"),
        ]);
        let t = route_timeouts(&cfg(), &mut h, false, false, true);
        assert_eq!(t.global, Some(Duration::from_millis(700)));
        // A malformed value is ignored (and still consumed).
        let mut h = headers(&[("x-envoy-upstream-rq-timeout-ms", "soon")]);
        let t = route_timeouts(&cfg(), &mut h, false, false, false);
        assert_eq!(t.global, Some(Duration::from_secs(15)));
        assert!(h.is_empty());
    }

    #[test]
    fn per_try_at_least_the_global_timeout_is_ignored() {
        let c = RouteTimeoutConfig {
            timeout: Some(Duration::from_secs(1)),
            per_try_timeout: Some(Duration::from_secs(2)),
            per_try_idle_timeout: Some(Duration::ZERO),
            ..cfg()
        };
        let t = route_timeouts(&c, &mut HeaderMap::new(), false, false, false);
        assert_eq!(t.per_try, None);
        assert_eq!(t.per_try_idle, None, "zero is none");
        let c = RouteTimeoutConfig {
            timeout: Some(Duration::ZERO),
            per_try_timeout: Some(Duration::from_secs(2)),
            ..cfg()
        };
        let t = route_timeouts(&c, &mut HeaderMap::new(), false, false, false);
        assert_eq!(t.per_try, Some(Duration::from_secs(2)), "no global limit");
    }

    #[test]
    fn stream_duration_route_overrides_hcm_and_grpc_header_needs_header_max() {
        let hcm = Some(Duration::from_secs(30));
        let none = StreamDurationConfig::default();
        let mut h = headers(&[("grpc-timeout", "1S")]);
        assert_eq!(stream_duration(&none, hcm, &mut h, true), hcm);
        assert_eq!(
            h.get("grpc-timeout").and_then(|v| v.to_str().ok()),
            Some("1S"),
            "untouched without the route's max_stream_duration"
        );
        let zero = StreamDurationConfig {
            present: true,
            max: Some(Duration::ZERO),
            ..none
        };
        assert_eq!(
            stream_duration(&zero, hcm, &mut HeaderMap::new(), false),
            None
        );
        let header = StreamDurationConfig {
            present: true,
            max: Some(Duration::from_secs(60)),
            grpc_timeout_header_max: Some(Duration::ZERO),
            grpc_timeout_header_offset: Some(Duration::from_millis(100)),
        };
        let mut h = headers(&[("grpc-timeout", "1S")]);
        assert_eq!(
            stream_duration(&header, hcm, &mut h, true),
            Some(Duration::from_millis(900))
        );
        assert_eq!(
            h.get("grpc-timeout").and_then(|v| v.to_str().ok()),
            Some("900m")
        );
        // Without the header: the route's max.
        assert_eq!(
            stream_duration(&header, hcm, &mut HeaderMap::new(), true),
            Some(Duration::from_secs(60))
        );
        let capped = StreamDurationConfig {
            grpc_timeout_header_max: Some(Duration::from_millis(300)),
            grpc_timeout_header_offset: None,
            ..header
        };
        let mut h = headers(&[("grpc-timeout", "1S")]);
        assert_eq!(
            stream_duration(&capped, hcm, &mut h, true),
            Some(Duration::from_millis(300))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timer_moves_with_activity_and_fires_after_silence() {
        let a = Activity::new();
        let start = a.started();
        let mut w = Watch::new(a.clone()).idle(Duration::from_secs(10), start, Expired::StreamIdle);
        // Activity every 6 s keeps it alive for 30 s.
        let keep = {
            let a = a.clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    tokio::time::sleep(Duration::from_secs(6)).await;
                    a.touch();
                }
            })
        };
        assert_eq!(w.expired().await, Expired::StreamIdle);
        let fired = Instant::now().duration_since(start);
        assert_eq!(
            fired,
            Duration::from_secs(40),
            "10 s after the last touch at 30 s"
        );
        keep.await.expect("joined");
    }

    #[tokio::test(start_paused = true)]
    async fn route_timer_starts_at_request_end_and_request_timer_stops_there() {
        let a = Activity::new();
        let start = a.started();
        let mut w = Watch::new(a.clone())
            .after_request(Duration::from_secs(5), start, false, Expired::Route)
            .request_by(start + Duration::from_secs(3));
        let ender = {
            let a = a.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                a.end_request();
            })
        };
        assert_eq!(w.expired().await, Expired::Route);
        assert_eq!(Instant::now().duration_since(start), Duration::from_secs(7));
        ender.await.expect("joined");
        // Without the end, the request timer fires at its deadline.
        let a = Activity::new();
        let start = a.started();
        let mut w = Watch::new(a.clone())
            .after_request(Duration::from_secs(1), start, false, Expired::Route)
            .request_by(start + Duration::from_secs(3));
        assert_eq!(w.expired().await, Expired::Request);
    }

    #[tokio::test(start_paused = true)]
    async fn per_try_timer_is_disarmed_by_the_response() {
        let a = Activity::new();
        a.end_request();
        let start = a.started();
        let mut w = Watch::new(a.clone())
            .after_request(Duration::from_secs(1), start, true, Expired::PerTry)
            .at(start + Duration::from_secs(4), Expired::UpstreamDuration);
        a.start_response();
        assert_eq!(w.expired().await, Expired::UpstreamDuration);
        assert_eq!(Instant::now().duration_since(start), Duration::from_secs(4));
    }

    #[tokio::test(start_paused = true)]
    async fn an_upgrade_route_timer_ignores_the_request_and_stops_at_the_response() {
        // The handshake took too long: fires at its deadline though the request never ended.
        let a = Activity::new();
        let start = a.started();
        let mut w = Watch::new(a.clone())
            .response_by(start + Duration::from_secs(2), Expired::Route)
            .at(start + Duration::from_secs(9), Expired::UpstreamDuration);
        assert_eq!(w.expired().await, Expired::Route);
        assert_eq!(Instant::now().duration_since(start), Duration::from_secs(2));
        // The 101 came in time: only the duration cap is left.
        let a = Activity::new();
        let start = a.started();
        let mut w = Watch::new(a.clone())
            .response_by(start + Duration::from_secs(2), Expired::Route)
            .at(start + Duration::from_secs(9), Expired::UpstreamDuration);
        let switched = {
            let a = a.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                a.start_response();
            })
        };
        assert_eq!(w.expired().await, Expired::UpstreamDuration);
        assert_eq!(Instant::now().duration_since(start), Duration::from_secs(9));
        switched.await.expect("joined");
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_without_timers_never_fires() {
        let mut w = Watch::new(Activity::new());
        assert!(w.is_empty());
        let r = tokio::time::timeout(Duration::from_secs(3600), w.expired()).await;
        assert!(r.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn timed_body_streams_while_active_and_fails_when_silent() {
        let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let body: Body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(rx));
        let a = Activity::new();
        let start = a.started();
        let w = Watch::new(a.clone()).idle(Duration::from_secs(2), start, Expired::StreamIdle);
        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        let mut body = TimedBody::wrap(
            body,
            w,
            true,
            Some(Box::new(move |k| {
                assert_eq!(k, Expired::StreamIdle);
                f.store(true, Ordering::SeqCst);
            })),
        );
        let sender = tokio::spawn(async move {
            use futures::SinkExt as _;
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if tx
                    .send(Ok(Frame::data(Bytes::from_static(b"x"))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            // Then silence (the sender stays open).
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        let mut frames = 0;
        let err = loop {
            match http_body_util::BodyExt::frame(&mut body).await {
                Some(Ok(_)) => frames += 1,
                Some(Err(e)) => break e,
                None => panic!("body ended"),
            }
        };
        assert_eq!(frames, 10, "a steady stream outlives the idle timeout");
        assert_eq!(err.downcast_ref::<Expired>(), Some(&Expired::StreamIdle));
        assert!(fired.load(Ordering::SeqCst));
        assert_eq!(
            Instant::now().duration_since(start),
            Duration::from_secs(12)
        );
        sender.abort();
    }

    #[tokio::test]
    async fn a_busy_tunnel_still_ends_at_its_deadline() {
        use tokio::io::AsyncReadExt as _;
        let a = Activity::new();
        let deadline = a.started() + Duration::from_millis(200);
        // Reads that never wait.
        let mut io = WatchedIo::new(
            tokio::io::repeat(7),
            Watch::new(a.clone()).at(deadline, Expired::StreamDuration),
            None,
        );
        let mut buf = [0u8; 256];
        let err = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Err(e) = io.read(&mut buf).await {
                    break e;
                }
            }
        })
        .await
        .expect("ended within the bound");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(io.expired(), Some(Expired::StreamDuration));
        assert!(Instant::now() >= deadline);
        assert!(a.last() > a.started(), "reads counted as activity");
    }

    #[tokio::test(start_paused = true)]
    async fn connection_idle_follows_streams_that_come_and_go() {
        let c = ConnActivity::new();
        let start = Instant::now();
        let busy = c.clone();
        // A half-second stream every second for 25 s: the connection is never idle for 10 s
        // until 10 s after the last one ends (24.5 s).
        let streams = tokio::spawn(async move {
            for _ in 0..25 {
                let guard = busy.stream();
                tokio::time::sleep(Duration::from_millis(500)).await;
                drop(guard);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        c.idle_for(Duration::from_secs(10)).await;
        assert_eq!(
            Instant::now().duration_since(start),
            Duration::from_millis(34_500)
        );
        streams.await.expect("joined");
    }

    #[tokio::test(start_paused = true)]
    async fn zero_idle_resolves_when_the_last_stream_ends() {
        let c = ConnActivity::new();
        let (first, second) = (c.stream(), c.stream());
        let start = Instant::now();
        let holder = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            drop(first);
            tokio::time::sleep(Duration::from_secs(4)).await;
            drop(second);
        });
        c.idle_for(Duration::ZERO).await;
        assert_eq!(Instant::now().duration_since(start), Duration::from_secs(7));
        assert_eq!(c.active(), 0);
        holder.await.expect("joined");
        // No stream: at once.
        c.idle_for(Duration::ZERO).await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_timeout_too_long_for_a_deadline_never_fires() {
        let c = ConnActivity::new();
        let fired = tokio::time::timeout(
            Duration::from_secs(3600),
            c.idle_for(Duration::from_secs(u64::MAX)),
        )
        .await;
        assert!(fired.is_err(), "an unrepresentable deadline is never");
    }

    #[tokio::test]
    async fn a_watchdog_stops_with_its_handle() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let dog = Watchdog::spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        drop(dog);
        // The task was aborted: its sender is dropped, so the receiver ends.
        assert!(
            tokio::time::timeout(Duration::from_secs(10), rx)
                .await
                .expect("within the bound")
                .is_err()
        );
        assert_eq!(Watchdog::spawn(async { 7 }).await, Some(7));
    }

    #[tokio::test(start_paused = true)]
    async fn connection_idle_counts_from_the_last_stream() {
        let c = ConnActivity::new();
        let start = Instant::now();
        let guard = c.stream();
        let holder = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(25)).await;
            drop(guard);
        });
        c.idle_for(Duration::from_secs(10)).await;
        assert_eq!(
            Instant::now().duration_since(start),
            Duration::from_secs(35)
        );
        holder.await.expect("joined");
        assert_eq!(c.active(), 0);
    }
}
