//! `fake-proxy`: a stand-in for the proxy that the agent supervises in process-level tests, until the
//! real proxy serves the same admin API. Started the way pilot-agent starts Envoy (`-c
//! <bootstrap> ...`, other flags accepted and ignored), it:
//!
//! - reads the bootstrap: admin address (`admin.address.socket_address`), the SDS/XDS Unix sockets
//!   (static clusters `sds-grpc`/`xds-grpc`), the agent's status port (cluster `agent`) and
//!   `ENVOY_STATUS_PORT`/`ENVOY_PROMETHEUS_PORT` from the node metadata;
//! - fetches `default`/`ROOTCA` over SDS and CDS/LDS over ADS (SotW) through the agent's sockets, and
//!   counts each applied response in `cluster_manager.cds.update_success` /
//!   `listener_manager.lds.update_success`; `server.state` is 0 (LIVE) and
//!   `listener_manager.workers_started` 1 once the certificate, CDS and LDS arrived;
//! - serves on the admin address `/stats` (the filters the agent uses), `POST /drain_listeners`,
//!   `/stats/prometheus`, `/ready`; `/stats/prometheus` on `0.0.0.0:ENVOY_PROMETHEUS_PORT`;
//!   `/healthz/ready` on `0.0.0.0:ENVOY_STATUS_PORT`, forwarded to the agent as Envoy's bootstrap does;
//! - with `FAKE_PROXY_SLOW_ADDR=ip:port`, an HTTP/1.1 listener answering every request after
//!   `FAKE_PROXY_SLOW_MS` (default 2000) ms; its open connections are its
//!   `listener.0.0.0.0_<port>.downstream_cx_active`, and after `drain_listeners` its connections close
//!   once their response is sent (`Connection: close`), like Envoy's drain;
//! - with `FAKE_PROXY_ORPHAN_MS=n`, leaves behind a child that outlives it by up to n ms (to test that
//!   the agent as PID 1 reaps orphans); with `FAKE_PROXY_EXIT_AFTER_MS=n`, exits with code 1 after n ms
//!   (a crash loop);
//! - writes its pid to `./fake-proxy.pid` (the agent's working directory, the pod root) once serving;
//! - exits 0 on SIGTERM/SIGINT, and when its parent (the agent) goes away.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value as Json;
use tokio::{net::TcpListener, sync::watch};
use waypoint_proto::{
    envoy::{
        config::core::v3::Node,
        service::{
            discovery::v3::{
                DiscoveryRequest, DiscoveryResponse,
                aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
            },
            secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient,
        },
    },
    resource::{CLUSTER_TYPE, LISTENER_TYPE, SECRET_TYPE},
};

/// What the bootstrap tells us.
#[derive(Debug, Clone)]
struct Bootstrap {
    node: Node,
    admin: SocketAddr,
    sds: PathBuf,
    xds: PathBuf,
    agent_status_port: Option<u16>,
    envoy_status_port: Option<u16>,
    prometheus_port: Option<u16>,
}

fn port_of(v: &Json) -> Option<u16> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .and_then(|p| u16::try_from(p).ok())
}

fn cluster_address<'a>(root: &'a Json, name: &str) -> Option<&'a Json> {
    root.pointer("/static_resources/clusters")?
        .as_array()?
        .iter()
        .find(|c| c.get("name").and_then(Json::as_str) == Some(name))?
        .pointer("/load_assignment/endpoints/0/lb_endpoints/0/endpoint/address")
}

