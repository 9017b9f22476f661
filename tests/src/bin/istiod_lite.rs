//! `istiod-lite`: a stand-in for istiod's CA and ADS on one TLS gRPC port, for local meshes and tests.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use waypoint_testbed::istiod_lite::{Config, IstiodLite, TokenPolicy, mint_token};

/// Stand-in for istiod: Istio CA + ADS (SotW and delta) serving Envoy resources from YAML/JSON files.
#[derive(Parser, Debug)]
#[command(name = "istiod-lite", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// gRPC/TLS listen address (istiod's :15012).
    #[arg(long, default_value = "127.0.0.1:15012")]
    listen: SocketAddr,
    /// Resource file or folder of *.yaml|*.yml|*.json (top-level lists: listeners, clusters,
    /// endpoints, routes, secrets, workloads). Re-read when it changes.
    #[arg(long)]
    resources: Option<PathBuf>,
    /// CA directory: root-cert.pem is written here (root generated on first run, then reused;
    /// ca-cert.pem + ca-key.pem, if present, are used instead).
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// File of accepted bearer tokens, one per line (see `istiod-lite token`).
    #[arg(long, conflicts_with = "accept_any_token")]
    token_file: Option<PathBuf>,
    /// Accept any caller and take the identity from the CSR (local runs only).
    #[arg(long)]
    accept_any_token: bool,
    /// Plain-HTTP debug address serving /debug/xds, /debug/certs, /debug/resources.
    #[arg(long)]
    debug_listen: Option<SocketAddr>,
    /// Trust domain of issued identities.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Longest certificate lifetime issued (e.g. 24h, 90s).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    max_cert_ttl: Duration,
    /// Log level (env-filter syntax).
    #[arg(long, default_value = "info")]
    log_level: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print a dev token for system:serviceaccount:<namespace>:<service-account>.
    Token {
        /// Namespace.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Service account.
        #[arg(long)]
        service_account: String,
        /// Lifetime.
        #[arg(long, default_value = "12h", value_parser = parse_duration)]
        ttl: Duration,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad duration '{s}' (want e.g. 90s, 10m, 24h)"))?;
    match unit {
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("bad duration unit in '{s}' (want s, m or h)")),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Token {
        namespace,
        service_account,
        ttl,
    }) = &cli.command
    {
        println!("{}", mint_token(namespace, service_account, *ttl));
        return Ok(());
    }
    waypoint_shared::logging::init(&cli.log_level, false);
    let tokens = match (&cli.token_file, cli.accept_any_token) {
        (Some(path), false) => TokenPolicy::File(path.clone()),
        (None, true) => TokenPolicy::AcceptAny,
        _ => anyhow::bail!(
            "choose how callers are authenticated: --token-file PATH or --accept-any-token"
        ),
    };
    let Some(ca_dir) = cli.ca_dir.clone() else {
        anyhow::bail!("--ca-dir is required to serve");
    };
    let config = Config {
        listen: cli.listen,
        resources: cli.resources.clone(),
        ca_dir,
        tokens,
        debug_listen: cli.debug_listen,
        trust_domain: cli.trust_domain.clone(),
        max_cert_ttl: cli.max_cert_ttl,
        watch_interval: Duration::from_millis(200),
    };
    let server = IstiodLite::start(config)
        .await
        .context("istiod-lite failed to start")?;
    match server.debug_addr {
        Some(debug) => println!(
            "istiod-lite ready on {} (debug http://{debug}/debug/xds)",
            server.addr
        ),
        None => println!("istiod-lite ready on {}", server.addr),
    }
    use std::io::Write as _;
    std::io::stdout().flush().ok();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("istiod-lite shutting down");
    server.shutdown().await;
    Ok(())
}
