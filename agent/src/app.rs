//! Start-up order and lifetime of the agent's parts, as pilot-agent: status server → certificate
//! manager and SDS server → XDS proxy → bootstrap → proxy process (unless `DISABLE_ENVOY`), then the
//! termination sequence of reference/istio-facts.md §1.13:
//!
//! 1. SIGTERM/SIGINT: readiness fails at once;
//! 2. `POST /drain_listeners?graceful` to the proxy (if `POST /drain` already drained it, or on
//!    `/quitquitquit`, the proxy is killed right away instead);
//! 3. wait `terminationDrainDuration`, or with `EXIT_ON_ZERO_ACTIVE_CONNECTIONS` the
//!    `MINIMUM_DRAIN_DURATION` and then until the proxy reports no active connection; a second
//!    signal, or the proxy exiting, ends the wait;
//! 4. stop the proxy (SIGTERM, SIGKILL after a grace), close SDS/XDS, exit 0.

use std::{path::Path, sync::Arc, time::Duration};

use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc, watch},
    task::JoinHandle,
};

use crate::{
    bootstrap,
    ca::{CaClient, CaClientConfig},
    config::{AgentConfig, paths},
    metrics::AgentMetrics,
    proxy_admin::{ProxyAdmin, ReadinessProbe},
    sds::SdsService,
    secrets::{RotationPolicy, SecretManager},
    status::{Control, Phase, StatusState},
    supervisor::{
        Mode, ProcessExit, ProcessTable, ProxyState, RestartPolicy, Supervisor, SupervisorExit,
    },
    xds_proxy::{UpstreamConfig, XdsProxy},
};

/// Deadline of each call to the proxy's admin API (pilot-agent's `PROXY_READINESS_PROBE_TIMEOUT`
/// default).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the SDS/XDS/status servers get to close once the proxy is gone.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// pilot-agent's period of the active-connection poll.
const ACTIVE_CX_POLL: Duration = Duration::from_secs(1);
/// pilot-agent stops polling after this many consecutive failed polls.
const ACTIVE_CX_MAX_ERRORS: u32 = 5;

/// Fatal start-up errors.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The bootstrap could not be written.
    #[error("bootstrap: {0}")]
    Bootstrap(#[from] bootstrap::BootstrapError),
    /// A server socket could not be set up.
    #[error("{0}")]
    Uds(#[from] crate::uds::UdsError),
    /// Waiting for signals failed.
    #[error("signals: {0}")]
    Signal(std::io::Error),
    /// The status server could not listen.
    #[error("status server on port {port}: {source}")]
    Status {
        /// The port.
        port: u16,
        /// The bind error.
        source: std::io::Error,
    },
    /// The process table (spawning and reaping) could not start.
    #[error("{0}")]
    Process(#[from] crate::supervisor::ProcessError),
    /// The proxy could not be started.
    #[error("proxy {binary}: {reason}")]
    Proxy {
        /// The binary.
        binary: String,
        /// Why.
        reason: String,
    },
}

/// How the agent ended (when it did not fail to start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// SIGTERM/SIGINT: drained and stopped.
    Terminated,
    /// `POST /quitquitquit`.
    Quit,
    /// The proxy exited and `EXIT_ON_PROXY_EXIT` is set (pilot-agent's behaviour: exit 0).
    ProxyExited(ProcessExit),
    /// The proxy kept crashing: the supervisor gave up.
    ProxyGaveUp {
        /// Restarts without a stable run.
        restarts: u32,
        /// The last exit.
        last: ProcessExit,
    },
}

impl Outcome {
    /// The process exit code: 0, except 1 when the supervisor gave up on the proxy (so Kubernetes
    /// restarts the container and counts it).
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::ProxyGaveUp { .. } => 1,
            Outcome::Terminated | Outcome::Quit | Outcome::ProxyExited(_) => 0,
        }
    }
}

/// Runs the agent with the restart policy its configuration carries.
pub async fn run(cfg: AgentConfig) -> Result<Outcome, AppError> {
    let policy = cfg.restart.clone();
    run_with(cfg, policy).await
}

