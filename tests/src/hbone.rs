//! HBONE workloads: what ztunnel does for the pods of an ambient mesh, small enough for tests.
//!
//! * [`WorkloadIdentity`]: a workload certificate for `spiffe://<td>/ns/<ns>/sa/<sa>`, issued by
//!   istiod-lite (or istiod) over gRPC/TLS (`IstioCertificateService/CreateCertificate` with a bearer
//!   token and `ClusterID`), or read from PEM files.
//! * TLS as ztunnel speaks it: TLS 1.3 only, mutual, ALPN `h2`, no SNI. Peers are checked against the
//!   mesh root with webpki, and by their SPIFFE URI SAN ([`PeerMatch`]) instead of DNS/IP names.
//! * [`HbonePool`]: pooled HTTP/2 connections per (destination, source identity), many classic
//!   `CONNECT` streams per connection, within the server's `max_concurrent_streams`.
//! * [`HboneForwarder`] (source side, ztunnel outbound for a client pod): local TCP in, one HBONE
//!   `CONNECT` stream per accepted connection out, with `forwarded`, `traceparent` and (optionally)
//!   `baggage` headers.
//! * [`HboneSink`] (destination side, ztunnel inbound on `podIP:15008`): terminates HBONE, connects
//!   each `CONNECT` to the app and records who asked for what ([`AcceptedStream`]).
//!
//! Bytes are copied with backpressure in both directions: a tunnel holds at most one read chunk
//! plus what HTTP/2 flow control lets the peer have in flight, never a whole body.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    future::poll_fn,
    io::{self, Write as _},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    server::{
        ParsedCertificate, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::{JoinHandle, JoinSet},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use waypoint_proto::istio::ca::{
    IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
};
use waypoint_shared::{identity::SpiffeId, pem};

/// The HBONE port (`HBoneInboundListenPort`).
pub const HBONE_PORT: u16 = 15008;
/// `max_concurrent_streams` of an [`HboneSink`] unless configured (Envoy's `connect_terminate`).
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 100;
/// HTTP/2 stream receive window.
const STREAM_WINDOW: u32 = 1 << 20;
/// HTTP/2 connection receive window.
const CONNECTION_WINDOW: u32 = 4 << 20;
/// Largest read from a TCP socket into a tunnel.
const CHUNK: usize = 64 * 1024;
/// How many TLS handshake errors an [`HboneSink`] remembers.
pub const MAX_HANDSHAKE_ERRORS: usize = 100;
/// Back-off after a failed `accept` (typically out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Errors of the HBONE workloads.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    /// A socket or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// Certificate or key material is unusable.
    #[error("certificate material: {0}")]
    Pem(#[from] pem::PemError),
    /// Key or CSR generation failed.
    #[error("key/CSR generation: {0}")]
    Keygen(#[from] rcgen::Error),
    /// The workload certificate carries no SPIFFE identity.
    #[error("certificate has no spiffe:// URI SAN")]
    NoSpiffeId,
    /// TLS configuration failed.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The CA could not be reached or refused the request.
    #[error("CA {addr}: {reason}")]
    Ca {
        /// CA address.
        addr: String,
        /// What failed.
        reason: String,
    },
    /// The peer did not negotiate ALPN `h2`.
    #[error("{0} did not negotiate ALPN h2")]
    Alpn(SocketAddr),
    /// HTTP/2 failed.
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    /// A request could not be built.
    #[error("HTTP: {0}")]
    Http(#[from] http::Error),
    /// Something took too long.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What was being waited for.
        what: String,
        /// The limit.
        after: Duration,
    },
    /// A setting or argument is invalid.
    #[error("invalid {what} '{value}': {reason}")]
    Invalid {
        /// Which setting.
        what: &'static str,
        /// The value given.
        value: String,
        /// Why it is invalid.
        reason: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> HboneError {
    let what = what.into();
    move |source| HboneError::Io { what, source }
}

fn timeout_err(what: impl Into<String>, after: Duration) -> HboneError {
    HboneError::Timeout {
        what: what.into(),
        after,
    }
}

// ---------------------------------------------------------------------------------------------
// Identities
// ---------------------------------------------------------------------------------------------

/// A workload's mesh identity: its certificate chain and key, and the roots it trusts for peers.
pub struct WorkloadIdentity {
    spiffe_id: String,
    chain: Vec<CertificateDer<'static>>,
    chain_pem: String,
    key_pem: String,
    root_pem: String,
    roots: Arc<RootCertStore>,
}

impl fmt::Debug for WorkloadIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadIdentity")
            .field("spiffe_id", &self.spiffe_id)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl WorkloadIdentity {
    /// Builds an identity from a PEM chain (leaf first), its private key and the PEM roots trusted
    /// for peers. The leaf must carry a `spiffe://` URI SAN.
    pub fn from_pem(chain_pem: &str, key_pem: &str, root_pem: &str) -> Result<Self, HboneError> {
        let chain = pem::certs(chain_pem)?;
        pem::private_key(key_pem)?;
        let mut roots = RootCertStore::empty();
        for root in pem::certs(root_pem)? {
            roots.add(root)?;
        }
        let spiffe_id = peer_spiffe_id(&chain[0]).ok_or(HboneError::NoSpiffeId)?;
        Ok(WorkloadIdentity {
            spiffe_id,
            chain,
            chain_pem: chain_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            root_pem: root_pem.to_owned(),
            roots: Arc::new(roots),
        })
    }

    /// Reads the chain, key and roots from PEM files.
    pub fn from_files(cert: &Path, key: &Path, root: &Path) -> Result<Self, HboneError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(io_err(format!("reading {}", path.display())))
        };
        Self::from_pem(&read(cert)?, &read(key)?, &read(root)?)
    }

    /// Asks the Istio CA (istiod-lite or istiod) for a certificate, as pilot-agent does: a fresh
    /// ECDSA P-256 key, a CSR with the SPIFFE URI SAN, `CreateCertificate` over TLS with
    /// `authorization: Bearer <token>` and `ClusterID`. The mesh root is the chain's last element.
    pub async fn from_istiod(request: &IstiodRequest) -> Result<Self, HboneError> {
        let addr = request.addr.to_string();
        let ca_err = |reason: String| HboneError::Ca {
            addr: addr.clone(),
            reason,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let uri = request.identity.uri();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri.clone().try_into()?)];
        let csr = params.serialize_request(&key)?.pem()?;

        let channel = tokio::time::timeout(
            request.timeout,
            crate::istiod_lite::connect(request.addr, &request.ca_root_pem),
        )
        .await
        .map_err(|_| timeout_err(format!("connecting to the CA at {addr}"), request.timeout))?
        .map_err(|e| ca_err(format!("connect: {e}")))?;
        let token = request.token.clone().unwrap_or_else(|| {
            crate::istiod_lite::mint_token(
                &request.identity.namespace,
                &request.identity.service_account,
                Duration::from_secs(3600),
            )
        });
        let mut call = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(request.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: None,
        });
        call.set_timeout(request.timeout);
        let bearer = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|e| ca_err(format!("token is not a valid header value: {e}")))?;
        call.metadata_mut().insert("authorization", bearer);
        let cluster = request
            .cluster_id
            .parse()
            .map_err(|e| ca_err(format!("cluster id is not a valid header value: {e}")))?;
        call.metadata_mut().insert("clusterid", cluster);
        let chain = tokio::time::timeout(
            request.timeout,
            IstioCertificateServiceClient::new(channel).create_certificate(call),
        )
        .await
        .map_err(|_| timeout_err(format!("CreateCertificate at {addr}"), request.timeout))?
        .map_err(|status| ca_err(format!("CreateCertificate: {status}")))?
        .into_inner()
        .cert_chain;
        if chain.len() < 2 {
            return Err(ca_err(format!(
                "cert_chain has {} element(s); want leaf ... root",
                chain.len()
            )));
        }
        let mut chain_pem = String::new();
        for element in &chain {
            chain_pem.push_str(element.trim_end());
            chain_pem.push('\n');
        }
        let root_pem = chain
            .last()
            .map(|r| format!("{}\n", r.trim_end()))
            .unwrap_or_default();
        let identity = Self::from_pem(&chain_pem, &key.serialize_pem(), &root_pem)?;
        if identity.spiffe_id != uri {
            return Err(ca_err(format!(
                "issued {} instead of {uri}",
                identity.spiffe_id
            )));
        }
        Ok(identity)
    }

    /// The SPIFFE identity in the leaf (`spiffe://<td>/ns/<ns>/sa/<sa>`).
    pub fn spiffe_id(&self) -> &str {
        &self.spiffe_id
    }

    /// `spiffe://<td>/`: the trust domain prefix of this identity.
    pub fn trust_domain_prefix(&self) -> String {
        trust_domain_prefix(&self.spiffe_id)
    }

    /// The chain, PEM, leaf first.
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }

    /// The private key, PEM.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The trusted roots, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>, HboneError> {
        Ok(pem::private_key(&self.key_pem)?)
    }

    /// Client TLS as ztunnel dials HBONE: TLS 1.3 only, this identity's certificate, ALPN `h2`, no
    /// SNI; the server chain is verified against the roots and its URI SAN against `expect`.
    pub fn client_config(&self, expect: &PeerMatch) -> Result<Arc<ClientConfig>, HboneError> {
        let provider = provider();
        let verifier = SpiffeServerVerifier {
            roots: self.roots.clone(),
            expect: expect.clone(),
            algorithms: provider.signature_verification_algorithms,
        };
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(self.chain.clone(), self.key()?)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.enable_sni = false;
        Ok(Arc::new(config))
    }

    /// Server TLS as ztunnel terminates HBONE: TLS 1.3 only, ALPN `h2`, client certificates
    /// required and verified against the roots, then their URI SAN against `allow`.
    pub fn server_config(&self, allow: &PeerMatch) -> Result<Arc<ServerConfig>, HboneError> {
        let provider = provider();
        let inner =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                .build()?;
        let verifier = SpiffeClientVerifier {
            inner,
            allow: allow.clone(),
        };
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_single_cert(self.chain.clone(), self.key()?)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// How to ask the Istio CA for a workload certificate.
#[derive(Debug, Clone)]
pub struct IstiodRequest {
    /// The CA's gRPC/TLS address (istiod's `:15012`).
    pub addr: SocketAddr,
    /// PEM root trusted for the CA's serving certificate (name `istiod.istio-system.svc`).
    pub ca_root_pem: String,
    /// The identity asked for.
    pub identity: SpiffeId,
    /// Bearer token; `None` mints a dev token for the identity (see
    /// [`mint_token`](crate::istiod_lite::mint_token)), which istiod-lite accepts with
    /// `--accept-any-token`.
    pub token: Option<String>,
    /// The `ClusterID` header.
    pub cluster_id: String,
    /// Requested certificate lifetime.
    pub ttl: Duration,
    /// Deadline for connecting and for the call.
    pub timeout: Duration,
}

impl IstiodRequest {
    /// A request for `identity` with a minted token, cluster `Kubernetes`, 24h TTL, 10s deadline.
    pub fn new(addr: SocketAddr, ca_root_pem: &str, identity: SpiffeId) -> Self {
        IstiodRequest {
            addr,
            ca_root_pem: ca_root_pem.to_owned(),
            identity,
            token: None,
            cluster_id: "Kubernetes".to_owned(),
            ttl: Duration::from_secs(24 * 3600),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Which peer identities are acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMatch {
    /// Any identity the roots vouch for.
    Any,
    /// Exactly this SPIFFE id.
    Exact(String),
    /// Any SPIFFE id starting with this prefix (e.g. `spiffe://cluster.local/`).
    Prefix(String),
}

impl PeerMatch {
    /// Any identity of trust domain `td`.
    pub fn trust_domain(td: &str) -> Self {
        PeerMatch::Prefix(format!("spiffe://{td}/"))
    }

    /// Whether `id` is acceptable.
    pub fn matches(&self, id: &str) -> bool {
        match self {
            PeerMatch::Any => true,
            PeerMatch::Exact(want) => id == want,
            PeerMatch::Prefix(prefix) => id.starts_with(prefix.as_str()),
        }
    }
}

impl FromStr for PeerMatch {
    type Err = HboneError;

    /// `*` → any; `spiffe://…/` (trailing slash) → prefix; other `spiffe://…` → exact.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "*" {
            Ok(PeerMatch::Any)
        } else if !s.starts_with("spiffe://") || s.len() <= "spiffe://".len() {
            Err(HboneError::Invalid {
                what: "peer identity",
                value: s.to_owned(),
                reason: "want *, a spiffe:// id, or a spiffe://…/ prefix".to_owned(),
            })
        } else if s.ends_with('/') {
            Ok(PeerMatch::Prefix(s.to_owned()))
        } else {
            Ok(PeerMatch::Exact(s.to_owned()))
        }
    }
}

impl fmt::Display for PeerMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerMatch::Any => f.write_str("*"),
            PeerMatch::Exact(id) => f.write_str(id),
            PeerMatch::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

/// The first `spiffe://` URI SAN of a DER certificate.
pub fn peer_spiffe_id(der: &CertificateDer<'_>) -> Option<String> {
    pem::cert_info(der.as_ref())
        .ok()?
        .uri_sans
        .into_iter()
        .find(|uri| uri.starts_with("spiffe://"))
}

fn trust_domain_prefix(spiffe_id: &str) -> String {
    let rest = spiffe_id.strip_prefix("spiffe://").unwrap_or(spiffe_id);
    let td = rest.split('/').next().unwrap_or_default();
    format!("spiffe://{td}/")
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a peer certificate's identity was refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct PeerRefused(String);

fn check_peer(end_entity: &CertificateDer<'_>, want: &PeerMatch) -> Result<(), rustls::Error> {
    let refuse = |msg: String| {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            Arc::new(PeerRefused(msg)),
        )))
    };
    let id = peer_spiffe_id(end_entity)
        .ok_or_else(|| refuse("peer certificate has no spiffe:// URI SAN".to_owned()))?;
    if want.matches(&id) {
        Ok(())
    } else {
        Err(refuse(format!("peer identity {id} is not {want}")))
    }
}

