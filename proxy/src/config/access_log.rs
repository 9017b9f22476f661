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

/// `AccessLogFilter`: which streams a logger writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogFilter {
    /// `response_flag_filter`: one of these flags is set (empty: any flag).
    ResponseFlags(Vec<String>),
    /// `status_code_filter` (the response code; 0 for TCP and when none was sent).
    StatusCode(Comparison),
    /// `duration_filter` (total duration in milliseconds).
    Duration(Comparison),
    /// `not_health_check_filter`: no stream here is a health check (there is no health_check
    /// HTTP filter), so it passes everything.
    NotHealthCheck,
    /// `and_filter`.
    And(Vec<LogFilter>),
    /// `or_filter`.
    Or(Vec<LogFilter>),
}

/// `ComparisonFilter` with its value: `RuntimeUInt32.default_value` (no runtime layer overrides
/// the key here, so the default is the value Envoy would use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Comparison {
    /// The operator.
    pub op: CompareOp,
    /// The value compared against.
    pub value: u64,
}

/// `ComparisonFilter.Op`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    /// `EQ`.
    Eq,
    /// `GE`.
    Ge,
    /// `LE`.
    Le,
    /// `NE`.
    Ne,
}

impl Comparison {
    /// Whether `v` satisfies the comparison.
    pub fn holds(&self, v: u64) -> bool {
        match self.op {
            CompareOp::Eq => v == self.value,
            CompareOp::Ge => v >= self.value,
            CompareOp::Le => v <= self.value,
            CompareOp::Ne => v != self.value,
        }
    }
}

/// What a filter looks at.
#[derive(Debug, Clone, Copy, Default)]
pub struct FilterInput {
    /// Response flags.
    pub flags: crate::flags::ResponseFlags,
    /// Response code (0: none was sent, or TCP).
    pub code: u16,
    /// Total duration in milliseconds.
    pub duration_ms: u64,
}

type RawFilter = waypoint_proto::envoy::config::accesslog::v3::AccessLogFilter;

impl LogFilter {
    /// Whether a stream with `input` is logged.
    pub fn passes(&self, input: &FilterInput) -> bool {
        match self {
            LogFilter::ResponseFlags(list) if list.is_empty() => !input.flags.is_empty(),
            LogFilter::ResponseFlags(list) => input
                .flags
                .iter()
                .any(|f| list.iter().any(|l| l == f.short())),
            LogFilter::StatusCode(c) => c.holds(u64::from(input.code)),
            LogFilter::Duration(c) => c.holds(input.duration_ms),
            LogFilter::NotHealthCheck => true,
            LogFilter::And(all) => all.iter().all(|f| f.passes(input)),
            LogFilter::Or(any) => any.iter().any(|f| f.passes(input)),
        }
    }

    /// Compiles an `AccessLogFilter` at `path`.
    pub fn compile(raw: &RawFilter, path: &str) -> CompileResult<Self> {
        let Some(spec) = raw.filter_specifier.as_ref() else {
            return Err(ConfigError::new(path, "a filter is required"));
        };
        let list = |filters: &[RawFilter], name: &str| -> CompileResult<Vec<LogFilter>> {
            let p = field(path, name);
            if filters.len() < 2 {
                return Err(ConfigError::new(
                    field(&p, "filters"),
                    "at least two filters are required",
                ));
            }
            filters
                .iter()
                .enumerate()
                .map(|(i, f)| LogFilter::compile(f, &index(&p, "filters", i)))
                .collect()
        };
        Ok(match spec {
            FilterSpecifier::ResponseFlagFilter(r) => {
                let fpath = field(path, "response_flag_filter");
                for (i, flag) in r.flags.iter().enumerate() {
                    if !RESPONSE_FLAGS.contains(&flag.as_str()) {
                        return Err(ConfigError::new(
                            index(&fpath, "flags", i),
                            format!("unknown response flag '{flag}'"),
                        ));
                    }
                }
                LogFilter::ResponseFlags(r.flags.clone())
            }
            FilterSpecifier::StatusCodeFilter(f) => LogFilter::StatusCode(comparison(
                f.comparison.as_ref(),
                &field(&field(path, "status_code_filter"), "comparison"),
            )?),
            FilterSpecifier::DurationFilter(f) => LogFilter::Duration(comparison(
                f.comparison.as_ref(),
                &field(&field(path, "duration_filter"), "comparison"),
            )?),
            FilterSpecifier::NotHealthCheckFilter(_) => LogFilter::NotHealthCheck,
            FilterSpecifier::AndFilter(a) => LogFilter::And(list(&a.filters, "and_filter")?),
            FilterSpecifier::OrFilter(o) => LogFilter::Or(list(&o.filters, "or_filter")?),
            _ => {
                return Err(ConfigError::new(
                    path,
                    "only response_flag_filter, status_code_filter, duration_filter, not_health_check_filter, and_filter and or_filter are supported",
                ));
            }
        })
    }
}

