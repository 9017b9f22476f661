//! Transport sockets: downstream/upstream TLS (certificates and trust from SDS), Envoy's internal
//! upstream transport (passthrough metadata to an internal listener) and raw buffer.

use std::time::Duration;

use waypoint_proto::envoy::extensions::transport_sockets::{
    internal_upstream::v3::InternalUpstreamTransport,
    raw_buffer::v3::RawBuffer,
    tls::v3::{
        CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig,
        UpstreamTlsContext, certificate_validation_context::TrustChainVerification,
        common_tls_context::ValidationContextType, subject_alt_name_matcher::SanType,
        tls_parameters::TlsProtocol,
    },
};
use waypoint_proto::{
    envoy::{
        config::core::v3::TransportSocket as RawTransportSocket,
        r#type::metadata::v3::metadata_kind::Kind as MetadataKindKind,
    },
    google::protobuf::Any,
};

use super::{
    CompileResult, ConfigError, field, index, matchers::StringMatch, opt_duration,
    source::ConfigSourceSpec, supported::ExtensionKind, typed::Typed,
};

/// Which end of a connection a transport socket is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// A listener's filter chain (we are the server).
    Downstream,
    /// A cluster (we are the client).
    Upstream,
}

/// A TLS protocol version bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    /// TLS 1.2.
    Tls12,
    /// TLS 1.3.
    Tls13,
}

/// An SDS secret reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdsSecret {
    /// Secret name (`default`, `ROOTCA`, `file-cert:…`).
    pub name: String,
    /// Where to fetch it (`None`: static secret of the bootstrap, which we do not support, so in
    /// practice always set).
    pub source: ConfigSourceSpec,
}

impl SdsSecret {
    fn compile(s: &SdsSecretConfig, path: &str) -> CompileResult<Self> {
        if s.name.is_empty() {
            return Err(ConfigError::new(field(path, "name"), "name is required"));
        }
        let cfg = s.sds_config.as_ref().ok_or_else(|| {
            ConfigError::new(
                field(path, "sds_config"),
                "sds_config is required (static secrets are not supported)",
            )
        })?;
        Ok(SdsSecret {
            name: s.name.clone(),
            source: ConfigSourceSpec::compile(cfg, &field(path, "sds_config"))?,
        })
    }
}

/// Kind of subject alternative name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SanKind {
    /// DNS name.
    Dns,
    /// URI (SPIFFE ids).
    Uri,
    /// IP address.
    IpAddress,
    /// E-mail.
    Email,
}

/// One `match_typed_subject_alt_names` entry.
#[derive(Debug, Clone)]
pub struct SanMatch {
    /// Which SANs to look at.
    pub kind: SanKind,
    /// The match.
    pub matcher: StringMatch,
}

/// How the peer certificate is verified.
#[derive(Debug, Clone, Default)]
pub struct Validation {
    /// Trust anchors from SDS (`ROOTCA`).
    pub trust: Option<SdsSecret>,
    /// The peer must present a SAN matching one of these (empty: any).
    pub san_matchers: Vec<SanMatch>,
    /// `max_verify_depth`.
    pub max_verify_depth: Option<u32>,
}

/// Settings shared by both TLS sides.
#[derive(Debug, Clone)]
pub struct CommonTls {
    /// Lowest version (`tls_minimum_protocol_version`; Envoy's default is 1.2).
    pub min_version: TlsVersion,
    /// Highest version (`tls_maximum_protocol_version`; default 1.3).
    pub max_version: TlsVersion,
    /// `cipher_suites` (OpenSSL names; empty: the defaults).
    pub cipher_suites: Vec<String>,
    /// `ecdh_curves`.
    pub ecdh_curves: Vec<String>,
    /// `alpn_protocols`.
    pub alpn: Vec<String>,
    /// Our certificates from SDS (`default`).
    pub certificates: Vec<SdsSecret>,
    /// Peer verification (`None`: the peer is not verified).
    pub validation: Option<Validation>,
}

fn version(v: i32, default: TlsVersion, path: &str) -> CompileResult<TlsVersion> {
    match TlsProtocol::try_from(v) {
        Ok(TlsProtocol::TlsAuto) => Ok(default),
        Ok(TlsProtocol::TlSv12) => Ok(TlsVersion::Tls12),
        Ok(TlsProtocol::TlSv13) => Ok(TlsVersion::Tls13),
        _ => Err(ConfigError::new(path, "only TLS 1.2 and 1.3 are supported")),
    }
}