/// Verifies the server chain against the mesh roots and its SPIFFE URI SAN against a
/// [`PeerMatch`], ignoring the server name (HBONE dials IPs and sends no SNI), as ztunnel does.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expect: PeerMatch,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        check_peer(end_entity, &self.expect)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// webpki client-certificate verification, then the SPIFFE URI SAN against a [`PeerMatch`].
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allow: PeerMatch,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_peer(end_entity, &self.allow)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

// ---------------------------------------------------------------------------------------------
// Command-line identity options
// ---------------------------------------------------------------------------------------------

/// Command-line options choosing a workload identity (shared by `hbone-forward` and `hbone-sink`):
/// either `--identity-from [istiod-lite] ADDR --ca-root PEM --namespace NS --service-account SA`, or
/// `--cert PEM --key PEM --root PEM`.
#[derive(Debug, Clone, clap::Args)]
pub struct IdentityArgs {
    /// Get a certificate from the Istio CA at ADDR (istiod-lite or istiod, gRPC/TLS). An optional
    /// first value names the kind: `--identity-from istiod-lite 127.0.0.1:15012`.
    #[arg(long, value_name = "[KIND] ADDR", num_args = 1..=2, conflicts_with_all = ["cert", "key", "root"])]
    pub identity_from: Vec<String>,
    /// PEM root trusted for the CA's serving certificate (istiod-lite's `root-cert.pem`).
    #[arg(long, value_name = "PEM")]
    pub ca_root: Option<PathBuf>,
    /// Namespace of the identity.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Service account of the identity.
    #[arg(long, default_value = "default")]
    pub service_account: String,
    /// Trust domain of the identity.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// `ClusterID` sent to the CA.
    #[arg(long, default_value = "Kubernetes")]
    pub cluster_id: String,
    /// File holding the bearer token for the CA (default: a minted dev token, which istiod-lite
    /// accepts with `--accept-any-token`).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Certificate chain (PEM, leaf first) to use instead of asking a CA.
    #[arg(long, value_name = "PEM", requires_all = ["key", "root"])]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of `--cert`.
    #[arg(long, value_name = "PEM", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Roots (PEM) trusted for peers, with `--cert`.
    #[arg(long, value_name = "PEM", requires = "cert")]
    pub root: Option<PathBuf>,
}

