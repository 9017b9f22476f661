//! PEM helpers: split certificate chains, read keys, inspect certificates.

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

/// Errors reading PEM material.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// No certificate in the input.
    #[error("no PEM certificate found")]
    NoCertificate,
    /// No private key in the input.
    #[error("no PEM private key found")]
    NoKey,
    /// Malformed PEM.
    #[error("malformed PEM: {0}")]
    Malformed(String),
    /// A certificate that does not parse as X.509.
    #[error("bad X.509 certificate: {0}")]
    X509(String),
}

/// All certificates in a PEM bundle, in order.
pub fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| PemError::Malformed(e.to_string()))?;
    if certs.is_empty() {
        return Err(PemError::NoCertificate);
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM bundle.
pub fn private_key(pem: &str) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => PemError::NoKey,
        other => PemError::Malformed(other.to_string()),
    })
}

/// Splits a PEM bundle into one PEM string per certificate (the Istio CA response shape).
pub fn split_chain(pem: &str) -> Result<Vec<String>, PemError> {
    Ok(certs(pem)?.iter().map(|der| der_to_pem(der)).collect())
}

/// PEM-encodes one DER certificate.
pub fn der_to_pem(der: &CertificateDer<'_>) -> String {
    encode("CERTIFICATE", der.as_ref())
}

/// PEM-encodes `der` under `label` with 64-column base64 lines.
pub fn encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Facts about a certificate used in logs, metrics and checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, lower-case hex.
    pub serial: String,
    /// URI SANs.
    pub uri_sans: Vec<String>,
    /// Not-before, seconds since the Unix epoch.
    pub not_before: i64,
    /// Not-after, seconds since the Unix epoch.
    pub not_after: i64,
    /// Whether basic constraints mark it a CA.
    pub is_ca: bool,
}

/// Parses a DER certificate's serial, URI SANs, validity and CA flag.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, PemError> {
    use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| PemError::X509(e.to_string()))?;
    let mut uri_sans = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                uri_sans.push((*uri).to_owned());
            }
        }
    }
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    Ok(CertInfo {
        serial: cert.raw_serial_as_string().replace(':', ""),
        uri_sans,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        is_ca,
    })
}
