//! HTTP protocol settings, downstream (HCM) and upstream (cluster `HttpProtocolOptions`): each proto
//! field maps to exactly one setting here, which the data path hands to hyper/h2.

use std::time::Duration;

use waypoint_proto::envoy::{
    config::core::v3::{
        Http1ProtocolOptions, Http2ProtocolOptions, HttpProtocolOptions,
        http_protocol_options::HeadersWithUnderscoresAction,
    },
    extensions::upstreams::http::v3::{
        HttpProtocolOptions as UpstreamOptions,
        http_protocol_options::{UpstreamProtocolOptions, explicit_http_config::ProtocolConfig},
    },
};

use super::{CompileResult, ConfigError, field, opt_duration};

/// HTTP/1.1 settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Http1Options {
    /// `allow_absolute_url`: accept absolute-form request targets (`None`: Envoy's default, yes).
    pub allow_absolute_url: Option<bool>,
    /// `accept_http_10`.
    pub accept_http_10: bool,
    /// `default_host_for_http_10`: Host to use for HTTP/1.0 requests without one.
    pub default_host_for_http_10: Option<String>,
    /// `enable_trailers`.
    pub enable_trailers: bool,
    /// `allow_chunked_length`: accept requests with both Content-Length and chunked encoding.
    pub allow_chunked_length: bool,
    /// `override_stream_error_on_invalid_http_message`.
    pub stream_error_on_invalid_message: Option<bool>,
}

impl Http1Options {
    /// Compiles `o`.
    pub fn compile(o: &Http1ProtocolOptions, path: &str) -> CompileResult<Self> {
        if !o.default_host_for_http_10.is_empty() && !o.accept_http_10 {
            return Err(ConfigError::new(
                field(path, "default_host_for_http_10"),
                "needs accept_http_10",
            ));
        }
        Ok(Http1Options {
            allow_absolute_url: o.allow_absolute_url.as_ref().map(|b| b.value),
            accept_http_10: o.accept_http_10,
            default_host_for_http_10: (!o.default_host_for_http_10.is_empty())
                .then(|| o.default_host_for_http_10.clone()),
            enable_trailers: o.enable_trailers,
            allow_chunked_length: o.allow_chunked_length,
            stream_error_on_invalid_message: o
                .override_stream_error_on_invalid_http_message
                .as_ref()
                .map(|b| b.value),
        })
    }
}

/// HTTP/2 settings (`None`: Envoy's default applies).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Http2Options {
    /// `hpack_table_size` → SETTINGS_HEADER_TABLE_SIZE.
    pub hpack_table_size: Option<u32>,
    /// `max_concurrent_streams` → SETTINGS_MAX_CONCURRENT_STREAMS (not the reset-stream budget).
    pub max_concurrent_streams: Option<u32>,
    /// `initial_stream_window_size` → SETTINGS_INITIAL_WINDOW_SIZE.
    pub initial_stream_window_size: Option<u32>,
    /// `initial_connection_window_size` → the connection-level flow-control window.
    pub initial_connection_window_size: Option<u32>,
    /// `allow_connect`: accept (downstream) / send (upstream) CONNECT requests over HTTP/2.
    pub allow_connect: bool,
    /// `connection_keepalive.interval`: PING period.
    pub keepalive_interval: Option<Duration>,
    /// `connection_keepalive.timeout`: how long to wait for the PING ack.
    pub keepalive_timeout: Option<Duration>,
    /// `override_stream_error_on_invalid_http_message`.
    pub stream_error_on_invalid_message: Option<bool>,
}

/// RFC 9113 bounds of the flow-control windows.
const MIN_WINDOW: u32 = 65_535;
const MAX_WINDOW: u32 = 2_147_483_647;

impl Http2Options {
    /// Compiles `o`, checking the ranges Envoy's proto validation enforces.
    pub fn compile(o: &Http2ProtocolOptions, path: &str) -> CompileResult<Self> {
        let window = |v: Option<u32>, name: &str| -> CompileResult<Option<u32>> {
            match v {
                Some(w) if !(MIN_WINDOW..=MAX_WINDOW).contains(&w) => Err(ConfigError::new(
                    field(path, name),
                    format!("{w} is outside [{MIN_WINDOW}, {MAX_WINDOW}]"),
                )),
                other => Ok(other),
            }
        };
        let max_streams = o.max_concurrent_streams.as_ref().map(|v| v.value);
        if max_streams == Some(0) {
            return Err(ConfigError::new(
                field(path, "max_concurrent_streams"),
                "must be at least 1",
            ));
        }
        let keepalive = o.connection_keepalive.as_ref();
        let kpath = field(path, "connection_keepalive");
        Ok(Http2Options {
            hpack_table_size: o.hpack_table_size.as_ref().map(|v| v.value),
            max_concurrent_streams: max_streams,
            initial_stream_window_size: window(
                o.initial_stream_window_size.as_ref().map(|v| v.value),
                "initial_stream_window_size",
            )?,
            initial_connection_window_size: window(
                o.initial_connection_window_size.as_ref().map(|v| v.value),
                "initial_connection_window_size",
            )?,
            allow_connect: o.allow_connect,
            keepalive_interval: opt_duration(
                keepalive.and_then(|k| k.interval.as_ref()),
                &field(&kpath, "interval"),
            )?,
            keepalive_timeout: opt_duration(
                keepalive.and_then(|k| k.timeout.as_ref()),
                &field(&kpath, "timeout"),
            )?,
            stream_error_on_invalid_message: o
                .override_stream_error_on_invalid_http_message
                .as_ref()
                .map(|b| b.value),
        })
    }
}

