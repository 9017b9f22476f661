//! The listener manager: binds LDS socket listeners (a listener whose address cannot be bound is
//! NACKed, as Envoy does), runs their accept loops, and opens in-process connections to internal
//! listeners (`main_internal`, `connect_originate`). Each connection then goes through the same
//! pipeline: listener filters → filter chain → transport socket → network filters.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpSocket},
    sync::watch,
};

use super::{
    chain::{self, Selector},
    conn::{Addr, BoxIo, ConnContext, ConnValues, Seed, TlsInfo, apply_set_filter_state},
    inspect,
};
use crate::{
    config::{
        ListenerHooks, Snapshot,
        filters::{ListenerFilterKind, NetworkFilterKind},
        listener::{Bind, FilterChain, Listener},
        tls::TransportSocket,
    },
    dataplane::DataPlane,
    flags::ProxyError,
    stats::Stat,
    xds::warming::{needed_secrets, pending},
};
use waypoint_proto::envoy::config::listener::v3::FilterChain as RawFilterChain;

/// Filter state keys the `original_dst` listener filter reads on internal listeners.
pub const ORIGINAL_DST_LOCAL_KEY: &str = "envoy.filters.listener.original_dst.local_ip";
/// See [`ORIGINAL_DST_LOCAL_KEY`].
pub const ORIGINAL_DST_REMOTE_KEY: &str = "envoy.filters.listener.original_dst.remote_ip";
/// The metadata namespace `original_dst` reads (`local`) on internal listeners.
pub const ORIGINAL_DST_NAMESPACE: &str = "envoy.filters.listener.original_dst";

/// Buffer of an in-process connection, each way.
const INTERNAL_BUFFER: usize = 64 * 1024;
/// Pause after a failed `accept` (EMFILE and friends) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(20);
/// Listen backlog (what `std::net::TcpListener::bind` uses).
const LISTEN_BACKLOG: u32 = 128;

struct Active {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
}

#[derive(Default)]
struct Inner {
    active: HashMap<String, Active>,
    /// Bound but not listening (Envoy listens once a listener is active): until the listener is
    /// published, or while it warms.
    prebound: HashMap<SocketAddr, TcpSocket>,
    /// The version serving under each name; a warming update leaves the one it replaces here.
    serving: HashMap<String, Arc<Listener>>,
    /// A task re-checks warming listeners when secrets arrive or timeouts expire.
    warm_watcher: bool,
}

