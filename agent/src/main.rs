//! `agent`: a Rust replacement for Istio's pilot-agent in a waypoint pod.
//!
//! `agent proxy <waypoint|sidecar|router> [flags]` runs the agent; `agent version` prints the version.

use std::process::ExitCode;

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
        other => {
            eprintln!(
                "usage: agent proxy <waypoint|sidecar|router> [--domain D] [flags] | agent version (got {other:?})"
            );
            ExitCode::from(2)
        }
    }
}

fn run_proxy(args: &[String]) -> ExitCode {
    let env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("agent: tokio runtime: {err}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(agent::app::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("agent failed: {err}");
            ExitCode::from(1)
        }
    }
}