/// What to do with header names containing `_`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnderscoreHeaders {
    /// Pass them.
    #[default]
    Allow,
    /// Reject the request (400).
    RejectRequest,
    /// Drop the header.
    DropHeader,
}

/// Settings common to HTTP/1 and HTTP/2 (`common_http_protocol_options`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommonHttpOptions {
    /// `idle_timeout`: close a connection without streams after this (`Some(0)`: never).
    pub idle_timeout: Option<Duration>,
    /// `max_connection_duration`.
    pub max_connection_duration: Option<Duration>,
    /// `max_headers_count` (Envoy's default is 100).
    pub max_headers_count: Option<u32>,
    /// `max_response_headers_kb`.
    pub max_response_headers_kb: Option<u32>,
    /// `max_stream_duration`.
    pub max_stream_duration: Option<Duration>,
    /// `headers_with_underscores_action`.
    pub headers_with_underscores: UnderscoreHeaders,
    /// `max_requests_per_connection`.
    pub max_requests_per_connection: Option<u32>,
}

impl CommonHttpOptions {
    /// Compiles `o`.
    pub fn compile(o: &HttpProtocolOptions, path: &str) -> CompileResult<Self> {
        Ok(CommonHttpOptions {
            idle_timeout: opt_duration(o.idle_timeout.as_ref(), &field(path, "idle_timeout"))?,
            max_connection_duration: opt_duration(
                o.max_connection_duration.as_ref(),
                &field(path, "max_connection_duration"),
            )?,
            max_headers_count: o.max_headers_count.as_ref().map(|v| v.value),
            max_response_headers_kb: o.max_response_headers_kb.as_ref().map(|v| v.value),
            max_stream_duration: opt_duration(
                o.max_stream_duration.as_ref(),
                &field(path, "max_stream_duration"),
            )?,
            headers_with_underscores: match HeadersWithUnderscoresAction::try_from(
                o.headers_with_underscores_action,
            ) {
                Ok(HeadersWithUnderscoresAction::RejectRequest) => UnderscoreHeaders::RejectRequest,
                Ok(HeadersWithUnderscoresAction::DropHeader) => UnderscoreHeaders::DropHeader,
                _ => UnderscoreHeaders::Allow,
            },
            max_requests_per_connection: o.max_requests_per_connection.as_ref().map(|v| v.value),
        })
    }
}

/// Which protocol a cluster speaks upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (no protocol options: Envoy's default).
    Http1(Http1Options),
    /// HTTP/2 (prior knowledge, or h2 over TLS).
    Http2(Http2Options),
    /// The downstream request's protocol, with settings for each.
    UseDownstream {
        /// For HTTP/1.1 requests.
        http1: Http1Options,
        /// For HTTP/2 requests (`None`: downstream HTTP/2 goes upstream as HTTP/1.1).
        http2: Option<Http2Options>,
    },
}

/// A cluster's `envoy.extensions.upstreams.http.v3.HttpProtocolOptions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamHttpOptions {
    /// `common_http_protocol_options`.
    pub common: CommonHttpOptions,
    /// `explicit_http_config` / `use_downstream_protocol_config`.
    pub protocol: UpstreamProtocol,
    /// `upstream_http_protocol_options.auto_sni`: SNI from the request's Host.
    pub auto_sni: bool,
    /// `upstream_http_protocol_options.auto_san_validation`.
    pub auto_san_validation: bool,
    /// `upstream_http_protocol_options.override_auto_sni_header`.
    pub override_auto_sni_header: Option<String>,
}

impl Default for UpstreamHttpOptions {
    fn default() -> Self {
        UpstreamHttpOptions {
            common: CommonHttpOptions::default(),
            protocol: UpstreamProtocol::Http1(Http1Options::default()),
            auto_sni: false,
            auto_san_validation: false,
            override_auto_sni_header: None,
        }
    }
}

