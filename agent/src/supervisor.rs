//! Proxy supervision: spawning the proxy with pilot-agent's argument list, restarting it when it
//! exits unexpectedly, stopping it on request, and reaping every child (the agent is PID 1 in a
//! container that has no init).
//!
//! **Difference from pilot-agent.** pilot-agent starts Envoy once and exits when it exits, leaving the
//! restart to Kubernetes (reference/istio-facts.md §1.12). We restart the proxy with capped exponential
//! backoff instead: the SDS and XDS sockets stay up, so the new proxy gets its certificate and config
//! from the agent at once, without a new CSR or a pod restart. `EXIT_ON_PROXY_EXIT=true` restores
//! pilot-agent's behaviour. Restarts are logged and counted in `istio_agent_proxy_restarts`.
//!
//! **Reaping.** One task, [`ProcessTable`], owns every `waitpid` of the agent: it spawns the proxy
//! (so the child is registered before it can be reaped), reaps on `SIGCHLD` (and a 1 s sweep, as
//! signals coalesce), hands the proxy's exit status to its waiter and, when the agent is PID 1, also
//! reaps with `waitpid(-1, WNOHANG)` the orphans re-parented to it. Signals go through it too, so a
//! pid is never signalled after it was reaped (and possibly reused). Nothing else in the agent may
//! wait on children (no `tokio::process`).

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    process::Command,
    time::Duration,
};

use nix::{
    errno::Errno,
    sys::{
        signal::{Signal, kill},
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::Pid,
};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};
use waypoint_shared::backoff::Backoff;

use crate::metrics::AgentMetrics;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessExit {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Signaled(Signal),
}

impl ProcessExit {
    /// Whether it exited with code 0.
    pub fn success(self) -> bool {
        self == ProcessExit::Exited(0)
    }
}

impl fmt::Display for ProcessExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProcessExit::Exited(code) => write!(f, "exit code {code}"),
            ProcessExit::Signaled(sig) => write!(f, "signal: {}", sig.as_str()),
        }
    }
}

/// Errors of the process table.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program could not be started.
    #[error("spawn {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// `SIGCHLD` could not be watched.
    #[error("watching SIGCHLD: {0}")]
    Signal(std::io::Error),
    /// The process table task is gone.
    #[error("the process table has stopped")]
    Closed,
}

enum TableRequest {
    Spawn {
        command: Box<Command>,
        reply: oneshot::Sender<Result<(u32, oneshot::Receiver<ProcessExit>), ProcessError>>,
    },
    Signal {
        pid: u32,
        signal: Signal,
    },
}

/// A handle on the task that spawns, signals and reaps the agent's children.
#[derive(Debug, Clone)]
pub struct ProcessTable {
    tx: mpsc::Sender<TableRequest>,
}

impl fmt::Debug for TableRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableRequest::Spawn { command, .. } => write!(f, "Spawn({:?})", command.get_program()),
            TableRequest::Signal { pid, signal } => write!(f, "Signal({pid}, {signal})"),
        }
    }
}

impl ProcessTable {
    /// Starts the table's task. It lives as long as the runtime: as PID 1 the agent must keep reaping
    /// re-parented orphans until it exits.
    pub fn start() -> Result<ProcessTable, ProcessError> {
        let sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
            .map_err(ProcessError::Signal)?;
        let (tx, rx) = mpsc::channel(16);
        // Only PID 1 inherits orphans, so only PID 1 reaps with `waitpid(-1)`; elsewhere the table
        // waits for its own children only and leaves other code's children alone.
        let reap_all = std::process::id() == 1;
        if reap_all {
            tracing::info!("running as PID 1: reaping every child process");
        }
        tokio::spawn(run_table(rx, sigchld, reap_all));
        Ok(ProcessTable { tx })
    }

    /// Spawns `command`; returns its pid and a receiver of its exit.
    pub async fn spawn(
        &self,
        command: Command,
    ) -> Result<(u32, oneshot::Receiver<ProcessExit>), ProcessError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(TableRequest::Spawn {
                command: Box::new(command),
                reply,
            })
            .await
            .map_err(|_| ProcessError::Closed)?;
        rx.await.map_err(|_| ProcessError::Closed)?
    }

    /// Sends `signal` to `pid` if it is a child we have not reaped yet.
    pub async fn signal(&self, pid: u32, signal: Signal) {
        let _ = self.tx.send(TableRequest::Signal { pid, signal }).await;
    }
}

