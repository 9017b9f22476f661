//! Process-wide state shared by the control side and the admin API.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::watch;

use crate::{
    bootstrap::LoadedBootstrap,
    cli::Options,
    config::ConfigStore,
    stats::Stats,
    xds::{XdsStore, warming::WarmingListeners},
};

/// Envoy's `server.state` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ServerState {
    /// Serving.
    Live = 0,
    /// Draining listeners.
    Draining = 1,
    /// Waiting for the initial xDS.
    PreInitializing = 2,
    /// Initializing.
    Initializing = 3,
}

impl ServerState {
    /// Envoy's name (`/ready` body).
    pub fn name(self) -> &'static str {
        match self {
            ServerState::Live => "LIVE",
            ServerState::Draining => "DRAINING",
            ServerState::PreInitializing => "PRE_INITIALIZING",
            ServerState::Initializing => "INITIALIZING",
        }
    }
}

/// Which socket listeners have stopped accepting after `/drain_listeners` (Envoy's
/// `stopListeners`): none while serving; after the drain all of them, or with `?inboundonly` those
/// whose `traffic_direction` is `INBOUND`. Open connections are not closed by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerStop {
    /// Every listener accepts.
    Serving,
    /// Inbound listeners stopped (`?inboundonly`).
    Inbound,
    /// Every socket listener stopped.
    All,
}

impl ListenerStop {
    /// Whether a listener with this `traffic_direction` (`envoy.config.core.v3.TrafficDirection`)
    /// must stop accepting.
    pub fn stops(self, traffic_direction: i32) -> bool {
        /// `TrafficDirection.INBOUND`.
        const INBOUND: i32 = 1;
        match self {
            ListenerStop::Serving => false,
            ListenerStop::Inbound => traffic_direction == INBOUND,
            ListenerStop::All => true,
        }
    }
}

/// Everything the admin API and the xDS client share.
pub struct Server {
    /// Command line.
    pub options: Options,
    /// The bootstrap.
    pub bootstrap: LoadedBootstrap,
    /// Stats.
    pub stats: Arc<Stats>,
    /// Raw xDS resources as received (versions, errors) for `/config_dump`.
    pub xds: Arc<XdsStore>,
    /// Compiled configuration.
    pub config: Arc<ConfigStore>,
    /// Listeners waiting for their SDS secrets.
    pub warming: WarmingListeners,
    state: AtomicU8,
    /// The initial xDS fetch is complete (LIVE once no listener warms).
    initial_fetch_done: AtomicBool,
    /// Clusters whose initialization LIVE waits for (DNS clusters with `wait_for_warm_on_init`
    /// before their first resolution), as Envoy's cluster manager holds server init.
    clusters_initializing: AtomicUsize,
    /// `/healthcheck/fail` was called.
    pub health_check_failed: AtomicBool,
    /// Set when listeners should drain (`/drain_listeners`).
    pub drain: watch::Sender<bool>,
    /// Which listeners stopped accepting (see [`Server::drain_listeners`]); accept loops watch it.
    pub listener_stop: watch::Sender<ListenerStop>,
    /// Set when the process should exit (`/quitquitquit`, signals).
    pub shutdown: watch::Sender<bool>,
    /// Process start.
    pub started: Instant,
    /// Process start (wall clock).
    pub started_at: SystemTime,
    /// Returns freed memory to the kernel after a large release (set by the binary, which knows
    /// its allocator; tests leave it unset).
    pub give_back_memory: std::sync::OnceLock<fn()>,
    /// Bumped after each LDS or CDS response is recorded: the SDS client then re-reads which
    /// secrets the listeners and clusters name.
    pub lds_cds_applied: watch::Sender<u64>,
}

impl Server {
    /// A server in `PRE_INITIALIZING`.
    pub fn new(options: Options, bootstrap: LoadedBootstrap) -> Arc<Server> {
        // A matcher that does not compile makes `config::bootstrap::compile` refuse the bootstrap
        // (with its path) before anything is served; until then every stat is kept.
        let matcher = crate::stats_matcher::StatsMatcher::from_bootstrap(&bootstrap.bootstrap)
            .unwrap_or_default();
        let stats = Arc::new(Stats::with_matcher(matcher));
        stats
            .gauge("server.state")
            .set(ServerState::PreInitializing as u64);
        stats.gauge("listener_manager.workers_started").set(0);
        let (drain, _) = watch::channel(false);
        let (listener_stop, _) = watch::channel(ListenerStop::Serving);
        let (shutdown, _) = watch::channel(false);
        let (lds_cds_applied, _) = watch::channel(0);
        Arc::new(Server {
            options,
            bootstrap,
            xds: Arc::new(XdsStore::default()),
            config: Arc::new(ConfigStore::default()),
            warming: WarmingListeners::new(stats.gauge("listener_manager.total_listeners_warming")),
            stats,
            state: AtomicU8::new(ServerState::PreInitializing as u8),
            initial_fetch_done: AtomicBool::new(false),
            clusters_initializing: AtomicUsize::new(0),
            health_check_failed: AtomicBool::new(false),
            drain,
            listener_stop,
            shutdown,
            started: Instant::now(),
            started_at: SystemTime::now(),
            give_back_memory: std::sync::OnceLock::new(),
            lds_cds_applied,
        })
    }

