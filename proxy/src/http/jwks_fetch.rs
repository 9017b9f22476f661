//! `JwtProvider.remote_jwks`: a provider's JWKS fetched from a cluster, as Envoy's jwt_authn does
//! (`jwks_cache.cc`, `jwks_async_fetcher.cc`, `common/jwks_fetcher.cc`):
//!
//! * the fetch is a `GET http_uri.uri` through `http_uri.cluster` — its load balancer, pools,
//!   circuit breakers and transport socket (TLS included), like the router's requests; a cluster
//!   that does not exist when the fetch starts fails it;
//! * only a `200` with a body that parses into a JWKS with at least one usable key succeeds; any
//!   other status, an empty or oversized body ([`MAX_JWKS_BYTES`]), a transport error or the
//!   `http_uri.timeout` (over all attempts; 0: none) fails it. A failed fetch fails the tokens
//!   that needed it with `Jwks remote fetch is failed` (401) and keeps nothing;
//! * without `async_fetch` the first request that needs the keys fetches them and waits; the keys
//!   are then used until `cache_duration` (default 600 s) has passed since the fetch;
//! * with `async_fetch` the fetch starts when the config is installed, and is repeated
//!   `cache_duration` − 5 s after each success and `failed_refetch_duration` (default 1 s) after
//!   each failure; keys it fetched stay in use until the next success replaces them. Until the
//!   first success, requests fetch on demand as without it;
//! * `retry_policy`: Envoy turns it into a router retry policy on
//!   `5xx,gateway-error,connect-failure,reset` with `num_retries` (default 1), a fully jittered
//!   exponential back-off (`retry_back_off`, default 1 s base and 10× that as the maximum) and a
//!   per-try timeout of the back-off's maximum;
//! * requests that need the keys while a fetch is running wait for that fetch (one fetch per
//!   provider at a time, not one per request as in Envoy's per-worker caches), bounded by its
//!   timeout; the fetch runs on its own task, so a waiting request that goes away does not cancel
//!   it for the others;
//! * `jwks_fetch_success` / `jwks_fetch_failed` of the filter count fetches.
//!
//! A compiled provider holds a [`RemoteJwks`] handle whose keys are filled asynchronously; the
//! config compiler never waits for the network. The handle learns how to reach clusters
//! ([`Source`]) and which counters to bump when the data plane binds it
//! ([`RemoteJwks::bind`]), on the first request or when its listener is published
//! ([`bind_snapshot`]), which also starts the `async_fetch` refresher.

use std::{
    fmt,
    sync::{Arc, Mutex, MutexGuard, OnceLock, Weak},
    time::Duration,
};

use futures::future::BoxFuture;
use http::{HeaderValue, Request, StatusCode, Uri, Version, header};
use http_body_util::BodyExt as _;
use tokio::{
    sync::{oneshot, watch},
    time::Instant,
};

use super::{
    jwt::{Jwks, JwtStats},
    retry, router,
};
use crate::{
    config::{
        Snapshot,
        filters::{NetworkFilterKind, http::HttpFilterKind, jwt::JwksSource},
        route::RetryPolicy,
    },
    dataplane::DataPlane,
    flags::ProxyError,
    listener::conn::{Addr, ConnContext},
    upstream::{connect::Origin, pool::Proto},
};

/// Envoy's default `cache_duration`.
pub const DEFAULT_CACHE_DURATION: Duration = Duration::from_secs(600);
/// With `async_fetch`, keys are refetched this long before `cache_duration` ends (Envoy's
/// `RefetchBeforeExpiredSec`), so requests never find them expired.
pub const REFETCH_BEFORE_EXPIRY: Duration = Duration::from_secs(5);
/// Envoy's default `async_fetch.failed_refetch_duration`.
pub const DEFAULT_FAILED_REFETCH: Duration = Duration::from_secs(1);
/// The largest JWKS body accepted. Envoy buffers the whole response of its async client; a JWKS
/// is a few KiB, so a bound this size only stops a broken or hostile server from filling memory.
pub const MAX_JWKS_BYTES: usize = 1 << 20;
/// The shortest pause between two background fetches: a zero `cache_duration` or
/// `failed_refetch_duration` must not turn the refresher into a busy loop.
const MIN_REFETCH_INTERVAL: Duration = Duration::from_millis(100);