/// Binds `addr` without listening.
fn bind_socket(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// Socket listeners by name.
#[derive(Default)]
pub struct ListenerManager {
    inner: Mutex<Inner>,
    /// `Inner::serving` as published for the accept paths (read without a lock).
    serving_now: arc_swap::ArcSwap<HashMap<String, Arc<Listener>>>,
}

impl ListenerManager {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The socket listeners serving now.
    pub fn bound(&self) -> Vec<(String, SocketAddr)> {
        let inner = self.lock();
        let mut out: Vec<_> = inner
            .active
            .iter()
            .map(|(n, a)| (n.clone(), a.addr))
            .collect();
        out.sort();
        out
    }

    /// Makes sure `addr` can be served: already bound by one of ours, or bound now and kept until
    /// the listener is published.
    fn check_bind(&self, addr: SocketAddr) -> Result<(), String> {
        let mut inner = self.lock();
        if inner.active.values().any(|a| a.addr == addr) || inner.prebound.contains_key(&addr) {
            return Ok(());
        }
        let socket = bind_socket(addr).map_err(|e| format!("cannot bind {addr}: {e}"))?;
        inner.prebound.insert(addr, socket);
        Ok(())
    }

    /// The version of listener `name` that takes connections now.
    pub fn serving(&self, name: &str) -> Option<Arc<Listener>> {
        self.serving_now.load().get(name).cloned()
    }

    /// Settles which version of each listener serves: a new version whose SDS secrets are all in
    /// (or timed out) replaces the serving one; otherwise it warms and the serving one stays.
    fn settle(&self, dp: &Arc<DataPlane>, inner: &mut Inner, snapshot: &Snapshot) {
        let warming = &dp.server.warming;
        inner
            .serving
            .retain(|n, _| snapshot.listeners.contains_key(n));
        for name in warming.all().keys() {
            if !snapshot.listeners.contains_key(name) {
                warming.finish(name);
            }
        }
        let grpc_clusters: BTreeSet<String> = dp
            .server
            .bootstrap
            .grpc_clusters
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        let now = tokio::time::Instant::now();
        let has = |n: &str| dp.secrets.get(n).is_some();
        for (name, l) in &snapshot.listeners {
            if inner.serving.get(name).is_some_and(|s| Arc::ptr_eq(s, l)) {
                continue;
            }
            let needed = needed_secrets(l, &grpc_clusters);
            let known = warming.get(name).filter(|w| Arc::ptr_eq(&w.listener, l));
            let since = known.as_ref().map_or(now, |w| w.since);
            let still = pending(&needed, has, since, now);
            if still.is_empty() {
                let missing: Vec<&String> = needed.keys().filter(|n| !has(n)).collect();
                if !missing.is_empty() {
                    tracing::warn!(target: "listener", %name, secrets = ?missing, "initial_fetch_timeout expired before the SDS secrets arrived; listener active without them (TLS handshakes fail until they come)");
                } else if known.is_some() {
                    tracing::info!(target: "listener", %name, "SDS secrets arrived; listener warmed");
                }
                warming.finish(name);
                inner.serving.insert(name.clone(), l.clone());
            } else if known.is_some() {
                warming.set_pending(name, still);
            } else {
                tracing::info!(target: "listener", %name, secrets = ?still.iter().map(|p| &p.name).collect::<Vec<_>>(), "listener warming: waiting for SDS secrets");
                warming.begin(l.clone(), still, inner.serving.contains_key(name), now);
            }
        }
        if !warming.is_empty() && !inner.warm_watcher {
            inner.warm_watcher = true;
            tokio::spawn(watch_warming(Arc::downgrade(dp)));
        }
    }

    /// Starts, moves and stops accept loops to match the current snapshot (read under the lock,
    /// so reconciles from the ADS task and from the warming watcher never go back in time).
    /// Returns the listeners that should serve but cannot listen (`name on addr: error`); they
    /// are tried again at the next reconcile.
    pub fn reconcile(&self, dp: &Arc<DataPlane>, _published: &Snapshot) -> Vec<String> {
        let mut inner = self.lock();
        let snapshot = dp.server.config.snapshot();
        let before = self.serving_now.load_full();
        self.settle(dp, &mut inner, &snapshot);
        let serving = std::mem::take(&mut inner.serving);
        // Before the new versions are published: their unchanged chains must share the signals
        // of the serving ones before any connection watches them.
        drain_replaced(dp, &before, &serving);
        // Published before any accept loop starts: a worker may accept at once, and a connection
        // whose listener it cannot find is dropped.
        self.serving_now.store(Arc::new(serving.clone()));
        let wanted: HashMap<&str, SocketAddr> = serving
            .iter()
            .filter_map(|(name, l)| match l.bind {
                Bind::Socket { addr, .. } => Some((name.as_str(), addr)),
                Bind::Internal => None,
            })
            .collect();
        // Stop what is gone or moved.
        let stale: Vec<String> = inner
            .active
            .iter()
            .filter(|(n, a)| wanted.get(n.as_str()) != Some(&a.addr))
            .map(|(n, _)| n.clone())
            .collect();
        for name in stale {
            if let Some(a) = inner.active.remove(&name) {
                tracing::info!(target: "listener", %name, addr = %a.addr, "listener removed");
                let _ = a.stop.send(true);
            }
        }
        let mut failed = Vec::new();
        for (name, addr) in wanted {
            if inner.active.contains_key(name) {
                continue;
            }
            let socket = match inner.prebound.remove(&addr) {
                Some(s) => Ok(s),
                None => bind_socket(addr),
            };
            // The bind check before the update was accepted cannot see every conflict: sockets
            // with SO_REUSEADDR bind one port together as long as none listens, so another
            // process's listener on the port shows only here.
            let listener = match socket.and_then(|s| s.listen(LISTEN_BACKLOG)) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(target: "listener", %name, %addr, "cannot listen: {e}");
                    dp.server
                        .stats
                        .counter("listener_manager.listener_create_failure")
                        .inc();
                    failed.push(format!("'{name}' on {addr}: cannot listen: {e}"));
                    continue;
                }
            };
            let (stop, stop_rx) = watch::channel(false);
            inner.active.insert(name.to_owned(), Active { addr, stop });
            tracing::info!(target: "listener", %name, %addr, "listener serving");
            spawn_accept_loops(dp, name, addr, listener, stop_rx);
        }
        // Warming new listeners keep their address reserved (bound, refusing connections).
        let reserved: HashSet<SocketAddr> = dp
            .server
            .warming
            .all()
            .values()
            .filter_map(|w| match w.listener.bind {
                Bind::Socket { addr, .. } if !serving.contains_key(&w.listener.name) => Some(addr),
                _ => None,
            })
            .collect();
        inner.prebound.retain(|a, _| reserved.contains(a));
        inner.serving = serving;
        drop(inner);
        dp.server.maybe_live();
        failed
    }
}

