//! HTTP filters of the HCM chain (and their per-route configs): router, set_filter_state, Istio
//! peer metadata and stats, grpc_stats, fault, CORS, RBAC, jwt_authn, local rate limit and
//! compressor. The router must be last.

use std::time::Duration;

use waypoint_proto::envoy::{
    config::route::v3::FilterConfig as RouteFilterConfig,
    extensions::{
        compression::{
            brotli::compressor::v3::Brotli, gzip::compressor::v3::Gzip, zstd::compressor::v3::Zstd,
        },
        filters::{
            common::fault::v3::fault_delay::FaultDelaySecifier,
            http::{
                compressor::v3::{Compressor as RawCompressor, compressor::CommonDirectionConfig},
                cors::v3::Cors,
                fault::v3::{HttpFault, fault_abort::ErrorType},
                grpc_stats::v3::{
                    FilterConfig as GrpcStatsConfig, filter_config::PerMethodStatSpecifier,
                },
                rbac::v3::{Rbac as RawHttpRbac, RbacPerRoute},
                router::v3::Router as RawRouter,
                set_filter_state::v3::Config as HttpSfsConfig,
            },
            network::http_connection_manager::v3::HttpFilter as RawHttpFilter,
        },
    },
};

use super::{
    cors::CorsPolicy, istio, jwt, local_ratelimit::LocalRateLimit, rbac,
    set_filter_state::SetFilterState,
};
use crate::config::{
    CompileResult, ConfigError, field, index,
    matchers::{Fraction, HeaderMatch, StringMatch, header_matches, string_matches},
    supported::ExtensionKind,
    typed::Typed,
};

/// `envoy.filters.http.router`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Router {
    /// `suppress_envoy_headers`: no `x-envoy-*` headers added.
    pub suppress_envoy_headers: bool,
    /// `strict_check_headers`: `x-envoy-*` request headers validated.
    pub strict_check_headers: Vec<String>,
    /// `respect_expected_rq_timeout`.
    pub respect_expected_rq_timeout: bool,
}

/// `envoy.filters.http.grpc_stats`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GrpcStats {
    /// `emit_filter_state`: message counts in filter state (read by istio.stats).
    pub emit_filter_state: bool,
    /// `stats_for_all_methods`.
    pub stats_for_all_methods: bool,
    /// `enable_upstream_stats`.
    pub enable_upstream_stats: bool,
    /// `replace_dots_in_grpc_service_name`.
    pub replace_dots_in_grpc_service_name: bool,
}

/// A fault delay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delay {
    /// A fixed delay.
    Fixed(Duration),
    /// From the `x-envoy-fault-delay-request` header.
    Header,
}

/// A fault abort.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Abort {
    /// An HTTP status.
    Http(u16),
    /// A gRPC status.
    Grpc(u32),
    /// From the `x-envoy-fault-abort-*` headers.
    Header,
}

/// `envoy.filters.http.fault` (filter or per-route).
#[derive(Debug, Clone)]
pub struct Fault {
    /// Delay and its probability.
    pub delay: Option<(Delay, Fraction)>,
    /// Abort and its probability.
    pub abort: Option<(Abort, Fraction)>,
    /// Only for this upstream cluster.
    pub upstream_cluster: Option<String>,
    /// Only for requests matching all of these.
    pub headers: Vec<HeaderMatch>,
    /// Only for these downstream nodes (`x-envoy-downstream-service-node`).
    pub downstream_nodes: Vec<String>,
    /// `max_active_faults`.
    pub max_active_faults: Option<u32>,
}