impl IdentityArgs {
    /// The identity these options describe.
    pub async fn load(&self) -> Result<WorkloadIdentity, HboneError> {
        if let (Some(cert), Some(key), Some(root)) = (&self.cert, &self.key, &self.root) {
            return WorkloadIdentity::from_files(cert, key, root);
        }
        let invalid = |value: String, reason: &str| HboneError::Invalid {
            what: "--identity-from",
            value,
            reason: reason.to_owned(),
        };
        let addr = match self.identity_from.as_slice() {
            [addr] => addr,
            [kind, addr] if kind == "istiod-lite" || kind == "istiod" => addr,
            [kind, _] => return Err(invalid(kind.clone(), "kind must be istiod-lite or istiod")),
            _ => {
                return Err(HboneError::Invalid {
                    what: "identity options",
                    value: "none given".to_owned(),
                    reason: "give --identity-from [istiod-lite] ADDR or --cert/--key/--root"
                        .to_owned(),
                });
            }
        };
        let resolved = tokio::net::lookup_host(addr.as_str())
            .await
            .map_err(|e| invalid(addr.clone(), &e.to_string()))?
            .next()
            .ok_or_else(|| invalid(addr.clone(), "resolves to no address"))?;
        let Some(ca_root) = &self.ca_root else {
            return Err(invalid(addr.clone(), "--ca-root is required with it"));
        };
        let ca_root_pem = std::fs::read_to_string(ca_root)
            .map_err(io_err(format!("reading {}", ca_root.display())))?;
        let mut request = IstiodRequest::new(
            resolved,
            &ca_root_pem,
            SpiffeId::new(&self.trust_domain, &self.namespace, &self.service_account),
        );
        request.cluster_id = self.cluster_id.clone();
        if let Some(path) = &self.token_file {
            request.token = Some(
                std::fs::read_to_string(path)
                    .map_err(io_err(format!("reading {}", path.display())))?
                    .trim()
                    .to_owned(),
            );
        }
        WorkloadIdentity::from_istiod(&request).await
    }
}

// ---------------------------------------------------------------------------------------------
// Byte copying with backpressure
// ---------------------------------------------------------------------------------------------

/// Copies `reader` into `send` until EOF, then ends the stream. Each chunk is sent only as the
/// peer's flow-control window allows, so at most one chunk is held here.
async fn copy_into_h2<R: AsyncRead + Unpin>(
    mut reader: R,
    send: &mut SendStream<Bytes>,
) -> Result<u64, HboneError> {
    let mut total = 0u64;
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(CHUNK);
        let n = reader
            .read_buf(&mut buf)
            .await
            .map_err(io_err("reading from the local side"))?;
        if n == 0 {
            send.send_data(Bytes::new(), true)?;
            return Ok(total);
        }
        total += n as u64;
        let mut data = buf.split().freeze();
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(granted) => granted?,
                None => {
                    return Err(HboneError::Io {
                        what: "sending into the tunnel".to_owned(),
                        source: io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"),
                    });
                }
            };
            if granted == 0 {
                continue;
            }
            let chunk = data.split_to(granted.min(data.len()));
            send.send_data(chunk, false)?;
        }
    }
}

/// Copies the stream's data into `writer`, releasing flow-control capacity only once written;
/// shuts `writer` down at the end of the stream.
async fn copy_from_h2<W: AsyncWrite + Unpin>(
    mut recv: RecvStream,
    mut writer: W,
) -> Result<u64, HboneError> {
    let mut total = 0u64;
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        writer
            .write_all(&chunk)
            .await
            .map_err(io_err("writing to the local side"))?;
        total += chunk.len() as u64;
        recv.flow_control().release_capacity(chunk.len())?;
    }
    writer
        .shutdown()
        .await
        .map_err(io_err("closing the local side"))?;
    Ok(total)
}