/// `async_fetch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncFetch {
    /// `fast_listener`: Envoy activates the listener without waiting for the first fetch. We
    /// never hold a listener back; requests that need the keys wait for the fetch instead.
    pub fast_listener: bool,
    /// `failed_refetch_duration` (default 1 s).
    pub failed_refetch: Duration,
}

/// `retry_policy`, after Envoy's conversion to a router retry policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchRetry {
    /// `num_retries` (default 1).
    pub num_retries: u32,
    /// `retry_back_off.base_interval` (default 1 s).
    pub base: Duration,
    /// `retry_back_off.max_interval` (default 10 × base); also each attempt's timeout.
    pub max: Duration,
}

impl FetchRetry {
    /// The conditions Envoy's JWKS fetcher retries on, whatever the policy's `retry_on`.
    pub const RETRY_ON: [&'static str; 4] = ["5xx", "gateway-error", "connect-failure", "reset"];

    /// The router retry policy Envoy converts this into (`convertCoreToRouteRetryPolicy`).
    fn route_policy(&self) -> RetryPolicy {
        RetryPolicy {
            retry_on: Self::RETRY_ON.iter().map(|s| (*s).to_owned()).collect(),
            num_retries: self.num_retries,
            per_try_timeout: Some(self.max),
            per_try_idle_timeout: None,
            avoid_previous_hosts: false,
            host_selection_retry_max_attempts: 1,
            retry_priority: None,
            retriable_status_codes: Vec::new(),
            back_off: (self.base, self.max),
            retriable_headers: Vec::new(),
            retriable_request_headers: Vec::new(),
        }
    }
}

/// A compiled `remote_jwks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteJwksConfig {
    /// `http_uri.uri` (absolute, `http` or `https`).
    pub uri: Uri,
    /// `http_uri.cluster`.
    pub cluster: String,
    /// `http_uri.timeout` over the whole fetch, retries included (`None`: 0, no timeout).
    pub timeout: Option<Duration>,
    /// `cache_duration` (default 600 s).
    pub cache_duration: Duration,
    /// `async_fetch`.
    pub async_fetch: Option<AsyncFetch>,
    /// `retry_policy` (`None`: one attempt).
    pub retry: Option<FetchRetry>,
}

/// Why a fetch failed. Every variant fails the tokens that needed the keys in the same way
/// (`Jwks remote fetch is failed`); the text goes to the logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// `http_uri.cluster` is not in the configuration.
    #[error("cluster '{0}' is not configured")]
    UnknownCluster(String),
    /// No connection, a reset, no healthy host, an overflow...
    #[error("{0}")]
    Upstream(String),
    /// A status other than 200.
    #[error("response status {0}")]
    Status(u16),
    /// A 200 without a body.
    #[error("the response body is empty")]
    EmptyBody,
    /// The body is larger than [`MAX_JWKS_BYTES`] or could not be read.
    #[error("the response body could not be read: {0}")]
    Body(String),
    /// The body is not a JWKS with a usable key.
    #[error("invalid JWKS: {0}")]
    InvalidJwks(String),
    /// `http_uri.timeout` passed.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The handle was never bound to a data plane (a config used outside the proxy).
    #[error("no data plane to fetch with")]
    Unbound,
    /// The fetch task ended without reporting (the runtime is shutting down).
    #[error("the fetch was abandoned")]
    Abandoned,
}

/// What performs one fetch of a JWKS: the cluster path in the proxy, a stand-in in unit tests.
pub trait Source: Send + Sync + 'static {
    /// Fetches and parses the JWKS of `cfg` once (with its retries, without its overall
    /// timeout, which the caller applies).
    fn fetch(&self, cfg: Arc<RemoteJwksConfig>) -> BoxFuture<'static, Result<Jwks, FetchError>>;
}

/// A fetch's outcome as waiters receive it.
pub type Outcome = Result<Arc<Jwks>, FetchError>;

