//! Access logs on the data path: the values an HTTP stream or a TCP connection renders into
//! Envoy's command operators, the text and JSON line formats, the response-flag filter, and the
//! writers (`envoy.access_loggers.file`, stdout, stderr).
//!
//! Writing never blocks the runtime: a line is handed to a writer thread through a bounded
//! channel (one thread and one `BufWriter` per distinct path, shared by every logger naming it,
//! flushed as soon as the channel is empty), so lines are written whole and in order. A full
//! channel drops the line and counts it; a path that cannot be opened is reported once and the
//! logger writes nothing.

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::Write as _,
    sync::{
        Arc, Mutex, OnceLock, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::HeaderMap;
use serde_json::{Map, Value as Json};

use crate::{
    config::{
        access_log::{AccessLog, FilterInput, LogFormat, LogSink},
        format::{FormatValues, Operator},
    },
    flags::{ResponseFlag, ResponseFlags},
    http::stream_info::UpstreamInfo,
    listener::conn::{ConnContext, ConnValues},
};

/// Lines a writer may hold before new ones are dropped.
const QUEUE_LINES: usize = 16 * 1024;
/// The writer threads' buffer.
const BUFFER_BYTES: usize = 64 * 1024;

// ------------------------------------------------------------------------------------ values

/// The HTTP part of a stream's log values.
#[derive(Debug, Default)]
pub struct HttpValues<'a> {
    /// The status sent downstream (0: none was).
    pub response_code: u16,
    /// Response headers.
    pub response_headers: Option<&'a HeaderMap>,
    /// Response trailers.
    pub trailers: Option<&'a HeaderMap>,
    /// Start → last request byte received.
    pub request_duration: Option<Duration>,
    /// Start → first byte of the upstream response (unset for local replies).
    pub response_duration: Option<Duration>,
    /// `%RESPONSE_CODE_DETAILS%`.
    pub code_details: Option<&'a str>,
    /// `%UPSTREAM_TRANSPORT_FAILURE_REASON%`.
    pub transport_failure: Option<&'a str>,
    /// `%ROUTE_NAME%`.
    pub route_name: Option<&'a str>,
    /// `%LOCAL_REPLY_BODY%`.
    pub local_reply_body: Option<&'a str>,
}

/// Everything an access log line can show about one HTTP stream or TCP connection.
pub struct LogValues<'a> {
    /// The connection (and, for HTTP, the request headers and stream filter state).
    pub conn: ConnValues<'a>,
    /// When the stream (connection) started, wall clock.
    pub started_at: SystemTime,
    /// Start → end.
    pub duration: Duration,
    /// Response flags.
    pub flags: ResponseFlags,
    /// Body bytes (HTTP) or connection bytes (TCP) received from the downstream.
    pub bytes_received: u64,
    /// Body bytes (HTTP) or connection bytes (TCP) sent to the downstream.
    pub bytes_sent: u64,
    /// The upstream side, as far as it got.
    pub upstream: Option<&'a UpstreamInfo>,
    /// The HTTP part (`None` for TCP).
    pub http: Option<HttpValues<'a>>,
}

fn ms(d: Duration) -> String {
    d.as_millis().to_string()
}

/// A header by name (case-insensitive), `:status` for responses.
fn header(map: Option<&HeaderMap>, name: &str) -> Option<String> {
    let map = map?;
    map.get(name.to_ascii_lowercase().as_str())
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// `X?Y`: X, else Y.
fn alternatives(args: &str, f: impl Fn(&str) -> Option<String>) -> Option<String> {
    let mut alts = args.split('?');
    let first = alts.next()?;
    f(first).or_else(|| alts.next().and_then(f))
}

/// Envoy's long response flag names (`%RESPONSE_FLAGS_LONG%`).
fn long_name(f: ResponseFlag) -> &'static str {
    match f {
        ResponseFlag::NoHealthyUpstream => "NoHealthyUpstream",
        ResponseFlag::UpstreamConnectionFailure => "UpstreamConnectionFailure",
        ResponseFlag::UpstreamOverflow => "UpstreamOverflow",
        ResponseFlag::NoRouteFound => "NoRouteFound",
        ResponseFlag::UpstreamRetryLimitExceeded => "UpstreamRetryLimitExceeded",
        ResponseFlag::NoClusterFound => "NoClusterFound",
        ResponseFlag::DownstreamConnectionTermination => "DownstreamConnectionTermination",
        ResponseFlag::UpstreamConnectionTermination => "UpstreamConnectionTermination",
        ResponseFlag::UpstreamRequestTimeout => "UpstreamRequestTimeout",
        ResponseFlag::UpstreamRemoteReset => "UpstreamRemoteReset",
        ResponseFlag::LocalReset => "LocalReset",
        ResponseFlag::DownstreamProtocolError => "DownstreamProtocolError",
        ResponseFlag::UpstreamProtocolError => "UpstreamProtocolError",
        ResponseFlag::StreamIdleTimeout => "StreamIdleTimeout",
        ResponseFlag::UnauthorizedExternalService => "UnauthorizedExternalService",
        ResponseFlag::RbacAccessDenied => "RbacAccessDenied",
        ResponseFlag::FaultInjected => "FaultInjected",
        ResponseFlag::DelayInjected => "DelayInjected",
        ResponseFlag::RateLimited => "RateLimited",
        ResponseFlag::UpstreamMaxStreamDurationReached => "UpstreamMaxStreamDurationReached",
        ResponseFlag::DurationTimeout => "DurationTimeout",
    }
}

fn metadata_path(md: &std::collections::BTreeMap<String, Json>, args: &str) -> Option<String> {
    let mut parts = args.split(':');
    let mut v = md.get(parts.next()?)?;
    for k in parts {
        v = v.get(k)?;
    }
    Some(match v {
        Json::String(s) => s.clone(),
        // Struct numbers are doubles; integral ones print as integers (proto3 JSON does).
        Json::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => format!("{}", f as i64),
            _ => n.to_string(),
        },
        other => other.to_string(),
    })
}

