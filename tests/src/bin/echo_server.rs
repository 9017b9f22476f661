//! `echo-server`: the test bed's echo backend (see `waypoint_testbed::echo`).
//!
//! ```text
//! echo-server --http 127.0.0.1:0 [--grpc 127.0.0.1:0] [--name NAME]
//! ```
//!
//! Once listening it prints exactly one line, `echo-server ready http=ADDR grpc=ADDR`, with the
//! real bound addresses (`grpc=none` without `--grpc`), then serves until killed.

use std::{io::Write as _, net::SocketAddr};

use anyhow::Context as _;
use clap::Parser;
use waypoint_testbed::echo::{EchoConfig, EchoServer};

/// The test bed's echo backend: HTTP/1.1 + h2c + WebSocket echo, and a gRPC echo.
#[derive(Debug, Parser)]
#[command(name = "echo-server", version)]
struct Args {
    /// Address of the HTTP listener (HTTP/1.1, h2c prior knowledge, WebSocket on /ws); port 0
    /// picks a free port.
    #[arg(long, value_name = "ADDR")]
    http: SocketAddr,
    /// Address of the gRPC listener (waypoint.echo.v1.EchoService); port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    grpc: Option<SocketAddr>,
    /// Name reported in every answer, so tests can tell which backend answered.
    #[arg(long, value_name = "NAME", default_value = "echo")]
    name: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server = EchoServer::bind(&EchoConfig {
        name: args.name,
        http: args.http,
        grpc: args.grpc,
    })
    .await
    .context("starting echo-server")?;
    let grpc = server
        .grpc_addr()
        .map_or_else(|| "none".to_owned(), |addr| addr.to_string());
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "echo-server ready http={} grpc={grpc}",
            server.http_addr()
        )?;
        out.flush()?;
    }
    server.run().await.context("echo-server failed")?;
    Ok(())
}