/// The cache of one provider.
#[derive(Default)]
struct State {
    /// The last fetched keys.
    keys: Option<Arc<Jwks>>,
    /// When they stop being used (`None`: until replaced, for keys the refresher fetched).
    expires: Option<Instant>,
    /// The fetch in progress: its outcome appears here.
    flight: Option<watch::Receiver<Option<Outcome>>>,
}

/// A provider's remote JWKS: the cache, the fetch in flight and, with `async_fetch`, the
/// background refresher.
pub struct RemoteJwks {
    cfg: Arc<RemoteJwksConfig>,
    state: Mutex<State>,
    source: OnceLock<Arc<dyn Source>>,
    stats: OnceLock<Arc<JwtStats>>,
    /// Dropped with the handle: the refresher then stops.
    refresher: OnceLock<oneshot::Sender<()>>,
}

impl fmt::Debug for RemoteJwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteJwks")
            .field("cfg", &self.cfg)
            .field("bound", &self.source.get().is_some())
            .finish_non_exhaustive()
    }
}

impl RemoteJwks {
    /// A handle with an empty cache.
    pub fn new(cfg: RemoteJwksConfig) -> Arc<RemoteJwks> {
        Arc::new(RemoteJwks {
            cfg: Arc::new(cfg),
            state: Mutex::new(State::default()),
            source: OnceLock::new(),
            stats: OnceLock::new(),
            refresher: OnceLock::new(),
        })
    }

    /// The compiled `remote_jwks`.
    pub fn config(&self) -> &RemoteJwksConfig {
        &self.cfg
    }

    // The critical sections never await and never panic; a poisoned lock still holds a
    // consistent state.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether [`RemoteJwks::bind`] ran.
    pub fn is_bound(&self) -> bool {
        self.source.get().is_some()
    }

    /// Gives the handle its way to fetch and its counters (the first call wins) and, with
    /// `async_fetch`, starts the refresher. Must run inside a Tokio runtime.
    pub fn bind(self: &Arc<Self>, source: Arc<dyn Source>, stats: Option<&Arc<JwtStats>>) {
        if let Some(s) = stats {
            let _ = self.stats.set(s.clone());
        }
        if self.source.set(source).is_err() {
            return;
        }
        if let Some(a) = self.cfg.async_fetch {
            self.start_refresher(a);
        }
    }

    /// The cached keys, unless they expired.
    pub fn fresh(&self) -> Option<Arc<Jwks>> {
        let st = self.lock();
        match (&st.keys, st.expires) {
            (Some(k), None) => Some(k.clone()),
            (Some(k), Some(at)) if Instant::now() < at => Some(k.clone()),
            _ => None,
        }
    }

    /// The keys: cached ones while fresh, else the outcome of a fetch — the one in flight, or
    /// a new one. Bounded by the fetch's timeout.
    pub async fn get(self: &Arc<Self>) -> Outcome {
        if let Some(k) = self.fresh() {
            return Ok(k);
        }
        let Some(rx) = self.join_or_start(false) else {
            return Err(FetchError::Unbound);
        };
        wait(rx).await
    }