impl FormatValues for LogValues<'_> {
    fn value(&self, op: &Operator) -> Option<String> {
        let http = self.http.as_ref();
        let up = self.upstream;
        let up_addr = || match up.and_then(|u| u.address())? {
            crate::config::endpoint::EndpointAddress::Socket(a) => Some(Ok(*a)),
            crate::config::endpoint::EndpointAddress::Pipe(p) => {
                Some(Err(p.to_string_lossy().into_owned()))
            }
            // Envoy's internal address text: `envoy://<listener>/<endpoint id>` (a waypoint's
            // upstream shows `envoy://connect_originate/<podIP>:<port>`).
            crate::config::endpoint::EndpointAddress::Internal {
                listener,
                endpoint_id,
            } => Some(Err(format!(
                "envoy://{listener}/{}",
                endpoint_id.as_deref().unwrap_or("")
            ))),
        };
        match op.name.as_str() {
            "START_TIME" => Some(format_time(self.started_at, op.args.as_deref())),
            "DURATION" => Some(ms(self.duration)),
            "REQUEST_DURATION" => http.and_then(|h| h.request_duration).map(ms),
            "RESPONSE_DURATION" => http.and_then(|h| h.response_duration).map(ms),
            "RESPONSE_TX_DURATION" => http
                .and_then(|h| h.response_duration)
                .map(|r| ms(self.duration.saturating_sub(r))),
            "BYTES_RECEIVED" => Some(self.bytes_received.to_string()),
            "BYTES_SENT" => Some(self.bytes_sent.to_string()),
            "RESPONSE_FLAGS" => Some(self.flags.to_string()),
            "RESPONSE_FLAGS_LONG" => Some(if self.flags.is_empty() {
                "-".to_owned()
            } else {
                self.flags
                    .iter()
                    .map(long_name)
                    .collect::<Vec<_>>()
                    .join(",")
            }),
            // 0 when no response was sent, and for TCP (Istio's TCP lines show `0`).
            "RESPONSE_CODE" => Some(http.map_or(0, |h| h.response_code).to_string()),
            "RESPONSE_CODE_DETAILS" => http.and_then(|h| h.code_details).map(str::to_owned),
            "UPSTREAM_TRANSPORT_FAILURE_REASON" => {
                http.and_then(|h| h.transport_failure).map(str::to_owned)
            }
            "ROUTE_NAME" => http
                .and_then(|h| h.route_name)
                .filter(|n| !n.is_empty())
                .map(str::to_owned),
            "LOCAL_REPLY_BODY" => http.and_then(|h| h.local_reply_body).map(str::to_owned),
            "RESP" => {
                let h = http?;
                let args = op.args.as_deref()?;
                alternatives(args, |name| {
                    if name.eq_ignore_ascii_case(":status") {
                        return (h.response_code != 0).then(|| h.response_code.to_string());
                    }
                    header(h.response_headers, name)
                })
            }
            "TRAILER" => {
                let h = http?;
                alternatives(op.args.as_deref()?, |name| header(h.trailers, name))
            }
            "PROTOCOL" => {
                let v = self.conn.request.map(|r| r.version)?;
                Some(crate::listener::conn::protocol_text(v).to_owned())
            }
            "STREAM_ID" => {
                let r = self.conn.request?;
                header(Some(&r.headers), "x-request-id")
            }
            "UPSTREAM_HOST" => up_addr().map(|a| a.map_or_else(|s| s, |a| a.to_string())),
            "UPSTREAM_REMOTE_ADDRESS" => up_addr().map(|a| a.map_or_else(|s| s, |a| a.to_string())),
            "UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => {
                up_addr().map(|a| a.map_or_else(|s| s, |a| a.ip().to_string()))
            }
            "UPSTREAM_REMOTE_PORT" => up_addr().and_then(|a| a.ok()).map(|a| a.port().to_string()),
            "UPSTREAM_CLUSTER" => up.and_then(|u| u.cluster.as_ref()).map(|c| {
                if c.alt_stat_name.is_empty() {
                    c.name.clone()
                } else {
                    c.alt_stat_name.clone()
                }
            }),
            "UPSTREAM_CLUSTER_RAW" => up.and_then(|u| u.cluster.as_ref()).map(|c| c.name.clone()),
            "UPSTREAM_REQUEST_ATTEMPT_COUNT" => Some(up.map_or(0, |u| u.attempts).to_string()),
            "CLUSTER_METADATA" => {
                let c = up.and_then(|u| u.cluster.as_ref())?;
                metadata_path(&c.filter_metadata, op.args.as_deref()?)
            }
            "UPSTREAM_METADATA" => {
                let h = up.and_then(|u| u.host.as_ref())?;
                metadata_path(&h.metadata, op.args.as_deref()?)
            }
            // Known to Envoy, not tracked here: the upstream connection's local side and TLS,
            // header byte sizes (Envoy counts its own header maps), connection termination
            // details, upstream filter state and protocol. They render as missing.
            "UPSTREAM_LOCAL_ADDRESS"
            | "UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT"
            | "UPSTREAM_LOCAL_PORT"
            | "UPSTREAM_PEER_URI_SAN"
            | "UPSTREAM_LOCAL_URI_SAN"
            | "UPSTREAM_PEER_SUBJECT"
            | "UPSTREAM_TLS_VERSION"
            | "UPSTREAM_PROTOCOL"
            | "UPSTREAM_FILTER_STATE"
            | "REQUEST_HEADERS_BYTES"
            | "RESPONSE_HEADERS_BYTES"
            | "CONNECTION_TERMINATION_DETAILS" => None,
            _ => self.conn.value(op),
        }
    }
}

// ------------------------------------------------------------------------------------ time

