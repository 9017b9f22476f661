//! `mesh`: the local mesh on loopback around one waypoint ([`WaypointMesh`]) — istiod-lite, the
//! httpbin echo behind an HBONE sink, the sleep client's HBONE forwarder, and the real `agent`
//! running `proxy waypoint` (which starts the real `proxy`) — with real traffic through the
//! waypoint, a short report, and then the URLs to poke at until Ctrl-C or SIGTERM (`--once` exits
//! after the report, with status 0 only if every expectation held).
//!
//! ```text
//! client ─TCP─▶ forwarder (sleep) ─HBONE─▶ waypoint :15008 ─▶ main_internal ─▶ VIP route
//!        ─▶ connect_originate ─HBONE (as the waypoint)─▶ sink :15008 (httpbin) ─TCP─▶ echo :8080
//! client ─TCP─▶ direct forwarder (sleep) ─HBONE─▶ sink :15008 ─TCP─▶ echo     (the comparison)
//! ```
//!
//! Then each traffic-management capability once, with the resources istiod renders pushed through
//! istiod-lite (retries and their limit, faults, breakers, timeouts, mirroring, JWT, path-template
//! authorization, CORS, rate limits, custom metrics) and, with httpbin served by three pods of
//! their own (loopback IP, HBONE sink, echo each), load balancing: round robin, outlier ejection,
//! retries onto other hosts and cookie affinity; the fixture's resources come back afterwards.
//!
//! `--serve-json FILE` is for benchmarks: once the waypoint serves HBONE it writes the addresses
//! and pids as one JSON object (written whole, then renamed into place) and runs until SIGTERM,
//! without traffic or report unless `--report` asks for them.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Parser;
use futures::StreamExt as _;
use http::{HeaderMap, Request};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value as Json, json};
use tokio::{net::TcpStream, signal::unix::SignalKind};
use tokio_stream::wrappers::ReceiverStream;
use waypoint_proto::{
    envoy::{
        config::core::v3::{Node, data_source::Specifier},
        extensions::transport_sockets::tls::v3::{Secret, secret},
        service::{
            discovery::v3::DiscoveryRequest,
            secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient,
        },
    },
    resource::{
        CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ResourceKind, SECRET_TYPE, WORKLOAD_TYPE,
    },
};
use waypoint_shared::pem;
use waypoint_testbed::{
    echo::SERVER_HEADER,
    hbone::{HboneForwarder, HbonePool, PoolSettings},
    scenarios::{
        self, ALLOWED_ORIGIN, BatchRequest, Fixture, Issuer, JwksServer, LoadBalancer, MIRROR_PORT,
        MirrorEcho, OTHER_ORIGIN, OutlierPolicy, Pod, PodSpec, SHADOW_HOST, ScenarioError,
        ServicePods, Tally, VIP_STATS, breaker_cluster, cookie_listener, cors_listener, dr_cluster,
        h2c_batch, istio_stats_listener, jwt_claims, jwt_listener, lb_listener, mirror_endpoints,
        mirror_listener, path_policy_listener, rate_limit_listener, remote_jwks_listener,
        retries_policy, timeout_listener, vs_listener, ws_idle_listener,
    },
    uds,
    waypoint::{
        AgentPorts, EchoSeen, HTTPBIN_IDENTITY, MeshError, MeshOptions, SLEEP_IDENTITY,
        WAYPOINT_IDENTITY, WaypointMesh, WsClient, free_ports, http_get, http1_request, read_body,
        ws_opcode,
    },
};

/// Run the local waypoint mesh on loopback.
#[derive(Parser, Debug)]
#[command(
    name = "mesh",
    version,
    about = "The local waypoint mesh on loopback (istiod-lite, echo behind an HBONE sink, HBONE \
             forwarder, agent + proxy): traffic through the waypoint, a report, then the URLs"
)]
struct Cli {
    /// Exit after the report (status 0 only if every expectation held) instead of running until
    /// Ctrl-C/SIGTERM.
    #[arg(long)]
    once: bool,
    /// Run in this folder (emptied first) instead of a temporary one. Keep the path short: the
    /// agent's Unix sockets live below it.
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Keep the folder (pod root, CA, logs) at exit.
    #[arg(long)]
    keep: bool,
    /// HTTP/1.1 requests through the waypoint (and as many on the direct chain).
    #[arg(long, default_value_t = 20)]
    requests: usize,
    /// h2c requests through the waypoint, concurrently on one connection (and as many direct).
    #[arg(long, default_value_t = 10)]
    h2_requests: usize,
    /// Proxy admin port (Istio: 15000; 0 picks a free one).
    #[arg(long, default_value_t = 15000)]
    admin_port: u16,
    /// Agent status port (Istio: 15020; 0 picks a free one).
    #[arg(long, default_value_t = 15020)]
    status_port: u16,
    /// Proxy readiness port (Istio: 15021; 0 picks a free one).
    #[arg(long, default_value_t = 15021)]
    readiness_port: u16,
    /// Proxy Prometheus port (Istio: 15090; 0 picks a free one).
    #[arg(long, default_value_t = 15090)]
    prometheus_port: u16,
    /// The proxy's log level (`--proxyLogLevel` of the agent).
    #[arg(long, default_value = "warning")]
    proxy_log_level: String,
    /// Certificate lifetime the agent asks for (`SECRET_TTL`, e.g. `2m` to watch a rotation).
    #[arg(long)]
    secret_ttl: Option<String>,
    /// Seconds to wait for the agent to report ready.
    #[arg(long, default_value_t = 60)]
    ready_within: u64,
    /// After start-up write the addresses and pids to FILE as JSON, then run until SIGTERM
    /// without traffic or report (unless `--report`).
    #[arg(long, value_name = "FILE")]
    serve_json: Option<PathBuf>,
    /// With `--serve-json`: also send the traffic and print the report.
    #[arg(long)]
    report: bool,
}

/// The `Host` of requests through the forwarders (the waypoint's virtual host matches `*`).
const HOST: &str = "httpbin.default.svc.cluster.local:8000";
/// Bound for one request or exchange.
const REQUEST: Duration = Duration::from_secs(10);
/// Bound for the waypoint's HBONE listener to serve once the agent is ready.
const HBONE_READY: Duration = Duration::from_secs(30);
/// Bound for istiod-lite to record the proxy's ACK of every type.
const ACKS: Duration = Duration::from_secs(15);
/// Bound for the agent (and the proxy below it) to stop after SIGTERM.
const SHUTDOWN: Duration = Duration::from_secs(15);
/// One header this large is over Envoy's default `max_request_headers_kb` (60) but under the echo
/// server's limit, so a 431 can only come from the waypoint.
const OVERSIZED_HEADER: usize = 100 * 1024;
/// A port of the service VIP that no filter chain of `main_internal` matches.
const UNFRONTED_PORT: u16 = 9999;
/// The fixture's TCP service port.
const TCP_PORT: u16 = 9000;
/// Largest echo answer read.
const ECHO_BODY_LIMIT: usize = 64 * 1024;
/// How often the running mesh checks that the agent is still there.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    waypoint_shared::logging::init("warn", false);
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mesh: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let mut options =
        MeshOptions::new("mesh", &sibling_binary("proxy")?, &sibling_binary("agent")?);
    options.proxy_log_level = cli.proxy_log_level.clone();
    options.ready_within = Duration::from_secs(cli.ready_within);
    // A fixed port taken by another mesh would even answer our readiness checks: refuse early.
    for (flag, port) in [
        ("--admin-port", cli.admin_port),
        ("--status-port", cli.status_port),
        ("--readiness-port", cli.readiness_port),
        ("--prometheus-port", cli.prometheus_port),
    ] {
        if port != 0 && std::net::TcpListener::bind(("0.0.0.0", port)).is_err() {
            bail!(
                "port {port} ({flag}) is in use (another mesh running?): choose other ports, or 0 \
                 for free ones"
            );
        }
    }
    // Distinct free ports for those given as 0 (picked together so that none repeats).
    let free: [u16; 4] = free_ports()?;
    let pick = |port: u16, i: usize| if port == 0 { free[i] } else { port };
    options.ports = Some(AgentPorts {
        admin: pick(cli.admin_port, 0),
        status: pick(cli.status_port, 1),
        readiness: pick(cli.readiness_port, 2),
        prometheus: pick(cli.prometheus_port, 3),
    });
    if let Some(dir) = &cli.workdir {
        options.dir = Some(std::env::current_dir()?.join(dir));
    }
    options.keep = cli.keep;
    options.istiod_debug = true;
    if let Some(ttl) = &cli.secret_ttl {
        options.env.push(("SECRET_TTL".into(), ttl.clone()));
    }

    // Before anything is started: a signal must reach our shutdown, not kill us and leave the
    // agent and proxy behind.
    let mut stop = StopSignals::install()?;
    let mesh = tokio::select! {
        mesh = WaypointMesh::start(options) => mesh.context("starting the mesh")?,
        signal = stop.recv() => bail!("{signal} during start-up"),
    };
    let ready = started.elapsed();
    tokio::select! {
        served = mesh.wait_hbone_ready(HBONE_READY) => served?,
        signal = stop.recv() => bail!("{signal} during start-up"),
    }
    let serving = started.elapsed();
    let direct = mesh
        .direct_forwarder()
        .await
        .context("the direct forwarder")?;
    let a = mesh.addrs;
    println!(
        "mesh          {} on loopback: waypoint {}, VIP {}, pod {} (echo :8080, sink :15008), client {}",
        mesh.dir().display(),
        a.waypoint_hbone(),
        a.service(),
        a.pod_ip,
        a.client_ip
    );
    println!(
        "start-up      agent ready in {} ms (/healthz/ready 200 via the proxy), waypoint serving HBONE at {} ms",
        ready.as_millis(),
        serving.as_millis()
    );

    if let Some(path) = &cli.serve_json {
        write_serve_json(path, &mesh, &direct)?;
        println!("serve-json    {}", path.display());
    }

    let mut failed = Vec::new();
    let mut signalled = None;
    if cli.serve_json.is_none() || cli.report {
        let mut expect = Expectations::default();
        tokio::select! {
            () = report(&cli, &mesh, &direct, &mut expect) => {}
            signal = stop.recv() => signalled = Some(signal),
        }
        if signalled.is_none() {
            println!(
                "expectations  {}/{} held",
                expect.total - expect.failed.len(),
                expect.total
            );
            for f in &expect.failed {
                println!("FAILED        {f}");
            }
            if !expect.failed.is_empty() && cli.once {
                // The folder goes at exit (unless --keep): show what helps now.
                let diagnostics = tokio::task::block_in_place(|| mesh.diagnostics());
                println!(
                    "
{diagnostics}"
                );
            }
            failed = expect.failed;
        }
    }
    if signalled.is_none() {
        print_urls(&mesh, &direct);
        if !cli.once {
            println!("\nrunning; Ctrl-C or SIGTERM to stop");
            signalled = Some(wait_for_stop(&mesh, &mut stop).await?);
        }
    }
    let stopping = Instant::now();
    direct.shutdown();
    mesh.shutdown(SHUTDOWN).await;
    if let Some(path) = &cli.serve_json {
        let _ = std::fs::remove_file(path);
    }
    println!(
        "stopped       {}agent and proxy gone in {} ms",
        signalled.map(|s| format!("on {s}: ")).unwrap_or_default(),
        stopping.elapsed().as_millis()
    );
    Ok(if failed.is_empty() && (signalled.is_none() || !cli.once) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// SIGINT (Ctrl-C) and SIGTERM as streams.
struct StopSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        Ok(StopSignals {
            int: tokio::signal::unix::signal(SignalKind::interrupt())?,
            term: tokio::signal::unix::signal(SignalKind::terminate())?,
        })
    }

    /// The next stop signal's name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

/// Waits for a stop signal (its name), or the agent exiting on its own (an error).
async fn wait_for_stop(
    mesh: &WaypointMesh,
    stop: &mut StopSignals,
) -> anyhow::Result<&'static str> {
    let mut watch = tokio::time::interval(WATCH_INTERVAL);
    loop {
        tokio::select! {
            signal = stop.recv() => return Ok(signal),
            _ = watch.tick() => mesh.check_agent()?,
        }
    }
}

/// A binary from the same target folder as this one.
fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .map(|d| d.join(name))
        .context("no parent folder")?;
    if !path.exists() {
        bail!(
            "{} not found: build it with `cargo build -p agent -p proxy --bins`",
            path.display()
        );
    }
    Ok(path)
}

/// The JSON object of `--serve-json`, written to a temporary name and renamed, so a reader that
/// sees the file sees all of it.
fn write_serve_json(
    path: &Path,
    mesh: &WaypointMesh,
    direct: &HboneForwarder,
) -> anyhow::Result<()> {
    let doc = json!({
        "client_url": mesh.client_url("/"),
        "client_addr": mesh.client_addr().to_string(),
        "direct_client_addr": direct.addr.to_string(),
        "admin_url": mesh.admin_url(""),
        "status_url": format!("http://127.0.0.1:{}", mesh.ports.status),
        "readiness_url": format!("http://127.0.0.1:{}/healthz/ready", mesh.ports.readiness),
        "prometheus_url": format!("http://127.0.0.1:{}/stats/prometheus", mesh.ports.prometheus),
        "proxy_pid": mesh.proxy_pid(),
        "agent_pid": mesh.agent_pid(),
        "pod_ip": mesh.addrs.pod_ip.to_string(),
        "waypoint_ip": mesh.addrs.waypoint_ip.to_string(),
        "vip": mesh.addrs.vip.to_string(),
        "host": HOST,
        "dir": mesh.dir().display().to_string(),
        "log": mesh.log_path().display().to_string(),
    });
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, format!("{doc:#}\n"))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn print_urls(mesh: &WaypointMesh, direct: &HboneForwarder) {
    let status = format!("http://127.0.0.1:{}", mesh.ports.status);
    println!("\nURLs:");
    println!(
        "  client (via waypoint)    curl {}   (h2c: curl --http2-prior-knowledge ...)",
        mesh.client_url("/get")
    );
    println!("  client (direct, no wp)   curl http://{}/get", direct.addr);
    println!(
        "  proxy admin              {0} {1} {2} {3}",
        mesh.admin_url("/ready"),
        mesh.admin_url("/config_dump"),
        mesh.admin_url("/stats"),
        mesh.admin_url("/clusters")
    );
    println!("  agent status (merged)    {status}/stats/prometheus {status}/healthz/ready");
    println!(
        "  readiness (kubelet)      http://127.0.0.1:{}/healthz/ready",
        mesh.ports.readiness
    );
    if let Some(debug) = mesh.istiod.debug_addr {
        println!("  istiod-lite              http://{debug}/debug/xds http://{debug}/debug/certs");
    }
    println!("  agent/proxy log          {}", mesh.log_path().display());
}

