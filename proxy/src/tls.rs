//! Data-path TLS: rustls configurations built from the compiled transport sockets and SDS secrets.
//!
//! [`TlsContexts`] turns a [`DownstreamTls`] or [`UpstreamTls`] plus the secrets it names into a
//! `rustls::ServerConfig` / `rustls::ClientConfig`, with Envoy's semantics:
//!
//! - the certificate is the `tls_certificate` secret named first (`default` in Istio); trust anchors
//!   are the `validation_context.trusted_ca` of the validation secret (`ROOTCA`);
//! - `match_typed_subject_alt_names` is applied to the peer leaf during the handshake: accepted if
//!   any matcher matches any SAN of the matcher's kind (an empty list accepts any SAN; a DNS `exact`
//!   matcher follows DNS wildcard rules, as Envoy's `dnsNameMatch`);
//! - an upstream context without trusted CAs does not verify the server at all (Envoy's behaviour),
//!   through the explicitly named [`NoServerVerification`];
//! - every setting we cannot honour is a [`TlsError`] naming the field (paths are relative to the
//!   `DownstreamTlsContext` / `UpstreamTlsContext`); [`check_downstream`] and [`check_upstream`] run
//!   those checks without secrets so the config compiler can NACK early.
//!
//! Envoy serves a client whose ALPN list shares nothing with ours without ALPN, where rustls
//! refuses the handshake: listeners that read the ClientHello first
//! (`tokio_rustls::LazyConfigAcceptor`) get Envoy's behaviour from
//! [`TlsContexts::server_config_for_hello`].
//!
//! Built configurations are cached per context and dropped whenever the [`SecretStore`] version
//! moves, so a rotated certificate applies to the next handshake and an unchanged context returns
//! the same `Arc` (callers may use `Arc::ptr_eq` to notice a rotation).

use std::{
    collections::HashMap,
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    sync::{Arc, Weak},
};

use arc_swap::ArcSwap;
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    Error as RustlsError, RootCertStore, ServerConfig, SignatureScheme, SupportedCipherSuite,
    SupportedProtocolVersion,
    client::{
        Resumption,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{CryptoProvider, SupportedKxGroup, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::{
        ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert,
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};
use tokio::sync::watch;
use waypoint_proto::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, certificate_validation_context, secret,
};
use waypoint_shared::pem;

use crate::{
    config::{
        matchers::StringPattern,
        tls::{CommonTls, DownstreamTls, SanKind, SanMatch, TlsVersion, UpstreamTls},
    },
    xds::sds::{SecretStore, data_source_bytes},
};

/// Why a TLS context could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    /// A secret the context names has not arrived from SDS yet (the context is warming).
    #[error("secret '{0}' is not ready (not received from SDS yet)")]
    SecretNotReady(String),
    /// A secret of the wrong shape, or whose material does not load.
    #[error("secret '{name}': {field}: {reason}")]
    BadSecret {
        /// The secret's name.
        name: String,
        /// The field of the `Secret` at fault (`tls_certificate.private_key`).
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A setting we cannot honour.
    #[error("{field}: {reason}")]
    Unsupported {
        /// The field, relative to the `DownstreamTlsContext` / `UpstreamTlsContext`.
        field: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("rustls: {0}")]
    Rustls(String),
}

fn unsupported(field: &str, reason: impl Into<String>) -> TlsError {
    TlsError::Unsupported {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

fn bad_secret(name: &str, field: &str, reason: impl fmt::Display) -> TlsError {
    TlsError::BadSecret {
        name: name.to_owned(),
        field: field.to_owned(),
        reason: reason.to_string(),
    }
}

const CERTIFICATES_FIELD: &str = "common_tls_context.tls_certificate_sds_secret_configs";
const TLS_PARAMS_FIELD: &str = "common_tls_context.tls_params";
const CIPHER_SUITES_FIELD: &str = "common_tls_context.tls_params.cipher_suites";
const ECDH_CURVES_FIELD: &str = "common_tls_context.tls_params.ecdh_curves";
const VALIDATION_SECRET_FIELD: &str =
    "common_tls_context.combined_validation_context.validation_context_sds_secret_config";
const MAX_VERIFY_DEPTH_FIELD: &str =
    "common_tls_context.combined_validation_context.default_validation_context.max_verify_depth";

/// Above this many cached contexts the cache starts over (contexts of replaced listeners and
/// clusters otherwise linger until the next secret change).
const MAX_CACHED: usize = 4096;

// ---------------------------------------------------------------------------------------------
// Settings: the part of a context that needs no secret.

/// The protocol settings of a context, checked and mapped to rustls.
#[derive(Debug)]
struct Settings {
    provider: Arc<CryptoProvider>,
    versions: Vec<&'static SupportedProtocolVersion>,
    alpn: Vec<Vec<u8>>,
    /// Most intermediates a peer chain may use (`max_verify_depth - 1`; `None`: webpki's limit).
    max_intermediates: Option<usize>,
}

/// A TLS 1.2 suite by its OpenSSL/BoringSSL name (what Envoy's `cipher_suites` holds) or IANA name.
fn tls12_suite(name: &str) -> Option<SupportedCipherSuite> {
    use rustls::crypto::ring::cipher_suite as cs;
    Some(match name {
        "ECDHE-ECDSA-AES128-GCM-SHA256" | "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" => {
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        }
        "ECDHE-ECDSA-AES256-GCM-SHA384" | "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" => {
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        }
        "ECDHE-ECDSA-CHACHA20-POLY1305" | "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256" => {
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        }
        "ECDHE-RSA-AES128-GCM-SHA256" | "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" => {
            cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        }
        "ECDHE-RSA-AES256-GCM-SHA384" | "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384" => {
            cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
        }
        "ECDHE-RSA-CHACHA20-POLY1305" | "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256" => {
            cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
        }
        _ => return None,
    })
}

/// TLS 1.3 suite names. BoringSSL does not let `cipher_suites` change the TLS 1.3 suites, so Envoy
/// ignores them there and so do we (rustls's TLS 1.3 suites are the same three).
const TLS13_SUITE_NAMES: &[&str] = &[
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
];

/// BoringSSL TLS 1.2 suites that rustls does not implement (CBC, static RSA key exchange, PSK,
/// 3DES). Harmless in a TLS 1.3-only context; an error where TLS 1.2 can be negotiated.
const BORINGSSL_ONLY_SUITES: &[&str] = &[
    "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-RSA-AES128-SHA",
    "ECDHE-ECDSA-AES256-SHA",
    "ECDHE-RSA-AES256-SHA",
    "ECDHE-PSK-AES128-CBC-SHA",
    "ECDHE-PSK-AES256-CBC-SHA",
    "ECDHE-PSK-CHACHA20-POLY1305",
    "AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-SHA",
    "AES256-SHA",
    "PSK-AES128-CBC-SHA",
    "PSK-AES256-CBC-SHA",
    "DES-CBC3-SHA",
];

/// The TLS 1.2 suites `cipher_suites` asks for, in order; `None` when it is empty (the defaults,
/// which are the same six ECDHE AEAD suites as Envoy's default list).
fn tls12_suites(
    names: &[String],
    tls12: bool,
) -> Result<Option<Vec<SupportedCipherSuite>>, TlsError> {
    if names.is_empty() {
        return Ok(None);
    }
    let mut out: Vec<SupportedCipherSuite> = Vec::new();
    // One entry may hold an OpenSSL list (`A:B`) or an equal-preference group (`[A|B]`); a group is
    // flattened in order (rustls has no equal preference: the first listed wins).
    for entry in names {
        let flat = entry
            .strip_prefix('[')
            .and_then(|e| e.strip_suffix(']'))
            .unwrap_or(entry);
        for name in flat.split([':', '|']).map(str::trim) {
            if let Some(suite) = tls12_suite(name) {
                if !out.contains(&suite) {
                    out.push(suite);
                }
            } else if TLS13_SUITE_NAMES.contains(&name) {
                continue;
            } else if BORINGSSL_ONLY_SUITES.contains(&name) {
                if tls12 {
                    return Err(unsupported(
                        CIPHER_SUITES_FIELD,
                        format!(
                            "cipher suite '{name}' is not implemented by rustls (supported: ECDHE-{{ECDSA,RSA}}-{{AES128-GCM-SHA256,AES256-GCM-SHA384,CHACHA20-POLY1305}})"
                        ),
                    ));
                }
            } else {
                return Err(unsupported(
                    CIPHER_SUITES_FIELD,
                    format!(
                        "unknown or unsupported cipher suite '{name}' (cipher list operators are not supported)"
                    ),
                ));
            }
        }
    }
    if tls12 && out.is_empty() {
        return Err(unsupported(
            CIPHER_SUITES_FIELD,
            "no TLS 1.2 cipher suite is left although TLS 1.2 may be negotiated",
        ));
    }
    Ok(Some(out))
}

/// A key exchange group by Envoy/BoringSSL curve name.
fn kx_group(name: &str) -> Option<&'static dyn SupportedKxGroup> {
    use rustls::crypto::ring::kx_group;
    match name {
        "X25519" => Some(kx_group::X25519),
        "P-256" | "prime256v1" | "secp256r1" => Some(kx_group::SECP256R1),
        "P-384" | "secp384r1" => Some(kx_group::SECP384R1),
        _ => None,
    }
}

/// `ecdh_curves`, in order; empty gives Envoy's default `X25519:P-256`.
fn kx_groups(names: &[String]) -> Result<Vec<&'static dyn SupportedKxGroup>, TlsError> {
    let names: Vec<&str> = if names.is_empty() {
        vec!["X25519", "P-256"]
    } else {
        names
            .iter()
            .flat_map(|n| n.split(':'))
            .map(str::trim)
            .collect()
    };
    let mut out: Vec<&'static dyn SupportedKxGroup> = Vec::new();
    for name in names {
        let group = kx_group(name).ok_or_else(|| {
            unsupported(
                ECDH_CURVES_FIELD,
                format!("curve '{name}' is not supported (supported: X25519, P-256, P-384)"),
            )
        })?;
        if !out.iter().any(|g| g.name() == group.name()) {
            out.push(group);
        }
    }
    Ok(out)
}

fn settings(common: &CommonTls) -> Result<Settings, TlsError> {
    let mut versions: Vec<&'static SupportedProtocolVersion> = Vec::new();
    let range = common.min_version..=common.max_version;
    if range.contains(&TlsVersion::Tls12) {
        versions.push(&rustls::version::TLS12);
    }
    if range.contains(&TlsVersion::Tls13) {
        versions.push(&rustls::version::TLS13);
    }
    if versions.is_empty() {
        return Err(unsupported(
            TLS_PARAMS_FIELD,
            "tls_minimum_protocol_version is above tls_maximum_protocol_version",
        ));
    }
    let tls12 = range.contains(&TlsVersion::Tls12);
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(chosen) = tls12_suites(&common.cipher_suites, tls12)? {
        let tls13 = provider
            .cipher_suites
            .iter()
            .copied()
            .filter(|s| s.version() == &rustls::version::TLS13);
        provider.cipher_suites = tls13.chain(chosen).collect();
    }
    provider.kx_groups = kx_groups(&common.ecdh_curves)?;
    let max_intermediates = match common.validation.as_ref().and_then(|v| v.max_verify_depth) {
        None => None,
        Some(0) => {
            return Err(unsupported(
                MAX_VERIFY_DEPTH_FIELD,
                "0 (a directly trusted leaf) is not supported: the chain must end at a trusted CA",
            ));
        }
        // Envoy's depth counts the trust anchor but not the leaf.
        Some(depth) => Some(usize::try_from(depth - 1).unwrap_or(usize::MAX)),
    };
    Ok(Settings {
        provider: Arc::new(provider),
        versions,
        alpn: common.alpn.iter().map(|p| p.as_bytes().to_vec()).collect(),
        max_intermediates,
    })
}

fn one_certificate(common: &CommonTls) -> Result<Option<&str>, TlsError> {
    match common.certificates.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one.name.as_str())),
        more => Err(unsupported(
            CERTIFICATES_FIELD,
            format!(
                "only one certificate is supported (got {}; Envoy would pick one per handshake)",
                more.len()
            ),
        )),
    }
}

