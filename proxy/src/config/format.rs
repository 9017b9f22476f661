//! Envoy substitution format strings (`%REQ(:AUTHORITY)%`, `%DOWNSTREAM_REMOTE_ADDRESS%`,
//! `%FILTER_STATE(key:PLAIN)%` …) parsed once into literal text and command operators. An operator
//! we do not know is rejected, as Envoy rejects it.

use super::{CompileResult, ConfigError};

/// Where a format string is used (for error messages and operator availability).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatContext {
    /// A header value to add.
    Header,
    /// A `set_filter_state` value.
    FilterState,
    /// `tcp_proxy.tunneling_config.hostname`.
    TunnelHostname,
    /// An access log line.
    AccessLog,
}

/// Operators that take an argument in parentheses.
const WITH_ARGS: &[&str] = &[
    "REQ",
    "RESP",
    "TRAILER",
    "DYNAMIC_METADATA",
    "CLUSTER_METADATA",
    "UPSTREAM_METADATA",
    "FILTER_STATE",
    "UPSTREAM_FILTER_STATE",
    "ENVIRONMENT",
];

/// Operators without an argument (`START_TIME` takes an optional one).
const PLAIN: &[&str] = &[
    "START_TIME",
    "PROTOCOL",
    "UPSTREAM_PROTOCOL",
    "RESPONSE_CODE",
    "RESPONSE_CODE_DETAILS",
    "CONNECTION_TERMINATION_DETAILS",
    "RESPONSE_FLAGS",
    "RESPONSE_FLAGS_LONG",
    "BYTES_RECEIVED",
    "BYTES_SENT",
    "REQUEST_HEADERS_BYTES",
    "RESPONSE_HEADERS_BYTES",
    "DURATION",
    "REQUEST_DURATION",
    "RESPONSE_DURATION",
    "RESPONSE_TX_DURATION",
    "UPSTREAM_HOST",
    "UPSTREAM_CLUSTER",
    "UPSTREAM_CLUSTER_RAW",
    "UPSTREAM_LOCAL_ADDRESS",
    "UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT",
    "UPSTREAM_LOCAL_PORT",
    "UPSTREAM_REMOTE_ADDRESS",
    "UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT",
    "UPSTREAM_REMOTE_PORT",
    "UPSTREAM_TRANSPORT_FAILURE_REASON",
    "UPSTREAM_REQUEST_ATTEMPT_COUNT",
    "UPSTREAM_PEER_URI_SAN",
    "UPSTREAM_LOCAL_URI_SAN",
    "UPSTREAM_PEER_SUBJECT",
    "UPSTREAM_TLS_VERSION",
    "DOWNSTREAM_REMOTE_ADDRESS",
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_REMOTE_PORT",
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS",
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_DIRECT_REMOTE_PORT",
    "DOWNSTREAM_LOCAL_ADDRESS",
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_LOCAL_PORT",
    "DOWNSTREAM_LOCAL_URI_SAN",
    "DOWNSTREAM_PEER_URI_SAN",
    "DOWNSTREAM_LOCAL_DNS_SAN",
    "DOWNSTREAM_PEER_DNS_SAN",
    "DOWNSTREAM_LOCAL_SUBJECT",
    "DOWNSTREAM_PEER_SUBJECT",
    "DOWNSTREAM_PEER_ISSUER",
    "DOWNSTREAM_TLS_VERSION",
    "DOWNSTREAM_TLS_CIPHER",
    "DOWNSTREAM_TLS_SESSION_ID",
    "DOWNSTREAM_PEER_FINGERPRINT_256",
    "DOWNSTREAM_PEER_SERIAL",
    "REQUESTED_SERVER_NAME",
    "ROUTE_NAME",
    "FILTER_CHAIN_NAME",
    "HOSTNAME",
    "CONNECTION_ID",
    "STREAM_ID",
    "LOCAL_REPLY_BODY",
];