// ---------------------------------------------------------------------------------------------
// Expectations
// ---------------------------------------------------------------------------------------------

/// What the report checked, and what did not hold.
#[derive(Debug, Default)]
struct Expectations {
    total: usize,
    failed: Vec<String>,
}

impl Expectations {
    /// Records one expectation; `what` says what should have held (and what was seen).
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) -> bool {
        self.total += 1;
        if !ok {
            self.failed.push(what());
        }
        ok
    }
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

/// Sends the traffic and prints the report, one line per finding (the first word names the
/// section, for scripts); every expectation goes to `expect`.
async fn report(
    cli: &Cli,
    mesh: &WaypointMesh,
    direct: &HboneForwarder,
    expect: &mut Expectations,
) {
    println!("\n===== local mesh report =====");
    control_plane(mesh, expect).await;
    let before = upstream_rq_totals(mesh).await;
    let client = mesh.client_addr();

    // Requests: the same ones through the waypoint and on the direct chain.
    let mut served = 0;
    let mut served_http = 0;
    for (chain, addr) in [("waypoint", client), ("direct", direct.addr)] {
        let h1 = http1_requests(addr, cli.requests, chain).await;
        let h2 = h2c_requests(addr, cli.h2_requests, chain).await;
        for (proto, batch, want) in [
            ("HTTP/1.1", &h1, cli.requests),
            ("h2c", &h2, cli.h2_requests),
        ] {
            let s = Summary::of(batch);
            println!(
                "requests      {chain:<8} {proto:<8} {}/{want} OK  status {}  p50 {}  max {}  echo saw {}{}",
                s.ok,
                s.codes,
                ms(s.p50),
                ms(s.max),
                s.upstream,
                s.first_error
                    .as_deref()
                    .map(|e| format!("  first error: {e}"))
                    .unwrap_or_default()
            );
            expect.check(s.ok == want, || {
                format!(
                    "{want} {proto} requests {chain} answered 200 by the echo: {} did ({}){}",
                    s.ok,
                    s.codes,
                    s.first_error
                        .as_deref()
                        .map(|e| format!("; first error: {e}"))
                        .unwrap_or_default()
                )
            });
            if chain == "waypoint" {
                served += s.ok;
                served_http += s.ok;
            }
        }
    }

    // One WebSocket round trip through the waypoint.
    let ws = websocket(client).await;
    println!(
        "websocket     waypoint 101 upgrade, text echoed, close 1000: {}",
        ok_or(&ws)
    );
    expect.check(ws.is_ok(), || {
        format!("WebSocket round trip through the waypoint: {}", ok_or(&ws))
    });
    if ws.is_ok() {
        served += 1;
    }

    // A header list over the limit: 431 from the waypoint (the echo takes it: see direct).
    let big_wp = oversized_header(client).await;
    let big_direct = oversized_header(direct.addr).await;
    println!(
        "header limit  {} KiB header: waypoint {}, direct {}",
        OVERSIZED_HEADER / 1024,
        status_text(&big_wp),
        status_text(&big_direct)
    );
    expect.check(matches!(big_wp, Ok(431)), || {
        format!(
            "431 for a {} KiB header through the waypoint: got {}",
            OVERSIZED_HEADER / 1024,
            status_text(&big_wp)
        )
    });

    // CONNECT to an authority the waypoint does not front: 503.
    let unfronted = format!("{}:{UNFRONTED_PORT}", mesh.addrs.vip);
    let refused = connect_status(mesh, &unfronted).await;
    println!(
        "CONNECT       {unfronted} (not fronted) at the waypoint: {}",
        status_text(&refused)
    );
    expect.check(matches!(refused, Ok(503)), || {
        format!(
            "503 for CONNECT {unfronted} at the waypoint: got {}",
            status_text(&refused)
        )
    });

    identities(mesh, direct, expect);
    let table = routes(mesh, &before, served, expect).await;
    retries(mesh, &table).await;
    let tcp = tcp_exchange(mesh).await;
    println!(
        "tcp           {}:{TCP_PORT} (TCP service port, tcp_proxy) through the waypoint: {}",
        mesh.addrs.vip,
        match &tcp {
            Ok((sent, received)) => format!("{sent} bytes up, {received} down, HTTP 200 inside"),
            Err(e) => format!("failed: {e}"),
        }
    );
    expect.check(tcp.is_ok(), || {
        format!("an exchange through the TCP service port: {tcp:?}")
    });
    metrics(mesh, served_http, tcp.is_ok(), expect).await;
    // Last: the scenarios change the config and add requests the sections above count.
    traffic_management(mesh, expect).await;
}

/// One HTTP/1.1 exchange carried as plain bytes through the fixture's TCP service port
/// (`VIP:9000` → `tcp_proxy`): (bytes sent, bytes received).
async fn tcp_exchange(mesh: &WaypointMesh) -> Result<(usize, usize), String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let forwarder = mesh
        .service_forwarder(TCP_PORT)
        .await
        .map_err(|e| e.to_string())?;
    let request = b"GET /tcp HTTP/1.1\r\nhost: httpbin\r\nconnection: close\r\n\r\n";
    let exchange = async {
        let mut s = TcpStream::connect(forwarder.addr).await?;
        s.write_all(request).await?;
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).await?;
        Ok::<_, std::io::Error>(reply)
    };
    let reply = tokio::time::timeout(REQUEST, exchange)
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    forwarder.shutdown();
    if !reply.starts_with(b"HTTP/1.1 200") {
        return Err(format!(
            "unexpected answer: {}",
            String::from_utf8_lossy(&reply[..reply.len().min(80)])
        ));
    }
    Ok((request.len(), reply.len()))
}

/// istiod-lite, the CA, ACK/NACK per type, the agent's certificate, bootstrap, liveness, probe.
async fn control_plane(mesh: &WaypointMesh, expect: &mut Expectations) {
    println!(
        "istiod-lite   {} (Istio CA + delta ADS over TLS), node {}",
        mesh.istiod.addr, mesh.node_id
    );
    let issued = mesh.istiod.ca.issued().await;
    println!(
        "CA            {} certificate(s) issued: {}",
        issued.len(),
        issued
            .iter()
            .map(|c| c.identity.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    // The proxy's ADS stream (through the agent's XDS proxy): every type ACKed, nothing NACKed.
    let node = mesh.node_id.clone();
    let types = [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, WORKLOAD_TYPE];
    let conns = match mesh
        .istiod
        .book
        .wait_until(ACKS, |conns| {
            conns.iter().any(|c| {
                c.node_id == node
                    && c.connected
                    && types
                        .iter()
                        .all(|t| c.types.get(*t).is_some_and(|s| s.acks >= 1))
            })
        })
        .await
    {
        Ok(conns) | Err(conns) => conns,
    };
    let conn = conns
        .iter()
        .rev()
        .find(|c| c.node_id == mesh.node_id && c.connected);
    let mut per_type = Vec::new();
    for t in types {
        let s = conn.and_then(|c| c.types.get(t));
        let (acks, nacks) = s.map_or((0, 0), |s| (s.acks, s.nacks));
        per_type.push(format!("{} {acks} ACK {nacks} NACK", short_type(t)));
        expect.check(acks >= 1, || format!("istiod-lite recorded an ACK of {t}"));
        expect.check(nacks == 0, || {
            format!(
                "no NACK of {t}: {nacks}, last: {}",
                s.and_then(|s| s.last_nack.as_ref())
                    .map(|n| n.message.as_str())
                    .unwrap_or_default()
            )
        });
    }
    println!(
        "xDS           {} ({} stream)",
        per_type.join(", "),
        conn.map(|c| c.stream).unwrap_or("no")
    );

    // The agent's identity, read from its SDS socket as the proxy does.
    let sds = mesh
        .dir()
        .join("pod/var/run/secrets/workload-spiffe-uds/socket");
    match read_sds(&sds, mesh.istiod.root_cert_pem()).await {
        Ok((leaf, root_ok)) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let left = leaf.not_after - now;
            println!(
                "identity      {} from the agent's SDS (serial {}), expires unix {} (in {}h{:02}m), chains to istiod-lite's root: {}",
                leaf.uri_sans.join(","),
                leaf.serial,
                leaf.not_after,
                left / 3600,
                (left % 3600) / 60,
                yes_no(root_ok)
            );
            expect.check(leaf.uri_sans.iter().any(|s| s == WAYPOINT_IDENTITY), || {
                format!(
                    "the agent's certificate is {WAYPOINT_IDENTITY}: {:?}",
                    leaf.uri_sans
                )
            });
            expect.check(root_ok, || {
                "the agent serves istiod-lite's root as ROOTCA".to_owned()
            });
            expect.check(left > 0, || "the agent's certificate is valid".to_owned());
        }
        Err(e) => {
            println!("identity      SDS read failed: {e:#}");
            expect.check(false, || format!("reading the agent's SDS: {e:#}"));
        }
    }

    let bootstrap = mesh.dir().join("pod/etc/istio/proxy/envoy-rev.json");
    println!(
        "bootstrap     {} ({} bytes)",
        bootstrap.display(),
        std::fs::metadata(&bootstrap).map(|m| m.len()).unwrap_or(0)
    );
    let live = matches!(mesh.admin_get("/ready").await, Ok((200, _)));
    println!(
        "proxy         {} (pid {}, agent pid {}, admin {})",
        if live { "LIVE" } else { "NOT LIVE" },
        mesh.proxy_pid()
            .map_or_else(|| "?".to_owned(), |p| p.to_string()),
        mesh.agent_pid(),
        mesh.admin_url("/ready")
    );
    expect.check(live, || "the proxy's admin /ready answers 200".to_owned());
    let probe = http_get(
        SocketAddr::from(([127, 0, 0, 1], mesh.ports.readiness)),
        "/healthz/ready",
    )
    .await
    .map(|(status, _)| status)
    .map_err(|e| e.to_string());
    println!(
        "readiness     :{}/healthz/ready via proxy -> agent :{} -> proxy admin: {}",
        mesh.ports.readiness,
        mesh.ports.status,
        status_text(&probe)
    );
    expect.check(matches!(probe, Ok(200)), || {
        format!(
            "the probe path :{}/healthz/ready answers 200: {}",
            mesh.ports.readiness,
            status_text(&probe)
        )
    });
    stats_matcher(mesh, &bootstrap, expect).await;
}

/// Istio's own inclusion-list prefixes (pilot-agent's required ones, `reporter=`,
/// `workload_discovery`, `component`, `istio`): the rest of the bootstrap's prefixes came from
/// `proxyStatsMatcher` or the `sidecar.istio.io/statsInclusionPrefixes` annotation.
const ISTIO_STATS_PREFIXES: &[&str] = &[
    "reporter=",
    "workload_discovery",
    "cluster_manager",
    "listener_manager",
    "server",
    "cluster.xds-grpc",
    "wasm",
    "component",
    "istio",
];

/// The stats matcher in force (the inclusion list of the bootstrap the agent wrote), and whether
/// every stat `/stats` shows is one it admits.
async fn stats_matcher(mesh: &WaypointMesh, bootstrap: &Path, expect: &mut Expectations) {
    let doc: Json = std::fs::read_to_string(bootstrap)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Json::Null);
    let patterns = doc["stats_config"]["stats_matcher"]["inclusion_list"]["patterns"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let of = |key: &str| -> Vec<String> {
        patterns
            .iter()
            .filter_map(|p| p[key].as_str().map(str::to_owned))
            .collect()
    };
    let (prefixes, suffixes) = (of("prefix"), of("suffix"));
    let regexes: Vec<String> = patterns
        .iter()
        .filter_map(|p| p["safe_regex"]["regex"].as_str().map(str::to_owned))
        .collect();
    let user: Vec<&str> = prefixes
        .iter()
        .map(String::as_str)
        .filter(|p| !ISTIO_STATS_PREFIXES.contains(p))
        .collect();
    // Without a regex crate here: Istio's one regex is evaluated by hand; a name only another
    // regex could admit counts as unchecked.
    const ISTIO_REGEX: &str = r"vhost\..*\.route\..*";
    let istio_regex = |n: &str| n.starts_with("vhost.") && n.contains(".route.");
    let names: Vec<String> = match mesh.admin_get("/stats").await {
        Ok((200, body)) => parse_stats(&body).into_keys().collect(),
        _ => Vec::new(),
    };
    let mut outside = Vec::new();
    let mut unchecked = 0;
    for n in &names {
        let admitted = prefixes.iter().any(|p| n.starts_with(p.as_str()))
            || suffixes.iter().any(|x| n.ends_with(x.as_str()))
            || (regexes.iter().any(|r| r == ISTIO_REGEX) && istio_regex(n));
        if admitted {
            continue;
        }
        if regexes.iter().any(|r| r != ISTIO_REGEX) {
            unchecked += 1;
        } else {
            outside.push(n.clone());
        }
    }
    println!(
        "stats         matcher: Istio's inclusion list ({} patterns) + proxyStatsMatcher prefixes {}; /stats shows {} stats, {} outside it{}",
        patterns.len(),
        if user.is_empty() {
            "none".to_owned()
        } else {
            user.join(", ")
        },
        names.len(),
        outside.len(),
        if unchecked > 0 {
            format!(", {unchecked} left to regexes (unchecked)")
        } else {
            String::new()
        }
    );
    expect.check(!patterns.is_empty(), || {
        "the bootstrap carries a stats_config.stats_matcher inclusion list".to_owned()
    });
    for want in waypoint_testbed::waypoint::STATS_INCLUSION_PREFIXES {
        expect.check(user.contains(want), || {
            format!("proxyStatsMatcher prefix {want} in the bootstrap's inclusion list: {user:?}")
        });
    }
    expect.check(!names.is_empty() && outside.is_empty(), || {
        format!(
            "/stats shows only stats the inclusion list admits ({} stats): outside it {outside:?}",
            names.len()
        )
    });
}

/// Who the sink saw on each chain, and who the forwarder is.
fn identities(mesh: &WaypointMesh, direct: &HboneForwarder, expect: &mut Expectations) {
    let mut by_peer: BTreeMap<String, usize> = BTreeMap::new();
    for s in mesh.sink_streams() {
        *by_peer.entry(s.peer_identity).or_default() += 1;
    }
    let from = |id: &str| by_peer.get(id).copied().unwrap_or(0);
    let fwd = mesh.forwarder.stats();
    println!(
        "identities    forwarder is {SLEEP_IDENTITY} and verified the waypoint as {WAYPOINT_IDENTITY} ({} tunnels, {} refused, {} failed)",
        fwd.established, fwd.refused, fwd.failed
    );
    println!(
        "identities    sink ({HTTPBIN_IDENTITY}) saw {} tunnel(s) from {WAYPOINT_IDENTITY} (waypoint chain), {} from {SLEEP_IDENTITY} (direct chain)",
        from(WAYPOINT_IDENTITY),
        from(SLEEP_IDENTITY)
    );
    let others: Vec<String> = by_peer
        .iter()
        .filter(|(id, _)| *id != WAYPOINT_IDENTITY && *id != SLEEP_IDENTITY)
        .map(|(id, n)| format!("{id} ({n})"))
        .collect();
    expect.check(from(WAYPOINT_IDENTITY) > 0, || {
        format!("the sink saw tunnels from {WAYPOINT_IDENTITY}: {by_peer:?}")
    });
    expect.check(from(SLEEP_IDENTITY) > 0, || {
        format!("the sink saw the direct chain's tunnels from {SLEEP_IDENTITY}: {by_peer:?}")
    });
    expect.check(others.is_empty(), || {
        format!("the sink saw no other identity: {}", others.join(", "))
    });
    expect.check(direct.stats().failed == 0, || {
        format!(
            "the direct forwarder opened every tunnel: {:?}",
            direct.stats()
        )
    });
}

/// Which listener chain / route configuration / virtual host / route / cluster served, from
/// `/config_dump` and the clusters' `upstream_rq_total` during the traffic.
async fn routes(
    mesh: &WaypointMesh,
    before: &BTreeMap<String, u64>,
    served: usize,
    expect: &mut Expectations,
) -> Vec<RouteRow> {
    let after = upstream_rq_totals(mesh).await;
    let dump = mesh.config_dump("").await.unwrap_or_default();
    let alt = alt_stat_names(&dump);
    // Counted under the cluster's name, or under its alt_stat_name as Envoy does.
    let delta = |cluster: &str| {
        let count = |m: &BTreeMap<String, u64>, name: &str| m.get(name).copied().unwrap_or(0);
        let by_name = count(&after, cluster).saturating_sub(count(before, cluster));
        let by_alt = alt
            .get(cluster)
            .map_or(0, |a| count(&after, a).saturating_sub(count(before, a)));
        by_name.max(by_alt)
    };
    let table = route_table(&dump);
    let mut shown = 0;
    for r in &table {
        let n = delta(&r.cluster);
        if n == 0 {
            continue;
        }
        shown += 1;
        println!(
            "routes        {}: {} -> cluster {:?}: upstream_rq_total +{n}",
            r.listener, r.via, r.cluster
        );
    }
    if shown == 0 {
        println!(
            "routes        no route's cluster counted a request ({} routes in /config_dump)",
            table.len()
        );
    }
    let vip_cluster = waypoint_testbed::waypoint::VIP_CLUSTER;
    let vip = delta(vip_cluster);
    expect.check(vip as usize >= served, || {
        format!(
            "cluster.{vip_cluster}.upstream_rq_total grew by the {served} requests the echo answered through the waypoint: +{vip}"
        )
    });
    expect.check(table.iter().any(|r| r.cluster == vip_cluster), || {
        format!("/config_dump has a route to {vip_cluster}")
    });
    table
}

/// The service route's retry policy and the retry counters, if the proxy has any.
async fn retries(mesh: &WaypointMesh, table: &[RouteRow]) {
    let vip_cluster = waypoint_testbed::waypoint::VIP_CLUSTER;
    let policy = table
        .iter()
        .find(|r| r.cluster == vip_cluster)
        .and_then(|r| r.retry.clone())
        .unwrap_or_else(|| "none".to_owned());
    let stats = match mesh.admin_get("/stats?filter=retry").await {
        Ok((200, body)) => parse_stats(&body),
        _ => BTreeMap::new(),
    };
    if stats.is_empty() {
        println!(
            "retries       not yet counted (no *retry* stat in /stats); service route policy: {policy}"
        );
        return;
    }
    let nonzero: Vec<String> = stats
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    // Envoy names a cluster's stats by its alt_stat_name, which istiod sets to `<name>;`.
    let vip = stats
        .get(&format!("cluster.{vip_cluster};.upstream_rq_retry"))
        .or_else(|| stats.get(&format!("cluster.{vip_cluster}.upstream_rq_retry")))
        .map_or_else(|| "absent".to_owned(), u64::to_string);
    println!(
        "retries       upstream_rq_retry of the service cluster: {vip}; non-zero retry stats: {} (of {}); service route policy: {policy}",
        if nonzero.is_empty() {
            "none".to_owned()
        } else {
            nonzero.join(", ")
        },
        stats.len()
    );
}

/// Families in the agent's merged `/stats/prometheus`.
async fn metrics(mesh: &WaypointMesh, served_http: usize, tcp: bool, expect: &mut Expectations) {
    let scrape = || async {
        match http_get(
            SocketAddr::from(([127, 0, 0, 1], mesh.ports.status)),
            "/stats/prometheus",
        )
        .await
        {
            Ok((200, body)) => body,
            Ok((status, body)) => format!("# {status} {body}"),
            Err(e) => format!("# {e}"),
        }
    };
    // A stream is counted when its response ends: wait (bounded) for the last ones.
    let deadline = Instant::now() + REQUEST;
    let mut merged = scrape().await;
    while istio_ok_requests(&merged) < served_http as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        merged = scrape().await;
    }
    let families = |prefix: &str| prometheus_families(&merged, prefix);
    let (agent, proxy, istio) = (
        families("istio_agent_"),
        families("envoy_"),
        families("istio_") - families("istio_agent_"),
    );
    println!(
        "metrics       agent :{}/stats/prometheus merges {agent} istio_agent_*, {istio} istio_* (standard metrics) and {proxy} envoy_* families",
        mesh.ports.status
    );
    expect.check(agent > 0 && proxy > 0, || {
        format!(
            "the merged /stats/prometheus has istio_agent_* and envoy_* families: {agent} and {proxy}"
        )
    });
    for (labels, value) in istio_series(&merged, "istio_requests_total") {
        let l = |k: &str| labels.get(k).map(String::as_str).unwrap_or("?");
        println!(
            "  istio_requests_total {value:>4}  {} ({}) -> {} [{}] code {} flags {} {} {}",
            l("source_workload"),
            l("source_principal"),
            l("destination_service"),
            l("destination_workload"),
            l("response_code"),
            l("response_flags"),
            l("request_protocol"),
            l("connection_security_policy"),
        );
    }
    for family in [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_received_bytes_total",
        "istio_tcp_sent_bytes_total",
    ] {
        for (labels, value) in istio_series(&merged, family) {
            let l = |k: &str| labels.get(k).map(String::as_str).unwrap_or("?");
            println!(
                "  {family} {value}  {} -> {} [{}]",
                l("source_workload"),
                l("destination_service"),
                l("destination_workload")
            );
        }
    }
    // Who the waypoint took the client for: the HBONE peer's certificate (source_principal) and
    // the WDS workload at the connection's source address (source_workload).
    let seen: Vec<(String, String)> = istio_series(&merged, "istio_requests_total")
        .into_iter()
        .map(|(l, _)| {
            let get = |k: &str| l.get(k).cloned().unwrap_or_default();
            (get("source_principal"), get("source_workload"))
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    println!(
        "identities    the waypoint saw the client as {} (WDS workload at {})",
        seen.iter()
            .map(|(p, w)| format!("{p} / {w}"))
            .collect::<Vec<_>>()
            .join(", "),
        mesh.addrs.client_ip
    );
    expect.check(seen == [(SLEEP_IDENTITY.to_owned(), "sleep".to_owned())], || {
        format!("the waypoint's source_principal/source_workload is {SLEEP_IDENTITY}/sleep: {seen:?}")
    });
    let counted = istio_ok_requests(&merged);
    expect.check(counted >= served_http as u64, || {
        format!(
            "istio_requests_total{{reporter=\"waypoint\",source_workload=\"sleep\",destination_service=\"httpbin...\",response_code=\"200\",connection_security_policy=\"mutual_tls\"}} counts the {served_http} HTTP requests served through the waypoint: {counted}"
        )
    });
    if tcp {
        let opened: u64 = istio_series(&merged, "istio_tcp_connections_opened_total")
            .iter()
            .filter(|(l, _)| l.get("source_workload").map(String::as_str) == Some("sleep"))
            .map(|(_, v)| *v)
            .sum();
        expect.check(opened >= 1, || {
            format!(
                "istio_tcp_connections_opened_total from sleep counts the TCP exchange: {opened}"
            )
        });
    }
}

/// The samples of `family` in an exposition: labels and value.
fn istio_series(text: &str, family: &str) -> Vec<(BTreeMap<String, String>, u64)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(family)?.strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once("} ")?;
            let mut map = BTreeMap::new();
            for kv in labels.split("\",") {
                let (k, v) = kv.split_once("=\"")?;
                map.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
            }
            Some((map, value.trim().parse::<f64>().ok()? as u64))
        })
        .collect()
}