async fn run_table(
    mut rx: mpsc::Receiver<TableRequest>,
    mut sigchld: tokio::signal::unix::Signal,
    reap_all: bool,
) {
    let mut waiters: HashMap<u32, oneshot::Sender<ProcessExit>> = HashMap::new();
    // A safety net: SIGCHLD is coalesced by the kernel, and a missed one must not leave a zombie.
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut open = true;
    loop {
        tokio::select! {
            req = rx.recv(), if open => match req {
                Some(TableRequest::Spawn { mut command, reply }) => {
                    let program = command.get_program().to_string_lossy().into_owned();
                    let result = command.spawn().map_err(|source| ProcessError::Spawn { program, source }).map(|child| {
                        // The `Child` is dropped without waiting: this task reaps it.
                        let pid = child.id();
                        let (tx, exit) = oneshot::channel();
                        waiters.insert(pid, tx);
                        (pid, exit)
                    });
                    let _ = reply.send(result);
                }
                Some(TableRequest::Signal { pid, signal }) => {
                    if waiters.contains_key(&pid)
                        && let Ok(raw) = i32::try_from(pid)
                        && let Err(err) = kill(Pid::from_raw(raw), signal)
                    {
                        tracing::warn!(pid, %signal, "signalling the proxy failed: {err}");
                    }
                }
                None => open = false,
            },
            _ = sigchld.recv() => reap(&mut waiters, reap_all),
            _ = sweep.tick() => reap(&mut waiters, reap_all),
        }
    }
}

/// Reaps exited children without blocking: every child when `all` (PID 1), else the registered ones.
fn reap(waiters: &mut HashMap<u32, oneshot::Sender<ProcessExit>>, all: bool) {
    if all {
        while let Some((pid, exit)) = wait_one(None) {
            match waiters.remove(&pid) {
                Some(tx) => {
                    let _ = tx.send(exit);
                }
                None => tracing::info!(pid, %exit, "reaped an orphaned process"),
            }
        }
    } else {
        let pids: Vec<u32> = waiters.keys().copied().collect();
        for pid in pids {
            let Ok(raw) = i32::try_from(pid) else {
                continue;
            };
            if let Some((_, exit)) = wait_one(Some(Pid::from_raw(raw)))
                && let Some(tx) = waiters.remove(&pid)
            {
                let _ = tx.send(exit);
            }
        }
    }
}

/// One non-blocking `waitpid(pid or -1)`: `Some` when a child was reaped.
fn wait_one(pid: Option<Pid>) -> Option<(u32, ProcessExit)> {
    loop {
        let (pid, exit) = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, ProcessExit::Exited(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, ProcessExit::Signaled(sig)),
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return None,
            // Stopped/continued/ptrace events are not exits.
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(err) => {
                tracing::warn!("waitpid failed: {err}");
                return None;
            }
        };
        return u32::try_from(pid.as_raw()).ok().map(|pid| (pid, exit));
    }
}

/// When and how often to restart a proxy that exited on its own.
#[derive(Debug, Clone, PartialEq)]
pub struct RestartPolicy {
    /// First restart delay (`PROXY_RESTART_BACKOFF_BASE`, default 100 ms).
    pub backoff_base: Duration,
    /// Longest restart delay (`PROXY_RESTART_BACKOFF_MAX`, default 30 s).
    pub backoff_max: Duration,
    /// Give up (the agent exits 1) after this many restarts without a stable run
    /// (`PROXY_MAX_RESTARTS`, default 10; 0 = never give up).
    pub max_restarts: u32,
    /// A proxy that ran this long resets the backoff and the restart count
    /// (`PROXY_RESTART_STABLE_PERIOD`, default 60 s).
    pub stable_period: Duration,
    /// Exit instead of restarting (`EXIT_ON_PROXY_EXIT`, pilot-agent's behaviour).
    pub exit_on_proxy_exit: bool,
    /// SIGTERM-to-SIGKILL grace when stopping the proxy (`PROXY_STOP_GRACE`, default 3 s).
    pub stop_grace: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            max_restarts: 10,
            stable_period: Duration::from_secs(60),
            exit_on_proxy_exit: false,
            stop_grace: Duration::from_secs(3),
        }
    }
}