/// One `%OPERATOR(args):len%`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    /// `REQ`, `DOWNSTREAM_REMOTE_ADDRESS` …
    pub name: String,
    /// What is inside the parentheses.
    pub args: Option<String>,
    /// `:N` truncation.
    pub max_len: Option<usize>,
}

/// A piece of a format string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Literal text.
    Text(String),
    /// A command operator.
    Operator(Operator),
}

/// A parsed format string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Format {
    /// Text and operators in order.
    pub segments: Vec<Segment>,
}

impl Format {
    /// Parses `text`; `path` names the field for errors.
    pub fn parse(text: &str, context: FormatContext, path: &str) -> CompileResult<Self> {
        let mut segments = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(start) = rest.find('%') {
            literal.push_str(&rest[..start]);
            let after = &rest[start + 1..];
            let Some(end) = find_operator_end(after) else {
                return Err(ConfigError::new(
                    path,
                    format!("unterminated command operator in {context:?} format '{text}'"),
                ));
            };
            let body = &after[..end];
            if !literal.is_empty() {
                segments.push(Segment::Text(std::mem::take(&mut literal)));
            }
            segments.push(Segment::Operator(parse_operator(body, text, path)?));
            rest = &after[end + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            segments.push(Segment::Text(literal));
        }
        Ok(Format { segments })
    }

    /// Plain text without operators.
    pub fn is_literal(&self) -> bool {
        self.segments.iter().all(|s| matches!(s, Segment::Text(_)))
    }

    /// The operator, when the format is exactly one operator and no text (JSON values are typed
    /// then).
    pub fn single_operator(&self) -> Option<&Operator> {
        match self.segments.as_slice() {
            [Segment::Operator(op)] => Some(op),
            _ => None,
        }
    }

    /// The literal text, when the format has no operators.
    pub fn as_literal(&self) -> Option<String> {
        self.is_literal().then(|| {
            self.segments
                .iter()
                .filter_map(|s| match s {
                    Segment::Text(t) => Some(t.as_str()),
                    Segment::Operator(_) => None,
                })
                .collect()
        })
    }
}

/// The end of an operator body: the next `%` that is not inside parentheses.
fn find_operator_end(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            '%' if depth == 0 => return Some(i),
            _ => {}
        }
    }
    None
}

fn parse_operator(body: &str, text: &str, path: &str) -> CompileResult<Operator> {
    let bad = |why: &str| ConfigError::new(path, format!("{why} in format '{text}'"));
    let (head, max_len) = match body.rfind(')') {
        Some(close) => {
            let tail = &body[close + 1..];
            let len = match tail.strip_prefix(':') {
                Some(n) => Some(
                    n.parse::<usize>()
                        .map_err(|_| bad(&format!("invalid length ':{n}'")))?,
                ),
                None if tail.is_empty() => None,
                None => return Err(bad(&format!("unexpected '{tail}' after %{body}%"))),
            };
            (&body[..=close], len)
        }
        None => match body.split_once(':') {
            Some((h, n)) => (
                h,
                Some(
                    n.parse::<usize>()
                        .map_err(|_| bad(&format!("invalid length ':{n}'")))?,
                ),
            ),
            None => (body, None),
        },
    };
    let (name, args) = match head.split_once('(') {
        Some((name, rest)) => {
            let Some(args) = rest.strip_suffix(')') else {
                return Err(bad(&format!("unbalanced parentheses in %{body}%")));
            };
            (name, Some(args.to_owned()))
        }
        None => (head, None),
    };
    let known_plain = PLAIN.contains(&name);
    let known_args = WITH_ARGS.contains(&name);
    if !known_plain && !known_args {
        return Err(bad(&format!("command operator %{name}% is not supported")));
    }
    if known_args && args.as_deref().is_none_or(str::is_empty) {
        return Err(bad(&format!("%{name}% needs an argument")));
    }
    if known_plain && name != "START_TIME" && args.is_some() {
        return Err(bad(&format!("%{name}% takes no argument")));
    }
    match (name, args.as_deref()) {
        ("START_TIME", Some(fmt)) => {
            crate::access_log::check_time_format(fmt)
                .map_err(|why| bad(&format!("%START_TIME({fmt})%: {why}")))?;
        }
        // `KEY`, `KEY:PLAIN`, `KEY:TYPED`; Envoy's `KEY:F:FIELD` reads a field of a typed object,
        // and our filter-state objects are plain strings.
        ("FILTER_STATE" | "UPSTREAM_FILTER_STATE", Some(a)) if a.contains(":F:") => {
            return Err(bad(&format!(
                "%{name}({a})%: field access (':F:') is not supported; filter state objects are strings"
            )));
        }
        ("FILTER_STATE" | "UPSTREAM_FILTER_STATE", Some(a))
            if a.rsplit_once(':')
                .is_some_and(|(_, f)| !matches!(f, "PLAIN" | "TYPED")) =>
        {
            return Err(bad(&format!(
                "%{name}({a})%: the serialization must be PLAIN or TYPED"
            )));
        }
        _ => {}
    }
    Ok(Operator {
        name: name.to_owned(),
        args,
        max_len,
    })
}