impl Bootstrap {
    fn read(path: &Path) -> anyhow::Result<Bootstrap> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let root: Json = serde_json::from_str(&text).context("bootstrap JSON")?;
        let sock = root
            .pointer("/admin/address/socket_address")
            .ok_or_else(|| anyhow!("no admin.address.socket_address"))?;
        let host = sock
            .get("address")
            .and_then(Json::as_str)
            .unwrap_or("127.0.0.1");
        let port = sock
            .get("port_value")
            .and_then(port_of)
            .ok_or_else(|| anyhow!("no admin port"))?;
        let admin: SocketAddr = format!("{host}:{port}").parse().context("admin address")?;
        let pipe = |name: &str| -> anyhow::Result<PathBuf> {
            cluster_address(&root, name)
                .and_then(|a| a.pointer("/pipe/path"))
                .and_then(Json::as_str)
                .map(PathBuf::from)
                .ok_or_else(|| anyhow!("no pipe address for cluster {name}"))
        };
        let meta = root.pointer("/node/metadata");
        let meta_port = |k: &str| meta.and_then(|m| m.get(k)).and_then(port_of);
        let node = Node {
            id: root
                .pointer("/node/id")
                .and_then(Json::as_str)
                .unwrap_or("fake")
                .to_owned(),
            cluster: root
                .pointer("/node/cluster")
                .and_then(Json::as_str)
                .unwrap_or("")
                .to_owned(),
            ..Default::default()
        };
        Ok(Bootstrap {
            node,
            admin,
            sds: pipe("sds-grpc")?,
            xds: pipe("xds-grpc")?,
            agent_status_port: cluster_address(&root, "agent")
                .and_then(|a| a.pointer("/socket_address/port_value"))
                .and_then(port_of),
            envoy_status_port: meta_port("ENVOY_STATUS_PORT"),
            prometheus_port: meta_port("ENVOY_PROMETHEUS_PORT"),
        })
    }
}

/// The stats the fake reports.
#[derive(Debug, Default)]
struct Stats {
    cds_success: AtomicU64,
    lds_success: AtomicU64,
    cert_loaded: AtomicBool,
    slow_active: AtomicU64,
    slow_requests: AtomicU64,
    admin_active: AtomicU64,
    status_active: AtomicU64,
}

impl Stats {
    fn initialized(&self) -> bool {
        self.cert_loaded.load(Ordering::SeqCst)
            && self.cds_success.load(Ordering::SeqCst) > 0
            && self.lds_success.load(Ordering::SeqCst) > 0
    }
}

struct Fake {
    boot: Bootstrap,
    stats: Stats,
    slow_port: Option<u16>,
    slow_delay: Duration,
    drain: watch::Sender<bool>,
}

impl Fake {
    /// Every stat, in Envoy's `/stats` text layout.
    fn all_stats(&self) -> Vec<(String, u64)> {
        let s = &self.stats;
        let live = self.initialized();
        let mut out = vec![
            (
                "cluster_manager.cds.update_success".to_owned(),
                s.cds_success.load(Ordering::SeqCst),
            ),
            ("cluster_manager.cds.update_rejected".to_owned(), 0),
            (
                "listener_manager.lds.update_success".to_owned(),
                s.lds_success.load(Ordering::SeqCst),
            ),
            ("listener_manager.lds.update_rejected".to_owned(), 0),
            (
                "listener_manager.workers_started".to_owned(),
                u64::from(live),
            ),
            ("server.state".to_owned(), if live { 0 } else { 3 }),
            (
                "listener.admin.downstream_cx_active".to_owned(),
                s.admin_active.load(Ordering::SeqCst),
            ),
            (
                "listener.admin.main_thread.downstream_cx_active".to_owned(),
                s.admin_active.load(Ordering::SeqCst),
            ),
            // Internal listeners and http.* stats never count as active connections.
            (
                "listener.envoy_internal_main_internal.downstream_cx_active".to_owned(),
                2,
            ),
            ("http.admin.downstream_cx_active".to_owned(), 1),
        ];
        if let Some(port) = self.boot.envoy_status_port {
            out.push((
                format!("listener.0.0.0.0_{port}.downstream_cx_active"),
                s.status_active.load(Ordering::SeqCst),
            ));
        }
        if let Some(port) = self.slow_port {
            let active = s.slow_active.load(Ordering::SeqCst);
            out.push((
                format!("listener.0.0.0.0_{port}.downstream_cx_active"),
                active,
            ));
            out.push((
                format!("listener.0.0.0.0_{port}.worker_0.downstream_cx_active"),
                active,
            ));
        }
        out
    }

    fn initialized(&self) -> bool {
        self.stats.initialized()
    }

