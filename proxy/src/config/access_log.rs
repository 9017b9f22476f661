//! Access logs (`access_log` on listeners, HCMs and tcp_proxy): file, stdout and stderr loggers
//! with text or JSON formats and an optional response-flag filter.

use std::collections::BTreeMap;

use serde_json::Value as Json;
use waypoint_proto::envoy::{
    config::{
        accesslog::v3::{AccessLog as RawAccessLog, access_log_filter::FilterSpecifier},
        core::v3::{SubstitutionFormatString, substitution_format_string::Format as RawFormat},
    },
    extensions::access_loggers::{
        file::v3::{FileAccessLog, file_access_log::AccessLogFormat},
        stream::v3::{StderrAccessLog, StdoutAccessLog},
    },
};

use super::{
    CompileResult, ConfigError, field,
    format::{Format, FormatContext},
    index,
    supported::ExtensionKind,
    typed::{self, struct_to_json},
};

/// Envoy's default access log format (used when a logger has none).
pub const DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// Response flags Envoy knows (short forms).
const RESPONSE_FLAGS: &[&str] = &[
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
    "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR",
    "UDO",
];

/// Where log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogSink {
    /// A file path (`/dev/stdout` is common).
    File(String),
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// How a line is written.
#[derive(Debug, Clone)]
pub enum LogFormat {
    /// A text line.
    Text(Format),
    /// A JSON object whose string values are formats.
    Json(BTreeMap<String, Format>),
}

/// A compiled access logger.
#[derive(Debug, Clone)]
pub struct AccessLog {
    /// Logger name.
    pub name: String,
    /// Destination.
    pub sink: LogSink,
    /// Line format.
    pub format: LogFormat,
    /// Drop empty values from JSON lines.
    pub omit_empty_values: bool,
    /// Log only when one of these response flags is set (`None`: log everything).
    pub response_flags: Option<Vec<String>>,
}

impl AccessLog {
    /// Compiles one `AccessLog`.
    pub fn compile(raw: &RawAccessLog, path: &str) -> CompileResult<Self> {
        use waypoint_proto::envoy::config::accesslog::v3::access_log::ConfigType;
        let cpath = field(path, "typed_config");
        let any = match &raw.config_type {
            Some(ConfigType::TypedConfig(a)) => a,
            None => return Err(ConfigError::new(cpath, "typed_config is required")),
        };
        let t = typed::Typed::new(any, &cpath)?;
        let name = t
            .check_kind(&[ExtensionKind::AccessLogger], "an access logger", &cpath)?
            .to_owned();
        let ipath = t.inner_path(&cpath);
        let (sink, format) = match name.as_str() {
            "envoy.extensions.access_loggers.file.v3.FileAccessLog" => {
                let f: FileAccessLog = t.decode(&name, &cpath)?;
                if f.path.is_empty() {
                    return Err(ConfigError::new(field(&ipath, "path"), "path is required"));
                }
                let format = match &f.access_log_format {
                    Some(AccessLogFormat::LogFormat(s)) => Some(s),
                    None => None,
                    Some(_) => {
                        return Err(ConfigError::new(
                            &ipath,
                            "deprecated format fields are not supported; use log_format",
                        ));
                    }
                };
                (LogSink::File(f.path.clone()), format.cloned())
            }
            "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog" => {
                let f: StdoutAccessLog = t.decode(&name, &cpath)?;
                (LogSink::Stdout, stream_format(f.access_log_format))
            }
            "envoy.extensions.access_loggers.stream.v3.StderrAccessLog" => {
                let f: StderrAccessLog = t.decode(&name, &cpath)?;
                (LogSink::Stderr, stream_format_err(f.access_log_format))
            }
            other => {
                return Err(ConfigError::new(
                    &cpath,
                    format!("access logger {other} is not supported"),
                ));
            }
        };
        let (format, omit_empty_values) = match format {
            Some(s) => compile_format(&s, &field(&ipath, "log_format"))?,
            None => (
                LogFormat::Text(Format::parse(
                    DEFAULT_FORMAT,
                    FormatContext::AccessLog,
                    &ipath,
                )?),
                false,
            ),
        };
        let response_flags = match raw
            .filter
            .as_ref()
            .and_then(|f| f.filter_specifier.as_ref())
        {
            None => None,
            Some(FilterSpecifier::ResponseFlagFilter(r)) => {
                let fpath = field(&field(path, "filter"), "response_flag_filter");
                for (i, flag) in r.flags.iter().enumerate() {
                    if !RESPONSE_FLAGS.contains(&flag.as_str()) {
                        return Err(ConfigError::new(
                            index(&fpath, "flags", i),
                            format!("unknown response flag '{flag}'"),
                        ));
                    }
                }
                Some(r.flags.clone())
            }
            Some(_) => {
                return Err(ConfigError::new(
                    field(path, "filter"),
                    "only response_flag_filter is supported",
                ));
            }
        };
        Ok(AccessLog {
            name: raw.name.clone(),
            sink,
            format,
            omit_empty_values,
            response_flags,
        })
    }
}