/// Drains what an LDS update takes away, as Envoy's listener manager does once the new versions
/// are warm: a removed listener, or one replaced by a version that differs beyond its filter
/// chains, drains every connection; an in-place filter chain update
/// ([`Listener::filter_chain_only_change`]) drains only the connections of the chains whose
/// config is not in the new version (`drainFilterChains`), and the chains it keeps go on serving
/// their connections. The drained connections are closed `--drain-time-s` later.
fn drain_replaced(
    dp: &DataPlane,
    before: &HashMap<String, Arc<Listener>>,
    after: &HashMap<String, Arc<Listener>>,
) {
    let close_at =
        tokio::time::Instant::now() + Duration::from_secs(dp.server.options.drain_time_s);
    let stats = &dp.server.stats;
    let mut in_place_drained = 0;
    for (name, old) in before {
        match after.get(name) {
            Some(new) if Arc::ptr_eq(old, new) => {}
            Some(new) if old.filter_chain_only_change(new) => {
                stats
                    .counter("listener_manager.listener_in_place_updated")
                    .inc();
                let (kept, drained) = keep_unchanged_chains(old, new, close_at);
                in_place_drained += drained;
                tracing::info!(target: "listener", %name, kept, drained, "filter chains updated in place; connections on the changed ones drain");
            }
            replaced => {
                let mut drained = 0;
                for (chain, _) in old.chains_with_config() {
                    drained += u64::from(chain.drain.start(close_at));
                }
                let what = if replaced.is_some() {
                    "listener replaced"
                } else {
                    stats.counter("listener_manager.listener_removed").inc();
                    "listener removed"
                };
                tracing::info!(target: "listener", %name, chains = drained, "{what}; its connections drain");
            }
        }
    }
    if in_place_drained > 0 {
        // Envoy's gauge of chains drained by in-place updates, until their connections close.
        let gauge = stats.gauge("listener_manager.total_filter_chains_draining");
        gauge.add(in_place_drained);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                tokio::time::sleep_until(close_at).await;
                for _ in 0..in_place_drained {
                    gauge.dec();
                }
            });
        }
    }
}

/// For an in-place update of `old` by `new`: each chain of `new` whose config equals one of
/// `old` takes over its drain signal (Envoy keys chains by their whole `FilterChain` message, so
/// the connections of an unchanged chain are not drained); the chains of `old` left over start
/// draining. Returns (kept, drained).
fn keep_unchanged_chains(
    old: &Listener,
    new: &Listener,
    close_at: tokio::time::Instant,
) -> (usize, u64) {
    let mut by_name: HashMap<&str, Vec<(&FilterChain, &RawFilterChain)>> = HashMap::new();
    for (chain, raw) in new.chains_with_config() {
        by_name.entry(&chain.name).or_default().push((chain, raw));
    }
    let (mut kept, mut drained) = (0, 0);
    for (chain, raw) in old.chains_with_config() {
        let same = by_name.get_mut(chain.name.as_str()).and_then(|candidates| {
            let i = candidates.iter().position(|(_, r)| *r == raw)?;
            // Taken: one new chain carries one old chain's connections.
            Some(candidates.swap_remove(i).0)
        });
        match same {
            Some(next) => {
                next.drain.adopt(&chain.drain);
                kept += 1;
            }
            None => drained += u64::from(chain.drain.start(close_at)),
        }
    }
    (kept, drained)
}

