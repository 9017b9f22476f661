//! The Istio CA client: key + CSR generation and `IstioCertificateService/CreateCertificate` over
//! TLS (or plaintext for `:15010`), with the bearer token re-read on every call and the `ClusterID`
//! and `CA_HEADER_*` metadata pilot-agent sends (reference/istio-facts.md §1.7).

use std::{path::PathBuf, time::Duration};

use rcgen::{CertificateParams, KeyPair, SanType};
use tonic::{Request, transport::Channel};
use waypoint_proto::{
    google::protobuf::{Struct, Value, value::Kind},
    istio::ca::{
        IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
    },
};
use waypoint_shared::{
    identity::SpiffeId,
    pem::{self, CertInfo},
};

use crate::config::{AgentConfig, KeyKind};

/// Errors getting a certificate.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Key or CSR generation failed.
    #[error("key/CSR generation: {0}")]
    Keygen(String),
    /// Could not read the CA root or reach the CA.
    #[error("connect to CA {addr}: {reason}")]
    Connect {
        /// CA address.
        addr: String,
        /// What failed.
        reason: String,
    },
    /// The CA answered with an error.
    #[error("CA {addr} refused the CSR: {status}")]
    Rpc {
        /// CA address.
        addr: String,
        /// gRPC status.
        status: Box<tonic::Status>,
    },
    /// The CA's answer is unusable (never served).
    #[error("CA response rejected: {0}")]
    BadResponse(String),
}

/// A signed workload certificate with its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedIdentity {
    /// Leaf first, then intermediates and the root, concatenated PEM.
    pub cert_chain_pem: String,
    /// PKCS#8 private key, PEM.
    pub key_pem: String,
    /// The root (last element of the CA's chain), PEM.
    pub root_pem: String,
    /// Facts about the leaf.
    pub leaf: CertInfo,
}

/// Something that turns a CSR into a chain (the Istio CA, or a fake in unit tests).
pub trait Signer: Send + Sync + 'static {
    /// Signs `csr_pem`, returning the chain one PEM per element (leaf first, root last).
    fn sign(
        &self,
        csr_pem: String,
    ) -> impl std::future::Future<Output = Result<Vec<String>, CaError>> + Send;
}

/// How to reach the CA.
#[derive(Debug, Clone)]
pub struct CaClientConfig {
    /// `host:port`.
    pub addr: String,
    /// Plaintext (`:15010`).
    pub plaintext: bool,
    /// Root certificate file for TLS.
    pub root_path: PathBuf,
    /// TLS server name.
    pub server_name: String,
    /// Token file (absent → no authorization header).
    pub token_path: PathBuf,
    /// `ClusterID` header.
    pub cluster_id: String,
    /// Extra headers (`CA_HEADER_*`).
    pub headers: Vec<(String, String)>,
    /// `metadata.CertSigner`.
    pub cert_signer: String,
    /// Requested lifetime.
    pub ttl: Duration,
    /// Per-call deadline.
    pub timeout: Duration,
}

impl CaClientConfig {
    /// The CA settings from the agent configuration.
    pub fn from_agent(cfg: &AgentConfig) -> Self {
        CaClientConfig {
            addr: cfg.ca_addr.clone(),
            plaintext: cfg.ca_plaintext(),
            root_path: cfg.ca_root_path(),
            server_name: cfg.server_name(&cfg.ca_addr),
            token_path: PathBuf::from(crate::config::paths::TOKEN),
            cluster_id: cfg.cluster_id.clone(),
            headers: cfg.ca_headers.clone(),
            cert_signer: cfg.cert_signer.clone(),
            ttl: cfg.secret_ttl,
            timeout: Duration::from_secs(10),
        }
    }
}

/// The Istio CA client. It dials a new connection per call: calls are rare (rotation) and
/// pilot-agent rebuilds its connection after any failure anyway.
#[derive(Debug, Clone)]
pub struct CaClient {
    cfg: CaClientConfig,
}

impl CaClient {
    /// A client for `cfg`.
    pub fn new(cfg: CaClientConfig) -> Self {
        CaClient { cfg }
    }

    async fn channel(&self) -> Result<Channel, CaError> {
        let dial = crate::istiod::Dial {
            addr: &self.cfg.addr,
            plaintext: self.cfg.plaintext,
            root_path: &self.cfg.root_path,
            server_name: &self.cfg.server_name,
            connect_timeout: self.cfg.timeout,
            request_timeout: Some(self.cfg.timeout),
        };
        crate::istiod::channel(dial)
            .await
            .map_err(|reason| CaError::Connect {
                addr: self.cfg.addr.clone(),
                reason,
            })
    }
}

pub use crate::istiod::{add_auth_headers, error_chain};

