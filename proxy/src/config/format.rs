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
    Ok(Operator {
        name: name.to_owned(),
        args,
        max_len,
    })
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
}
