//! `envoy.filters.network.http_connection_manager`: codec, limits, timeouts, header handling,
//! request ids, XFCC, upgrades, the HTTP filter chain and the (inline or RDS) route table.

use std::time::Duration;

use waypoint_proto::envoy::extensions::{
    filters::network::http_connection_manager::v3::{
        HttpConnectionManager as RawHcm,
        http_connection_manager::{
            CodecType, ForwardClientCertDetails, PathWithEscapedSlashesAction, RouteSpecifier,
            ServerHeaderTransformation, StripPortMode,
        },
    },
    request_id::uuid::v3::UuidRequestIdConfig,
};

use super::http::{HttpFilter, compile_http_filters};
use crate::config::{
    CompileResult, ConfigError,
    access_log::{self, AccessLog},
    field, index,
    matchers::{Cidr, cidrs},
    opt_duration,
    protocol::{CommonHttpOptions, Http1Options, Http2Options},
    route::RouteConfig,
    source::ConfigSourceSpec,
    supported::ExtensionKind,
    typed::Typed,
};

/// Downstream codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// HTTP/1.1 or h2c (prior knowledge / ALPN).
    Auto,
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 only.
    Http2,
}

/// `server_header_transformation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerHeader {
    /// Always set `server: <server_name>`.
    Overwrite,
    /// Set it only if the upstream sent none.
    AppendIfAbsent,
    /// Leave the upstream's.
    PassThrough,
}

/// `forward_client_cert_details`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Xfcc {
    /// Remove XFCC.
    Sanitize,
    /// Forward the client's XFCC as is.
    ForwardOnly,
    /// Append our peer's details (mTLS only).
    AppendForward,
    /// Replace with our peer's details (mTLS only).
    SanitizeSet,
    /// Forward as is, even without mTLS.
    AlwaysForwardOnly,
}

/// Which peer certificate fields go into XFCC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct XfccFields {
    /// `Subject=`.
    pub subject: bool,
    /// `Cert=` (URL-encoded PEM).
    pub cert: bool,
    /// `Chain=`.
    pub chain: bool,
    /// `DNS=`.
    pub dns: bool,
    /// `URI=`.
    pub uri: bool,
}

/// `path_with_escaped_slashes_action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapedSlashes {
    /// Envoy's default (keep).
    Default,
    /// Keep `%2F`/`%5C`.
    KeepUnchanged,
    /// 400.
    RejectRequest,
    /// Unescape and redirect.
    UnescapeAndRedirect,
    /// Unescape and forward.
    UnescapeAndForward,
}

/// How `Host` ports are stripped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripPort {
    /// Keep.
    None,
    /// `strip_matching_host_port`: only the listener's port.
    Matching,
    /// `strip_any_host_port`.
    Any,
}

/// Where the routes come from.
#[derive(Debug, Clone)]
pub enum Routes {
    /// Inline `route_config` (what istiod sends waypoints).
    Inline(Box<RouteConfig>),
    /// `rds`: by name from a config source.
    Rds {
        /// `route_config_name`.
        name: String,
        /// `config_source`.
        source: ConfigSourceSpec,
    },
}

/// An upgrade the HCM accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// `websocket`, `CONNECT` … (case-insensitive).
    pub upgrade_type: String,
    /// `enabled` (default true).
    pub enabled: bool,
}