impl Fault {
    /// Compiles `f` (at `path`).
    pub fn compile(f: &HttpFault, path: &str) -> CompileResult<Self> {
        let delay = match &f.delay {
            None => None,
            Some(d) => {
                let dpath = field(path, "delay");
                let kind = match &d.fault_delay_secifier {
                    Some(FaultDelaySecifier::FixedDelay(x)) => {
                        Delay::Fixed(crate::config::duration(x, &field(&dpath, "fixed_delay"))?)
                    }
                    Some(FaultDelaySecifier::HeaderDelay(_)) => Delay::Header,
                    None => {
                        return Err(ConfigError::new(
                            dpath,
                            "fixed_delay or header_delay is required",
                        ));
                    }
                };
                Some((
                    kind,
                    d.percentage
                        .as_ref()
                        .map_or(Fraction::ALWAYS, Fraction::compile),
                ))
            }
        };
        let abort = match &f.abort {
            None => None,
            Some(a) => {
                let apath = field(path, "abort");
                let kind = match &a.error_type {
                    Some(ErrorType::HttpStatus(s)) if (200..600).contains(s) => {
                        Abort::Http(*s as u16)
                    }
                    Some(ErrorType::HttpStatus(s)) => {
                        return Err(ConfigError::new(
                            field(&apath, "http_status"),
                            format!("{s} is not an HTTP status in [200, 600)"),
                        ));
                    }
                    Some(ErrorType::GrpcStatus(s)) => Abort::Grpc(*s),
                    Some(ErrorType::HeaderAbort(_)) => Abort::Header,
                    None => {
                        return Err(ConfigError::new(
                            apath,
                            "http_status, grpc_status or header_abort is required",
                        ));
                    }
                };
                Some((
                    kind,
                    a.percentage
                        .as_ref()
                        .map_or(Fraction::ALWAYS, Fraction::compile),
                ))
            }
        };
        Ok(Fault {
            delay,
            abort,
            upstream_cluster: (!f.upstream_cluster.is_empty()).then(|| f.upstream_cluster.clone()),
            headers: header_matches(&f.headers, path, "headers")?,
            downstream_nodes: f.downstream_nodes.clone(),
            max_active_faults: f.max_active_faults.as_ref().map(|v| v.value),
        })
    }
}

/// A compression library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompressionLibrary {
    /// gzip.
    Gzip {
        /// `compression_level` (0: default, else 1–9).
        level: i32,
        /// `memory_level`.
        memory_level: Option<u32>,
        /// `window_bits`.
        window_bits: Option<u32>,
        /// `chunk_size`.
        chunk_size: Option<u32>,
    },
    /// brotli.
    Brotli {
        /// `quality`.
        quality: Option<u32>,
        /// `window_bits`.
        window_bits: Option<u32>,
        /// `chunk_size`.
        chunk_size: Option<u32>,
    },
    /// zstd.
    Zstd {
        /// `compression_level`.
        level: Option<u32>,
        /// `chunk_size`.
        chunk_size: Option<u32>,
    },
}

/// One direction of a compressor.
#[derive(Debug, Clone, Default)]
pub struct CompressionDirection {
    /// `enabled` (default on).
    pub enabled: bool,
    /// `min_content_length` (default 30).
    pub min_content_length: u32,
    /// `content_type` (deprecated list) and `content_type_matcher`.
    pub content_types: Vec<StringMatch>,
}

/// `envoy.filters.http.compressor`.
#[derive(Debug, Clone)]
pub struct Compressor {
    /// The library (encoding).
    pub library: CompressionLibrary,
    /// Request bodies (`None`: not compressed).
    pub request: Option<CompressionDirection>,
    /// Response bodies.
    pub response: CompressionDirection,
    /// `response_direction_config.disable_on_etag_header`.
    pub disable_on_etag_header: bool,
    /// `response_direction_config.remove_accept_encoding_header`.
    pub remove_accept_encoding_header: bool,
    /// `response_direction_config.uncompressible_response_codes`.
    pub uncompressible_response_codes: Vec<u32>,
    /// `choose_first`.
    pub choose_first: bool,
}

fn direction(c: Option<&CommonDirectionConfig>, path: &str) -> CompileResult<CompressionDirection> {
    let Some(c) = c else {
        return Ok(CompressionDirection {
            enabled: true,
            min_content_length: 30,
            content_types: Vec::new(),
        });
    };
    #[allow(deprecated)]
    let mut content_types: Vec<StringMatch> = c
        .content_type
        .iter()
        .map(|t| StringMatch::exact(t))
        .collect();
    content_types.extend(string_matches(
        &c.content_type_matcher,
        path,
        "content_type_matcher",
    )?);
    Ok(CompressionDirection {
        enabled: c
            .enabled
            .as_ref()
            .and_then(|f| f.default_value.as_ref())
            .is_none_or(|b| b.value),
        min_content_length: c.min_content_length.as_ref().map_or(30, |v| v.value),
        content_types,
    })
}

