//! Process-level harness: a waypoint pod root in a temp folder, istiod-lite in-process (CA + ADS),
//! and the built `agent` binary supervising the test bed's `fake-proxy` on ports of its own, so tests
//! run in parallel. Every wait polls with a deadline.

#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};
use waypoint_testbed::istiod_lite::{Config, IstiodLite, mint_token};

/// The agent binary under test.
pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_agent"))
}

/// The test bed's `fake-proxy`, beside the agent binary. `cargo test --workspace` builds it; when only
/// this package is tested it is built here once.
pub fn fake_proxy_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = agent_bin().parent().expect("binary folder").to_path_buf();
            let path = dir.join("fake-proxy");
            let stale = match (
                std::fs::metadata(&path),
                std::fs::metadata(
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/src/bin/fake_proxy.rs"),
                ),
            ) {
                (Ok(bin), Ok(src)) => bin.modified().ok() < src.modified().ok(),
                (Err(_), _) => true,
                _ => false,
            };
            if stale {
                let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
                let mut cmd = Command::new(cargo);
                cmd.args(["build", "-p", "waypoint-testbed", "--bin", "fake-proxy"]);
                match dir.file_name().and_then(|n| n.to_str()) {
                    Some("debug") | None => {}
                    Some("release") => {
                        cmd.arg("--release");
                    }
                    Some(profile) => {
                        cmd.args(["--profile", profile]);
                    }
                }
                let status = cmd.status().expect("running cargo build for fake-proxy");
                assert!(status.success(), "building fake-proxy failed");
            }
            assert!(path.exists(), "{} missing", path.display());
            path
        })
        .clone()
}

/// A port free on all interfaces right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Polls `f` every 10 ms until it returns `Some` or `within` passes.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
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
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Ports of one pod.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// Agent status server.
    pub status: u16,
    /// Proxy admin.
    pub admin: u16,
    /// Proxy readiness listener (`ENVOY_STATUS_PORT`).
    pub envoy_status: u16,
    /// Proxy prometheus listener (`ENVOY_PROMETHEUS_PORT`).
    pub prometheus: u16,
    /// The fake proxy's slow HTTP listener.
    pub slow: u16,
}

/// How to start a pod.
#[derive(Debug, Clone)]
pub struct PodOptions {
    /// Test name (folder name part).
    pub name: &'static str,
    /// `terminationDrainDuration`.
    pub termination_drain: &'static str,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Wrap the agent: run `wrapper... agent proxy waypoint` (e.g. `unshare`).
    pub wrapper: Vec<String>,
    /// `PROXY_CONFIG` fields set over the harness's.
    pub proxy_config: Vec<(&'static str, serde_json::Value)>,
}

impl PodOptions {
    /// Defaults for a test called `name`.
    pub fn new(name: &'static str) -> Self {
        PodOptions {
            name,
            termination_drain: "5s",
            env: Vec::new(),
            wrapper: Vec::new(),
            proxy_config: Vec::new(),
        }
    }

    /// Adds an environment variable.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_owned(), v.to_owned()));
        self
    }
}

/// A running pod: istiod-lite, the agent process, and its pod root.
pub struct Pod {
    /// The pod root (the agent's working directory).
    pub root: PathBuf,
    /// The ports.
    pub ports: Ports,
    /// The agent (or its wrapper).
    pub child: Child,
    /// Agent stdout+stderr (the proxy's output goes there too).
    pub log: PathBuf,
    /// istiod-lite.
    pub istiod: IstiodLite,
}

