//! The mesh CA of istiod-lite: a root (generated, reused or loaded from `--ca-dir`), istiod's serving
//! certificate, and `IstioCertificateService/CreateCertificate`.
//!
//! Like istiod, the issued leaf takes its SPIFFE identity from the caller's bearer token, not from the
//! CSR. Dev tokens are JWT-shaped (see [`mint_token`]); `--accept-any-token` (local runs only) trusts the
//! CSR's URI SAN instead.

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use serde::Serialize;
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};
use waypoint_proto::istio::ca::{
    IstioCertificateRequest, IstioCertificateResponse,
    istio_certificate_service_server::IstioCertificateService,
};
use waypoint_shared::{identity::SpiffeId, pem};

/// How many issued certificates `/debug/certs` remembers.
const ISSUED_HISTORY: usize = 1000;

/// Errors setting up the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// File system problem in the CA directory.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Certificate generation or parsing failed.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
}

/// How callers are authenticated.
#[derive(Debug, Clone)]
pub enum TokenPolicy {
    /// Accept only the tokens listed in this file (one per line, re-read on every call).
    File(PathBuf),
    /// Accept any caller; the identity comes from the CSR's URI SAN.
    AcceptAny,
}

/// A certificate the CA issued, as shown by `/debug/certs`.
#[derive(Debug, Clone, Serialize)]
pub struct IssuedCert {
    /// Serial number (hex).
    pub serial: String,
    /// SPIFFE identity in the leaf.
    pub identity: String,
    /// Validity start (Unix seconds).
    pub not_before: i64,
    /// Validity end (Unix seconds).
    pub not_after: i64,
    /// The `ClusterID` header the caller sent.
    pub cluster_id: String,
    /// When it was issued (Unix milliseconds).
    pub issued_at_ms: u128,
}

/// The mesh CA.
pub struct MeshCa {
    issuer: Issuer<'static, KeyPair>,
    /// PEM of the signing CA certificate.
    ca_cert_pem: String,
    /// PEM of the mesh root (what workloads trust); equals `ca_cert_pem` unless a plugged-in root exists.
    root_cert_pem: String,
    trust_domain: String,
    max_ttl: Duration,
    tokens: TokenPolicy,
    issued: Mutex<VecDeque<IssuedCert>>,
}

/// Serving certificate and key (PEM) for istiod-lite's own TLS port.
pub struct ServingCert {
    /// Leaf then CA, PEM.
    pub chain_pem: String,
    /// PKCS#8 private key, PEM.
    pub key_pem: String,
}