/// Re-settles warming listeners whenever a secret arrives, the warming set changes or a timeout
/// expires; ends when nothing warms.
async fn watch_warming(dp: Weak<DataPlane>) {
    let (mut secrets, mut changes) = match dp.upgrade() {
        Some(d) => (d.secrets.subscribe(), d.server.warming.subscribe()),
        None => return,
    };
    loop {
        let deadline = {
            let Some(d) = dp.upgrade() else { return };
            let snapshot = d.server.config.snapshot();
            // A failure was logged and counted; the next reconcile tries again.
            let _ = d.listeners.reconcile(&d, &snapshot);
            let mut inner = d.listeners.lock();
            if d.server.warming.is_empty() {
                inner.warm_watcher = false;
                return;
            }
            d.server.warming.next_deadline()
        };
        tokio::select! {
            r = secrets.changed() => if r.is_err() { return },
            r = changes.changed() => if r.is_err() { return },
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

/// Wires a data plane into the config store: bind checks before LDS is accepted, accept loops
/// after it is published.
pub struct Hooks(pub Weak<DataPlane>);

impl ListenerHooks for Hooks {
    fn check(&self, listener: &Listener) -> Result<(), String> {
        match (listener.bind.clone(), self.0.upgrade()) {
            (Bind::Socket { addr, .. }, Some(dp)) => dp.listeners.check_bind(addr),
            _ => Ok(()),
        }
    }

    fn published(&self, snapshot: &Arc<Snapshot>) -> Vec<String> {
        match self.0.upgrade() {
            Some(dp) => {
                // jwt_authn's remote JWKS: bound to the clusters, `async_fetch` started.
                crate::http::jwks_fetch::bind_snapshot(&dp, snapshot);
                dp.listeners.reconcile(&dp, snapshot)
            }
            None => Vec::new(),
        }
    }

    fn upstreams_published(&self, snapshot: &Arc<Snapshot>) {
        if let Some(dp) = self.0.upgrade() {
            dp.clusters.refresh(&dp, snapshot);
        }
    }
}

fn stat_addr(addr: SocketAddr) -> String {
    format!("{}_{}", addr.ip(), addr.port())
}

/// Per-listener counters (Envoy's `listener.<address>.*`).
struct ListenerStats {
    cx_total: Arc<Stat>,
    cx_active: Arc<Stat>,
    cx_destroy: Arc<Stat>,
    no_chain: Arc<Stat>,
}

impl ListenerStats {
    fn new(dp: &DataPlane, prefix: &str) -> Self {
        let s = &dp.server.stats;
        ListenerStats {
            cx_total: s.counter(&format!("listener.{prefix}.downstream_cx_total")),
            cx_active: s.gauge(&format!("listener.{prefix}.downstream_cx_active")),
            cx_destroy: s.counter(&format!("listener.{prefix}.downstream_cx_destroy")),
            no_chain: s.counter(&format!("listener.{prefix}.no_filter_chain_match")),
        }
    }
}

/// Accepts on `listener` from every worker thread (each registers its own handle of the socket;
/// the kernel hands a connection to one of them), or from this runtime when there are no workers.
fn spawn_accept_loops(
    dp: &Arc<DataPlane>,
    name: &str,
    addr: SocketAddr,
    listener: TcpListener,
    stop: watch::Receiver<bool>,
) {
    let Some(workers) = crate::workers::handles() else {
        tokio::spawn(accept_loop(
            Arc::downgrade(dp),
            name.to_owned(),
            addr,
            listener,
            stop,
        ));
        return;
    };
    // The socket leaves this runtime's reactor and joins each worker's.
    let socket = match listener.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(target: "listener", %name, %addr, "cannot hand the socket to workers: {e}");
            return;
        }
    };
    for (i, worker) in workers.iter().enumerate() {
        let clone = match socket.try_clone() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(target: "listener", %name, %addr, worker = i, "cannot share the socket: {e}");
                continue;
            }
        };
        let (dp, name, stop) = (Arc::downgrade(dp), name.to_owned(), stop.clone());
        worker.spawn(async move {
            match TcpListener::from_std(clone) {
                Ok(listener) => accept_loop(dp, name, addr, listener, stop).await,
                Err(e) => {
                    tracing::error!(target: "listener", %name, %addr, worker = i, "cannot register the socket: {e}");
                }
            }
        });
    }
}

