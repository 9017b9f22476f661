//! `hbone-forward`: the source side of HBONE, as ztunnel does it for a client pod (see
//! `waypoint_testbed::hbone`).
//!
//! ```text
//! hbone-forward --listen 127.0.0.1:15001 --waypoint 127.0.0.1:15008 --authority 10.96.0.100:8000 \
//!     [--identity-from istiod-lite 127.0.0.1:15012 --ca-root root-cert.pem \
//!      --namespace default --service-account sleep | --cert C --key K --root R] \
//!     [--expect-peer spiffe://cluster.local/ns/default/sa/waypoint] [--baggage k=v,...]
//! ```
//!
//! Every TCP connection accepted on `--listen` becomes one HTTP/2 `CONNECT` stream (pooled mTLS
//! connections) to `--waypoint`. Once listening it prints exactly one line,
//! `hbone-forward ready on ADDR`, then runs until SIGINT/SIGTERM.

use std::{io::Write as _, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use waypoint_testbed::hbone::{
    ForwarderConfig, HboneForwarder, IdentityArgs, PeerMatch, PoolSettings,
};

/// Source-side HBONE forwarder: local TCP in, HTTP/2 CONNECT over mTLS out.
#[derive(Debug, Parser)]
#[command(name = "hbone-forward", version)]
struct Args {
    /// Local TCP listen address (port 0 picks one).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// HBONE destination: the waypoint's (or a pod's) :15008.
    #[arg(long, value_name = "ADDR")]
    waypoint: SocketAddr,
    /// `:authority` of every CONNECT: the service VIP (or pod IP) and port, `ip:port`.
    #[arg(long, value_name = "IP:PORT")]
    authority: String,
    /// Accepted server identity: a spiffe:// id, a spiffe://…/ prefix, or `*` (default: the own
    /// trust domain).
    #[arg(long, value_name = "SPIFFE")]
    expect_peer: Option<PeerMatch>,
    /// `baggage` header to send on every CONNECT.
    #[arg(long)]
    baggage: Option<String>,
    /// Local cap on streams per HTTP/2 connection (the server's max_concurrent_streams applies
    /// anyway).
    #[arg(long, value_name = "N")]
    max_streams_per_connection: Option<usize>,
    /// Source address of the HBONE connections (the client pod's IP, as ztunnel keeps it).
    #[arg(long, value_name = "IP")]
    source_ip: Option<std::net::IpAddr>,
    /// Deadline in seconds for connection set-up and for each CONNECT answer.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    connect_timeout: u64,
    #[command(flatten)]
    identity: IdentityArgs,
    /// Log level (env-filter syntax).
    #[arg(long, default_value = "info")]
    log_level: String,
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
    let mut config = ForwarderConfig::new(args.listen, args.waypoint, args.authority, identity);
    if let Some(expect) = args.expect_peer {
        config.expect_peer = expect;
    }
    config.baggage = args.baggage;
    config.pool = PoolSettings {
        connect_timeout: Duration::from_secs(args.connect_timeout),
        max_streams_per_connection: args.max_streams_per_connection.unwrap_or(usize::MAX),
        source_ip: args.source_ip,
    };
    let forwarder = HboneForwarder::start(config)
        .await
        .context("starting hbone-forward")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "hbone-forward ready on {}", forwarder.addr)?;
        out.flush()?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!(stats = ?forwarder.stats(), "hbone-forward shutting down");
    forwarder.shutdown();
    Ok(())
}
