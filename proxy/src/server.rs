//! Process-wide state shared by the control side and the admin API.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    time::{Instant, SystemTime},
};

use tokio::sync::watch;

use crate::{
    bootstrap::LoadedBootstrap, cli::Options, config::ConfigStore, stats::Stats, xds::XdsStore,
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
    state: AtomicU8,
    /// `/healthcheck/fail` was called.
    pub health_check_failed: AtomicBool,
    /// Set when listeners should drain (`/drain_listeners`).
    pub drain: watch::Sender<bool>,
    /// Set when the process should exit (`/quitquitquit`, signals).
    pub shutdown: watch::Sender<bool>,
    /// Process start.
    pub started: Instant,
    /// Process start (wall clock).
    pub started_at: SystemTime,
}

impl Server {
    /// A server in `PRE_INITIALIZING`.
    pub fn new(options: Options, bootstrap: LoadedBootstrap) -> Arc<Server> {
        let stats = Arc::new(Stats::default());
        stats
            .gauge("server.state")
            .set(ServerState::PreInitializing as u64);
        stats.gauge("listener_manager.workers_started").set(0);
        let (drain, _) = watch::channel(false);
        let (shutdown, _) = watch::channel(false);
        Arc::new(Server {
            options,
            bootstrap,
            xds: Arc::new(XdsStore::default()),
            config: Arc::new(ConfigStore::default()),
            stats,
            state: AtomicU8::new(ServerState::PreInitializing as u8),
            health_check_failed: AtomicBool::new(false),
            drain,
            shutdown,
            started: Instant::now(),
            started_at: SystemTime::now(),
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
}
