//! The SDS client: state-of-the-world `StreamSecrets` against the static gRPC clusters the bootstrap
//! defines (in a waypoint: `sds-grpc`, the agent's Unix socket), one stream per secret name as Envoy
//! does (so a name the server refuses cannot take the others down), ACK/NACK with Envoy's checks,
//! reconnect with capped backoff keeping the last good secret, and a [`SecretStore`] the TLS contexts
//! read and watch for rotations.
//!
//! Which names are subscribed: `default` and `ROOTCA` always, as soon as the bootstrap has an
//! `sds-grpc` cluster (pilot-agent pre-warms them; every waypoint listener and cluster that does mTLS
//! names them), plus every other name a listener or cluster transport socket references through an
//! `sds_config` whose `api_config_source` names a bootstrap gRPC cluster (`envoy_grpc.cluster_name`).
//! Those are found by scanning the accepted LDS/CDS resources (and the bootstrap's static ones) each
//! time an LDS or CDS update is attempted; names no longer referenced are unsubscribed.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use prost::Message as _;
use tokio::{sync::mpsc, sync::watch, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use waypoint_proto::{
    envoy::{
        config::{
            cluster::v3::Cluster,
            core::v3::{
                ConfigSource, DataSource, TransportSocket, config_source::ConfigSourceSpecifier,
                data_source::Specifier, grpc_service::TargetSpecifier, transport_socket,
            },
            listener::v3::Listener,
        },
        extensions::transport_sockets::{
            internal_upstream::v3::InternalUpstreamTransport,
            tls::v3::{
                CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret,
                UpstreamTlsContext, common_tls_context::ValidationContextType, secret,
            },
        },
        service::{
            discovery::v3::{DiscoveryRequest, DiscoveryResponse},
            secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient,
        },
    },
    google::rpc::Status as RpcStatus,
    json,
    resource::{ResourceKind, SECRET_TYPE},
};
use waypoint_shared::{backoff::Backoff, pem};

use crate::{
    bootstrap::GrpcTarget,
    server::Server,
    xds::ads::{AdsError, connect},
};

/// The bootstrap cluster pilot-agent's SDS server is reached through.
pub const SDS_CLUSTER: &str = "sds-grpc";
/// The workload certificate.
pub const DEFAULT_SECRET: &str = "default";
/// The mesh root.
pub const ROOT_SECRET: &str = "ROOTCA";
/// What redacted secret material is replaced with (Envoy's marker).
pub const REDACTED: &str = "[redacted]";

/// gRPC code carried in NACKs (INVALID_ARGUMENT, as Envoy).
const NACK_CODE: i32 = 3;

/// Errors of one SDS stream.
#[derive(Debug, thiserror::Error)]
pub enum SdsError {
    /// Could not connect.
    #[error(transparent)]
    Connect(#[from] AdsError),
    /// The stream failed.
    #[error("stream: {0}")]
    Stream(Box<tonic::Status>),
    /// The stream closed.
    #[error("the server closed the stream")]
    Closed,
}

/// Why a received secret is rejected; the text names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SecretError {
    /// Field path inside the `Secret` (`tls_certificate.private_key`).
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

fn secret_error(field: &str, reason: impl Into<String>) -> SecretError {
    SecretError {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// The last rejected update of a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretFailure {
    /// The NACK message.
    pub details: String,
    /// The rejected version.
    pub version: String,
    /// When.
    pub when: SystemTime,
}

/// One subscribed secret.
#[derive(Debug, Clone)]
pub struct SecretEntry {
    /// Secret name.
    pub name: String,
    /// The bootstrap cluster it comes from.
    pub cluster: String,
    /// The version last accepted (empty before the first).
    pub version: String,
    /// The secret last accepted (`None` while warming).
    pub secret: Option<Arc<Secret>>,
    /// When it was last accepted.
    pub last_updated: Option<SystemTime>,
    /// The last rejected update, cleared by the next accepted one.
    pub error: Option<SecretFailure>,
}

/// A secret reference found in a TLS transport socket.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretRef {
    /// Secret name.
    pub name: String,
    /// The bootstrap gRPC cluster serving it, when the `sds_config` is one we can follow.
    pub cluster: Option<String>,
}

/// The secrets one TLS context (`CommonTlsContext`) uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TlsContextRef {
    /// `tls_certificate_sds_secret_configs`.
    pub certificates: Vec<SecretRef>,
    /// The validation context's SDS secret (plain or combined).
    pub validation: Option<SecretRef>,
}

/// Every secret the proxy holds, shared with the admin API and the TLS contexts. Readers never
/// lock: the map is swapped atomically; writers are serialised by a mutex that is never held across
/// an await.
#[derive(Debug)]
pub struct SecretStore {
    entries: ArcSwap<BTreeMap<String, Arc<SecretEntry>>>,
    contexts: ArcSwap<Vec<TlsContextRef>>,
    write: Mutex<()>,
    changed: watch::Sender<u64>,
}

impl Default for SecretStore {
    fn default() -> Self {
        let (changed, _) = watch::channel(0);
        SecretStore {
            entries: ArcSwap::from_pointee(BTreeMap::new()),
            contexts: ArcSwap::from_pointee(Vec::new()),
            write: Mutex::new(()),
            changed,
        }
    }
}

impl SecretStore {
    /// The accepted secret `name`, if any.
    pub fn get(&self, name: &str) -> Option<Arc<Secret>> {
        self.entries.load().get(name).and_then(|e| e.secret.clone())
    }

    /// Every subscribed secret, by name.
    pub fn entries(&self) -> Arc<BTreeMap<String, Arc<SecretEntry>>> {
        self.entries.load_full()
    }

    /// The TLS contexts found in the current listeners and clusters (what `/certs` reports).
    pub fn contexts(&self) -> Arc<Vec<TlsContextRef>> {
        self.contexts.load_full()
    }

    /// A receiver that changes every time an accepted secret changes (rebuild TLS contexts then).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn modify(&self, f: impl FnOnce(&mut BTreeMap<String, Arc<SecretEntry>>) -> bool) {
        let _guard = match self.write.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mut next = (**self.entries.load()).clone();
        let secret_changed = f(&mut next);
        self.entries.store(Arc::new(next));
        if secret_changed {
            self.changed.send_modify(|n| *n += 1);
        }
    }

    /// Registers a subscription (a warming entry until the first secret arrives).
    fn subscribe_name(&self, name: &str, cluster: &str) {
        self.modify(|m| {
            m.entry(name.to_owned()).or_insert_with(|| {
                Arc::new(SecretEntry {
                    name: name.to_owned(),
                    cluster: cluster.to_owned(),
                    version: String::new(),
                    secret: None,
                    last_updated: None,
                    error: None,
                })
            });
            false
        });
    }

    /// Drops a subscription and its secret.
    fn unsubscribe_name(&self, name: &str) {
        self.modify(|m| m.remove(name).is_some_and(|e| e.secret.is_some()));
    }

    fn accept(&self, name: &str, cluster: &str, version: &str, secret: Secret) {
        self.modify(|m| {
            m.insert(
                name.to_owned(),
                Arc::new(SecretEntry {
                    name: name.to_owned(),
                    cluster: cluster.to_owned(),
                    version: version.to_owned(),
                    secret: Some(Arc::new(secret)),
                    last_updated: Some(SystemTime::now()),
                    error: None,
                }),
            );
            true
        });
    }

    fn reject(&self, name: &str, cluster: &str, version: &str, details: &str) {
        self.modify(|m| {
            let mut entry = m.get(name).map(|e| (**e).clone()).unwrap_or(SecretEntry {
                name: name.to_owned(),
                cluster: cluster.to_owned(),
                version: String::new(),
                secret: None,
                last_updated: None,
                error: None,
            });
            entry.error = Some(SecretFailure {
                details: details.to_owned(),
                version: version.to_owned(),
                when: SystemTime::now(),
            });
            m.insert(name.to_owned(), Arc::new(entry));
            false
        });
    }

    fn accepted_version(&self, name: &str) -> String {
        self.entries
            .load()
            .get(name)
            .filter(|e| e.secret.is_some())
            .map(|e| e.version.clone())
            .unwrap_or_default()
    }
}