impl Compressor {
    /// Compiles `c` (at `path`).
    pub fn compile(c: &RawCompressor, path: &str) -> CompileResult<Self> {
        let lpath = field(path, "compressor_library");
        let lib = c
            .compressor_library
            .as_ref()
            .ok_or_else(|| ConfigError::new(&lpath, "compressor_library is required"))?;
        let cpath = field(&lpath, "typed_config");
        let any = lib
            .typed_config
            .as_ref()
            .ok_or_else(|| ConfigError::new(&cpath, "typed_config is required"))?;
        let t = Typed::new(any, &cpath)?;
        let name = t
            .check_kind(
                &[ExtensionKind::Compression],
                "a compression library",
                &cpath,
            )?
            .to_owned();
        let library = match name.as_str() {
            "envoy.extensions.compression.gzip.compressor.v3.Gzip" => {
                let g: Gzip = t.decode(&name, &cpath)?;
                CompressionLibrary::Gzip {
                    level: g.compression_level,
                    memory_level: g.memory_level.map(|v| v.value),
                    window_bits: g.window_bits.map(|v| v.value),
                    chunk_size: g.chunk_size.map(|v| v.value),
                }
            }
            "envoy.extensions.compression.brotli.compressor.v3.Brotli" => {
                let b: Brotli = t.decode(&name, &cpath)?;
                CompressionLibrary::Brotli {
                    quality: b.quality.map(|v| v.value),
                    window_bits: b.window_bits.map(|v| v.value),
                    chunk_size: b.chunk_size.map(|v| v.value),
                }
            }
            "envoy.extensions.compression.zstd.compressor.v3.Zstd" => {
                let z: Zstd = t.decode(&name, &cpath)?;
                CompressionLibrary::Zstd {
                    level: z.compression_level.map(|v| v.value),
                    chunk_size: z.chunk_size.map(|v| v.value),
                }
            }
            other => {
                return Err(ConfigError::new(cpath, format!("{other} is not supported")));
            }
        };
        let rpath = field(path, "response_direction_config");
        let resp = c.response_direction_config.as_ref();
        Ok(Compressor {
            library,
            request: c
                .request_direction_config
                .as_ref()
                .map(|r| {
                    direction(
                        r.common_config.as_ref(),
                        &field(&field(path, "request_direction_config"), "common_config"),
                    )
                })
                .transpose()?,
            response: direction(
                resp.and_then(|r| r.common_config.as_ref()),
                &field(&rpath, "common_config"),
            )?,
            disable_on_etag_header: resp.is_some_and(|r| r.disable_on_etag_header),
            remove_accept_encoding_header: resp.is_some_and(|r| r.remove_accept_encoding_header),
            uncompressible_response_codes: resp
                .map(|r| r.uncompressible_response_codes.clone())
                .unwrap_or_default(),
            choose_first: c.choose_first,
        })
    }
}

/// A compiled HTTP filter config.
#[derive(Debug, Clone)]
pub enum HttpFilterKind {
    /// `envoy.filters.http.router` (terminal).
    Router(Router),
    /// `envoy.filters.http.set_filter_state`.
    SetFilterState(SetFilterState),
    /// Istio `peer_metadata`.
    PeerMetadata(istio::PeerMetadata),
    /// `istio.stats` (HTTP metrics).
    IstioStats(istio::StatsConfig),
    /// `envoy.filters.http.grpc_stats`.
    GrpcStats(GrpcStats),
    /// `envoy.filters.http.fault`.
    Fault(Box<Fault>),
    /// `envoy.filters.http.cors` (policies come per route / virtual host).
    Cors,
    /// `envoy.filters.http.rbac`.
    Rbac(Box<rbac::HttpRbac>),
    /// `envoy.filters.http.jwt_authn`.
    JwtAuthn(Box<jwt::JwtAuthn>),
    /// `envoy.filters.http.local_ratelimit`.
    LocalRateLimit(Box<LocalRateLimit>),
    /// `envoy.filters.http.compressor`.
    Compressor(Box<Compressor>),
}

/// A named HTTP filter.
#[derive(Debug, Clone)]
pub struct HttpFilter {
    /// Its name (the key for per-route configs).
    pub name: String,
    /// Its config.
    pub kind: HttpFilterKind,
    /// `disabled`: off unless a route enables it.
    pub disabled: bool,
}