impl MeshCa {
    /// Loads or creates the CA in `dir`:
    /// - `ca-cert.pem` + `ca-key.pem` present → sign with them (a plugged-in CA);
    /// - else `root-cert.pem` + `root-key.pem` present (from an earlier run) → reuse;
    /// - else generate a new root and save it.
    ///
    /// `root-cert.pem` is (re)written so workloads can trust it.
    pub fn load_or_create(
        dir: &Path,
        trust_domain: &str,
        max_ttl: Duration,
        tokens: TokenPolicy,
    ) -> Result<Self, CaError> {
        std::fs::create_dir_all(dir).map_err(|source| CaError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let read = |name: &str| -> Result<Option<String>, CaError> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(s) => Ok(Some(s)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(CaError::Io { path, source }),
            }
        };
        let write = |name: &str, content: &str| -> Result<(), CaError> {
            let path = dir.join(name);
            std::fs::write(&path, content).map_err(|source| CaError::Io { path, source })
        };
        let (ca_cert_pem, ca_key_pem, root_cert_pem) = if let (Some(cert), Some(key)) =
            (read("ca-cert.pem")?, read("ca-key.pem")?)
        {
            let root = read("root-cert.pem")?.unwrap_or_else(|| cert.clone());
            (cert, key, root)
        } else if let (Some(cert), Some(key)) = (read("root-cert.pem")?, read("root-key.pem")?) {
            (cert.clone(), key, cert)
        } else {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::OrganizationName, trust_domain);
            dn.push(DnType::CommonName, "istiod-lite mesh root");
            params.distinguished_name = dn;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::hours(1);
            params.not_after = now + time::Duration::days(3650);
            let cert = params.self_signed(&key)?;
            let key_pem = key.serialize_pem();
            write("root-key.pem", &key_pem)?;
            (cert.pem(), key_pem, cert.pem())
        };
        write("root-cert.pem", &root_cert_pem)?;
        let key = KeyPair::from_pem(&ca_key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_cert_pem, key)?;
        Ok(MeshCa {
            issuer,
            ca_cert_pem,
            root_cert_pem,
            trust_domain: trust_domain.to_owned(),
            max_ttl,
            tokens,
            issued: Mutex::new(VecDeque::new()),
        })
    }

    /// PEM of the mesh root.
    pub fn root_cert_pem(&self) -> &str {
        &self.root_cert_pem
    }

    /// The trust domain of issued identities.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// A fresh serving certificate for istiod-lite: SANs `istiod.istio-system.svc`, `istiod`,
    /// `localhost`, `127.0.0.1`, `::1`.
    pub fn serving_cert(&self) -> Result<ServingCert, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![
            "istiod.istio-system.svc".to_owned(),
            "istiod".to_owned(),
            "localhost".to_owned(),
        ])?;
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(365);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(ServingCert {
            chain_pem: format!("{}{}", cert.pem(), self.ca_cert_pem),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a workload CSR for `identity` with lifetime `ttl` (capped by the CA maximum).
    /// Returns the chain, one PEM per element, leaf first and root last.
    pub fn sign(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<(Vec<String>, IssuedCert), Status> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))?;
        let ttl = ttl.min(self.max_ttl);
        let mut params = CertificateParams::default();
        // Empty subject (as istiod): the identity lives in the SAN, which is then critical.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity
                .uri()
                .try_into()
                .map_err(|e| Status::internal(format!("identity: {e}")))?,
        )];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let mut serial = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut serial);
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now;
        params.not_after = now
            + time::Duration::try_from(ttl).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| Status::internal(format!("signing failed: {e}")))?;
        let mut chain = vec![cert.pem(), self.ca_cert_pem.clone()];
        if self.root_cert_pem.trim() != self.ca_cert_pem.trim() {
            chain.push(self.root_cert_pem.clone());
        }
        let info = pem::cert_info(cert.der()).map_err(|e| Status::internal(e.to_string()))?;
        let record = IssuedCert {
            serial: info.serial,
            identity: identity.uri(),
            not_before: info.not_before,
            not_after: info.not_after,
            cluster_id: String::new(),
            issued_at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
        };
        Ok((chain, record))
    }

    /// Certificates issued so far (most recent last, bounded).
    pub async fn issued(&self) -> Vec<IssuedCert> {
        self.issued.lock().await.iter().cloned().collect()
    }

    /// Authenticates the caller from its `authorization` header and returns the identity to issue.
    fn authenticate(&self, bearer: Option<&str>, csr_pem: &str) -> Result<SpiffeId, Status> {
        match &self.tokens {
            TokenPolicy::AcceptAny => {
                let csr = CertificateSigningRequestParams::from_pem(csr_pem)
                    .map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))?;
                csr.params
                    .subject_alt_names
                    .iter()
                    .find_map(|san| match san {
                        SanType::URI(uri) => uri.as_str().parse::<SpiffeId>().ok(),
                        _ => None,
                    })
                    .ok_or_else(|| Status::invalid_argument("CSR has no SPIFFE URI SAN"))
            }
            TokenPolicy::File(path) => {
                let token =
                    bearer.ok_or_else(|| Status::unauthenticated("missing bearer token"))?;
                let allowed = std::fs::read_to_string(path)
                    .map_err(|e| Status::internal(format!("token file {}: {e}", path.display())))?;
                if !allowed
                    .lines()
                    .map(str::trim)
                    .any(|l| !l.is_empty() && l == token)
                {
                    return Err(Status::unauthenticated("token not recognised"));
                }
                let claims = decode_token(token).map_err(Status::unauthenticated)?;
                if claims.exp.is_some_and(|exp| exp < unix_now()) {
                    return Err(Status::unauthenticated("token expired"));
                }
                if let Some(aud) = &claims.aud
                    && !aud.iter().any(|a| a == "istio-ca")
                {
                    return Err(Status::unauthenticated(
                        "token audience does not include istio-ca",
                    ));
                }
                let (ns, sa) = parse_subject(&claims.sub).map_err(Status::unauthenticated)?;
                Ok(SpiffeId::new(&self.trust_domain, &ns, &sa))
            }
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Claims read from a dev token.
#[derive(Debug, serde::Deserialize, Serialize)]
struct Claims {
    sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exp: Option<i64>,
}