/// Runs the agent until SIGTERM/SIGINT, `/quitquitquit`, or (per `policy`) the proxy's end.
pub async fn run_with(cfg: AgentConfig, policy: RestartPolicy) -> Result<Outcome, AppError> {
    // Signal handlers first: a SIGTERM during start-up must drain, not kill us (as PID 1 an
    // unhandled SIGTERM would even be ignored).
    let term = signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let int = signal(SignalKind::interrupt()).map_err(AppError::Signal)?;
    let table = ProcessTable::start()?;

    let metrics = Arc::new(AgentMetrics::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let (phase_tx, phase_rx) = watch::channel(Phase::Running);
    let (proxy_tx, proxy_rx) = watch::channel(ProxyState::Starting);
    let (control_tx, control_rx) = mpsc::channel(4);
    let admin = ProxyAdmin::new(
        cfg.proxy_config.proxy_admin_port,
        cfg.envoy_status_port,
        cfg.envoy_prometheus_port,
        ADMIN_TIMEOUT,
    );

    let signer = CaClient::new(CaClientConfig::from_agent(&cfg));
    let manager = SecretManager::new(
        signer,
        cfg.key_kind,
        cfg.identity(),
        RotationPolicy::from_agent(&cfg),
        metrics.clone(),
    );
    let secrets = manager.subscribe();

    // 1. Status server.
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    let status_port = cfg.proxy_config.status_port;
    if status_port > 0 {
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", status_port))
            .await
            .map_err(|source| AppError::Status {
                port: status_port,
                source,
            })?;
        let state = Arc::new(StatusState {
            disable_envoy: cfg.disable_envoy,
            secrets: secrets.clone(),
            phase: phase_rx,
            proxy: proxy_rx,
            probe: ReadinessProbe::new(admin.clone()),
            metrics: metrics.clone(),
            prometheus_port: cfg.envoy_prometheus_port,
            control: control_tx,
        });
        tracing::info!(port = status_port, "status server listening");
        tasks.push(tokio::spawn(crate::status::serve(
            listener,
            state,
            stopped(stop_rx.clone()),
        )));
    }

    // 2. Certificates: manager + SDS server (the socket exists before the proxy starts).
    let manager_task = tokio::spawn(manager.run());
    let sds_path = cfg.sds_socket();
    let sds = SdsService::new(secrets.clone(), metrics.clone());
    let sds_listener_path = sds_path.clone();
    tasks.push(tokio::spawn({
        let stop = stopped(stop_rx.clone());
        async move {
            if let Err(err) = sds.serve(&sds_listener_path, stop).await {
                tracing::error!(target: "sds", "SDS server failed: {err}");
            }
        }
    }));
    tracing::info!(target: "sds", path = %sds_path.display(), identity = %cfg.identity(), "SDS server starting");

    // 3. XDS proxy.
    let xds_path = cfg.xds_socket();
    let upstream = UpstreamConfig::from_agent(&cfg);
    tracing::info!(target: "xdsproxy", path = %xds_path.display(), upstream = %upstream.addr, server_name = %upstream.server_name, "XDS proxy starting");
    let xds = XdsProxy::new(upstream, metrics.clone());
    let xds_listener_path = xds_path.clone();
    tasks.push(tokio::spawn({
        let stop = stopped(stop_rx.clone());
        async move {
            if let Err(err) = xds.serve(&xds_listener_path, stop).await {
                tracing::error!(target: "xdsproxy", "XDS proxy failed: {err}");
            }
        }
    }));

    // 4. Bootstrap.
    let labels = bootstrap::read_pod_info(Path::new(paths::POD_LABELS));
    let annotations = bootstrap::read_pod_info(Path::new(paths::POD_ANNOTATIONS));
    let written = bootstrap::write(&cfg, &labels, &annotations)?;
    tracing::info!(path = %written.display(), node = %cfg.node_id(), "bootstrap written");

    // 5. The proxy, or agent-only mode.
    let mut lifecycle = Lifecycle {
        term,
        int,
        control: Some(control_rx),
        phase: phase_tx,
        admin,
        termination_drain: cfg.proxy_config.termination_drain_duration,
        exit_on_zero_active_connections: cfg.exit_on_zero_active_connections,
        minimum_drain: cfg.minimum_drain_duration,
    };
    let result = if cfg.disable_envoy {
        tracing::info!(
            "DISABLE_ENVOY is set: running the agent only (SDS and XDS proxy), no proxy process"
        );
        Ok(lifecycle.run_without_proxy().await)
    } else {
        let binary = proxy_binary(&cfg);
        let supervisor = Supervisor::new(
            binary.clone(),
            proxy_args(&cfg),
            policy,
            table,
            metrics.clone(),
            proxy_tx,
        );
        lifecycle.run_with_proxy(supervisor, binary).await
    };

    // Close: SDS, XDS and status servers, then the certificate manager.
    let _ = stop_tx.send(true);
    manager_task.abort();
    for task in tasks {
        if tokio::time::timeout(CLOSE_TIMEOUT, task).await.is_err() {
            tracing::warn!("a server did not close within {CLOSE_TIMEOUT:?}");
        }
    }
    let _ = std::fs::remove_file(&sds_path);
    let _ = std::fs::remove_file(&xds_path);
    if let Ok(outcome) = &result {
        tracing::info!(?outcome, "agent has terminated");
    }
    result
}

/// The signal, control and drain handling once everything is started.
struct Lifecycle {
    term: Signal,
    int: Signal,
    /// `None` once closed (no status server): then only signals drive the lifecycle.
    control: Option<mpsc::Receiver<Control>>,
    phase: watch::Sender<Phase>,
    admin: ProxyAdmin,
    termination_drain: Duration,
    exit_on_zero_active_connections: bool,
    minimum_drain: Duration,
}

/// What ended the wait for the drain.
enum DrainEnd {
    /// The drain period (or the active-connection wait) is over.
    Complete,
    /// The proxy exited meanwhile.
    ProxyExited(SupervisorExit),
    /// A second signal or `/quitquitquit`: stop now.
    Cut(&'static str),
}

impl Lifecycle {
    async fn run_without_proxy(&mut self) -> Outcome {
        loop {
            tokio::select! {
                _ = self.term.recv() => { tracing::info!("SIGTERM received, exiting"); break Outcome::Terminated }
                _ = self.int.recv() => { tracing::info!("SIGINT received, exiting"); break Outcome::Terminated }
                control = next_control(&mut self.control) => match control {
                    Control::Quit => break Outcome::Quit,
                    Control::DrainNow(reply) => {
                        self.phase.send_replace(Phase::Drained);
                        let _ = reply.send(Ok(()));
                    }
                },
            }
        }
    }

    async fn run_with_proxy(
        &mut self,
        supervisor: Supervisor,
        binary: String,
    ) -> Result<Outcome, AppError> {
        let (mode, mode_rx) = watch::channel(Mode::Run);
        let mut sup = tokio::spawn(supervisor.run(mode_rx));
        let mut drained = false;
        loop {
            tokio::select! {
                exit = &mut sup => {
                    let exit = exit.unwrap_or(SupervisorExit::Stopped(None));
                    self.phase.send_replace(Phase::Terminating);
                    return match exit {
                        SupervisorExit::ProxyExited(exit) => Ok(Outcome::ProxyExited(exit)),
                        SupervisorExit::GaveUp { restarts, last } => Ok(Outcome::ProxyGaveUp { restarts, last }),
                        SupervisorExit::SpawnFailed(reason) => Err(AppError::Proxy { binary, reason }),
                        SupervisorExit::Stopped(_) => Ok(Outcome::Terminated),
                    };
                }
                _ = self.term.recv() => return Ok(self.terminate("SIGTERM", drained, &mode, sup).await),
                _ = self.int.recv() => return Ok(self.terminate("SIGINT", drained, &mode, sup).await),
                control = next_control(&mut self.control) => match control {
                    Control::Quit => {
                        self.phase.send_replace(Phase::Terminating);
                        mode.send_replace(Mode::Kill);
                        let _ = sup.await;
                        return Ok(Outcome::Quit);
                    }
                    Control::DrainNow(reply) => {
                        // pilot-agent's DrainNow: drain without exiting; a later SIGTERM then exits at once.
                        self.phase.send_replace(Phase::Drained);
                        drained = true;
                        let result = self.admin.drain_listeners("graceful&skip_exit").await.map_err(|e| e.to_string());
                        if let Err(err) = &result {
                            tracing::warn!("draining the proxy failed: {err}");
                        }
                        let _ = reply.send(result);
                    }
                },
            }
        }
    }

    async fn terminate(
        &mut self,
        signal: &'static str,
        drained: bool,
        mode: &watch::Sender<Mode>,
        mut sup: JoinHandle<SupervisorExit>,
    ) -> Outcome {
        // Readiness fails from here on.
        self.phase.send_replace(Phase::Terminating);
        if drained {
            tracing::info!("{signal} received; the proxy was already drained: stopping it now");
            mode.send_replace(Mode::Kill);
            let _ = sup.await;
            return Outcome::Terminated;
        }
        // No restart from now on, whatever happens to the proxy.
        mode.send_replace(Mode::Drain);
        tracing::info!("{signal} received: draining the proxy");
        let end = {
            // The drain call is inside the wait, so a second signal also cuts a hanging admin call.
            let admin = self.admin.clone();
            let (termination_drain, zero_cx, minimum_drain) = (
                self.termination_drain,
                self.exit_on_zero_active_connections,
                self.minimum_drain,
            );
            let wait = async move {
                if let Err(err) = admin.drain_listeners("graceful").await {
                    tracing::warn!("error invoking the proxy's drain listeners endpoint: {err}");
                }
                drain_wait(admin, termination_drain, zero_cx, minimum_drain).await
            };
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    _ = &mut wait => break DrainEnd::Complete,
                    exit = &mut sup => break DrainEnd::ProxyExited(exit.unwrap_or(SupervisorExit::Stopped(None))),
                    _ = self.term.recv() => break DrainEnd::Cut("second SIGTERM"),
                    _ = self.int.recv() => break DrainEnd::Cut("SIGINT"),
                    control = next_control(&mut self.control) => match control {
                        Control::Quit => break DrainEnd::Cut("/quitquitquit"),
                        Control::DrainNow(reply) => { let _ = reply.send(Err("the agent is terminating".to_owned())); }
                    },
                }
            }
        };
        match end {
            DrainEnd::Complete => {
                tracing::info!("graceful termination complete: stopping the proxy");
                mode.send_replace(Mode::Stop);
                let _ = sup.await;
            }
            DrainEnd::ProxyExited(exit) => {
                tracing::info!(?exit, "the proxy exited during the drain")
            }
            DrainEnd::Cut(why) => {
                tracing::warn!("{why} during the drain: stopping the proxy now");
                mode.send_replace(Mode::Kill);
                let _ = sup.await;
            }
        }
        Outcome::Terminated
    }
}