impl HttpFilter {
    /// Compiles one `http_filters[i]`; `Ok(None)` for an optional filter we do not support.
    pub fn compile(raw: &RawHttpFilter, path: &str) -> CompileResult<Option<Self>> {
        use waypoint_proto::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType;
        let cpath = field(path, "typed_config");
        let any = match &raw.config_type {
            Some(ConfigType::TypedConfig(a)) => a,
            _ => return Err(ConfigError::new(cpath, "typed_config is required")),
        };
        if raw.is_optional
            && !crate::config::allowlist::extension_supported(&any.type_url, &any.value)
        {
            return Ok(None);
        }
        let t = Typed::new(any, &cpath)?;
        let name = t
            .check_kind(&[ExtensionKind::HttpFilter], "an HTTP filter", &cpath)?
            .to_owned();
        let ipath = t.inner_path(&cpath);
        let kind = match name.as_str() {
            "envoy.extensions.filters.http.router.v3.Router" => {
                let r: RawRouter = t.decode(&name, &cpath)?;
                HttpFilterKind::Router(Router {
                    suppress_envoy_headers: r.suppress_envoy_headers,
                    strict_check_headers: r.strict_check_headers.clone(),
                    respect_expected_rq_timeout: r.respect_expected_rq_timeout,
                })
            }
            "envoy.extensions.filters.http.set_filter_state.v3.Config" => {
                let c: HttpSfsConfig = t.decode(&name, &cpath)?;
                HttpFilterKind::SetFilterState(SetFilterState::compile(
                    &c.on_request_headers,
                    &ipath,
                    "on_request_headers",
                )?)
            }
            "io.istio.http.peer_metadata.Config" => {
                HttpFilterKind::PeerMetadata(istio::PeerMetadata::compile(&t, &cpath)?)
            }
            "stats.PluginConfig" => {
                HttpFilterKind::IstioStats(istio::StatsConfig::compile(&t, &cpath)?)
            }
            "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig" => {
                let g: GrpcStatsConfig = t.decode(&name, &cpath)?;
                if let Some(PerMethodStatSpecifier::IndividualMethodStatsAllowlist(_)) =
                    &g.per_method_stat_specifier
                {
                    return Err(ConfigError::new(
                        field(&ipath, "individual_method_stats_allowlist"),
                        "not supported",
                    ));
                }
                HttpFilterKind::GrpcStats(GrpcStats {
                    emit_filter_state: g.emit_filter_state,
                    stats_for_all_methods: matches!(
                        g.per_method_stat_specifier,
                        Some(PerMethodStatSpecifier::StatsForAllMethods(ref b)) if b.value
                    ),
                    enable_upstream_stats: g.enable_upstream_stats,
                    replace_dots_in_grpc_service_name: g.replace_dots_in_grpc_service_name,
                })
            }
            "envoy.extensions.filters.http.fault.v3.HTTPFault" => {
                let f: HttpFault = t.decode(&name, &cpath)?;
                HttpFilterKind::Fault(Box::new(Fault::compile(&f, &ipath)?))
            }
            "envoy.extensions.filters.http.cors.v3.Cors" => {
                let _: Cors = t.decode(&name, &cpath)?;
                HttpFilterKind::Cors
            }
            "envoy.extensions.filters.http.rbac.v3.RBAC" => {
                let r: RawHttpRbac = t.decode(&name, &cpath)?;
                HttpFilterKind::Rbac(Box::new(rbac::HttpRbac::compile(&r, &ipath)?))
            }
            "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication" => {
                HttpFilterKind::JwtAuthn(Box::new(jwt::JwtAuthn::compile(
                    &t.decode(&name, &cpath)?,
                    &ipath,
                )?))
            }
            "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit" => {
                HttpFilterKind::LocalRateLimit(Box::new(LocalRateLimit::compile(
                    &t.decode(&name, &cpath)?,
                    &ipath,
                    false,
                )?))
            }
            "envoy.extensions.filters.http.compressor.v3.Compressor" => HttpFilterKind::Compressor(
                Box::new(Compressor::compile(&t.decode(&name, &cpath)?, &ipath)?),
            ),
            other => {
                return Err(ConfigError::new(
                    cpath,
                    format!("HTTP filter {other} is not supported"),
                ));
            }
        };
        Ok(Some(HttpFilter {
            name: raw.name.clone(),
            kind,
            disabled: raw.disabled,
        }))
    }
}

