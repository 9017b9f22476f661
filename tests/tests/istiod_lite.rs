//! istiod-lite over real TLS gRPC: delta and SotW ADS bookkeeping, removals, file reloads, the CA's
//! token checks, and concurrent clients.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Streaming};
use waypoint_proto::{
    envoy::{
        config::core::v3::Node,
        service::discovery::v3::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    },
    google::rpc::Status as RpcStatus,
    istio::ca::{
        IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
    },
    resource::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ResourceKind},
};
use waypoint_shared::pem;
use waypoint_testbed::istiod_lite::{Config, IstiodLite, TokenPolicy, connect, mint_token};

const WAIT: Duration = Duration::from_secs(10);

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("istiod-lite-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn reference_fixture() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/istio/waypoint_xds_reconstructed_example.yaml"
    ))
    .expect("fixture")
}

async fn start_with_fixture(tag: &str) -> (IstiodLite, std::path::PathBuf) {
    let dir = temp_dir(tag);
    let res = dir.join("resources");
    std::fs::create_dir_all(&res).expect("mkdir");
    std::fs::write(res.join("waypoint.yaml"), reference_fixture()).expect("write fixture");
    let mut config = Config::for_test(&dir.join("ca"));
    config.resources = Some(res.clone());
    let server = IstiodLite::start(config).await.expect("istiod-lite starts");
    (server, res)
}

struct Delta {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

impl Delta {
    async fn open(server: &IstiodLite, node_id: &str) -> Delta {
        let channel = connect(server.addr, server.root_cert_pem())
            .await
            .expect("connect");
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let (tx, rx) = mpsc::channel(16);
        tx.send(DeltaDiscoveryRequest {
            node: Some(Node {
                id: node_id.to_owned(),
                ..Default::default()
            }),
            type_url: CLUSTER_TYPE.to_owned(),
            ..Default::default()
        })
        .await
        .expect("send");
        let rx = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("stream")
            .into_inner();
        Delta { tx, rx }
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("response in time")
            .expect("ok")
            .expect("open")
    }

    async fn send(&self, req: DeltaDiscoveryRequest) {
        self.tx.send(req).await.expect("send");
    }

    async fn ack(&self, resp: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        })
        .await;
    }
}

fn names(resp: &DeltaDiscoveryResponse) -> Vec<&str> {
    let mut n: Vec<&str> = resp.resources.iter().map(|r| r.name.as_str()).collect();
    n.sort();
    n
}