fn check_validation(common: &CommonTls) -> Result<(), TlsError> {
    if let Some(v) = &common.validation
        && v.trust.is_none()
        && !v.san_matchers.is_empty()
    {
        return Err(unsupported(
            VALIDATION_SECRET_FIELD,
            "SAN matchers need trusted CAs to verify the chain",
        ));
    }
    Ok(())
}

/// Checks the settings of a server context that need no secret (for an early NACK).
pub fn check_downstream(ctx: &DownstreamTls) -> Result<(), TlsError> {
    downstream_settings(ctx).map(drop)
}

fn downstream_settings(ctx: &DownstreamTls) -> Result<Settings, TlsError> {
    let s = settings(&ctx.common)?;
    if one_certificate(&ctx.common)?.is_none() {
        return Err(unsupported(
            CERTIFICATES_FIELD,
            "a server certificate is required",
        ));
    }
    check_validation(&ctx.common)?;
    if ctx.require_client_certificate
        && ctx
            .common
            .validation
            .as_ref()
            .is_none_or(|v| v.trust.is_none())
    {
        return Err(unsupported(
            "require_client_certificate",
            "requiring a client certificate needs a validation context with trusted CAs",
        ));
    }
    if ctx.session_timeout.is_some() {
        return Err(unsupported(
            "session_timeout",
            "rustls session lifetimes are not configurable",
        ));
    }
    Ok(s)
}

/// Checks the settings of a client context that need no secret (for an early NACK).
pub fn check_upstream(ctx: &UpstreamTls) -> Result<(), TlsError> {
    upstream_settings(ctx).map(drop)
}

fn upstream_settings(
    ctx: &UpstreamTls,
) -> Result<(Settings, Option<ServerName<'static>>), TlsError> {
    let s = settings(&ctx.common)?;
    one_certificate(&ctx.common)?;
    check_validation(&ctx.common)?;
    let sni = match &ctx.sni {
        None => None,
        Some(sni) => Some(
            ServerName::try_from(sni.clone())
                .map_err(|e| unsupported("sni", format!("'{sni}' is not a server name: {e}")))?,
        ),
    };
    Ok((s, sni))
}

// ---------------------------------------------------------------------------------------------
// Subject alternative names.
//
// A small DER walker rather than a parser crate: the proxy crate does not depend on x509-parser,
// webpki has verified the certificate before its SANs are read, and every read is bounds-checked
// (a malformed certificate yields no SANs, never a panic).

/// One subject alternative name of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectAltName {
    /// DNS, URI, IP address or e-mail.
    pub kind: SanKind,
    /// The name as Envoy prints it (IP addresses in their usual text form).
    pub value: String,
}

const DER_SEQUENCE: u8 = 0x30;
const DER_OCTET_STRING: u8 = 0x04;
const DER_OID: u8 = 0x06;
/// `[3] EXPLICIT Extensions` in a `TBSCertificate`.
const DER_EXTENSIONS: u8 = 0xa3;
/// `id-ce-subjectAltName`, 2.5.29.17.
const SAN_OID: &[u8] = &[0x55, 0x1d, 0x11];

/// One DER element: its tag, its contents and what follows it.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    // Multi-byte tags never occur in the certificate fields read here.
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, rest) = rest.split_at_checked(n)?;
        (
            bytes
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b)),
            rest,
        )
    };
    let (contents, rest) = rest.split_at_checked(len)?;
    Some((tag, contents, rest))
}

/// The contents of `input`'s first element if it has `tag`.
fn der_expect(input: &[u8], tag: u8) -> Option<&[u8]> {
    der_element(input).and_then(|(t, contents, _)| (t == tag).then_some(contents))
}

/// The elements inside a constructed value's contents (stops at the first malformed one).
fn der_elements(mut input: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (tag, contents, rest) = der_element(input)?;
        input = rest;
        Some((tag, contents))
    })
}

/// The `extnValue` of the subjectAltName extension of a DER certificate.
fn san_extension(cert: &[u8]) -> Option<&[u8]> {
    let cert = der_expect(cert, DER_SEQUENCE)?;
    let tbs = der_expect(cert, DER_SEQUENCE)?;
    let (_, extensions) = der_elements(tbs).find(|(tag, _)| *tag == DER_EXTENSIONS)?;
    let extensions = der_expect(extensions, DER_SEQUENCE)?;
    der_elements(extensions)
        .filter(|(tag, _)| *tag == DER_SEQUENCE)
        .find_map(|(_, ext)| {
            let mut fields = der_elements(ext);
            let (tag, oid) = fields.next()?;
            if tag != DER_OID || oid != SAN_OID {
                return None;
            }
            // `critical` (a BOOLEAN) may come first.
            fields
                .find(|(tag, _)| *tag == DER_OCTET_STRING)
                .map(|(_, value)| value)
        })
}

fn ip_text(bytes: &[u8]) -> Option<String> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Some(Ipv4Addr::from(v4).to_string());
    }
    <[u8; 16]>::try_from(bytes)
        .ok()
        .map(|v6| Ipv6Addr::from(v6).to_string())
}

/// The DNS, URI, IP and e-mail SANs of a DER certificate, in certificate order (empty if it has
/// none or does not parse; other name forms are skipped).
pub fn subject_alt_names(der: &[u8]) -> Vec<SubjectAltName> {
    let Some(names) = san_extension(der).and_then(|v| der_expect(v, DER_SEQUENCE)) else {
        return Vec::new();
    };
    let text = |v: &[u8]| std::str::from_utf8(v).ok().map(str::to_owned);
    der_elements(names)
        .filter_map(|(tag, value)| {
            // GeneralName context tags (IMPLICIT): [1] rfc822Name, [2] dNSName, [6] URI, [7] iPAddress.
            let (kind, value) = match tag {
                0x81 => (SanKind::Email, text(value)?),
                0x82 => (SanKind::Dns, text(value)?),
                0x86 => (SanKind::Uri, text(value)?),
                0x87 => (SanKind::IpAddress, ip_text(value)?),
                _ => return None,
            };
            Some(SubjectAltName { kind, value })
        })
        .collect()
}

fn first_uri_san(der: &[u8]) -> Option<String> {
    subject_alt_names(der)
        .into_iter()
        .find(|s| s.kind == SanKind::Uri)
        .map(|s| s.value)
}

/// The first URI SAN of the peer's leaf certificate (`%DOWNSTREAM_PEER_URI_SAN%`, the SPIFFE id).
pub fn peer_uri_san(conn: &CommonState) -> Option<String> {
    conn.peer_certificates()?
        .first()
        .and_then(|c| first_uri_san(c.as_ref()))
}

/// Envoy's `Utility::dnsNameMatch`: `name` equals `san` ignoring ASCII case, or `san` is `*.rest`
/// and `name` is a single label followed by `.rest`.
fn dns_name_match(name: &str, san: &str) -> bool {
    let name = name.to_ascii_lowercase();
    let san = san.to_ascii_lowercase();
    if name == san {
        return true;
    }
    match san.strip_prefix('*') {
        Some(suffix) if suffix.starts_with('.') => name
            .strip_suffix(suffix)
            .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        _ => false,
    }
}

fn san_match(m: &SanMatch, san: &SubjectAltName) -> bool {
    if m.kind != san.kind {
        return false;
    }
    // For DNS SANs an exact matcher follows DNS wildcard rules (Envoy's `StringSanMatcher`).
    if let (SanKind::Dns, StringPattern::Exact(name)) = (m.kind, &m.matcher.pattern) {
        return dns_name_match(name, &san.value);
    }
    m.matcher.matches(&san.value)
}

/// Envoy's rule: accepted if any matcher matches any SAN of its kind; no matchers accepts any.
fn sans_match(sans: &[SubjectAltName], matchers: &[SanMatch]) -> bool {
    matchers.is_empty()
        || matchers
            .iter()
            .any(|m| sans.iter().any(|san| san_match(m, san)))
}