/// Compiles an HCM's `http_filters`: the router must be present, once, and last.
pub fn compile_http_filters(list: &[RawHttpFilter], path: &str) -> CompileResult<Vec<HttpFilter>> {
    let mut out = Vec::with_capacity(list.len());
    let mut router_at = None;
    for (i, f) in list.iter().enumerate() {
        let fpath = index(path, "http_filters", i);
        if let Some(compiled) = HttpFilter::compile(f, &fpath)? {
            if matches!(compiled.kind, HttpFilterKind::Router(_)) {
                if router_at.is_some() {
                    return Err(ConfigError::new(fpath, "only one router filter is allowed"));
                }
                router_at = Some(i);
            } else if router_at.is_some() {
                return Err(ConfigError::new(
                    fpath,
                    "the router must be the last HTTP filter",
                ));
            }
            out.push(compiled);
        }
    }
    if router_at.is_none() {
        return Err(ConfigError::new(
            field(path, "http_filters"),
            "the HTTP filter chain must end with envoy.filters.http.router",
        ));
    }
    Ok(out)
}

/// A per-route (or per-virtual-host) filter config.
#[derive(Debug, Clone)]
pub enum PerFilterConfig {
    /// A CORS policy for `envoy.filters.http.cors`.
    Cors(Box<CorsPolicy>),
    /// A fault config for `envoy.filters.http.fault`.
    Fault(Box<Fault>),
    /// An RBAC override (`None`: RBAC disabled for the route).
    Rbac(Option<Box<rbac::HttpRbac>>),
    /// A jwt_authn `PerRouteConfig` (disabled, or a `requirement_map` entry).
    JwtAuthn(jwt::PerRoute),
    /// A local rate limit for `envoy.filters.http.local_ratelimit`.
    LocalRateLimit(Box<LocalRateLimit>),
    /// `FilterConfig{disabled: true}`: the filter is skipped on this route.
    Disabled,
    /// `FilterConfig{disabled: false}` without config: enable a filter that is disabled by default.
    Enabled,
}

impl PerFilterConfig {
    /// Compiles one `typed_per_filter_config[name]` value; `Ok(None)` for an optional config we do
    /// not support.
    pub fn compile(
        any: &waypoint_proto::google::protobuf::Any,
        path: &str,
    ) -> CompileResult<Option<Self>> {
        let t = Typed::new(any, path)?;
        // Filter configs (HTTPFault, LocalRateLimit) double as per-route configs.
        let name = match t.check_kind(
            &[ExtensionKind::PerRouteFilter],
            "a per-route filter config",
            path,
        ) {
            Ok(n) => n.to_owned(),
            Err(e) => match t.type_name.as_str() {
                "envoy.extensions.filters.http.fault.v3.HTTPFault"
                | "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit" => {
                    t.type_name.clone()
                }
                _ => return Err(e),
            },
        };
        let ipath = t.inner_path(path);
        Ok(Some(match name.as_str() {
            "envoy.extensions.filters.http.cors.v3.CorsPolicy" => PerFilterConfig::Cors(Box::new(
                CorsPolicy::compile(&t.decode(&name, path)?, &ipath)?,
            )),
            "envoy.extensions.filters.http.fault.v3.HTTPFault" => {
                PerFilterConfig::Fault(Box::new(Fault::compile(&t.decode(&name, path)?, &ipath)?))
            }
            "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit" => {
                PerFilterConfig::LocalRateLimit(Box::new(LocalRateLimit::compile(
                    &t.decode(&name, path)?,
                    &ipath,
                    true,
                )?))
            }
            "envoy.extensions.filters.http.rbac.v3.RBACPerRoute" => {
                let r: RbacPerRoute = t.decode(&name, path)?;
                PerFilterConfig::Rbac(rbac::HttpRbac::compile_per_route(&r, &ipath)?.map(Box::new))
            }
            "envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig" => {
                PerFilterConfig::JwtAuthn(jwt::PerRoute::compile(&t.decode(&name, path)?, &ipath)?)
            }
            "envoy.config.route.v3.FilterConfig" => {
                let fc: RouteFilterConfig = t.decode(&name, path)?;
                match &fc.config {
                    Some(inner) => {
                        if fc.is_optional
                            && !crate::config::allowlist::extension_supported(
                                &inner.type_url,
                                &inner.value,
                            )
                        {
                            return Ok(None);
                        }
                        if fc.disabled {
                            return Err(ConfigError::new(
                                field(&ipath, "disabled"),
                                "disabled with a config is contradictory",
                            ));
                        }
                        return PerFilterConfig::compile(inner, &field(&ipath, "config"));
                    }
                    None if fc.disabled => PerFilterConfig::Disabled,
                    None => PerFilterConfig::Enabled,
                }
            }
            other => {
                return Err(ConfigError::new(
                    path,
                    format!("{other} is not a per-route config"),
                ));
            }
        }))
    }
}