fn validation_context(
    v: &CertificateValidationContext,
    path: &str,
) -> CompileResult<(Vec<SanMatch>, Option<u32>)> {
    if TrustChainVerification::try_from(v.trust_chain_verification)
        != Ok(TrustChainVerification::VerifyTrustChain)
    {
        return Err(ConfigError::new(
            field(path, "trust_chain_verification"),
            "only VERIFY_TRUST_CHAIN is supported",
        ));
    }
    let mut sans = Vec::new();
    for (i, m) in v.match_typed_subject_alt_names.iter().enumerate() {
        let p = index(path, "match_typed_subject_alt_names", i);
        let kind = match SanType::try_from(m.san_type) {
            Ok(SanType::Dns) => SanKind::Dns,
            Ok(SanType::Uri) => SanKind::Uri,
            Ok(SanType::IpAddress) => SanKind::IpAddress,
            Ok(SanType::Email) => SanKind::Email,
            _ => {
                return Err(ConfigError::new(
                    field(&p, "san_type"),
                    "san_type DNS, URI, IP_ADDRESS or EMAIL is required",
                ));
            }
        };
        let matcher = m
            .matcher
            .as_ref()
            .ok_or_else(|| ConfigError::new(field(&p, "matcher"), "matcher is required"))?;
        sans.push(SanMatch {
            kind,
            matcher: StringMatch::compile(matcher, &field(&p, "matcher"))?,
        });
    }
    Ok((sans, v.max_verify_depth.as_ref().map(|d| d.value)))
}

impl CommonTls {
    /// Compiles `c`.
    pub fn compile(c: &CommonTlsContext, path: &str) -> CompileResult<Self> {
        let params = c.tls_params.clone().unwrap_or_default();
        let ppath = field(path, "tls_params");
        let min_version = version(
            params.tls_minimum_protocol_version,
            TlsVersion::Tls12,
            &field(&ppath, "tls_minimum_protocol_version"),
        )?;
        let max_version = version(
            params.tls_maximum_protocol_version,
            TlsVersion::Tls13,
            &field(&ppath, "tls_maximum_protocol_version"),
        )?;
        if min_version > max_version {
            return Err(ConfigError::new(
                ppath,
                "tls_minimum_protocol_version is above tls_maximum_protocol_version",
            ));
        }
        let certificates = c
            .tls_certificate_sds_secret_configs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                SdsSecret::compile(s, &index(path, "tls_certificate_sds_secret_configs", i))
            })
            .collect::<CompileResult<Vec<_>>>()?;
        let validation = match &c.validation_context_type {
            None => None,
            Some(ValidationContextType::ValidationContextSdsSecretConfig(s)) => Some(Validation {
                trust: Some(SdsSecret::compile(
                    s,
                    &field(path, "validation_context_sds_secret_config"),
                )?),
                ..Default::default()
            }),
            Some(ValidationContextType::CombinedValidationContext(combined)) => {
                let cpath = field(path, "combined_validation_context");
                let (san_matchers, max_verify_depth) = match &combined.default_validation_context {
                    Some(v) => validation_context(v, &field(&cpath, "default_validation_context"))?,
                    None => (Vec::new(), None),
                };
                let sds = combined
                    .validation_context_sds_secret_config
                    .as_ref()
                    .ok_or_else(|| {
                        ConfigError::new(
                            field(&cpath, "validation_context_sds_secret_config"),
                            "validation_context_sds_secret_config is required",
                        )
                    })?;
                Some(Validation {
                    trust: Some(SdsSecret::compile(
                        sds,
                        &field(&cpath, "validation_context_sds_secret_config"),
                    )?),
                    san_matchers,
                    max_verify_depth,
                })
            }
            Some(_) => {
                return Err(ConfigError::new(
                    path,
                    "only validation_context_sds_secret_config and combined_validation_context are supported",
                ));
            }
        };
        Ok(CommonTls {
            min_version,
            max_version,
            cipher_suites: params.cipher_suites.clone(),
            ecdh_curves: params.ecdh_curves.clone(),
            alpn: c.alpn_protocols.clone(),
            certificates,
            validation,
        })
    }
}

/// Server-side TLS.
#[derive(Debug, Clone)]
pub struct DownstreamTls {
    /// Shared settings.
    pub common: CommonTls,
    /// `require_client_certificate` (mTLS).
    pub require_client_certificate: bool,
    /// `require_sni`.
    pub require_sni: bool,
    /// `disable_stateless_session_resumption`: no session tickets.
    pub disable_session_tickets: bool,
    /// `disable_stateful_session_resumption`: no session cache.
    pub disable_session_cache: bool,
    /// `session_timeout`.
    pub session_timeout: Option<Duration>,
}

