//! `mesh`: the local mesh on loopback — istiod-lite, echo backends and `agent proxy waypoint` in a
//! pod-root folder — with real traffic, a short report, and then the URLs to poke at until Ctrl-C
//! (`--once` exits after the report).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use tokio::{io::AsyncBufReadExt as _, process::Command};
use tokio_stream::wrappers::ReceiverStream;
use waypoint_proto::{
    envoy::{
        config::core::v3::Node,
        extensions::transport_sockets::tls::v3::{Secret, secret},
        service::{
            discovery::v3::DiscoveryRequest,
            secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient,
        },
    },
    resource::{LISTENER_TYPE, SECRET_TYPE},
};
use waypoint_shared::pem;
use waypoint_testbed::{
    echo::{EchoConfig, EchoServer},
    istiod_lite::{Config, IstiodLite, TokenPolicy, mint_token},
    uds,
};

/// Run the local waypoint mesh on loopback.
#[derive(Parser, Debug)]
#[command(name = "mesh", version, about)]
struct Cli {
    /// Exit after the report instead of running until Ctrl-C.
    #[arg(long)]
    once: bool,
    /// Folder for the pod root, CA and resources (recreated).
    #[arg(long, default_value = "run/mesh")]
    workdir: PathBuf,
    /// Requests to send.
    #[arg(long, default_value_t = 20)]
    requests: usize,
    /// Certificate lifetime asked by the agent (short to show a rotation).
    #[arg(long, default_value = "24h")]
    secret_ttl: String,
    /// Proxy admin port (Istio: 15000).
    #[arg(long, default_value_t = 15000)]
    admin_port: u16,
    /// Agent status port (Istio: 15020).
    #[arg(long, default_value_t = 15020)]
    status_port: u16,
    /// Proxy readiness port (Istio: 15021).
    #[arg(long, default_value_t = 15021)]
    readiness_port: u16,
    /// Proxy Prometheus port (Istio: 15090).
    #[arg(long, default_value_t = 15090)]
    prometheus_port: u16,
}