/// The next request from the status server; never completes once the channel is closed (no status
/// server, or it stopped).
async fn next_control(control: &mut Option<mpsc::Receiver<Control>>) -> Control {
    if let Some(rx) = control.as_mut() {
        if let Some(c) = rx.recv().await {
            return c;
        }
        *control = None;
    }
    std::future::pending().await
}

/// Waits as pilot-agent does after `drain_listeners`: `termination_drain`, or with
/// `exit_on_zero_active_connections` the `minimum_drain` and then until no active connection is left
/// (or the count is unavailable, or 5 polls in a row failed).
async fn drain_wait(
    admin: ProxyAdmin,
    termination_drain: Duration,
    exit_on_zero_active_connections: bool,
    minimum_drain: Duration,
) {
    if !exit_on_zero_active_connections {
        tracing::info!("graceful termination period is {termination_drain:?}, starting");
        tokio::time::sleep(termination_drain).await;
        return;
    }
    tracing::info!(
        "draining the proxy for {minimum_drain:?}, then waiting for active connections to end"
    );
    tokio::time::sleep(minimum_drain).await;
    let mut poll = tokio::time::interval(ACTIVE_CX_POLL);
    let mut errors = 0;
    loop {
        poll.tick().await;
        match admin.active_connections().await {
            Ok(None) => {
                tracing::info!(
                    "downstream_cx_active is not available: not waiting for connections"
                );
                return;
            }
            Ok(Some(0)) => {
                tracing::info!("there are no more active connections");
                return;
            }
            Ok(Some(n)) => {
                errors = 0;
                tracing::info!("there are still {n} active connections");
            }
            Err(err) => {
                errors += 1;
                tracing::warn!(errors, "reading active connections failed: {err}");
                if errors >= ACTIVE_CX_MAX_ERRORS {
                    return;
                }
            }
        }
    }
}