/// Checks a `%START_TIME(...)%` format: the strftime specifiers [`format_time`] knows.
pub fn check_time_format(fmt: &str) -> Result<(), String> {
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            continue;
        }
        match chars.next() {
            Some(
                'Y' | 'y' | 'm' | 'd' | 'e' | 'H' | 'M' | 'S' | 'j' | 'z' | 'Z' | 's' | 'f' | 'F'
                | 'T' | 'D' | 'R' | 'a' | 'A' | 'b' | 'h' | 'B' | 'p' | 'I' | 'u' | 'w' | 'n' | 't'
                | '%',
            ) => {}
            Some('1'..='9') => {
                if chars.next() != Some('f') {
                    return Err("a digit after '%' must be followed by 'f' (%3f)".into());
                }
            }
            Some('E') => match chars.next() {
                Some('z') => {}
                Some('1'..='9' | '*') if chars.next() == Some('S') => {}
                _ => return Err("only %E<n>S, %E*S and %Ez are supported after %E".into()),
            },
            Some(other) => return Err(format!("strftime specifier %{other} is not supported")),
            None => return Err("a trailing '%'".into()),
        }
    }
    Ok(())
}

/// A UTC calendar time.
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    yday: u32,
    wday: u32,
}

fn civil(secs: i64) -> Civil {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400) as u32;
    // Days since 1970-01-01 → proleptic Gregorian date (the era/day-of-era method).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const BEFORE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = BEFORE[(month - 1) as usize] + day + u32::from(leap && month > 2);
    Civil {
        year,
        month,
        day,
        hour: rem / 3600,
        minute: rem / 60 % 60,
        second: rem % 60,
        yday,
        wday: (days + 4).rem_euclid(7) as u32,
    }
}

const DAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// `%START_TIME%` in UTC: Envoy's default `2026-11-27T09:00:00.123Z`, or a strftime format with
/// Envoy's additions (`%s` seconds since the epoch, `%f`/`%<n>f` fractional seconds, absl's
/// `%E<n>S`/`%E*S` seconds with a fraction).
pub fn format_time(t: SystemTime, fmt: Option<&str>) -> String {
    let (secs, nanos) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let n = d.subsec_nanos();
            if n == 0 {
                (-(d.as_secs() as i64), 0)
            } else {
                (-(d.as_secs() as i64) - 1, 1_000_000_000 - n)
            }
        }
    };
    let c = civil(secs);
    let Some(fmt) = fmt else {
        return format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            c.year,
            c.month,
            c.day,
            c.hour,
            c.minute,
            c.second,
            nanos / 1_000_000
        );
    };
    let frac = |digits: u32| -> String {
        let digits = digits.clamp(1, 9);
        format!(
            "{:0width$}",
            nanos / 10u32.pow(9 - digits),
            width = digits as usize
        )
    };
    let mut out = String::with_capacity(fmt.len() + 16);
    let mut chars = fmt.chars();
    while let Some(ch) = chars.next() {
        if ch != '%' {
            out.push(ch);
            continue;
        }
        let Some(spec) = chars.next() else {
            out.push('%');
            break;
        };
        // Writing to a String cannot fail.
        let _ = match spec {
            'Y' => write!(out, "{:04}", c.year),
            'y' => write!(out, "{:02}", c.year.rem_euclid(100)),
            'm' => write!(out, "{:02}", c.month),
            'd' => write!(out, "{:02}", c.day),
            'e' => write!(out, "{:2}", c.day),
            'H' => write!(out, "{:02}", c.hour),
            'I' => write!(out, "{:02}", (c.hour + 11) % 12 + 1),
            'p' => write!(out, "{}", if c.hour < 12 { "AM" } else { "PM" }),
            'M' => write!(out, "{:02}", c.minute),
            'S' => write!(out, "{:02}", c.second),
            'j' => write!(out, "{:03}", c.yday),
            'u' => write!(out, "{}", if c.wday == 0 { 7 } else { c.wday }),
            'w' => write!(out, "{}", c.wday),
            'z' => write!(out, "+0000"),
            'Z' => write!(out, "UTC"),
            's' => write!(out, "{secs}"),
            'f' => write!(out, "{}", frac(9)),
            'F' => write!(out, "{:04}-{:02}-{:02}", c.year, c.month, c.day),
            'T' => write!(out, "{:02}:{:02}:{:02}", c.hour, c.minute, c.second),
            'R' => write!(out, "{:02}:{:02}", c.hour, c.minute),
            'D' => write!(
                out,
                "{:02}/{:02}/{:02}",
                c.month,
                c.day,
                c.year.rem_euclid(100)
            ),
            'a' => write!(out, "{}", &DAYS[c.wday as usize][..3]),
            'A' => write!(out, "{}", DAYS[c.wday as usize]),
            'b' | 'h' => write!(out, "{}", &MONTHS[(c.month - 1) as usize][..3]),
            'B' => write!(out, "{}", MONTHS[(c.month - 1) as usize]),
            'n' => {
                out.push('\n');
                Ok(())
            }
            't' => {
                out.push('\t');
                Ok(())
            }
            '%' => write!(out, "%"),
            d @ '1'..='9' => {
                // `%3f`; anything else was refused when the format was compiled.
                chars.next();
                write!(out, "{}", frac(d.to_digit(10).unwrap_or(9)))
            }
            'E' => match chars.next() {
                Some('z') => {
                    out.push_str("+00:00");
                    Ok(())
                }
                Some('*') => {
                    chars.next();
                    let f = frac(9);
                    let f = f.trim_end_matches('0');
                    if f.is_empty() {
                        write!(out, "{:02}", c.second)
                    } else {
                        write!(out, "{:02}.{f}", c.second)
                    }
                }
                Some(d) => {
                    // `%E<n>S`; anything else was refused when the format was compiled.
                    chars.next();
                    write!(out, "{:02}.{}", c.second, frac(d.to_digit(10).unwrap_or(9)))
                }
                None => Ok(()),
            },
            other => write!(out, "%{other}"),
        };
    }
    out
}

// ------------------------------------------------------------------------------------ lines