    /// The fetch in flight, or a new one (`persistent`: its keys do not expire, for the
    /// refresher). `None` when the handle is unbound.
    fn join_or_start(
        self: &Arc<Self>,
        persistent: bool,
    ) -> Option<watch::Receiver<Option<Outcome>>> {
        let source = self.source.get()?.clone();
        let mut st = self.lock();
        if let Some(rx) = &st.flight {
            return Some(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        st.flight = Some(rx.clone());
        drop(st);
        let me = self.clone();
        tokio::spawn(async move { me.fly(source, tx, persistent).await });
        Some(rx)
    }

    /// Runs one fetch to its end and publishes it: the cache first, then the waiters.
    async fn fly(
        self: Arc<Self>,
        source: Arc<dyn Source>,
        tx: watch::Sender<Option<Outcome>>,
        persistent: bool,
    ) {
        let fetch = source.fetch(self.cfg.clone());
        let result = match self.cfg.timeout {
            Some(t) => tokio::time::timeout(t, fetch)
                .await
                .unwrap_or(Err(FetchError::Timeout(t))),
            None => fetch.await,
        };
        let outcome = result.map(Arc::new);
        {
            let mut st = self.lock();
            if let Ok(keys) = &outcome {
                st.keys = Some(keys.clone());
                st.expires = if persistent {
                    None
                } else {
                    Some(Instant::now() + self.cfg.cache_duration)
                };
            }
            st.flight = None;
        }
        match &outcome {
            Ok(k) => {
                tracing::debug!(target: "jwt", uri = %self.cfg.uri, keys = k.len(), "JWKS fetched");
                if let Some(s) = self.stats.get() {
                    s.jwks_fetch_success.inc();
                }
            }
            Err(e) => {
                tracing::warn!(target: "jwt", uri = %self.cfg.uri, cluster = %self.cfg.cluster, "JWKS fetch failed: {e}");
                if let Some(s) = self.stats.get() {
                    s.jwks_fetch_failed.inc();
                }
            }
        }
        tx.send_replace(Some(outcome));
    }

    /// Keys that `keys` still are become permanent (the refresher joined an on-demand fetch).
    fn keep(&self, keys: &Arc<Jwks>) {
        let mut st = self.lock();
        if st.keys.as_ref().is_some_and(|k| Arc::ptr_eq(k, keys)) {
            st.expires = None;
        }
    }

    fn start_refresher(self: &Arc<Self>, a: AsyncFetch) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(target: "jwt", uri = %self.cfg.uri, "no runtime: async_fetch not started");
            return;
        };
        let (stop_tx, stop) = oneshot::channel();
        if self.refresher.set(stop_tx).is_err() {
            return;
        }
        let good = self
            .cfg
            .cache_duration
            .checked_sub(REFETCH_BEFORE_EXPIRY)
            .filter(|d| !d.is_zero())
            .unwrap_or(self.cfg.cache_duration)
            .max(MIN_REFETCH_INTERVAL);
        let failed = a.failed_refetch.max(MIN_REFETCH_INTERVAL);
        runtime.spawn(refresh(Arc::downgrade(self), stop, good, failed));
    }
}

/// The `async_fetch` loop: fetch, then wait `good` after a success or `failed` after a failure;
/// ends when the handle is dropped.
async fn refresh(
    me: Weak<RemoteJwks>,
    mut stop: oneshot::Receiver<()>,
    good: Duration,
    failed: Duration,
) {
    loop {
        let Some(rx) = me.upgrade().and_then(|h| h.join_or_start(true)) else {
            return;
        };
        let outcome = tokio::select! {
            o = wait(rx) => o,
            _ = &mut stop => return,
        };
        let pause = match &outcome {
            Ok(keys) => {
                if let Some(h) = me.upgrade() {
                    h.keep(keys);
                }
                good
            }
            Err(_) => failed,
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = &mut stop => return,
        }
    }
}

async fn wait(mut rx: watch::Receiver<Option<Outcome>>) -> Outcome {
    match rx.wait_for(Option::is_some).await {
        Ok(o) => o.clone().unwrap_or(Err(FetchError::Abandoned)),
        Err(_) => Err(FetchError::Abandoned),
    }
}

// ---------------------------------------------------------------------------------------------
// Fetching through a cluster

/// Fetches through the proxy's clusters.
pub struct ClusterSource(Weak<DataPlane>);

impl ClusterSource {
    /// A source over `dp` (weak: a refresher must not keep the data plane alive).
    pub fn shared(dp: &Arc<DataPlane>) -> Arc<dyn Source> {
        Arc::new(ClusterSource(Arc::downgrade(dp)))
    }
}

impl Source for ClusterSource {
    fn fetch(&self, cfg: Arc<RemoteJwksConfig>) -> BoxFuture<'static, Result<Jwks, FetchError>> {
        let dp = self.0.upgrade();
        Box::pin(async move {
            let dp = dp.ok_or(FetchError::Abandoned)?;
            fetch_with_retries(&dp, &cfg).await
        })
    }
}

