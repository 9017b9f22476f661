//! istiod-lite: one TLS gRPC port standing in for istiod:15012 — the Istio CA and ADS (SotW and
//! delta) over resources read from YAML/JSON files — plus an optional plain-HTTP debug port
//! (`/debug/xds`, `/debug/certs`, `/debug/resources`). Tests use it as a library through
//! [`IstiodLite`]; the `istiod-lite` binary wraps the same code.

pub mod ads;
pub mod ca;
pub mod store;

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, StatusCode};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use waypoint_proto::{
    envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer,
    istio::ca::istio_certificate_service_server::IstioCertificateServiceServer,
    resource::ResourceKind,
};

pub use ads::{ConnStatus, Nack, StatusBook, TypeStatus};
pub use ca::{IssuedCert, MeshCa, TokenPolicy, mint_token};
pub use store::{Resource, Snapshot, Store};

/// Start-up errors.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Could not bind a port.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// CA set-up failed.
    #[error("CA: {0}")]
    Ca(#[from] ca::CaError),
    /// The initial resource files are invalid.
    #[error("resources: {0}")]
    Resources(#[from] store::LoadError),
    /// TLS set-up failed.
    #[error("TLS: {0}")]
    Tls(#[from] tonic::transport::Error),
}

/// How to run istiod-lite.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC/TLS listen address (port 0 picks one).
    pub listen: SocketAddr,
    /// Resource file or folder; `None` serves only what is pushed.
    pub resources: Option<PathBuf>,
    /// CA directory (root written here as `root-cert.pem`).
    pub ca_dir: PathBuf,
    /// Caller authentication.
    pub tokens: TokenPolicy,
    /// Debug HTTP listen address.
    pub debug_listen: Option<SocketAddr>,
    /// Trust domain of issued identities.
    pub trust_domain: String,
    /// Upper bound on issued certificate lifetimes.
    pub max_cert_ttl: Duration,
    /// How often resource files are checked for changes.
    pub watch_interval: Duration,
}

impl Config {
    /// Defaults for tests: loopback port 0, any token accepted, 24h max TTL, 100 ms file polling.
    pub fn for_test(ca_dir: &Path) -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            resources: None,
            ca_dir: ca_dir.to_owned(),
            tokens: TokenPolicy::AcceptAny,
            debug_listen: None,
            trust_domain: "cluster.local".to_owned(),
            max_cert_ttl: Duration::from_secs(24 * 3600),
            watch_interval: Duration::from_millis(100),
        }
    }
}

/// A running istiod-lite.
pub struct IstiodLite {
    /// The gRPC/TLS address.
    pub addr: SocketAddr,
    /// The debug HTTP address, if enabled.
    pub debug_addr: Option<SocketAddr>,
    /// Served resources.
    pub store: Arc<Store>,
    /// ACK/NACK records.
    pub book: Arc<StatusBook>,
    /// The CA.
    pub ca: Arc<MeshCa>,
    /// Where `root-cert.pem` lives.
    pub ca_dir: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl IstiodLite {
    /// Starts serving; returns once the ports are bound.
    pub async fn start(config: Config) -> Result<IstiodLite, StartError> {
        let ca = Arc::new(MeshCa::load_or_create(
            &config.ca_dir,
            &config.trust_domain,
            config.max_cert_ttl,
            config.tokens.clone(),
        )?);
        let serving = ca.serving_cert()?;
        let store = Arc::new(Store::new());
        let mut tasks = Vec::new();
        if let Some(path) = &config.resources {
            store.load_files(path).await?;
            tasks.push(store::spawn_file_watcher(
                Arc::downgrade(&store),
                path.clone(),
                config.watch_interval,
            ));
        }
        let book = Arc::new(StatusBook::default());

        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let router = Server::builder()
            .tls_config(
                ServerTlsConfig::new()
                    .identity(Identity::from_pem(serving.chain_pem, serving.key_pem)),
            )?
            .add_service(IstioCertificateServiceServer::new(ca::CaService::new(
                ca.clone(),
            )))
            .add_service(
                AggregatedDiscoveryServiceServer::new(ads::AdsService::new(
                    store.clone(),
                    book.clone(),
                ))
                .max_decoding_message_size(64 << 20),
            );
        tasks.push(tokio::spawn(async move {
            let incoming = TcpListenerStream::new(listener);
            if let Err(err) = router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = shutdown_rx.await;
                })
                .await
            {
                tracing::error!(%err, "istiod-lite gRPC server failed");
            }
        }));