/// 200s from sleep to httpbin over mutual TLS in `istio_requests_total`.
fn istio_ok_requests(text: &str) -> u64 {
    istio_series(text, "istio_requests_total")
        .iter()
        .filter(|(l, _)| {
            let is = |k: &str, v: &str| l.get(k).map(String::as_str) == Some(v);
            is("reporter", "waypoint")
                && is("source_workload", "sleep")
                && is("destination_service", "httpbin.default.svc.cluster.local")
                && is("response_code", "200")
                && is("connection_security_policy", "mutual_tls")
        })
        .map(|(_, v)| *v)
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Traffic management (waypoint_testbed::scenarios)
// ---------------------------------------------------------------------------------------------

/// Fault abort sample: requests, concurrency on one h2c connection, and the accepted band
/// around 50 % (binomial: 400 draws have a standard deviation of 2.5 %, so ±10 % is 4 of them and
/// a correct proxy falls outside once in ~16,000 runs).
const ABORT_SAMPLE: usize = 400;
const ABORT_CONCURRENCY: usize = 32;
const ABORT_BAND: f64 = 0.10;
/// The request holding the circuit breaker's only slot, and the burst behind it.
const BREAKER_HOLD_MS: &str = "1500";
const BREAKER_BURST: usize = 9;
/// The VirtualService timeout, the upstream delay it cuts, and the gRPC request's own timeout.
const ROUTE_TIMEOUT: Duration = Duration::from_millis(500);
const SLOW_UPSTREAM_MS: &str = "2000";
const GRPC_TIMEOUT: Duration = Duration::from_millis(300);
/// Requests sent with a live mirror, and with the mirror on a dead endpoint.
const MIRRORED: usize = 20;
const DEAD_MIRRORED: usize = 3;
/// The rate-limited route's bucket.
const RATE_LIMIT_TOKENS: usize = 5;
/// Bound for a counter or metric to show what was sent.
const OBSERVE: Duration = Duration::from_secs(10);

/// Prints one report line: the section word, then what happened.
fn line(section: &str, text: impl std::fmt::Display) {
    println!("{section:<13} {text}");
}

/// What a scenario found: its report line, and the expectation (held or not, what was wanted).
struct Finding {
    text: String,
    held: bool,
    wanted: String,
}

/// Each traffic-management scenario pushed through istiod-lite as istiod would render it, driven
/// briefly from the sleep client, one line each; the fixture's resources come back afterwards
/// (these run after the metrics section, whose counts they would change).
async fn traffic_management(mesh: &WaypointMesh, expect: &mut Expectations) {
    let fixture = match Fixture::of(mesh) {
        Ok(f) => f,
        Err(e) => {
            line("scenarios", format!("not run: {e}"));
            expect.check(false, || format!("the fixture for the scenarios: {e}"));
            return;
        }
    };
    let nacks_before = mesh.nacks().await.len();
    let mut findings = vec![
        ("retries", scenario_retries(mesh, &fixture).await),
        ("retry-limit", scenario_retry_limit(mesh, &fixture).await),
        ("fault", scenario_fault(mesh).await),
        ("breaker", scenario_breaker(mesh, &fixture).await),
        ("timeout", scenario_timeout(mesh, &fixture).await),
        ("mirror", scenario_mirror(mesh, &fixture).await),
        ("jwt", scenario_jwt(mesh, &fixture).await),
        ("jwks-remote", scenario_jwks_remote(mesh, &fixture).await),
        ("ws-idle", scenario_ws_idle(mesh, &fixture).await),
        ("authz", scenario_path_template(mesh, &fixture).await),
        ("cors", scenario_cors(mesh, &fixture).await),
        ("ratelimit", scenario_rate_limit(mesh, &fixture).await),
        ("metric", scenario_custom_metric(mesh, &fixture).await),
    ];
    let (lb_findings, pods_removed) = load_balancing(mesh, &fixture).await;
    findings.extend(lb_findings);
    for (section, finding) in findings {
        match finding {
            Ok(f) => {
                line(section, &f.text);
                expect.check(f.held, || {
                    format!("{section}: {} (got: {})", f.wanted, f.text)
                });
            }
            Err(e) => {
                line(section, format!("failed: {e}"));
                expect.check(false, || format!("{section}: {e}"));
            }
        }
    }
    // Whatever happened above, the fixture's listener, cluster and pod are what the mesh runs on.
    let restored = async {
        pods_removed?;
        scenarios::push(
            mesh,
            ResourceKind::Listener,
            &fixture.main_internal(),
            "the fixture's main_internal",
        )
        .await?;
        scenarios::push(
            mesh,
            ResourceKind::Cluster,
            &fixture.vip_cluster(),
            "the fixture's service cluster",
        )
        .await
    }
    .await;
    let nacks = mesh.nacks().await;
    expect.check(restored.is_ok(), || {
        format!("the fixture's resources restored after the scenarios: {restored:?}")
    });
    expect.check(nacks.len() == nacks_before, || {
        format!("no NACK of a scenario's resources: {nacks:?}")
    });
}

/// `/stats` counter `name` of the proxy (0 when absent).
async fn counter(mesh: &WaypointMesh, name: &str) -> Result<u64, ScenarioError> {
    scenarios::stat(mesh, name).await
}

/// `istio_requests_total` with `labels`, now.
async fn istio_count(mesh: &WaypointMesh, labels: &[&str]) -> Result<f64, ScenarioError> {
    Ok(
        scenarios::wait_requests_total(mesh, labels, 0.0, Duration::ZERO)
            .await?
            .0,
    )
}

/// `istio_requests_total` with `labels` once it reached `want` (bounded).
async fn istio_count_at_least(
    mesh: &WaypointMesh,
    labels: &[&str],
    want: f64,
) -> Result<f64, ScenarioError> {
    Ok(scenarios::wait_requests_total(mesh, labels, want, OBSERVE)
        .await?
        .0)
}

/// VirtualService `retries: {attempts: 2, retryOn: 5xx}` (the VirtualService of the fault
/// scenario too, which stays pushed): an upstream failing twice.
async fn scenario_retries(
    mesh: &WaypointMesh,
    fixture: &Fixture,
) -> Result<Finding, ScenarioError> {
    scenarios::push(
        mesh,
        ResourceKind::Listener,
        &vs_listener(fixture)?,
        "main_internal with the retries/fault VirtualService",
    )
    .await?;
    let retry_stat = format!("{VIP_STATS}.upstream_rq_retry");
    let before = counter(mesh, &retry_stat).await?;
    let a = scenarios::send(
        mesh.client_addr(),
        "POST",
        "/retry/5xx",
        &[("x-echo-key", "mesh-retry-5xx"), ("x-echo-fail-first", "2")],
        Bytes::from_static(b"replayed"),
    )
    .await?;
    let attempts = a.header("x-echo-request-count").unwrap_or("?").to_owned();
    let retried = counter(mesh, &retry_stat).await?.saturating_sub(before);
    let seen_attempts = a
        .echo()
        .ok()
        .and_then(|s| s.headers.get("x-envoy-attempt-count").cloned());
    Ok(Finding {
        text: format!(
            "retryOn 5xx, attempts 2; 2 x 503 then 200: client got {} after {attempts} attempts at the echo (x-envoy-attempt-count {}, upstream_rq_retry +{retried})",
            a.status.as_u16(),
            seen_attempts.as_deref().unwrap_or("-")
        ),
        held: a.status == http::StatusCode::OK && attempts == "3" && retried == 2,
        wanted: "200 after 3 attempts, upstream_rq_retry +2".to_owned(),
    })
}

/// VirtualService `fault`: 50 % abort (503) over [`ABORT_SAMPLE`] h2c requests, and a 1 s delay.
async fn scenario_fault(mesh: &WaypointMesh) -> Result<Finding, ScenarioError> {
    let fi = ["response_code=\"503\"", "response_flags=\"FI\""];
    let di = ["response_flags=\"DI\""];
    let (fi_before, di_before) = (istio_count(mesh, &fi).await?, istio_count(mesh, &di).await?);
    let (aborted, answered, other) = abort_sample(mesh.client_addr()).await;
    let delayed = scenarios::send(
        mesh.client_addr(),
        "GET",
        "/fault/delay/mesh",
        &[],
        Bytes::new(),
    )
    .await?;
    let fi_seen = istio_count_at_least(mesh, &fi, fi_before + aborted as f64).await? - fi_before;
    let di_seen = istio_count_at_least(mesh, &di, di_before + 1.0).await? - di_before;
    let ratio = aborted as f64 / ABORT_SAMPLE as f64;
    Ok(Finding {
        text: format!(
            "50% abort over {ABORT_SAMPLE} h2c requests: {aborted} aborted (503, FI +{fi_seen}), {answered} answered{}; {} s delay: {} after {:.2} s (DI +{di_seen})",
            if other.is_empty() {
                String::new()
            } else {
                format!(", other: {}", other.join(", "))
            },
            scenarios::FAULT_DELAY.as_secs_f64(),
            delayed.status.as_u16(),
            delayed.took.as_secs_f64()
        ),
        held: (ratio - 0.5).abs() <= ABORT_BAND
            && aborted + answered == ABORT_SAMPLE
            && fi_seen == aborted as f64
            && delayed.status == http::StatusCode::OK
            && delayed.took >= scenarios::FAULT_DELAY
            && di_seen == 1.0,
        wanted: format!(
            "50% ± {}% aborted with FI, the rest 200; a 200 after >= 1 s with DI",
            ABORT_BAND * 100.0
        ),
    })
}

/// [`ABORT_SAMPLE`] GETs to `/fault/abort` on one h2c connection: (aborted with Envoy's fault
/// reply, answered 200, anything else).
async fn abort_sample(addr: SocketAddr) -> (usize, usize, Vec<String>) {
    let handshake = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| format!("h2c handshake: {e}"))
    };
    let (send, conn) = match tokio::time::timeout(REQUEST, handshake).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return (0, 0, vec![e]),
        Err(_) => return (0, 0, vec![format!("h2c handshake within {REQUEST:?}")]),
    };
    let driver = tokio::spawn(conn);
    let outcomes: Vec<Result<(u16, Bytes), String>> = futures::stream::iter(0..ABORT_SAMPLE)
        .map(|i| {
            let mut send = send.clone();
            async move {
                let exchange = async {
                    send.ready().await.map_err(|e| e.to_string())?;
                    let req = Request::get(format!("http://{HOST}/fault/abort/{i}"))
                        .body(Empty::<Bytes>::new())
                        .map_err(|e| e.to_string())?;
                    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
                    let status = resp.status().as_u16();
                    let body = read_body(resp.into_body(), ECHO_BODY_LIMIT, REQUEST)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok((status, body))
                };
                tokio::time::timeout(REQUEST, exchange)
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {REQUEST:?}")))
            }
        })
        .buffer_unordered(ABORT_CONCURRENCY)
        .collect()
        .await;
    driver.abort();
    let (mut aborted, mut answered, mut other) = (0, 0, BTreeMap::<String, usize>::new());
    for o in outcomes {
        match o {
            Ok((503, body)) if &body[..] == b"fault filter abort" => aborted += 1,
            Ok((200, _)) => answered += 1,
            Ok((status, _)) => *other.entry(status.to_string()).or_default() += 1,
            Err(e) => *other.entry(e).or_default() += 1,
        }
    }
    let other = other
        .into_iter()
        .map(|(k, n)| format!("{n} x {k}"))
        .collect();
    (aborted, answered, other)
}