impl UpstreamHttpOptions {
    /// Compiles `o` (at `path`, the Any's JSON path).
    pub fn compile(o: &UpstreamOptions, path: &str) -> CompileResult<Self> {
        let common = match &o.common_http_protocol_options {
            Some(c) => CommonHttpOptions::compile(c, &field(path, "common_http_protocol_options"))?,
            None => CommonHttpOptions::default(),
        };
        let protocol = match &o.upstream_protocol_options {
            None => UpstreamProtocol::Http1(Http1Options::default()),
            Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => {
                let epath = field(path, "explicit_http_config");
                match &e.protocol_config {
                    Some(ProtocolConfig::HttpProtocolOptions(h1)) => UpstreamProtocol::Http1(
                        Http1Options::compile(h1, &field(&epath, "http_protocol_options"))?,
                    ),
                    Some(ProtocolConfig::Http2ProtocolOptions(h2)) => UpstreamProtocol::Http2(
                        Http2Options::compile(h2, &field(&epath, "http2_protocol_options"))?,
                    ),
                    Some(ProtocolConfig::Http3ProtocolOptions(_)) => {
                        return Err(ConfigError::new(
                            field(&epath, "http3_protocol_options"),
                            "HTTP/3 upstreams are not supported",
                        ));
                    }
                    None => {
                        return Err(ConfigError::new(epath, "a protocol is required"));
                    }
                }
            }
            Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(d)) => {
                let dpath = field(path, "use_downstream_protocol_config");
                UpstreamProtocol::UseDownstream {
                    http1: match &d.http_protocol_options {
                        Some(h1) => {
                            Http1Options::compile(h1, &field(&dpath, "http_protocol_options"))?
                        }
                        None => Http1Options::default(),
                    },
                    http2: d
                        .http2_protocol_options
                        .as_ref()
                        .map(|h2| {
                            Http2Options::compile(h2, &field(&dpath, "http2_protocol_options"))
                        })
                        .transpose()?,
                }
            }
            Some(UpstreamProtocolOptions::AutoConfig(_)) => {
                return Err(ConfigError::new(
                    field(path, "auto_config"),
                    "ALPN-negotiated upstream protocol is not supported",
                ));
            }
        };
        let up = o.upstream_http_protocol_options.as_ref();
        Ok(UpstreamHttpOptions {
            common,
            protocol,
            auto_sni: up.is_some_and(|u| u.auto_sni),
            auto_san_validation: up.is_some_and(|u| u.auto_san_validation),
            override_auto_sni_header: up
                .map(|u| u.override_auto_sni_header.clone())
                .filter(|s| !s.is_empty()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use waypoint_proto::{
        envoy::config::core::v3::KeepaliveSettings,
        google::protobuf::{Duration as PbDuration, UInt32Value},
    };

    #[test]
    fn http2_fields_map_one_to_one() {
        let o = Http2ProtocolOptions {
            max_concurrent_streams: Some(UInt32Value { value: 100 }),
            initial_stream_window_size: Some(UInt32Value { value: 65_536 }),
            initial_connection_window_size: Some(UInt32Value { value: 1_048_576 }),
            hpack_table_size: Some(UInt32Value { value: 4096 }),
            allow_connect: true,
            connection_keepalive: Some(KeepaliveSettings {
                interval: Some(PbDuration {
                    seconds: 10,
                    nanos: 0,
                }),
                timeout: Some(PbDuration {
                    seconds: 20,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = Http2Options::compile(&o, "h2").expect("compiles");
        assert_eq!(c.max_concurrent_streams, Some(100));
        assert_eq!(c.initial_stream_window_size, Some(65_536));
        assert_eq!(c.initial_connection_window_size, Some(1_048_576));
        assert_eq!(c.hpack_table_size, Some(4096));
        assert!(c.allow_connect);
        assert_eq!(c.keepalive_interval, Some(Duration::from_secs(10)));
        assert_eq!(c.keepalive_timeout, Some(Duration::from_secs(20)));
    }

    #[test]
    fn http2_window_out_of_range_is_rejected() {
        let o = Http2ProtocolOptions {
            initial_stream_window_size: Some(UInt32Value { value: 1 }),
            ..Default::default()
        };
        let err = Http2Options::compile(&o, "http2_protocol_options").expect_err("too small");
        assert!(
            err.to_string()
                .starts_with("http2_protocol_options.initial_stream_window_size:"),
            "{err}"
        );
    }

    #[test]
    fn common_options_idle_timeout() {
        let o = HttpProtocolOptions {
            idle_timeout: Some(PbDuration {
                seconds: 300,
                nanos: 0,
            }),
            max_headers_count: Some(UInt32Value { value: 50 }),
            headers_with_underscores_action: HeadersWithUnderscoresAction::DropHeader as i32,
            ..Default::default()
        };
        let c = CommonHttpOptions::compile(&o, "c").expect("compiles");
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(c.max_headers_count, Some(50));
        assert_eq!(c.headers_with_underscores, UnderscoreHeaders::DropHeader);
    }
}
