//! What the proxy's process-level tests share: the `proxy` binary started from a bootstrap in a
//! temporary folder, admin/HTTP requests on loopback, bounded polling, a scripted SDS server on a
//! Unix socket (the agent's side), and istiod-lite's ADS service served in process over plaintext
//! gRPC (the proxy dials static clusters without TLS, as it dials the agent's socket).
//!
//! Each test binary uses part of it.
#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use prost::Message as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    sync::mpsc,
    task::JoinHandle,
};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use waypoint_proto::{
    envoy::{
        config::core::v3::{DataSource, data_source::Specifier},
        extensions::transport_sockets::tls::v3::{
            CertificateValidationContext, Secret, TlsCertificate, secret,
        },
        service::{
            discovery::v3::{
                DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
                aggregated_discovery_service_server::AggregatedDiscoveryServiceServer,
            },
            secret::v3::secret_discovery_service_server::{
                SecretDiscoveryService, SecretDiscoveryServiceServer,
            },
        },
    },
    google::protobuf::Any,
    resource::SECRET_TYPE,
};
use waypoint_testbed::istiod_lite::{StatusBook, Store, ads::AdsService};

/// A self-signed P-256 certificate (SAN `spiffe://cluster.local/ns/test/sa/unit`) and its key.
pub const CERT: &str = include_str!("../data/test-cert.pem");
/// See [`CERT`].
pub const KEY: &str = include_str!("../data/test-key.pem");
/// Upper bound of every wait.
pub const WAIT: Duration = Duration::from_secs(20);

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A fresh temporary folder for one test.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("proxy-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    dir
}

/// A running `proxy` process; killed when dropped.
pub struct Proxy {
    child: std::process::Child,
    log: PathBuf,
}

impl Proxy {
    /// Writes `bootstrap` to `dir/bootstrap.json` and starts the proxy in `dir` (relative pipe
    /// paths resolve there), logging to `dir/proxy.log`.
    pub fn start(dir: &Path, bootstrap: &serde_json::Value) -> Proxy {
        std::fs::write(dir.join("bootstrap.json"), bootstrap.to_string()).expect("write");
        let log = dir.join("proxy.log");
        let out = std::fs::File::create(&log).expect("log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_proxy"))
            .args(["-c", "bootstrap.json", "-l", "debug"])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("proxy starts");
        Proxy { child, log }
    }

    /// The last lines of the proxy's log (for failure messages).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request on loopback: (status, body); (0, "") when nothing answers in 5 s.
pub async fn http(port: u16, method: &str, path: &str) -> (u16, String) {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
    };
    match tokio::time::timeout(Duration::from_secs(5), fut).await {
        Ok(Ok(text)) => {
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            (status, body.to_owned())
        }
        _ => (0, String::new()),
    }
}

/// GET `path` on the admin port as JSON.
pub async fn get_json(port: u16, path: &str) -> serde_json::Value {
    let (status, body) = http(port, "GET", path).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
}