/// The attempts of one fetch, with the retry policy's back-off between them.
async fn fetch_with_retries(
    dp: &Arc<DataPlane>,
    cfg: &RemoteJwksConfig,
) -> Result<Jwks, FetchError> {
    let policy = cfg.retry.map(|r| r.route_policy());
    let mut retries = 0;
    loop {
        let attempt = match &policy {
            Some(p) => {
                let per_try = p.per_try_timeout.unwrap_or(Duration::MAX);
                tokio::time::timeout(per_try, attempt(dp, cfg))
                    .await
                    .unwrap_or(Err(Attempt::Failed(ProxyError::Timeout)))
            }
            None => attempt(dp, cfg).await,
        };
        let again = match (&policy, &attempt) {
            (Some(p), Err(Attempt::Failed(e))) => retry::retriable_error(p, e, false),
            (Some(p), Err(Attempt::Status(s, headers))) => {
                retry::retriable_response(p, *s, headers)
            }
            _ => false,
        };
        match (policy.as_ref(), again) {
            (Some(p), true) if retries < p.num_retries => {
                retries += 1;
                let pause = retry::backoff(p, retries, rand::random());
                tracing::debug!(target: "jwt", uri = %cfg.uri, retries, "JWKS fetch retried in {pause:?}");
                tokio::time::sleep(pause).await;
            }
            _ => return attempt.map_err(Attempt::into_error).and_then(parse),
        }
    }
}

/// How one attempt ended short of a 200.
enum Attempt {
    /// The cluster does not exist.
    UnknownCluster(String),
    /// A transport failure.
    Failed(ProxyError),
    /// A non-200 response.
    Status(StatusCode, http::HeaderMap),
    /// A 200 whose body could not be read.
    Body(String),
}

impl Attempt {
    fn into_error(self) -> FetchError {
        match self {
            Attempt::UnknownCluster(c) => FetchError::UnknownCluster(c),
            Attempt::Failed(e) => FetchError::Upstream(e.to_string()),
            Attempt::Status(s, _) => FetchError::Status(s.as_u16()),
            Attempt::Body(e) => FetchError::Body(e),
        }
    }
}

/// One `GET` of the JWKS through the cluster; the body of a 200, read up to the bound.
async fn attempt(dp: &Arc<DataPlane>, cfg: &RemoteJwksConfig) -> Result<bytes::Bytes, Attempt> {
    let snapshot = dp.server.config.snapshot();
    let Some(rt) = dp.clusters.get(dp, &snapshot, &cfg.cluster) else {
        return Err(Attempt::UnknownCluster(cfg.cluster.clone()));
    };
    // No downstream connection: an ORIGINAL_DST cluster finds no destination, as in Envoy.
    let ctx = ConnContext::new(
        "jwt_authn",
        Addr::Internal("jwks_fetch".into()),
        Addr::Internal("jwks_fetch".into()),
        snapshot,
    );
    let target = router::pick_target(&rt, &ctx, None, &[], None).map_err(Attempt::Failed)?;
    let proto = rt.protocol(Version::HTTP_11);
    let request = build(cfg, proto).map_err(|e| Attempt::Failed(ProxyError::BadRequest(e)))?;
    let (response, active) =
        router::send_single(dp, &rt, &target, &Origin::default(), (proto, request))
            .await
            .map_err(Attempt::Failed)?;
    let (parts, body) = response.into_parts();
    if parts.status != StatusCode::OK {
        return Err(Attempt::Status(parts.status, parts.headers));
    }
    let body = read_bounded(body, MAX_JWKS_BYTES)
        .await
        .map_err(Attempt::Body)?;
    drop(active);
    Ok(body)
}

/// The whole body, or an error once it grows past `limit` bytes.
async fn read_bounded(mut body: super::Body, limit: usize) -> Result<bytes::Bytes, String> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(format!("larger than {limit} bytes"));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