/// Whether `log`'s filter lets the stream of `values` through.
pub fn passes(log: &AccessLog, values: &LogValues<'_>) -> bool {
    log.filter.as_ref().is_none_or(|f| {
        f.passes(&FilterInput {
            flags: values.flags,
            code: values.http.as_ref().map_or(0, |h| h.response_code),
            duration_ms: u64::try_from(values.duration.as_millis()).unwrap_or(u64::MAX),
        })
    })
}

/// The line `log` writes for `values` (JSON lines end with a newline; text lines end as their
/// format does, as in Envoy).
pub fn render(log: &AccessLog, values: &dyn FormatValues) -> String {
    let missing = if log.omit_empty_values { "" } else { "-" };
    match &log.format {
        LogFormat::Text(f) => f.render_or(values, missing),
        LogFormat::Json(fields) => {
            let mut map = Map::new();
            for (key, f) in fields {
                let value = match f.single_operator() {
                    Some(op) => match values.value(op) {
                        None if log.omit_empty_values => continue,
                        None => Json::Null,
                        Some(v) => typed(op, op.truncate(&v)),
                    },
                    None => Json::String(f.render_or(values, missing)),
                };
                map.insert(key.clone(), value);
            }
            let mut line = Json::Object(map).to_string();
            line.push('\n');
            line
        }
    }
}

fn typed(op: &Operator, v: &str) -> Json {
    if op.is_numeric()
        && let Ok(n) = v.parse::<u64>()
    {
        return Json::from(n);
    }
    Json::String(v.to_owned())
}

/// Writes one line per logger of `logs` whose filter passes.
pub fn write(logs: &[AccessLog], values: &LogValues<'_>) {
    for log in logs {
        if !passes(log, values) {
            continue;
        }
        if let Some(w) = log.writer.resolve(&log.sink) {
            w.write(render(log, values));
        }
    }
}

/// Logs a connection that ends without an HTTP stream: a tcp_proxy connection, or one a
/// listener refused (`flags` e.g. `NR` when no filter chain matched).
#[allow(clippy::too_many_arguments)]
pub fn log_connection(
    logs: &[AccessLog],
    ctx: &ConnContext,
    started_at: SystemTime,
    duration: Duration,
    flags: ResponseFlags,
    received: u64,
    sent: u64,
    upstream: Option<&UpstreamInfo>,
) {
    if logs.is_empty() {
        return;
    }
    write(
        logs,
        &LogValues {
            conn: ConnValues {
                conn: ctx,
                stream_state: None,
                request: None,
            },
            started_at,
            duration,
            flags,
            bytes_received: received,
            bytes_sent: sent,
            upstream,
            http: None,
        },
    );
}

// ------------------------------------------------------------------------------------ writers

/// Where a writer writes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Target {
    File(String),
    Stdout,
    Stderr,
}

/// One destination's writer thread; lines go to it through a bounded channel.
#[derive(Debug)]
pub struct Writer {
    target: Target,
    tx: mpsc::SyncSender<String>,
    dropped: AtomicU64,
    warned: AtomicBool,
}

impl Writer {
    /// Queues `line`; drops it when the writer is this far behind (never blocks).
    pub fn write(&self, line: String) {
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(_)) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if !self.warned.swap(true, Ordering::Relaxed) || n.is_multiple_of(10_000) {
                    tracing::warn!(target: "access_log", target_path = ?self.target, dropped = n, "access log writer is behind; lines dropped");
                }
            }
            Err(mpsc::TrySendError::Disconnected(_)) => {}
        }
    }

    /// Lines dropped because the writer was behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The writers by destination; entries die with the last logger using them.
fn registry() -> &'static Mutex<HashMap<Target, Weak<Writer>>> {
    static R: OnceLock<Mutex<HashMap<Target, Weak<Writer>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Paths already reported as unopenable (held while the registry lock is).
fn failed_paths() -> std::sync::MutexGuard<'static, std::collections::HashSet<String>> {
    static F: OnceLock<Mutex<std::collections::HashSet<String>>> = OnceLock::new();
    match F.get_or_init(Default::default).lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// A logger's writer, resolved on first use (never at config compile time, so `--mode validate`
/// and NACKed configs open no files).
#[derive(Debug, Clone, Default)]
pub struct WriterSlot(Arc<OnceLock<Option<Arc<Writer>>>>);

impl WriterSlot {
    /// The writer for `sink`, opened on first use (`None`: it cannot be opened; reported once).
    pub fn resolve(&self, sink: &LogSink) -> Option<&Arc<Writer>> {
        self.0.get_or_init(|| writer_for(sink)).as_ref()
    }
}

fn writer_for(sink: &LogSink) -> Option<Arc<Writer>> {
    let target = match sink {
        LogSink::File(p) => Target::File(p.clone()),
        LogSink::Stdout => Target::Stdout,
        LogSink::Stderr => Target::Stderr,
    };
    let mut reg = match registry().lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    if let Some(w) = reg.get(&target).and_then(Weak::upgrade) {
        return Some(w);
    }
    let out: Box<dyn std::io::Write + Send> = match &target {
        Target::File(path) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(f) => Box::new(std::io::BufWriter::with_capacity(BUFFER_BYTES, f)),
            Err(e) => {
                // Once per path: every config push re-resolves its loggers.
                if failed_paths().insert(path.clone()) {
                    tracing::warn!(target: "access_log", path = %path, "cannot open access log file: {e}; its loggers write nothing");
                } else {
                    tracing::debug!(target: "access_log", path = %path, "cannot open access log file: {e}");
                }
                return None;
            }
        },
        Target::Stdout => Box::new(std::io::stdout()),
        Target::Stderr => Box::new(std::io::stderr()),
    };
    let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
    let name = target.clone();
    if let Err(e) = std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || run_writer(name, out, rx))
    {
        tracing::warn!(target: "access_log", "cannot start the access log writer for {target:?}: {e}");
        return None;
    }
    let w = Arc::new(Writer {
        target: target.clone(),
        tx,
        dropped: AtomicU64::new(0),
        warned: AtomicBool::new(false),
    });
    reg.retain(|_, w| w.strong_count() > 0);
    reg.insert(target, Arc::downgrade(&w));
    Some(w)
}