    /// `/stats?filter=...` for the filters the agent sends (a full regex engine is not needed).
    fn stats_text(&self, filter: Option<&str>) -> String {
        let keep = |name: &str| match filter {
            None | Some("") => true,
            Some(f) if f.contains("update_success") => {
                (name.starts_with("cluster_manager.cds.")
                    || name.starts_with("listener_manager.lds."))
                    && (name.ends_with(".update_success") || name.ends_with(".update_rejected"))
            }
            Some(f) if f.contains("server\\.state") => {
                name.starts_with("server.state")
                    || name.starts_with("listener_manager.workers_started")
            }
            Some(f) if f.ends_with('$') => name.ends_with(&f[..f.len() - 1]),
            Some(f) => name.contains(f),
        };
        let mut text = String::new();
        for (name, value) in self.all_stats() {
            if keep(&name) {
                text.push_str(&format!("{name}: {value}\n"));
            }
        }
        text
    }

    fn prometheus_text(&self) -> String {
        let s = &self.stats;
        format!(
            "# HELP envoy_cluster_manager_cds_update_success_total CDS updates applied.\n\
             # TYPE envoy_cluster_manager_cds_update_success_total counter\n\
             envoy_cluster_manager_cds_update_success_total {}\n\
             # HELP envoy_listener_manager_lds_update_success_total LDS updates applied.\n\
             # TYPE envoy_listener_manager_lds_update_success_total counter\n\
             envoy_listener_manager_lds_update_success_total {}\n\
             # HELP envoy_server_live Whether the server is live.\n\
             # TYPE envoy_server_live gauge\n\
             envoy_server_live {}\n\
             # HELP envoy_http_downstream_rq_total Requests served by the slow listener.\n\
             # TYPE envoy_http_downstream_rq_total counter\n\
             envoy_http_downstream_rq_total{{envoy_http_conn_manager_prefix=\"slow\"}} {}\n\
             # HELP envoy_http_downstream_rq_time Request time.\n\
             # TYPE envoy_http_downstream_rq_time histogram\n\
             envoy_http_downstream_rq_time_bucket{{le=\"0.5\"}} 0\n\
             envoy_http_downstream_rq_time_bucket{{le=\"+Inf\"}} 0\n\
             envoy_http_downstream_rq_time_sum 0\n\
             envoy_http_downstream_rq_time_count 0\n",
            s.cds_success.load(Ordering::SeqCst),
            s.lds_success.load(Ordering::SeqCst),
            u8::from(self.initialized()),
            s.slow_requests.load(Ordering::SeqCst),
        )
    }
}

fn log(msg: impl std::fmt::Display) {
    eprintln!("fake-proxy[{}]: {msg}", std::process::id());
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp
}

/// Percent-decodes a query value.
fn decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 3 <= bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then(|| decode(v))
    })
}

async fn admin(fake: Arc<Fake>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let query = req.uri().query().map(str::to_owned);
    match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/stats") => text(
            StatusCode::OK,
            fake.stats_text(query_param(query.as_deref(), "filter").as_deref()),
        ),
        (Method::GET, "/stats/prometheus") => text(StatusCode::OK, fake.prometheus_text()),
        (Method::GET, "/ready") => {
            if fake.initialized() {
                text(StatusCode::OK, "LIVE\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "INITIALIZING\n")
            }
        }
        (Method::POST, "/drain_listeners") => {
            log(format!(
                "POST /drain_listeners?{}: draining",
                query.unwrap_or_default()
            ));
            fake.drain.send_replace(true);
            text(StatusCode::OK, "OK\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

async fn forward_ready(fake: Arc<Fake>) -> Response<Full<Bytes>> {
    let Some(port) = fake.boot.agent_status_port else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "no agent cluster\n");
    };
    let call = async {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .uri("/healthz/ready")
            .header("host", format!("127.0.0.1:{port}"))
            .body(Full::new(Bytes::new()))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok(text(status, body))
    };
    match tokio::time::timeout(Duration::from_secs(3), call).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(err)) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("upstream: {err}\n"),
        ),
        Err(_) => text(StatusCode::GATEWAY_TIMEOUT, "upstream timeout\n"),
    }
}

#[derive(Clone, Copy)]
enum Listener {
    Admin,
    Prometheus,
    Status,
    Slow,
}

