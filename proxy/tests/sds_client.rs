//! The proxy's SDS client against a scripted SDS server on a Unix socket (as the agent's): one
//! SotW stream per secret with the node on the first request, ACK with the accepted version, NACK
//! naming the bad field while the last good secret stays, reconnect after the server drops the
//! stream (declaring the version it holds), and what `/certs`, `/stats` and `/config_dump` show.

use std::{path::PathBuf, pin::Pin, process::Stdio, time::Duration};

use prost::Message as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    sync::mpsc,
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
            },
            secret::v3::secret_discovery_service_server::{
                SecretDiscoveryService, SecretDiscoveryServiceServer,
            },
        },
    },
    google::protobuf::Any,
    resource::SECRET_TYPE,
};

const CERT: &str = include_str!("data/test-cert.pem");
const KEY: &str = include_str!("data/test-key.pem");
const WAIT: Duration = Duration::from_secs(20);

type Out = mpsc::Sender<Result<DiscoveryResponse, Status>>;

/// One stream the proxy opened: its requests and a handle to answer.
struct Opened {
    requests: Streaming<DiscoveryRequest>,
    responses: Out,
}

struct Scripted {
    opened: mpsc::UnboundedSender<Opened>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

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

fn inline(s: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(s.as_bytes().to_vec())),
        ..Default::default()
    })
}

fn response(version: &str, nonce: &str, secret: Secret) -> DiscoveryResponse {
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

fn tls(key: &str) -> Secret {
    Secret {
        name: "default".into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(CERT),
            private_key: inline(key),
            ..Default::default()
        })),
    }
}