async fn accept_loop(
    dp: Weak<DataPlane>,
    name: String,
    addr: SocketAddr,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let (stats, mut drained, direction) = match dp.upgrade() {
        Some(d) => (
            Arc::new(ListenerStats::new(&d, &stat_addr(addr))),
            d.server.listener_stop.subscribe(),
            d.server
                .config
                .snapshot()
                .listeners
                .get(&name)
                .map_or(0, |l| l.traffic_direction),
        ),
        None => return,
    };
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = async { drop(stop.wait_for(|s| *s).await) } => return,
            // After `/drain_listeners` (and its drain time): dropping the socket refuses new
            // connections; the ones already accepted run on.
            _ = async { drop(drained.wait_for(|s| s.stops(direction)).await) } => {
                tracing::info!(target: "listener", %name, %addr, "listener stopped (drained)");
                return;
            }
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(target: "listener", %name, "accept: {e}");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let Some(dp) = dp.upgrade() else { return };
        let snapshot = dp.server.config.snapshot();
        let Some(l) = dp.listeners.serving(&name) else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(addr);
        let stats = stats.clone();
        let name = name.clone();
        tokio::spawn(async move {
            stats.cx_total.inc();
            stats.cx_active.add(1);
            let ctx = ConnContext::new(&name, Addr::Socket(local), Addr::Socket(peer), snapshot);
            serve_connection(&dp, l, ctx, Box::new(stream), Some(&stats.no_chain)).await;
            stats.cx_active.dec();
            stats.cx_destroy.inc();
        });
    }
}

/// Opens an in-process connection to the internal listener `name`, seeded by the upstream side.
/// Listener filters that need no bytes run at once, so a connection no filter chain can take is
/// refused here (the caller answers its client with an error) instead of after a 200.
pub fn connect_internal(dp: &Arc<DataPlane>, name: &str, seed: Seed) -> Result<BoxIo, ProxyError> {
    let snapshot = dp.server.config.snapshot();
    let Some(listener) = dp
        .listeners
        .serving(name)
        .filter(|l| l.bind == Bind::Internal)
    else {
        return Err(ProxyError::ConnectFailure(format!(
            "no internal listener '{name}'"
        )));
    };
    let local = Addr::Internal(match &seed.endpoint_id {
        Some(id) => format!("{name}/{id}"),
        None => name.to_owned(),
    });
    let remote = seed
        .source
        .clone()
        .unwrap_or_else(|| Addr::Internal("internal_client_address".to_owned()));
    let mut ctx = ConnContext::new(name, local, remote, snapshot);
    ctx.filter_state = seed.filter_state;
    ctx.metadata = seed.metadata;
    if listener
        .listener_filters
        .iter()
        .any(|f| f.kind == ListenerFilterKind::OriginalDst)
    {
        original_dst(&mut ctx);
    }
    if !may_have_chain(&listener, &ctx) {
        return Err(ProxyError::NoFilterChain);
    }
    let (near, far) = crate::io::pipe::pipe(INTERNAL_BUFFER);
    let dp = dp.clone();
    tokio::spawn(async move {
        serve_connection(&dp, listener, ctx, Box::new(far), None).await;
    });
    Ok(Box::new(near))
}

/// Whether some chain could take the connection, whatever the sniffers would find.
fn may_have_chain(listener: &Listener, ctx: &ConnContext) -> bool {
    let sniffs =
        |k: fn(&ListenerFilterKind) -> bool| listener.listener_filters.iter().any(|f| k(&f.kind));
    let mut protocol_sets: Vec<Vec<String>> = vec![vec![]];
    if sniffs(|k| *k == ListenerFilterKind::HttpInspector) {
        protocol_sets.push(vec!["http/1.1".into()]);
        protocol_sets.push(vec!["h2c".into()]);
    }
    let transports: &[&str] = if sniffs(|k| matches!(k, ListenerFilterKind::TlsInspector { .. })) {
        &["raw_buffer", "tls"]
    } else {
        &["raw_buffer"]
    };
    protocol_sets.iter().any(|protos| {
        transports
            .iter()
            .any(|t| select_chain(listener, ctx, t, None, protos).is_some())
    })
}

fn socket_pair(a: &Addr) -> Option<(std::net::IpAddr, u16)> {
    a.socket().map(|s| (s.ip(), s.port()))
}