fn check_peer_sans(
    end_entity: &CertificateDer<'_>,
    matchers: &[SanMatch],
) -> Result<(), RustlsError> {
    if matchers.is_empty() {
        return Ok(());
    }
    let sans = subject_alt_names(end_entity.as_ref());
    if sans_match(&sans, matchers) {
        Ok(())
    } else {
        tracing::debug!(target: "tls", ?sans, "peer certificate SANs match none of the configured matchers");
        Err(RustlsError::InvalidCertificate(
            CertificateError::NotValidForName,
        ))
    }
}

/// At most `max` of the peer's intermediates (a path can then not be longer: `max_verify_depth`).
fn limited<T>(intermediates: &[T], max: Option<usize>) -> &[T] {
    match max {
        Some(n) => intermediates.get(..n).unwrap_or(intermediates),
        None => intermediates,
    }
}

// ---------------------------------------------------------------------------------------------
// Verifiers.

/// Verifies a downstream client: webpki chain to the trusted CAs, then the SAN matchers.
#[derive(Debug)]
struct DownstreamClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    matchers: Vec<SanMatch>,
    max_intermediates: Option<usize>,
}

impl ClientCertVerifier for DownstreamClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, RustlsError> {
        let verified = self.inner.verify_client_cert(
            end_entity,
            limited(intermediates, self.max_intermediates),
            now,
        )?;
        check_peer_sans(end_entity, &self.matchers)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Which name an upstream server certificate is checked for, besides its chain.
#[derive(Debug)]
enum NameCheck {
    /// The SAN matchers (Istio: URI SANs, no DNS name check); none: any name.
    Matchers,
    /// No matchers but an `sni`: the usual webpki check of the certificate for that name.
    Sni(ServerName<'static>),
    /// `auto_sni_san_validation`: the DNS name the connection was opened for replaces the
    /// matchers (an IP address, which sends no SNI, falls back to them).
    ConnectName,
}

/// Verifies an upstream server: webpki chain to the trusted CAs, then [`NameCheck`].
#[derive(Debug)]
struct UpstreamServerVerifier {
    roots: Arc<RootCertStore>,
    matchers: Vec<SanMatch>,
    names: NameCheck,
    max_intermediates: Option<usize>,
    algs: WebPkiSupportedAlgorithms,
}

/// The handshake-signature half of a server verifier: checked with the provider's algorithms in
/// `self.algs`, whatever the certificate policy is.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, RustlsError> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, RustlsError> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

impl ServerCertVerifier for UpstreamServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, RustlsError> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            limited(intermediates, self.max_intermediates),
            now,
            self.algs.all,
        )?;
        match &self.names {
            NameCheck::Sni(name) => rustls::client::verify_server_name(&cert, name)?,
            NameCheck::ConnectName if matches!(server_name, ServerName::DnsName(_)) => {
                rustls::client::verify_server_name(&cert, server_name)?
            }
            NameCheck::ConnectName | NameCheck::Matchers => {
                check_peer_sans(end_entity, &self.matchers)?
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

/// Envoy's behaviour for an `UpstreamTlsContext` without trusted CAs: the server's certificate
/// is not verified at all. Only the handshake signature is checked (it proves the peer holds the
/// key of the certificate it sent, nothing more).
#[derive(Debug)]
pub struct NoServerVerification {
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NoServerVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, RustlsError> {
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

/// Serves the one certificate of a context; refuses handshakes without SNI if `require_sni`.
#[derive(Debug)]
struct OneCertificate {
    key: Arc<CertifiedKey>,
    require_sni: bool,
}

impl ResolvesServerCert for OneCertificate {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if self.require_sni && hello.server_name().is_none() {
            tracing::debug!(target: "tls", "refusing a handshake without SNI (require_sni)");
            return None;
        }
        Some(self.key.clone())
    }
}

// ---------------------------------------------------------------------------------------------
// Secrets.

fn pem_field(
    name: &str,
    field: &str,
    ds: Option<&waypoint_proto::envoy::config::core::v3::DataSource>,
) -> Result<String, TlsError> {
    let ds = ds.ok_or_else(|| bad_secret(name, field, "missing"))?;
    let bytes = data_source_bytes(ds).map_err(|e| bad_secret(name, field, e))?;
    String::from_utf8(bytes).map_err(|_| bad_secret(name, field, "not UTF-8 PEM text"))
}

fn shape(secret: &Secret) -> &'static str {
    match &secret.r#type {
        None => "no content",
        Some(secret::Type::TlsCertificate(_)) => "tls_certificate",
        Some(secret::Type::ValidationContext(_)) => "validation_context",
        Some(secret::Type::SessionTicketKeys(_)) => "session_ticket_keys",
        Some(secret::Type::GenericSecret(_)) => "generic_secret",
    }
}

fn check_tls_certificate(name: &str, t: &TlsCertificate) -> Result<(), TlsError> {
    let set: [(&str, bool); 6] = [
        ("password", t.password.is_some()),
        ("ocsp_staple", t.ocsp_staple.is_some()),
        (
            "signed_certificate_timestamp",
            !t.signed_certificate_timestamp.is_empty(),
        ),
        ("private_key_provider", t.private_key_provider.is_some()),
        ("pkcs12", t.pkcs12.is_some()),
        ("watched_directory", t.watched_directory.is_some()),
    ];
    match set.iter().find(|(_, on)| *on) {
        Some((field, _)) => Err(bad_secret(
            name,
            &format!("tls_certificate.{field}"),
            "not supported",
        )),
        None => Ok(()),
    }
}

// `match_subject_alt_names` is deprecated in Envoy but still a field a secret may set: reject it.
#[allow(deprecated)]
fn check_validation_context(name: &str, v: &CertificateValidationContext) -> Result<(), TlsError> {
    let verify = certificate_validation_context::TrustChainVerification::VerifyTrustChain as i32;
    let set: [(&str, bool); 14] = [
        (
            "ca_certificate_provider_instance",
            v.ca_certificate_provider_instance.is_some(),
        ),
        ("system_root_certs", v.system_root_certs.is_some()),
        ("watched_directory", v.watched_directory.is_some()),
        (
            "verify_certificate_spki",
            !v.verify_certificate_spki.is_empty(),
        ),
        (
            "verify_certificate_hash",
            !v.verify_certificate_hash.is_empty(),
        ),
        (
            "match_typed_subject_alt_names",
            !v.match_typed_subject_alt_names.is_empty(),
        ),
        (
            "match_subject_alt_names",
            !v.match_subject_alt_names.is_empty(),
        ),
        (
            "require_signed_certificate_timestamp",
            v.require_signed_certificate_timestamp
                .as_ref()
                .is_some_and(|b| b.value),
        ),
        ("crl", v.crl.is_some()),
        ("allow_expired_certificate", v.allow_expired_certificate),
        (
            "trust_chain_verification",
            v.trust_chain_verification != verify,
        ),
        (
            "custom_validator_config",
            v.custom_validator_config.is_some(),
        ),
        ("only_verify_leaf_cert_crl", v.only_verify_leaf_cert_crl),
        ("max_verify_depth", v.max_verify_depth.is_some()),
    ];
    match set.iter().find(|(_, on)| *on) {
        Some((field, _)) => Err(bad_secret(
            name,
            &format!("validation_context.{field}"),
            "not supported in an SDS validation secret (only trusted_ca)",
        )),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// The contexts and their cache.

/// A built server configuration and what we remember about it.
#[derive(Clone)]
struct BuiltServer {
    config: Arc<ServerConfig>,
    local_uri_san: Option<String>,
}

type ServerEntry = Result<BuiltServer, TlsError>;
type ClientEntry = Result<Arc<ClientConfig>, TlsError>;

/// Built configurations of one secret-store version. Keys are the context's `Debug` text: all
/// of its settings and secret names (formatting it costs far less than a handshake).
#[derive(Clone, Default)]
struct Cache {
    version: u64,
    servers: HashMap<String, ServerEntry>,
    clients: HashMap<String, ClientEntry>,
    /// Our URI SAN by server configuration address. Kept across versions (connections outlive
    /// rotations); an entry is dropped once its configuration is (and an address reused by a new
    /// configuration is overwritten when that one is built).
    local_sans: HashMap<usize, (Weak<ServerConfig>, Option<String>)>,
}

/// A build result and where the cache keeps it.
trait CacheEntry: Clone {
    fn map(cache: &Cache) -> &HashMap<String, Self>;
    fn map_mut(cache: &mut Cache) -> &mut HashMap<String, Self>;
    /// Bookkeeping when this entry is cached.
    fn cached_in(&self, _cache: &mut Cache) {}
}

impl CacheEntry for ServerEntry {
    fn map(cache: &Cache) -> &HashMap<String, Self> {
        &cache.servers
    }

    fn map_mut(cache: &mut Cache) -> &mut HashMap<String, Self> {
        &mut cache.servers
    }

    fn cached_in(&self, cache: &mut Cache) {
        if let Ok(s) = self {
            cache.local_sans.retain(|_, (w, _)| w.strong_count() > 0);
            cache.local_sans.insert(
                Arc::as_ptr(&s.config).addr(),
                (Arc::downgrade(&s.config), s.local_uri_san.clone()),
            );
        }
    }
}

impl CacheEntry for ClientEntry {
    fn map(cache: &Cache) -> &HashMap<String, Self> {
        &cache.clients
    }

    fn map_mut(cache: &mut Cache) -> &mut HashMap<String, Self> {
        &mut cache.clients
    }
}

/// rustls configurations built from transport sockets and SDS secrets, cached until a secret
/// changes. The hot path is lock-free: one `ArcSwap` load and a map lookup.
pub struct TlsContexts {
    secrets: Arc<SecretStore>,
    version: watch::Receiver<u64>,
    cache: ArcSwap<Cache>,
}

impl fmt::Debug for TlsContexts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cache = self.cache.load();
        f.debug_struct("TlsContexts")
            .field("version", &cache.version)
            .field("servers", &cache.servers.len())
            .field("clients", &cache.clients.len())
            .finish_non_exhaustive()
    }
}

impl TlsContexts {
    /// Contexts over `secrets`.
    pub fn new(secrets: Arc<SecretStore>) -> TlsContexts {
        let version = secrets.subscribe();
        TlsContexts {
            secrets,
            version,
            cache: ArcSwap::from_pointee(Cache::default()),
        }
    }

    /// The server configuration of `ctx` with the current secrets.
    pub fn server_config(&self, ctx: &DownstreamTls) -> Result<Arc<ServerConfig>, TlsError> {
        let entry: ServerEntry = self.cached(format!("{ctx:?}"), || self.build_server(ctx));
        entry.map(|b| b.config)
    }

    /// The server configuration of `ctx` for a connection whose ClientHello is `hello` (read
    /// with `tokio_rustls::LazyConfigAcceptor`). Like Envoy, a client whose ALPN list shares
    /// nothing with ours is served without ALPN (rustls alone would refuse the handshake).
    pub fn server_config_for_hello(
        &self,
        ctx: &DownstreamTls,
        hello: &ClientHello<'_>,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let config = self.server_config(ctx)?;
        let overlap = match hello.alpn() {
            None => true,
            Some(mut offered) => {
                config.alpn_protocols.is_empty()
                    || offered.any(|p| config.alpn_protocols.iter().any(|ours| ours == p))
            }
        };
        if overlap {
            return Ok(config);
        }
        let local = self.local_uri_san(&config);
        let entry: ServerEntry = self.cached(format!("no ALPN: {ctx:?}"), || {
            let mut plain = (*config).clone();
            plain.alpn_protocols.clear();
            Ok(BuiltServer {
                config: Arc::new(plain),
                local_uri_san: local,
            })
        });
        entry.map(|b| b.config)
    }

    /// The client configuration of `ctx` with the current secrets. The caller passes the SNI
    /// (`ctx.sni`, else the host name for `auto_host_sni`, else the IP address: no SNI) as the
    /// `ServerName` of the connection.
    pub fn client_config(&self, ctx: &UpstreamTls) -> Result<Arc<ClientConfig>, TlsError> {
        self.cached(format!("{ctx:?}"), || self.build_client(ctx))
    }

    /// Our URI SAN (the leaf of the certificate secret) in a server configuration this built
    /// (`%DOWNSTREAM_LOCAL_URI_SAN%`).
    pub fn local_uri_san(&self, config: &ServerConfig) -> Option<String> {
        let addr = std::ptr::from_ref(config).addr();
        self.cache
            .load()
            .local_sans
            .get(&addr)
            .and_then(|(_, san)| san.clone())
    }

    /// The cached entry for `key` at the current secret version, or `build`'s, cached. Failures
    /// are cached too (a missing secret arriving moves the version). Concurrent builders of one
    /// key all get the first cached value, so an unchanged context always yields the same `Arc`.
    fn cached<T: CacheEntry>(&self, key: String, build: impl FnOnce() -> T) -> T {
        // Read before the secrets: a build that sees newer secrets is at worst rebuilt once.
        let version = *self.version.borrow();
        {
            let cache = self.cache.load();
            if cache.version == version
                && let Some(b) = T::map(&cache).get(&key)
            {
                return b.clone();
            }
        }
        let built = build();
        let mut out = None;
        self.cache.rcu(|cur| {
            if cur.version > version {
                // Newer secrets arrived meanwhile: do not cache what may be stale.
                out = Some(built.clone());
                return Arc::clone(cur);
            }
            if cur.version == version
                && let Some(b) = T::map(cur).get(&key)
            {
                out = Some(b.clone());
                return Arc::clone(cur);
            }
            let mut next =
                if cur.version == version && cur.servers.len() + cur.clients.len() < MAX_CACHED {
                    (**cur).clone()
                } else {
                    Cache {
                        version,
                        local_sans: cur.local_sans.clone(),
                        ..Cache::default()
                    }
                };
            built.cached_in(&mut next);
            T::map_mut(&mut next).insert(key.clone(), built.clone());
            out = Some(built.clone());
            Arc::new(next)
        });
        out.unwrap_or(built)
    }

    fn secret(&self, name: &str) -> Result<Arc<Secret>, TlsError> {
        self.secrets
            .get(name)
            .ok_or_else(|| TlsError::SecretNotReady(name.to_owned()))
    }

    /// The chain (leaf first) and key of the `tls_certificate` secret `name`.
    fn tls_certificate(
        &self,
        name: &str,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let secret = self.secret(name)?;
        let Some(secret::Type::TlsCertificate(t)) = &secret.r#type else {
            return Err(bad_secret(
                name,
                "tls_certificate",
                format!("a certificate secret is needed, got {}", shape(&secret)),
            ));
        };
        check_tls_certificate(name, t)?;
        let field = "tls_certificate.certificate_chain";
        let chain = pem::certs(&pem_field(name, field, t.certificate_chain.as_ref())?)
            .map_err(|e| bad_secret(name, field, e))?;
        let field = "tls_certificate.private_key";
        let key = pem::private_key(&pem_field(name, field, t.private_key.as_ref())?)
            .map_err(|e| bad_secret(name, field, e))?;
        Ok((chain, key))
    }

    /// The trust anchors of the `validation_context` secret `name`.
    fn trust_roots(&self, name: &str) -> Result<Arc<RootCertStore>, TlsError> {
        let secret = self.secret(name)?;
        let Some(secret::Type::ValidationContext(v)) = &secret.r#type else {
            return Err(bad_secret(
                name,
                "validation_context",
                format!(
                    "a validation context secret is needed, got {}",
                    shape(&secret)
                ),
            ));
        };
        check_validation_context(name, v)?;
        let field = "validation_context.trusted_ca";
        let certs = pem::certs(&pem_field(name, field, v.trusted_ca.as_ref())?)
            .map_err(|e| bad_secret(name, field, e))?;
        let mut roots = RootCertStore::empty();
        for (i, cert) in certs.into_iter().enumerate() {
            roots
                .add(cert)
                .map_err(|e| bad_secret(name, &format!("{field}[{i}]"), e))?;
        }
        Ok(Arc::new(roots))
    }