/// Client-side TLS.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// Shared settings.
    pub common: CommonTls,
    /// `sni` (`None`: no SNI, as for HBONE).
    pub sni: Option<String>,
    /// `auto_host_sni`: SNI from the upstream host's hostname.
    pub auto_host_sni: bool,
    /// `auto_sni_san_validation`.
    pub auto_sni_san_validation: bool,
    /// `max_session_keys` (`Some(0)`: no resumption).
    pub max_session_keys: Option<u32>,
}

/// Where a passthrough metadata namespace is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetadataSource {
    /// The upstream host (EDS endpoint metadata).
    Host,
    /// The cluster.
    Cluster,
}

/// One `passthrough_metadata` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passthrough {
    /// Host or cluster metadata.
    pub source: MetadataSource,
    /// The namespace (`envoy.filters.listener.original_dst`, `istio`).
    pub namespace: String,
}

/// A compiled transport socket.
#[derive(Debug, Clone)]
pub enum TransportSocket {
    /// Plaintext.
    RawBuffer,
    /// TLS server.
    DownstreamTls(Box<DownstreamTls>),
    /// TLS client.
    UpstreamTls(Box<UpstreamTls>),
    /// To an internal listener, carrying metadata, around an inner socket.
    InternalUpstream {
        /// Metadata passed to the internal listener's connection.
        passthrough: Vec<Passthrough>,
        /// The inner socket (raw buffer or TLS).
        inner: Box<TransportSocket>,
    },
}