fn select_chain<'l>(
    listener: &'l Listener,
    ctx: &ConnContext,
    transport: &str,
    sni: Option<&str>,
    protocols: &[String],
) -> Option<&'l FilterChain> {
    let fs = |k: &str| ctx.filter_state.get(k).map(str::to_owned);
    chain::select(
        listener,
        &Selector {
            destination: socket_pair(&ctx.local),
            source: socket_pair(&ctx.remote),
            direct_source: ctx.direct_remote.socket().map(|s| s.ip()),
            server_name: sni,
            transport_protocol: transport,
            application_protocols: protocols,
            filter_state: &fs,
        },
    )
}

/// `original_dst`: on internal listeners the local address comes from the passthrough metadata
/// (`envoy.filters.listener.original_dst` → `local`) or else the filter state
/// (`envoy.filters.listener.original_dst.local_ip`), the remote one from the filter state
/// (`...remote_ip`). Socket listeners keep the accepted addresses (no iptables redirect here).
fn original_dst(ctx: &mut ConnContext) {
    if !matches!(ctx.local, Addr::Internal(_)) {
        return;
    }
    let from_metadata = ctx
        .metadata
        .get(ORIGINAL_DST_NAMESPACE)
        .and_then(|m| m.get("local"))
        .and_then(|v| v.as_str())
        .and_then(|s| s.parse::<SocketAddr>().ok());
    let local = from_metadata.or_else(|| {
        ctx.filter_state
            .get(ORIGINAL_DST_LOCAL_KEY)
            .and_then(|s| s.parse::<SocketAddr>().ok())
    });
    if let Some(l) = local {
        ctx.local = Addr::Socket(l);
    }
    if let Some(r) = ctx
        .filter_state
        .get(ORIGINAL_DST_REMOTE_KEY)
        .and_then(|s| s.parse::<SocketAddr>().ok())
    {
        ctx.remote = Addr::Socket(r);
    }
}

/// Listener filters, chain, transport socket, network filters.
async fn serve_connection(
    dp: &Arc<DataPlane>,
    listener: Arc<Listener>,
    mut ctx: ConnContext,
    mut io: BoxIo,
    no_chain: Option<&Arc<Stat>>,
) {
    let (accepted_at, accepted) = (std::time::SystemTime::now(), std::time::Instant::now());
    let timeout = Some(listener.listener_filters_timeout).filter(|t| !t.is_zero());
    let mut hello: Option<inspect::ClientHello> = None;
    for f in &listener.listener_filters {
        if f.disabled
            .as_ref()
            .is_some_and(|p| p.matches(ctx.local.port()))
        {
            continue;
        }
        match &f.kind {
            ListenerFilterKind::OriginalDst => original_dst(&mut ctx),
            ListenerFilterKind::HttpInspector => {
                let (found, back) = inspect::http_inspector(io, timeout).await;
                io = back;
                match found {
                    Ok(Some(p)) => ctx.application_protocols = vec![p.to_owned()],
                    Ok(None) => {}
                    Err(()) if listener.continue_on_listener_filters_timeout => {}
                    Err(()) => {
                        tracing::debug!(target: "listener", listener = %ctx.listener, "http_inspector timed out; closing");
                        return;
                    }
                }
            }
            ListenerFilterKind::TlsInspector {
                max_client_hello_size,
                ..
            } => {
                let (found, back) =
                    inspect::tls_inspector(io, timeout, *max_client_hello_size).await;
                io = back;
                match found {
                    Ok(h) => {
                        if !h.alpn.is_empty() {
                            ctx.application_protocols = h.alpn.clone();
                        }
                        hello = Some(h);
                    }
                    Err(()) if listener.continue_on_listener_filters_timeout => {}
                    Err(()) => return,
                }
            }
        }
    }
    let transport = if hello.as_ref().is_some_and(|h| h.is_tls) {
        "tls"
    } else {
        "raw_buffer"
    };
    let sni = hello.as_ref().and_then(|h| h.server_name.clone());
    let Some(chain) = select_chain(
        &listener,
        &ctx,
        transport,
        sni.as_deref(),
        &ctx.application_protocols,
    ) else {
        if let Some(s) = no_chain {
            s.inc();
        }
        tracing::debug!(target: "listener", listener = %ctx.listener, local = %ctx.local, "no filter chain matched; closing (NR)");
        // The listener's own access log records connections no chain took (Envoy: `NR`).
        crate::access_log::log_connection(
            &listener.access_log,
            &ctx,
            accepted_at,
            accepted.elapsed(),
            crate::flags::ResponseFlags::of(crate::flags::ResponseFlag::NoRouteFound),
            0,
            0,
            None,
        );
        return;
    };
    ctx.chain = chain.name.clone();
    // Watched from here on: a chain drained while the connection was being set up (an update
    // raced the accept) drains it at once.
    ctx.drain = chain.drain.watch();
    let io: BoxIo = match &chain.transport_socket {
        None | Some(TransportSocket::RawBuffer) => io,
        Some(TransportSocket::DownstreamTls(t)) => {
            let config = match dp.tls.server_config(t) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(target: "listener", listener = %ctx.listener, "TLS context not ready: {e}");
                    return;
                }
            };
            let handshake = tokio_rustls::TlsAcceptor::from(config.clone()).accept(io);
            let deadline = chain
                .transport_socket_connect_timeout
                .unwrap_or(Duration::from_secs(10));
            let tls = match tokio::time::timeout(deadline, handshake).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(target: "listener", listener = %ctx.listener, remote = %ctx.remote, "TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(target: "listener", listener = %ctx.listener, "TLS handshake timed out");
                    return;
                }
            };
            let (_, state) = tls.get_ref();
            ctx.tls = Some(TlsInfo {
                peer_uri_san: crate::tls::peer_uri_san(state),
                local_uri_san: dp.tls.local_uri_san(&config),
                alpn: state
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).into_owned()),
                server_name: state.server_name().map(str::to_owned),
            });
            Box::new(tls)
        }
        Some(other) => {
            tracing::warn!(target: "listener", listener = %ctx.listener, "transport socket {other:?} cannot serve downstream");
            return;
        }
    };
    run_network_filters(dp, ctx, chain, io).await;
}