/// Operators whose value Envoy writes as a JSON number when a `json_format` value is the operator
/// alone (`"code": "%RESPONSE_CODE%"` → `"code": 200`).
const NUMERIC: &[&str] = &[
    "RESPONSE_CODE",
    "BYTES_RECEIVED",
    "BYTES_SENT",
    "REQUEST_HEADERS_BYTES",
    "RESPONSE_HEADERS_BYTES",
    "DURATION",
    "REQUEST_DURATION",
    "RESPONSE_DURATION",
    "RESPONSE_TX_DURATION",
    "UPSTREAM_REQUEST_ATTEMPT_COUNT",
    "CONNECTION_ID",
    "DOWNSTREAM_REMOTE_PORT",
    "DOWNSTREAM_DIRECT_REMOTE_PORT",
    "DOWNSTREAM_LOCAL_PORT",
    "UPSTREAM_LOCAL_PORT",
    "UPSTREAM_REMOTE_PORT",
];

impl Operator {
    /// Whether Envoy types this operator's value as a number in JSON logs.
    pub fn is_numeric(&self) -> bool {
        NUMERIC.contains(&self.name.as_str())
    }

    /// `value` cut to the operator's `:N` (see [`Format::render_or`]).
    pub fn truncate<'v>(&self, value: &'v str) -> &'v str {
        truncate(value, self.max_len)
    }
}

/// The values command operators render to, supplied by whoever renders a [`Format`] (a header
/// operation, an access log, a tunnel hostname): each knows its own stream and connection.
pub trait FormatValues {
    /// The value of `op`, or `None` when it is unknown or unavailable here.
    fn value(&self, op: &Operator) -> Option<String>;
}

/// A [`FormatValues`] that knows no value (every operator renders as missing).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoValues;

impl FormatValues for NoValues {
    fn value(&self, _op: &Operator) -> Option<String> {
        None
    }
}

/// A [`FormatValues`] backed by a closure (tests and one-off renderings).
pub struct FnValues<F>(pub F);

impl<F: Fn(&Operator) -> Option<String>> FormatValues for FnValues<F> {
    fn value(&self, op: &Operator) -> Option<String> {
        (self.0)(op)
    }
}

impl Format {
    /// Renders with `v`; a missing value renders as the empty string, as in header values.
    pub fn render(&self, v: &dyn FormatValues) -> String {
        self.render_or(v, "")
    }

    /// Renders with `v`, writing `missing` for an operator without a value (access logs use `-`).
    /// A value longer than the operator's `:N` is cut to at most N bytes, on a character boundary
    /// (Envoy cuts bytes; we never split a UTF-8 character).
    pub fn render_or(&self, v: &dyn FormatValues, missing: &str) -> String {
        let mut out = String::new();
        for segment in &self.segments {
            match segment {
                Segment::Text(t) => out.push_str(t),
                Segment::Operator(op) => match v.value(op) {
                    Some(value) => out.push_str(truncate(&value, op.max_len)),
                    None => out.push_str(missing),
                },
            }
        }
        out
    }
}