const NODE_NAMESPACE: &str = "default";
const WAYPOINT_SA: &str = "waypoint";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    waypoint_shared::logging::init("warn", false);
    let started = Instant::now();
    let work = std::env::current_dir()?.join(&cli.workdir);
    let _ = std::fs::remove_dir_all(&work);
    let pod = work.join("pod");
    for dir in [
        "var/run/secrets/tokens",
        "var/run/secrets/istio",
        "etc/istio/proxy",
        "etc/istio/pod",
    ] {
        std::fs::create_dir_all(pod.join(dir))?;
    }

    // istiod-lite with the reference waypoint resources and a token file.
    let resources = work.join("resources");
    std::fs::create_dir_all(&resources)?;
    std::fs::write(
        resources.join("waypoint.yaml"),
        include_str!("../../fixtures/istio/waypoint_xds_reconstructed_example.yaml"),
    )?;
    std::fs::write(
        resources.join("workloads.yaml"),
        include_str!("../../fixtures/mesh/workloads.yaml"),
    )?;
    let token = mint_token(NODE_NAMESPACE, WAYPOINT_SA, Duration::from_secs(12 * 3600));
    std::fs::write(work.join("tokens"), format!("{token}\n"))?;
    std::fs::write(pod.join("var/run/secrets/tokens/istio-token"), &token)?;
    let mut config = Config::for_test(&work.join("ca"));
    config.resources = Some(resources.clone());
    config.tokens = TokenPolicy::File(work.join("tokens"));
    config.debug_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let istiod = IstiodLite::start(config).await.context("istiod-lite")?;
    std::fs::write(
        pod.join("var/run/secrets/istio/root-cert.pem"),
        istiod.root_cert_pem(),
    )?;
    std::fs::write(
        pod.join("etc/istio/pod/labels"),
        "app=\"waypoint\"\ngateway.networking.k8s.io/gateway-name=\"waypoint\"\n",
    )?;
    println!("istiod-lite   ready on {} (CA + ADS, TLS)", istiod.addr);

    // Echo backend (the "httpbin" pod).
    let echo = EchoServer::bind(&EchoConfig {
        name: "httpbin".into(),
        http: "127.0.0.1:0".parse()?,
        grpc: Some("127.0.0.1:0".parse()?),
    })
    .await
    .context("echo")?;
    let (echo_http, echo_grpc) = (echo.http_addr(), echo.grpc_addr());
    tokio::spawn(echo.run());
    println!(
        "echo-server   http={echo_http} grpc={}",
        echo_grpc.map(|a| a.to_string()).unwrap_or_default()
    );

    // The agent, as the container would run it (working directory = pod root).
    let agent_bin = sibling_binary("agent")?;
    let mut agent = Command::new(&agent_bin)
        .args([
            "proxy",
            "waypoint",
            "--domain",
            "default.svc.cluster.local",
            "--serviceCluster",
            "waypoint.default",
            "--log_output_level",
            "default:info",
        ])
        .current_dir(&pod)
        .env("POD_NAME", "waypoint-6d7f8-abcde")
        .env("POD_NAMESPACE", NODE_NAMESPACE)
        .env("SERVICE_ACCOUNT", WAYPOINT_SA)
        .env("INSTANCE_IP", "127.0.0.1")
        .env("ISTIO_META_CLUSTER_ID", "Kubernetes")
        .env("ISTIO_META_WORKLOAD_NAME", "waypoint")
        .env("TRUST_DOMAIN", "cluster.local")
        .env("CA_ADDR", istiod.addr.to_string())
        .env(
            "PROXY_CONFIG",
            format!(
                r#"{{"discoveryAddress":"{}","proxyAdminPort":{},"statusPort":{},"terminationDrainDuration":"1s"}}"#,
                istiod.addr, cli.admin_port, cli.status_port
            ),
        )
        .env("ENVOY_STATUS_PORT", cli.readiness_port.to_string())
        .env("ENVOY_PROMETHEUS_PORT", cli.prometheus_port.to_string())
        .env("SECRET_TTL", &cli.secret_ttl)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", agent_bin.display()))?;
    let agent_log = work.join("agent.log");
    forward_log(agent.stderr.take(), agent_log.clone());
    forward_log(agent.stdout.take(), work.join("agent.stdout.log"));
    println!(
        "agent         pid {} (pod root {}, log {})",
        agent.id().unwrap_or(0),
        pod.display(),
        agent_log.display()
    );

    // Identity: the agent's SDS socket, read with a real gRPC client.
    let sds_path = pod.join("var/run/secrets/workload-spiffe-uds/socket");
    wait_for_path(&sds_path, Duration::from_secs(15)).await?;
    let (leaf, root_ok) = read_sds(&sds_path, istiod.root_cert_pem()).await?;

    // Config: the proxy (spawned by the agent) pulls xDS through the agent's XDS proxy.
    let admin = format!("http://127.0.0.1:{}", cli.admin_port);
    let node_id = "waypoint~127.0.0.1~waypoint-6d7f8-abcde.default~default.svc.cluster.local";
    let live = wait_http_ok(&format!("{admin}/ready"), Duration::from_secs(20)).await;
    let acked = istiod
        .book
        .wait_until(Duration::from_secs(5), |c| {
            c.iter().any(|c| {
                c.connected
                    && c.node_id == node_id
                    && c.types.get(LISTENER_TYPE).is_some_and(|t| t.acks > 0)
            })
        })
        .await
        .is_ok();
    // Kubernetes' probe path: proxy :15021 → agent :15020/healthz/ready → proxy admin stats.
    let probe_ok = wait_http_ok(
        &format!("http://127.0.0.1:{}/healthz/ready", cli.readiness_port),
        Duration::from_secs(10),
    )
    .await;
    let merged = http_get(&format!(
        "http://127.0.0.1:{}/stats/prometheus",
        cli.status_port
    ))
    .await
    .unwrap_or_default();
    let agent_series = merged
        .lines()
        .filter(|l| l.starts_with("istio_agent_"))
        .count();
    let proxy_series = merged.lines().filter(|l| l.starts_with("envoy_")).count();
    let dump = http_get(&format!("{admin}/config_dump"))
        .await
        .unwrap_or_default();
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap_or_default();

    // Traffic: the waypoint data path is not implemented yet, so the requests go to the backend
    // directly; the report says so.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let mut ok = 0;
    for _ in 0..cli.requests {
        let uri: http::Uri = format!("http://{echo_http}/headers").parse()?;
        if let Ok(resp) = client.get(uri).await
            && resp.status().is_success()
        {
            ok += 1;
        }
    }

    let bootstrap = pod.join("etc/istio/proxy/envoy-rev.json");
    let issued = istiod.ca.issued().await;
    let conns = istiod.book.connections().await;
    println!(
        "\n===== local mesh report ({} ms) =====",
        started.elapsed().as_millis()
    );
    println!(
        "identity      {} (serial {}, valid until unix {}), chain verifies to istiod-lite root: {root_ok}",
        leaf.uri_sans.join(","),
        leaf.serial,
        leaf.not_after
    );
    println!(
        "CA            {} certificate(s) issued by istiod-lite: {}",
        issued.len(),
        issued
            .iter()
            .map(|c| c.identity.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "bootstrap     {} ({} bytes)",
        bootstrap.display(),
        std::fs::metadata(&bootstrap).map(|m| m.len()).unwrap_or(0)
    );
    println!(
        "proxy         {} (admin {admin}/ready)",
        if live { "LIVE" } else { "NOT READY" }
    );
    println!(
        "readiness     :{} /healthz/ready via proxy -> agent -> proxy admin: {}",
        cli.readiness_port,
        if probe_ok { "200" } else { "NOT READY" }
    );
    println!(
        "metrics       agent :{}/stats/prometheus merges {agent_series} istio_agent_* and {proxy_series} envoy_* series",
        cli.status_port
    );
    println!("xDS (delta: proxy -> agent XDS proxy -> istiod-lite)");
    for (kind, names) in dump_names(&dump) {
        println!("  {kind:<9} {}: {}", names.len(), names.join(", "));
    }
    if !acked {
        println!("  (istiod-lite has not recorded an LDS ACK from the waypoint)");
    }
    for c in conns.iter().filter(|c| c.connected && c.node_id == node_id) {
        for (t, s) in &c.types {
            let short = t.rsplit('.').next().unwrap_or(t);
            println!(
                "  istiod-lite: {short} {} ack(s), {} nack(s)",
                s.acks, s.nacks
            );
        }
    }
    println!(
        "traffic       {ok}/{} requests OK — sent DIRECTLY to the echo backend: the waypoint data path (HBONE in/out) is not built yet",
        cli.requests
    );
    println!(
        "routes/retries/metrics: not yet — they arrive with the proxy's data path (issues 6-8)"
    );
    println!("\nURLs:");
    println!(
        "  istiod-lite xDS status   http://{}/debug/xds",
        istiod.debug_addr.map(|a| a.to_string()).unwrap_or_default()
    );
    println!(
        "  istiod-lite issued certs http://{}/debug/certs",
        istiod.debug_addr.map(|a| a.to_string()).unwrap_or_default()
    );
    println!("  echo backend             http://{echo_http}/");
    println!(
        "  proxy admin              {admin}/ready {admin}/config_dump {admin}/stats {admin}/clusters"
    );
    println!(
        "  agent status             http://127.0.0.1:{0}/healthz/ready http://127.0.0.1:{0}/stats/prometheus",
        cli.status_port
    );

    if cli.once {
        stop_agent(&mut agent).await;
        istiod.shutdown().await;
        if ok != cli.requests || !root_ok || !live || !acked || !probe_ok {
            bail!(
                "the mesh did not work: {ok}/{} requests, root ok {root_ok}, proxy live {live}, LDS acked {acked}",
                cli.requests
            );
        }
        return Ok(());
    }
    println!("\nrunning; Ctrl-C to stop");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        status = agent.wait() => println!("agent exited: {status:?}"),
    }
    stop_agent(&mut agent).await;
    istiod.shutdown().await;
    Ok(())
}