/// DestinationRule `http2MaxRequests: 1`: one slow request holds the only slot, a burst behind it
/// overflows.
async fn scenario_breaker(
    mesh: &WaypointMesh,
    fixture: &Fixture,
) -> Result<Finding, ScenarioError> {
    scenarios::push(
        mesh,
        ResourceKind::Cluster,
        &breaker_cluster(fixture),
        "the service cluster with max_requests 1",
    )
    .await?;
    let uo = ["response_code=\"503\"", "response_flags=\"UO\""];
    let uo_before = istio_count(mesh, &uo).await?;
    let client = mesh.client_addr();
    let hold = [("x-echo-delay-ms", BREAKER_HOLD_MS)];
    let slow = tokio::spawn(async move {
        scenarios::send(client, "GET", "/cb/slow", &hold, Bytes::new()).await
    });
    let active = format!("{VIP_STATS}.upstream_rq_active");
    let held = scenarios::wait_stat(mesh, &active, 1, OBSERVE).await;
    let burst = futures::future::join_all((0..BREAKER_BURST).map(|i| async move {
        let path = format!("/cb/burst/{i}");
        scenarios::send(client, "GET", &path, &hold, Bytes::new()).await
    }))
    .await;
    let overflowed = burst
        .iter()
        .filter(|a| {
            a.as_ref().is_ok_and(|a| {
                a.status == http::StatusCode::SERVICE_UNAVAILABLE
                    && a.header("x-envoy-overloaded") == Some("true")
            })
        })
        .count();
    let slow = slow
        .await
        .map_err(|e| MeshError::Http(format!("the slow request's task: {e}")))??;
    let uo_seen = istio_count_at_least(mesh, &uo, uo_before + overflowed as f64).await? - uo_before;
    scenarios::push(
        mesh,
        ResourceKind::Cluster,
        &fixture.vip_cluster(),
        "the fixture's service cluster",
    )
    .await?;
    Ok(Finding {
        text: format!(
            "DestinationRule http2MaxRequests 1, 1 slow + {BREAKER_BURST} concurrent: {overflowed} x 503 UO (x-envoy-overloaded; istio_requests_total UO +{uo_seen}), the slow one {}{}",
            slow.status.as_u16(),
            held.err()
                .map(|e| format!("; slot not seen taken: {e}"))
                .unwrap_or_default()
        ),
        held: overflowed == BREAKER_BURST
            && uo_seen == BREAKER_BURST as f64
            && slow.status == http::StatusCode::OK,
        wanted: format!("{BREAKER_BURST} x 503 UO while the slot is taken"),
    })
}

/// VirtualService `timeout: 0.5s` against a 2 s upstream, and `grpc-timeout` on istiod's
/// default route (`timeout: 0s, max_grpc_timeout: 0s`).
async fn scenario_timeout(
    mesh: &WaypointMesh,
    fixture: &Fixture,
) -> Result<Finding, ScenarioError> {
    scenarios::push(
        mesh,
        ResourceKind::Listener,
        &timeout_listener(fixture, ROUTE_TIMEOUT)?,
        "main_internal with the timeout VirtualService",
    )
    .await?;
    // The gRPC call's 504 reaches its client as a trailers-only UNAVAILABLE (HTTP 200), as
    // Envoy sends local replies to gRPC requests: count the flag alone.
    let ut = ["response_flags=\"UT\""];
    let ut_before = istio_count(mesh, &ut).await?;
    let client = mesh.client_addr();
    let route = scenarios::send(
        client,
        "GET",
        "/timeout/slow",
        &[("x-echo-delay-ms", SLOW_UPSTREAM_MS)],
        Bytes::new(),
    )
    .await?;
    let grpc = scenarios::send(
        client,
        "POST",
        "/grpc/slow",
        &[
            ("content-type", "application/grpc"),
            ("grpc-timeout", &format!("{}m", GRPC_TIMEOUT.as_millis())),
            ("x-echo-delay-ms", SLOW_UPSTREAM_MS),
        ],
        Bytes::new(),
    )
    .await?;
    let ut_seen = istio_count_at_least(mesh, &ut, ut_before + 2.0).await? - ut_before;
    let cut = |a: &scenarios::Answer, at: Duration| {
        a.took >= at && a.took < at + Duration::from_millis(1_000)
    };
    let header = |a: &scenarios::Answer, name: &str| {
        a.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let (grpc_status, grpc_message) = (header(&grpc, "grpc-status"), header(&grpc, "grpc-message"));
    Ok(Finding {
        text: format!(
            "route timeout {:.1} s vs {:.0} s upstream: {} {:?} after {:.2} s; grpc-timeout {}m on the default route: {} grpc-status {grpc_status} {grpc_message:?} after {:.2} s (UT +{ut_seen})",
            ROUTE_TIMEOUT.as_secs_f64(),
            SLOW_UPSTREAM_MS.parse::<f64>().unwrap_or(0.0) / 1000.0,
            route.status.as_u16(),
            route.text(),
            route.took.as_secs_f64(),
            GRPC_TIMEOUT.as_millis(),
            grpc.status.as_u16(),
            grpc.took.as_secs_f64()
        ),
        held: route.status == http::StatusCode::GATEWAY_TIMEOUT
            && cut(&route, ROUTE_TIMEOUT)
            && route.text() == "upstream request timeout"
            && grpc.status == http::StatusCode::OK
            && grpc_status == "14"
            && grpc_message == "upstream request timeout"
            && cut(&grpc, GRPC_TIMEOUT)
            && ut_seen == 2.0,
        wanted:
            "504 UT at the route timeout; at the grpc-timeout a trailers-only grpc-status 14 (UT)"
                .to_owned(),
    })
}

/// VirtualService `mirror` (port 8001) + `mirrorPercentage: 100`: a second echo on the pod gets
/// every request's copy; with the mirror dead the primaries are unchanged.
async fn scenario_mirror(mesh: &WaypointMesh, fixture: &Fixture) -> Result<Finding, ScenarioError> {
    let mirror = MirrorEcho::start(mesh).await?;
    let dead = scenarios::dead_pod_port(mesh)?;
    scenarios::add_mirror_port(mesh, fixture, mirror.addr).await?;
    scenarios::push(
        mesh,
        ResourceKind::Listener,
        &mirror_listener(fixture)?,
        "main_internal with the mirroring VirtualService",
    )
    .await?;
    let client = mesh.client_addr();
    let mut primaries = BTreeMap::new();
    for i in 0..MIRRORED {
        let (_, _, a) = scenarios::mirrored_post(client, i).await?;
        if let Ok(seen) = a.echo() {
            primaries.insert(i, seen.body_sha1);
        }
    }
    let entries = mirror.journal.wait_for(MIRRORED, OBSERVE).await;
    let mut identical = 0;
    let mut hosts = std::collections::BTreeSet::new();
    for e in &entries {
        let Ok(seen) = EchoSeen::parse(e) else {
            continue;
        };
        hosts.insert(seen.headers.get("host").cloned().unwrap_or_default());
        let seq = seen
            .headers
            .get("x-mirror-seq")
            .and_then(|s| s.parse::<usize>().ok());
        if seq.and_then(|s| primaries.get(&s)) == Some(&seen.body_sha1) && seen.body_sha1.is_some()
        {
            identical += 1;
        }
    }
    // The mirror's endpoint on a dead port: the primaries must not notice.
    scenarios::push(
        mesh,
        ResourceKind::Endpoint,
        &mirror_endpoints(fixture, dead),
        "the mirror port's endpoints on a dead port",
    )
    .await?;
    let mut unchanged = 0;
    for i in 0..DEAD_MIRRORED {
        let (_, _, a) = scenarios::mirrored_post(client, i).await?;
        if a.echo().ok().map(|s| s.body_sha1) == primaries.get(&i).cloned() {
            unchanged += 1;
        }
    }
    let via_waypoint = scenarios::tunnels_to(mesh, &mirror.addr.to_string())
        .iter()
        .all(|t| t.peer_identity == WAYPOINT_IDENTITY);
    scenarios::push(
        mesh,
        ResourceKind::Listener,
        &fixture.main_internal(),
        "the fixture's main_internal",
    )
    .await?;
    scenarios::remove_mirror_port(mesh, fixture).await?;
    let hosts: Vec<String> = hosts.into_iter().collect();
    Ok(Finding {
        text: format!(
            "{}/{MIRRORED} requests mirrored to {} (port {MIRROR_PORT}, HBONE as the waypoint: {}) with identical bodies ({identical}); dead mirror: {unchanged}/{DEAD_MIRRORED} primaries unchanged",
            entries.len(),
            hosts.join(","),
            yes_no(via_waypoint)
        ),
        held: entries.len() == MIRRORED
            && identical == MIRRORED
            && hosts == [SHADOW_HOST]
            && via_waypoint
            && unchanged == DEAD_MIRRORED,
        wanted: format!(
            "{MIRRORED} copies with host {SHADOW_HOST} and the primaries' bodies; primaries unchanged with a dead mirror"
        ),
    })
}

/// RequestAuthentication (inline JWKS of a key made here) + AuthorizationPolicy
/// `request.auth.claims[group] = admins`.
async fn scenario_jwt(mesh: &WaypointMesh, fixture: &Fixture) -> Result<Finding, ScenarioError> {
    let issuer = Issuer::new()?;
    scenarios::push(
        mesh,
        ResourceKind::Listener,
        &jwt_listener(fixture, &issuer.jwks())?,
        "main_internal with the RequestAuthentication and the claim policy",
    )
    .await?;
    let tokens = [
        (
            "valid+claim",
            Some(issuer.token(&jwt_claims(Some(json!("admins")), 600), false)?),
            200,
        ),
        (
            "valid no claim",
            Some(issuer.token(&jwt_claims(Some(json!("dev")), 600), false)?),
            403,
        ),
        (
            "expired",
            Some(issuer.token(&jwt_claims(Some(json!("admins")), -3_600), false)?),
            401,
        ),
        (
            "bad signature",
            Some(issuer.token(&jwt_claims(Some(json!("admins")), 600), true)?),
            401,
        ),
        ("no token", None, 403),
    ];
    let mut parts = Vec::new();
    let mut held = true;
    for (what, token, want) in tokens {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("authorization", a)])
            .unwrap_or_default();
        let a = scenarios::send(mesh.client_addr(), "GET", "/jwt", &headers, Bytes::new()).await?;
        let status = a.status.as_u16();
        held &= status == want;
        parts.push(match status {
            403 => format!(
                "{what} 403 ({})",
                a.text().trim_end_matches(": access denied")
            ),
            _ => format!("{what} {status}"),
        });
    }
    scenarios::push(
        mesh,
        ResourceKind::Listener,
        &fixture.main_internal(),
        "the fixture's main_internal",
    )
    .await?;
    Ok(Finding {
        text: format!(
            "RequestAuthentication + claims[group]=admins policy: {}",
            parts.join(", ")
        ),
        held,
        wanted: "valid+claim 200, no claim 403, expired 401, bad signature 401, no token 403"
            .to_owned(),
    })
}