/// The config of `type_name` (`ListenersConfigDump` …) in a `/config_dump`.
pub fn config_of<'a>(dump: &'a serde_json::Value, type_name: &str) -> &'a serde_json::Value {
    let want = format!("type.googleapis.com/envoy.admin.v3.{type_name}");
    dump["configs"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["@type"] == want.as_str()))
        .unwrap_or_else(|| panic!("no {type_name} in the dump"))
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after [`WAIT`] naming `what` (and
/// `context()`, e.g. a log tail).
pub async fn eventually<T, F, Fut>(what: &str, context: impl Fn() -> String, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls GET `path` until it answers 200 and `pred(body)` holds; returns the body.
pub async fn wait_body(port: u16, path: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
    eventually(
        what,
        || format!("on {path}"),
        || async {
            let (status, body) = http(port, "GET", path).await;
            (status == 200 && pred(&body)).then_some(body)
        },
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// A scripted SDS server.

type Out = mpsc::Sender<Result<DiscoveryResponse, Status>>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// One SDS stream the proxy opened: its requests and a handle to answer.
pub struct Opened {
    /// What the proxy sends.
    pub requests: Streaming<DiscoveryRequest>,
    /// What we answer.
    pub responses: Out,
}

struct Scripted {
    opened: mpsc::UnboundedSender<Opened>,
}

#[tonic::async_trait]
impl SecretDiscoveryService for Scripted {
    type StreamSecretsStream = BoxStream<DiscoveryResponse>;
    type DeltaSecretsStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let _ = self.opened.send(Opened {
            requests: request.into_inner(),
            responses: tx,
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented("SotW only"))
    }

    async fn fetch_secrets(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented("SotW only"))
    }
}

/// A scripted SDS server on the Unix socket `path`: every stream the proxy opens is handed over.
pub fn sds_server(path: &Path) -> (JoinHandle<()>, mpsc::UnboundedReceiver<Opened>) {
    let listener = tokio::net::UnixListener::bind(path).expect("bind");
    let (opened_tx, opened_rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(SecretDiscoveryServiceServer::new(Scripted {
                opened: opened_tx,
            }))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await;
    });
    (task, opened_rx)
}

/// The next stream the proxy opens, with its first request.
pub async fn next_stream(rx: &mut mpsc::UnboundedReceiver<Opened>) -> (Opened, DiscoveryRequest) {
    let mut opened = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the proxy opens an SDS stream in time")
        .expect("server alive");
    let first = next_request(&mut opened).await;
    (opened, first)
}

/// The next request on a stream.
pub async fn next_request(opened: &mut Opened) -> DiscoveryRequest {
    tokio::time::timeout(WAIT, opened.requests.message())
        .await
        .expect("a request in time")
        .expect("stream ok")
        .expect("stream open")
}

fn inline(s: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(s.as_bytes().to_vec())),
        ..Default::default()
    })
}

/// A SotW SDS response carrying `secret`.
pub fn secret_response(version: &str, nonce: &str, secret: Secret) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: version.to_owned(),
        resources: vec![Any {
            type_url: SECRET_TYPE.to_owned(),
            value: secret.encode_to_vec(),
        }],
        type_url: SECRET_TYPE.to_owned(),
        nonce: nonce.to_owned(),
        ..Default::default()
    }
}

/// The `default` certificate secret with [`CERT`] and `key`.
pub fn tls_secret(key: &str) -> Secret {
    Secret {
        name: "default".into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(CERT),
            private_key: inline(key),
            ..Default::default()
        })),
    }
}

/// The `ROOTCA` validation secret trusting [`CERT`].
pub fn root_secret() -> Secret {
    Secret {
        name: "ROOTCA".into(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(CERT),
                ..Default::default()
            },
        )),
    }
}

/// The static cluster a bootstrap reaches the SDS server through (`./sds.sock` in the test dir).
pub fn sds_cluster() -> serde_json::Value {
    serde_json::json!({
        "name": "sds-grpc",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "sds-grpc", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"pipe": {"path": "./sds.sock"}}}}
        ]}]}
    })
}

// ---------------------------------------------------------------------------------------------
// istiod-lite's ADS, in process, plaintext.

/// istiod-lite's ADS service (SotW and delta) over a [`Store`], on a plaintext loopback port.
pub struct PlainAds {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The resources served.
    pub store: Arc<Store>,
    /// ACKs and NACKs per stream.
    pub book: Arc<StatusBook>,
    task: JoinHandle<()>,
}

impl PlainAds {
    /// Starts serving an empty store.
    pub async fn start() -> PlainAds {
        let store = Arc::new(Store::new());
        let book = Arc::new(StatusBook::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let service = AdsService::new(store.clone(), book.clone());
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        PlainAds {
            addr,
            store,
            book,
            task,
        }
    }

    /// A bootstrap's static `xds-grpc` cluster pointing here.
    pub fn cluster(&self) -> serde_json::Value {
        serde_json::json!({
            "name": "xds-grpc",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": self.addr.ip().to_string(), "port_value": self.addr.port()}}}}
            ]}]}
        })
    }
}

impl Drop for PlainAds {
    fn drop(&mut self) {
        self.task.abort();
    }
}