/// A malformed restart setting.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("environment variable {name}={value:?}: {reason}")]
pub struct PolicyError {
    /// The variable.
    pub name: String,
    /// Its value.
    pub value: String,
    /// What is wrong.
    pub reason: String,
}

impl RestartPolicy {
    /// Reads the `PROXY_RESTART_*`, `PROXY_MAX_RESTARTS` and `PROXY_STOP_GRACE` variables (Go
    /// durations) over the defaults; `exit_on_proxy_exit` comes from the agent configuration.
    pub fn from_env(
        env: &BTreeMap<String, String>,
        exit_on_proxy_exit: bool,
    ) -> Result<Self, PolicyError> {
        let mut policy = RestartPolicy {
            exit_on_proxy_exit,
            ..RestartPolicy::default()
        };
        let get = |k: &str| env.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let err = |name: &str, value: &str, reason: String| PolicyError {
            name: name.to_owned(),
            value: value.to_owned(),
            reason,
        };
        let duration = |name: &str, slot: &mut Duration| -> Result<(), PolicyError> {
            if let Some(v) = get(name) {
                *slot = crate::config::parse_duration(v).map_err(|e| err(name, v, e))?;
            }
            Ok(())
        };
        duration("PROXY_RESTART_BACKOFF_BASE", &mut policy.backoff_base)?;
        duration("PROXY_RESTART_BACKOFF_MAX", &mut policy.backoff_max)?;
        duration("PROXY_RESTART_STABLE_PERIOD", &mut policy.stable_period)?;
        duration("PROXY_STOP_GRACE", &mut policy.stop_grace)?;
        if let Some(v) = get("PROXY_MAX_RESTARTS") {
            policy.max_restarts = v.parse().map_err(|_| {
                err(
                    "PROXY_MAX_RESTARTS",
                    v,
                    "not a non-negative integer".to_owned(),
                )
            })?;
        }
        if policy.backoff_base.is_zero() || policy.backoff_base > policy.backoff_max {
            return Err(err(
                "PROXY_RESTART_BACKOFF_BASE",
                &format!("{:?}", policy.backoff_base),
                format!(
                    "must be positive and at most PROXY_RESTART_BACKOFF_MAX ({:?})",
                    policy.backoff_max
                ),
            ));
        }
        Ok(policy)
    }
}

/// What the supervisor should do with the proxy, set by the agent's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Keep a proxy running; restart it when it exits.
    Run,
    /// Draining: leave the proxy running but do not restart it; return when it exits.
    Drain,
    /// Stop it: SIGTERM, then SIGKILL after the grace.
    Stop,
    /// Kill it now (SIGKILL).
    Kill,
}

/// The proxy process as seen by readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyState {
    /// Not started yet.
    Starting,
    /// Running: the `epoch`-th proxy process (from 1) with this pid.
    Running {
        /// Which process (1 for the first, +1 per restart).
        epoch: u64,
        /// Its pid.
        pid: u32,
    },
    /// Exited; waiting to be restarted (or not, when stopping).
    Exited {
        /// How the last one ended.
        exit: ProcessExit,
    },
}

/// Why the supervisor returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SupervisorExit {
    /// The proxy ended after a drain/stop/kill request (or exited during the drain).
    Stopped(Option<ProcessExit>),
    /// The proxy exited and `EXIT_ON_PROXY_EXIT` is set.
    ProxyExited(ProcessExit),
    /// The proxy exited `restarts` times without a stable run: giving up.
    GaveUp {
        /// Restarts done in the unstable window.
        restarts: u32,
        /// The last exit.
        last: ProcessExit,
    },
    /// The proxy could not be started at all.
    SpawnFailed(String),
}

/// Runs the proxy.
pub struct Supervisor {
    binary: String,
    args: Vec<String>,
    policy: RestartPolicy,
    table: ProcessTable,
    metrics: std::sync::Arc<AgentMetrics>,
    state: watch::Sender<ProxyState>,
}

impl Supervisor {
    /// A supervisor for `binary args...`, publishing the proxy's state on `state`.
    pub fn new(
        binary: String,
        args: Vec<String>,
        policy: RestartPolicy,
        table: ProcessTable,
        metrics: std::sync::Arc<AgentMetrics>,
        state: watch::Sender<ProxyState>,
    ) -> Self {
        Supervisor {
            binary,
            args,
            policy,
            table,
            metrics,
            state,
        }
    }