/// Valid tokens sent once the remote JWKS is in force: all of them must be served from one fetch.
const JWKS_REQUESTS: usize = 4;

/// RequestAuthentication with `jwksUri` as istiod renders it under
/// `PILOT_JWT_ENABLE_REMOTE_JWKS=envoy` (the claim policy of [`scenario_jwt`] alongside): the
/// waypoint fetches the keys from the JWKS server through the ServiceEntry's cluster on the first
/// request, then verifies from its cache. The cluster goes away again afterwards.
async fn scenario_jwks_remote(
    mesh: &WaypointMesh,
    fixture: &Fixture,
) -> Result<Finding, ScenarioError> {
    let issuer = Issuer::new()?;
    let server = JwksServer::start(&issuer.jwks()).await?;
    let driven = async {
        server.install(mesh).await?;
        scenarios::push(
            mesh,
            ResourceKind::Listener,
            &remote_jwks_listener(fixture, &server)?,
            "main_internal with the jwksUri RequestAuthentication and the claim policy",
        )
        .await?;
        // istiod sets no `async_fetch`: nothing is fetched until a request needs the keys.
        let before = server.fetches();
        let valid = format!(
            "Bearer {}",
            issuer.token(&jwt_claims(Some(json!("admins")), 600), false)?
        );
        let mut statuses = Vec::new();
        for _ in 0..JWKS_REQUESTS {
            let a = scenarios::send(
                mesh.client_addr(),
                "GET",
                "/jwt/remote",
                &[("authorization", valid.as_str())],
                Bytes::new(),
            )
            .await?;
            statuses.push(a.status.as_u16());
        }
        let forged = format!(
            "Bearer {}",
            issuer.token(&jwt_claims(Some(json!("admins")), 600), true)?
        );
        let bad = scenarios::send(
            mesh.client_addr(),
            "GET",
            "/jwt/remote",
            &[("authorization", forged.as_str())],
            Bytes::new(),
        )
        .await?;
        // The DNS cluster's resolution as config_dump shows it (Envoy dumps non-EDS clusters'
        // hosts under static_endpoint_configs).
        let dump = mesh.config_dump("include_eds").await?;
        let resolved = resolved_addresses(&dump, &server.cluster_name());
        Ok::<_, ScenarioError>((
            before,
            statuses,
            bad.status.as_u16(),
            server.fetches(),
            resolved,
        ))
    }
    .await;
    // The fixture's listener first: the cluster must not go while a listener still names it.
    let restored = scenarios::push(
        mesh,
        ResourceKind::Listener,
        &fixture.main_internal(),
        "the fixture's main_internal",
    )
    .await;
    // Also after a failed install: a cluster pushed but never healthy must not stay.
    let removed = server.uninstall(mesh).await;
    // The scenario's own error first: a failed removal after it is a consequence.
    let (before, statuses, bad, fetches, resolved) = driven?;
    restored?;
    removed?;
    let all_ok = statuses.iter().all(|s| *s == 200);
    let shown: Vec<String> = statuses.iter().map(u16::to_string).collect();
    let want_resolved = format!("127.0.0.1:{}", server.port());
    Ok(Finding {
        text: format!(
            "RequestAuthentication jwksUri {} via {} (STRICT_DNS, endpoint localhost, \
             config_dump: {}): valid token {} ({}), bad signature {bad}, JWKS fetched \
             {fetches}x ({before} before the first request)",
            server.uri(),
            server.cluster_name(),
            if resolved.is_empty() {
                "NOT resolved".to_owned()
            } else {
                resolved.join(",")
            },
            if all_ok { "200" } else { "NOT 200" },
            shown.join("/"),
        ),
        held: all_ok
            && bad == 401
            && before == 0
            && fetches == 1
            && resolved.contains(&want_resolved),
        wanted: format!(
            "{JWKS_REQUESTS} valid tokens 200, bad signature 401, the JWKS fetched once, on \
             demand, localhost resolved to {want_resolved}"
        ),
    })
}