/// The bytes a `DataSource` holds (inline, file or environment variable).
pub fn data_source_bytes(ds: &DataSource) -> Result<Vec<u8>, String> {
    match &ds.specifier {
        Some(Specifier::InlineBytes(b)) => Ok(b.clone()),
        Some(Specifier::InlineString(s)) => Ok(s.as_bytes().to_vec()),
        Some(Specifier::Filename(f)) => std::fs::read(f).map_err(|e| format!("{f}: {e}")),
        Some(Specifier::EnvironmentVariable(v)) => std::env::var(v)
            .map(String::into_bytes)
            .map_err(|e| format!("environment variable {v}: {e}")),
        None => Err("empty data source".to_owned()),
    }
}

fn pem_text<'a>(field: &str, bytes: &'a [u8]) -> Result<&'a str, SecretError> {
    std::str::from_utf8(bytes).map_err(|_| secret_error(field, "not UTF-8 PEM text"))
}

/// Envoy's checks on a received secret: certificates and keys must be present and parse.
pub fn validate_secret(secret: &Secret) -> Result<(), SecretError> {
    match &secret.r#type {
        None => Err(secret_error("type", "the secret has no content")),
        Some(secret::Type::TlsCertificate(t)) => {
            if t.private_key_provider.is_some() {
                return Err(secret_error(
                    "tls_certificate.private_key_provider",
                    "private key providers are not supported",
                ));
            }
            if t.pkcs12.is_some() {
                return Err(secret_error(
                    "tls_certificate.pkcs12",
                    "PKCS#12 is not supported; use certificate_chain and private_key",
                ));
            }
            let field = "tls_certificate.certificate_chain";
            let chain = t
                .certificate_chain
                .as_ref()
                .ok_or_else(|| secret_error(field, "missing"))?;
            let chain = data_source_bytes(chain).map_err(|e| secret_error(field, e))?;
            let certs = pem::certs(pem_text(field, &chain)?)
                .map_err(|e| secret_error(field, e.to_string()))?;
            for (i, der) in certs.iter().enumerate() {
                pem::cert_info(der)
                    .map_err(|e| secret_error(&format!("{field}[{i}]"), e.to_string()))?;
            }
            let field = "tls_certificate.private_key";
            let key = t
                .private_key
                .as_ref()
                .ok_or_else(|| secret_error(field, "missing"))?;
            let key = data_source_bytes(key).map_err(|e| secret_error(field, e))?;
            pem::private_key(pem_text(field, &key)?)
                .map_err(|e| secret_error(field, e.to_string()))?;
            Ok(())
        }
        Some(secret::Type::ValidationContext(v)) => {
            let field = "validation_context.trusted_ca";
            if let Some(ca) = &v.trusted_ca {
                let ca = data_source_bytes(ca).map_err(|e| secret_error(field, e))?;
                let certs = pem::certs(pem_text(field, &ca)?)
                    .map_err(|e| secret_error(field, e.to_string()))?;
                for (i, der) in certs.iter().enumerate() {
                    pem::cert_info(der)
                        .map_err(|e| secret_error(&format!("{field}[{i}]"), e.to_string()))?;
                }
            }
            Ok(())
        }
        Some(secret::Type::SessionTicketKeys(_)) | Some(secret::Type::GenericSecret(_)) => Ok(()),
    }
}