async fn run_network_filters(
    dp: &Arc<DataPlane>,
    mut ctx: ConnContext,
    chain: &FilterChain,
    io: BoxIo,
) {
    // A network `istio.stats` reports the connection the tcp_proxy after it carries.
    let mut istio_stats = None;
    for f in &chain.filters {
        match &f.kind {
            NetworkFilterKind::SetFilterState(c) => {
                let mut next = ctx.filter_state.clone();
                apply_set_filter_state(
                    c,
                    &ConnValues {
                        conn: &ctx,
                        stream_state: None,
                        request: None,
                    },
                    &mut next,
                );
                ctx.filter_state = next;
            }
            NetworkFilterKind::IstioStats(s) => istio_stats = Some(s),
            // Peer metadata on a waypoint comes through WDS (the downstream peer is shared by
            // connect_terminate); these pass the connection on unchanged.
            NetworkFilterKind::MetadataExchange(_) | NetworkFilterKind::PeerMetadata(_) => {}
            NetworkFilterKind::Rbac(r) => {
                if r.continuous {
                    // Same decision on every read: no headers at L4, so the first one stands.
                    tracing::trace!(target: "rbac", filter = %f.name, "CONTINUOUS enforcement: decided once per connection");
                }
                let decision = network_rbac(r, &ctx);
                if !decision.allowed {
                    tracing::debug!(target: "rbac", filter = %f.name, policy = ?decision.policy, remote = %ctx.remote, "connection denied (RBAC)");
                    dp.server
                        .stats
                        .counter(&format!("{}rbac.denied", network_stat_prefix(chain)))
                        .inc();
                    if let Some(d) = r.delay_deny {
                        tokio::time::sleep(d).await;
                    }
                    return;
                }
            }
            NetworkFilterKind::HttpConnectionManager(h) => {
                crate::http::conn_manager::serve(dp.clone(), Arc::new(ctx), h.clone(), io).await;
                return;
            }
            NetworkFilterKind::TcpProxy(t) => {
                crate::tcp_proxy::serve(dp.clone(), Arc::new(ctx), t.clone(), io, istio_stats)
                    .await;
                return;
            }
        }
    }
    tracing::debug!(target: "listener", chain = %chain.name, "filter chain has no terminal filter; closing");
}

fn network_stat_prefix(chain: &FilterChain) -> String {
    // Envoy: `<stat_prefix>.rbac.*` of the network RBAC filter; the chain name stands in.
    format!("{}.", chain.name)
}