/// The compiled HTTP connection manager.
#[derive(Debug, Clone)]
pub struct HttpConnectionManager {
    /// `stat_prefix`.
    pub stat_prefix: String,
    /// `codec_type`.
    pub codec: Codec,
    /// The route table.
    pub routes: Routes,
    /// `http_filters` (router last).
    pub http_filters: Vec<HttpFilter>,
    /// `http_protocol_options`.
    pub http1: Http1Options,
    /// `http2_protocol_options` (`max_concurrent_streams`, windows, keepalive …).
    pub http2: Http2Options,
    /// `common_http_protocol_options` (idle timeout, header count …).
    pub common: CommonHttpOptions,
    /// `server_name` (default `envoy`).
    pub server_name: String,
    /// `server_header_transformation`.
    pub server_header: ServerHeader,
    /// `add_user_agent`.
    pub add_user_agent: bool,
    /// `use_remote_address`: trust the socket peer, not XFF.
    pub use_remote_address: bool,
    /// `xff_num_trusted_hops`.
    pub xff_num_trusted_hops: u32,
    /// `skip_xff_append`.
    pub skip_xff_append: bool,
    /// `via`.
    pub via: Option<String>,
    /// `internal_address_config`: (unix sockets internal, internal CIDRs).
    pub internal_addresses: Option<(bool, Vec<Cidr>)>,
    /// `generate_request_id` (default true).
    pub generate_request_id: bool,
    /// `preserve_external_request_id`.
    pub preserve_external_request_id: bool,
    /// `always_set_request_id_in_response`.
    pub always_set_request_id_in_response: bool,
    /// `request_id_extension` (UUID) `pack_trace_reason` (default true).
    pub pack_trace_reason: bool,
    /// `forward_client_cert_details`.
    pub xfcc: Xfcc,
    /// `set_current_client_cert_details`.
    pub xfcc_fields: XfccFields,
    /// `proxy_100_continue`.
    pub proxy_100_continue: bool,
    /// `upgrade_configs`.
    pub upgrades: Vec<Upgrade>,
    /// `stream_idle_timeout` (`Some(0)`: none; `None`: Envoy's 5 min).
    pub stream_idle_timeout: Option<Duration>,
    /// `request_timeout`.
    pub request_timeout: Option<Duration>,
    /// `request_headers_timeout`: header-read timeout.
    pub request_headers_timeout: Option<Duration>,
    /// `delayed_close_timeout`.
    pub delayed_close_timeout: Option<Duration>,
    /// `drain_timeout` (GOAWAY grace).
    pub drain_timeout: Option<Duration>,
    /// `max_request_headers_kb` (default 60) → 431 above it.
    pub max_request_headers_kb: Option<u32>,
    /// `normalize_path`.
    pub normalize_path: bool,
    /// `merge_slashes`.
    pub merge_slashes: bool,
    /// `path_with_escaped_slashes_action`.
    pub escaped_slashes: EscapedSlashes,
    /// `strip_matching_host_port` / `strip_any_host_port`.
    pub strip_port: StripPort,
    /// `strip_trailing_host_dot`.
    pub strip_trailing_host_dot: bool,
    /// `stream_error_on_invalid_http_message`.
    pub stream_error_on_invalid_http_message: Option<bool>,
    /// `access_log`.
    pub access_log: Vec<AccessLog>,
}

