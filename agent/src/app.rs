//! Start-up order and lifetime of the agent's parts, as pilot-agent: certificate manager and SDS
//! server → XDS proxy → bootstrap → proxy process (unless `DISABLE_ENVOY`).

use std::{path::Path, sync::Arc};

use tokio::sync::watch;

use crate::{
    bootstrap,
    ca::{CaClient, CaClientConfig},
    config::{AgentConfig, paths},
    metrics::AgentMetrics,
    sds::SdsService,
    secrets::{RotationPolicy, SecretManager},
    xds_proxy::{UpstreamConfig, XdsProxy},
};

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
    /// The proxy could not be started.
    #[error("proxy {binary}: {reason}")]
    Proxy {
        /// The binary.
        binary: String,
        /// Why.
        reason: String,
    },
}

/// Runs the agent until SIGTERM/SIGINT (or, with a proxy, until the proxy exits).
pub async fn run(cfg: AgentConfig) -> Result<(), AppError> {
    let metrics = Arc::new(AgentMetrics::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    // 1. Certificates: manager + SDS server (the socket exists before the proxy starts).
    let signer = CaClient::new(CaClientConfig::from_agent(&cfg));
    let manager = SecretManager::new(
        signer,
        cfg.key_kind,
        cfg.identity(),
        RotationPolicy::from_agent(&cfg),
        metrics.clone(),
    );
    let secrets = manager.subscribe();
    let manager_task = tokio::spawn(manager.run());
    let sds_path = cfg.sds_socket();
    let sds = SdsService::new(secrets.clone(), metrics.clone());
    let sds_listener_path = sds_path.clone();
    let sds_task = tokio::spawn({
        let stop = stopped(stop_rx.clone());
        async move {
            if let Err(err) = sds.serve(&sds_listener_path, stop).await {
                tracing::error!(target: "sds", "SDS server failed: {err}");
            }
        }
    });
    tracing::info!(target: "sds", path = %sds_path.display(), identity = %cfg.identity(), "SDS server starting");

    // 2. XDS proxy.
    let xds_path = cfg.xds_socket();
    let upstream = UpstreamConfig::from_agent(&cfg);
    tracing::info!(target: "xdsproxy", path = %xds_path.display(), upstream = %upstream.addr, server_name = %upstream.server_name, "XDS proxy starting");
    let xds = XdsProxy::new(upstream, metrics.clone());
    let xds_listener_path = xds_path.clone();
    let xds_task = tokio::spawn({
        let stop = stopped(stop_rx.clone());
        async move {
            if let Err(err) = xds.serve(&xds_listener_path, stop).await {
                tracing::error!(target: "xdsproxy", "XDS proxy failed: {err}");
            }
        }
    });

    // 3. Bootstrap.
    let labels = bootstrap::read_pod_info(Path::new(paths::POD_LABELS));
    let annotations = bootstrap::read_pod_info(Path::new(paths::POD_ANNOTATIONS));
    let written = bootstrap::write(&cfg, &labels, &annotations)?;
    tracing::info!(path = %written.display(), node = %cfg.node_id(), "bootstrap written");

    // 4. The proxy, or agent-only mode.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(AppError::Signal)?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(AppError::Signal)?;
    if cfg.disable_envoy {
        tracing::info!(
            "DISABLE_ENVOY is set: running the agent only (SDS and XDS proxy), no proxy process"
        );
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, exiting"),
            _ = int.recv() => tracing::info!("SIGINT received, exiting"),
        }
    } else {
        let binary = proxy_binary(&cfg);
        let mut child = tokio::process::Command::new(&binary)
            .args(proxy_args(&cfg))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| AppError::Proxy {
                binary: binary.clone(),
                reason: e.to_string(),
            })?;
        tracing::info!(binary = %binary, pid = child.id().unwrap_or(0), "proxy started");
        tokio::select! {
            status = child.wait() => tracing::warn!(?status, "proxy exited"),
            _ = term.recv() => tracing::info!("SIGTERM received, stopping the proxy"),
            _ = int.recv() => tracing::info!("SIGINT received, stopping the proxy"),
        }
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    let _ = stop_tx.send(true);
    manager_task.abort();
    let _ = tokio::join!(sds_task, xds_task);
    let _ = std::fs::remove_file(&sds_path);
    let _ = std::fs::remove_file(&xds_path);
    Ok(())
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
