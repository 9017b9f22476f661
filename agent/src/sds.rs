//! The SDS server the proxy reads its certificates from: `SecretDiscoveryService` over a Unix socket,
//! state-of-the-world (`StreamSecrets`, as pilot-agent) and delta (`DeltaSecrets`), resources
//! `default` (the workload certificate) and `ROOTCA` (the mesh root). Every rotation is pushed on the
//! open streams; a stream that asks for an unknown resource gets an error, other streams carry on.

use std::{collections::BTreeSet, path::Path, pin::Pin, sync::Arc};

use prost::Message as _;
use tokio::sync::{mpsc, watch};
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
                Resource,
            },
            secret::v3::secret_discovery_service_server::{
                SecretDiscoveryService, SecretDiscoveryServiceServer,
            },
        },
    },
    google::protobuf::Any,
    resource::SECRET_TYPE,
};

use crate::{metrics::AgentMetrics, secrets::WorkloadSecret};

/// Name of the workload certificate resource.
pub const DEFAULT_SECRET: &str = "default";
/// Name of the mesh root resource.
pub const ROOT_SECRET: &str = "ROOTCA";

type Current = watch::Receiver<Option<Arc<WorkloadSecret>>>;

/// The SDS service.
#[derive(Clone)]
pub struct SdsService {
    secrets: Current,
    metrics: Arc<AgentMetrics>,
}

impl SdsService {
    /// Serves the secrets published on `secrets`.
    pub fn new(secrets: Current, metrics: Arc<AgentMetrics>) -> Self {
        SdsService { secrets, metrics }
    }

    /// Serves SDS on the Unix socket at `path` (a stale socket file is replaced) until `shutdown`.
    pub async fn serve(
        self,
        path: &Path,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), crate::uds::UdsError> {
        let listener = crate::uds::bind(path)?;
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        tonic::transport::Server::builder()
            .add_service(SecretDiscoveryServiceServer::new(self))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(|e| crate::uds::UdsError::Serve(e.to_string()))
    }
}

/// Builds the `Secret` resource `name` from the current certificate.
pub fn secret_resource(name: &str, current: &WorkloadSecret) -> Option<Secret> {
    let inline = |pem: &str| {
        Some(DataSource {
            specifier: Some(Specifier::InlineBytes(pem.as_bytes().to_vec())),
            ..Default::default()
        })
    };
    let r#type = match name {
        DEFAULT_SECRET => secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(&current.identity.cert_chain_pem),
            private_key: inline(&current.identity.key_pem),
            ..Default::default()
        }),
        ROOT_SECRET => secret::Type::ValidationContext(CertificateValidationContext {
            trusted_ca: inline(&current.identity.root_pem),
            ..Default::default()
        }),
        _ => return None,
    };
    Some(Secret {
        name: name.to_owned(),
        r#type: Some(r#type),
    })
}

fn to_any(secret: &Secret) -> Any {
    Any {
        type_url: SECRET_TYPE.to_owned(),
        value: secret.encode_to_vec(),
    }
}

/// The version string: the certificate's not-before (Unix seconds) and the rotation counter, like
/// pilot-agent's "time/counter" versions.
fn version_of(current: &WorkloadSecret) -> String {
    format!(
        "{}/{}",
        current.identity.leaf.not_before, current.generation
    )
}

fn check_names<'a>(names: impl IntoIterator<Item = &'a String>) -> Result<(), Status> {
    for n in names {
        if n != DEFAULT_SECRET && n != ROOT_SECRET {
            return Err(Status::not_found(format!(
                "unknown secret '{n}': this SDS server serves only '{DEFAULT_SECRET}' and '{ROOT_SECRET}'"
            )));
        }
    }
    Ok(())
}

/// Waits for the first certificate (pilot-agent answers only once it has one).
async fn wait_ready(rx: &mut Current) -> Result<Arc<WorkloadSecret>, Status> {
    loop {
        if let Some(s) = rx.borrow_and_update().clone() {
            return Ok(s);
        }
        rx.changed()
            .await
            .map_err(|_| Status::unavailable("agent shutting down"))?;
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SecretDiscoveryService for SdsService {
    type StreamSecretsStream = ResponseStream<DiscoveryResponse>;
    type DeltaSecretsStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let mut secrets = self.secrets.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let mut names: BTreeSet<String> = BTreeSet::new();
            let mut sent: Option<(u64, BTreeSet<String>)> = None;
            let mut last_nonce = String::new();
            loop {
                tokio::select! {
                    req = requests.message() => {
                        let req = match req {
                            Ok(Some(r)) => r,
                            _ => return,
                        };
                        if let Err(status) = check_names(&req.resource_names) {
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                        if let Some(err) = &req.error_detail {
                            tracing::warn!(target: "sds", nonce = %req.response_nonce, "proxy rejected secrets: {}", err.message);
                        }
                        if !req.response_nonce.is_empty() && req.response_nonce != last_nonce {
                            continue; // stale
                        }
                        names = req.resource_names.into_iter().collect();
                    }
                    changed = secrets.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                }
                if names.is_empty() {
                    continue;
                }
                let current = match wait_ready(&mut secrets).await {
                    Ok(c) => c,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                if sent.as_ref() == Some(&(current.generation, names.clone())) {
                    continue;
                }
                last_nonce = uuid::Uuid::new_v4().to_string();
                let response = DiscoveryResponse {
                    version_info: version_of(&current),
                    resources: names
                        .iter()
                        .filter_map(|n| secret_resource(n, &current))
                        .map(|s| to_any(&s))
                        .collect(),
                    type_url: SECRET_TYPE.to_owned(),
                    nonce: last_nonce.clone(),
                    ..Default::default()
                };
                sent = Some((current.generation, names.clone()));
                metrics.sds_pushes.inc();
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let mut secrets = self.secrets.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let mut names: BTreeSet<String> = BTreeSet::new();
            let mut known: std::collections::HashMap<String, String> = Default::default();
            loop {
                tokio::select! {
                    req = requests.message() => {
                        let req = match req {
                            Ok(Some(r)) => r,
                            _ => return,
                        };
                        if let Err(status) = check_names(&req.resource_names_subscribe) {
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                        if let Some(err) = &req.error_detail {
                            tracing::warn!(target: "sds", nonce = %req.response_nonce, "proxy rejected secrets: {}", err.message);
                        }
                        names.extend(req.resource_names_subscribe);
                        for n in req.resource_names_unsubscribe {
                            names.remove(&n);
                            known.remove(&n);
                        }
                        known.extend(req.initial_resource_versions);
                    }
                    changed = secrets.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                }
                if names.is_empty() {
                    continue;
                }
                let current = match wait_ready(&mut secrets).await {
                    Ok(c) => c,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                let version = version_of(&current);
                let resources: Vec<Resource> = names
                    .iter()
                    .filter(|n| known.get(*n) != Some(&version))
                    .filter_map(|n| secret_resource(n, &current))
                    .map(|s| Resource {
                        name: s.name.clone(),
                        version: version.clone(),
                        resource: Some(to_any(&s)),
                        ..Default::default()
                    })
                    .collect();
                if resources.is_empty() {
                    continue;
                }
                for r in &resources {
                    known.insert(r.name.clone(), version.clone());
                }
                let response = DeltaDiscoveryResponse {
                    system_version_info: version.clone(),
                    resources,
                    type_url: SECRET_TYPE.to_owned(),
                    nonce: uuid::Uuid::new_v4().to_string(),
                    ..Default::default()
                };
                metrics.sds_pushes.inc();
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_secrets(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented(
            "FetchSecrets is not served; use StreamSecrets or DeltaSecrets",
        ))
    }
}