fn comparison(
    c: Option<&waypoint_proto::envoy::config::accesslog::v3::ComparisonFilter>,
    path: &str,
) -> CompileResult<Comparison> {
    use waypoint_proto::envoy::config::accesslog::v3::comparison_filter::Op;
    let c = c.ok_or_else(|| ConfigError::new(path, "comparison is required"))?;
    let op = match Op::try_from(c.op) {
        Ok(Op::Eq) => CompareOp::Eq,
        Ok(Op::Ge) => CompareOp::Ge,
        Ok(Op::Le) => CompareOp::Le,
        Ok(Op::Ne) => CompareOp::Ne,
        Err(_) => {
            return Err(ConfigError::new(
                field(path, "op"),
                format!("unknown op {}", c.op),
            ));
        }
    };
    let value = c
        .value
        .as_ref()
        .ok_or_else(|| ConfigError::new(field(path, "value"), "value is required"))?;
    Ok(Comparison {
        op,
        value: u64::from(value.default_value),
    })
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
    /// `filter` (`None`: log everything).
    pub filter: Option<LogFilter>,
    /// The writer, opened on the first line (shared by every logger of the same destination).
    pub writer: crate::access_log::WriterSlot,
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
        let filter = raw
            .filter
            .as_ref()
            .map(|f| LogFilter::compile(f, &field(path, "filter")))
            .transpose()?;
        Ok(AccessLog {
            name: raw.name.clone(),
            sink,
            format,
            omit_empty_values,
            filter,
            writer: Default::default(),
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

#[cfg(test)]
mod tests {
    use serde_json::{Value as Json, json};
    use waypoint_proto::{json as pjson, resource::ResourceKind};

    use super::*;
    use crate::config::{ConfigStore, Update};

    fn compile(v: Json) -> CompileResult<AccessLog> {
        let raw: RawAccessLog = pjson::from_json(&v).expect("json");
        AccessLog::compile(&raw, "access_log[0]")
    }

    fn file(format: Json) -> Json {
        json!({"name": "f", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": "/dev/stdout", "log_format": format}})
    }

    #[test]
    fn formats_and_filters_compile() {
        let l = compile(json!({"name": "f", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": "/tmp/x.log"}}))
        .expect("compiles");
        assert_eq!(l.sink, LogSink::File("/tmp/x.log".into()));
        let LogFormat::Text(f) = &l.format else {
            panic!("text")
        };
        assert_eq!(
            f,
            &Format::parse(DEFAULT_FORMAT, FormatContext::AccessLog, "p").expect("default")
        );
        let l = compile(file(json!({
            "json_format": {"code": "%RESPONSE_CODE%", "t": "%START_TIME(%s.%3f)%"},
            "omit_empty_values": true})))
        .expect("compiles");
        assert!(l.omit_empty_values);
        let LogFormat::Json(m) = &l.format else {
            panic!("json")
        };
        assert_eq!(m.keys().collect::<Vec<_>>(), ["code", "t"]);
        let l = compile(json!({"name": "s",
            "filter": {"response_flag_filter": {"flags": ["UH", "NR"]}},
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"}}))
        .expect("compiles");
        assert_eq!(l.sink, LogSink::Stdout);
        assert_eq!(
            l.filter,
            Some(LogFilter::ResponseFlags(vec!["UH".into(), "NR".into()]))
        );
    }

    #[test]
    fn what_cannot_be_rendered_is_rejected() {
        let cases = [
            (
                json!({"text_format": "%START_TIME(%Q)%\n"}),
                "%Q is not supported",
            ),
            (
                json!({"text_format": "%FILTER_STATE(k:F:field)%"}),
                "field access",
            ),
            (
                json!({"text_format": "%FILTER_STATE(k:JSON)%"}),
                "PLAIN or TYPED",
            ),
            (
                json!({"text_format": "%CEL(request.path)%"}),
                "not supported",
            ),
            (json!({"text_format": "%DURATION(x)%"}), "takes no argument"),
            (
                json!({"json_format": {"nested": {"a": "%DURATION%"}}}),
                "only string values",
            ),
        ];
        for (format, want) in cases {
            let err = compile(file(format.clone())).expect_err("rejected");
            assert!(err.to_string().contains(want), "{format}: {err}");
        }
        let err = compile(json!({"name": "f",
            "filter": {"runtime_filter": {"runtime_key": "k"}},
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"}}))
        .expect_err("rejected");
        assert!(
            err.to_string().contains("only response_flag_filter"),
            "{err}"
        );
        assert!(
            err.to_string().starts_with("access_log[0].filter:"),
            "{err}"
        );
        let err = compile(json!({"name": "f",
            "filter": {"and_filter": {"filters": [{"not_health_check_filter": {}}]}},
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"}}))
        .expect_err("rejected");
        assert!(err.to_string().contains("at least two"), "{err}");
        let err = compile(json!({"name": "f",
            "filter": {"response_flag_filter": {"flags": ["XX"]}},
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"}}))
        .expect_err("rejected");
        assert!(
            err.to_string().contains("unknown response flag 'XX'"),
            "{err}"
        );
    }

    #[test]
    fn filters_compile_and_decide() {
        use crate::flags::{ResponseFlag, ResponseFlags};
        let l = compile(json!({"name": "f",
            "filter": {"or_filter": {"filters": [
                {"status_code_filter": {"comparison": {"op": "GE", "value": {"default_value": 500, "runtime_key": "k"}}}},
                {"and_filter": {"filters": [
                    {"duration_filter": {"comparison": {"op": "GE", "value": {"default_value": 1000, "runtime_key": "d"}}}},
                    {"not_health_check_filter": {}}]}},
                {"response_flag_filter": {}}]}},
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"}}))
        .expect("compiles");
        let f = l.filter.expect("filter");
        let input = |code: u16, duration_ms: u64, flags: ResponseFlags| FilterInput {
            flags,
            code,
            duration_ms,
        };
        let none = ResponseFlags::default();
        assert!(f.passes(&input(503, 1, none)));
        assert!(f.passes(&input(500, 1, none)));
        assert!(!f.passes(&input(499, 999, none)));
        assert!(f.passes(&input(200, 1000, none)));
        assert!(f.passes(&input(
            200,
            1,
            ResponseFlags::of(ResponseFlag::DownstreamConnectionTermination)
        )));
        let status = |op, value| LogFilter::StatusCode(Comparison { op, value });
        assert!(status(CompareOp::Eq, 200).passes(&input(200, 0, none)));
        assert!(!status(CompareOp::Ne, 200).passes(&input(200, 0, none)));
        assert!(status(CompareOp::Le, 200).passes(&input(0, 0, none)));
        let only_uh = LogFilter::ResponseFlags(vec!["UH".into(), "UF".into()]);
        let uh = ResponseFlags::of(ResponseFlag::NoHealthyUpstream);
        assert!(only_uh.passes(&input(503, 0, uh)));
        assert!(!only_uh.passes(&input(503, 0, none)));
        let nr = ResponseFlags::of(ResponseFlag::NoRouteFound);
        assert!(!only_uh.passes(&input(404, 0, nr)));
    }

    fn tcp_listener(tcp_proxy: Json) -> Json {
        json!({
            "name": "tcp",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy",
                "typed_config": tcp_proxy}]}]
        })
    }

    fn nack(doc: &Json) -> Option<String> {
        let kind = ResourceKind::Listener;
        let update = Update {
            name: "tcp".into(),
            version: "1".into(),
            resource: pjson::any_from_json(kind.type_url(), doc).expect("encodes"),
        };
        ConfigStore::default()
            .apply(kind, &[update], &[])
            .into_iter()
            .next()
            .map(|e| e.message)
    }

    #[test]
    fn tcp_proxy_periodic_access_logs_are_rejected() {
        let base = json!({
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "tcp", "cluster": "c",
            "access_log": [{"name": "f",
                "filter": {"or_filter": {"filters": [
                    {"status_code_filter": {"comparison": {"op": "NE", "value": {"default_value": 0, "runtime_key": "k"}}}},
                    {"and_filter": {"filters": [{"not_health_check_filter": {}},
                        {"duration_filter": {"comparison": {"value": {"default_value": 5, "runtime_key": "d"}}}}]}},
                    {"response_flag_filter": {"flags": ["UF"]}}]}},
                "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"}}]
        });
        // Every filter kind we compile passes the allowlist walk.
        assert_eq!(nack(&tcp_listener(base.clone())), None);
        let mut periodic = base.clone();
        periodic["access_log_options"] = json!({"access_log_flush_interval": "5s"});
        let msg = nack(&tcp_listener(periodic)).expect("NACK");
        assert!(msg.contains("access_log_options"), "{msg}");
        let mut deprecated = base;
        deprecated["access_log_flush_interval"] = json!("5s");
        let msg = nack(&tcp_listener(deprecated)).expect("NACK");
        assert!(msg.contains("access_log_flush_interval"), "{msg}");
    }
}