/// `s` cut to at most `max_len` bytes without splitting a character.
fn truncate(s: &str, max_len: Option<usize>) -> &str {
    let Some(max) = max_len else {
        return s;
    };
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_formats() {
        let f = Format::parse(
            "%FILTER_STATE(envoy.filters.listener.original_dst.local_ip:PLAIN)%",
            FormatContext::FilterState,
            "p",
        )
        .expect("parses");
        assert_eq!(
            f.segments,
            vec![Segment::Operator(Operator {
                name: "FILTER_STATE".into(),
                args: Some("envoy.filters.listener.original_dst.local_ip:PLAIN".into()),
                max_len: None,
            })]
        );
        let f = Format::parse(
            "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH):100%\"\n",
            FormatContext::AccessLog,
            "p",
        )
        .expect("parses");
        assert_eq!(f.segments.len(), 7);
        assert_eq!(
            Format::parse("plain", FormatContext::Header, "p")
                .expect("parses")
                .as_literal()
                .as_deref(),
            Some("plain")
        );
    }

    #[test]
    fn unknown_operator_is_rejected() {
        let err = Format::parse("%CEL(x)%", FormatContext::Header, "v").expect_err("unknown");
        assert!(err.to_string().contains("%CEL% is not supported"), "{err}");
        assert!(Format::parse("50%", FormatContext::Header, "v").is_err());
    }

    fn values() -> FnValues<impl Fn(&Operator) -> Option<String>> {
        FnValues(
            |op: &Operator| match (op.name.as_str(), op.args.as_deref()) {
                ("REQ", Some(":METHOD")) => Some("GET".to_owned()),
                ("REQ", Some("X-NAME")) => Some("h\u{e9}llo".to_owned()),
                ("DOWNSTREAM_REMOTE_ADDRESS", None) => Some("10.0.0.1:5000".to_owned()),
                _ => None,
            },
        )
    }

    fn parse(text: &str) -> Format {
        Format::parse(text, FormatContext::AccessLog, "p").expect("parses")
    }

    #[test]
    fn renders_text_and_operators() {
        let f = parse("%REQ(:METHOD)% from %DOWNSTREAM_REMOTE_ADDRESS%!");
        assert_eq!(f.render(&values()), "GET from 10.0.0.1:5000!");
        assert_eq!(parse("plain").render(&NoValues), "plain");
        assert_eq!(Format::default().render(&values()), "");
    }

    #[test]
    fn missing_values_are_empty_or_the_given_placeholder() {
        let f = parse("[%REQ(X-ABSENT)%] %ROUTE_NAME%");
        assert_eq!(f.render(&values()), "[] ");
        assert_eq!(f.render_or(&values(), "-"), "[-] -");
        // A present but empty value stays empty, as in Envoy.
        let empty = FnValues(|_: &Operator| Some(String::new()));
        assert_eq!(f.render_or(&empty, "-"), "[] ");
    }

    #[test]
    fn max_len_truncates_on_char_boundaries() {
        assert_eq!(parse("%REQ(:METHOD):2%").render(&values()), "GE");
        assert_eq!(parse("%REQ(:METHOD):10%").render(&values()), "GET");
        assert_eq!(parse("%REQ(:METHOD):0%").render(&values()), "");
        // "h\u{e9}llo": the 2-byte \u{e9} spans bytes 1..3; a cut at 2 backs off to 1.
        assert_eq!(parse("%REQ(X-NAME):2%").render(&values()), "h");
        assert_eq!(parse("%REQ(X-NAME):3%").render(&values()), "h\u{e9}");
        assert_eq!(
            parse("%DOWNSTREAM_REMOTE_ADDRESS:8%").render(&values()),
            "10.0.0.1"
        );
        // The placeholder of a missing value is not truncated.
        assert_eq!(parse("%REQ(X-ABSENT):1%").render_or(&values(), "--"), "--");
    }
}
