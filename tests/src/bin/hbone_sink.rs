//! `hbone-sink`: the destination side of HBONE, as ztunnel does it on `podIP:15008` (see
//! `waypoint_testbed::hbone`).
//!
//! ```text
//! hbone-sink --listen 127.0.0.1:15008 [--target-port-map 8080=127.0.0.1:9080 ...] \
//!     [--forward-to 127.0.0.1:9080] [--allow-peer spiffe://cluster.local/ns/default/sa/waypoint] \
//!     [--identity-from istiod-lite 127.0.0.1:15012 --ca-root root-cert.pem \
//!      --namespace default --service-account httpbin | --cert C --key K --root R] \
//!     [--report-file streams.jsonl]
//! ```
//!
//! Each CONNECT is joined to the app at the `:authority` port's `--target-port-map` entry, else
//! `--forward-to`, else the authority itself. Every request is logged and, with `--report-file`,
//! appended there as one JSON line (`peer_identity`, `authority`, `forwarded`, `status`, …). Once
//! listening it prints exactly one line, `hbone-sink ready on ADDR`, then runs until
//! SIGINT/SIGTERM.

use std::{collections::BTreeMap, io::Write as _, net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use clap::Parser;
use waypoint_testbed::hbone::{
    DEFAULT_MAX_CONCURRENT_STREAMS, HboneSink, IdentityArgs, PeerMatch, SinkConfig,
};

/// Destination-side HBONE terminator: mTLS HTTP/2 CONNECT in, TCP to the app out.
#[derive(Debug, Parser)]
#[command(name = "hbone-sink", version)]
struct Args {
    /// HBONE listen address (port 0 picks one).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15008")]
    listen: SocketAddr,
    /// App address for an authority port, `PORT=IP:PORT`; repeat or comma-separate.
    #[arg(long, value_name = "PORT=ADDR", value_delimiter = ',', value_parser = parse_mapping)]
    target_port_map: Vec<(u16, SocketAddr)>,
    /// App address for authority ports not in --target-port-map.
    #[arg(long, value_name = "ADDR")]
    forward_to: Option<SocketAddr>,
    /// Accepted client identity: a spiffe:// id, a spiffe://…/ prefix, or `*` (default: the own
    /// trust domain).
    #[arg(long, value_name = "SPIFFE")]
    allow_peer: Option<PeerMatch>,
    /// Append one JSON line per answered request to this file.
    #[arg(long, value_name = "PATH")]
    report_file: Option<PathBuf>,
    /// HTTP/2 max_concurrent_streams announced to clients.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_CONCURRENT_STREAMS)]
    max_concurrent_streams: u32,
    #[command(flatten)]
    identity: IdentityArgs,
    /// Log level (env-filter syntax).
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn parse_mapping(s: &str) -> Result<(u16, SocketAddr), String> {
    let (port, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not PORT=IP:PORT"))?;
    let port = port
        .trim()
        .parse()
        .map_err(|e| format!("bad port in '{s}': {e}"))?;
    let addr = addr
        .trim()
        .parse()
        .map_err(|e| format!("bad address in '{s}': {e}"))?;
    Ok((port, addr))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    waypoint_shared::logging::init(&args.log_level, false);
    let identity = Arc::new(
        args.identity
            .load()
            .await
            .context("getting the workload identity")?,
    );
    tracing::info!(identity = %identity.spiffe_id(), "workload identity ready");
    let mut config = SinkConfig::new(args.listen, identity);
    if let Some(allow) = args.allow_peer {
        config.allow_peer = allow;
    }
    config.port_map = args.target_port_map.into_iter().collect::<BTreeMap<_, _>>();
    config.forward_to = args.forward_to;
    config.report_file = args.report_file;
    config.max_concurrent_streams = args.max_concurrent_streams;
    let sink = HboneSink::start(config)
        .await
        .context("starting hbone-sink")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "hbone-sink ready on {}", sink.addr)?;
        out.flush()?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!(stats = ?sink.stats(), "hbone-sink shutting down");
    sink.shutdown();
    Ok(())
}