impl Signer for CaClient {
    async fn sign(&self, csr_pem: String) -> Result<Vec<String>, CaError> {
        let channel = self.channel().await?;
        let mut client = IstioCertificateServiceClient::new(channel);
        let mut fields = std::collections::BTreeMap::new();
        fields.insert(
            "CertSigner".to_owned(),
            Value {
                kind: Some(Kind::StringValue(self.cfg.cert_signer.clone())),
            },
        );
        let mut req = Request::new(IstioCertificateRequest {
            csr: csr_pem,
            validity_duration: self.cfg.ttl.as_secs() as i64,
            metadata: Some(Struct {
                fields: fields.into_iter().collect(),
            }),
        });
        add_auth_headers(
            &mut req,
            &self.cfg.token_path,
            &self.cfg.cluster_id,
            &self.cfg.headers,
        )
        .await;
        let resp = client
            .create_certificate(req)
            .await
            .map_err(|status| CaError::Rpc {
                addr: self.cfg.addr.clone(),
                status: Box::new(status),
            })?;
        Ok(resp.into_inner().cert_chain)
    }
}

/// Generates a key of `kind` and a CSR with one URI SAN (`identity`) and an empty subject, so the SAN
/// extension is critical (RFC 5280 §4.2.1.6), as pilot-agent's CSRs.
pub fn generate_csr(kind: KeyKind, identity: &SpiffeId) -> Result<(String, KeyPair), CaError> {
    let key = match kind {
        KeyKind::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        KeyKind::EcdsaP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
        KeyKind::Rsa(bits) => rsa_key(bits),
    }
    .map_err(|e| CaError::Keygen(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        identity
            .uri()
            .try_into()
            .map_err(|e: rcgen::Error| CaError::Keygen(e.to_string()))?,
    )];
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(|e| CaError::Keygen(e.to_string()))?;
    let pem = csr.pem().map_err(|e| CaError::Keygen(e.to_string()))?;
    Ok((pem, key))
}

fn rsa_key(bits: u32) -> Result<KeyPair, rcgen::Error> {
    use rsa::pkcs8::EncodePrivateKey as _;
    let mut rng = rsa::rand_core::OsRng;
    let key = rsa::RsaPrivateKey::new(&mut rng, bits as usize)
        .map_err(|_| rcgen::Error::KeyGenerationUnavailable)?;
    let der = key
        .to_pkcs8_der()
        .map_err(|_| rcgen::Error::KeyGenerationUnavailable)?;
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from(der.as_bytes().to_vec());
    KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_RSA_SHA256)
}

/// Runs one CSR round: new key, CSR, sign, check. A response with fewer than two certificates or a
/// leaf whose URI SAN is not `identity` is an error and is never served.
pub async fn issue<S: Signer>(
    signer: &S,
    kind: KeyKind,
    identity: &SpiffeId,
) -> Result<IssuedIdentity, CaError> {
    let (csr, key) = generate_csr(kind, identity)?;
    let chain = signer.sign(csr).await?;
    if chain.len() <= 1 {
        return Err(CaError::BadResponse(format!(
            "cert_chain has {} element(s); want leaf ... root",
            chain.len()
        )));
    }
    let leaf_der = pem::certs(&chain[0]).map_err(|e| CaError::BadResponse(format!("leaf: {e}")))?;
    let leaf =
        pem::cert_info(&leaf_der[0]).map_err(|e| CaError::BadResponse(format!("leaf: {e}")))?;
    let want = identity.uri();
    if leaf.uri_sans != [want.clone()] {
        return Err(CaError::BadResponse(format!(
            "leaf URI SANs {:?}, expected [{want}]",
            leaf.uri_sans
        )));
    }
    let mut cert_chain_pem = String::new();
    for element in &chain {
        cert_chain_pem.push_str(element.trim_end());
        cert_chain_pem.push('\n');
    }
    let root_pem = chain
        .last()
        .map(|r| format!("{}\n", r.trim_end()))
        .unwrap_or_default();
    Ok(IssuedIdentity {
        cert_chain_pem,
        key_pem: key.serialize_pem(),
        root_pem,
        leaf,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_has_one_critical_uri_san() {
        use x509_parser::prelude::FromDer as _;
        let id = SpiffeId::new("cluster.local", "default", "waypoint");
        for kind in [KeyKind::EcdsaP256, KeyKind::EcdsaP384] {
            let (pem_text, _key) = generate_csr(kind, &id).expect("csr");
            let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem_text.as_bytes())
                .map(|d: rustls_pki_types::CertificateSigningRequestDer<'_>| d.as_ref().to_vec())
                .expect("pem");
            let (_, csr) =
                x509_parser::certification_request::X509CertificationRequest::from_der(&der)
                    .expect("parses");
            csr.verify_signature().expect("self-signed CSR verifies");
            let exts = csr
                .requested_extensions()
                .expect("extensions")
                .collect::<Vec<_>>();
            assert_eq!(exts.len(), 1, "{kind:?}");
            let x509_parser::prelude::ParsedExtension::SubjectAlternativeName(san) = exts[0] else {
                panic!("not a SAN: {:?}", exts[0])
            };
            assert_eq!(
                format!("{:?}", san.general_names),
                "[URI(\"spiffe://cluster.local/ns/default/sa/waypoint\")]"
            );
        }
    }

    #[test]
    fn rsa_csr_is_generated() {
        let id = SpiffeId::new("cluster.local", "default", "waypoint");
        let (pem_text, key) = generate_csr(KeyKind::Rsa(2048), &id).expect("rsa csr");
        assert!(pem_text.contains("CERTIFICATE REQUEST"));
        assert_eq!(key.algorithm(), &rcgen::PKCS_RSA_SHA256);
    }
}