fn root() -> Secret {
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

async fn next_stream(rx: &mut mpsc::UnboundedReceiver<Opened>) -> (Opened, DiscoveryRequest) {
    let mut opened = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the proxy opens an SDS stream in time")
        .expect("server alive");
    let first = next_request(&mut opened).await;
    (opened, first)
}

async fn next_request(opened: &mut Opened) -> DiscoveryRequest {
    tokio::time::timeout(WAIT, opened.requests.message())
        .await
        .expect("a request in time")
        .expect("stream ok")
        .expect("stream open")
}

async fn http(port: u16, path: &str) -> (u16, String) {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
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

/// Polls GET `path` until `pred(body)` holds.
async fn wait_body(port: u16, path: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = http(port, path).await;
        if status == 200 && pred(&body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what} on {path}; last: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_nack_reconnect_and_admin_views() {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("proxy-sds-client-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let socket = dir.join("sds.sock");
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
    let (opened_tx, mut opened_rx) = mpsc::unbounded_channel();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SecretDiscoveryServiceServer::new(Scripted {
                opened: opened_tx,
            }))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );

    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let bootstrap = serde_json::json!({
        "node": {"id": "waypoint~127.0.0.1~t.default~default.svc.cluster.local", "cluster": "t.default"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"clusters": [{
            "name": "sds-grpc",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "sds-grpc", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"pipe": {"path": "./sds.sock"}}}}
            ]}]}
        }]}
    });
    std::fs::write(dir.join("bootstrap.json"), bootstrap.to_string()).expect("write");
    let log = std::fs::File::create(dir.join("proxy.log")).expect("log");
    let _proxy = Proc(
        std::process::Command::new(env!("CARGO_BIN_EXE_proxy"))
            .args(["-c", "bootstrap.json", "-l", "debug"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("proxy starts"),
    );

    // Two streams, one per secret, node on the first request, no version yet.
    let mut streams = Vec::new();
    for _ in 0..2 {
        streams.push(next_stream(&mut opened_rx).await);
    }
    streams.sort_by(|a, b| a.1.resource_names.cmp(&b.1.resource_names));
    let [(mut rootca, first_root), (mut default, first_default)] =
        <[_; 2]>::try_from(streams).unwrap_or_else(|_| panic!("two streams"));
    assert_eq!(first_root.resource_names, ["ROOTCA"]);
    assert_eq!(first_default.resource_names, ["default"]);
    for first in [&first_root, &first_default] {
        assert_eq!(first.type_url, SECRET_TYPE);
        assert_eq!(
            first.node.as_ref().map(|n| n.id.as_str()),
            Some("waypoint~127.0.0.1~t.default~default.svc.cluster.local")
        );
        assert!(first.version_info.is_empty() && first.response_nonce.is_empty());
    }

    // ACKs.
    rootca
        .responses
        .send(Ok(response("r1", "n-r1", root())))
        .await
        .expect("send");
    let ack = next_request(&mut rootca).await;
    assert_eq!(
        (ack.version_info.as_str(), ack.response_nonce.as_str()),
        ("r1", "n-r1")
    );
    assert!(ack.error_detail.is_none() && ack.node.is_none());
    default
        .responses
        .send(Ok(response("v1", "n1", tls(KEY))))
        .await
        .expect("send");
    let ack = next_request(&mut default).await;
    assert_eq!(
        (ack.version_info.as_str(), ack.response_nonce.as_str()),
        ("v1", "n1")
    );
    assert!(ack.error_detail.is_none());

    let certs = wait_body(admin_port, "/certs", "the certificate in /certs", |b| {
        b.contains("spiffe://cluster.local/ns/test/sa/unit")
    })
    .await;
    let certs: serde_json::Value = serde_json::from_str(&certs).expect("json");
    assert_eq!(certs["certificates"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        certs["certificates"][0]["ca_cert"][0]["path"], "<inline>",
        "{certs}"
    );

    // A bad key: NACK naming the field, version stays v1, the good secret stays.
    default
        .responses
        .send(Ok(response("v2", "n2", tls("not a key"))))
        .await
        .expect("send");
    let nack = next_request(&mut default).await;
    assert_eq!(nack.version_info, "v1");
    assert_eq!(nack.response_nonce, "n2");
    let detail = nack.error_detail.expect("NACK");
    assert!(
        detail.message.contains("Secret 'default'")
            && detail.message.contains("tls_certificate.private_key"),
        "{}",
        detail.message
    );
    let dump = wait_body(
        admin_port,
        "/config_dump?resource=dynamic_active_secrets",
        "the NACK in the dump",
        |b| b.contains("error_state"),
    )
    .await;
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("json");
    let default_entry = dump["configs"]
        .as_array()
        .and_then(|c| c.iter().find(|s| s["name"] == "default"))
        .expect("default secret");
    assert_eq!(default_entry["version_info"], "v1");
    assert_eq!(default_entry["client_status"], "NACKED");
    assert!(
        default_entry["error_state"]["details"]
            .as_str()
            .is_some_and(|d| d.contains("tls_certificate.private_key")),
        "{default_entry}"
    );
    assert_eq!(
        default_entry["secret"]["tls_certificate"]["private_key"]["inline_bytes"],
        "W3JlZGFjdGVkXQ==",
        "the accepted secret stays, redacted"
    );
    let (_, stats) = http(admin_port, "/stats?filter=%5Esds%5C.default%5C.update_").await;
    assert!(stats.contains("sds.default.update_success: 1\n"), "{stats}");
    assert!(
        stats.contains("sds.default.update_rejected: 1\n"),
        "{stats}"
    );

    // The server drops the stream: the proxy reconnects and declares the version it holds.
    let _ = default
        .responses
        .send(Err(Status::unavailable("going away")))
        .await;
    drop(default);
    let (mut again, first) = next_stream(&mut opened_rx).await;
    assert_eq!(first.resource_names, ["default"]);
    assert_eq!(first.version_info, "v1");
    assert!(
        first.node.is_some(),
        "node on the first request of every stream"
    );
    again
        .responses
        .send(Ok(response("v3", "n3", tls(KEY))))
        .await
        .expect("send");
    let ack = next_request(&mut again).await;
    assert_eq!(ack.version_info, "v3");
    assert!(ack.error_detail.is_none());
    wait_body(
        admin_port,
        "/config_dump?resource=dynamic_active_secrets&name_regex=%5Edefault%24",
        "v3 accepted",
        |b| b.contains("\"version_info\": \"v3\"") && !b.contains("error_state"),
    )
    .await;

    drop(rootca);
    server.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