static POD_COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Pod {
    /// Starts istiod-lite and the agent.
    pub async fn start(opts: PodOptions) -> Pod {
        // Short: the SDS/XDS socket paths must fit in sun_path.
        let n = POD_COUNTER.fetch_add(1, Ordering::SeqCst);
        let root =
            std::env::temp_dir().join(format!("agt-{}-{}-{n}", opts.name, std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("var/run/secrets/istio")).expect("mkdir");
        std::fs::create_dir_all(root.join("var/run/secrets/tokens")).expect("mkdir");
        let istiod = IstiodLite::start(Config::for_test(&root.join("istiod-ca")))
            .await
            .expect("istiod-lite starts");
        std::fs::write(
            root.join("var/run/secrets/istio/root-cert.pem"),
            istiod.root_cert_pem(),
        )
        .expect("root cert");
        std::fs::write(
            root.join("var/run/secrets/tokens/istio-token"),
            mint_token("default", "waypoint", Duration::from_secs(3600)),
        )
        .expect("token");

        let ports = Ports {
            status: free_port(),
            admin: free_port(),
            envoy_status: free_port(),
            prometheus: free_port(),
            slow: free_port(),
        };
        let mut proxy_config = serde_json::json!({
            "discoveryAddress": istiod.addr.to_string(),
            "statusPort": ports.status,
            "proxyAdminPort": ports.admin,
            "binaryPath": fake_proxy_bin().display().to_string(),
            "terminationDrainDuration": opts.termination_drain,
        });
        for (k, v) in &opts.proxy_config {
            proxy_config[*k] = v.clone();
        }
        let log = root.join("agent.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut argv: Vec<String> = opts.wrapper.clone();
        argv.push(agent_bin().display().to_string());
        argv.extend(["proxy", "waypoint", "--log_output_level", "default:info"].map(str::to_owned));
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .current_dir(&root)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .env("POD_NAME", "waypoint-test")
            .env("POD_NAMESPACE", "default")
            .env("SERVICE_ACCOUNT", "waypoint")
            .env("INSTANCE_IP", "127.0.0.1")
            .env("CA_ADDR", istiod.addr.to_string())
            .env("PROXY_CONFIG", proxy_config.to_string())
            .env("ENVOY_STATUS_PORT", ports.envoy_status.to_string())
            .env("ENVOY_PROMETHEUS_PORT", ports.prometheus.to_string())
            .env("DISABLE_ENVOY", "false")
            .env("FAKE_PROXY_SLOW_ADDR", format!("127.0.0.1:{}", ports.slow))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("agent starts");
        Pod {
            root,
            ports,
            child,
            log,
            istiod,
        }
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `http://127.0.0.1:<status port><path>`.
    pub fn status_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports.status)
    }

    /// The readiness status code (0 when unreachable) and body.
    pub async fn readiness(&self) -> (u16, String) {
        match agent::http_client::get(&self.status_url("/healthz/ready"), Duration::from_secs(5))
            .await
        {
            Ok(r) => (r.status.as_u16(), r.text()),
            Err(e) => (0, e.to_string()),
        }
    }

    /// Waits until readiness is 200; returns how long it took.
    pub async fn wait_ready(&self, within: Duration) -> Duration {
        let start = Instant::now();
        let deadline = start + within;
        loop {
            let last = self.readiness().await;
            if last.0 == 200 {
                return start.elapsed();
            }
            if Instant::now() >= deadline {
                panic!(
                    "not ready within {within:?}; last answer {last:?}\n--- agent log ---\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The current proxy's pid, from the fake proxy's pid file.
    pub fn proxy_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.root.join("fake-proxy.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Waits for a proxy whose pid differs from `old`.
    pub async fn wait_new_proxy(&self, old: Option<u32>, within: Duration) -> u32 {
        eventually(within, "a new proxy", || async {
            self.proxy_pid().filter(|p| Some(*p) != old)
        })
        .await
    }

    /// Sends `sig` to the agent (or its wrapper).
    pub fn signal(&self, sig: Signal) {
        nix::sys::signal::kill(Pid::from_raw(self.child.id() as i32), sig)
            .expect("signal the agent");
    }

    /// The agent's exit status, if it exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits for the agent to exit; returns the status and when it happened.
    pub async fn wait_exit(&mut self, within: Duration) -> (ExitStatus, Instant) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_exit() {
                return (status, Instant::now());
            }
            if Instant::now() >= deadline {
                panic!(
                    "agent still running after {within:?}\n--- agent log ---\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `istio_agent_proxy_restarts` from the merged metrics.
    pub async fn restarts_metric(&self) -> Option<u64> {
        let resp = agent::http_client::get(
            &self.status_url("/stats/prometheus"),
            Duration::from_secs(5),
        )
        .await
        .ok()?;
        resp.text()
            .lines()
            .find_map(|l| l.strip_prefix("istio_agent_proxy_restarts "))
            .and_then(|v| v.trim().parse().ok())
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // The fake proxy exits by itself once its parent is gone; make sure of it (the pid file may
        // be stale or hold a pid of another namespace, so check what the pid is first).
        if let Some(pid) = self.proxy_pid()
            && is_fake_proxy(pid)
        {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        if std::thread::panicking() {
            eprintln!(
                "--- agent log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// `/proc/<pid>/cmdline` split at NULs.
pub fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `pid` (host namespace) is a running fake proxy (not its orphan sleeper).
pub fn is_fake_proxy(pid: u32) -> bool {
    let args = cmdline(pid);
    args.first().is_some_and(|a| a.ends_with("fake-proxy"))
        && !args.iter().any(|a| a == "--orphan-sleep-ms")
}

/// One process as `/proc/<pid>/stat` shows it.
#[derive(Debug, Clone)]
pub struct ProcInfo {
    /// Host pid.
    pub pid: u32,
    /// Parent pid (host).
    pub ppid: u32,
    /// State letter (`R`, `S`, `Z`, ...).
    pub state: char,
    /// Command line.
    pub cmdline: Vec<String>,
}

/// Every process visible in `/proc`.
pub fn processes() -> Vec<ProcInfo> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) S ppid ...`: comm may hold spaces and parentheses, so split after the last ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        let mut fields = rest.split_whitespace();
        let state = fields.next()?.chars().next()?;
        let ppid = fields.next()?.parse().ok()?;
        Some(ProcInfo {
            pid,
            ppid,
            state,
            cmdline: cmdline(pid),
        })
    })
    .collect()
}