/// Joins `io` and an HTTP/2 stream: bytes both ways, half-closes passed on. Returns the bytes sent
/// into and received from the stream. On failure the stream is reset.
async fn pipe<S: AsyncRead + AsyncWrite>(
    io: S,
    mut send: SendStream<Bytes>,
    recv: RecvStream,
) -> Result<(u64, u64), HboneError> {
    let (reader, writer) = tokio::io::split(io);
    let result = tokio::try_join!(copy_into_h2(reader, &mut send), copy_from_h2(recv, writer));
    if result.is_err() {
        send.send_reset(Reason::CANCEL);
    }
    result
}

// ---------------------------------------------------------------------------------------------
// Client pool
// ---------------------------------------------------------------------------------------------

/// Settings of the HTTP/2 connections an [`HbonePool`] opens.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Deadline for TCP + TLS + HTTP/2 set-up, and separately for each `CONNECT` answer.
    pub connect_timeout: Duration,
    /// Local cap on concurrent streams per connection (the server's `max_concurrent_streams`
    /// applies too).
    pub max_streams_per_connection: usize,
    /// The source address of outgoing connections (a pod's IP, as ztunnel keeps it), or the
    /// kernel's choice.
    pub source_ip: Option<IpAddr>,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            connect_timeout: Duration::from_secs(10),
            max_streams_per_connection: usize::MAX,
            source_ip: None,
        }
    }
}

/// Client TLS for one source identity, with the check applied to servers.
#[derive(Debug, Clone)]
pub struct ClientTls {
    identity: String,
    config: Arc<ClientConfig>,
}

impl ClientTls {
    /// TLS presenting `identity`, accepting servers matching `expect`.
    pub fn new(identity: &WorkloadIdentity, expect: &PeerMatch) -> Result<Self, HboneError> {
        Ok(ClientTls {
            identity: identity.spiffe_id().to_owned(),
            config: identity.client_config(expect)?,
        })
    }

    /// The source identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The rustls configuration.
    pub fn config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    /// Dials `dest` and completes the TLS handshake (checking ALPN `h2`).
    pub async fn connect(
        &self,
        dest: SocketAddr,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, HboneError> {
        self.connect_from(dest, None).await
    }

    /// [`ClientTls::connect`] from `source` (the kernel's choice when `None`).
    pub async fn connect_from(
        &self,
        dest: SocketAddr,
        source: Option<IpAddr>,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, HboneError> {
        let tcp = match source {
            None => TcpStream::connect(dest).await,
            Some(ip) => {
                let socket = if ip.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()
                } else {
                    tokio::net::TcpSocket::new_v6()
                }
                .map_err(io_err(format!("socket for {dest}")))?;
                socket
                    .bind(SocketAddr::new(ip, 0))
                    .map_err(io_err(format!("binding {ip} to reach {dest}")))?;
                socket.connect(dest).await
            }
        }
        .map_err(io_err(format!("connecting to {dest}")))?;
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(%err, "setting TCP_NODELAY failed");
        }
        let tls = TlsConnector::from(self.config.clone())
            .connect(ServerName::IpAddress(dest.ip().into()), tcp)
            .await
            .map_err(io_err(format!("TLS handshake with {dest}")))?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2".as_slice()) {
            return Err(HboneError::Alpn(dest));
        }
        Ok(tls)
    }
}

/// Counters of an [`HbonePool`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PoolStats {
    /// HTTP/2 connections opened.
    pub connections: u64,
    /// `CONNECT` streams that got an answer (any status).
    pub streams: u64,
}

#[derive(Debug, Hash, PartialEq, Eq)]
struct PoolKey {
    destination: SocketAddr,
    identity: String,
}

struct PooledConn {
    id: u64,
    send: h2::client::SendRequest<Bytes>,
    in_flight: AtomicUsize,
    closed: Arc<AtomicBool>,
    local_max: usize,
}

impl PooledConn {
    fn is_open(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }

    fn try_reserve(self: &Arc<Self>) -> Option<StreamSlot> {
        let cap = self.send.current_max_send_streams().min(self.local_max);
        let mut current = self.in_flight.load(Ordering::Acquire);
        loop {
            if current >= cap {
                return None;
            }
            match self.in_flight.compare_exchange(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(StreamSlot { conn: self.clone() }),
                Err(seen) => current = seen,
            }
        }
    }
}

/// One stream's share of a pooled connection, given back on drop.
struct StreamSlot {
    conn: Arc<PooledConn>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.conn.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

type ConnList = Arc<tokio::sync::Mutex<Vec<Arc<PooledConn>>>>;

struct PoolInner {
    settings: PoolSettings,
    keys: Mutex<HashMap<PoolKey, ConnList>>,
    next_id: AtomicU64,
    connections: AtomicU64,
    streams: AtomicU64,
}

/// HBONE client connections, pooled per (destination, source identity) as ztunnel pools them:
/// one HTTP/2 connection carries many `CONNECT` streams; another is opened when all are at the
/// server's `max_concurrent_streams` (or the local cap). Cheap to clone.
#[derive(Clone)]
pub struct HbonePool {
    inner: Arc<PoolInner>,
}

impl fmt::Debug for HbonePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HbonePool")
            .field("settings", &self.inner.settings)
            .field("stats", &self.stats())
            .finish()
    }
}

/// A `CONNECT` stream that got its answer. With status 200 the tunnel is up: [`HboneStream::pipe`]
/// joins it to a socket.
pub struct HboneStream {
    /// The answer's status.
    pub status: StatusCode,
    /// The answer's headers.
    pub headers: HeaderMap,
    /// Which pooled connection carries it (ids count from 0 per pool).
    pub connection_id: u64,
    send: SendStream<Bytes>,
    recv: RecvStream,
    _slot: StreamSlot,
}

impl fmt::Debug for HboneStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HboneStream")
            .field("status", &self.status)
            .field("connection_id", &self.connection_id)
            .finish_non_exhaustive()
    }
}

impl HboneStream {
    /// Copies bytes between `io` and the tunnel until both directions end. Returns (bytes sent
    /// into the tunnel, bytes received from it).
    pub async fn pipe<S: AsyncRead + AsyncWrite>(self, io: S) -> Result<(u64, u64), HboneError> {
        let HboneStream {
            send,
            recv,
            _slot: slot,
            ..
        } = self;
        let result = pipe(io, send, recv).await;
        drop(slot);
        result
    }
}