fn redact_source(ds: &mut Option<DataSource>) {
    if let Some(ds) = ds {
        ds.specifier = match &ds.specifier {
            Some(Specifier::InlineBytes(_)) => Some(Specifier::InlineBytes(REDACTED.into())),
            Some(Specifier::InlineString(_)) => Some(Specifier::InlineString(REDACTED.into())),
            Some(Specifier::Filename(_)) => Some(Specifier::Filename(REDACTED.into())),
            Some(Specifier::EnvironmentVariable(_)) => {
                Some(Specifier::EnvironmentVariable(REDACTED.into()))
            }
            None => None,
        };
    }
}

/// A copy with every sensitive field (private keys, passwords, ticket keys, generic secrets)
/// replaced by `[redacted]`, as Envoy's config dump shows them.
pub fn redacted(secret: &Secret) -> Secret {
    let mut s = secret.clone();
    match &mut s.r#type {
        Some(secret::Type::TlsCertificate(t)) => {
            redact_source(&mut t.private_key);
            redact_source(&mut t.password);
            redact_source(&mut t.pkcs12);
            if t.private_key_provider.is_some() {
                t.private_key_provider = Some(Default::default());
            }
        }
        Some(secret::Type::SessionTicketKeys(k)) => {
            for key in &mut k.keys {
                let mut opt = Some(std::mem::take(key));
                redact_source(&mut opt);
                *key = opt.unwrap_or_default();
            }
        }
        Some(secret::Type::GenericSecret(g)) => redact_source(&mut g.secret),
        Some(secret::Type::ValidationContext(_)) | None => {}
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Finding the secrets listeners and clusters name.

const DOWNSTREAM_TLS_CONTEXT: &str =
    "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const UPSTREAM_TLS_CONTEXT: &str = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const INTERNAL_UPSTREAM: &str =
    "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport";
/// Bound on socket nesting while scanning (a malformed resource must not recurse forever).
const MAX_SOCKET_DEPTH: usize = 16;

fn secret_ref(cfg: &SdsSecretConfig, grpc_clusters: &BTreeSet<String>) -> SecretRef {
    SecretRef {
        name: cfg.name.clone(),
        cluster: cfg
            .sds_config
            .as_ref()
            .and_then(|c| grpc_cluster_of(c, grpc_clusters)),
    }
}

fn grpc_cluster_of(source: &ConfigSource, grpc_clusters: &BTreeSet<String>) -> Option<String> {
    match &source.config_source_specifier {
        Some(ConfigSourceSpecifier::ApiConfigSource(api)) => {
            api.grpc_services
                .iter()
                .find_map(|g| match &g.target_specifier {
                    Some(TargetSpecifier::EnvoyGrpc(e))
                        if grpc_clusters.contains(&e.cluster_name) =>
                    {
                        Some(e.cluster_name.clone())
                    }
                    _ => None,
                })
        }
        _ => None,
    }
}

fn context_ref(ctx: &CommonTlsContext, grpc_clusters: &BTreeSet<String>) -> TlsContextRef {
    let validation = match &ctx.validation_context_type {
        Some(ValidationContextType::ValidationContextSdsSecretConfig(c)) => {
            Some(secret_ref(c, grpc_clusters))
        }
        Some(ValidationContextType::CombinedValidationContext(c)) => c
            .validation_context_sds_secret_config
            .as_ref()
            .map(|c| secret_ref(c, grpc_clusters)),
        _ => None,
    };
    TlsContextRef {
        certificates: ctx
            .tls_certificate_sds_secret_configs
            .iter()
            .map(|c| secret_ref(c, grpc_clusters))
            .collect(),
        validation,
    }
}

/// Collects the `CommonTlsContext` of a transport socket, looking through the wrappers the config
/// compiler accepts (`internal_upstream` around an inner socket). Any other socket type is either
/// plaintext or refused by the compiler, so it names no secret. Typed decoding, not reflection:
/// this runs on every LDS/CDS update and must not rebuild the JSON descriptor pool (~5 MB).
fn scan_transport_socket(
    ts: &TransportSocket,
    depth: usize,
    grpc_clusters: &BTreeSet<String>,
    out: &mut BTreeSet<TlsContextRef>,
) {
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type else {
        return;
    };
    let common = match json::type_name_of_url(&any.type_url) {
        DOWNSTREAM_TLS_CONTEXT => DownstreamTlsContext::decode(any.value.as_slice())
            .ok()
            .and_then(|c| c.common_tls_context),
        UPSTREAM_TLS_CONTEXT => UpstreamTlsContext::decode(any.value.as_slice())
            .ok()
            .and_then(|c| c.common_tls_context),
        INTERNAL_UPSTREAM if depth < MAX_SOCKET_DEPTH => {
            if let Some(inner) = InternalUpstreamTransport::decode(any.value.as_slice())
                .ok()
                .and_then(|t| t.transport_socket)
            {
                scan_transport_socket(&inner, depth + 1, grpc_clusters, out);
            }
            None
        }
        // Undecodable payloads are skipped: the config compiler reports them.
        _ => None,
    };
    if let Some(ctx) = common {
        out.insert(context_ref(&ctx, grpc_clusters));
    }
}

fn scan_listener(
    l: &Listener,
    grpc_clusters: &BTreeSet<String>,
    out: &mut BTreeSet<TlsContextRef>,
) {
    for chain in l.filter_chains.iter().chain(l.default_filter_chain.iter()) {
        if let Some(ts) = &chain.transport_socket {
            scan_transport_socket(ts, 0, grpc_clusters, out);
        }
    }
}

fn scan_cluster(c: &Cluster, grpc_clusters: &BTreeSet<String>, out: &mut BTreeSet<TlsContextRef>) {
    let matches = c
        .transport_socket_matches
        .iter()
        .filter_map(|m| m.transport_socket.as_ref());
    for ts in c.transport_socket.iter().chain(matches) {
        scan_transport_socket(ts, 0, grpc_clusters, out);
    }
}

/// The TLS contexts of every accepted listener and cluster, static (bootstrap) and dynamic.
pub fn scan_tls_contexts(server: &Server) -> Vec<TlsContextRef> {
    let grpc_clusters: BTreeSet<String> = server
        .bootstrap
        .grpc_clusters
        .iter()
        .map(|(n, _)| n.clone())
        .collect();
    let mut out = BTreeSet::new();
    if let Some(statics) = &server.bootstrap.bootstrap.static_resources {
        for l in &statics.listeners {
            scan_listener(l, &grpc_clusters, &mut out);
        }
        for c in &statics.clusters {
            scan_cluster(c, &grpc_clusters, &mut out);
        }
    }
    for kind in [ResourceKind::Listener, ResourceKind::Cluster] {
        let record = server.xds.record(kind);
        for any in record
            .resources
            .values()
            .filter_map(|e| e.resource.as_ref())
        {
            let bytes = any.value.as_slice();
            match kind {
                ResourceKind::Listener => Listener::decode(bytes)
                    .map(|l| scan_listener(&l, &grpc_clusters, &mut out))
                    .unwrap_or_default(),
                _ => Cluster::decode(bytes)
                    .map(|c| scan_cluster(&c, &grpc_clusters, &mut out))
                    .unwrap_or_default(),
            }
        }
    }
    out.into_iter().collect()
}

// ---------------------------------------------------------------------------------------------
// The client.

/// Runs the SDS client until the process exits: keeps one stream per subscribed secret.
pub async fn run(server: Arc<Server>, store: Arc<SecretStore>) {
    let targets: BTreeMap<String, GrpcTarget> =
        server.bootstrap.grpc_clusters.iter().cloned().collect();
    let pinned: Vec<(String, String)> = if targets.contains_key(SDS_CLUSTER) {
        vec![
            (SDS_CLUSTER.to_owned(), DEFAULT_SECRET.to_owned()),
            (SDS_CLUSTER.to_owned(), ROOT_SECRET.to_owned()),
        ]
    } else {
        Vec::new()
    };
    let mut streams: BTreeMap<String, (String, JoinHandle<()>)> = BTreeMap::new();
    let mut warned: BTreeSet<String> = BTreeSet::new();
    // Woken by each LDS/CDS response once it is recorded (several in a row coalesce): no polling
    // while the configuration does not change.
    let mut applied = server.lds_cds_applied.subscribe();
    loop {
        applied.borrow_and_update();
        // Decoding every listener and cluster is CPU work: keep it off the async workers.
        let contexts = {
            let server = server.clone();
            tokio::task::spawn_blocking(move || scan_tls_contexts(&server))
                .await
                .unwrap_or_default()
        };
        let mut wanted: BTreeMap<String, String> =
            pinned.iter().map(|(c, n)| (n.clone(), c.clone())).collect();
        for ctx in &contexts {
            for r in ctx.certificates.iter().chain(ctx.validation.iter()) {
                match &r.cluster {
                    Some(cluster) => {
                        wanted
                            .entry(r.name.clone())
                            .or_insert_with(|| cluster.clone());
                    }
                    None => {
                        if warned.insert(r.name.clone()) {
                            tracing::warn!(target: "sds", secret = %r.name, "secret is not served by a bootstrap gRPC cluster (ADS or file SDS sources are not supported); not subscribed");
                        }
                    }
                }
            }
        }
        store.contexts.store(Arc::new(contexts));
        let stale: Vec<String> = streams
            .iter()
            .filter(|(name, (cluster, _))| wanted.get(*name) != Some(cluster))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some((_, task)) = streams.remove(&name) {
                task.abort();
            }
            store.unsubscribe_name(&name);
            tracing::info!(target: "sds", secret = %name, "unsubscribed");
        }
        for (name, cluster) in wanted {
            if streams.contains_key(&name) {
                continue;
            }
            let Some(target) = targets.get(&cluster).cloned() else {
                continue;
            };
            store.subscribe_name(&name, &cluster);
            tracing::debug!(target: "sds", secret = %name, %cluster, "subscribing");
            let task = tokio::spawn(stream_secret(
                server.clone(),
                store.clone(),
                cluster.clone(),
                target,
                name.clone(),
            ));
            streams.insert(name, (cluster, task));
        }
        if applied.changed().await.is_err() {
            // The server (which holds the sender) is gone.
            return;
        }
    }
}