    /// Current state.
    pub fn state(&self) -> ServerState {
        match self.state.load(Ordering::Relaxed) {
            0 => ServerState::Live,
            1 => ServerState::Draining,
            3 => ServerState::Initializing,
            _ => ServerState::PreInitializing,
        }
    }

    /// Moves to `state` (and mirrors it in `server.state`).
    pub fn set_state(&self, state: ServerState) {
        self.state.store(state as u8, Ordering::Relaxed);
        self.stats.gauge("server.state").set(state as u64);
        if state == ServerState::Live {
            self.stats.gauge("listener_manager.workers_started").set(1);
        }
    }

    /// `/drain_listeners`, as Envoy: connections are discouraged from now on (HTTP/1.1 `Connection:
    /// close`, HTTP/2 GOAWAY — `--drain-strategy immediate`); the listeners (only the inbound ones
    /// with `inbound_only`) stop accepting at once, or with `graceful` once `--drain-time-s` has
    /// passed, so new connections are refused while open ones finish.
    pub fn drain_listeners(self: &Arc<Self>, graceful: bool, inbound_only: bool) {
        let stop = if inbound_only {
            ListenerStop::Inbound
        } else {
            ListenerStop::All
        };
        self.drain.send_replace(true);
        self.set_state(ServerState::Draining);
        self.stats.gauge("server.live").set(0);
        let delay = Duration::from_secs(self.options.drain_time_s);
        let runtime = tokio::runtime::Handle::try_current();
        match runtime {
            Ok(runtime) if graceful && !delay.is_zero() => {
                let server = Arc::downgrade(self);
                runtime.spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Some(server) = server.upgrade() {
                        server.stop_listeners(stop);
                    }
                });
            }
            // Without a runtime (handlers called directly in tests) there is no timer to wait on.
            _ => self.stop_listeners(stop),
        }
    }

    /// Stops `stop`'s listeners unless a wider stop is already in force.
    fn stop_listeners(&self, stop: ListenerStop) {
        self.listener_stop.send_if_modified(|current| {
            let widen = *current == ListenerStop::Serving || stop == ListenerStop::All;
            if widen && *current != stop {
                tracing::info!(target: "listener", ?stop, "drained: listeners stop accepting");
                *current = stop;
                return true;
            }
            false
        });
    }

    /// The initial configuration is in (CDS, EDS and LDS over ADS, or the bootstrap alone): the
    /// server goes LIVE now, or once the listeners warming on SDS secrets are active, as Envoy's
    /// init manager waits for them.
    pub fn initial_fetch_done(&self) {
        self.initial_fetch_done.store(true, Ordering::SeqCst);
        self.maybe_live();
    }

    /// A cluster that LIVE must wait for started initializing (only counted before LIVE).
    pub fn cluster_initializing(&self) {
        self.clusters_initializing.fetch_add(1, Ordering::SeqCst);
    }

    /// A cluster counted by [`Server::cluster_initializing`] is initialized.
    pub fn cluster_initialized(&self) {
        let _ = self
            .clusters_initializing
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        self.maybe_live();
    }

    /// Goes LIVE if the initial fetch is done and no listener warms (only the first time: later
    /// warming listeners do not take the server out of LIVE).
    pub fn maybe_live(&self) {
        if self.initial_fetch_done.load(Ordering::SeqCst)
            && self.warming.is_empty()
            && self.clusters_initializing.load(Ordering::SeqCst) == 0
            && self.state() == ServerState::PreInitializing
        {
            self.set_state(ServerState::Live);
            tracing::info!(target: "xds", "initial configuration applied: LIVE");
            // The JSON descriptor pool (~5 MB) served the bootstrap and the initial TypedStruct
            // configs; until a config dump or a later push needs it again (rebuilt in ~20 ms), it
            // is idle memory, as is the garbage of compiling the initial config.
            waypoint_proto::json::release_idle_pool(std::time::Duration::ZERO);
            if let Some(give_back) = self.give_back_memory.get() {
                give_back();
            }
        }
    }
}