/// The `address:port` of every endpoint of cluster `name` in a config dump's
/// `static_endpoint_configs`.
fn resolved_addresses(dump: &Json, name: &str) -> Vec<String> {
    let configs = dump["configs"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    configs
        .iter()
        .filter_map(|c| c["static_endpoint_configs"].as_array())
        .flatten()
        .map(|e| &e["endpoint_config"])
        .filter(|cla| cla["cluster_name"] == name)
        .filter_map(|cla| cla["endpoints"].as_array())
        .flatten()
        .filter_map(|l| l["lb_endpoints"].as_array())
        .flatten()
        .filter_map(|ep| {
            let sa = &ep["endpoint"]["address"]["socket_address"];
            Some(format!(
                "{}:{}",
                sa["address"].as_str()?,
                sa["port_value"].as_u64()?
            ))
        })
        .collect()
}

/// The route's stream idle timeout the ws-idle EnvoyFilter sets.
const WS_IDLE: Duration = Duration::from_secs(1);
/// Bound for the waypoint to close a silent WebSocket.
const WS_IDLE_BOUND: Duration = Duration::from_secs(5);
/// How often the talking WebSocket exchanges a message, and for how long.
const WS_TALK_EVERY: Duration = Duration::from_millis(300);
const WS_TALK_FOR: Duration = Duration::from_secs(2);

/// A route `idle_timeout` of 1 s (EnvoyFilter `HTTP_ROUTE` MERGE on the VirtualService's `ws`
/// route) applied to WebSockets through the waypoint: a silent one is closed after about 1 s,
/// one that exchanges a message every 300 ms for 2 s stays open and closes cleanly.
async fn scenario_ws_idle(
    mesh: &WaypointMesh,
    fixture: &Fixture,
) -> Result<Finding, ScenarioError> {
    scenarios::push(
        mesh,
        ResourceKind::Listener,
        &ws_idle_listener(fixture, WS_IDLE)?,
        "main_internal with the ws route's idle_timeout (EnvoyFilter)",
    )
    .await?;
    let client = mesh.client_addr();
    let (silent, talking) = tokio::join!(ws_silent(client), ws_talking(client));
    scenarios::push(
        mesh,
        ResourceKind::Listener,
        &fixture.main_internal(),
        "the fixture's main_internal",
    )
    .await?;
    // Not before the timer could have fired (a little slack for the clock), within the bound.
    let silent_held = silent
        .as_ref()
        .is_ok_and(|d| *d >= WS_IDLE.mul_f64(0.8) && *d <= WS_IDLE_BOUND);
    let want_echoes = (WS_TALK_FOR.as_millis() / WS_TALK_EVERY.as_millis()) as usize;
    let talking_held = talking
        .as_ref()
        .is_ok_and(|(n, open)| *n >= want_echoes && *open >= WS_TALK_FOR);
    Ok(Finding {
        text: format!(
            "EnvoyFilter route idle_timeout {}s on /ws: silent WebSocket {}, one talking every {} {}",
            WS_IDLE.as_secs_f64(),
            match &silent {
                Ok(d) => format!("closed by the waypoint after {}", secs(*d)),
                Err(e) => format!("NOT closed as wanted: {e}"),
            },
            secs(WS_TALK_EVERY),
            match &talking {
                Ok((n, open)) => format!("open for {} ({n} echoes), then close 1000", secs(*open)),
                Err(e) => format!("FAILED: {e}"),
            },
        ),
        held: silent_held && talking_held,
        wanted: format!(
            "silent WebSocket closed after {}..{}, talking one open {} with every echo",
            secs(WS_IDLE.mul_f64(0.8)),
            secs(WS_IDLE_BOUND),
            secs(WS_TALK_FOR)
        ),
    })
}

/// Opens a WebSocket and sends nothing: how long after the `101` the connection ended.
async fn ws_silent(addr: SocketAddr) -> Result<Duration, String> {
    let mut ws = WsClient::connect(addr, HOST, "/ws", REQUEST)
        .await
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    match tokio::time::timeout(WS_IDLE_BOUND, ws.recv()).await {
        Err(_) => Err(format!("still open after {}", secs(WS_IDLE_BOUND))),
        Ok(Ok(frame)) => Err(format!("a frame came instead of the end: {frame:?}")),
        // The end of the stream (EOF or a reset) is what the idle timeout does.
        Ok(Err(_)) => Ok(t0.elapsed()),
    }
}

/// Opens a WebSocket and exchanges one text frame every [`WS_TALK_EVERY`] for [`WS_TALK_FOR`],
/// then closes it with 1000: the echoes counted and how long it stayed open.
async fn ws_talking(addr: SocketAddr) -> Result<(usize, Duration), String> {
    let mut ws = WsClient::connect(addr, HOST, "/ws", REQUEST)
        .await
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let mut every = tokio::time::interval(WS_TALK_EVERY);
    let mut echoes = 0usize;
    while t0.elapsed() < WS_TALK_FOR {
        every.tick().await;
        let text = format!("tick {echoes}");
        let exchange = async {
            ws.send(ws_opcode::TEXT, text.as_bytes()).await?;
            ws.recv().await
        };
        let back = tokio::time::timeout(REQUEST, exchange)
            .await
            .map_err(|_| format!("echo {echoes}: nothing within {REQUEST:?}"))?
            .map_err(|e| format!("echo {echoes} after {}: {e}", secs(t0.elapsed())))?;
        if back != (ws_opcode::TEXT, text.into_bytes()) {
            return Err(format!("echo {echoes} came back as {back:?}"));
        }
        echoes += 1;
    }
    let open = t0.elapsed();
    let close = async {
        ws.send(ws_opcode::CLOSE, &1000u16.to_be_bytes()).await?;
        ws.recv().await
    };
    let close = tokio::time::timeout(REQUEST, close)
        .await
        .map_err(|_| format!("no close within {REQUEST:?}"))?
        .map_err(|e| format!("closing after {}: {e}", secs(open)))?;
    if close != (ws_opcode::CLOSE, 1000u16.to_be_bytes().to_vec()) {
        return Err(format!("close came back as {close:?}"));
    }
    Ok((echoes, open))
}

/// VirtualService `corsPolicy` on `/cors`: preflights from the allowed origin and another one.
async fn scenario_cors(mesh: &WaypointMesh, fixture: &Fixture) -> Result<Finding, ScenarioError> {
    scenarios::push(
        mesh,
        ResourceKind::Listener,
        &cors_listener(fixture)?,
        "main_internal with the CORS VirtualService",
    )
    .await?;
    let client = mesh.client_addr();
    let preflight = |origin: &'static str, key: &'static str| async move {
        let headers = [
            ("origin", origin),
            ("access-control-request-method", "POST"),
            ("x-echo-key", key),
        ];
        scenarios::send(client, "OPTIONS", "/cors/items", &headers, Bytes::new()).await
    };
    let cors_headers = |a: &scenarios::Answer| {
        a.headers
            .keys()
            .filter(|k| k.as_str().starts_with("access-control-"))
            .count()
    };
    let allowed = preflight(ALLOWED_ORIGIN, "mesh-cors-allowed").await?;
    // The echo counts this request too: 1 means the preflight never reached it.
    let allowed_at_echo = scenarios::echo_count(mesh, "mesh-cors-allowed").await? == Some(1);
    let other = preflight(OTHER_ORIGIN, "mesh-cors-other").await?;
    let other_at_echo = other.echo().is_ok_and(|s| s.method == "OPTIONS");
    let allowed_ok = allowed.status == http::StatusCode::OK
        && allowed.header("access-control-allow-origin") == Some(ALLOWED_ORIGIN)
        && allowed_at_echo;
    scenarios::push(
        mesh,
        ResourceKind::Listener,
        &fixture.main_internal(),
        "the fixture's main_internal",
    )
    .await?;
    Ok(Finding {
        text: format!(
            "preflight from the allowed origin {} ({}, {} CORS headers), other origin {} without CORS headers ({})",
            allowed.status.as_u16(),
            if allowed_at_echo {
                "not forwarded"
            } else {
                "FORWARDED"
            },
            cors_headers(&allowed),
            if other_at_echo {
                "forwarded"
            } else {
                "NOT forwarded"
            },
            cors_headers(&other)
        ),
        held: allowed_ok && other_at_echo && cors_headers(&other) == 0,
        wanted: "the allowed preflight answered by the waypoint, the other forwarded unmarked"
            .to_owned(),
    })
}

/// Istio's local rate limit EnvoyFilter: the route's own bucket of [`RATE_LIMIT_TOKENS`].
async fn scenario_rate_limit(
    mesh: &WaypointMesh,
    fixture: &Fixture,
) -> Result<Finding, ScenarioError> {
    scenarios::push(
        mesh,
        ResourceKind::Listener,
        &rate_limit_listener(fixture, RATE_LIMIT_TOKENS)?,
        "main_internal with the local rate limit",
    )
    .await?;
    let rl = ["response_code=\"429\"", "response_flags=\"RL\""];
    let rl_before = istio_count(mesh, &rl).await?;
    let mut passed = 0;
    for i in 0..RATE_LIMIT_TOKENS {
        let path = format!("/ratelimit/{i}");
        let a = scenarios::send(mesh.client_addr(), "GET", &path, &[], Bytes::new()).await?;
        if a.status == http::StatusCode::OK {
            passed += 1;
        }
    }
    let over = scenarios::send(
        mesh.client_addr(),
        "GET",
        "/ratelimit/over",
        &[],
        Bytes::new(),
    )
    .await?;
    let rl_seen = istio_count_at_least(mesh, &rl, rl_before + 1.0).await? - rl_before;
    scenarios::push(
        mesh,
        ResourceKind::Listener,
        &fixture.main_internal(),
        "the fixture's main_internal",
    )
    .await?;
    Ok(Finding {
        text: format!(
            "{RATE_LIMIT_TOKENS} tokens: {passed} x 200 then {} {:?} (x-local-rate-limit: {}, RL +{rl_seen})",
            over.status.as_u16(),
            over.text(),
            over.header("x-local-rate-limit").unwrap_or("-")
        ),
        held: passed == RATE_LIMIT_TOKENS
            && over.status == http::StatusCode::TOO_MANY_REQUESTS
            && over.header("x-local-rate-limit") == Some("true")
            && rl_seen == 1.0,
        wanted: format!("{RATE_LIMIT_TOKENS} x 200, then 429 with RL"),
    })
}

/// VirtualService `retries: {attempts: 2, retryOn: 5xx}` ([`vs_listener`]'s `/retry/5xx` route)
/// against an upstream that always answers 503: once the retries are used up Envoy returns the
/// last 503 as the upstream sent it, flagged `URX` (upstream retry limit exceeded).
async fn scenario_retry_limit(
    mesh: &WaypointMesh,
    fixture: &Fixture,
) -> Result<Finding, ScenarioError> {
    // Usually pushed already by the retries scenario (then nothing is sent again).
    scenarios::push(
        mesh,
        ResourceKind::Listener,
        &vs_listener(fixture)?,
        "main_internal with the retries/fault VirtualService",
    )
    .await?;
    let urx = ["response_code=\"503\"", "response_flags=\"URX\""];
    let urx_before = istio_count(mesh, &urx).await?;
    let limit_stat = format!("{VIP_STATS}.upstream_rq_retry_limit_exceeded");
    let limit_before = counter(mesh, &limit_stat).await?;
    let a = scenarios::send(
        mesh.client_addr(),
        "GET",
        "/retry/5xx/always",
        &[("x-echo-key", "mesh-retry-limit"), ("x-echo-status", "503")],
        Bytes::new(),
    )
    .await?;
    let attempts = a.header("x-echo-request-count").unwrap_or("?").to_owned();
    // The 503 is the echo's own answer (its JSON), passed on as the last attempt got it.
    let seen_attempts = EchoSeen::parse(&a.body)
        .ok()
        .and_then(|s| s.headers.get("x-envoy-attempt-count").cloned());
    let urx_seen = istio_count_at_least(mesh, &urx, urx_before + 1.0).await? - urx_before;
    let limit = counter(mesh, &limit_stat)
        .await?
        .saturating_sub(limit_before);
    Ok(Finding {
        text: format!(
            "retryOn 5xx, attempts 2; upstream always 503: client got {} after {attempts} attempts at the echo (x-envoy-attempt-count {}), response_flags URX +{urx_seen}, upstream_rq_retry_limit_exceeded +{limit}",
            a.status.as_u16(),
            seen_attempts.as_deref().unwrap_or("-")
        ),
        held: a.status == http::StatusCode::SERVICE_UNAVAILABLE
            && attempts == "3"
            && seen_attempts.as_deref() == Some("3")
            && urx_seen == 1.0
            && limit == 1,
        wanted:
            "the upstream's 503 after 3 attempts, flagged URX, upstream_rq_retry_limit_exceeded +1"
                .to_owned(),
    })
}

/// The AuthorizationPolicy paths of the path-template scenario (Istio's `{*}` / `{**}`).
const TEMPLATE_PATHS: &[&str] = &["/api/{*}/items", "/files/{**}"];
/// Requests of the path-template scenario and the status each must get.
const TEMPLATE_REQUESTS: &[(&str, u16)] = &[
    ("/api/v1/items", 200),
    ("/api/orders/items?page=2", 200),
    ("/files/2024/q1/report.csv", 200),
    ("/api/v1/items/7", 403),
    ("/api/a/b/items", 403),
    ("/api/items", 403),
    ("/get", 403),
];

/// AuthorizationPolicy ALLOW `to.operation.paths: [/api/{*}/items, /files/{**}]`: istiod renders
/// the paths as RBAC `uri_template` permissions (`/api/*/items`, `/files/**`); `*` is exactly one
/// segment, `**` any number, the query is not part of the path.
async fn scenario_path_template(
    mesh: &WaypointMesh,
    fixture: &Fixture,
) -> Result<Finding, ScenarioError> {
    scenarios::push(
        mesh,
        ResourceKind::Listener,
        &path_policy_listener(fixture, "api-items", TEMPLATE_PATHS)?,
        "main_internal with the path-template AuthorizationPolicy",
    )
    .await?;
    let mut parts = Vec::new();
    let mut held = true;
    let mut denied_by_rbac = true;
    for (path, want) in TEMPLATE_REQUESTS {
        let a = scenarios::send(mesh.client_addr(), "GET", path, &[], Bytes::new()).await?;
        let status = a.status.as_u16();
        held &= status == *want;
        if status == 403 {
            denied_by_rbac &= a.text() == "RBAC: access denied";
        }
        parts.push(format!("{path} {status}"));
    }
    scenarios::push(
        mesh,
        ResourceKind::Listener,
        &fixture.main_internal(),
        "the fixture's main_internal",
    )
    .await?;
    let templates: Vec<String> = TEMPLATE_PATHS
        .iter()
        .map(|p| p.replace("{**}", "**").replace("{*}", "*"))
        .collect();
    Ok(Finding {
        text: format!(
            "ALLOW paths {} (RBAC uri_template {}): {}{}",
            TEMPLATE_PATHS.join(", "),
            templates.join(", "),
            parts.join(", "),
            if denied_by_rbac {
                ""
            } else {
                "; a 403 not from RBAC"
            }
        ),
        held: held && denied_by_rbac,
        wanted: TEMPLATE_REQUESTS
            .iter()
            .map(|(p, s)| format!("{p} {s}"))
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Requests counted by the custom metrics.
const CUSTOM_METRIC_REQUESTS: usize = 5;

/// `stats.PluginConfig.definitions` on the service chain's `istio.stats` (as an EnvoyFilter
/// patch sets them): a counter `istio_mesh_api_calls` labelled by method and response code (the
/// `metrics` dimensions), and a histogram `istio_mesh_response_size` of `response.total_size`,
/// read from the agent's merged `/stats/prometheus`.
async fn scenario_custom_metric(
    mesh: &WaypointMesh,
    fixture: &Fixture,
) -> Result<Finding, ScenarioError> {
    scenarios::push(
        mesh,
        ResourceKind::Listener,
        &istio_stats_listener(fixture, |config| {
            config["definitions"] = json!([
                {"name": "mesh_api_calls", "value": "1", "type": "COUNTER"},
                {"name": "mesh_response_size", "value": "response.total_size", "type": "HISTOGRAM"}
            ]);
            config["metrics"] = json!([{"name": "mesh_api_calls", "dimensions": {
                "request_method": "request.method",
                "response_code": "response.code"
            }}]);
        })?,
        "main_internal with custom istio.stats metrics",
    )
    .await?;
    let mut answered = 0;
    for i in 0..CUSTOM_METRIC_REQUESTS {
        let path = format!("/custom-metric/{i}");
        let a = scenarios::send(mesh.client_addr(), "GET", &path, &[], Bytes::new()).await?;
        if a.status == http::StatusCode::OK {
            answered += 1;
        }
    }
    let calls = |text: &str| -> u64 {
        istio_series(text, "istio_mesh_api_calls")
            .iter()
            .filter(|(l, _)| {
                l.get("request_method").map(String::as_str) == Some("GET")
                    && l.get("response_code").map(String::as_str) == Some("200")
            })
            .map(|(_, v)| *v)
            .sum()
    };
    let sizes = |text: &str| -> u64 {
        text.lines()
            .filter_map(|l| l.strip_prefix("istio_mesh_response_size_count"))
            .filter_map(|rest| rest.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    };
    // A stream is counted when it ends: wait (bounded) until every request shows.
    let want = CUSTOM_METRIC_REQUESTS as u64;
    let merged = SocketAddr::from(([127, 0, 0, 1], mesh.ports.status));
    let scrape = || async {
        match http_get(merged, "/stats/prometheus").await {
            Ok((200, body)) => body,
            _ => String::new(),
        }
    };
    let deadline = Instant::now() + OBSERVE;
    let mut text = scrape().await;
    while (calls(&text) < want || sizes(&text) < want) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        text = scrape().await;
    }
    scenarios::push(
        mesh,
        ResourceKind::Listener,
        &fixture.main_internal(),
        "the fixture's main_internal",
    )
    .await?;
    let typed = |family: &str, kind: &str| text.contains(&format!("# TYPE {family} {kind}\n"));
    let (calls, sizes) = (calls(&text), sizes(&text));
    let types_ok =
        typed("istio_mesh_api_calls", "counter") && typed("istio_mesh_response_size", "histogram");
    Ok(Finding {
        text: format!(
            "stats.PluginConfig definitions on istio.stats, {answered}/{CUSTOM_METRIC_REQUESTS} requests: istio_mesh_api_calls{{request_method=\"GET\",response_code=\"200\"}} {calls}, istio_mesh_response_size_count {sizes} in the agent's merged /stats/prometheus{}",
            if types_ok {
                " (counter, histogram)"
            } else {
                " (# TYPE lines missing)"
            }
        ),
        held: answered == CUSTOM_METRIC_REQUESTS && calls == want && sizes == want && types_ok,
        wanted: format!(
            "istio_mesh_api_calls {CUSTOM_METRIC_REQUESTS} (counter) and istio_mesh_response_size_count {CUSTOM_METRIC_REQUESTS} (histogram)"
        ),
    })
}

// ---------------------------------------------------------------------------------------------
// Load balancing: httpbin with several pods
// ---------------------------------------------------------------------------------------------

/// httpbin's pods for the load-balancing scenarios.
const LB_PODS: usize = 3;
/// Round-robin requests (a multiple of [`LB_PODS`]) and how many are in flight at once.
const LB_REQUESTS: usize = 30;
const LB_CONCURRENCY: usize = 8;
/// DestinationRule `outlierDetection`: ejected at the third consecutive 5xx, for longer than
/// the report takes (the scenario checks the ejection, not the return).
const LB_OUTLIER: OutlierPolicy = OutlierPolicy {
    consecutive_5xx: 3,
    interval: Duration::from_secs(1),
    base_ejection_time: Duration::from_secs(30),
    max_ejection_percent: 100,
};
/// Requests sent once the failing pod is ejected (none may reach it).
const EJECTED_REQUESTS: usize = 6;
/// Requests of the previous-hosts scenario, and the VirtualService's `retries.attempts`.
const RETRY_HOSTS_REQUESTS: usize = 30;
const RETRY_HOSTS_ATTEMPTS: u32 = 2;
/// Cookie affinity: the DestinationRule's `httpCookie`, the clients that get a cookie made up,
/// how many follow-ups each sends with it, and the cookie values chosen by clients.
const AFFINITY_COOKIE: &str = "httpbin-affinity";
const AFFINITY_TTL: Duration = Duration::from_secs(3600);
const AFFINITY_CLIENTS: usize = 4;
const AFFINITY_FOLLOW_UPS: usize = 4;
const AFFINITY_CHOSEN: usize = 12;

/// The load-balancing scenarios on [`LB_PODS`] pods of httpbin (each its own loopback IP, HBONE
/// sink and echo; WDS and EDS pushed as istiod does): round robin, retries onto other hosts,
/// outlier ejection, cookie affinity. Returns their findings, and whether the fixture's pod and
/// resources are back afterwards.
async fn load_balancing(
    mesh: &WaypointMesh,
    fixture: &Fixture,
) -> (
    Vec<(&'static str, Result<Finding, ScenarioError>)>,
    Result<(), ScenarioError>,
) {
    let pods = match ServicePods::start(mesh, &PodSpec::numbered("httpbin", LB_PODS)).await {
        Ok(p) => p,
        Err(e) => return (vec![("lb", Err(e))], Ok(())),
    };
    let mut findings = Vec::new();
    match pods.install(mesh, fixture).await {
        Ok(()) => {
            findings.push(("lb", lb_round_robin(mesh, fixture, &pods).await));
            findings.push(("retry-hosts", lb_previous_hosts(mesh, fixture, &pods).await));
            // After the scenarios that need every pod in the rotation: its ejection outlasts it.
            findings.push(("outlier", lb_outlier(mesh, fixture, &pods).await));
            findings.push(("affinity", lb_cookie_affinity(mesh, fixture, &pods).await));
        }
        Err(e) => findings.push(("lb", Err(e))),
    }
    // The listener first: no route may hash onto, or retry within, pods that go away.
    let restored = async {
        scenarios::push(
            mesh,
            ResourceKind::Listener,
            &fixture.main_internal(),
            "the fixture's main_internal",
        )
        .await?;
        scenarios::push(
            mesh,
            ResourceKind::Cluster,
            &fixture.vip_cluster(),
            "the fixture's service cluster",
        )
        .await?;
        pods.uninstall(mesh, fixture).await
    }
    .await;
    (findings, restored)
}

/// `n` GETs of `prefix/<i>`.
fn gets(prefix: &str, n: usize) -> Vec<BatchRequest> {
    (0..n)
        .map(|i| BatchRequest::get(&format!("{prefix}/{i}")))
        .collect()
}

/// `name n` for each pod, in pod order.
fn per_pod(pods: &ServicePods, count: impl Fn(&Pod) -> usize) -> String {
    pods.all()
        .iter()
        .map(|p| format!("{} {}", p.name(), count(p)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `200 x30 503 x2`.
fn statuses(t: &Tally) -> String {
    t.by_status
        .iter()
        .map(|(s, n)| format!("{n}x{s}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// DestinationRule `loadBalancer: {simple: ROUND_ROBIN}`: [`LB_REQUESTS`] requests over the
/// pods are a strict rotation.
async fn lb_round_robin(
    mesh: &WaypointMesh,
    fixture: &Fixture,
    pods: &ServicePods,
) -> Result<Finding, ScenarioError> {
    pods.clear_faults();
    scenarios::push(
        mesh,
        ResourceKind::Cluster,
        &dr_cluster(fixture, LoadBalancer::RoundRobin, None),
        "the service cluster with ROUND_ROBIN",
    )
    .await?;
    let answers = h2c_batch(
        mesh.client_addr(),
        &gets("/lb/rr", LB_REQUESTS),
        LB_CONCURRENCY,
    )
    .await?;
    let t = Tally::of(&answers);
    let each = LB_REQUESTS / LB_PODS;
    Ok(Finding {
        text: format!(
            "DestinationRule ROUND_ROBIN, EDS of {LB_PODS} pods (own IP, HBONE sink, echo each), {LB_REQUESTS} h2c requests: {} ({})",
            per_pod(pods, |p| t.from(p.name())),
            statuses(&t)
        ),
        held: t.by_status.get(&200) == Some(&LB_REQUESTS)
            && t.by_server.len() == LB_PODS
            && pods.all().iter().all(|p| t.from(p.name()) == each),
        wanted: format!("{each} answers from each pod, all 200"),
    })
}

/// DestinationRule `outlierDetection: {consecutive5xxErrors: 3, ...}` with round robin: the pod
/// that answers 503 is ejected at its third (istiod's default route retries no 503, so the
/// client sees each) and gets nothing while ejected.
async fn lb_outlier(
    mesh: &WaypointMesh,
    fixture: &Fixture,
    pods: &ServicePods,
) -> Result<Finding, ScenarioError> {
    pods.clear_faults();
    // istiod's default route (it retries no 503: each failure reaches the detector and the client).
    scenarios::push(
        mesh,
        ResourceKind::Listener,
        &fixture.main_internal(),
        "the fixture's main_internal",
    )
    .await?;
    scenarios::push(
        mesh,
        ResourceKind::Cluster,
        &dr_cluster(fixture, LoadBalancer::RoundRobin, Some(&LB_OUTLIER)),
        "the service cluster with ROUND_ROBIN and outlier detection",
    )
    .await?;
    let bad = pods.pod("httpbin-0")?;
    bad.fault.fail_with(http::StatusCode::SERVICE_UNAVAILABLE);
    let threshold = LB_OUTLIER.consecutive_5xx as usize;
    // One at a time: the rotation reaches the failing pod exactly `threshold` times.
    let failing = h2c_batch(
        mesh.client_addr(),
        &gets("/lb/outlier", LB_PODS * threshold),
        1,
    )
    .await?;
    let failures = failing
        .iter()
        .filter(|a| {
            a.status == http::StatusCode::SERVICE_UNAVAILABLE
                && a.header(SERVER_HEADER) == Some(bad.name())
        })
        .count();
    let flags = mesh
        .wait_for(
            "the failing pod's ejection in /clusters",
            OBSERVE,
            || async {
                let hosts = scenarios::cluster_hosts(mesh)
                    .await
                    .map_err(|e| e.to_string())?;
                match hosts.get(&bad.host_address()) {
                    Some(f) if f.contains("/failed_outlier_check") => Ok(f.clone()),
                    other => Err(format!("health flags {other:?}")),
                }
            },
        )
        .await
        .unwrap_or_else(|e| e.to_string());
    let active = counter(
        mesh,
        &format!("{VIP_STATS}.outlier_detection.ejections_active"),
    )
    .await?;
    let answered = bad.answered();
    let after = Tally::of(
        &h2c_batch(
            mesh.client_addr(),
            &gets("/lb/ejected", EJECTED_REQUESTS),
            1,
        )
        .await?,
    );
    bad.fault.clear();
    let reached = bad.answered() - answered;
    Ok(Finding {
        text: format!(
            "DestinationRule outlierDetection consecutive5xxErrors {threshold}, round robin: {} answering 503 ejected after {failures} x 503 (/clusters health_flags {flags}, ejections_active {active}); next {EJECTED_REQUESTS} requests {}, {reached} to the ejected pod",
            bad.name(),
            statuses(&after)
        ),
        held: failures == threshold
            && flags.contains("/failed_outlier_check")
            && active == 1
            && after.by_status.get(&200) == Some(&EJECTED_REQUESTS)
            && reached == 0,
        wanted: format!(
            "ejected at the {threshold}rd 503, listed /failed_outlier_check, then no request reaches it"
        ),
    })
}

/// VirtualService `retries: {attempts: 2, retryOn: 5xx}` (istiod keeps the previous-hosts
/// predicate), one pod answering 503: every answer is a 200 from another pod, each attempt at
/// the failing pod retried once.
async fn lb_previous_hosts(
    mesh: &WaypointMesh,
    fixture: &Fixture,
    pods: &ServicePods,
) -> Result<Finding, ScenarioError> {
    pods.clear_faults();
    // Without outlier detection, so the failing pod stays in the rotation.
    scenarios::push(
        mesh,
        ResourceKind::Cluster,
        &dr_cluster(fixture, LoadBalancer::RoundRobin, None),
        "the service cluster with ROUND_ROBIN",
    )
    .await?;
    let bad = pods.pod("httpbin-0")?;
    scenarios::push(
        mesh,
        ResourceKind::Listener,
        &lb_listener(
            fixture,
            Some(retries_policy("5xx", RETRY_HOSTS_ATTEMPTS)),
            None,
        )?,
        "main_internal with VirtualService retries on 5xx (previous hosts)",
    )
    .await?;
    bad.fault.fail_with(http::StatusCode::SERVICE_UNAVAILABLE);
    let retry_stat = format!("{VIP_STATS}.upstream_rq_retry");
    let retries_before = counter(mesh, &retry_stat).await?;
    let bad_before = bad.answered();
    let answers = h2c_batch(
        mesh.client_addr(),
        &gets("/lb/retry", RETRY_HOSTS_REQUESTS),
        LB_CONCURRENCY,
    )
    .await;
    bad.fault.clear();
    let t = Tally::of(&answers?);
    let hits = bad.answered() - bad_before;
    let retried = counter(mesh, &retry_stat)
        .await?
        .saturating_sub(retries_before);
    scenarios::push(
        mesh,
        ResourceKind::Listener,
        &fixture.main_internal(),
        "the fixture's main_internal",
    )
    .await?;
    Ok(Finding {
        text: format!(
            "VirtualService retries {{attempts: {RETRY_HOSTS_ATTEMPTS}, retryOn: 5xx}} (retry_host_predicate previous_hosts), {} answering 503: {} of {RETRY_HOSTS_REQUESTS} ({}); {hits} attempts hit {}, each retried on another pod (upstream_rq_retry +{retried})",
            bad.name(),
            statuses(&t),
            per_pod(pods, |p| t.from(p.name())),
            bad.name()
        ),
        held: t.by_status.get(&200) == Some(&RETRY_HOSTS_REQUESTS)
            && t.from(bad.name()) == 0
            && hits > 0
            && retried == hits as u64,
        wanted: "every answer a 200 from another pod, one retry per attempt at the failing pod"
            .to_owned(),
    })
}

/// The value of a generated `Set-Cookie` (`<name>="<16 hex>"; Max-Age=<ttl>; Path=/; HttpOnly`,
/// Envoy's shape), if it has that shape.
fn generated_cookie(set_cookie: &str) -> Option<String> {
    let rest = format!("\"; Max-Age={}; Path=/; HttpOnly", AFFINITY_TTL.as_secs());
    let value = set_cookie
        .strip_prefix(&format!("{AFFINITY_COOKIE}=\""))?
        .strip_suffix(&rest)?;
    (value.len() == 16 && value.bytes().all(|b| b.is_ascii_hexdigit())).then(|| value.to_owned())
}

/// DestinationRule `consistentHash: {httpCookie: {name, ttl: 1h, path: /}, ringHash:
/// {minimumRingSize: 1024}}` plus a VirtualService (so the route carries the hash policy): a
/// client without the cookie gets one made up (and lands where it hashes to), and every
/// follow-up carrying it, each on a new connection, lands on the same pod; cookie values the
/// clients chose stick too and spread over the pods.
async fn lb_cookie_affinity(
    mesh: &WaypointMesh,
    fixture: &Fixture,
    pods: &ServicePods,
) -> Result<Finding, ScenarioError> {
    pods.clear_faults();
    scenarios::push(
        mesh,
        ResourceKind::Cluster,
        &dr_cluster(
            fixture,
            LoadBalancer::RingHash {
                minimum_ring_size: 1024,
            },
            None,
        ),
        "the service cluster with RING_HASH",
    )
    .await?;
    scenarios::push(
        mesh,
        ResourceKind::Listener,
        &cookie_listener(fixture, AFFINITY_COOKIE, AFFINITY_TTL, "/")?,
        "main_internal with the VirtualService and the cookie hash policy",
    )
    .await?;
    let client = mesh.client_addr();
    let server = |a: &scenarios::Answer| a.header(SERVER_HEADER).unwrap_or("-").to_owned();
    let (mut issued, mut sticky, mut reissued) = (0usize, 0usize, 0usize);
    let mut values = std::collections::BTreeSet::new();
    let mut first_example = None;
    for c in 0..AFFINITY_CLIENTS {
        let first =
            scenarios::send(client, "GET", &format!("/affinity/{c}"), &[], Bytes::new()).await?;
        let set: Vec<&str> = first
            .headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let value = match set.as_slice() {
            [one] => generated_cookie(one),
            _ => None,
        };
        let Some(value) = value.filter(|_| first.status == http::StatusCode::OK) else {
            continue;
        };
        issued += 1;
        first_example.get_or_insert_with(|| set.join(""));
        values.insert(value.clone());
        let pod = server(&first);
        let cookie = format!("{AFFINITY_COOKIE}=\"{value}\"");
        for f in 0..AFFINITY_FOLLOW_UPS {
            let a = scenarios::send(
                client,
                "GET",
                &format!("/affinity/{c}/{f}"),
                &[("cookie", &cookie)],
                Bytes::new(),
            )
            .await?;
            if a.status == http::StatusCode::OK && server(&a) == pod {
                sticky += 1;
            }
            if a.headers.contains_key("set-cookie") {
                reissued += 1;
            }
        }
    }
    // Cookie values of the clients' own choosing: each sticks to one pod, and they spread.
    let mut chosen_on: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for i in 0..AFFINITY_CHOSEN {
        let cookie = format!("{AFFINITY_COOKIE}=mesh-session-{i}");
        for round in 0..2 {
            let a = scenarios::send(
                client,
                "GET",
                &format!("/affinity/chosen/{i}/{round}"),
                &[("cookie", &cookie)],
                Bytes::new(),
            )
            .await?;
            let pod = if a.status == http::StatusCode::OK {
                server(&a)
            } else {
                format!("status {}", a.status.as_u16())
            };
            chosen_on.entry(cookie.clone()).or_default().insert(pod);
        }
    }
    let chosen_sticky = chosen_on.values().filter(|s| s.len() == 1).count();
    let spread: std::collections::BTreeSet<&String> = chosen_on.values().flatten().collect();
    let follow_ups = AFFINITY_CLIENTS * AFFINITY_FOLLOW_UPS;
    Ok(Finding {
        text: format!(
            "DestinationRule consistentHash.httpCookie {{name: {AFFINITY_COOKIE}, ttl: {}s, path: /}} (RING_HASH) + VirtualService: {issued}/{AFFINITY_CLIENTS} first answers set a cookie (e.g. {}; {} distinct value(s): Envoy makes it from the downstream connection's addresses), {sticky}/{follow_ups} follow-ups with it on the client's pod, {reissued} set it again; {chosen_sticky}/{AFFINITY_CHOSEN} chosen cookies stick, over {} pods",
            AFFINITY_TTL.as_secs(),
            first_example.as_deref().unwrap_or("-"),
            values.len(),
            spread.len()
        ),
        held: issued == AFFINITY_CLIENTS
            && sticky == follow_ups
            && reissued == 0
            && chosen_sticky == AFFINITY_CHOSEN
            && spread.len() >= 2
            && spread.iter().all(|p| p.starts_with("httpbin-")),
        wanted: "a generated Set-Cookie on each first answer, every follow-up on its pod, chosen cookies sticky and spread"
            .to_owned(),
    })
}

// ---------------------------------------------------------------------------------------------
// Traffic
// ---------------------------------------------------------------------------------------------

/// One request: its status (or why there was none), latency to the whole answer, and whether
/// the echo's answer was the right one.
#[derive(Debug)]
struct Outcome {
    status: Result<u16, String>,
    latency: Duration,
    /// The protocol the echo saw (the last hop's), when it answered for the right path.
    echoed: Option<String>,
}

/// Counts, status codes and latencies of a batch.
#[derive(Debug)]
struct Summary {
    /// 200s with the echo's answer for the right path.
    ok: usize,
    /// `20x200` or `19x200 1xerror`.
    codes: String,
    p50: Duration,
    max: Duration,
    first_error: Option<String>,
    /// Protocols the echo saw, e.g. `HTTP/1.1`.
    upstream: String,
}

impl Summary {
    fn of(batch: &[Outcome]) -> Self {
        let mut codes: BTreeMap<String, usize> = BTreeMap::new();
        let mut first_error = None;
        for o in batch {
            let key = match &o.status {
                Ok(s) => s.to_string(),
                Err(e) => {
                    first_error.get_or_insert_with(|| e.clone());
                    "error".to_owned()
                }
            };
            *codes.entry(key).or_default() += 1;
        }
        let mut latencies: Vec<Duration> = batch.iter().map(|o| o.latency).collect();
        latencies.sort();
        let p50 = latencies
            .get(latencies.len().div_ceil(2).saturating_sub(1))
            .copied()
            .unwrap_or_default();
        Summary {
            ok: batch
                .iter()
                .filter(|o| matches!(o.status, Ok(200)) && o.echoed.is_some())
                .count(),
            upstream: {
                let mut seen: Vec<&str> =
                    batch.iter().filter_map(|o| o.echoed.as_deref()).collect();
                seen.sort_unstable();
                seen.dedup();
                if seen.is_empty() {
                    "-".to_owned()
                } else {
                    seen.join("+")
                }
            },
            codes: if codes.is_empty() {
                "-".to_owned()
            } else {
                codes
                    .iter()
                    .map(|(k, n)| format!("{n}x{k}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            },
            p50,
            max: latencies.last().copied().unwrap_or_default(),
            first_error,
        }
    }
}

/// Reads an answer: its status, and for a 200 the protocol the echo saw, checking that it is the
/// echo's report of `path`.
async fn echoed(
    resp: http::Response<hyper::body::Incoming>,
    path: &str,
) -> Result<(u16, Option<String>), String> {
    let status = resp.status().as_u16();
    let body = read_body(resp.into_body(), ECHO_BODY_LIMIT, REQUEST)
        .await
        .map_err(|e| e.to_string())?;
    if status != 200 {
        return Ok((status, None));
    }
    let seen = EchoSeen::parse(&body).map_err(|e| e.to_string())?;
    if seen.path != path || seen.server != waypoint_testbed::waypoint::ECHO_NAME {
        return Err(format!(
            "{} answered for {}, want the echo for {path}",
            seen.server, seen.path
        ));
    }
    Ok((status, Some(seen.protocol)))
}

/// An [`Outcome`] from what [`echoed`] returned.
fn outcome(result: Result<(u16, Option<String>), String>, t0: Instant) -> Outcome {
    let latency = t0.elapsed();
    match result {
        Ok((status, echoed)) => Outcome {
            status: Ok(status),
            latency,
            echoed,
        },
        Err(e) => Outcome {
            status: Err(e),
            latency,
            echoed: None,
        },
    }
}

/// `n` HTTP/1.1 GETs one after the other on keep-alive connections to `addr` (a forwarder: each
/// new connection is one HBONE tunnel).
async fn http1_requests(addr: SocketAddr, n: usize, chain: &str) -> Vec<Outcome> {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let path = format!("/get?chain={chain}&i={i}");
        let t0 = Instant::now();
        let exchange = async {
            let req = Request::get(format!("http://{addr}{path}"))
                .header("host", HOST)
                .body(Empty::new())
                .map_err(|e| e.to_string())?;
            let resp = client.request(req).await.map_err(|e| e.to_string())?;
            echoed(resp, &path).await
        };
        let result = tokio::time::timeout(REQUEST, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {REQUEST:?}")));
        out.push(outcome(result, t0));
    }
    out
}

/// `n` h2c (prior knowledge) GETs at once on one HTTP/2 connection to `addr`.
async fn h2c_requests(addr: SocketAddr, n: usize, chain: &str) -> Vec<Outcome> {
    if n == 0 {
        return Vec::new();
    }
    let handshake = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| format!("h2c handshake: {e}"))
    };
    let (send, conn) = match tokio::time::timeout(REQUEST, handshake).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return failed_batch(n, e),
        Err(_) => return failed_batch(n, format!("h2c handshake within {REQUEST:?}")),
    };
    let driver = tokio::spawn(conn);
    let requests = (0..n).map(|i| {
        let mut send = send.clone();
        async move {
            let path = format!("/h2c?chain={chain}&i={i}");
            let t0 = Instant::now();
            let exchange = async {
                send.ready().await.map_err(|e| e.to_string())?;
                let req = Request::get(format!("http://{HOST}{path}"))
                    .body(Empty::<Bytes>::new())
                    .map_err(|e| e.to_string())?;
                let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
                echoed(resp, &path).await
            };
            let result = tokio::time::timeout(REQUEST, exchange)
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {REQUEST:?}")));
            outcome(result, t0)
        }
    });
    let out = futures::future::join_all(requests).await;
    driver.abort();
    out
}

fn failed_batch(n: usize, why: String) -> Vec<Outcome> {
    (0..n)
        .map(|_| Outcome {
            status: Err(why.clone()),
            latency: Duration::ZERO,
            echoed: None,
        })
        .collect()
}

/// Upgrade, one text frame echoed, close 1000 echoed.
async fn websocket(addr: SocketAddr) -> Result<(), String> {
    let mut ws = WsClient::connect(addr, HOST, "/ws", REQUEST)
        .await
        .map_err(|e| e.to_string())?;
    let exchange = async {
        ws.send(ws_opcode::TEXT, b"hello waypoint").await?;
        let text = ws.recv().await?;
        ws.send(ws_opcode::CLOSE, &1000u16.to_be_bytes()).await?;
        let close = ws.recv().await?;
        Ok::<_, std::io::Error>((text, close))
    };
    let (text, close) = tokio::time::timeout(REQUEST, exchange)
        .await
        .map_err(|_| format!("no echo within {REQUEST:?}"))?
        .map_err(|e| e.to_string())?;
    if text != (ws_opcode::TEXT, b"hello waypoint".to_vec()) {
        return Err(format!("text frame came back as {text:?}"));
    }
    if close != (ws_opcode::CLOSE, 1000u16.to_be_bytes().to_vec()) {
        return Err(format!("close came back as {close:?}"));
    }
    Ok(())
}

/// The status of a GET with one [`OVERSIZED_HEADER`]-byte header.
async fn oversized_header(addr: SocketAddr) -> Result<u16, String> {
    let req = Request::get("/big-header")
        .header("host", HOST)
        .header("x-big", "a".repeat(OVERSIZED_HEADER))
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    http1_request(addr, req, REQUEST)
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

/// The waypoint's answer to a `CONNECT authority` from the sleep identity.
async fn connect_status(mesh: &WaypointMesh, authority: &str) -> Result<u16, String> {
    let tls = mesh.client_tls().map_err(|e| e.to_string())?;
    let pool = HbonePool::new(PoolSettings::default());
    let headers = HeaderMap::new();
    let connect = pool.connect(mesh.addrs.waypoint_hbone(), &tls, authority, &headers);
    match tokio::time::timeout(REQUEST, connect).await {
        Ok(Ok(stream)) => Ok(stream.status.as_u16()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {REQUEST:?}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Admin and metrics parsing
// ---------------------------------------------------------------------------------------------

/// `cluster.<name>.upstream_rq_total` of every cluster, by name.
async fn upstream_rq_totals(mesh: &WaypointMesh) -> BTreeMap<String, u64> {
    let body = match mesh.admin_get("/stats?filter=upstream_rq_total$").await {
        Ok((200, body)) => body,
        _ => return BTreeMap::new(),
    };
    parse_stats(&body)
        .into_iter()
        .filter_map(|(name, v)| {
            let cluster = name
                .strip_prefix("cluster.")?
                .strip_suffix(".upstream_rq_total")?;
            Some((cluster.to_owned(), v))
        })
        .collect()
}

/// `name: value` lines of Envoy's text `/stats` (histograms and non-numbers skipped).
fn parse_stats(body: &str) -> BTreeMap<String, u64> {
    body.lines()
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(": ")?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Metric families named `prefix*` in a Prometheus text exposition: its `# TYPE` lines, or the
/// distinct sample names when there are none.
fn prometheus_families(text: &str, prefix: &str) -> usize {
    let typed = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter(|l| l.starts_with(prefix))
        .count();
    if typed > 0 {
        return typed;
    }
    let mut names: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    names.sort_unstable();
    names.dedup();
    names.len()
}

/// One way a dynamic listener sends traffic to a cluster: a route of an HTTP connection
/// manager's inline route configuration, or a TCP proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RouteRow {
    listener: String,
    /// `route config "rc" vhost "vh" route "r"`, or `tcp_proxy`.
    via: String,
    cluster: String,
    /// The route's retry policy: `retry_on <conditions>, num_retries <n>`.
    retry: Option<String>,
}

/// Every route and TCP proxy of the filter chains of a `/config_dump`'s dynamic listeners.
fn route_table(dump: &Json) -> Vec<RouteRow> {
    let mut out = Vec::new();
    let listeners = dump["configs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["dynamic_listeners"].as_array())
        .flatten();
    for l in listeners {
        let listener = &l["active_state"]["listener"];
        let lname = listener["name"].as_str().unwrap_or("?");
        let filters = listener["filter_chains"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|chain| chain["filters"].as_array())
            .flatten();
        for filter in filters {
            let config = &filter["typed_config"];
            let rc = &config["route_config"];
            for vh in rc["virtual_hosts"].as_array().into_iter().flatten() {
                for r in vh["routes"].as_array().into_iter().flatten() {
                    let Some(cluster) = r["route"]["cluster"].as_str() else {
                        continue;
                    };
                    out.push(RouteRow {
                        listener: lname.to_owned(),
                        via: format!(
                            "route config {:?} vhost {:?} route {:?}",
                            rc["name"].as_str().unwrap_or(""),
                            vh["name"].as_str().unwrap_or(""),
                            r["name"].as_str().unwrap_or("")
                        ),
                        cluster: cluster.to_owned(),
                        retry: retry_summary(&r["route"]["retry_policy"]),
                    });
                }
            }
            if config["@type"]
                .as_str()
                .is_some_and(|t| t.ends_with(".TcpProxy"))
                && let Some(cluster) = config["cluster"].as_str()
            {
                out.push(RouteRow {
                    listener: lname.to_owned(),
                    via: "tcp_proxy".to_owned(),
                    cluster: cluster.to_owned(),
                    retry: None,
                });
            }
        }
    }
    out
}

/// `retry_on <conditions>, num_retries <n>` of a route's `retry_policy` (Envoy's default for
/// `num_retries` is 1).
fn retry_summary(policy: &Json) -> Option<String> {
    let retry_on = policy["retry_on"].as_str()?;
    let n = policy["num_retries"].as_u64().unwrap_or(1);
    Some(format!("retry_on {retry_on}, num_retries {n}"))
}

/// Each dynamic cluster's `alt_stat_name`, where it has one (Envoy names its stats by it).
fn alt_stat_names(dump: &Json) -> BTreeMap<String, String> {
    dump["configs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["dynamic_active_clusters"].as_array())
        .flatten()
        .filter_map(|c| {
            let c = &c["cluster"];
            let alt = c["alt_stat_name"].as_str().filter(|a| !a.is_empty())?;
            Some((c["name"].as_str()?.to_owned(), alt.to_owned()))
        })
        .collect()
}

/// Reads `default` and `ROOTCA` from the agent's SDS socket: the leaf, and whether the root is
/// istiod-lite's.
async fn read_sds(path: &Path, root_pem: &str) -> anyhow::Result<(pem::CertInfo, bool)> {
    let mut client = SecretDiscoveryServiceClient::new(uds::channel(path).await?);
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: "mesh-report".into(),
            ..Default::default()
        }),
        resource_names: vec!["default".into(), "ROOTCA".into()],
        type_url: SECRET_TYPE.into(),
        ..Default::default()
    })
    .await?;
    let mut stream = client
        .stream_secrets(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let resp = tokio::time::timeout(REQUEST, stream.message())
        .await
        .context("SDS timed out")??
        .context("SDS closed")?;
    let mut leaf = None;
    let mut root_ok = false;
    for any in resp.resources {
        let s: Secret = prost::Message::decode(any.value.as_slice())?;
        match s.r#type {
            Some(secret::Type::TlsCertificate(tls)) => {
                if let Some(Specifier::InlineBytes(b)) =
                    tls.certificate_chain.and_then(|d| d.specifier)
                {
                    let certs = pem::certs(&String::from_utf8_lossy(&b))?;
                    let first = certs.first().context("empty certificate chain")?;
                    leaf = Some(pem::cert_info(first)?);
                }
            }
            Some(secret::Type::ValidationContext(vc)) => {
                if let Some(Specifier::InlineBytes(b)) = vc.trusted_ca.and_then(|d| d.specifier) {
                    root_ok = String::from_utf8_lossy(&b).trim() == root_pem.trim();
                }
            }
            _ => {}
        }
    }
    Ok((leaf.context("no default secret")?, root_ok))
}

// ---------------------------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------------------------

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// A duration in seconds, to two places.
fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn status_text(r: &Result<u16, String>) -> String {
    match r {
        Ok(s) => s.to_string(),
        Err(e) => format!("error ({e})"),
    }
}

fn ok_or(r: &Result<(), String>) -> String {
    match r {
        Ok(()) => "ok".to_owned(),
        Err(e) => format!("FAILED ({e})"),
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// `type.googleapis.com/envoy.config.cluster.v3.Cluster` → `CDS`, etc.
fn short_type(type_url: &str) -> &str {
    match type_url {
        CLUSTER_TYPE => "CDS",
        ENDPOINT_TYPE => "EDS",
        LISTENER_TYPE => "LDS",
        WORKLOAD_TYPE => "WDS",
        other => other.rsplit('.').next().unwrap_or(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_codes_and_percentiles() {
        let o = |status: Result<u16, String>, ms: u64| Outcome {
            echoed: status.is_ok().then(|| "HTTP/1.1".to_owned()),
            status,
            latency: Duration::from_millis(ms),
        };
        let s = Summary::of(&[
            o(Ok(200), 3),
            o(Ok(200), 1),
            o(Ok(503), 2),
            o(Err("reset".into()), 9),
        ]);
        assert_eq!(s.ok, 2);
        assert_eq!(s.codes, "2x200 1x503 1xerror");
        assert_eq!(s.p50, Duration::from_millis(2));
        assert_eq!(s.max, Duration::from_millis(9));
        assert_eq!(s.first_error.as_deref(), Some("reset"));
        assert_eq!(s.upstream, "HTTP/1.1");
    }

    #[test]
    fn stats_and_families_parse() {
        let stats = parse_stats(
            "cluster.a|8000|b.upstream_rq_total: 7\ncluster.x.upstream_rq_time: P0(nan,1)\n",
        );
        assert_eq!(stats.get("cluster.a|8000|b.upstream_rq_total"), Some(&7));
        assert_eq!(stats.len(), 1);
        let prom = "# TYPE envoy_a counter\nenvoy_a 1\n# TYPE envoy_b gauge\nenvoy_b{x=\"1\"} 2\nistio_agent_c 3\nistio_agent_c{y=\"2\"} 4\n";
        assert_eq!(prometheus_families(prom, "envoy_"), 2);
        assert_eq!(prometheus_families(prom, "istio_agent_"), 1);
    }

    #[test]
    fn route_table_walks_listeners() {
        let dump = json!({"configs": [{"dynamic_listeners": [
            {"active_state": {"listener": {
                "name": "main_internal",
                "filter_chains": [{"name": "vip", "filters": [{"typed_config": {"route_config": {
                    "name": "rc", "virtual_hosts": [{"name": "vh", "routes": [
                                {"name": "default", "route": {"cluster": "c",
                            "retry_policy": {"retry_on": "connect-failure", "num_retries": 2}}},
                        {"name": "redirect", "redirect": {}}
                    ]}]}}}]}]}}},
            {"active_state": {"listener": {
                "name": "connect_originate",
                "filter_chains": [{"filters": [{"typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "cluster": "t"}}]}]}}}
        ]}, {"dynamic_active_clusters": [{"cluster": {"name": "c", "alt_stat_name": "c;"}}]}]});
        assert_eq!(
            route_table(&dump),
            vec![
                RouteRow {
                    listener: "main_internal".into(),
                    via: r#"route config "rc" vhost "vh" route "default""#.into(),
                    cluster: "c".into(),
                    retry: Some("retry_on connect-failure, num_retries 2".into()),
                },
                RouteRow {
                    listener: "connect_originate".into(),
                    via: "tcp_proxy".into(),
                    cluster: "t".into(),
                    retry: None,
                }
            ]
        );
        assert_eq!(
            alt_stat_names(&dump),
            BTreeMap::from([("c".to_owned(), "c;".to_owned())])
        );
    }
}