/// One secret's stream, reconnecting with capped backoff.
async fn stream_secret(
    server: Arc<Server>,
    store: Arc<SecretStore>,
    cluster: String,
    target: GrpcTarget,
    name: String,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        let mut session = Session {
            server: &server,
            store: &store,
            cluster: &cluster,
            name: &name,
            responses: 0,
        };
        let result = session.run(&target).await;
        if session.responses > 0 {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        server
            .stats
            .counter(&format!("sds.{name}.update_failure"))
            .inc();
        match result {
            Ok(()) | Err(SdsError::Closed) => {
                tracing::info!(target: "sds", secret = %name, retry_in_ms = delay.as_millis() as u64, "SDS stream closed by the server")
            }
            Err(err) => {
                tracing::warn!(target: "sds", secret = %name, attempt = backoff.attempts(), retry_in_ms = delay.as_millis() as u64, "SDS: {err}")
            }
        }
        tokio::time::sleep(delay).await;
    }
}

struct Session<'a> {
    server: &'a Server,
    store: &'a SecretStore,
    cluster: &'a str,
    name: &'a str,
    responses: u64,
}

impl Session<'_> {
    async fn run(&mut self, target: &GrpcTarget) -> Result<(), SdsError> {
        let channel = connect(target).await?;
        let mut client = SecretDiscoveryServiceClient::new(channel);
        let (tx, rx) = mpsc::channel::<DiscoveryRequest>(8);
        // Node on the first message only; the version we hold, so the server can skip a resend.
        tx.send(DiscoveryRequest {
            node: Some(self.server.bootstrap.node.clone()),
            version_info: self.store.accepted_version(self.name),
            resource_names: vec![self.name.to_owned()],
            type_url: SECRET_TYPE.to_owned(),
            ..Default::default()
        })
        .await
        .map_err(|_| SdsError::Closed)?;
        let mut stream = client
            .stream_secrets(ReceiverStream::new(rx))
            .await
            .map_err(|s| SdsError::Stream(Box::new(s)))?
            .into_inner();
        tracing::debug!(target: "sds", secret = %self.name, cluster = %self.cluster, "SDS stream open");
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Err(SdsError::Closed),
                Err(status) => return Err(SdsError::Stream(Box::new(status))),
            };
            self.responses += 1;
            let reply = self.apply(&resp);
            tx.send(reply).await.map_err(|_| SdsError::Closed)?;
        }
    }

    /// Checks one response as Envoy's `SdsApi::onConfigUpdate` does and returns the ACK or NACK.
    fn apply(&self, resp: &DiscoveryResponse) -> DiscoveryRequest {
        let stats = &self.server.stats;
        let prefix = format!("sds.{}", self.name);
        stats.counter(&format!("{prefix}.update_attempt")).inc();
        let mut reply = DiscoveryRequest {
            resource_names: vec![self.name.to_owned()],
            type_url: SECRET_TYPE.to_owned(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        };
        match self.check(resp) {
            Ok(secret) => {
                let fresh = self.store.accepted_version(self.name) != resp.version_info
                    || self.store.get(self.name).as_deref() != Some(&secret);
                if fresh {
                    self.store
                        .accept(self.name, self.cluster, &resp.version_info, secret);
                    tracing::info!(target: "sds", secret = %self.name, version = %resp.version_info, "secret updated");
                }
                stats.counter(&format!("{prefix}.update_success")).inc();
                stats.gauge(&format!("{prefix}.update_time")).set(
                    SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or_default(),
                );
                stats
                    .gauge(&format!("{prefix}.version"))
                    .set(version_hash(&resp.version_info));
                reply.version_info = resp.version_info.clone();
            }
            Err(message) => {
                stats.counter(&format!("{prefix}.update_rejected")).inc();
                tracing::warn!(target: "sds", secret = %self.name, version = %resp.version_info, "NACK: {message}");
                self.store
                    .reject(self.name, self.cluster, &resp.version_info, &message);
                reply.version_info = self.store.accepted_version(self.name);
                reply.error_detail = Some(RpcStatus {
                    code: NACK_CODE,
                    message,
                    details: vec![],
                });
            }
        }
        reply
    }

    fn check(&self, resp: &DiscoveryResponse) -> Result<Secret, String> {
        if resp.type_url != SECRET_TYPE {
            return Err(format!(
                "Secret '{}': response type_url {} is not {SECRET_TYPE}",
                self.name, resp.type_url
            ));
        }
        if resp.resources.len() != 1 {
            return Err(format!(
                "Secret '{}': unexpected SDS secrets length: {} (want exactly the requested secret)",
                self.name,
                resp.resources.len()
            ));
        }
        let any = &resp.resources[0];
        if any.type_url != SECRET_TYPE {
            return Err(format!(
                "Secret '{}': resource type_url {} is not {SECRET_TYPE}",
                self.name, any.type_url
            ));
        }
        let secret = Secret::decode(any.value.as_slice())
            .map_err(|e| format!("Secret '{}': does not decode: {e}", self.name))?;
        if secret.name != self.name {
            return Err(format!(
                "Secret '{}': unexpected SDS secret '{}' (expecting '{}')",
                self.name, secret.name, self.name
            ));
        }
        validate_secret(&secret).map_err(|e| format!("Secret '{}': {e}", self.name))?;
        Ok(secret)
    }
}