impl HbonePool {
    /// An empty pool.
    pub fn new(settings: PoolSettings) -> Self {
        HbonePool {
            inner: Arc::new(PoolInner {
                settings,
                keys: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                connections: AtomicU64::new(0),
                streams: AtomicU64::new(0),
            }),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            connections: self.inner.connections.load(Ordering::Relaxed),
            streams: self.inner.streams.load(Ordering::Relaxed),
        }
    }

    /// Sends a classic `CONNECT` (only `:method` and `:authority`) for `authority` with `headers`
    /// to `dest`, on a pooled connection for `tls`'s identity, and waits for the answer. A
    /// connection that turns out dead (GOAWAY, I/O error, refused stream) is retried once on a
    /// fresh one.
    pub async fn connect(
        &self,
        dest: SocketAddr,
        tls: &ClientTls,
        authority: &str,
        headers: &HeaderMap,
    ) -> Result<HboneStream, HboneError> {
        let uri = connect_uri(authority)?;
        let limit = self.inner.settings.connect_timeout;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let slot = self.acquire(dest, tls).await?;
            let mut request = Request::builder()
                .method(Method::CONNECT)
                .uri(uri.clone())
                .body(())?;
            *request.headers_mut() = headers.clone();
            let conn = slot.conn.clone();
            let exchange = async {
                let mut sender = conn.send.clone().ready().await?;
                let (response, send) = sender.send_request(request, false)?;
                let response = response.await?;
                Ok::<_, h2::Error>((response, send))
            };
            let result = tokio::time::timeout(limit, exchange)
                .await
                .map_err(|_| timeout_err(format!("CONNECT {authority} via {dest}"), limit))?;
            match result {
                Ok((response, send)) => {
                    self.inner.streams.fetch_add(1, Ordering::Relaxed);
                    let (parts, recv) = response.into_parts();
                    return Ok(HboneStream {
                        status: parts.status,
                        headers: parts.headers,
                        connection_id: conn.id,
                        send,
                        recv,
                        _slot: slot,
                    });
                }
                Err(err) => {
                    let dead = err.is_go_away()
                        || err.is_io()
                        || err.reason() == Some(Reason::REFUSED_STREAM)
                        || !conn.is_open();
                    if dead {
                        conn.closed.store(true, Ordering::Release);
                    }
                    if !dead || attempt >= 2 {
                        return Err(err.into());
                    }
                    tracing::debug!(%dest, %err, "HBONE connection unusable; retrying on a new one");
                }
            }
        }
    }

    async fn acquire(&self, dest: SocketAddr, tls: &ClientTls) -> Result<StreamSlot, HboneError> {
        let key = PoolKey {
            destination: dest,
            identity: tls.identity.clone(),
        };
        let list = self
            .inner
            .keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default()
            .clone();
        // Held while dialling, so a burst of streams shares the first new connection.
        let mut conns = list.lock().await;
        conns.retain(|c| c.is_open());
        if let Some(slot) = conns.iter().find_map(|c| c.try_reserve()) {
            return Ok(slot);
        }
        let conn = self.dial(dest, tls).await?;
        let slot = conn.try_reserve().ok_or_else(|| HboneError::Invalid {
            what: "server max_concurrent_streams",
            value: conn.send.current_max_send_streams().to_string(),
            reason: format!("{dest} allows no streams"),
        })?;
        conns.push(conn);
        Ok(slot)
    }

    async fn dial(&self, dest: SocketAddr, tls: &ClientTls) -> Result<Arc<PooledConn>, HboneError> {
        let limit = self.inner.settings.connect_timeout;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let setup = async {
            let stream = tls
                .connect_from(dest, self.inner.settings.source_ip)
                .await?;
            let (send, mut connection) = h2::client::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .handshake::<_, Bytes>(stream)
                .await?;
            let ping = connection.ping_pong();
            let closed = Arc::new(AtomicBool::new(false));
            let closed_flag = closed.clone();
            tokio::spawn(async move {
                if let Err(err) = connection.await {
                    tracing::debug!(%dest, %err, "HBONE client connection ended");
                }
                closed_flag.store(true, Ordering::Release);
            });
            // The server's SETTINGS come before its PONG, and h2 applies them before reading
            // on: after the PONG the server's max_concurrent_streams is known.
            if let Some(mut ping) = ping {
                ping.ping(h2::Ping::opaque()).await?;
            }
            Ok::<_, HboneError>(Arc::new(PooledConn {
                id,
                send,
                in_flight: AtomicUsize::new(0),
                closed,
                local_max: self.inner.settings.max_streams_per_connection.max(1),
            }))
        };
        let conn = tokio::time::timeout(limit, setup)
            .await
            .map_err(|_| timeout_err(format!("HBONE connection to {dest}"), limit))??;
        self.inner.connections.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%dest, identity = %tls.identity, id, max_streams = conn.send.current_max_send_streams(), "HBONE connection up");
        Ok(conn)
    }
}

/// The `:authority`-only URI of a classic `CONNECT`.
fn connect_uri(authority: &str) -> Result<Uri, HboneError> {
    let invalid = |reason: String| HboneError::Invalid {
        what: "CONNECT authority",
        value: authority.to_owned(),
        reason,
    };
    let uri = Uri::try_from(authority).map_err(|e| invalid(e.to_string()))?;
    match (uri.scheme(), uri.authority(), uri.path_and_query()) {
        (None, Some(a), None) if a.port_u16().is_some() => Ok(uri),
        _ => Err(invalid("want host:port".to_owned())),
    }
}

// ---------------------------------------------------------------------------------------------
// Forwarder (source side)
// ---------------------------------------------------------------------------------------------

/// How to run an [`HboneForwarder`].
#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    /// Local TCP listen address (port 0 picks one).
    pub listen: SocketAddr,
    /// Where HBONE goes (a waypoint's or pod's `:15008`).
    pub waypoint: SocketAddr,
    /// `:authority` of every `CONNECT` (`ip:port`: a service VIP or pod IP and port).
    pub authority: String,
    /// The identity presented (the client pod's).
    pub identity: Arc<WorkloadIdentity>,
    /// Which server identities are accepted.
    pub expect_peer: PeerMatch,
    /// `baggage` header value, if any.
    pub baggage: Option<String>,
    /// Connection pool settings.
    pub pool: PoolSettings,
}

impl ForwarderConfig {
    /// Forward `listen` to `waypoint` for `authority` as `identity`, accepting any server of the
    /// same trust domain, without baggage.
    pub fn new(
        listen: SocketAddr,
        waypoint: SocketAddr,
        authority: impl Into<String>,
        identity: Arc<WorkloadIdentity>,
    ) -> Self {
        ForwarderConfig {
            listen,
            waypoint,
            authority: authority.into(),
            expect_peer: PeerMatch::Prefix(identity.trust_domain_prefix()),
            identity,
            baggage: None,
            pool: PoolSettings::default(),
        }
    }
}