    /// Trust anchors and SAN matchers of `common`, `None` when the peer is not verified.
    fn peer_roots(&self, common: &CommonTls) -> Result<Option<Arc<RootCertStore>>, TlsError> {
        match common.validation.as_ref().and_then(|v| v.trust.as_ref()) {
            None => Ok(None),
            Some(trust) => self.trust_roots(&trust.name).map(Some),
        }
    }

    fn build_server(&self, ctx: &DownstreamTls) -> Result<BuiltServer, TlsError> {
        let s = downstream_settings(ctx)?;
        let name = one_certificate(&ctx.common)?
            .ok_or_else(|| unsupported(CERTIFICATES_FIELD, "a server certificate is required"))?;
        let (chain, key) = self.tls_certificate(name)?;
        let local_uri_san = chain.first().and_then(|c| first_uri_san(c.as_ref()));
        let key = CertifiedKey::from_der(chain, key, &s.provider)
            .map_err(|e| bad_secret(name, "tls_certificate.private_key", e))?;
        let resolver = Arc::new(OneCertificate {
            key: Arc::new(key),
            require_sni: ctx.require_sni,
        });
        let builder = ServerConfig::builder_with_provider(s.provider.clone())
            .with_protocol_versions(&s.versions)
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let builder = match self.peer_roots(&ctx.common)? {
            None => builder.with_no_client_auth(),
            Some(roots) => {
                let mut inner =
                    WebPkiClientVerifier::builder_with_provider(roots, s.provider.clone());
                if !ctx.require_client_certificate {
                    inner = inner.allow_unauthenticated();
                }
                let inner = inner
                    .build()
                    .map_err(|e| TlsError::Rustls(format!("client verifier: {e}")))?;
                builder.with_client_cert_verifier(Arc::new(DownstreamClientVerifier {
                    inner,
                    matchers: ctx
                        .common
                        .validation
                        .as_ref()
                        .map(|v| v.san_matchers.clone())
                        .unwrap_or_default(),
                    max_intermediates: s.max_intermediates,
                }))
            }
        };
        let mut config = builder.with_cert_resolver(resolver);
        config.alpn_protocols = s.alpn;
        // Envoy's server contexts prefer the server's cipher order (its default list uses
        // equal-preference groups, which only mean something then).
        config.ignore_client_order = true;
        // rustls issues no stateless tickets (no ticketer), so `disable_session_tickets` holds
        // as is; resumption is through the per-configuration session cache, dropped with it.
        if ctx.disable_session_cache {
            config.session_storage = Arc::new(NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
        }
        Ok(BuiltServer {
            config: Arc::new(config),
            local_uri_san,
        })
    }

    fn build_client(&self, ctx: &UpstreamTls) -> Result<Arc<ClientConfig>, TlsError> {
        let (s, sni) = upstream_settings(ctx)?;
        let algs = s.provider.signature_verification_algorithms;
        let matchers = ctx
            .common
            .validation
            .as_ref()
            .map(|v| v.san_matchers.clone())
            .unwrap_or_default();
        let verifier: Arc<dyn ServerCertVerifier> = match self.peer_roots(&ctx.common)? {
            None => Arc::new(NoServerVerification { algs }),
            Some(roots) => {
                let names = match sni {
                    _ if ctx.auto_sni_san_validation => NameCheck::ConnectName,
                    Some(name) if matchers.is_empty() => NameCheck::Sni(name),
                    _ => NameCheck::Matchers,
                };
                Arc::new(UpstreamServerVerifier {
                    roots,
                    matchers,
                    names,
                    max_intermediates: s.max_intermediates,
                    algs,
                })
            }
        };
        let builder = ClientConfig::builder_with_provider(s.provider.clone())
            .with_protocol_versions(&s.versions)
            .map_err(|e| TlsError::Rustls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match one_certificate(&ctx.common)? {
            None => builder.with_no_client_auth(),
            Some(name) => {
                let (chain, key) = self.tls_certificate(name)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| bad_secret(name, "tls_certificate.private_key", e))?
            }
        };
        config.alpn_protocols = s.alpn;
        // HBONE (no `sni`) sends none; rustls never sends an IP address as SNI.
        config.enable_sni = ctx.sni.is_some() || ctx.auto_host_sni;
        config.resumption = match ctx.max_session_keys {
            Some(0) => Resumption::disabled(),
            Some(n) => Resumption::in_memory_sessions(usize::try_from(n).unwrap_or(usize::MAX)),
            // Envoy's default `max_session_keys` is 1.
            None => Resumption::in_memory_sessions(1),
        };
        Ok(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        net::Ipv4Addr,
        pin::Pin,
        sync::{Mutex, PoisonError},
        time::Duration,
    };

    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    use rustls::{CipherSuite, NamedGroup, ProtocolVersion};
    use tokio::{
        net::{TcpListener, TcpStream},
        sync::mpsc,
    };
    use tokio_stream::{
        Stream,
        wrappers::{ReceiverStream, TcpListenerStream},
    };
    use tonic::{Request, Response, Status, Streaming};
    use waypoint_proto::{
        envoy::{
            config::core::v3::{DataSource, data_source::Specifier},
            service::{
                discovery::v3::{
                    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest,
                    DiscoveryResponse,
                },
                secret::v3::secret_discovery_service_server::{
                    SecretDiscoveryService, SecretDiscoveryServiceServer,
                },
            },
        },
        google::protobuf::Any,
        resource::SECRET_TYPE,
    };

    use super::*;
    use crate::config::{
        matchers::StringMatch,
        source::{ConfigSourceSpec, Source},
        tls::{SdsSecret, Validation},
    };

    const WAIT: Duration = Duration::from_secs(20);
    const WAYPOINT: &str = "spiffe://cluster.local/ns/default/sa/waypoint";
    const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";

    // -- Certificates.

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

    /// An intermediate CA under `parent`; its `pem` is what a leaf's chain appends.
    fn intermediate(parent: &Ca) -> Ca {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params
            .signed_by(&key, &parent.issuer)
            .expect("intermediate");
        Ca {
            issuer: Issuer::new(params, key),
            pem: cert.pem(),
        }
    }

    /// A leaf with `sans` signed by `ca`: (chain PEM, key PEM).
    fn leaf(ca: &Ca, sans: Vec<SanType>) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = sans;
        let cert = params.signed_by(&key, &ca.issuer).expect("leaf");
        (cert.pem(), key.serialize_pem())
    }

    fn uri(u: &str) -> SanType {
        SanType::URI(u.try_into().expect("uri"))
    }

    fn dns(d: &str) -> SanType {
        SanType::DnsName(d.try_into().expect("dns"))
    }

    fn leaf_der(chain_pem: &str) -> Vec<u8> {
        pem::certs(chain_pem).expect("pem")[0].to_vec()
    }

    fn inline(s: &str) -> Option<DataSource> {
        Some(DataSource {
            specifier: Some(Specifier::InlineBytes(s.as_bytes().to_vec())),
            ..Default::default()
        })
    }

    fn cert_secret(name: &str, (chain, key): &(String, String)) -> Secret {
        Secret {
            name: name.into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline(chain),
                private_key: inline(key),
                ..Default::default()
            })),
        }
    }

    fn root_secret(name: &str, ca_pem: &str) -> Secret {
        Secret {
            name: name.into(),
            r#type: Some(secret::Type::ValidationContext(
                CertificateValidationContext {
                    trusted_ca: inline(ca_pem),
                    ..Default::default()
                },
            )),
        }
    }

    // -- A scripted SDS server: the latest secret pushed for a name goes to every stream for it.

    type Out = mpsc::Sender<Result<DiscoveryResponse, Status>>;
    type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

    #[derive(Default)]
    struct SdsState {
        version: u64,
        secrets: HashMap<String, Secret>,
        streams: HashMap<String, Vec<Out>>,
    }

    #[derive(Clone, Default)]
    struct FakeSds {
        state: Arc<Mutex<SdsState>>,
    }

    fn response(version: u64, secret: &Secret) -> DiscoveryResponse {
        use prost::Message as _;
        DiscoveryResponse {
            version_info: version.to_string(),
            resources: vec![Any {
                type_url: SECRET_TYPE.to_owned(),
                value: secret.encode_to_vec(),
            }],
            type_url: SECRET_TYPE.to_owned(),
            nonce: version.to_string(),
            ..Default::default()
        }
    }

    impl FakeSds {
        async fn serve(&self, secret: Secret) {
            let (resp, outs) = {
                let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                s.version += 1;
                let resp = response(s.version, &secret);
                s.secrets.insert(secret.name.clone(), secret.clone());
                (
                    resp,
                    s.streams.get(&secret.name).cloned().unwrap_or_default(),
                )
            };
            for out in outs {
                let _ = out.send(Ok(resp.clone())).await;
            }
        }
    }

    #[tonic::async_trait]
    impl SecretDiscoveryService for FakeSds {
        type StreamSecretsStream = BoxStream<DiscoveryResponse>;
        type DeltaSecretsStream = BoxStream<DeltaDiscoveryResponse>;

        async fn stream_secrets(
            &self,
            request: Request<Streaming<DiscoveryRequest>>,
        ) -> Result<Response<Self::StreamSecretsStream>, Status> {
            let mut requests = request.into_inner();
            let (tx, rx) = mpsc::channel(8);
            let state = self.state.clone();
            tokio::spawn(async move {
                let Ok(Some(first)) = requests.message().await else {
                    return;
                };
                let Some(name) = first.resource_names.first().cloned() else {
                    return;
                };
                let current = {
                    let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
                    s.streams.entry(name.clone()).or_default().push(tx.clone());
                    s.secrets
                        .get(&name)
                        .map(|secret| response(s.version, secret))
                };
                if let Some(r) = current {
                    let _ = tx.send(Ok(r)).await;
                }
                // ACKs until the client goes away.
                while let Ok(Some(_)) = requests.message().await {}
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

    /// One proxy's TLS side: a scripted SDS server, the real SDS client filling a store (it
    /// subscribes `default` and `ROOTCA`), and contexts over that store.
    struct Proxy {
        sds: FakeSds,
        store: Arc<SecretStore>,
        tls: TlsContexts,
    }

    impl Proxy {
        async fn start() -> Proxy {
            let sds = FakeSds::default();
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let port = listener.local_addr().expect("addr").port();
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(SecretDiscoveryServiceServer::new(sds.clone()))
                    .serve_with_incoming(TcpListenerStream::new(listener)),
            );
            let bootstrap = crate::bootstrap::from_json(serde_json::json!({
                "node": {"id": "waypoint~127.0.0.1~w.default~default.svc.cluster.local", "cluster": "w.default"},
                "static_resources": {"clusters": [{
                    "name": "sds-grpc",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {"cluster_name": "sds-grpc", "endpoints": [{"lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
                    ]}]}
                }]}
            }))
            .expect("bootstrap");
            let server = crate::server::Server::new(crate::cli::Options::default(), bootstrap);
            let store = Arc::new(SecretStore::default());
            tokio::spawn(crate::xds::sds::run(server, store.clone()));
            Proxy {
                tls: TlsContexts::new(store.clone()),
                sds,
                store,
            }
        }

        /// Serves `secret` over SDS and waits until the store holds it.
        async fn push(&self, secret: Secret) {
            let mut changed = self.store.subscribe();
            self.sds.serve(secret.clone()).await;
            tokio::time::timeout(WAIT, async {
                while self.store.get(&secret.name).as_deref() != Some(&secret) {
                    changed.changed().await.expect("store alive");
                }
            })
            .await
            .expect("the SDS client accepts the secret in time");
        }

        /// A proxy whose `default` is a leaf of `issuer` with `sans` and whose `ROOTCA` is `trust`.
        async fn identity(issuer: &Ca, sans: Vec<SanType>, trust: &Ca) -> Proxy {
            let p = Proxy::start().await;
            p.push(cert_secret("default", &leaf(issuer, sans))).await;
            p.push(root_secret("ROOTCA", &trust.pem)).await;
            p
        }
    }

    // -- Contexts.

    fn sds_ref(name: &str) -> SdsSecret {
        SdsSecret {
            name: name.into(),
            source: ConfigSourceSpec {
                source: Source::Grpc {
                    cluster: "sds-grpc".into(),
                    delta: false,
                },
                initial_fetch_timeout: None,
            },
        }
    }

    fn san(kind: SanKind, pattern: StringPattern) -> SanMatch {
        SanMatch {
            kind,
            matcher: StringMatch {
                pattern,
                ignore_case: false,
            },
        }
    }

    fn uri_prefix(p: &str) -> SanMatch {
        san(SanKind::Uri, StringPattern::Prefix(p.into()))
    }

    fn uri_exact(u: &str) -> SanMatch {
        san(SanKind::Uri, StringPattern::Exact(u.into()))
    }

    /// TLS 1.3, `h2`, the given secrets and matchers (Istio's HBONE shape).
    fn common(certs: &[&str], trust: Option<&str>, san_matchers: Vec<SanMatch>) -> CommonTls {
        CommonTls {
            min_version: TlsVersion::Tls13,
            max_version: TlsVersion::Tls13,
            cipher_suites: vec![],
            ecdh_curves: vec![],
            alpn: vec!["h2".into()],
            certificates: certs.iter().map(|n| sds_ref(n)).collect(),
            validation: trust.map(|t| Validation {
                trust: Some(sds_ref(t)),
                san_matchers,
                max_verify_depth: None,
            }),
        }
    }

    fn downstream(common: CommonTls, require_client_certificate: bool) -> DownstreamTls {
        DownstreamTls {
            common,
            require_client_certificate,
            require_sni: false,
            disable_session_tickets: false,
            disable_session_cache: false,
            session_timeout: None,
        }
    }

    fn upstream(common: CommonTls, sni: Option<&str>) -> UpstreamTls {
        UpstreamTls {
            common,
            sni: sni.map(str::to_owned),
            auto_host_sni: false,
            auto_sni_san_validation: false,
            max_session_keys: None,
        }
    }

    /// The waypoint's HBONE listener: mTLS required, any identity of the trust domain.
    fn hbone_server() -> DownstreamTls {
        downstream(
            common(
                &["default"],
                Some("ROOTCA"),
                vec![uri_prefix("spiffe://cluster.local/")],
            ),
            true,
        )
    }

    /// An HBONE client context expecting the server identity `expect`.
    fn hbone_client(expect: SanMatch) -> UpstreamTls {
        upstream(common(&["default"], Some("ROOTCA"), vec![expect]), None)
    }

    /// A TLS server without client authentication.
    fn plain_server() -> DownstreamTls {
        downstream(common(&["default"], None, vec![]), false)
    }

    /// A TLS client that does not verify the server (no validation context).
    fn unverified_client() -> UpstreamTls {
        upstream(common(&[], None, vec![]), None)
    }

    // -- Handshakes over real sockets.

    /// What one end saw of a completed handshake.
    #[derive(Debug)]
    struct Seen {
        peer_uri_san: Option<String>,
        peer_leaf: Option<Vec<u8>>,
        alpn: Option<Vec<u8>>,
        sni: Option<String>,
        version: Option<ProtocolVersion>,
        suite: Option<CipherSuite>,
        kx: Option<NamedGroup>,
    }

    fn seen(c: &CommonState, sni: Option<String>) -> Seen {
        Seen {
            peer_uri_san: peer_uri_san(c),
            peer_leaf: c
                .peer_certificates()
                .and_then(|l| l.first())
                .map(|d| d.to_vec()),
            alpn: c.alpn_protocol().map(<[u8]>::to_vec),
            sni,
            version: c.protocol_version(),
            suite: c.negotiated_cipher_suite().map(|s| s.suite()),
            kx: c.negotiated_key_exchange_group().map(|g| g.name()),
        }
    }

    fn no_sni() -> ServerName<'static> {
        ServerName::IpAddress(Ipv4Addr::LOCALHOST.into())
    }

    fn named(n: &str) -> ServerName<'static> {
        ServerName::try_from(n.to_owned()).expect("name")
    }

    /// One handshake over 127.0.0.1, the server's configuration picked from the ClientHello;
    /// (server's view, client's view), or both ends' errors.
    async fn handshake_with(
        pick: impl FnOnce(&ClientHello<'_>) -> Result<Arc<ServerConfig>, TlsError>,
        client: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> Result<(Seen, Seen), String> {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accept = async {
            let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let start =
                tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
                    .await
                    .map_err(|e| e.to_string())?;
            let config = pick(&start.client_hello()).map_err(|e| e.to_string())?;
            let tls = start.into_stream(config).await.map_err(|e| e.to_string())?;
            let (_, conn) = tls.get_ref();
            Ok::<_, String>(seen(conn, conn.server_name().map(str::to_owned)))
        };
        let connect = async {
            let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let tls = tokio_rustls::TlsConnector::from(client)
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(seen(tls.get_ref().1, None))
        };
        let (s, c) = tokio::time::timeout(WAIT, async { tokio::join!(accept, connect) })
            .await
            .expect("handshake in time");
        match (s, c) {
            (Ok(s), Ok(c)) => Ok((s, c)),
            (s, c) => Err(format!("server: {:?}; client: {:?}", s.err(), c.err())),
        }
    }

    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> Result<(Seen, Seen), String> {
        handshake_with(|_| Ok(server), client, name).await
    }

    // -- Tests.

    #[tokio::test]
    async fn mtls_checks_san_root_and_client_certificate() {
        let mesh = ca();
        let waypoint = Proxy::identity(&mesh, vec![uri(WAYPOINT)], &mesh).await;
        let sleep = Proxy::identity(&mesh, vec![uri(SLEEP)], &mesh).await;
        let server_ctx = hbone_server();
        let server = || {
            waypoint
                .tls
                .server_config(&server_ctx)
                .expect("server config")
        };

        let client = sleep
            .tls
            .client_config(&hbone_client(uri_exact(WAYPOINT)))
            .expect("client config");
        let (s, c) = handshake(server(), client, no_sni())
            .await
            .expect("mTLS handshake");
        assert_eq!(s.peer_uri_san.as_deref(), Some(SLEEP));
        assert_eq!(c.peer_uri_san.as_deref(), Some(WAYPOINT));
        assert_eq!(
            waypoint.tls.local_uri_san(&server()).as_deref(),
            Some(WAYPOINT)
        );
        assert_eq!(s.alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(s.sni, None, "HBONE sends no SNI");
        assert_eq!(s.version, Some(ProtocolVersion::TLSv1_3));

        // The client expects another server identity.
        let client = sleep
            .tls
            .client_config(&hbone_client(uri_exact(
                "spiffe://cluster.local/ns/default/sa/other",
            )))
            .expect("client config");
        let err = handshake(server(), client, no_sni())
            .await
            .expect_err("server SAN refused");
        assert!(err.contains("NotValidForName"), "{err}");

        // A client outside the trust-domain prefix.
        let evil = Proxy::identity(
            &mesh,
            vec![uri("spiffe://evil.example/ns/default/sa/sleep")],
            &mesh,
        )
        .await;
        let client = evil
            .tls
            .client_config(&hbone_client(uri_exact(WAYPOINT)))
            .expect("client config");
        let err = handshake(server(), client, no_sni())
            .await
            .expect_err("client SAN refused");
        assert!(err.contains("NotValidForName"), "{err}");

        // A client whose certificate comes from another root (though it trusts ours).
        let other = ca();
        let stranger = Proxy::identity(&other, vec![uri(SLEEP)], &mesh).await;
        let stranger_client = stranger
            .tls
            .client_config(&hbone_client(uri_exact(WAYPOINT)))
            .expect("client config");
        let err = handshake(server(), stranger_client.clone(), no_sni())
            .await
            .expect_err("foreign root refused");
        // rcgen roots share a subject name: webpki finds the wrong issuer's key (BadSignature).
        assert!(
            err.contains("UnknownIssuer") || err.contains("BadSignature"),
            "{err}"
        );

        // No client certificate while one is required.
        let anonymous = sleep
            .tls
            .client_config(&upstream(
                common(&[], Some("ROOTCA"), vec![uri_exact(WAYPOINT)]),
                None,
            ))
            .expect("client config");
        let err = handshake(server(), anonymous.clone(), no_sni())
            .await
            .expect_err("client certificate required");
        assert!(err.contains("peer sent no certificates"), "{err}");

        // Validation without `require_client_certificate`: an anonymous client gets in, a
        // certificate that is presented is still verified.
        let optional = downstream(hbone_server().common, false);
        let config = waypoint
            .tls
            .server_config(&optional)
            .expect("server config");
        let (s, _) = handshake(config.clone(), anonymous, no_sni())
            .await
            .expect("anonymous client allowed");
        assert_eq!(s.peer_uri_san, None);
        handshake(config, stranger_client, no_sni())
            .await
            .expect_err("a presented certificate is verified");
    }

    #[tokio::test]
    async fn rotation_applies_to_the_next_handshake_and_nothing_else_rebuilds() {
        let mesh = ca();
        let waypoint = Proxy::identity(&mesh, vec![uri(WAYPOINT)], &mesh).await;
        let sleep = Proxy::identity(&mesh, vec![uri(SLEEP)], &mesh).await;
        let ctx = hbone_server();
        let client_ctx = hbone_client(uri_prefix("spiffe://cluster.local/"));

        let first = waypoint.tls.server_config(&ctx).expect("server config");
        assert!(
            Arc::ptr_eq(
                &first,
                &waypoint.tls.server_config(&ctx).expect("server config")
            ),
            "unchanged secrets give the same configuration"
        );
        let client = sleep.tls.client_config(&client_ctx).expect("client config");
        let (_, c) = handshake(first.clone(), client.clone(), no_sni())
            .await
            .expect("handshake");
        let old_leaf = c.peer_leaf.expect("server leaf");

        let rotated = leaf(
            &mesh,
            vec![uri("spiffe://cluster.local/ns/default/sa/waypoint-v2")],
        );
        waypoint.push(cert_secret("default", &rotated)).await;
        let second = waypoint.tls.server_config(&ctx).expect("server config");
        assert!(!Arc::ptr_eq(&first, &second), "a rotation rebuilds");
        let (_, c) = handshake(second.clone(), client.clone(), no_sni())
            .await
            .expect("handshake after rotation");
        let new_leaf = c.peer_leaf.expect("server leaf");
        assert_eq!(new_leaf, leaf_der(&rotated.0));
        assert_ne!(new_leaf, old_leaf);

        // Each configuration keeps its own local identity (connections outlive rotations).
        assert_eq!(
            waypoint.tls.local_uri_san(&second).as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/waypoint-v2")
        );
        assert_eq!(
            waypoint.tls.local_uri_san(&first).as_deref(),
            Some(WAYPOINT)
        );
        // The other proxy's contexts did not move.
        assert!(Arc::ptr_eq(
            &client,
            &sleep.tls.client_config(&client_ctx).expect("client config")
        ));

        // A new root: the peer from the old root is refused on the next handshake.
        let new_mesh = ca();
        waypoint.push(root_secret("ROOTCA", &new_mesh.pem)).await;
        let third = waypoint.tls.server_config(&ctx).expect("server config");
        handshake(third, client, no_sni())
            .await
            .expect_err("client of the old root refused after the root rotated");
    }

    #[tokio::test]
    async fn missing_and_misshapen_secrets() {
        let mesh = ca();
        let p = Proxy::start().await;
        let ctx = hbone_server();
        assert_eq!(
            p.tls.server_config(&ctx).err(),
            Some(TlsError::SecretNotReady("default".into()))
        );
        p.push(cert_secret("default", &leaf(&mesh, vec![uri(WAYPOINT)])))
            .await;
        // The cached failure went with the version it was built at.
        assert_eq!(
            p.tls.server_config(&ctx).err(),
            Some(TlsError::SecretNotReady("ROOTCA".into()))
        );
        p.push(root_secret("ROOTCA", &mesh.pem)).await;
        p.tls.server_config(&ctx).expect("ready");
        p.tls
            .client_config(&hbone_client(uri_exact(WAYPOINT)))
            .expect("ready");

        let absent = downstream(common(&["absent"], Some("ROOTCA"), vec![]), true);
        assert_eq!(
            p.tls.server_config(&absent).err(),
            Some(TlsError::SecretNotReady("absent".into()))
        );
        let absent = upstream(common(&[], Some("absent"), vec![]), None);
        assert_eq!(
            p.tls.client_config(&absent).err(),
            Some(TlsError::SecretNotReady("absent".into()))
        );

        let swapped = downstream(common(&["ROOTCA"], Some("default"), vec![]), true);
        match p.tls.server_config(&swapped) {
            Err(TlsError::BadSecret { name, field, .. }) => {
                assert_eq!(
                    (name.as_str(), field.as_str()),
                    ("ROOTCA", "tls_certificate")
                )
            }
            other => panic!("{:?}", other.err()),
        }
        let trust_is_a_cert = upstream(common(&[], Some("default"), vec![]), None);
        match p.tls.client_config(&trust_is_a_cert) {
            Err(e @ TlsError::BadSecret { .. }) => {
                assert!(
                    e.to_string()
                        .starts_with("secret 'default': validation_context:"),
                    "{e}"
                )
            }
            other => panic!("{:?}", other.err()),
        }
    }

    #[test]
    fn settings_map_to_rustls() {
        let suites = |s: &Settings| -> Vec<CipherSuite> {
            s.provider.cipher_suites.iter().map(|c| c.suite()).collect()
        };
        let groups = |s: &Settings| -> Vec<NamedGroup> {
            s.provider.kx_groups.iter().map(|g| g.name()).collect()
        };
        let tls13 = [
            CipherSuite::TLS13_AES_256_GCM_SHA384,
            CipherSuite::TLS13_AES_128_GCM_SHA256,
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        ];

        // Istio's HBONE context: TLS 1.3 only, Envoy's default curves, h2.
        let s = settings(&common(&["default"], Some("ROOTCA"), vec![])).expect("settings");
        assert_eq!(s.versions, vec![&rustls::version::TLS13]);
        assert_eq!(groups(&s), vec![NamedGroup::X25519, NamedGroup::secp256r1]);
        assert_eq!(s.alpn, vec![b"h2".to_vec()]);
        assert_eq!(s.max_intermediates, None);

        let mut c = common(&["default"], None, vec![]);
        c.min_version = TlsVersion::Tls12;
        c.alpn = vec!["h2".into(), "http/1.1".into()];
        let s = settings(&c).expect("settings");
        assert_eq!(
            s.versions,
            vec![&rustls::version::TLS12, &rustls::version::TLS13]
        );
        assert_eq!(s.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert_eq!(suites(&s).len(), 9, "empty cipher_suites: every ring suite");

        // Envoy's default cipher list, equal-preference groups included.
        c.cipher_suites = vec![
            "[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-ECDSA-CHACHA20-POLY1305]".into(),
            "[ECDHE-RSA-AES128-GCM-SHA256|ECDHE-RSA-CHACHA20-POLY1305]".into(),
            "ECDHE-ECDSA-AES256-GCM-SHA384".into(),
            "ECDHE-RSA-AES256-GCM-SHA384".into(),
        ];
        let s = settings(&c).expect("Envoy's defaults");
        let mut want = tls13.to_vec();
        want.extend([
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        ]);
        assert_eq!(suites(&s), want);

        c.cipher_suites = vec!["ECDHE-RSA-AES128-GCM-SHA256:TLS_AES_128_GCM_SHA256".into()];
        let mut want = tls13.to_vec();
        want.push(CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256);
        assert_eq!(suites(&settings(&c).expect("one suite")), want);

        // Istio's server list has static-RSA suites rustls lacks: refused where TLS 1.2 can be
        // negotiated, harmless in TLS 1.3-only contexts.
        c.cipher_suites = vec![
            "ECDHE-RSA-AES128-GCM-SHA256".into(),
            "AES128-GCM-SHA256".into(),
        ];
        let err = settings(&c).expect_err("static RSA");
        assert!(
            matches!(&err, TlsError::Unsupported { field, reason } if field == CIPHER_SUITES_FIELD && reason.contains("AES128-GCM-SHA256")),
            "{err}"
        );
        let mut only13 = c.clone();
        only13.min_version = TlsVersion::Tls13;
        let s = settings(&only13).expect("accepted where only TLS 1.3 can be negotiated");
        assert_eq!(s.versions, vec![&rustls::version::TLS13]);
        for bogus in ["NOT-A-SUITE", "!aNULL", "ALL"] {
            only13.cipher_suites = vec![bogus.into()];
            let err = settings(&only13).expect_err(bogus);
            assert!(err.to_string().starts_with(CIPHER_SUITES_FIELD), "{err}");
        }
        c.cipher_suites = vec!["TLS_AES_128_GCM_SHA256".into()];
        settings(&c).expect_err("no TLS 1.2 suite left while TLS 1.2 is allowed");
        c.cipher_suites.clear();

        // Curves, in order.
        c.ecdh_curves = vec!["P-256".into(), "X25519".into()];
        assert_eq!(
            groups(&settings(&c).expect("curves")),
            vec![NamedGroup::secp256r1, NamedGroup::X25519]
        );
        c.ecdh_curves = vec!["X25519:P-384".into()];
        assert_eq!(
            groups(&settings(&c).expect("curves")),
            vec![NamedGroup::X25519, NamedGroup::secp384r1]
        );
        c.ecdh_curves = vec!["P-521".into()];
        let err = settings(&c).expect_err("P-521");
        assert!(err.to_string().starts_with(ECDH_CURVES_FIELD), "{err}");
        c.ecdh_curves.clear();

        // Versions.
        c.min_version = TlsVersion::Tls13;
        c.max_version = TlsVersion::Tls12;
        let err = settings(&c).expect_err("min above max");
        assert!(err.to_string().starts_with(TLS_PARAMS_FIELD), "{err}");
        c.max_version = TlsVersion::Tls13;

        // max_verify_depth counts the anchor, not the leaf.
        let mut v = common(&["default"], Some("ROOTCA"), vec![]);
        if let Some(val) = v.validation.as_mut() {
            val.max_verify_depth = Some(3);
        }
        assert_eq!(settings(&v).expect("depth").max_intermediates, Some(2));
        if let Some(val) = v.validation.as_mut() {
            val.max_verify_depth = Some(0);
        }
        let err = settings(&v).expect_err("depth 0");
        assert!(err.to_string().starts_with(MAX_VERIFY_DEPTH_FIELD), "{err}");

        // Side-specific checks.
        let mut d = hbone_server();
        check_downstream(&d).expect("HBONE server");
        d.session_timeout = Some(Duration::from_secs(300));
        assert!(
            check_downstream(&d)
                .expect_err("timeout")
                .to_string()
                .starts_with("session_timeout:")
        );
        let mut d = hbone_server();
        d.common.certificates.push(sds_ref("other"));
        assert!(
            check_downstream(&d)
                .expect_err("two")
                .to_string()
                .starts_with(CERTIFICATES_FIELD)
        );
        let d = downstream(common(&["default"], None, vec![]), true);
        assert!(
            check_downstream(&d)
                .expect_err("required without trust")
                .to_string()
                .starts_with("require_client_certificate:")
        );
        let u = upstream(common(&[], None, vec![]), Some("not a name!"));
        assert!(
            check_upstream(&u)
                .expect_err("sni")
                .to_string()
                .starts_with("sni:")
        );
        let mut u = hbone_client(uri_exact(WAYPOINT));
        check_upstream(&u).expect("HBONE client");
        if let Some(val) = u.common.validation.as_mut() {
            val.trust = None;
        }
        assert!(
            check_upstream(&u)
                .expect_err("matchers without trust")
                .to_string()
                .starts_with(VALIDATION_SECRET_FIELD)
        );
    }

    #[tokio::test]
    async fn tls12_suite_curve_and_version_are_negotiated_as_configured() {
        let mesh = ca();
        let web = Proxy::identity(&mesh, vec![dns("web.example.com")], &mesh).await;
        let client_proxy = Proxy::start().await;
        let client = client_proxy
            .tls
            .client_config(&upstream(
                CommonTls {
                    min_version: TlsVersion::Tls12,
                    ecdh_curves: vec!["X25519".into(), "P-256".into(), "P-384".into()],
                    ..common(&[], None, vec![])
                },
                None,
            ))
            .expect("client");
        let mut ctx = plain_server();
        ctx.common.min_version = TlsVersion::Tls12;
        ctx.common.max_version = TlsVersion::Tls12;
        ctx.common.cipher_suites = vec!["ECDHE-ECDSA-AES256-GCM-SHA384".into()];
        ctx.common.ecdh_curves = vec!["P-384".into()];
        let server = web.tls.server_config(&ctx).expect("server");
        let (s, c) = handshake(server, client.clone(), no_sni())
            .await
            .expect("TLS 1.2");
        assert_eq!(s.version, Some(ProtocolVersion::TLSv1_2));
        assert_eq!(
            c.suite,
            Some(CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384)
        );
        assert_eq!(c.kx, Some(NamedGroup::secp384r1));

        // A TLS 1.3-only server and a TLS 1.2-only client do not meet.
        let client12 = client_proxy
            .tls
            .client_config(&upstream(
                CommonTls {
                    min_version: TlsVersion::Tls12,
                    max_version: TlsVersion::Tls12,
                    ..common(&[], None, vec![])
                },
                None,
            ))
            .expect("client");
        let server13 = web.tls.server_config(&plain_server()).expect("server");
        handshake(server13, client12, no_sni())
            .await
            .expect_err("no common version");
    }

    #[tokio::test]
    async fn upstream_verification_sni_and_no_validation() {
        let mesh = ca();
        let web = Proxy::identity(&mesh, vec![dns("web.example.com"), uri(WAYPOINT)], &mesh).await;
        let server = || web.tls.server_config(&plain_server()).expect("server");
        // The client proxy only needs ROOTCA.
        let client_proxy = Proxy::start().await;
        client_proxy.push(root_secret("ROOTCA", &mesh.pem)).await;
        let client = |ctx: &UpstreamTls| client_proxy.tls.client_config(ctx).expect("client");

        // `sni`, no matchers: webpki checks the name; the SNI is sent.
        let ctx = upstream(common(&[], Some("ROOTCA"), vec![]), Some("web.example.com"));
        let (s, _) = handshake(server(), client(&ctx), named("web.example.com"))
            .await
            .expect("name matches");
        assert_eq!(s.sni.as_deref(), Some("web.example.com"));
        let ctx = upstream(common(&[], Some("ROOTCA"), vec![]), Some("api.example.com"));
        let err = handshake(server(), client(&ctx), named("api.example.com"))
            .await
            .expect_err("name mismatch");
        assert!(err.contains("not valid for name"), "{err}");

        // Matchers given: they decide, the SNI is not checked against the certificate.
        let ctx = upstream(
            common(&[], Some("ROOTCA"), vec![uri_exact(WAYPOINT)]),
            Some("api.example.com"),
        );
        handshake(server(), client(&ctx), named("api.example.com"))
            .await
            .expect("URI SAN matcher wins");

        // No SNI, no matchers: the chain alone.
        let ctx = upstream(common(&[], Some("ROOTCA"), vec![]), None);
        let (s, _) = handshake(server(), client(&ctx), no_sni())
            .await
            .expect("chain only");
        assert_eq!(s.sni, None);

        // auto_sni_san_validation: the connection's name replaces the matchers.
        let mut ctx = upstream(
            common(&[], Some("ROOTCA"), vec![uri_exact("spiffe://nope")]),
            None,
        );
        ctx.auto_sni_san_validation = true;
        ctx.auto_host_sni = true;
        let (s, _) = handshake(server(), client(&ctx), named("web.example.com"))
            .await
            .expect("host name matches");
        assert_eq!(s.sni.as_deref(), Some("web.example.com"));
        handshake(server(), client(&ctx), named("api.example.com"))
            .await
            .expect_err("host name mismatch");

        // No validation context: like Envoy, the server is not verified at all.
        let stranger = Proxy::identity(&ca(), vec![dns("elsewhere.example")], &mesh).await;
        let stranger_server = stranger.tls.server_config(&plain_server()).expect("server");
        handshake(
            stranger_server.clone(),
            client(&unverified_client()),
            named("web.example.com"),
        )
        .await
        .expect("unverified");
        handshake(
            stranger_server,
            client(&upstream(common(&[], Some("ROOTCA"), vec![]), None)),
            no_sni(),
        )
        .await
        .expect_err("verified against ROOTCA");
    }

    #[tokio::test]
    async fn max_verify_depth_limits_the_chain() {
        let root = ca();
        let middle = intermediate(&root);
        let (chain, key) = leaf(&middle, vec![uri(WAYPOINT)]);
        let server_proxy = Proxy::start().await;
        server_proxy
            .push(cert_secret(
                "default",
                &(format!("{chain}{}", middle.pem), key),
            ))
            .await;
        let server = server_proxy
            .tls
            .server_config(&plain_server())
            .expect("server");
        let client_proxy = Proxy::start().await;
        client_proxy.push(root_secret("ROOTCA", &root.pem)).await;
        let with_depth = |depth: Option<u32>| {
            let mut ctx = hbone_client(uri_exact(WAYPOINT));
            ctx.common.certificates.clear();
            if let Some(v) = ctx.common.validation.as_mut() {
                v.max_verify_depth = depth;
            }
            client_proxy.tls.client_config(&ctx).expect("client")
        };
        handshake(server.clone(), with_depth(None), no_sni())
            .await
            .expect("default depth");
        handshake(server.clone(), with_depth(Some(2)), no_sni())
            .await
            .expect("one intermediate + anchor");
        handshake(server, with_depth(Some(1)), no_sni())
            .await
            .expect_err("the intermediate is one too many");
    }

    #[tokio::test]
    async fn alpn_fallback_and_require_sni() {
        let mesh = ca();
        let web = Proxy::identity(&mesh, vec![dns("web.example.com")], &mesh).await;
        let client_proxy = Proxy::start().await;
        let ctx = plain_server();
        let mut http1 = unverified_client();
        http1.common.alpn = vec!["http/1.1".into()];
        let http1 = client_proxy.tls.client_config(&http1).expect("client");

        // rustls alone refuses a client with no common protocol...
        let server = web.tls.server_config(&ctx).expect("server");
        handshake(server.clone(), http1.clone(), no_sni())
            .await
            .expect_err("rustls: no_application_protocol");
        // ...Envoy carries on without ALPN, as `server_config_for_hello` does.
        let (s, c) = handshake_with(
            |hello| web.tls.server_config_for_hello(&ctx, hello),
            http1,
            no_sni(),
        )
        .await
        .expect("served without ALPN");
        assert_eq!((s.alpn, c.alpn), (None, None));
        let h2 = client_proxy
            .tls
            .client_config(&unverified_client())
            .expect("client");
        let mut picked = None;
        let (s, _) = handshake_with(
            |hello| {
                let config = web.tls.server_config_for_hello(&ctx, hello);
                picked = config.as_ref().ok().cloned();
                config
            },
            h2.clone(),
            no_sni(),
        )
        .await
        .expect("h2");
        assert_eq!(s.alpn.as_deref(), Some(&b"h2"[..]));
        assert!(
            Arc::ptr_eq(&picked.expect("picked"), &server),
            "common protocol: the main config"
        );

        // require_sni.
        let mut strict = plain_server();
        strict.require_sni = true;
        let server = web.tls.server_config(&strict).expect("server");
        handshake(server.clone(), h2, no_sni())
            .await
            .expect_err("no SNI refused");
        let with_sni = client_proxy
            .tls
            .client_config(&upstream(
                common(&[], None, vec![]),
                Some("web.example.com"),
            ))
            .expect("client");
        handshake(server, with_sni, named("web.example.com"))
            .await
            .expect("SNI given");

        // Session settings.
        let mut no_cache = plain_server();
        no_cache.disable_session_cache = true;
        let config = web.tls.server_config(&no_cache).expect("server");
        assert_eq!(config.send_tls13_tickets, 0);
        assert!(
            config.ignore_client_order,
            "server cipher preference, as Envoy"
        );
    }

    #[test]
    fn subject_alt_names_of_every_kind_and_envoy_matching() {
        let mesh = ca();
        let (chain, _) = leaf(
            &mesh,
            vec![
                dns("*.example.com"),
                dns("Foo.Test"),
                SanType::IpAddress("10.1.2.3".parse().expect("ip")),
                SanType::IpAddress("fd00::1".parse().expect("ip")),
                SanType::Rfc822Name("ops@example.com".try_into().expect("email")),
                uri(SLEEP),
            ],
        );
        let der = leaf_der(&chain);
        let sans = subject_alt_names(&der);
        let want = |kind, value: &str| SubjectAltName {
            kind,
            value: value.into(),
        };
        assert_eq!(
            sans,
            vec![
                want(SanKind::Dns, "*.example.com"),
                want(SanKind::Dns, "Foo.Test"),
                want(SanKind::IpAddress, "10.1.2.3"),
                want(SanKind::IpAddress, "fd00::1"),
                want(SanKind::Email, "ops@example.com"),
                want(SanKind::Uri, SLEEP),
            ]
        );
        // Same URI SANs as the shared x509-parser based helper.
        assert_eq!(waypoint_shared::tls::uri_sans(&der), vec![SLEEP.to_owned()]);
        assert_eq!(first_uri_san(&der).as_deref(), Some(SLEEP));
        // Garbage and truncations parse to nothing, without panicking.
        assert!(subject_alt_names(b"not a certificate").is_empty());
        for cut in [1, 10, der.len() / 2, der.len() - 1] {
            assert!(subject_alt_names(&der[..cut]).is_empty());
        }
        let (no_sans, _) = leaf(&mesh, vec![]);
        assert!(subject_alt_names(&leaf_der(&no_sans)).is_empty());

        let ok = |matchers: Vec<SanMatch>| sans_match(&sans, &matchers);
        let dns_exact = |n: &str| san(SanKind::Dns, StringPattern::Exact(n.into()));
        assert!(ok(vec![]), "no matchers: any SAN");
        assert!(ok(vec![dns_exact("api.example.com")]), "DNS wildcard");
        assert!(ok(vec![dns_exact("foo.test")]), "DNS is case-insensitive");
        assert!(!ok(vec![dns_exact("a.b.example.com")]), "one label only");
        assert!(!ok(vec![dns_exact("example.com")]));
        assert!(
            !ok(vec![san(
                SanKind::Dns,
                StringPattern::Prefix("api.".into())
            )]),
            "non-exact DNS matchers match the SAN text"
        );
        assert!(ok(vec![san(
            SanKind::IpAddress,
            StringPattern::Exact("fd00::1".into())
        )]));
        assert!(ok(vec![san(
            SanKind::Email,
            StringPattern::Suffix("@example.com".into())
        )]));
        assert!(ok(vec![uri_prefix("spiffe://cluster.local/")]));
        assert!(
            !ok(vec![uri_prefix("*.example")]),
            "a URI matcher does not look at DNS SANs"
        );
        assert!(
            !ok(vec![san(
                SanKind::Uri,
                StringPattern::Exact("10.1.2.3".into())
            )]),
            "nor at IP SANs"
        );
        assert!(
            ok(vec![uri_exact("spiffe://nope"), dns_exact("x.example.com")]),
            "any matcher"
        );

        assert!(dns_name_match("a.example.com", "*.example.com"));
        assert!(dns_name_match("A.EXAMPLE.com", "a.example.COM"));
        assert!(!dns_name_match(".example.com", "*.example.com"));
        assert!(!dns_name_match("example.com", "*.example.com"));
        assert!(!dns_name_match("a.example.com", "*example.com"));
    }
}