/// The `GET` for the cluster's protocol: origin-form and `host` for HTTP/1.1, absolute for h2.
fn build(cfg: &RemoteJwksConfig, proto: Proto) -> Result<Request<super::Body>, String> {
    let authority = cfg
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .ok_or_else(|| format!("{}: no authority", cfg.uri))?;
    let pq = cfg.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut r = Request::new(super::empty());
    match proto {
        Proto::Http1 => {
            *r.uri_mut() = pq.parse::<Uri>().map_err(|e| e.to_string())?;
            *r.version_mut() = Version::HTTP_11;
            r.headers_mut().insert(
                header::HOST,
                HeaderValue::from_str(&authority).map_err(|e| e.to_string())?,
            );
        }
        Proto::Http2 => {
            *r.uri_mut() = cfg.uri.clone();
            *r.version_mut() = Version::HTTP_2;
        }
    }
    Ok(r)
}

/// A 200's body as a JWKS: jwt_verify_lib's `Jwks::createFrom` must find a usable key.
fn parse(body: bytes::Bytes) -> Result<Jwks, FetchError> {
    if body.is_empty() {
        return Err(FetchError::EmptyBody);
    }
    let text = std::str::from_utf8(&body)
        .map_err(|_| FetchError::InvalidJwks("the body is not UTF-8".into()))?;
    let jwks = Jwks::parse(text).map_err(|e| FetchError::InvalidJwks(e.to_string()))?;
    if jwks.is_empty() {
        return Err(FetchError::InvalidJwks(
            jwks.problem().unwrap_or("no usable key").to_owned(),
        ));
    }
    Ok(jwks)
}