    fn command(&self) -> Command {
        // stdin closed; stdout/stderr inherited so the proxy's logs flow to the agent's.
        let mut cmd = Command::new(&self.binary);
        cmd.args(&self.args).stdin(std::process::Stdio::null());
        cmd
    }

    /// Runs until the proxy is stopped by `mode`, exits for good, or cannot be started.
    pub async fn run(self, mut mode: watch::Receiver<Mode>) -> SupervisorExit {
        let mut backoff =
            Backoff::new(self.policy.backoff_base, self.policy.backoff_max).with_jitter(0.0);
        let mut unstable_restarts = 0u32;
        let mut epoch = 0u64;
        loop {
            if *mode.borrow_and_update() != Mode::Run {
                return SupervisorExit::Stopped(None);
            }
            let (pid, exit_rx) = match self.table.spawn(self.command()).await {
                Ok(spawned) => spawned,
                Err(err) if epoch == 0 => return SupervisorExit::SpawnFailed(err.to_string()),
                Err(err) => {
                    // A later spawn failure (binary replaced, fork failed) is handled like a crash.
                    tracing::error!(binary = %self.binary, "restarting the proxy failed: {err}");
                    let exit = ProcessExit::Exited(127);
                    match self
                        .next_restart(
                            &mut backoff,
                            &mut unstable_restarts,
                            Duration::ZERO,
                            exit,
                            &mut mode,
                        )
                        .await
                    {
                        Some(stop) => return stop,
                        None => continue,
                    }
                }
            };
            epoch += 1;
            let started = Instant::now();
            self.state.send_replace(ProxyState::Running { epoch, pid });
            tracing::info!(binary = %self.binary, pid, epoch, "proxy started");

            let exit = self.wait(pid, exit_rx, &mut mode).await;
            self.state.send_replace(ProxyState::Exited { exit });
            let current = *mode.borrow();
            if current != Mode::Run {
                tracing::info!(pid, %exit, "proxy stopped");
                return SupervisorExit::Stopped(Some(exit));
            }
            if exit == ProcessExit::Signaled(Signal::SIGKILL) {
                tracing::warn!(
                    pid,
                    "proxy was killed (SIGKILL): it may have run out of memory, check its usage and limits"
                );
            }
            if self.policy.exit_on_proxy_exit {
                tracing::warn!(pid, %exit, "proxy exited; EXIT_ON_PROXY_EXIT is set, so the agent exits too (pilot-agent's behaviour)");
                return SupervisorExit::ProxyExited(exit);
            }
            if let Some(stop) = self
                .next_restart(
                    &mut backoff,
                    &mut unstable_restarts,
                    started.elapsed(),
                    exit,
                    &mut mode,
                )
                .await
            {
                return stop;
            }
        }
    }

    /// Waits for the proxy to exit, acting on mode changes meanwhile.
    async fn wait(
        &self,
        pid: u32,
        mut exit_rx: oneshot::Receiver<ProcessExit>,
        mode: &mut watch::Receiver<Mode>,
    ) -> ProcessExit {
        let mut kill_at: Option<Instant> = None;
        let mut mode_open = true;
        let mut acted = Mode::Run;
        loop {
            let current = *mode.borrow_and_update();
            if current != acted {
                acted = current;
                match current {
                    Mode::Run | Mode::Drain => {}
                    Mode::Stop => {
                        tracing::info!(pid, grace = ?self.policy.stop_grace, "stopping the proxy (SIGTERM)");
                        self.table.signal(pid, Signal::SIGTERM).await;
                        kill_at = Some(Instant::now() + self.policy.stop_grace);
                    }
                    Mode::Kill => {
                        tracing::info!(pid, "killing the proxy (SIGKILL)");
                        self.table.signal(pid, Signal::SIGKILL).await;
                    }
                }
            }
            tokio::select! {
                exit = &mut exit_rx => {
                    // The table only drops the sender if it stopped, which it does not while the
                    // runtime lives; treat it as a kill.
                    return exit.unwrap_or(ProcessExit::Signaled(Signal::SIGKILL));
                }
                changed = mode.changed(), if mode_open => {
                    if changed.is_err() {
                        // The lifecycle is gone: make sure the proxy does not outlive it.
                        mode_open = false;
                        self.table.signal(pid, Signal::SIGKILL).await;
                    }
                }
                _ = sleep_until_opt(kill_at) => {
                    tracing::warn!(pid, "proxy still running after {:?}: SIGKILL", self.policy.stop_grace);
                    kill_at = None;
                    self.table.signal(pid, Signal::SIGKILL).await;
                }
            }
        }
    }

