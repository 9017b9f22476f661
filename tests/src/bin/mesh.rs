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
            discovery::v3::{
                DeltaDiscoveryRequest, DiscoveryRequest,
                aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
            },
            secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient,
        },
    },
    resource::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, SECRET_TYPE},
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
            format!(r#"{{"discoveryAddress":"{}"}}"#, istiod.addr),
        )
        .env("SECRET_TTL", &cli.secret_ttl)
        // The proxy's data path is not there yet: the agent runs alone (SDS + XDS proxy).
        .env("DISABLE_ENVOY", "true")
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

    // Config: a delta ADS stream through the agent's XDS proxy to istiod-lite.
    let xds_path = pod.join("etc/istio/proxy/XDS");
    wait_for_path(&xds_path, Duration::from_secs(5)).await?;
    let node_id = "waypoint~127.0.0.1~waypoint-6d7f8-abcde.default~default.svc.cluster.local";
    let (xds, _probe_tx, _probe_stream) = fetch_via_xds_proxy(&xds_path, node_id).await?;
    let acked = istiod
        .book
        .wait_until(Duration::from_secs(5), |c| {
            c.iter().any(|c| {
                c.node_id == node_id && c.types.get(LISTENER_TYPE).is_some_and(|t| t.acks > 0)
            })
        })
        .await
        .is_ok();

    // Traffic: the waypoint data path is not implemented yet, so the requests go to the backend
    // directly; the report says so.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let mut ok = 0;
    for _ in 0..cli.requests {
        let uri: http::Uri = format!("http://{echo_http}/headers").parse()?;
        if let Ok(resp) = client.get(uri).await {
            if resp.status().is_success() {
                ok += 1;
            }
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
        "xDS (delta, through the agent's XDS proxy; client = mesh probe until the proxy lands)"
    );
    for (kind, names) in &xds {
        println!(
            "  {kind:<4} {} resource(s): {}",
            names.len(),
            names.join(", ")
        );
    }
    if !acked {
        println!("  (istiod-lite has not recorded the LDS ACK yet)");
    }
    for c in conns.iter().filter(|c| c.node_id == node_id) {
        for (t, s) in &c.types {
            println!(
                "  istiod-lite saw {} for {}: {} ack(s), {} nack(s)",
                c.node_id,
                t.rsplit('.').next().unwrap_or(t),
                s.acks,
                s.nacks
            );
        }
    }
    println!(
        "traffic       {ok}/{} requests OK — sent DIRECTLY to the echo backend: the waypoint data path (HBONE in/out) is not built yet",
        cli.requests
    );
    println!("routes/retries/metrics: not yet — they arrive with the proxy (issues 5–8)");
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
    println!("  proxy admin / config_dump / stats: not yet (the proxy lands with issue 5)");

    if cli.once {
        let _ = agent.start_kill();
        let _ = agent.wait().await;
        istiod.shutdown().await;
        if ok != cli.requests || !root_ok {
            bail!(
                "the mesh did not work: {ok}/{} requests, root ok {root_ok}",
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
    let _ = agent.start_kill();
    istiod.shutdown().await;
    Ok(())
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
/// The stream stays open (returned) so the last ACK reaches istiod.
type XdsProbe = (
    Vec<(&'static str, Vec<String>)>,
    tokio::sync::mpsc::Sender<DeltaDiscoveryRequest>,
    tonic::Streaming<waypoint_proto::envoy::service::discovery::v3::DeltaDiscoveryResponse>,
);

async fn fetch_via_xds_proxy(path: &Path, node_id: &str) -> anyhow::Result<XdsProbe> {
    let mut client = AggregatedDiscoveryServiceClient::new(uds::channel(path).await?);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: node_id.into(),
            ..Default::default()
        }),
        type_url: CLUSTER_TYPE.into(),
        ..Default::default()
    })
    .await?;
    let mut stream = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut out = Vec::new();
    let mut next = async || -> anyhow::Result<_> {
        tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .context("xDS timed out")??
            .context("xDS closed")
    };
    let cds = next().await?;
    let cluster_names: Vec<String> = cds.resources.iter().map(|r| r.name.clone()).collect();
    let eds_names: Vec<String> = cluster_names
        .iter()
        .filter(|n| n.starts_with("inbound-vip"))
        .cloned()
        .collect();
    tx.send(DeltaDiscoveryRequest {
        type_url: CLUSTER_TYPE.into(),
        response_nonce: cds.nonce.clone(),
        ..Default::default()
    })
    .await?;
    out.push(("CDS", cluster_names));
    tx.send(DeltaDiscoveryRequest {
        type_url: ENDPOINT_TYPE.into(),
        resource_names_subscribe: eds_names,
        ..Default::default()
    })
    .await?;
    let eds = next().await?;
    tx.send(DeltaDiscoveryRequest {
        type_url: ENDPOINT_TYPE.into(),
        response_nonce: eds.nonce.clone(),
        ..Default::default()
    })
    .await?;
    out.push((
        "EDS",
        eds.resources.iter().map(|r| r.name.clone()).collect(),
    ));
    tx.send(DeltaDiscoveryRequest {
        type_url: LISTENER_TYPE.into(),
        ..Default::default()
    })
    .await?;
    let lds = next().await?;
    tx.send(DeltaDiscoveryRequest {
        type_url: LISTENER_TYPE.into(),
        response_nonce: lds.nonce.clone(),
        ..Default::default()
    })
    .await?;
    out.push((
        "LDS",
        lds.resources.iter().map(|r| r.name.clone()).collect(),
    ));
    drop(next);
    Ok((out, tx, stream))
}