/// Counters of an [`HboneForwarder`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ForwarderStats {
    /// Local TCP connections accepted.
    pub accepted: u64,
    /// HTTP/2 connections opened to the waypoint.
    pub h2_connections: u64,
    /// `CONNECT` streams answered (any status).
    pub streams: u64,
    /// Tunnels established (200).
    pub established: u64,
    /// `CONNECT`s answered with another status.
    pub refused: u64,
    /// Tunnels that could not be opened (connection, TLS or HTTP/2 failure).
    pub failed: u64,
}

#[derive(Default)]
struct ForwarderCounters {
    accepted: AtomicU64,
    established: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

struct ForwarderShared {
    waypoint: SocketAddr,
    authority: String,
    baggage: Option<HeaderValue>,
    tls: ClientTls,
    pool: HbonePool,
    counters: ForwarderCounters,
}

/// The source-side HBONE forwarder (ztunnel outbound for a client pod): every TCP connection
/// accepted on [`HboneForwarder::addr`] becomes one `CONNECT` stream to the waypoint. Stops when
/// dropped.
pub struct HboneForwarder {
    /// The bound local address.
    pub addr: SocketAddr,
    shared: Arc<ForwarderShared>,
    task: JoinHandle<()>,
}

impl fmt::Debug for HboneForwarder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HboneForwarder")
            .field("addr", &self.addr)
            .field("waypoint", &self.shared.waypoint)
            .field("authority", &self.shared.authority)
            .finish_non_exhaustive()
    }
}

impl HboneForwarder {
    /// Binds and starts forwarding.
    pub async fn start(config: ForwarderConfig) -> Result<Self, HboneError> {
        connect_uri(&config.authority)?;
        let baggage = config
            .baggage
            .as_deref()
            .map(HeaderValue::from_str)
            .transpose()
            .map_err(|e| HboneError::Invalid {
                what: "baggage",
                value: config.baggage.clone().unwrap_or_default(),
                reason: e.to_string(),
            })?;
        let tls = ClientTls::new(&config.identity, &config.expect_peer)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(io_err(format!("binding {}", config.listen)))?;
        let addr = listener
            .local_addr()
            .map_err(io_err("reading the bound address"))?;
        let shared = Arc::new(ForwarderShared {
            waypoint: config.waypoint,
            authority: config.authority,
            baggage,
            tls,
            pool: HbonePool::new(config.pool),
            counters: ForwarderCounters::default(),
        });
        let task = tokio::spawn(forward_loop(listener, shared.clone()));
        tracing::info!(%addr, waypoint = %shared.waypoint, authority = %shared.authority, identity = %shared.tls.identity, "hbone-forward listening");
        Ok(HboneForwarder { addr, shared, task })
    }

    /// Counters so far.
    pub fn stats(&self) -> ForwarderStats {
        let c = &self.shared.counters;
        let pool = self.shared.pool.stats();
        ForwarderStats {
            accepted: c.accepted.load(Ordering::Relaxed),
            h2_connections: pool.connections,
            streams: pool.streams,
            established: c.established.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting and ends open tunnels.
    pub fn shutdown(self) {
        self.task.abort();
    }

    /// Runs until the accept loop ends (normally: forever).
    pub async fn wait(mut self) {
        if let Err(err) = (&mut self.task).await
            && err.is_panic()
        {
            tracing::error!(%err, "hbone-forward accept loop panicked");
        }
    }
}

impl Drop for HboneForwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward_loop(listener: TcpListener, shared: Arc<ForwarderShared>) {
    let mut tunnels = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
                    tunnels.spawn(forward_one(stream, peer, shared.clone()));
                }
                Err(err) => {
                    tracing::warn!(%err, "hbone-forward: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = tunnels.join_next(), if !tunnels.is_empty() => {}
        }
    }
}

fn traceparent() -> String {
    let trace: u128 = rand::random::<u128>() | 1;
    let span: u64 = rand::random::<u64>() | 1;
    format!("00-{trace:032x}-{span:016x}-01")
}

async fn forward_one(client: TcpStream, peer: SocketAddr, shared: Arc<ForwarderShared>) {
    if let Err(err) = client.set_nodelay(true) {
        tracing::debug!(%err, "setting TCP_NODELAY failed");
    }
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&format!("for=\"{peer}\"")) {
        headers.insert(http::header::FORWARDED, v);
    }
    if let Ok(v) = HeaderValue::from_str(&traceparent()) {
        headers.insert("traceparent", v);
    }
    if let Some(baggage) = &shared.baggage {
        headers.insert("baggage", baggage.clone());
    }
    let opened = shared
        .pool
        .connect(shared.waypoint, &shared.tls, &shared.authority, &headers)
        .await;
    let counters = &shared.counters;
    match opened {
        Ok(stream) if stream.status == StatusCode::OK => {
            counters.established.fetch_add(1, Ordering::Relaxed);
            let conn = stream.connection_id;
            match stream.pipe(client).await {
                Ok((sent, received)) => {
                    tracing::debug!(%peer, conn, sent, received, "hbone-forward: tunnel closed")
                }
                Err(err) => tracing::debug!(%peer, conn, %err, "hbone-forward: tunnel failed"),
            }
        }
        Ok(stream) => {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, status = stream.status.as_u16(), authority = %shared.authority, "hbone-forward: CONNECT refused; closing the client connection");
        }
        Err(err) => {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, %err, waypoint = %shared.waypoint, "hbone-forward: could not open a tunnel; closing the client connection");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sink (destination side)
// ---------------------------------------------------------------------------------------------

/// How to run an [`HboneSink`].
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// HBONE listen address (`podIP:15008`; port 0 picks one).
    pub listen: SocketAddr,
    /// The identity presented (the destination pod's).
    pub identity: Arc<WorkloadIdentity>,
    /// Which client identities are accepted at the handshake.
    pub allow_peer: PeerMatch,
    /// App address per `:authority` port. Looked up first.
    pub port_map: BTreeMap<u16, SocketAddr>,
    /// App address for ports not in `port_map`; without it the authority itself is dialled.
    pub forward_to: Option<SocketAddr>,
    /// Append one JSON line per stream ([`AcceptedStream`]) to this file.
    pub report_file: Option<PathBuf>,
    /// HTTP/2 `max_concurrent_streams` announced to clients.
    pub max_concurrent_streams: u32,
    /// Deadline for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Deadline for connecting to the app.
    pub connect_timeout: Duration,
}