/// Envoy's `version` gauge: a hash of the version text.
fn version_hash(version: &str) -> u64 {
    version.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) >> 11
}

#[cfg(test)]
mod tests {
    use super::*;
    use waypoint_proto::envoy::extensions::transport_sockets::tls::v3::{
        CertificateValidationContext, TlsCertificate,
    };
    use waypoint_proto::google::protobuf::Any;

    fn inline(s: &str) -> Option<DataSource> {
        Some(DataSource {
            specifier: Some(Specifier::InlineBytes(s.as_bytes().to_vec())),
            ..Default::default()
        })
    }

    /// A fixed self-signed P-256 pair (generated once with openssl) keeps the test hermetic.
    fn self_signed() -> (String, String) {
        (TEST_CERT.to_owned(), TEST_KEY.to_owned())
    }

    const TEST_CERT: &str = include_str!("../../tests/data/test-cert.pem");
    const TEST_KEY: &str = include_str!("../../tests/data/test-key.pem");

    /// A transport socket of `type_name` around `msg`.
    fn socket(type_name: &str, msg: &impl prost::Message) -> TransportSocket {
        TransportSocket {
            name: "ts".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(Any {
                type_url: format!("{}{type_name}", json::TYPE_URL_PREFIX),
                value: msg.encode_to_vec(),
            })),
        }
    }

    /// TLS contexts naming `cert` (from the `sds-grpc` cluster) and `ca` (from nowhere we follow).
    fn common(cert: &str, ca: &str) -> CommonTlsContext {
        use waypoint_proto::envoy::config::core::v3::{ApiConfigSource, GrpcService, grpc_service};
        let from_grpc = ConfigSource {
            config_source_specifier: Some(ConfigSourceSpecifier::ApiConfigSource(
                ApiConfigSource {
                    grpc_services: vec![GrpcService {
                        target_specifier: Some(TargetSpecifier::EnvoyGrpc(
                            grpc_service::EnvoyGrpc {
                                cluster_name: SDS_CLUSTER.into(),
                                ..Default::default()
                            },
                        )),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![SdsSecretConfig {
                name: cert.into(),
                sds_config: Some(from_grpc),
            }],
            validation_context_type: Some(ValidationContextType::ValidationContextSdsSecretConfig(
                SdsSecretConfig {
                    name: ca.into(),
                    sds_config: None,
                },
            )),
            ..Default::default()
        }
    }

    #[test]
    fn scan_finds_tls_contexts_through_wrappers_and_matches() {
        use waypoint_proto::envoy::config::{
            cluster::v3::cluster::TransportSocketMatch, listener::v3::FilterChain,
        };
        let grpc: BTreeSet<String> = [SDS_CLUSTER.to_owned()].into();
        let downstream = DownstreamTlsContext {
            common_tls_context: Some(common("server-cert", "server-ca")),
            ..Default::default()
        };
        let listener = Listener {
            filter_chains: vec![FilterChain::default()],
            default_filter_chain: Some(FilterChain {
                transport_socket: Some(socket(DOWNSTREAM_TLS_CONTEXT, &downstream)),
                ..Default::default()
            }),
            ..Default::default()
        };
        let upstream = |cert: &str| UpstreamTlsContext {
            common_tls_context: Some(common(cert, "ROOTCA")),
            ..Default::default()
        };
        let wrapped = InternalUpstreamTransport {
            transport_socket: Some(socket(UPSTREAM_TLS_CONTEXT, &upstream("wrapped"))),
            ..Default::default()
        };
        let cluster = Cluster {
            transport_socket: Some(socket(INTERNAL_UPSTREAM, &wrapped)),
            transport_socket_matches: vec![TransportSocketMatch {
                transport_socket: Some(socket(UPSTREAM_TLS_CONTEXT, &upstream("matched"))),
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut out = BTreeSet::new();
        scan_listener(&listener, &grpc, &mut out);
        scan_cluster(&cluster, &grpc, &mut out);
        let certs: Vec<(String, Option<String>)> = out
            .iter()
            .flat_map(|c| c.certificates.iter())
            .map(|r| (r.name.clone(), r.cluster.clone()))
            .collect();
        let sds = Some(SDS_CLUSTER.to_owned());
        assert_eq!(
            certs,
            [
                ("matched".to_owned(), sds.clone()),
                ("server-cert".to_owned(), sds.clone()),
                ("wrapped".to_owned(), sds),
            ]
        );
        let cas: BTreeSet<_> = out.iter().filter_map(|c| c.validation.clone()).collect();
        assert!(cas.iter().all(|r| r.cluster.is_none()), "{cas:?}");
        assert_eq!(cas.len(), 2, "server-ca and ROOTCA: {cas:?}");
    }

    #[test]
    fn validation_names_the_field() {
        let (cert, key) = self_signed();
        let good = Secret {
            name: "default".into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline(&cert),
                private_key: inline(&key),
                ..Default::default()
            })),
        };
        assert_eq!(validate_secret(&good), Ok(()));

        let mut no_key = good.clone();
        if let Some(secret::Type::TlsCertificate(t)) = &mut no_key.r#type {
            t.private_key = None;
        }
        let err = validate_secret(&no_key).expect_err("no key");
        assert_eq!(err.field, "tls_certificate.private_key");

        let mut bad_chain = good.clone();
        if let Some(secret::Type::TlsCertificate(t)) = &mut bad_chain.r#type {
            t.certificate_chain = inline("not a pem");
        }
        let err = validate_secret(&bad_chain).expect_err("bad chain");
        assert_eq!(err.field, "tls_certificate.certificate_chain");

        let root = Secret {
            name: "ROOTCA".into(),
            r#type: Some(secret::Type::ValidationContext(
                CertificateValidationContext {
                    trusted_ca: inline("garbage"),
                    ..Default::default()
                },
            )),
        };
        let err = validate_secret(&root).expect_err("bad root");
        assert_eq!(err.field, "validation_context.trusted_ca");
        assert!(validate_secret(&Secret::default()).is_err());
    }

    #[test]
    fn redaction_hides_keys_only() {
        let (cert, key) = self_signed();
        let s = Secret {
            name: "default".into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline(&cert),
                private_key: inline(&key),
                ..Default::default()
            })),
        };
        let r = redacted(&s);
        let Some(secret::Type::TlsCertificate(t)) = &r.r#type else {
            panic!("type changed")
        };
        assert_eq!(
            t.private_key.as_ref().and_then(|d| d.specifier.clone()),
            Some(Specifier::InlineBytes(REDACTED.as_bytes().to_vec()))
        );
        assert_eq!(t.certificate_chain, inline(&cert));
        let text = format!("{r:?}");
        assert!(!text.contains("PRIVATE KEY"), "{text}");
    }

    #[test]
    fn finds_the_reference_waypoint_secrets() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/istio/waypoint_xds_reconstructed_example.yaml"
        ))
        .expect("fixture");
        let doc = json::yaml_to_json(&text).expect("yaml");
        let clusters: BTreeSet<String> = [SDS_CLUSTER.to_owned()].into();
        let mut out = BTreeSet::new();
        for item in doc["listeners"].as_array().expect("list") {
            let l: Listener = json::from_json(item).expect("listener parses");
            scan_listener(&l, &clusters, &mut out);
        }
        for item in doc["clusters"].as_array().expect("list") {
            let c: Cluster = json::from_json(item).expect("cluster parses");
            scan_cluster(&c, &clusters, &mut out);
        }
        let want = TlsContextRef {
            certificates: vec![SecretRef {
                name: "default".into(),
                cluster: Some(SDS_CLUSTER.into()),
            }],
            validation: Some(SecretRef {
                name: "ROOTCA".into(),
                cluster: Some(SDS_CLUSTER.into()),
            }),
        };
        assert_eq!(out.into_iter().collect::<Vec<_>>(), vec![want]);
    }
}