/// The proxy binary: `ProxyConfig.binaryPath` unless it is Istio's Envoy default, else `proxy` beside
/// the agent executable.
pub fn proxy_binary(cfg: &AgentConfig) -> String {
    let configured = &cfg.proxy_config.binary_path;
    if !configured.is_empty() && configured != "/usr/local/bin/envoy" {
        return configured.clone();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("proxy")))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "proxy".to_owned())
}

/// pilot-agent's argument list for the proxy (reference/istio-facts.md §1.12).
pub fn proxy_args(cfg: &AgentConfig) -> Vec<String> {
    let mut args = vec![
        "-c".to_owned(),
        cfg.bootstrap_path().display().to_string(),
        "--drain-time-s".to_owned(),
        cfg.proxy_config.drain_duration.as_secs().to_string(),
        "--drain-strategy".to_owned(),
        "immediate".to_owned(),
        "--local-address-ip-version".to_owned(),
        if cfg.instance_ips.iter().all(|ip| ip.is_ipv6()) {
            "v6"
        } else {
            "v4"
        }
        .to_owned(),
        "--file-flush-interval-msec".to_owned(),
        "1000".to_owned(),
        "--disable-hot-restart".to_owned(),
        "--allow-unknown-static-fields".to_owned(),
    ];
    // `--proxyLogLevel` may carry `scope:level` parts: those become --component-log-level.
    let (level, components): (Vec<&str>, Vec<&str>) = cfg
        .proxy_log_level
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .partition(|p| !p.contains(':'));
    if let Some(l) = level.first() {
        args.push("-l".to_owned());
        args.push((*l).to_owned());
    }
    if !components.is_empty() {
        args.push("--component-log-level".to_owned());
        args.push(components.join(","));
    } else if !cfg.proxy_component_log_level.is_empty() {
        args.push("--component-log-level".to_owned());
        args.push(cfg.proxy_component_log_level.clone());
    }
    args.push("--skip-deprecated-logs".to_owned());
    if cfg.concurrency > 0 {
        args.push("--concurrency".to_owned());
        args.push(cfg.concurrency.to_string());
    }
    args
}