impl SinkConfig {
    /// Terminate HBONE on `listen` as `identity`, accepting clients of the same trust domain,
    /// dialling each authority as given, with [`DEFAULT_MAX_CONCURRENT_STREAMS`].
    pub fn new(listen: SocketAddr, identity: Arc<WorkloadIdentity>) -> Self {
        SinkConfig {
            listen,
            allow_peer: PeerMatch::Prefix(identity.trust_domain_prefix()),
            identity,
            port_map: BTreeMap::new(),
            forward_to: None,
            report_file: None,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
        }
    }

    fn target_for(&self, authority: SocketAddr) -> SocketAddr {
        self.port_map
            .get(&authority.port())
            .copied()
            .or(self.forward_to)
            .unwrap_or(authority)
    }
}

/// One HTTP/2 request the sink answered, as recorded for tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AcceptedStream {
    /// The client certificate's SPIFFE id (behind a waypoint: the waypoint's).
    pub peer_identity: String,
    /// The TCP peer of the HBONE connection.
    pub peer_addr: SocketAddr,
    /// Which HBONE connection carried it (ids count from 0 per sink).
    pub connection_id: u64,
    /// The request method (`CONNECT` for tunnels).
    pub method: String,
    /// `:authority`, if any.
    pub authority: Option<String>,
    /// `forwarded` header.
    pub forwarded: Option<String>,
    /// `baggage` header.
    pub baggage: Option<String>,
    /// `traceparent` header.
    pub traceparent: Option<String>,
    /// The app address dialled, if it came to that.
    pub target: Option<SocketAddr>,
    /// The status answered: 200 tunnel up, 400 not a valid CONNECT, 503 app unreachable.
    pub status: u16,
}

/// Counters of an [`HboneSink`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SinkStats {
    /// HBONE connections that completed the TLS handshake.
    pub connections: u64,
    /// TLS handshakes that failed (e.g. a client certificate from another CA).
    pub handshake_failures: u64,
    /// Requests answered (any status).
    pub streams: u64,
}

struct SinkShared {
    config: SinkConfig,
    acceptor: TlsAcceptor,
    accepted: Mutex<Vec<AcceptedStream>>,
    handshake_errors: Mutex<Vec<String>>,
    report: Option<Mutex<std::fs::File>>,
    events: watch::Sender<SinkStats>,
    next_conn: AtomicU64,
}

impl SinkShared {
    fn handshake_failed(&self, peer: SocketAddr, error: String) {
        tracing::warn!(%peer, %error, "hbone-sink: TLS handshake failed");
        let mut errors = self
            .handshake_errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if errors.len() < MAX_HANDSHAKE_ERRORS {
            errors.push(error);
        }
        drop(errors);
        self.events.send_modify(|s| s.handshake_failures += 1);
    }

    fn record(&self, stream: AcceptedStream) {
        tracing::info!(
            peer_identity = %stream.peer_identity,
            authority = stream.authority.as_deref().unwrap_or("-"),
            forwarded = stream.forwarded.as_deref().unwrap_or("-"),
            method = %stream.method,
            status = stream.status,
            connection = stream.connection_id,
            "hbone-sink: stream"
        );
        if let Some(file) = &self.report {
            match serde_json::to_string(&stream) {
                Ok(mut line) => {
                    line.push('\n');
                    let mut file = file.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Err(err) = file.write_all(line.as_bytes()).and_then(|()| file.flush()) {
                        tracing::warn!(%err, "hbone-sink: writing the report file failed");
                    }
                }
                Err(err) => tracing::warn!(%err, "hbone-sink: encoding a report line failed"),
            }
        }
        self.accepted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(stream);
        self.events.send_modify(|s| s.streams += 1);
    }
}

/// The destination-side HBONE terminator (ztunnel inbound): mTLS HTTP/2 on [`HboneSink::addr`],
/// each `CONNECT` joined to the app. Stops when dropped.
pub struct HboneSink {
    /// The bound HBONE address.
    pub addr: SocketAddr,
    shared: Arc<SinkShared>,
    task: JoinHandle<()>,
}