#[tokio::test]
async fn delta_wildcard_named_ack_nack_and_file_changes() {
    let (server, res) = start_with_fixture("delta").await;
    let mut ads = Delta::open(
        &server,
        "waypoint~127.0.0.1~wp.default~default.svc.cluster.local",
    )
    .await;

    let cds = ads.recv().await;
    assert_eq!(cds.type_url, CLUSTER_TYPE);
    assert_eq!(
        names(&cds),
        [
            "connect_originate",
            "encap",
            "inbound-vip|8000|http|httpbin.default.svc.cluster.local",
            "main_internal"
        ]
    );
    assert!(cds.removed_resources.is_empty());
    ads.ack(&cds).await;

    let eds_name = "inbound-vip|8000|http|httpbin.default.svc.cluster.local";
    ads.send(DeltaDiscoveryRequest {
        type_url: ENDPOINT_TYPE.to_owned(),
        resource_names_subscribe: vec![eds_name.to_owned(), "no-such-cluster".to_owned()],
        ..Default::default()
    })
    .await;
    let eds = ads.recv().await;
    assert_eq!(names(&eds), [eds_name]);
    assert_eq!(
        eds.removed_resources,
        ["no-such-cluster"],
        "absent named resource announced as removed"
    );

    // NACK the EDS response: the book keeps the version and the message.
    ads.send(DeltaDiscoveryRequest {
        type_url: ENDPOINT_TYPE.to_owned(),
        response_nonce: eds.nonce.clone(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: "endpoint rejected for the test".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await;
    let conns = server
        .book
        .wait_until(WAIT, |c| {
            c.iter()
                .any(|c| c.types.get(ENDPOINT_TYPE).is_some_and(|t| t.nacks == 1))
        })
        .await
        .expect("NACK recorded");
    let t = &conns[0].types[ENDPOINT_TYPE];
    let nack = t.last_nack.as_ref().expect("nack");
    assert_eq!(nack.message, "endpoint rejected for the test");
    assert_eq!(nack.nonce, eds.nonce);
    assert_eq!(Some(&nack.version), t.sent_version.as_ref());
    assert_eq!(conns[0].types[CLUSTER_TYPE].acks, 1);
    assert_eq!(
        conns[0].node_id,
        "waypoint~127.0.0.1~wp.default~default.svc.cluster.local"
    );

    // Wildcard LDS.
    ads.send(DeltaDiscoveryRequest {
        type_url: LISTENER_TYPE.to_owned(),
        ..Default::default()
    })
    .await;
    let lds = ads.recv().await;
    assert_eq!(
        names(&lds),
        ["connect_originate", "connect_terminate", "main_internal"]
    );
    ads.ack(&lds).await;

    // Change one cluster in the file: only it is pushed.
    let changed = reference_fixture().replacen(
        "connect_timeout: 10s              # meshConfig.connectTimeout",
        "connect_timeout: 7s",
        1,
    );
    assert_ne!(changed, reference_fixture(), "fixture edit applies");
    std::fs::write(res.join("waypoint.yaml"), &changed).expect("rewrite");
    let push = ads.recv().await;
    assert_eq!(push.type_url, CLUSTER_TYPE);
    assert_eq!(names(&push), ["connect_originate"]);
    ads.ack(&push).await;

    // A broken file is refused; nothing is pushed and the error is visible.
    std::fs::write(
        res.join("broken.yaml"),
        "clusters:\n- {name: x, type: STATIK}\n",
    )
    .expect("write");
    let err = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(e) = server.store.load_error().await {
                return e;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("load error reported");
    assert!(
        err.contains("broken.yaml") && err.contains("STATIK"),
        "{err}"
    );
    std::fs::remove_file(res.join("broken.yaml")).expect("rm");

    // Removing a cluster from the file → removed_resources.
    std::fs::write(
        res.join("waypoint.yaml"),
        changed.replace("- name: encap ", "- name: encap-renamed "),
    )
    .expect("rewrite");
    let push = ads.recv().await;
    assert_eq!(push.type_url, CLUSTER_TYPE);
    assert_eq!(push.removed_resources, ["encap"]);
    assert_eq!(names(&push), ["encap-renamed"]);

    // Programmatic removal of an endpoint → removed_resources on EDS.
    server.remove(ResourceKind::Endpoint, eds_name).await;
    let push = ads.recv().await;
    assert_eq!(push.type_url, ENDPOINT_TYPE);
    assert_eq!(push.removed_resources, [eds_name]);
    server.shutdown().await;
}

#[tokio::test]
async fn delta_initial_versions_skip_known_resources() {
    let (server, _res) = start_with_fixture("initial").await;
    let mut first = Delta::open(&server, "a").await;
    let cds = first.recv().await;
    let known: std::collections::HashMap<String, String> = cds
        .resources
        .iter()
        .filter(|r| r.name != "encap")
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    // A reconnecting client declares what it has: only the rest is sent.
    let channel = connect(server.addr, server.root_cert_pem())
        .await
        .expect("connect");
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        type_url: CLUSTER_TYPE.to_owned(),
        initial_resource_versions: known,
        ..Default::default()
    })
    .await
    .expect("send");
    let mut stream = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    let resp = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("open");
    assert_eq!(names(&resp), ["encap"]);
    server.shutdown().await;
}

#[tokio::test]
async fn sotw_sends_full_sets_and_ignores_plain_acks() {
    let (server, _res) = start_with_fixture("sotw").await;
    let channel = connect(server.addr, server.root_cert_pem())
        .await
        .expect("connect");
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(8);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: "sotw-node".into(),
            ..Default::default()
        }),
        type_url: CLUSTER_TYPE.into(),
        ..Default::default()
    })
    .await
    .expect("send");
    let mut stream = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    let cds = next_sotw(&mut stream).await;
    assert_eq!(cds.resources.len(), 4);
    assert!(!cds.version_info.is_empty() && !cds.nonce.is_empty());
    tx.send(DiscoveryRequest {
        type_url: CLUSTER_TYPE.into(),
        version_info: cds.version_info.clone(),
        response_nonce: cds.nonce.clone(),
        ..Default::default()
    })
    .await
    .expect("ack");
    // A named EDS subscription gets just that resource.
    let eds_name = "inbound-vip|8000|http|httpbin.default.svc.cluster.local";
    tx.send(DiscoveryRequest {
        type_url: ENDPOINT_TYPE.into(),
        resource_names: vec![eds_name.into()],
        ..Default::default()
    })
    .await
    .expect("eds");
    let eds = next_sotw(&mut stream).await;
    assert_eq!(
        eds.type_url, ENDPOINT_TYPE,
        "the CDS ACK produced no response"
    );
    assert_eq!(eds.resources.len(), 1);
    let conns = server
        .book
        .wait_until(WAIT, |c| {
            c.iter()
                .any(|c| c.types.get(CLUSTER_TYPE).is_some_and(|t| t.acks == 1))
        })
        .await
        .expect("ack recorded");
    assert_eq!(conns[0].stream, "sotw");
    assert_eq!(
        conns[0].types[CLUSTER_TYPE].acked_version.as_deref(),
        Some(cds.version_info.as_str())
    );
    server.shutdown().await;
}

