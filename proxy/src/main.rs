//! `proxy`: the waypoint proxy, started by the agent with Envoy's command line.

use std::{process::ExitCode, sync::Arc};

use proxy::{admin, bootstrap, cli, server::Server, xds};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match cli::parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("proxy: {e}");
            return ExitCode::from(1);
        }
    };
    waypoint_shared::logging::init(
        &cli::tracing_filter(&options.log_level, &options.component_log_level),
        false,
    );
    for flag in &options.ignored {
        tracing::warn!("accepted without effect: {flag}");
    }
    let loaded = match bootstrap::load(
        options.config_path.as_deref(),
        options.config_yaml.as_deref(),
    ) {
        Ok(b) => b,
        Err(e) => {
            eprintln!(
                "proxy: bootstrap {}: {e}",
                options
                    .config_path
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            );
            return ExitCode::from(1);
        }
    };
    if options.mode == cli::Mode::Validate {
        println!(
            "configuration '{}' OK",
            options
                .config_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    let threads = if options.concurrency > 0 {
        options.concurrency
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("proxy: runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(run(Server::new(options, loaded)))
}

async fn run(server: Arc<Server>) -> ExitCode {
    if let Some(addr) = server.bootstrap.admin {
        match admin::serve(server.clone(), addr).await {
            Ok(bound) => tracing::info!(target: "admin", %bound, "admin listening"),
            Err(e) => {
                tracing::error!(target: "admin", %addr, "cannot bind admin: {e}");
                return ExitCode::from(1);
            }
        }
    }
    match server.bootstrap.ads.clone() {
        Some(ads) => {
            let workloads = server.bootstrap.node.id.starts_with("waypoint~")
                || has_workload_discovery(&server);
            tokio::spawn(xds::ads::run(server.clone(), ads, workloads));
        }
        None => server.set_state(proxy::server::ServerState::Live),
    }
    let mut shutdown = server.shutdown.subscribe();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("signals: {e}");
            return ExitCode::from(1);
        }
    };
    tokio::select! {
        _ = shutdown.wait_for(|s| *s) => tracing::info!("quitquitquit: exiting"),
        _ = term.recv() => tracing::info!("SIGTERM: exiting"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: exiting"),
    }
    ExitCode::SUCCESS
}

/// Whether the bootstrap carries Istio's workload-discovery extension (WDS subscription).
fn has_workload_discovery(server: &Server) -> bool {
    server
        .bootstrap
        .bootstrap
        .bootstrap_extensions
        .iter()
        .any(|e| {
            e.typed_config.as_ref().is_some_and(|t| {
                t.type_url.ends_with("istio.workload.BootstrapExtension")
                    || (t.type_url.ends_with("TypedStruct")
                        && String::from_utf8_lossy(&t.value)
                            .contains("istio.workload.BootstrapExtension"))
            })
        })
}