impl fmt::Debug for HboneSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HboneSink")
            .field("addr", &self.addr)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl HboneSink {
    /// Binds and starts serving.
    pub async fn start(config: SinkConfig) -> Result<Self, HboneError> {
        let acceptor = TlsAcceptor::from(config.identity.server_config(&config.allow_peer)?);
        let report = match &config.report_file {
            Some(path) => Some(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(io_err(format!("opening {}", path.display())))?,
            )),
            None => None,
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(io_err(format!("binding {}", config.listen)))?;
        let addr = listener
            .local_addr()
            .map_err(io_err("reading the bound address"))?;
        tracing::info!(%addr, identity = %config.identity.spiffe_id(), allow = %config.allow_peer, "hbone-sink listening");
        let shared = Arc::new(SinkShared {
            config,
            acceptor,
            accepted: Mutex::new(Vec::new()),
            handshake_errors: Mutex::new(Vec::new()),
            report,
            events: watch::Sender::new(SinkStats::default()),
            next_conn: AtomicU64::new(0),
        });
        let task = tokio::spawn(sink_loop(listener, shared.clone()));
        Ok(HboneSink { addr, shared, task })
    }

    /// Every request answered so far, in order.
    pub fn accepted(&self) -> Vec<AcceptedStream> {
        self.shared
            .accepted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Why TLS handshakes failed, oldest first (the first [`MAX_HANDSHAKE_ERRORS`] kept).
    pub fn handshake_errors(&self) -> Vec<String> {
        self.shared
            .handshake_errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Counters so far.
    pub fn stats(&self) -> SinkStats {
        *self.shared.events.borrow()
    }

    /// A receiver that sees every change of the counters.
    pub fn watch(&self) -> watch::Receiver<SinkStats> {
        self.shared.events.subscribe()
    }

    /// Waits (at most `limit`) until the counters satisfy `ready`.
    pub async fn wait_for(
        &self,
        mut ready: impl FnMut(&SinkStats) -> bool,
        limit: Duration,
    ) -> Result<SinkStats, HboneError> {
        let mut rx = self.watch();
        match tokio::time::timeout(limit, rx.wait_for(|s| ready(s))).await {
            Ok(Ok(stats)) => Ok(*stats),
            Ok(Err(_)) | Err(_) => Err(timeout_err("waiting for hbone-sink counters", limit)),
        }
    }

    /// Waits (at most `limit`) until `n` requests were answered; returns them all.
    pub async fn wait_for_streams(
        &self,
        n: usize,
        limit: Duration,
    ) -> Result<Vec<AcceptedStream>, HboneError> {
        self.wait_for(|s| s.streams >= n as u64, limit).await?;
        Ok(self.accepted())
    }

    /// Stops serving and ends open tunnels.
    pub fn shutdown(self) {
        self.task.abort();
    }

    /// Runs until the accept loop ends (normally: forever).
    pub async fn wait(mut self) {
        if let Err(err) = (&mut self.task).await
            && err.is_panic()
        {
            tracing::error!(%err, "hbone-sink accept loop panicked");
        }
    }
}

impl Drop for HboneSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn sink_loop(listener: TcpListener, shared: Arc<SinkShared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(sink_connection(stream, peer, shared.clone()));
                }
                Err(err) => {
                    tracing::warn!(%err, "hbone-sink: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Facts about one HBONE connection shared by its streams.
struct SinkConn {
    id: u64,
    peer: SocketAddr,
    peer_identity: String,
}

async fn sink_connection(tcp: TcpStream, peer: SocketAddr, shared: Arc<SinkShared>) {
    if let Err(err) = tcp.set_nodelay(true) {
        tracing::debug!(%err, "setting TCP_NODELAY failed");
    }
    let limit = shared.config.handshake_timeout;
    let tls = match tokio::time::timeout(limit, shared.acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            shared.handshake_failed(peer, err.to_string());
            return;
        }
        Err(_) => {
            shared.handshake_failed(peer, format!("timed out after {limit:?}"));
            return;
        }
    };
    let peer_identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(peer_spiffe_id)
        .unwrap_or_default();
    let conn = Arc::new(SinkConn {
        id: shared.next_conn.fetch_add(1, Ordering::Relaxed),
        peer,
        peer_identity,
    });
    shared.events.send_modify(|s| s.connections += 1);
    tracing::debug!(%peer, identity = %conn.peer_identity, id = conn.id, "hbone-sink: connection up");
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(shared.config.max_concurrent_streams)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake::<_, Bytes>(tls);
    let mut h2conn = match tokio::time::timeout(limit, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(err)) => {
            tracing::debug!(%peer, %err, "hbone-sink: HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "hbone-sink: HTTP/2 handshake timed out");
            return;
        }
    };
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            next = h2conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    streams.spawn(sink_stream(request, respond, conn.clone(), shared.clone()));
                }
                Some(Err(err)) => {
                    tracing::debug!(%peer, %err, "hbone-sink: connection failed");
                    break;
                }
                None => break,
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
}

async fn sink_stream(
    request: Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    conn: Arc<SinkConn>,
    shared: Arc<SinkShared>,
) {
    let (parts, body) = request.into_parts();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let authority = parts.uri.authority().map(|a| a.as_str().to_owned());
    let mut record = AcceptedStream {
        peer_identity: conn.peer_identity.clone(),
        peer_addr: conn.peer,
        connection_id: conn.id,
        method: parts.method.as_str().to_owned(),
        authority: authority.clone(),
        forwarded: header("forwarded"),
        baggage: header("baggage"),
        traceparent: header("traceparent"),
        target: None,
        status: StatusCode::BAD_REQUEST.as_u16(),
    };
    let target = match (&parts.method, authority.as_deref().map(str::parse)) {
        (&Method::CONNECT, Some(Ok(addr))) => Some(shared.config.target_for(addr)),
        _ => None,
    };
    let app = match target {
        Some(target) => {
            record.target = Some(target);
            let limit = shared.config.connect_timeout;
            match tokio::time::timeout(limit, TcpStream::connect(target)).await {
                Ok(Ok(app)) => Some(app),
                Ok(Err(err)) => {
                    tracing::debug!(%target, %err, "hbone-sink: app unreachable");
                    None
                }
                Err(_) => {
                    tracing::debug!(%target, "hbone-sink: connecting to the app timed out");
                    None
                }
            }
        }
        None => None,
    };
    record.status = match (target, &app) {
        (None, _) => StatusCode::BAD_REQUEST,
        (Some(_), None) => StatusCode::SERVICE_UNAVAILABLE,
        (Some(_), Some(_)) => StatusCode::OK,
    }
    .as_u16();
    let status = record.status;
    shared.record(record);
    let Some(app) = app else {
        let response = Response::builder().status(status).body(());
        if let Ok(response) = response
            && let Err(err) = respond.send_response(response, true)
        {
            tracing::debug!(%err, "hbone-sink: answering failed");
        }
        return;
    };
    if let Err(err) = app.set_nodelay(true) {
        tracing::debug!(%err, "setting TCP_NODELAY failed");
    }
    let send = match Response::builder().status(StatusCode::OK).body(()) {
        Ok(response) => match respond.send_response(response, false) {
            Ok(send) => send,
            Err(err) => {
                tracing::debug!(%err, "hbone-sink: answering failed");
                return;
            }
        },
        Err(err) => {
            tracing::debug!(%err, "hbone-sink: building the answer failed");
            return;
        }
    };
    match pipe(app, send, body).await {
        Ok((sent, received)) => {
            tracing::debug!(conn = conn.id, sent, received, "hbone-sink: tunnel closed")
        }
        Err(err) => tracing::debug!(conn = conn.id, %err, "hbone-sink: tunnel failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_match_parses_and_matches() {
        let exact: PeerMatch = "spiffe://cluster.local/ns/default/sa/waypoint"
            .parse()
            .expect("exact");
        assert!(exact.matches("spiffe://cluster.local/ns/default/sa/waypoint"));
        assert!(!exact.matches("spiffe://cluster.local/ns/default/sa/waypoint2"));
        let prefix: PeerMatch = "spiffe://cluster.local/".parse().expect("prefix");
        assert!(prefix.matches("spiffe://cluster.local/ns/a/sa/b"));
        assert!(!prefix.matches("spiffe://other.local/ns/a/sa/b"));
        assert_eq!("*".parse::<PeerMatch>().expect("any"), PeerMatch::Any);
        assert!("http://x".parse::<PeerMatch>().is_err());
        assert!("spiffe://".parse::<PeerMatch>().is_err());
        assert_eq!(
            trust_domain_prefix("spiffe://td.example/ns/a/sa/b"),
            "spiffe://td.example/"
        );
    }

    #[test]
    fn connect_uri_is_authority_only() {
        let uri = connect_uri("10.96.0.100:8000").expect("ip:port");
        assert_eq!(
            uri.authority().map(|a| a.as_str()),
            Some("10.96.0.100:8000")
        );
        assert!(uri.scheme().is_none() && uri.path_and_query().is_none());
        assert!(connect_uri("[::1]:80").is_ok());
        for bad in ["10.0.0.1", "http://a:1/", "a:1/x", ""] {
            assert!(connect_uri(bad).is_err(), "{bad}");
        }
    }
}