/// Binds the remote JWKS handles of every jwt_authn filter in `snapshot`'s listeners to `dp`
/// (and their filters' counters), starting the `async_fetch` refreshers of new configs. Called
/// when listeners are published, so keys are fetched before requests need them.
pub fn bind_snapshot(dp: &Arc<DataPlane>, snapshot: &Snapshot) {
    let mut source: Option<Arc<dyn Source>> = None;
    for l in snapshot.listeners.values() {
        for chain in l
            .filter_chains
            .iter()
            .chain(l.default_filter_chain.as_ref())
        {
            for f in &chain.filters {
                let NetworkFilterKind::HttpConnectionManager(hcm) = &f.kind else {
                    continue;
                };
                for hf in &hcm.http_filters {
                    let HttpFilterKind::JwtAuthn(jwt) = &hf.kind else {
                        continue;
                    };
                    if !jwt.has_remote {
                        continue;
                    }
                    let stats = jwt.counters(&dp.server.stats, &hcm.stat_prefix);
                    for p in jwt.providers.values() {
                        if let JwksSource::Remote(r) = &p.jwks
                            && !r.is_bound()
                        {
                            let s = source.get_or_insert_with(|| ClusterSource::shared(dp));
                            r.bind(s.clone(), Some(stats));
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde_json::json;

    use super::*;

    /// A source that counts fetches and answers from a script, after `delay`.
    struct Fake {
        calls: AtomicUsize,
        delay: Duration,
        fail: std::sync::atomic::AtomicBool,
    }

    impl Fake {
        fn new(delay: Duration) -> Arc<Fake> {
            Arc::new(Fake {
                calls: AtomicUsize::new(0),
                delay,
                fail: std::sync::atomic::AtomicBool::new(false),
            })
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl Source for Fake {
        fn fetch(&self, _: Arc<RemoteJwksConfig>) -> BoxFuture<'static, Result<Jwks, FetchError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let (delay, fail) = (self.delay, self.fail.load(Ordering::SeqCst));
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                if fail {
                    return Err(FetchError::Status(503));
                }
                parse(
                    json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]})
                        .to_string()
                        .into(),
                )
            })
        }
    }

    fn cfg(cache: u64, async_fetch: Option<AsyncFetch>) -> RemoteJwksConfig {
        RemoteJwksConfig {
            uri: Uri::from_static("http://issuer.example/jwks"),
            cluster: "jwks".into(),
            timeout: Some(Duration::from_secs(5)),
            cache_duration: Duration::from_secs(cache),
            async_fetch,
            retry: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_share_one_fetch_and_the_cache_expires() {
        let fake = Fake::new(Duration::from_millis(200));
        let h = RemoteJwks::new(cfg(60, None));
        assert_eq!(h.get().await.err(), Some(FetchError::Unbound));
        h.bind(fake.clone(), None);
        let waiters: Vec<_> = (0..5)
            .map(|_| {
                let h = h.clone();
                tokio::spawn(async move { h.get().await })
            })
            .collect();
        for w in waiters {
            let keys = w.await.expect("joined").expect("keys");
            assert_eq!(keys.len(), 1);
        }
        assert_eq!(fake.calls(), 1, "one fetch for five waiters");
        assert!(h.get().await.is_ok());
        assert_eq!(fake.calls(), 1, "cached");
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(h.fresh().is_some(), "fresh before cache_duration");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(h.fresh().is_none(), "expired after cache_duration");
        assert!(h.get().await.is_ok());
        assert_eq!(fake.calls(), 2, "refetched after expiry");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_fetch_is_not_cached_and_waiters_see_it() {
        let fake = Fake::new(Duration::from_millis(10));
        fake.fail.store(true, Ordering::SeqCst);
        let h = RemoteJwks::new(cfg(60, None));
        h.bind(fake.clone(), None);
        let (a, b) = tokio::join!(h.get(), h.get());
        assert_eq!(a.err(), Some(FetchError::Status(503)));
        assert_eq!(b.err(), Some(FetchError::Status(503)));
        assert_eq!(fake.calls(), 1);
        fake.fail.store(false, Ordering::SeqCst);
        assert!(h.get().await.is_ok(), "the next request fetches again");
        assert_eq!(fake.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_fetch_is_bounded_by_the_timeout() {
        let fake = Fake::new(Duration::from_secs(30));
        let h = RemoteJwks::new(cfg(60, None));
        h.bind(fake, None);
        assert_eq!(
            h.get().await.err(),
            Some(FetchError::Timeout(Duration::from_secs(5)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn async_fetch_fetches_at_bind_and_refreshes_before_expiry() {
        let fake = Fake::new(Duration::from_millis(10));
        let h = RemoteJwks::new(cfg(
            60,
            Some(AsyncFetch {
                fast_listener: false,
                failed_refetch: Duration::from_secs(1),
            }),
        ));
        h.bind(fake.clone(), None);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(fake.calls(), 1, "fetched without a request");
        assert!(h.fresh().is_some());
        // Refetched at cache_duration - 5 s; keys never expire in between.
        tokio::time::sleep(Duration::from_secs(54)).await;
        assert_eq!(fake.calls(), 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(fake.calls(), 2);
        // A failing refresh keeps the keys and retries after failed_refetch_duration.
        fake.fail.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(54_500)).await;
        assert_eq!(fake.calls(), 3);
        assert!(h.fresh().is_some(), "old keys kept");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(fake.calls(), 4, "retried after 1 s");
        // Dropping the handle stops the refresher.
        drop(h);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(fake.calls(), 4);
    }

    #[test]
    fn retry_policy_converts_like_envoy() {
        let p = FetchRetry {
            num_retries: 3,
            base: Duration::from_millis(10),
            max: Duration::from_millis(100),
        }
        .route_policy();
        assert_eq!(
            p.retry_on,
            ["5xx", "gateway-error", "connect-failure", "reset"]
        );
        assert_eq!(p.per_try_timeout, Some(Duration::from_millis(100)));
        assert!(retry::retriable_response(
            &p,
            StatusCode::SERVICE_UNAVAILABLE,
            &http::HeaderMap::new()
        ));
        assert!(!retry::retriable_response(
            &p,
            StatusCode::NOT_FOUND,
            &http::HeaderMap::new()
        ));
        assert!(retry::retriable_error(
            &p,
            &ProxyError::ConnectFailure("x".into()),
            false
        ));
    }

    #[test]
    fn bodies_that_are_not_a_usable_jwks_fail() {
        assert_eq!(
            parse(bytes::Bytes::new()).err(),
            Some(FetchError::EmptyBody)
        );
        assert!(matches!(
            parse(bytes::Bytes::from_static(b"not json")),
            Err(FetchError::InvalidJwks(_))
        ));
        assert!(matches!(
            parse(bytes::Bytes::from_static(b"{\"keys\": []}")),
            Err(FetchError::InvalidJwks(_))
        ));
    }
}