    /// Accounts for an unexpected exit and waits the backoff; `Some` when the supervisor must
    /// return instead of restarting.
    async fn next_restart(
        &self,
        backoff: &mut Backoff,
        unstable_restarts: &mut u32,
        ran_for: Duration,
        exit: ProcessExit,
        mode: &mut watch::Receiver<Mode>,
    ) -> Option<SupervisorExit> {
        if ran_for >= self.policy.stable_period {
            backoff.reset();
            *unstable_restarts = 0;
        }
        if self.policy.max_restarts > 0 && *unstable_restarts >= self.policy.max_restarts {
            tracing::error!(
                %exit,
                restarts = *unstable_restarts,
                "proxy keeps exiting: giving up after {} restarts without a stable run of {:?}",
                *unstable_restarts,
                self.policy.stable_period
            );
            return Some(SupervisorExit::GaveUp {
                restarts: *unstable_restarts,
                last: exit,
            });
        }
        *unstable_restarts += 1;
        let delay = backoff.next_delay();
        tracing::warn!(
            %exit,
            ran_for_ms = ran_for.as_millis() as u64,
            restart = *unstable_restarts,
            max_restarts = self.policy.max_restarts,
            delay_ms = delay.as_millis() as u64,
            "proxy exited unexpectedly: restarting it in {}ms (pilot-agent would exit here; set EXIT_ON_PROXY_EXIT=true for that)",
            delay.as_millis()
        );
        let deadline = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                changed = mode.changed() => {
                    if changed.is_err() || *mode.borrow() != Mode::Run {
                        return Some(SupervisorExit::Stopped(Some(exit)));
                    }
                }
            }
        }
        self.metrics.proxy_restarts.inc();
        None
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn restart_policy_from_env() {
        let p = RestartPolicy::from_env(&env(&[]), false).expect("defaults");
        assert_eq!(p, RestartPolicy::default());
        let p = RestartPolicy::from_env(
            &env(&[
                ("PROXY_RESTART_BACKOFF_MAX", "2s"),
                ("PROXY_MAX_RESTARTS", "0"),
                ("PROXY_RESTART_STABLE_PERIOD", "10s"),
            ]),
            true,
        )
        .expect("parses");
        assert_eq!(p.backoff_max, Duration::from_secs(2));
        assert_eq!(p.max_restarts, 0);
        assert_eq!(p.stable_period, Duration::from_secs(10));
        assert!(p.exit_on_proxy_exit);
        let e = RestartPolicy::from_env(&env(&[("PROXY_MAX_RESTARTS", "-1")]), false)
            .expect_err("negative");
        assert_eq!(e.name, "PROXY_MAX_RESTARTS");
        let e = RestartPolicy::from_env(&env(&[("PROXY_RESTART_BACKOFF_MAX", "50ms")]), false)
            .expect_err("max < base");
        assert_eq!(e.name, "PROXY_RESTART_BACKOFF_BASE");
    }

    fn supervisor(
        program: &str,
        args: &[&str],
        policy: RestartPolicy,
    ) -> (Supervisor, watch::Receiver<ProxyState>, Arc<AgentMetrics>) {
        let table = ProcessTable::start().expect("table");
        let metrics = Arc::new(AgentMetrics::default());
        let (tx, rx) = watch::channel(ProxyState::Starting);
        let args = args.iter().map(|s| (*s).to_owned()).collect();
        (
            Supervisor::new(program.to_owned(), args, policy, table, metrics.clone(), tx),
            rx,
            metrics,
        )
    }

    #[tokio::test]
    async fn crash_loop_backs_off_then_gives_up() {
        let policy = RestartPolicy {
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(40),
            max_restarts: 4,
            ..RestartPolicy::default()
        };
        let (sup, _state, metrics) = supervisor("sh", &["-c", "exit 3"], policy);
        let (_mode_tx, mode_rx) = watch::channel(Mode::Run);
        let exit = tokio::time::timeout(Duration::from_secs(10), sup.run(mode_rx))
            .await
            .expect("gives up in time");
        assert_eq!(
            exit,
            SupervisorExit::GaveUp {
                restarts: 4,
                last: ProcessExit::Exited(3)
            }
        );
        assert_eq!(metrics.proxy_restarts.get(), 4);
    }

    #[tokio::test]
    async fn a_stable_run_resets_the_backoff_and_the_count() {
        // Every run (300 ms) outlasts the stable period (100 ms): each exit starts the backoff over
        // at the base and resets the count, so two allowed restarts never run out. Without the
        // reset the third exit gives up, and the delays (200, 400, 800 ms ...) would push four
        // restarts past 3 s; with it they take 4 × (300 + 200) ms.
        let policy = RestartPolicy {
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            max_restarts: 2,
            stable_period: Duration::from_millis(100),
            ..RestartPolicy::default()
        };
        let (sup, _state, metrics) = supervisor("sh", &["-c", "sleep 0.3; exit 1"], policy);
        let (mode_tx, mode_rx) = watch::channel(Mode::Run);
        let started = Instant::now();
        let task = tokio::spawn(sup.run(mode_rx));
        let deadline = started + Duration::from_secs(10);
        while metrics.proxy_restarts.get() < 4 {
            assert!(
                Instant::now() < deadline && !task.is_finished(),
                "four restarts: {} so far",
                metrics.proxy_restarts.get()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(3200),
            "four restarts took {took:?}"
        );
        mode_tx.send_replace(Mode::Kill);
        let exit = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops")
            .expect("join");
        assert!(matches!(exit, SupervisorExit::Stopped(_)), "{exit:?}");
    }

    #[tokio::test]
    async fn stop_sends_sigterm_then_kill_after_grace() {
        // `sh` ignoring TERM needs the SIGKILL after the grace. It says when its trap is set.
        let marker = std::env::temp_dir().join(format!("agent-sup-trap-{}", std::process::id()));
        let _ = std::fs::remove_file(&marker);
        let policy = RestartPolicy {
            stop_grace: Duration::from_millis(200),
            ..RestartPolicy::default()
        };
        let script = format!(
            "trap '' TERM; touch '{}'; while :; do sleep 0.05; done",
            marker.display()
        );
        let (sup, mut state, _) = supervisor("sh", &["-c", &script], policy);
        let (mode_tx, mode_rx) = watch::channel(Mode::Run);
        let task = tokio::spawn(sup.run(mode_rx));
        state
            .wait_for(|s| matches!(s, ProxyState::Running { .. }))
            .await
            .expect("running");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !marker.exists() {
            assert!(Instant::now() < deadline, "the script never set its trap");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = std::fs::remove_file(&marker);
        mode_tx.send_replace(Mode::Stop);
        let exit = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops")
            .expect("join");
        assert_eq!(
            exit,
            SupervisorExit::Stopped(Some(ProcessExit::Signaled(Signal::SIGKILL)))
        );
    }

    #[tokio::test]
    async fn exit_on_proxy_exit_returns_the_status() {
        let policy = RestartPolicy {
            exit_on_proxy_exit: true,
            ..RestartPolicy::default()
        };
        let (sup, _state, metrics) = supervisor("sh", &["-c", "exit 0"], policy);
        let (_mode_tx, mode_rx) = watch::channel(Mode::Run);
        let exit = tokio::time::timeout(Duration::from_secs(5), sup.run(mode_rx))
            .await
            .expect("returns");
        assert_eq!(exit, SupervisorExit::ProxyExited(ProcessExit::Exited(0)));
        assert_eq!(metrics.proxy_restarts.get(), 0);
    }

    #[tokio::test]
    async fn missing_binary_fails_at_once() {
        let (sup, _state, _) = supervisor("/nonexistent/proxy", &[], RestartPolicy::default());
        let (_mode_tx, mode_rx) = watch::channel(Mode::Run);
        let exit = sup.run(mode_rx).await;
        assert!(
            matches!(exit, SupervisorExit::SpawnFailed(ref m) if m.contains("/nonexistent/proxy")),
            "{exit:?}"
        );
    }
}
