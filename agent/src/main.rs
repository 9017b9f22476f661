//! `agent`: a Rust replacement for Istio's pilot-agent in a waypoint pod.
//!
//! - `agent proxy <waypoint|sidecar|router> [flags]` runs the agent (and supervises the proxy);
//! - `agent wait [--timeoutSeconds 60 --requestTimeoutMillis 500 --periodMillis 500 --url U]` polls
//!   readiness until it is 200 (exit 0) or the timeout passes (exit 1);
//! - `agent request <METHOD> <PATH> [body] [--debug-port 15000]` calls a local port and prints the
//!   body (exit 0 on 2xx);
//! - `agent version` prints the version.

use std::{collections::BTreeMap, io::Write as _, process::ExitCode};

use agent::commands::{RequestArgs, WaitArgs};

const USAGE: &str = "usage: agent proxy <waypoint|sidecar|router> [flags] | agent wait [flags] | agent request <METHOD> <PATH> [body] [--debug-port P] | agent version";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("version") => {
            println!(
                "agent version {} (reports Istio {})",
                env!("CARGO_PKG_VERSION"),
                agent::config::DEFAULT_ISTIO_VERSION
            );
            ExitCode::SUCCESS
        }
        Some("proxy") => run_proxy(&args),
        Some("wait") => run_wait(&args[1..]),
        Some("request") => run_request(&args[1..]),
        other => {
            eprintln!("{USAGE} (got {other:?})");
            ExitCode::from(2)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|err| {
            eprintln!("agent: tokio runtime: {err}");
            ExitCode::from(1)
        })
}

fn run_proxy(args: &[String]) -> ExitCode {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let cfg = match agent::config::load(args, &env) {
        Ok(cfg) => cfg,
        Err(err) => {
            eprintln!("agent: {err}");
            return ExitCode::from(1);
        }
    };
    waypoint_shared::logging::init(
        &waypoint_shared::logging::istio_scopes_to_filter(&cfg.log_output_level),
        cfg.log_as_json,
    );
    for flag in &cfg.ignored_flags {
        tracing::warn!("ignoring unknown flag {flag}");
    }
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = runtime.block_on(agent::app::run(cfg));
    // Do not wait for blocking tasks (none should matter once the proxy is gone).
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(outcome) => ExitCode::from(outcome.exit_code()),
        Err(err) => {
            tracing::error!("agent failed: {err}");
            ExitCode::from(1)
        }
    }
}

fn run_wait(args: &[String]) -> ExitCode {
    waypoint_shared::logging::init("info", false);
    let wait = match WaitArgs::parse(args) {
        Ok(w) => w,
        Err(err) => {
            eprintln!("agent wait: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(agent::commands::wait(&wait)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("agent wait: {err}");
            ExitCode::from(1)
        }
    }
}

/// The agent's own ports, allowed for `request` besides pilot-agent's fixed list when configured
/// differently (`PROXY_CONFIG` proxyAdminPort/statusPort, `ENVOY_STATUS_PORT`).
fn configured_ports() -> Vec<u16> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    match agent::config::load(&["proxy".to_owned()], &env) {
        Ok(cfg) => vec![
            cfg.proxy_config.proxy_admin_port,
            cfg.proxy_config.status_port,
            cfg.envoy_status_port,
        ],
        Err(_) => Vec::new(),
    }
}

fn run_request(args: &[String]) -> ExitCode {
    // Nothing but the response body goes to stdout: istioctl parses it.
    let request = match RequestArgs::parse(args, &configured_ports()) {
        Ok(r) => r,
        Err(err) => {
            eprintln!("agent request: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(agent::commands::request(&request)) {
        Ok(resp) => {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&resp.body);
            let _ = out.flush();
            if resp.status.is_success() {
                ExitCode::SUCCESS
            } else {
                eprintln!("agent request: HTTP status {}", resp.status.as_u16());
                ExitCode::from(1)
            }
        }
        Err(err) => {
            eprintln!("agent request: {err}");
            ExitCode::from(1)
        }
    }
}