impl TransportSocket {
    /// Compiles `path.transport_socket` on `side`.
    pub fn compile(raw: &RawTransportSocket, side: Side, path: &str) -> CompileResult<Self> {
        use waypoint_proto::envoy::config::core::v3::transport_socket::ConfigType;
        let cpath = field(path, "typed_config");
        let any: &Any = match &raw.config_type {
            Some(ConfigType::TypedConfig(a)) => a,
            None => return Err(ConfigError::new(cpath, "typed_config is required")),
        };
        let t = Typed::new(any, &cpath)?;
        let name = t
            .check_kind(
                &[ExtensionKind::TransportSocket],
                "a transport socket",
                &cpath,
            )?
            .to_owned();
        let ipath = t.inner_path(&cpath);
        match (name.as_str(), side) {
            ("envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer", _) => {
                let _: RawBuffer = t.decode(&name, &cpath)?;
                Ok(TransportSocket::RawBuffer)
            }
            (
                "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                Side::Downstream,
            ) => {
                let d: DownstreamTlsContext = t.decode(&name, &cpath)?;
                let ctx = d.common_tls_context.as_ref().ok_or_else(|| {
                    ConfigError::new(
                        field(&ipath, "common_tls_context"),
                        "common_tls_context is required",
                    )
                })?;
                let common = CommonTls::compile(ctx, &field(&ipath, "common_tls_context"))?;
                if common.certificates.is_empty() {
                    return Err(ConfigError::new(
                        field(
                            &field(&ipath, "common_tls_context"),
                            "tls_certificate_sds_secret_configs",
                        ),
                        "a server certificate is required",
                    ));
                }
                let require_client_certificate = d
                    .require_client_certificate
                    .as_ref()
                    .is_some_and(|b| b.value);
                if require_client_certificate && common.validation.is_none() {
                    return Err(ConfigError::new(
                        field(&ipath, "require_client_certificate"),
                        "requiring a client certificate needs a validation context",
                    ));
                }
                use waypoint_proto::envoy::extensions::transport_sockets::tls::v3::downstream_tls_context::SessionTicketKeysType;
                let d = DownstreamTls {
                    common,
                    require_client_certificate,
                    require_sni: d.require_sni.as_ref().is_some_and(|b| b.value),
                    disable_session_tickets: matches!(
                        d.session_ticket_keys_type,
                        Some(SessionTicketKeysType::DisableStatelessSessionResumption(
                            true
                        ))
                    ),
                    disable_session_cache: d.disable_stateful_session_resumption,
                    session_timeout: opt_duration(
                        d.session_timeout.as_ref(),
                        &field(&ipath, "session_timeout"),
                    )?,
                };
                // What the data path's TLS (rustls) cannot honour is a NACK now, not a failed
                // handshake later.
                crate::tls::check_downstream(&d).map_err(|e| tls_error(e, &ipath))?;
                Ok(TransportSocket::DownstreamTls(Box::new(d)))
            }
            ("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", Side::Upstream) => {
                let u: UpstreamTlsContext = t.decode(&name, &cpath)?;
                let common = match &u.common_tls_context {
                    Some(ctx) => CommonTls::compile(ctx, &field(&ipath, "common_tls_context"))?,
                    None => {
                        return Err(ConfigError::new(
                            field(&ipath, "common_tls_context"),
                            "common_tls_context is required",
                        ));
                    }
                };
                if u.auto_host_sni {
                    return Err(ConfigError::new(
                        field(&ipath, "auto_host_sni"),
                        "SNI from the upstream host's name is not supported",
                    ));
                }
                let up = UpstreamTls {
                    common,
                    sni: (!u.sni.is_empty()).then(|| u.sni.clone()),
                    auto_host_sni: u.auto_host_sni,
                    auto_sni_san_validation: u.auto_sni_san_validation,
                    max_session_keys: u.max_session_keys.as_ref().map(|v| v.value),
                };
                crate::tls::check_upstream(&up).map_err(|e| tls_error(e, &ipath))?;
                Ok(TransportSocket::UpstreamTls(Box::new(up)))
            }
            (
                "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
                Side::Upstream,
            ) => {
                let iu: InternalUpstreamTransport = t.decode(&name, &cpath)?;
                let mut passthrough = Vec::new();
                for (i, p) in iu.passthrough_metadata.iter().enumerate() {
                    let ppath = index(&ipath, "passthrough_metadata", i);
                    let source = match p.kind.as_ref().and_then(|k| k.kind.as_ref()) {
                        Some(MetadataKindKind::Host(_)) => MetadataSource::Host,
                        Some(MetadataKindKind::Cluster(_)) => MetadataSource::Cluster,
                        _ => {
                            return Err(ConfigError::new(
                                field(&ppath, "kind"),
                                "kind host or cluster is required",
                            ));
                        }
                    };
                    if p.name.is_empty() {
                        return Err(ConfigError::new(field(&ppath, "name"), "name is required"));
                    }
                    passthrough.push(Passthrough {
                        source,
                        namespace: p.name.clone(),
                    });
                }
                let inner_raw = iu.transport_socket.as_ref().ok_or_else(|| {
                    ConfigError::new(
                        field(&ipath, "transport_socket"),
                        "transport_socket is required",
                    )
                })?;
                let inner =
                    TransportSocket::compile(inner_raw, side, &field(&ipath, "transport_socket"))?;
                if matches!(inner, TransportSocket::InternalUpstream { .. }) {
                    return Err(ConfigError::new(
                        field(&ipath, "transport_socket"),
                        "internal upstream transports do not nest",
                    ));
                }
                Ok(TransportSocket::InternalUpstream {
                    passthrough,
                    inner: Box::new(inner),
                })
            }
            (other, side) => Err(ConfigError::new(
                cpath,
                format!("{other} is not a {side:?} transport socket"),
            )),
        }
    }
}

/// A data-path TLS refusal as a config error under `path` (the typed_config).
fn tls_error(e: crate::tls::TlsError, path: &str) -> ConfigError {
    match e {
        crate::tls::TlsError::Unsupported { field: f, reason } => {
            ConfigError::new(field(path, &f), reason)
        }
        other => ConfigError::new(path, other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use waypoint_proto::json;

    #[test]
    fn downstream_tls_needs_a_certificate() {
        let raw: RawTransportSocket = json::from_json(&serde_json::json!({
            "name": "tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "common_tls_context": {"alpn_protocols": ["h2"]}
            }
        }))
        .expect("parses");
        let err =
            TransportSocket::compile(&raw, Side::Downstream, "filter_chains[0].transport_socket")
                .expect_err("no certificate");
        assert_eq!(
            err.path,
            "filter_chains[0].transport_socket.typed_config.common_tls_context.tls_certificate_sds_secret_configs"
        );
    }

    #[test]
    fn upstream_tls_context_is_not_a_listener_socket() {
        let raw: RawTransportSocket = json::from_json(&serde_json::json!({
            "name": "tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {}
            }
        }))
        .expect("parses");
        assert!(TransportSocket::compile(&raw, Side::Downstream, "ts").is_err());
        assert!(TransportSocket::compile(&raw, Side::Upstream, "ts").is_ok());
    }
}