fn stream_format(
    f: Option<waypoint_proto::envoy::extensions::access_loggers::stream::v3::stdout_access_log::AccessLogFormat>,
) -> Option<SubstitutionFormatString> {
    use waypoint_proto::envoy::extensions::access_loggers::stream::v3::stdout_access_log::AccessLogFormat as F;
    f.map(|F::LogFormat(s)| s)
}

fn stream_format_err(
    f: Option<waypoint_proto::envoy::extensions::access_loggers::stream::v3::stderr_access_log::AccessLogFormat>,
) -> Option<SubstitutionFormatString> {
    use waypoint_proto::envoy::extensions::access_loggers::stream::v3::stderr_access_log::AccessLogFormat as F;
    f.map(|F::LogFormat(s)| s)
}

/// Compiles a `SubstitutionFormatString` (text or JSON) for access logs.
// Deprecated forms are honoured: Istio and older control planes still send them.
#[allow(deprecated)]
pub fn compile_format(
    s: &SubstitutionFormatString,
    path: &str,
) -> CompileResult<(LogFormat, bool)> {
    let format = match &s.format {
        Some(RawFormat::TextFormat(t)) => LogFormat::Text(Format::parse(
            t,
            FormatContext::AccessLog,
            &field(path, "text_format"),
        )?),
        Some(RawFormat::TextFormatSource(src)) => {
            let p = field(path, "text_format_source");
            LogFormat::Text(Format::parse(
                &super::inline_text(src, &p)?,
                FormatContext::AccessLog,
                &p,
            )?)
        }
        Some(RawFormat::JsonFormat(st)) => {
            let p = field(path, "json_format");
            let Json::Object(map) = struct_to_json(st, &p)? else {
                return Err(ConfigError::new(p, "json_format must be an object"));
            };
            let mut out = BTreeMap::new();
            for (k, v) in map {
                let Json::String(text) = v else {
                    return Err(ConfigError::new(
                        super::key(path, "json_format", &k),
                        "only string values are supported in json_format",
                    ));
                };
                out.insert(
                    k.clone(),
                    Format::parse(
                        &text,
                        FormatContext::AccessLog,
                        &super::key(path, "json_format", &k),
                    )?,
                );
            }
            LogFormat::Json(out)
        }
        None => LogFormat::Text(Format::parse(
            DEFAULT_FORMAT,
            FormatContext::AccessLog,
            path,
        )?),
    };
    Ok((format, s.omit_empty_values))
}

/// Compiles `path.access_log[i]`.
pub fn compile_all(list: &[RawAccessLog], path: &str) -> CompileResult<Vec<AccessLog>> {
    list.iter()
        .enumerate()
        .map(|(i, l)| AccessLog::compile(l, &index(path, "access_log", i)))
        .collect()
}
