//! rustls configurations for mesh mTLS (HBONE): TLS 1.3 only, ALPN `h2`, both sides verified against
//! the mesh root, and the peer's identity checked by its URI SAN (Envoy's
//! `match_typed_subject_alt_names` with `san_type: URI`) instead of a DNS name.

use std::sync::Arc;

use rustls::{
    DigitallySignedStruct, DistinguishedName, Error as TlsError, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ParsedCertificate, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

use crate::pem::{self, PemError};

/// How a peer's URI SAN must look (Envoy `StringMatcher` subset used for SAN matching).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SanMatcher {
    /// Equal to.
    Exact(String),
    /// Starts with (istiod: `spiffe://<trust-domain>/`).
    Prefix(String),
    /// Ends with.
    Suffix(String),
    /// Contains.
    Contains(String),
}

impl SanMatcher {
    /// Whether `san` matches.
    pub fn matches(&self, san: &str) -> bool {
        match self {
            SanMatcher::Exact(s) => san == s,
            SanMatcher::Prefix(s) => san.starts_with(s.as_str()),
            SanMatcher::Suffix(s) => san.ends_with(s.as_str()),
            SanMatcher::Contains(s) => san.contains(s.as_str()),
        }
    }
}

/// Errors building TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// Bad PEM material.
    #[error("{0}")]
    Pem(#[from] PemError),
    /// rustls refused the material.
    #[error("rustls: {0}")]
    Rustls(#[from] TlsError),
    /// Building the client verifier failed.
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// The certificate material of one identity.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Leaf first, PEM.
    pub cert_chain_pem: String,
    /// Private key PEM.
    pub key_pem: String,
    /// Trusted roots PEM.
    pub roots_pem: String,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(pem_text: &str) -> Result<RootCertStore, TlsConfigError> {
    let mut store = RootCertStore::empty();
    for cert in pem::certs(pem_text)? {
        store.add(cert)?;
    }
    Ok(store)
}

/// The URI SANs of a DER certificate (empty if it does not parse).
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    pem::cert_info(der).map(|i| i.uri_sans).unwrap_or_default()
}

fn check_sans(end_entity: &CertificateDer<'_>, matchers: &[SanMatcher]) -> Result<(), TlsError> {
    if matchers.is_empty() {
        return Ok(());
    }
    let sans = uri_sans(end_entity.as_ref());
    if sans
        .iter()
        .any(|san| matchers.iter().any(|m| m.matches(san)))
    {
        Ok(())
    } else {
        Err(TlsError::General(format!(
            "peer URI SANs {sans:?} match none of {matchers:?}"
        )))
    }
}

/// Verifies a server by chain to the mesh root and URI SAN (no DNS name check: HBONE has no SNI).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: RootCertStore,
    matchers: Vec<SanMatcher>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        check_sans(end_entity, &self.matchers)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Verifies a client by chain (webpki) and URI SAN, during the handshake.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    matchers: Vec<SanMatcher>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_sans(end_entity, &self.matchers)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A TLS 1.3 server that requires a client certificate from the mesh whose URI SAN matches `matchers`
/// (any, if empty), offering `alpn`.
pub fn mesh_server_config(
    id: &Identity,
    matchers: Vec<SanMatcher>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsConfigError> {
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(&id.roots_pem)?),
        provider.clone(),
    )
    .build()
    .map_err(|e| TlsConfigError::Verifier(e.to_string()))?;
    let verifier = Arc::new(SpiffeClientVerifier { inner, matchers });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            pem::certs(&id.cert_chain_pem)?,
            pem::private_key(&id.key_pem)?,
        )?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A TLS 1.3 client presenting `id`, verifying the server by chain and URI SAN, offering `alpn`.
pub fn mesh_client_config(
    id: &Identity,
    matchers: Vec<SanMatcher>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsConfigError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: roots(&id.roots_pem)?,
        matchers,
        algs: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(
            pem::certs(&id.cert_chain_pem)?,
            pem::private_key(&id.key_pem)?,
        )?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // HBONE sends no SNI.
    config.enable_sni = false;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    fn ca() -> Ca {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("root");
        Ca {
            issuer: Issuer::new(params, key),
            pem: cert.pem(),
        }
    }

    fn identity(ca: &Ca, uri: &str) -> Identity {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri.try_into().expect("uri"))];
        let cert = params.signed_by(&key, &ca.issuer).expect("leaf");
        Identity {
            cert_chain_pem: format!("{}{}", cert.pem(), ca.pem),
            key_pem: key.serialize_pem(),
            roots_pem: ca.pem.clone(),
        }
    }

    /// Runs a handshake over an in-memory duplex; returns the server's view of the client SANs.
    async fn handshake(
        server: rustls::ServerConfig,
        client: rustls::ClientConfig,
    ) -> Result<Vec<String>, String> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let (s, c) = tokio::join!(acceptor.accept(a), connector.connect(name, b));
        let s = s.map_err(|e| e.to_string())?;
        c.map_err(|e| e.to_string())?;
        let (_, conn) = s.get_ref();
        assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
        Ok(conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| uri_sans(c.as_ref()))
            .unwrap_or_default())
    }

    #[tokio::test]
    async fn mutual_spiffe_handshake_and_refusals() {
        let mesh = ca();
        let waypoint = identity(&mesh, "spiffe://cluster.local/ns/default/sa/waypoint");
        let sleep = identity(&mesh, "spiffe://cluster.local/ns/default/sa/sleep");
        let td = vec![SanMatcher::Prefix("spiffe://cluster.local/".into())];
        let server = || mesh_server_config(&waypoint, td.clone(), &[b"h2"]).expect("server config");

        let client = mesh_client_config(
            &sleep,
            vec![SanMatcher::Exact(
                "spiffe://cluster.local/ns/default/sa/waypoint".into(),
            )],
            &[b"h2"],
        )
        .expect("client");
        assert_eq!(
            handshake(server(), client).await.expect("handshake"),
            ["spiffe://cluster.local/ns/default/sa/sleep"]
        );

        // Client expects another server identity.
        let client = mesh_client_config(
            &sleep,
            vec![SanMatcher::Exact(
                "spiffe://cluster.local/ns/default/sa/other".into(),
            )],
            &[b"h2"],
        )
        .expect("client");
        assert!(handshake(server(), client).await.is_err());

        // A client from another root.
        let other = ca();
        let stranger = identity(&other, "spiffe://cluster.local/ns/default/sa/sleep");
        let mut client = mesh_client_config(&stranger, vec![], &[b"h2"]).expect("client");
        client
            .dangerous()
            .set_certificate_verifier(Arc::new(SpiffeServerVerifier {
                roots: roots(&mesh.pem).expect("roots"),
                matchers: vec![],
                algs: provider().signature_verification_algorithms,
            }));
        assert!(
            handshake(server(), client).await.is_err(),
            "foreign root refused"
        );

        // A client outside the trust domain.
        let foreign_td = identity(&mesh, "spiffe://evil.example/ns/default/sa/sleep");
        let client = mesh_client_config(&foreign_td, vec![], &[b"h2"]).expect("client");
        let err = handshake(server(), client)
            .await
            .expect_err("trust domain refused");
        assert!(!err.is_empty());
    }
}