impl HttpConnectionManager {
    /// Compiles `h` (at `path`, the typed_config).
    pub fn compile(h: &RawHcm, path: &str) -> CompileResult<Self> {
        if h.stat_prefix.is_empty() {
            return Err(ConfigError::new(
                field(path, "stat_prefix"),
                "stat_prefix is required",
            ));
        }
        let codec = match CodecType::try_from(h.codec_type) {
            Ok(CodecType::Auto) => Codec::Auto,
            Ok(CodecType::Http1) => Codec::Http1,
            Ok(CodecType::Http2) => Codec::Http2,
            _ => {
                return Err(ConfigError::new(
                    field(path, "codec_type"),
                    "HTTP/3 is not supported",
                ));
            }
        };
        let routes = match &h.route_specifier {
            Some(RouteSpecifier::RouteConfig(r)) => Routes::Inline(Box::new(RouteConfig::compile(
                r,
                &field(path, "route_config"),
            )?)),
            Some(RouteSpecifier::Rds(rds)) => {
                let rpath = field(path, "rds");
                if rds.route_config_name.is_empty() {
                    return Err(ConfigError::new(
                        field(&rpath, "route_config_name"),
                        "route_config_name is required",
                    ));
                }
                let source = rds.config_source.as_ref().ok_or_else(|| {
                    ConfigError::new(field(&rpath, "config_source"), "config_source is required")
                })?;
                let source = ConfigSourceSpec::compile(source, &field(&rpath, "config_source"))?;
                // RouteConfiguration is subscribed on the ADS stream; a separate RDS server is not.
                if source.source != crate::config::source::Source::Ads {
                    return Err(ConfigError::new(
                        field(&rpath, "config_source"),
                        "RDS is supported over ADS only (config_source: {ads: {}})",
                    ));
                }
                Routes::Rds {
                    name: rds.route_config_name.clone(),
                    source,
                }
            }
            Some(RouteSpecifier::ScopedRoutes(_)) => {
                return Err(ConfigError::new(
                    field(path, "scoped_routes"),
                    "not supported",
                ));
            }
            None => {
                return Err(ConfigError::new(
                    path,
                    "an HTTP connection manager needs route_config or rds",
                ));
            }
        };
        let pack_trace_reason = match &h.request_id_extension {
            None => true,
            Some(ext) => {
                let epath = field(&field(path, "request_id_extension"), "typed_config");
                let any = ext
                    .typed_config
                    .as_ref()
                    .ok_or_else(|| ConfigError::new(&epath, "typed_config is required"))?;
                let t = Typed::new(any, &epath)?;
                let name = t
                    .check_kind(
                        &[ExtensionKind::RequestId],
                        "a request id extension",
                        &epath,
                    )?
                    .to_owned();
                let u: UuidRequestIdConfig = t.decode(&name, &epath)?;
                u.pack_trace_reason.is_none_or(|b| b.value)
            }
        };
        let upgrades = h
            .upgrade_configs
            .iter()
            .enumerate()
            .map(|(i, u)| {
                if u.upgrade_type.is_empty() {
                    return Err(ConfigError::new(
                        field(&index(path, "upgrade_configs", i), "upgrade_type"),
                        "upgrade_type is required",
                    ));
                }
                Ok(Upgrade {
                    upgrade_type: u.upgrade_type.clone(),
                    enabled: u.enabled.is_none_or(|b| b.value),
                })
            })
            .collect::<CompileResult<Vec<_>>>()?;
        let cert = h.set_current_client_cert_details.as_ref();
        let max_headers_kb = h.max_request_headers_kb.as_ref().map(|v| v.value);
        if let Some(kb) = max_headers_kb
            && !(1..=8192).contains(&kb)
        {
            return Err(ConfigError::new(
                field(path, "max_request_headers_kb"),
                format!("{kb} is outside [1, 8192]"),
            ));
        }
        Ok(HttpConnectionManager {
            stat_prefix: h.stat_prefix.clone(),
            codec,
            routes,
            http_filters: compile_http_filters(&h.http_filters, path)?,
            http1: match &h.http_protocol_options {
                Some(o) => Http1Options::compile(o, &field(path, "http_protocol_options"))?,
                None => Http1Options::default(),
            },
            http2: match &h.http2_protocol_options {
                Some(o) => Http2Options::compile(o, &field(path, "http2_protocol_options"))?,
                None => Http2Options::default(),
            },
            common: match &h.common_http_protocol_options {
                Some(o) => {
                    CommonHttpOptions::compile(o, &field(path, "common_http_protocol_options"))?
                }
                None => CommonHttpOptions::default(),
            },
            server_name: if h.server_name.is_empty() {
                "envoy".to_owned()
            } else {
                h.server_name.clone()
            },
            server_header: match ServerHeaderTransformation::try_from(
                h.server_header_transformation,
            ) {
                Ok(ServerHeaderTransformation::AppendIfAbsent) => ServerHeader::AppendIfAbsent,
                Ok(ServerHeaderTransformation::PassThrough) => ServerHeader::PassThrough,
                _ => ServerHeader::Overwrite,
            },
            add_user_agent: h.add_user_agent.is_some_and(|b| b.value),
            use_remote_address: h.use_remote_address.is_some_and(|b| b.value),
            xff_num_trusted_hops: h.xff_num_trusted_hops,
            skip_xff_append: h.skip_xff_append,
            via: (!h.via.is_empty()).then(|| h.via.clone()),
            internal_addresses: h
                .internal_address_config
                .as_ref()
                .map(|c| {
                    Ok::<_, ConfigError>((
                        c.unix_sockets,
                        cidrs(
                            &c.cidr_ranges,
                            &field(path, "internal_address_config"),
                            "cidr_ranges",
                        )?,
                    ))
                })
                .transpose()?,
            generate_request_id: h.generate_request_id.is_none_or(|b| b.value),
            preserve_external_request_id: h.preserve_external_request_id,
            always_set_request_id_in_response: h.always_set_request_id_in_response,
            pack_trace_reason,
            xfcc: match ForwardClientCertDetails::try_from(h.forward_client_cert_details) {
                Ok(ForwardClientCertDetails::ForwardOnly) => Xfcc::ForwardOnly,
                Ok(ForwardClientCertDetails::AppendForward) => Xfcc::AppendForward,
                Ok(ForwardClientCertDetails::SanitizeSet) => Xfcc::SanitizeSet,
                Ok(ForwardClientCertDetails::AlwaysForwardOnly) => Xfcc::AlwaysForwardOnly,
                _ => Xfcc::Sanitize,
            },
            xfcc_fields: XfccFields {
                subject: cert
                    .and_then(|c| c.subject.as_ref())
                    .is_some_and(|b| b.value),
                cert: cert.is_some_and(|c| c.cert),
                chain: cert.is_some_and(|c| c.chain),
                dns: cert.is_some_and(|c| c.dns),
                uri: cert.is_some_and(|c| c.uri),
            },
            proxy_100_continue: h.proxy_100_continue,
            upgrades,
            stream_idle_timeout: opt_duration(
                h.stream_idle_timeout.as_ref(),
                &field(path, "stream_idle_timeout"),
            )?,
            request_timeout: opt_duration(
                h.request_timeout.as_ref(),
                &field(path, "request_timeout"),
            )?,
            request_headers_timeout: opt_duration(
                h.request_headers_timeout.as_ref(),
                &field(path, "request_headers_timeout"),
            )?,
            delayed_close_timeout: opt_duration(
                h.delayed_close_timeout.as_ref(),
                &field(path, "delayed_close_timeout"),
            )?,
            drain_timeout: opt_duration(h.drain_timeout.as_ref(), &field(path, "drain_timeout"))?,
            max_request_headers_kb: max_headers_kb,
            normalize_path: h.normalize_path.is_some_and(|b| b.value),
            merge_slashes: h.merge_slashes,
            escaped_slashes: match PathWithEscapedSlashesAction::try_from(
                h.path_with_escaped_slashes_action,
            ) {
                Ok(PathWithEscapedSlashesAction::KeepUnchanged) => EscapedSlashes::KeepUnchanged,
                Ok(PathWithEscapedSlashesAction::RejectRequest) => EscapedSlashes::RejectRequest,
                Ok(PathWithEscapedSlashesAction::UnescapeAndRedirect) => {
                    EscapedSlashes::UnescapeAndRedirect
                }
                Ok(PathWithEscapedSlashesAction::UnescapeAndForward) => {
                    EscapedSlashes::UnescapeAndForward
                }
                _ => EscapedSlashes::Default,
            },
            strip_port: match (&h.strip_port_mode, h.strip_matching_host_port) {
                (Some(StripPortMode::StripAnyHostPort(true)), _) => StripPort::Any,
                (_, true) => StripPort::Matching,
                _ => StripPort::None,
            },
            strip_trailing_host_dot: h.strip_trailing_host_dot,
            stream_error_on_invalid_http_message: h
                .stream_error_on_invalid_http_message
                .map(|b| b.value),
            access_log: access_log::compile_all(&h.access_log, path)?,
        })
    }
}