/// Makes a dev token for `system:serviceaccount:<ns>:<sa>`, audience `istio-ca`, valid for `ttl`.
///
/// Format: JWT-shaped `base64url(header).base64url(claims).` with `alg: none` and an empty signature.
/// istiod-lite trusts it only if it appears verbatim in the `--token-file` (the stand-in for
/// Kubernetes TokenReview); the claims then give the identity.
pub fn mint_token(namespace: &str, service_account: &str, ttl: Duration) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let claims = Claims {
        sub: format!("system:serviceaccount:{namespace}:{service_account}"),
        aud: Some(vec!["istio-ca".to_owned()]),
        exp: Some(unix_now() + ttl.as_secs() as i64),
    };
    let body = serde_json::to_vec(&claims).unwrap_or_default();
    format!("{header}.{}.", b64.encode(body))
}

fn decode_token(token: &str) -> Result<Claims, String> {
    let mut parts = token.split('.');
    let (_, Some(body)) = (parts.next(), parts.next()) else {
        return Err("token is not JWT-shaped".to_owned());
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(body.trim_end_matches('='))
        .map_err(|e| format!("token claims are not base64url: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("token claims: {e}"))
}

fn parse_subject(sub: &str) -> Result<(String, String), String> {
    match sub.split(':').collect::<Vec<_>>().as_slice() {
        ["system", "serviceaccount", ns, sa] if !ns.is_empty() && !sa.is_empty() => {
            Ok(((*ns).to_owned(), (*sa).to_owned()))
        }
        _ => Err(format!(
            "token subject '{sub}' is not system:serviceaccount:<ns>:<sa>"
        )),
    }
}

/// The gRPC service wrapper.
#[derive(Clone)]
pub struct CaService {
    ca: Arc<MeshCa>,
}

impl CaService {
    /// Serves `ca`.
    pub fn new(ca: Arc<MeshCa>) -> Self {
        CaService { ca }
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let bearer = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let cluster_id = request
            .metadata()
            .get("clusterid")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let req = request.into_inner();
        let identity = self.ca.authenticate(bearer.as_deref(), &req.csr)?;
        let ttl = if req.validity_duration > 0 {
            Duration::from_secs(req.validity_duration as u64)
        } else {
            Duration::from_secs(24 * 3600)
        };
        let (chain, mut record) = self.ca.sign(&req.csr, &identity, ttl)?;
        record.cluster_id = cluster_id;
        tracing::info!(identity = %record.identity, serial = %record.serial, ttl_s = ttl.as_secs(), "issued certificate");
        let mut issued = self.ca.issued.lock().await;
        if issued.len() == ISSUED_HISTORY {
            issued.pop_front();
        }
        issued.push_back(record);
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip() {
        let t = mint_token("default", "sleep", Duration::from_secs(60));
        let c = decode_token(&t).expect("decodes");
        assert_eq!(
            parse_subject(&c.sub).expect("subject"),
            ("default".to_owned(), "sleep".to_owned())
        );
        assert!(parse_subject("system:serviceaccount:ns").is_err());
        assert!(decode_token("garbage").is_err());
    }
}
