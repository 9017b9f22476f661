//! Process-level harness of the agent tests: the built `agent` supervising the real `proxy` in the
//! test bed's [`WaypointMesh`] (istiod-lite, echo behind an HBONE sink, the client's forwarder), on
//! a loopback /24 and free ports of its own. Every wait polls a condition with a deadline.
//!
//! The tests of one binary take [`serial`] so that only one mesh runs at a time: they assert
//! latency bounds (readiness within 100 ms of SIGTERM, a restarted proxy ready within 2 s) that a
//! second mesh starting beside them on a 2-core machine would only blur.

#![allow(dead_code)]

use std::{
    future::Future,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

use waypoint_testbed::waypoint::{MeshOptions, WaypointMesh};

/// The agent binary under test.
pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_agent"))
}

/// The `proxy` binary beside the agent. `cargo test --workspace` (and `scripts/test`'s build step)
/// build it with the agent; only when it is missing (this package tested alone on a fresh
/// checkout) does `cargo build --workspace --bins` run here. It is not rebuilt when present:
/// `cargo test` builds the binaries with the test build's features, and rebuilding them here
/// would only flip them back and forth (minutes on 2 cores). After changing the proxy, test with
/// `cargo test --workspace` or build it first.
pub fn proxy_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let bin = agent_bin();
            let dir = bin.parent().expect("binary folder");
            let path = dir.join("proxy");
            if path.is_file() {
                return path;
            }
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "--workspace", "--bins"])
                .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")));
            match dir.file_name().and_then(|n| n.to_str()) {
                Some("debug") | None => {}
                Some("release") => {
                    cmd.arg("--release");
                }
                Some(profile) => {
                    cmd.args(["--profile", profile]);
                }
            }
            let built = cmd.status().map(|s| s.success()).unwrap_or(false);
            if !built {
                assert!(path.is_file(), "building the proxy failed and {} is missing", path.display());
                eprintln!("WARNING: `cargo build --workspace --bins` failed; testing the proxy binary already built");
            }
            path
        })
        .clone()
}

/// Held by each test for its whole run: one mesh at a time per test binary (see the module docs).
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// Starts a mesh named `name` with `adjust` applied to the options; panics with the reason if it
/// does not start.
pub async fn mesh(name: &str, adjust: impl FnOnce(&mut MeshOptions)) -> WaypointMesh {
    let mut options = MeshOptions::new(name, &proxy_bin(), &agent_bin());
    adjust(&mut options);
    match WaypointMesh::start(options).await {
        Ok(mesh) => mesh,
        Err(e) => panic!("the mesh did not start: {e}"),
    }
}

/// Sets a `PROXY_CONFIG` field.
pub fn proxy_config(options: &mut MeshOptions, field: &str, value: serde_json::Value) {
    options.proxy_config.push((field.to_owned(), value));
}

/// Sets an environment variable of the agent.
pub fn env(options: &mut MeshOptions, key: &str, value: &str) {
    options.env.push((key.to_owned(), value.to_owned()));
}

/// `http://127.0.0.1:<status port><path>`.
pub fn status_url(mesh: &WaypointMesh, path: &str) -> String {
    format!("http://{}{path}", mesh.status_addr())
}

/// The agent's readiness: status code (0 when unreachable) and body.
pub async fn readiness(mesh: &WaypointMesh) -> (u16, String) {
    match agent::http_client::get(&status_url(mesh, "/healthz/ready"), Duration::from_secs(2)).await
    {
        Ok(r) => (r.status.as_u16(), r.text()),
        Err(e) => (0, e.to_string()),
    }
}

/// Polls `f` every 5 ms until it returns `Some` or `within` passes (then panics naming `what`).
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until readiness is 200, polling every 5 ms; returns how long it took. Panics with the last
/// answer and the log tail after `within`.
pub async fn wait_ready(mesh: &WaypointMesh, within: Duration) -> Duration {
    let start = Instant::now();
    let deadline = start + within;
    loop {
        let last = readiness(mesh).await;
        if last.0 == 200 {
            return start.elapsed();
        }
        if Instant::now() >= deadline {
            panic!(
                "not ready within {within:?}; last answer {last:?}\n--- log tail ---\n{}",
                mesh.log_tail(60)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits for a proxy process whose pid is not `old`; returns it.
pub async fn wait_new_proxy(mesh: &WaypointMesh, old: Option<u32>, within: Duration) -> u32 {
    eventually(within, "a (new) proxy process", || async {
        mesh.proxy_pid().filter(|p| Some(*p) != old)
    })
    .await
}

/// `kill -9 <pid>`.
pub fn kill9(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
}

/// The merged metrics from the agent's status server.
pub async fn metrics(mesh: &WaypointMesh, path: &str) -> agent::http_client::Response {
    let resp = agent::http_client::get(&status_url(mesh, path), Duration::from_secs(5))
        .await
        .expect("metrics answer");
    assert_eq!(resp.status.as_u16(), 200, "{path}: {}", resp.text());
    resp
}

/// `istio_agent_proxy_restarts` from the merged metrics.
pub async fn restarts_metric(mesh: &WaypointMesh) -> Option<u64> {
    metrics(mesh, "/stats/prometheus")
        .await
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("istio_agent_proxy_restarts "))
        .and_then(|v| v.trim().parse().ok())
}

/// The state letter of `/proc/<pid>/stat` (`R`, `S`, `Z`, ...).
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) S ppid ...`: comm may hold spaces and parentheses.
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .next()?
        .chars()
        .next()
}