/// SIGTERM to the agent (it drains and stops the proxy), SIGKILL if it is still there after 10 s.
async fn stop_agent(agent: &mut tokio::process::Child) {
    if let Some(pid) = agent.id() {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }
    if tokio::time::timeout(Duration::from_secs(10), agent.wait())
        .await
        .is_err()
    {
        let _ = agent.start_kill();
        let _ = agent.wait().await;
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
            "{} not found: build it with `cargo build --bins`",
            path.display()
        );
    }
    Ok(path)
}

fn forward_log(stream: Option<impl tokio::io::AsyncRead + Unpin + Send + 'static>, path: PathBuf) {
    let Some(stream) = stream else { return };
    tokio::spawn(async move {
        let Ok(mut file) = tokio::fs::File::create(&path).await else {
            return;
        };
        let mut lines = tokio::io::BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            use tokio::io::AsyncWriteExt as _;
            let _ = file.write_all(format!("{line}\n").as_bytes()).await;
        }
    });
}

async fn wait_for_path(path: &Path, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        if Instant::now() > deadline {
            bail!("{} did not appear within {limit:?}", path.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Reads `default` and `ROOTCA` from the agent's SDS socket.
async fn read_sds(path: &Path, root_pem: &str) -> anyhow::Result<(pem::CertInfo, bool)> {
    let mut client = SecretDiscoveryServiceClient::new(uds::channel(path).await?);
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: "mesh-probe".into(),
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
    let resp = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .context("SDS timed out")??
        .context("SDS closed")?;
    let mut leaf = None;
    let mut root_ok = false;
    for any in resp.resources {
        let s: Secret = prost::Message::decode(any.value.as_slice())?;
        match s.r#type {
            Some(secret::Type::TlsCertificate(tls)) => {
                if let Some(
                    waypoint_proto::envoy::config::core::v3::data_source::Specifier::InlineBytes(b),
                ) = tls.certificate_chain.and_then(|d| d.specifier)
                {
                    let certs = pem::certs(&String::from_utf8_lossy(&b))?;
                    leaf = Some(pem::cert_info(&certs[0])?);
                }
            }
            Some(secret::Type::ValidationContext(vc)) => {
                if let Some(
                    waypoint_proto::envoy::config::core::v3::data_source::Specifier::InlineBytes(b),
                ) = vc.trusted_ca.and_then(|d| d.specifier)
                {
                    root_ok = String::from_utf8_lossy(&b).trim() == root_pem.trim();
                }
            }
            _ => {}
        }
    }
    Ok((leaf.context("no default secret")?, root_ok))
}

/// Subscribes CDS, EDS (every EDS cluster) and LDS through the XDS proxy; returns names per type.
/// GET `url` (plain HTTP), body as text.
async fn http_get(url: &str) -> anyhow::Result<String> {
    use http_body_util::BodyExt as _;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let resp = client.get(url.parse()?).await?;
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Polls `url` until it answers 200 or `limit` passes.
async fn wait_http_ok(url: &str, limit: Duration) -> bool {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(uri) = url.parse::<http::Uri>()
            && let Ok(resp) = client.get(uri).await
            && resp.status().is_success()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Names of the dynamic clusters (with versions) and listeners in a `/config_dump`.
fn dump_names(dump: &serde_json::Value) -> Vec<(&'static str, Vec<String>)> {
    let mut out = Vec::new();
    for config in dump["configs"].as_array().into_iter().flatten() {
        if let Some(list) = config["dynamic_active_clusters"].as_array() {
            let names = list
                .iter()
                .filter_map(|c| c["cluster"]["name"].as_str().map(str::to_owned))
                .collect();
            out.push(("clusters", names));
        }
        if let Some(list) = config["dynamic_listeners"].as_array() {
            let names = list
                .iter()
                .filter_map(|l| l["name"].as_str().map(str::to_owned))
                .collect();
            out.push(("listeners", names));
        }
    }
    out
}