        let debug_addr = match config.debug_listen {
            Some(debug) => {
                let listener =
                    TcpListener::bind(debug)
                        .await
                        .map_err(|source| StartError::Bind {
                            addr: debug,
                            source,
                        })?;
                let bound = listener.local_addr().map_err(|source| StartError::Bind {
                    addr: debug,
                    source,
                })?;
                tasks.push(tokio::spawn(serve_debug(
                    listener,
                    store.clone(),
                    book.clone(),
                    ca.clone(),
                )));
                Some(bound)
            }
            None => None,
        };
        Ok(IstiodLite {
            addr,
            debug_addr,
            store,
            book,
            ca,
            ca_dir: config.ca_dir,
            shutdown: Some(shutdown_tx),
            tasks,
        })
    }

    /// PEM of the mesh root.
    pub fn root_cert_pem(&self) -> &str {
        self.ca.root_cert_pem()
    }

    /// Adds or replaces a resource given as proto3-JSON.
    pub async fn push_json(
        &self,
        kind: ResourceKind,
        doc: &serde_json::Value,
    ) -> Result<(), String> {
        let resource = Resource::from_json(kind, doc)?;
        self.store.push(resource).await;
        Ok(())
    }

    /// Removes a resource.
    pub async fn remove(&self, kind: ResourceKind, name: &str) {
        self.store.remove(kind, name).await;
    }

    /// Stops serving (open streams end).
    pub async fn shutdown(mut self) {
        self.stop();
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
    }

    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for IstiodLite {
    fn drop(&mut self) {
        self.stop();
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn serve_debug(
    listener: TcpListener,
    store: Arc<Store>,
    book: Arc<StatusBook>,
    ca: Arc<MeshCa>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (store, book, ca) = (store.clone(), book.clone(), ca.clone());
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (store, book, ca) = (store.clone(), book.clone(), ca.clone());
                    async move {
                        Ok::<_, Infallible>(
                            debug_response(req.method(), req.uri().path(), &store, &book, &ca)
                                .await,
                        )
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(%err, "debug connection ended");
            }
        });
    }
}

async fn debug_response(
    method: &Method,
    path: &str,
    store: &Store,
    book: &StatusBook,
    ca: &MeshCa,
) -> hyper::Response<Full<Bytes>> {
    let body = match (method, path) {
        (&Method::GET, "/debug/xds") => serde_json::json!({
            "load_error": store.load_error().await,
            "generation": store.snapshot().generation,
            "connections": book.connections().await,
        }),
        (&Method::GET, "/debug/certs") => serde_json::json!({ "issued": ca.issued().await }),
        (&Method::GET, "/debug/resources") => {
            let snap = store.snapshot();
            let mut out = serde_json::Map::new();
            for kind in ResourceKind::ALL {
                let list: Vec<_> = snap
                    .of(kind)
                    .map(|r| serde_json::json!({"name": r.name, "version": r.version}))
                    .collect();
                out.insert(kind.type_url().to_owned(), serde_json::Value::Array(list));
            }
            serde_json::Value::Object(out)
        }
        _ => {
            return hyper::Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Full::new(Bytes::from_static(
                    b"not found: try /debug/xds, /debug/certs, /debug/resources\n",
                )))
                .unwrap_or_default();
        }
    };
    let text = serde_json::to_vec_pretty(&body).unwrap_or_default();
    hyper::Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(text)))
        .unwrap_or_default()
}

/// A gRPC channel to an istiod-lite (or istiod) at `addr`, trusting `root_pem` and checking the
/// server name `istiod.istio-system.svc`, as pilot-agent does.
pub async fn connect(
    addr: SocketAddr,
    root_pem: &str,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(root_pem))
        .domain_name("istiod.istio-system.svc");
    tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect()
        .await
}