/// The writer thread: writes lines whole and in order, flushes whenever the queue is empty, and
/// ends (after flushing) when the last logger using it is gone.
fn run_writer(target: Target, mut out: Box<dyn std::io::Write + Send>, rx: mpsc::Receiver<String>) {
    let mut failed = false;
    let report = |e: std::io::Error, failed: &mut bool| {
        if !std::mem::replace(failed, true) {
            tracing::warn!(target: "access_log", "writing access log {target:?}: {e}");
        }
    };
    while let Ok(line) = rx.recv() {
        if let Err(e) = out.write_all(line.as_bytes()) {
            report(e, &mut failed);
        }
        while let Ok(line) = rx.try_recv() {
            if let Err(e) = out.write_all(line.as_bytes()) {
                report(e, &mut failed);
            }
        }
        if let Err(e) = out.flush() {
            report(e, &mut failed);
        }
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, sync::Arc};

    use serde_json::json;
    use waypoint_proto::{envoy::config::accesslog::v3::AccessLog as RawAccessLog, json as pjson};

    use super::*;
    use crate::{
        config::{
            Snapshot,
            access_log::{AccessLog, CompareOp, Comparison, LogFilter, LogFormat},
            cluster::Cluster,
            endpoint::EndpointAddress,
            format::{Format, FormatContext},
        },
        listener::conn::{Addr, FilterState, StateObject, TlsInfo},
    };

    /// 2026-11-27T09:00:00.123456789Z.
    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::new(1_795_770_000, 123_456_789)
    }

    fn conn() -> ConnContext {
        let mut c = ConnContext::new(
            "l",
            Addr::Socket("10.0.0.2:8080".parse().expect("addr")),
            Addr::Socket("10.0.0.1:5000".parse().expect("addr")),
            Arc::new(Snapshot::default()),
        );
        c.id = 42;
        c.chain = "chain-a".into();
        c.tls = Some(TlsInfo {
            peer_uri_san: Some("spiffe://cluster.local/ns/default/sa/sleep".into()),
            server_name: Some("svc.example".into()),
            ..TlsInfo::default()
        });
        c.filter_state.set(
            "conn.key",
            StateObject {
                value: "from-conn".into(),
                sharing: crate::config::filters::set_filter_state::Sharing::None,
                read_only: false,
                peer: None,
            },
        );
        c
    }

    fn request() -> http::request::Parts {
        let (mut p, ()) = http::Request::builder()
            .method("POST")
            .uri("/api/v1?x=1")
            .version(http::Version::HTTP_11)
            .header("host", "svc.local")
            .header("user-agent", "curl/8")
            .header("x-request-id", "req-1")
            .header("x-forwarded-for", "10.0.0.1")
            .header("x-long", "abcdefghij")
            .body(())
            .expect("request")
            .into_parts();
        p.headers.append("x-multi", "one".parse().expect("v"));
        p
    }

    fn cluster() -> Arc<Cluster> {
        let raw = pjson::from_json(&json!({
            "name": "outbound|80||svc.local",
            "alt_stat_name": "svc_stats",
            "metadata": {"filter_metadata": {"istio": {"default_original_port": 80}}}
        }))
        .expect("cluster json");
        Arc::new(Cluster::compile(raw, "").expect("cluster"))
    }

    fn upstream() -> UpstreamInfo {
        UpstreamInfo {
            cluster: Some(cluster()),
            host: None,
            address: Some(EndpointAddress::Socket(
                "127.0.0.1:9000".parse::<SocketAddr>().expect("addr"),
            )),
            attempts: 2,
        }
    }

    struct Fixture {
        ctx: ConnContext,
        req: http::request::Parts,
        state: FilterState,
        resp: HeaderMap,
        trailers: HeaderMap,
        up: UpstreamInfo,
    }

    fn fixture() -> Fixture {
        let mut state = FilterState::default();
        state.set(
            "stream.key",
            StateObject {
                value: "from-stream".into(),
                sharing: crate::config::filters::set_filter_state::Sharing::None,
                read_only: false,
                peer: None,
            },
        );
        let mut resp = HeaderMap::new();
        resp.insert("x-envoy-upstream-service-time", "7".parse().expect("v"));
        resp.insert("content-type", "text/plain".parse().expect("v"));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().expect("v"));
        Fixture {
            ctx: conn(),
            req: request(),
            state,
            resp,
            trailers,
            up: upstream(),
        }
    }

    impl Fixture {
        fn http(&self) -> LogValues<'_> {
            LogValues {
                conn: ConnValues {
                    conn: &self.ctx,
                    stream_state: Some(&self.state),
                    request: Some(&self.req),
                },
                started_at: t0(),
                duration: Duration::from_millis(25),
                flags: ResponseFlags::default(),
                bytes_received: 11,
                bytes_sent: 1024,
                upstream: Some(&self.up),
                http: Some(HttpValues {
                    response_code: 200,
                    response_headers: Some(&self.resp),
                    trailers: Some(&self.trailers),
                    request_duration: Some(Duration::from_millis(3)),
                    response_duration: Some(Duration::from_millis(20)),
                    code_details: Some("via_upstream"),
                    transport_failure: None,
                    route_name: Some("default-route"),
                    local_reply_body: None,
                }),
            }
        }

        fn tcp(&self, flags: ResponseFlags) -> LogValues<'_> {
            LogValues {
                conn: ConnValues {
                    conn: &self.ctx,
                    stream_state: None,
                    request: None,
                },
                started_at: t0(),
                duration: Duration::from_millis(1500),
                flags,
                bytes_received: 5,
                bytes_sent: 9,
                upstream: Some(&self.up),
                http: None,
            }
        }
    }

    fn log(format: LogFormat, omit: bool) -> AccessLog {
        AccessLog {
            name: "test".into(),
            sink: LogSink::Stderr,
            format,
            omit_empty_values: omit,
            filter: None,
            writer: WriterSlot::default(),
        }
    }

    fn text(f: &str) -> AccessLog {
        log(
            LogFormat::Text(Format::parse(f, FormatContext::AccessLog, "t").expect("format")),
            false,
        )
    }

    fn one(v: &LogValues<'_>, f: &str) -> String {
        render(&text(f), v)
    }

    #[test]
    fn envoy_default_format_renders_a_proxied_request() {
        let fx = fixture();
        let line = render(&text(crate::config::access_log::DEFAULT_FORMAT), &fx.http());
        assert_eq!(
            line,
            "[2026-11-27T09:00:00.123Z] \"POST /api/v1?x=1 HTTP/1.1\" 200 - 11 1024 25 7 \"10.0.0.1\" \"curl/8\" \"req-1\" \"svc.local\" \"127.0.0.1:9000\"\n"
        );
    }

    #[test]
    fn istio_default_format_renders_missing_values_as_dashes() {
        let istio = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";
        let fx = fixture();
        assert_eq!(
            render(&text(istio), &fx.http()),
            "[2026-11-27T09:00:00.123Z] \"POST /api/v1?x=1 HTTP/1.1\" 200 - via_upstream - \"-\" 11 1024 25 7 \"10.0.0.1\" \"curl/8\" \"req-1\" \"svc.local\" \"127.0.0.1:9000\" svc_stats - 10.0.0.2:8080 10.0.0.1:5000 svc.example default-route\n"
        );
        // A local reply: no upstream answer, a flag, the details and transport failure.
        let mut v = fx.http();
        v.flags = ResponseFlags::of(ResponseFlag::UpstreamConnectionFailure);
        v.upstream = None;
        if let Some(h) = v.http.as_mut() {
            h.response_code = 503;
            h.response_headers = None;
            h.code_details = Some("upstream_reset_before_response_started{connection_failure}");
            h.transport_failure = Some("connection_refused");
            h.route_name = None;
        }
        assert_eq!(
            render(&text(istio), &v),
            "[2026-11-27T09:00:00.123Z] \"POST /api/v1?x=1 HTTP/1.1\" 503 UF upstream_reset_before_response_started{connection_failure} - \"connection_refused\" 11 1024 25 - \"10.0.0.1\" \"curl/8\" \"req-1\" \"svc.local\" \"-\" - - 10.0.0.2:8080 10.0.0.1:5000 svc.example -\n"
        );
    }

    #[test]
    fn request_response_and_trailer_headers() {
        let fx = fixture();
        let v = fx.http();
        assert_eq!(one(&v, "%REQ(USER-AGENT)%"), "curl/8");
        assert_eq!(one(&v, "%REQ(user-agent)%"), "curl/8");
        assert_eq!(one(&v, "%REQ(X-ABSENT?USER-AGENT)%"), "curl/8");
        assert_eq!(one(&v, "%REQ(X-REQUEST-ID?USER-AGENT)%"), "req-1");
        assert_eq!(one(&v, "%REQ(X-ABSENT?X-NONE)%"), "-");
        assert_eq!(one(&v, "%REQ(:METHOD)% %REQ(:PATH)%"), "POST /api/v1?x=1");
        assert_eq!(one(&v, "%REQ(X-LONG):4%"), "abcd");
        assert_eq!(one(&v, "%REQ(X-LONG):40%"), "abcdefghij");
        assert_eq!(one(&v, "%RESP(CONTENT-TYPE)%"), "text/plain");
        assert_eq!(one(&v, "%RESP(:STATUS)%"), "200");
        assert_eq!(one(&v, "%RESP(X-ABSENT)%"), "-");
        assert_eq!(one(&v, "%RESP(CONTENT-TYPE):4%"), "text");
        assert_eq!(one(&v, "%TRAILER(GRPC-STATUS)%"), "0");
        assert_eq!(one(&v, "%TRAILER(X-ABSENT)%"), "-");
        assert_eq!(one(&v, "%STREAM_ID%"), "req-1");
        // TCP: no request, no response.
        let t = fx.tcp(ResponseFlags::default());
        assert_eq!(
            one(&t, "%REQ(USER-AGENT)% %RESP(X)% %TRAILER(X)% %PROTOCOL%"),
            "- - - -"
        );
    }

    #[test]
    fn stream_and_upstream_values() {
        let fx = fixture();
        let v = fx.http();
        let cases = [
            ("%RESPONSE_CODE%", "200"),
            ("%RESPONSE_CODE_DETAILS%", "via_upstream"),
            ("%RESPONSE_FLAGS%", "-"),
            ("%RESPONSE_FLAGS_LONG%", "-"),
            ("%BYTES_RECEIVED%", "11"),
            ("%BYTES_SENT%", "1024"),
            ("%DURATION%", "25"),
            ("%REQUEST_DURATION%", "3"),
            ("%RESPONSE_DURATION%", "20"),
            ("%RESPONSE_TX_DURATION%", "5"),
            ("%UPSTREAM_HOST%", "127.0.0.1:9000"),
            ("%UPSTREAM_REMOTE_ADDRESS%", "127.0.0.1:9000"),
            ("%UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "127.0.0.1"),
            ("%UPSTREAM_REMOTE_PORT%", "9000"),
            ("%UPSTREAM_CLUSTER%", "svc_stats"),
            ("%UPSTREAM_CLUSTER_RAW%", "outbound|80||svc.local"),
            ("%UPSTREAM_LOCAL_ADDRESS%", "-"),
            ("%UPSTREAM_TRANSPORT_FAILURE_REASON%", "-"),
            ("%UPSTREAM_REQUEST_ATTEMPT_COUNT%", "2"),
            ("%CLUSTER_METADATA(istio:default_original_port)%", "80"),
            ("%UPSTREAM_METADATA(istio:x)%", "-"),
            ("%PROTOCOL%", "HTTP/1.1"),
            ("%ROUTE_NAME%", "default-route"),
            ("%LOCAL_REPLY_BODY%", "-"),
            ("%CONNECTION_ID%", "42"),
            ("%FILTER_CHAIN_NAME%", "chain-a"),
            ("%DOWNSTREAM_REMOTE_ADDRESS%", "10.0.0.1:5000"),
            ("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "10.0.0.1"),
            ("%DOWNSTREAM_REMOTE_PORT%", "5000"),
            ("%DOWNSTREAM_LOCAL_ADDRESS%", "10.0.0.2:8080"),
            ("%DOWNSTREAM_LOCAL_PORT%", "8080"),
            ("%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%", "10.0.0.1:5000"),
            (
                "%DOWNSTREAM_PEER_URI_SAN%",
                "spiffe://cluster.local/ns/default/sa/sleep",
            ),
            ("%DOWNSTREAM_LOCAL_URI_SAN%", "-"),
            ("%DOWNSTREAM_TLS_VERSION%", "-"),
            ("%REQUESTED_SERVER_NAME%", "svc.example"),
            ("%FILTER_STATE(stream.key:PLAIN)%", "from-stream"),
            ("%FILTER_STATE(conn.key:PLAIN)%", "from-conn"),
            ("%FILTER_STATE(conn.key)%", "from-conn"),
            ("%FILTER_STATE(absent:PLAIN)%", "-"),
            ("%REQUEST_HEADERS_BYTES%", "-"),
            ("%CONNECTION_TERMINATION_DETAILS%", "-"),
        ];
        for (f, want) in cases {
            assert_eq!(one(&v, f), want, "{f}");
        }
        assert!(!one(&v, "%HOSTNAME%").is_empty());
        // Flags in Envoy's order, short and long.
        let mut v = fx.http();
        v.flags = ResponseFlags::of(ResponseFlag::UpstreamConnectionFailure);
        v.flags.insert(ResponseFlag::DelayInjected);
        assert_eq!(one(&v, "%RESPONSE_FLAGS%"), "UF,DI");
        assert_eq!(
            one(&v, "%RESPONSE_FLAGS_LONG%"),
            "UpstreamConnectionFailure,DelayInjected"
        );
    }

    #[test]
    fn internal_upstreams_render_as_envoy_addresses() {
        let fx = fixture();
        let up = UpstreamInfo {
            address: Some(EndpointAddress::Internal {
                listener: "connect_originate".into(),
                endpoint_id: Some("10.0.0.5:8080".into()),
            }),
            ..upstream()
        };
        let mut v = fx.http();
        v.upstream = Some(&up);
        assert_eq!(
            one(&v, "%UPSTREAM_HOST% %UPSTREAM_REMOTE_PORT%"),
            "envoy://connect_originate/10.0.0.5:8080 -"
        );
    }

    #[test]
    fn tcp_values() {
        let fx = fixture();
        let t = fx.tcp(ResponseFlags::of(ResponseFlag::UpstreamConnectionFailure));
        assert_eq!(
            one(
                &t,
                "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %UPSTREAM_HOST% %UPSTREAM_CLUSTER% %UPSTREAM_REQUEST_ATTEMPT_COUNT% %DOWNSTREAM_REMOTE_ADDRESS% %ROUTE_NAME%"
            ),
            "0 UF 5 9 1500 127.0.0.1:9000 svc_stats 2 10.0.0.1:5000 -"
        );
    }

    fn json_log(fields: &[(&str, &str)], omit: bool) -> AccessLog {
        let map = fields
            .iter()
            .map(|(k, f)| {
                (
                    (*k).to_owned(),
                    Format::parse(f, FormatContext::AccessLog, "j").expect("format"),
                )
            })
            .collect();
        log(LogFormat::Json(map), omit)
    }

    #[test]
    fn json_lines_are_typed_and_missing_values_are_null_or_omitted() {
        let fx = fixture();
        let fields = [
            ("code", "%RESPONSE_CODE%"),
            ("sent", "%BYTES_SENT%"),
            ("received", "%BYTES_RECEIVED%"),
            ("duration", "%DURATION%"),
            ("port", "%DOWNSTREAM_REMOTE_PORT%"),
            ("method", "%REQ(:METHOD)%"),
            ("ua", "%REQ(USER-AGENT):4%"),
            ("absent", "%REQ(X-ABSENT)%"),
            ("mixed", "%REQ(:METHOD)% %REQ(X-ABSENT)%"),
            ("start", "%START_TIME%"),
            ("flags", "%RESPONSE_FLAGS%"),
            ("literal", "text"),
        ];
        let line = render(&json_log(&fields, false), &fx.http());
        assert!(line.ends_with("}\n"), "{line}");
        let v: Json = serde_json::from_str(&line).expect("one JSON object");
        assert_eq!(
            v,
            json!({
                "code": 200, "sent": 1024, "received": 11, "duration": 25, "port": 5000,
                "method": "POST", "ua": "curl", "absent": null, "mixed": "POST -",
                "start": "2026-11-27T09:00:00.123Z", "flags": "-", "literal": "text"
            })
        );
        let line = render(&json_log(&fields, true), &fx.http());
        let v: Json = serde_json::from_str(&line).expect("one JSON object");
        assert!(v.get("absent").is_none(), "{v}");
        assert_eq!(v["mixed"], "POST ");
        // omit_empty_values on a text format: missing values render empty.
        let mut l = text("[%REQ(X-ABSENT)%] %REQ(:METHOD)%");
        assert_eq!(render(&l, &fx.http()), "[-] POST");
        l.omit_empty_values = true;
        assert_eq!(render(&l, &fx.http()), "[] POST");
        // TCP: response code 0, as Envoy writes it; no request headers.
        let line = render(&json_log(&fields, false), &fx.tcp(ResponseFlags::default()));
        let v: Json = serde_json::from_str(&line).expect("one JSON object");
        assert_eq!(v["code"], 0);
        assert_eq!(v["method"], Json::Null);
        assert_eq!(v["sent"], 9);
    }

    #[test]
    fn start_time_formats() {
        let t = t0();
        assert_eq!(format_time(t, None), "2026-11-27T09:00:00.123Z");
        let cases = [
            ("%Y-%m-%dT%H:%M:%S%z", "2026-11-27T09:00:00+0000"),
            ("%s", "1795770000"),
            ("%s.%3f", "1795770000.123"),
            ("%f", "123456789"),
            ("%6f", "123456"),
            ("%1f", "1"),
            ("%Y-%m-%dT%H:%M:%E3SZ", "2026-11-27T09:00:00.123Z"),
            ("%E*S", "00.123456789"),
            ("%Ez", "+00:00"),
            ("%Ez%S|%E3S|", "+00:0000|00.123|"),
            ("%F %T %Z", "2026-11-27 09:00:00 UTC"),
            ("%a %b %e %j %y %%", "Fri Nov 27 331 26 %"),
            ("%A %B %I%p %u %w", "Friday November 09AM 5 5"),
        ];
        for (f, want) in cases {
            assert!(check_time_format(f).is_ok(), "{f}");
            assert_eq!(format_time(t, Some(f)), want, "{f}");
        }
        // Calendar edges.
        let at = |secs: u64| UNIX_EPOCH + Duration::from_secs(secs);
        assert_eq!(
            format_time(at(0), Some("%F %T %a")),
            "1970-01-01 00:00:00 Thu"
        );
        assert_eq!(
            format_time(at(951_782_400), Some("%F %j")),
            "2000-02-29 060"
        );
        assert_eq!(
            format_time(at(4_107_542_400), Some("%F %j")),
            "2100-03-01 060"
        );
        assert_eq!(
            format_time(at(1_735_689_599), Some("%F %T %j")),
            "2024-12-31 23:59:59 366"
        );
        // Through an operator argument.
        let fx = fixture();
        assert_eq!(one(&fx.http(), "%START_TIME(%s.%3f)%"), "1795770000.123");
        for bad in ["%Q", "%4", "%E3", "%Ex", "trailing %"] {
            assert!(check_time_format(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn filters_see_the_stream() {
        let fx = fixture();
        let with = |filter| AccessLog {
            filter: Some(filter),
            ..text("x")
        };
        let uh = with(LogFilter::ResponseFlags(vec!["UH".into()]));
        let mut v = fx.http();
        assert!(!passes(&uh, &v));
        v.flags = ResponseFlags::of(ResponseFlag::NoHealthyUpstream);
        assert!(passes(&uh, &v));
        assert!(passes(&text("x"), &v));
        let code = with(LogFilter::StatusCode(Comparison {
            op: CompareOp::Eq,
            value: 200,
        }));
        assert!(passes(&code, &fx.http()));
        // TCP streams have response code 0.
        assert!(!passes(&code, &fx.tcp(ResponseFlags::default())));
        let slow = with(LogFilter::Duration(Comparison {
            op: CompareOp::Ge,
            value: 1000,
        }));
        assert!(!passes(&slow, &fx.http()));
        assert!(passes(&slow, &fx.tcp(ResponseFlags::default())));
    }

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("access-log-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        dir.join(name)
    }

    /// Polls `path` until it has `n` lines (bounded).
    fn wait_lines(path: &std::path::Path, n: usize) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<String> = text.lines().map(str::to_owned).collect();
            if lines.len() >= n || std::time::Instant::now() > deadline {
                return lines;
            }
            std::thread::yield_now();
        }
    }

    #[test]
    fn file_writers_are_shared_per_path_and_write_whole_lines_in_order() {
        let path = temp("shared.log");
        let _ = std::fs::remove_file(&path);
        let raw: RawAccessLog = pjson::from_json(&json!({
            "name": "f",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": path.to_string_lossy(),
                "log_format": {"text_format": "%REQ(X-N)% %RESPONSE_CODE%\n"}
            }
        }))
        .expect("json");
        let a = AccessLog::compile(&raw, "a").expect("compiles");
        let b = AccessLog::compile(&raw, "b").expect("compiles");
        let wa = a.writer.resolve(&a.sink).expect("opened").clone();
        let wb = b.writer.resolve(&b.sink).expect("opened").clone();
        assert!(Arc::ptr_eq(&wa, &wb), "one writer per path");
        let fx = fixture();
        for i in 0..200u32 {
            let mut req = request();
            req.headers
                .insert("x-n", i.to_string().parse().expect("value"));
            let mut v = fx.http();
            v.conn.request = Some(&req);
            let l = if i.is_multiple_of(2) { &a } else { &b };
            write(std::slice::from_ref(l), &v);
        }
        let lines = wait_lines(&path, 200);
        let want: Vec<String> = (0..200).map(|i| format!("{i} 200")).collect();
        assert_eq!(lines, want);
        assert_eq!(wa.dropped(), 0);
    }

    #[test]
    fn an_unopenable_path_is_skipped() {
        let raw: RawAccessLog = pjson::from_json(&json!({
            "name": "f",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": "/nonexistent-dir-for-access-logs/x.log"
            }
        }))
        .expect("json");
        let l = AccessLog::compile(&raw, "a").expect("compiles");
        assert!(l.writer.resolve(&l.sink).is_none());
        // Writing through it is a no-op, not a panic.
        let fx = fixture();
        write(&[l], &fx.http());
    }

    #[test]
    fn filtered_lines_are_not_written() {
        let path = temp("filtered.log");
        let _ = std::fs::remove_file(&path);
        let raw: RawAccessLog = pjson::from_json(&json!({
            "name": "f",
            "filter": {"response_flag_filter": {"flags": ["UH"]}},
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": path.to_string_lossy(),
                "log_format": {"text_format": "%RESPONSE_FLAGS%\n"}
            }
        }))
        .expect("json");
        let l = AccessLog::compile(&raw, "a").expect("compiles");
        let fx = fixture();
        write(std::slice::from_ref(&l), &fx.http());
        let mut v = fx.http();
        v.flags = ResponseFlags::of(ResponseFlag::NoHealthyUpstream);
        write(std::slice::from_ref(&l), &v);
        assert_eq!(wait_lines(&path, 1), vec!["UH".to_owned()]);
    }
}