async fn next_sotw(s: &mut Streaming<DiscoveryResponse>) -> DiscoveryResponse {
    tokio::time::timeout(WAIT, s.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("open")
}

fn csr(uri: &str) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().expect("uri"))];
    params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem")
}

#[tokio::test]
async fn ca_checks_tokens_and_takes_identity_from_them() {
    let dir = temp_dir("ca");
    let token_file = dir.join("tokens");
    let good = mint_token("default", "sleep", Duration::from_secs(600));
    let unknown = mint_token("default", "sleep", Duration::from_secs(60)) + "x";
    std::fs::write(&token_file, format!("{good}\n")).expect("tokens");
    let mut config = Config::for_test(&dir.join("ca"));
    config.tokens = TokenPolicy::File(token_file);
    config.max_cert_ttl = Duration::from_secs(7200);
    let server = IstiodLite::start(config).await.expect("starts");
    let channel = connect(server.addr, server.root_cert_pem())
        .await
        .expect("connect");
    let mut client = IstioCertificateServiceClient::new(channel);
    let request = |token: Option<&str>, csr_pem: String, ttl: i64| {
        let mut req = Request::new(IstioCertificateRequest {
            csr: csr_pem,
            validity_duration: ttl,
            metadata: None,
        });
        if let Some(t) = token {
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {t}").parse().expect("header"),
            );
        }
        req.metadata_mut()
            .insert("clusterid", "Kubernetes".parse().expect("header"));
        req
    };

    let err = client
        .create_certificate(request(
            None,
            csr("spiffe://cluster.local/ns/default/sa/sleep"),
            3600,
        ))
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = client
        .create_certificate(request(
            Some(&unknown),
            csr("spiffe://cluster.local/ns/default/sa/sleep"),
            3600,
        ))
        .await
        .expect_err("unknown token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = client
        .create_certificate(request(
            Some(&good),
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
            3600,
        ))
        .await
        .expect_err("bad csr");
    assert_eq!(err.code(), Code::InvalidArgument);

    // The CSR asks for another identity: the token wins, as in istiod. TTL is capped at 2h.
    let resp = client
        .create_certificate(request(
            Some(&good),
            csr("spiffe://cluster.local/ns/other/sa/admin"),
            86400,
        ))
        .await
        .expect("issued")
        .into_inner();
    assert_eq!(resp.cert_chain.len(), 2, "leaf + root");
    let leaf = pem::certs(&resp.cert_chain[0]).expect("leaf pem");
    let info = pem::cert_info(&leaf[0]).expect("x509");
    assert_eq!(
        info.uri_sans,
        ["spiffe://cluster.local/ns/default/sa/sleep"]
    );
    assert!(
        (info.not_after - info.not_before - 7200).abs() <= 1,
        "ttl capped: {info:?}"
    );
    assert_eq!(resp.cert_chain[1].trim(), server.root_cert_pem().trim());
    let issued = server.ca.issued().await;
    assert_eq!(issued.len(), 1);
    assert_eq!(issued[0].cluster_id, "Kubernetes");
    server.shutdown().await;
}

#[tokio::test]
async fn root_is_reused_across_restarts() {
    let dir = temp_dir("reuse");
    let first = IstiodLite::start(Config::for_test(&dir))
        .await
        .expect("first");
    let root = first.root_cert_pem().to_owned();
    first.shutdown().await;
    let second = IstiodLite::start(Config::for_test(&dir))
        .await
        .expect("second");
    assert_eq!(second.root_cert_pem(), root);
    assert_eq!(
        std::fs::read_to_string(dir.join("root-cert.pem")).expect("root file"),
        root
    );
    second.shutdown().await;
}

#[tokio::test]
async fn concurrent_clients_each_get_the_full_set_and_pushes() {
    let (server, _res) = start_with_fixture("concurrent").await;
    let mut clients = Vec::new();
    for i in 0..8 {
        clients.push(Delta::open(&server, &format!("node-{i}")).await);
    }
    for c in &mut clients {
        let cds = c.recv().await;
        assert_eq!(cds.resources.len(), 4);
        c.ack(&cds).await;
    }
    server
        .push_json(
            ResourceKind::Cluster,
            &serde_json::json!({"name": "pushed", "type": "STATIC", "connect_timeout": "1s"}),
        )
        .await
        .expect("push");
    for c in &mut clients {
        let push = c.recv().await;
        assert_eq!(names(&push), ["pushed"]);
    }
    let conns = server
        .book
        .wait_until(WAIT, |c| {
            c.iter()
                .filter(|c| c.types.get(CLUSTER_TYPE).is_some_and(|t| t.acks >= 1))
                .count()
                == 8
        })
        .await;
    assert!(conns.is_ok(), "all 8 ACKs recorded");
    drop(clients);
    let closed = server
        .book
        .wait_until(WAIT, |c| c.iter().all(|c| !c.connected))
        .await;
    assert!(closed.is_ok(), "closed streams are marked");
    server.shutdown().await;
}