/// Evaluates a network RBAC filter for a connection (no headers at L4).
fn network_rbac(
    r: &crate::config::filters::rbac::NetworkRbac,
    ctx: &ConnContext,
) -> crate::rbac::Decision {
    let fs = |k: &str| -> Option<&str> { ctx.filter_state.get(k) };
    let md =
        |ns: &str, path: &[String]| -> Option<&serde_json::Value> { ctx.metadata_value(ns, path) };
    let uri_sans: Vec<String> = ctx
        .tls
        .as_ref()
        .and_then(|t| t.peer_uri_san.clone())
        .into_iter()
        .collect();
    let input = crate::rbac::RbacInput {
        source: ctx.remote.socket(),
        direct_source: ctx.direct_remote.socket().or(ctx.remote.socket()),
        destination: ctx.local.socket(),
        requested_server_name: ctx.tls.as_ref().and_then(|t| t.server_name.as_deref()),
        peer: ctx.tls.as_ref().map(|_| crate::rbac::TlsPeer {
            uri_sans: &uri_sans,
            ..Default::default()
        }),
        filter_state: &fs,
        metadata: &md,
        ..Default::default()
    };
    crate::rbac::evaluate(r.rules.as_ref(), r.shadow_rules.as_ref(), &input)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value as Json, json};

    use super::*;

    fn chain(name: &str, port: u32, body: &str) -> Json {
        json!({
            "name": name,
            "filter_chain_match": {"destination_port": port},
            "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "route_config": {"name": name, "virtual_hosts": [{"name": "all", "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body": {"inline_string": body}}}]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
            }}]
        })
    }

    fn listener(chains: Vec<Json>, timeout: &str) -> Listener {
        let doc = json!({
            "name": "main",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15001}},
            "listener_filters_timeout": timeout,
            "filter_chains": chains,
        });
        let raw = waypoint_proto::json::from_json(&doc).expect("decodes");
        Listener::compile(raw, "").expect("compiles")
    }

    fn named<'a>(l: &'a Listener, name: &str) -> &'a FilterChain {
        l.chain(name).expect("chain")
    }

    #[tokio::test]
    async fn an_in_place_update_drains_only_the_changed_chains() {
        let v1 = listener(
            vec![
                chain("a", 80, "a1"),
                chain("b", 81, "b1"),
                chain("gone", 82, "x"),
            ],
            "1s",
        );
        let v2 = listener(
            vec![
                chain("a", 80, "a1"),
                chain("b", 81, "b2"),
                chain("new", 83, "n"),
            ],
            "1s",
        );
        assert!(v1.filter_chain_only_change(&v2));
        let mut on_a = named(&v1, "a").drain.watch();
        let close_at = tokio::time::Instant::now() + Duration::from_secs(30);
        assert_eq!(keep_unchanged_chains(&v1, &v2, close_at), (1, 2));
        assert!(named(&v2, "a").drain.shares(&named(&v1, "a").drain));
        assert!(!named(&v1, "a").drain.draining());
        assert!(named(&v1, "b").drain.draining());
        assert!(named(&v1, "gone").drain.draining());
        assert!(
            !named(&v2, "b").drain.draining(),
            "the new version of b serves"
        );
        assert!(!named(&v2, "new").drain.draining());
        // A third version changes `a`: the connections accepted on v1 drain with v2's.
        let v3 = listener(vec![chain("a", 80, "a3")], "1s");
        assert_eq!(keep_unchanged_chains(&v2, &v3, close_at), (0, 3));
        assert_eq!(on_a.draining().await, close_at);
    }

    #[test]
    fn a_change_beyond_the_chains_replaces_the_listener() {
        let v1 = listener(vec![chain("a", 80, "a1")], "1s");
        let same_shell = listener(vec![chain("a", 80, "a2"), chain("b", 81, "b")], "1s");
        let other_timeout = listener(vec![chain("a", 80, "a1")], "2s");
        assert!(v1.filter_chain_only_change(&same_shell));
        assert!(!v1.filter_chain_only_change(&other_timeout));
        // Envoy: an update left with only a default chain is a full update.
        let doc = json!({
            "name": "main",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15001}},
            "listener_filters_timeout": "1s",
            "default_filter_chain": chain("a", 80, "a1"),
        });
        let raw = waypoint_proto::json::from_json(&doc).expect("decodes");
        let only_default = Listener::compile(raw, "").expect("compiles");
        assert!(!v1.filter_chain_only_change(&only_default));
    }
}