/// Serves `listener` with HTTP/1.1 until the process ends.
async fn serve(fake: Arc<Fake>, listener: TcpListener, kind: Listener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let fake = fake.clone();
        tokio::spawn(async move {
            let counter = match kind {
                Listener::Admin => Some(&fake.stats.admin_active),
                Listener::Status => Some(&fake.stats.status_active),
                Listener::Slow => Some(&fake.stats.slow_active),
                Listener::Prometheus => None,
            };
            if let Some(c) = counter {
                c.fetch_add(1, Ordering::SeqCst);
            }
            let svc_fake = fake.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let fake = svc_fake.clone();
                async move {
                    let resp = match kind {
                        Listener::Admin => admin(fake, req).await,
                        Listener::Prometheus => match req.uri().path() {
                            "/stats/prometheus" => text(StatusCode::OK, fake.prometheus_text()),
                            _ => text(StatusCode::NOT_FOUND, "not found\n"),
                        },
                        Listener::Status => match req.uri().path() {
                            "/healthz/ready" => forward_ready(fake).await,
                            _ => text(StatusCode::NOT_FOUND, "not found\n"),
                        },
                        Listener::Slow => {
                            // The point of this listener: a long request in flight.
                            tokio::time::sleep(fake.slow_delay).await;
                            fake.stats.slow_requests.fetch_add(1, Ordering::SeqCst);
                            text(StatusCode::OK, "slow ok\n")
                        }
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let mut drain = fake.drain.subscribe();
            let draining = matches!(kind, Listener::Slow);
            let mut shutting_down = false;
            loop {
                tokio::select! {
                    _ = conn.as_mut() => break,
                    changed = drain.wait_for(|d| *d), if draining && !shutting_down => {
                        shutting_down = true;
                        if changed.is_ok() {
                            // Envoy's drain: finish the request in flight, then close.
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
            if let Some(c) = counter {
                c.fetch_sub(1, Ordering::SeqCst);
            }
        });
    }
}

/// Follows the SDS stream: the certificate is loaded once `default` arrives.
async fn sds_client(fake: Arc<Fake>) {
    loop {
        let result: anyhow::Result<()> = async {
            let channel = waypoint_testbed::uds::channel(&fake.boot.sds).await?;
            let mut client = SecretDiscoveryServiceClient::new(channel);
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            tx.send(DiscoveryRequest {
                node: Some(fake.boot.node.clone()),
                resource_names: vec!["default".to_owned(), "ROOTCA".to_owned()],
                type_url: SECRET_TYPE.to_owned(),
                ..Default::default()
            })
            .await?;
            let mut stream = client
                .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            while let Some(resp) = stream.message().await? {
                if resp.resources.iter().any(|r| !r.value.is_empty()) {
                    fake.stats.cert_loaded.store(true, Ordering::SeqCst);
                    log(format!("SDS: {} secrets received", resp.resources.len()));
                }
                tx.send(ack(&fake, &resp, vec!["default".into(), "ROOTCA".into()]))
                    .await?;
            }
            Ok(())
        }
        .await;
        if let Err(err) = result {
            log(format!("SDS stream: {err}; reconnecting"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ack(fake: &Fake, resp: &DiscoveryResponse, names: Vec<String>) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(fake.boot.node.clone()),
        version_info: resp.version_info.clone(),
        response_nonce: resp.nonce.clone(),
        resource_names: names,
        type_url: resp.type_url.clone(),
        ..Default::default()
    }
}

/// Follows ADS (SotW, wildcard CDS and LDS) through the agent's XDS socket.
async fn ads_client(fake: Arc<Fake>) {
    loop {
        let result: anyhow::Result<()> = async {
            let channel = waypoint_testbed::uds::channel(&fake.boot.xds).await?;
            let mut client = AggregatedDiscoveryServiceClient::new(channel);
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            for type_url in [CLUSTER_TYPE, LISTENER_TYPE] {
                tx.send(DiscoveryRequest {
                    node: Some(fake.boot.node.clone()),
                    type_url: type_url.to_owned(),
                    ..Default::default()
                })
                .await?;
            }
            let mut stream = client
                .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            while let Some(resp) = stream.message().await? {
                match resp.type_url.as_str() {
                    CLUSTER_TYPE => fake.stats.cds_success.fetch_add(1, Ordering::SeqCst),
                    LISTENER_TYPE => fake.stats.lds_success.fetch_add(1, Ordering::SeqCst),
                    _ => 0,
                };
                log(format!(
                    "ADS: {} {} resources (version {:?})",
                    resp.resources.len(),
                    resp.type_url,
                    resp.version_info
                ));
                tx.send(ack(&fake, &resp, Vec::new())).await?;
            }
            Ok(())
        }
        .await;
        if let Err(err) = result {
            log(format!("ADS stream: {err}; reconnecting"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))
}

async fn run(bootstrap_path: PathBuf) -> anyhow::Result<()> {
    let boot = Bootstrap::read(&bootstrap_path)?;
    let slow_addr: Option<SocketAddr> = std::env::var("FAKE_PROXY_SLOW_ADDR")
        .ok()
        .map(|v| v.parse())
        .transpose()
        .context("FAKE_PROXY_SLOW_ADDR")?;
    let (drain, _) = watch::channel(false);
    let fake = Arc::new(Fake {
        slow_port: slow_addr.map(|a| a.port()),
        slow_delay: Duration::from_millis(env_u64("FAKE_PROXY_SLOW_MS").unwrap_or(2000)),
        stats: Stats::default(),
        drain,
        boot,
    });

    tokio::spawn(serve(
        fake.clone(),
        bind(fake.boot.admin).await?,
        Listener::Admin,
    ));
    if let Some(port) = fake.boot.prometheus_port {
        let l = bind(SocketAddr::from(([0, 0, 0, 0], port))).await?;
        tokio::spawn(serve(fake.clone(), l, Listener::Prometheus));
    }
    if let Some(port) = fake.boot.envoy_status_port {
        let l = bind(SocketAddr::from(([0, 0, 0, 0], port))).await?;
        tokio::spawn(serve(fake.clone(), l, Listener::Status));
    }
    if let Some(addr) = slow_addr {
        tokio::spawn(serve(fake.clone(), bind(addr).await?, Listener::Slow));
    }
    tokio::spawn(sds_client(fake.clone()));
    tokio::spawn(ads_client(fake.clone()));

    if let Some(ms) = env_u64("FAKE_PROXY_ORPHAN_MS") {
        let exe = std::env::current_exe().context("current exe")?;
        match std::process::Command::new(exe)
            .args(["--orphan-sleep-ms", &ms.to_string()])
            .spawn()
        {
            // Reaped by a thread if we outlive it; by the agent (PID 1) if we are killed first.
            Ok(mut child) => {
                std::thread::spawn(move || {
                    let _ = child.wait();
                });
            }
            Err(err) => log(format!("spawning the orphan: {err}")),
        }
    }

    // Written last, so a test that reads it finds every listener bound.
    let tmp = PathBuf::from("fake-proxy.pid.tmp");
    std::fs::write(&tmp, std::process::id().to_string()).context("pid file")?;
    std::fs::rename(&tmp, "fake-proxy.pid").context("pid file")?;
    log(format!("serving; admin on {}", fake.boot.admin));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let exit_after = async {
        match env_u64("FAKE_PROXY_EXIT_AFTER_MS") {
            Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            None => std::future::pending().await,
        }
    };
    let parent = std::os::unix::process::parent_id();
    let orphaned = async {
        // Cleanup if the agent dies without stopping us (e.g. a test killed it): poll the parent.
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            if std::os::unix::process::parent_id() != parent {
                return;
            }
        }
    };
    tokio::select! {
        _ = term.recv() => log("SIGTERM: exiting"),
        _ = int.recv() => log("SIGINT: exiting"),
        _ = orphaned => log("the agent is gone: exiting"),
        _ = exit_after => {
            log("FAKE_PROXY_EXIT_AFTER_MS reached: crashing with exit code 1");
            std::process::exit(1);
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, ms] = args.as_slice()
        && flag == "--orphan-sleep-ms"
    {
        std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(500)));
        return std::process::ExitCode::SUCCESS;
    }
    let Some(config) = args
        .iter()
        .position(|a| a == "-c" || a == "--config-path")
        .and_then(|i| args.get(i + 1))
    else {
        log("usage: fake-proxy -c <bootstrap.json> [envoy flags]");
        return std::process::ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            log(format!("runtime: {err}"));
            return std::process::ExitCode::from(1);
        }
    };
    match runtime.block_on(run(PathBuf::from(config))) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            log(format!("failed: {err:#}"));
            std::process::ExitCode::from(1)
        }
    }
}
