//! The attribute expressions of Istio's Telemetry API (`tagOverrides` → `stats.PluginConfig`
//! `metrics[].dimensions`, CEL), for the forms Istio's documentation uses: attribute paths such as
//! `request.host`, `request.headers['x-user']`, `destination.port`, `xds.cluster_name`,
//! `upstream_peer.app`, `upstream_peer.labels['key']`, `filter_state['key']`, string and integer
//! literals, and `string(...)`.
//! Anything else is refused when the config is compiled (a NACK naming the expression), rather
//! than evaluated wrongly. A value that is absent at run time renders as `unknown`, as Envoy's
//! evaluator does for an error.
//!
//! Custom metric values (`stats.PluginConfig.definitions[].value`) are [`ValueExpr`]s: integer
//! literals, the size attributes (`request.size`, `request.total_size`, `response.size`,
//! `response.total_size`) and code attributes, or any of the attribute forms above read as text and
//! counted when that text is an unsigned integer (istio_stats prints the CEL result and parses
//! it with `SimpleAtoi`, recording 0 when that fails).

use std::fmt;

/// Which peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// `downstream_peer` / `source`.
    Downstream,
    /// `upstream_peer` / `destination`.
    Upstream,
}

/// A peer attribute (`upstream_peer.<field>`): a field of the Struct istio/proxy's
/// `WorkloadMetadataObject::serializeAsProto` gives CEL (`type`, `workload`, `name`, `cluster`,
/// `namespace`, `service`, `revision`, `app`, `version`, `identity`; `labels` is
/// [`Expr::PeerLabel`]). A field the object leaves empty is absent from the Struct, so reading it
/// is an error, rendered `unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerField {
    /// `type`: the workload kind (`deployment`, `cronjob`, `job`, `pod`).
    Type,
    /// `name`: the instance (pod) name.
    Name,
    /// `workload` (`workload_name`).
    Workload,
    /// `namespace`.
    Namespace,
    /// `service` (canonical service).
    Service,
    /// `revision` (canonical revision).
    Revision,
    /// `app`.
    App,
    /// `version`.
    Version,
    /// `cluster`.
    Cluster,
    /// `identity`.
    Identity,
}

/// An address attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddrField {
    /// `.address` (`ip:port`).
    Address,
    /// `.port`.
    Port,
}

/// A compiled expression.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expr {
    /// `'text'`, `"text"` or an integer.
    Literal(String),
    /// `request.headers['name']` (lower-cased name).
    RequestHeader(String),
    /// `response.headers['name']`.
    ResponseHeader(String),
    /// `request.host` (`:authority`).
    RequestHost,
    /// `request.method`.
    RequestMethod,
    /// `request.path` (with the query).
    RequestPath,
    /// `request.url_path` (without the query).
    RequestUrlPath,
    /// `request.scheme`.
    RequestScheme,
    /// `request.protocol` (`HTTP/1.1`, `HTTP/2`).
    RequestProtocol,
    /// `request.id` (`x-request-id`).
    RequestId,
    /// `request.useragent`.
    RequestUserAgent,
    /// `request.referer`.
    RequestReferer,
    /// `response.code`.
    ResponseCode,
    /// `response.grpc_status`.
    ResponseGrpcStatus,
    /// `source.address` / `source.port`.
    Source(AddrField),
    /// `destination.address` / `destination.port`.
    Destination(AddrField),
    /// `connection.mtls`.
    ConnectionMtls,
    /// `connection.requested_server_name`.
    ConnectionSni,
    /// `xds.cluster_name`.
    XdsCluster,
    /// `xds.route_name`.
    XdsRoute,
    /// `upstream_peer.<field>` / `downstream_peer.<field>`.
    Peer(Side, PeerField),
    /// `upstream_peer.labels['key']` / `downstream_peer.labels['key']`; `value` is the `.value`
    /// suffix of Istio's older documented form (`labels['app'].value`, from the flatbuffer peer
    /// of the Wasm era), which on today's string-valued map is a CEL error.
    PeerLabel {
        /// Which peer.
        side: Side,
        /// The label.
        key: String,
        /// Followed by `.value`.
        value: bool,
    },
    /// `filter_state['key']`.
    FilterState(String),
}

/// Why an expression was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExprError(pub String);

impl fmt::Display for ExprError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an expression can read about a stream.
///
/// The request and response attributes read nothing by default: a connection, or a stream that
/// is still running, has none (Envoy's `response.code` is absent there, not 0).
pub trait Attributes {
    /// A request header (lower-case name).
    fn request_header(&self, _name: &str) -> Option<String> {
        None
    }
    /// A response header (lower-case name).
    fn response_header(&self, _name: &str) -> Option<String> {
        None
    }
    /// `:authority`, method, path with query, scheme, protocol.
    fn request(&self, _e: &Expr) -> Option<String> {
        None
    }
    /// The response code (0 when none was sent).
    fn response_code(&self) -> Option<u16> {
        None
    }
    /// The gRPC status.
    fn grpc_status(&self) -> Option<u32> {
        None
    }
    /// Source (true) or destination address.
    fn address(&self, source: bool) -> Option<std::net::SocketAddr>;
    /// Mutual TLS on the downstream connection.
    fn mtls(&self) -> bool;
    /// SNI.
    fn sni(&self) -> Option<String>;
    /// The upstream cluster.
    fn cluster(&self) -> Option<String>;
    /// The route's name.
    fn route(&self) -> Option<String>;
    /// A peer attribute.
    fn peer(&self, side: Side, field: PeerField) -> Option<String>;
    /// A label of the peer's `labels` map.
    fn peer_label(&self, side: Side, key: &str) -> Option<String>;
    /// A filter state object's string value.
    fn filter_state(&self, key: &str) -> Option<String>;
}

impl Expr {
    /// Compiles `text`.
    pub fn parse(text: &str) -> Result<Expr, ExprError> {
        let t = text.trim();
        if let Some(inner) = t.strip_prefix("string(").and_then(|r| r.strip_suffix(')')) {
            return Expr::parse(inner);
        }
        if let Some(s) = quoted(t) {
            return Ok(Expr::Literal(s));
        }
        if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(Expr::Literal(t.to_owned()));
        }
        // `labels['k'].value`: the one form whose index is followed by a field.
        let (t, value_field) = match t.strip_suffix("].value") {
            Some(head) if head.contains("_peer.labels[") => (&t[..head.len() + 1], true),
            _ => (t, false),
        };
        let (path, index) = match t.split_once('[') {
            Some((p, rest)) => {
                let inner = rest
                    .strip_suffix(']')
                    .ok_or_else(|| ExprError(format!("'{text}': an index must end with ']'")))?;
                let key = quoted(inner.trim()).ok_or_else(|| {
                    ExprError(format!("'{text}': an index must be a quoted string"))
                })?;
                (p.trim(), Some(key))
            }
            None => (t, None),
        };
        let unsupported = || {
            ExprError(format!(
                "'{text}': only attribute paths (request.*, response.*, source.*, destination.*, connection.*, xds.*, upstream_peer.*, downstream_peer.*, filter_state[...]), literals and string() are supported"
            ))
        };
        let e = match (path, index) {
            ("request.headers", Some(h)) => Expr::RequestHeader(h.to_ascii_lowercase()),
            ("response.headers", Some(h)) => Expr::ResponseHeader(h.to_ascii_lowercase()),
            ("filter_state", Some(k)) => Expr::FilterState(k),
            ("upstream_peer.labels", Some(key)) => Expr::PeerLabel {
                side: Side::Upstream,
                key,
                value: value_field,
            },
            ("downstream_peer.labels", Some(key)) => Expr::PeerLabel {
                side: Side::Downstream,
                key,
                value: value_field,
            },
            (_, Some(_)) => return Err(unsupported()),
            ("request.host", None) => Expr::RequestHost,
            ("request.method", None) => Expr::RequestMethod,
            ("request.path", None) => Expr::RequestPath,
            ("request.url_path", None) => Expr::RequestUrlPath,
            ("request.scheme", None) => Expr::RequestScheme,
            ("request.protocol", None) => Expr::RequestProtocol,
            ("request.id", None) => Expr::RequestId,
            ("request.useragent", None) => Expr::RequestUserAgent,
            ("request.referer", None) => Expr::RequestReferer,
            ("response.code", None) => Expr::ResponseCode,
            ("response.grpc_status", None) => Expr::ResponseGrpcStatus,
            ("source.address", None) => Expr::Source(AddrField::Address),
            ("source.port", None) => Expr::Source(AddrField::Port),
            ("destination.address", None) => Expr::Destination(AddrField::Address),
            ("destination.port", None) => Expr::Destination(AddrField::Port),
            ("connection.mtls", None) => Expr::ConnectionMtls,
            ("connection.requested_server_name", None) => Expr::ConnectionSni,
            ("xds.cluster_name", None) => Expr::XdsCluster,
            ("xds.route_name", None) => Expr::XdsRoute,
            (p, None) => {
                let (side, field) = p.split_once('.').ok_or_else(unsupported)?;
                let side = match side {
                    "upstream_peer" => Side::Upstream,
                    "downstream_peer" => Side::Downstream,
                    _ => return Err(unsupported()),
                };
                let field = match field {
                    "type" => PeerField::Type,
                    "name" => PeerField::Name,
                    "workload" => PeerField::Workload,
                    "namespace" => PeerField::Namespace,
                    "service" => PeerField::Service,
                    "revision" => PeerField::Revision,
                    "app" => PeerField::App,
                    "version" => PeerField::Version,
                    "cluster" => PeerField::Cluster,
                    "identity" => PeerField::Identity,
                    _ => return Err(unsupported()),
                };
                Expr::Peer(side, field)
            }
        };
        Ok(e)
    }

    /// The value for a stream (`unknown` when absent, as Envoy renders an evaluation error).
    pub fn eval(&self, a: &dyn Attributes) -> String {
        let v = match self {
            Expr::Literal(s) => Some(s.clone()),
            Expr::RequestHeader(h) => a.request_header(h),
            Expr::ResponseHeader(h) => a.response_header(h),
            Expr::ResponseCode => a.response_code().map(|c| c.to_string()),
            Expr::ResponseGrpcStatus => a.grpc_status().map(|c| c.to_string()),
            Expr::Source(f) | Expr::Destination(f) => a
                .address(matches!(self, Expr::Source(_)))
                .map(|addr| match f {
                    AddrField::Address => addr.to_string(),
                    AddrField::Port => addr.port().to_string(),
                }),
            Expr::ConnectionMtls => Some(a.mtls().to_string()),
            Expr::ConnectionSni => a.sni(),
            Expr::XdsCluster => a.cluster(),
            Expr::XdsRoute => a.route(),
            Expr::Peer(side, field) => a.peer(*side, *field),
            // A label is a string: CEL has no `.value` field on it (an error, `unknown`).
            Expr::PeerLabel { value: true, .. } => None,
            Expr::PeerLabel { side, key, .. } => a.peer_label(*side, key),
            Expr::FilterState(k) => a.filter_state(k),
            request => a.request(request),
        };
        v.unwrap_or_else(|| super::istio::UNKNOWN.to_owned())
    }
}

/// A custom metric's value expression (`stats.MetricDefinition.value`), compiled.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ValueExpr {
    /// An integer literal (`"1"` counts streams).
    Integer(u64),
    /// `request.size`: the request body's size, Envoy's way (the `content-length` header when
    /// there is one, else the body bytes received).
    RequestSize,
    /// `request.total_size`: request headers and body.
    RequestTotalSize,
    /// `response.size`: the response body bytes sent.
    ResponseSize,
    /// `response.total_size`: response headers, body and trailers.
    ResponseTotalSize,
    /// `response.code` (0 when no response was sent).
    ResponseCode,
    /// `response.grpc_status` (0 when there is none, as istio_stats records an evaluation error).
    ResponseGrpcStatus,
    /// Another attribute, read as text: its value when the text is an unsigned integer, else 0.
    Text(Expr),
}

impl ValueExpr {
    /// Compiles the value expression `text`.
    pub fn parse(text: &str) -> Result<ValueExpr, ExprError> {
        let t = text.trim();
        // CEL's conversions to integers change nothing that is recorded: istio_stats parses the
        // printed result either way.
        if let Some(inner) = ["int(", "uint("]
            .iter()
            .find_map(|f| t.strip_prefix(f))
            .and_then(|r| r.strip_suffix(')'))
        {
            return ValueExpr::parse(inner).map_err(|e| ExprError(format!("'{text}': {e}")));
        }
        // CEL's unsigned literal suffix.
        let digits = t.strip_suffix('u').unwrap_or(t);
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            return digits.parse().map(ValueExpr::Integer).map_err(|_| {
                ExprError(format!(
                    "'{text}': the literal does not fit an unsigned 64-bit counter"
                ))
            });
        }
        if let Some(n) = t.strip_prefix('-')
            && !n.is_empty()
            && n.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(ExprError(format!(
                "'{text}': a negative value cannot be added to a counter or histogram"
            )));
        }
        match t {
            "request.size" => return Ok(ValueExpr::RequestSize),
            "request.total_size" => return Ok(ValueExpr::RequestTotalSize),
            "response.size" => return Ok(ValueExpr::ResponseSize),
            "response.total_size" => return Ok(ValueExpr::ResponseTotalSize),
            "response.code" => return Ok(ValueExpr::ResponseCode),
            "response.grpc_status" => return Ok(ValueExpr::ResponseGrpcStatus),
            "request.duration" | "response.duration" => {
                // istio_stats prints a CEL duration ("12ms") and its integer parse fails, so the
                // metric only ever records 0. Istio accepts the config; so do we, with the same
                // result, and say so once.
                tracing::warn!(target: "config", "custom metric value '{text}' is a duration: istio_stats records it as 0 (its text is not an integer)");
                return Ok(ValueExpr::Integer(0));
            }
            _ => {}
        }
        match Expr::parse(t)? {
            // A quoted literal is known now.
            Expr::Literal(s) => Ok(ValueExpr::Integer(integer_text(&s).unwrap_or(0))),
            e => Ok(ValueExpr::Text(e)),
        }
    }
}

/// The unsigned integer `text` holds, parsed as istio_stats does (`absl::SimpleAtoi`: surrounding
/// whitespace and a leading `+` allowed); `None` when it holds none (istio_stats records 0).
pub fn integer_text(text: &str) -> Option<u64> {
    let t = text.trim();
    let t = t.strip_prefix('+').unwrap_or(t);
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
}

fn quoted(s: &str) -> Option<String> {
    let inner = s
        .strip_prefix('\'')
        .and_then(|r| r.strip_suffix('\''))
        .or_else(|| s.strip_prefix('"').and_then(|r| r.strip_suffix('"')))?;
    (!inner.contains(['\'', '"'])).then(|| inner.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;

    impl Attributes for Fixed {
        fn request_header(&self, name: &str) -> Option<String> {
            (name == "x-user").then(|| "alice".to_owned())
        }
        fn response_header(&self, _: &str) -> Option<String> {
            None
        }
        fn request(&self, e: &Expr) -> Option<String> {
            match e {
                Expr::RequestHost => Some("httpbin:8000".into()),
                Expr::RequestMethod => Some("GET".into()),
                _ => None,
            }
        }
        fn response_code(&self) -> Option<u16> {
            Some(200)
        }
        fn grpc_status(&self) -> Option<u32> {
            None
        }
        fn address(&self, source: bool) -> Option<std::net::SocketAddr> {
            Some(if source {
                ([10, 0, 0, 1], 5555).into()
            } else {
                ([10, 0, 0, 2], 8080).into()
            })
        }
        fn mtls(&self) -> bool {
            true
        }
        fn sni(&self) -> Option<String> {
            None
        }
        fn cluster(&self) -> Option<String> {
            Some("inbound-vip|8000|http|httpbin".into())
        }
        fn route(&self) -> Option<String> {
            Some("default".into())
        }
        fn peer(&self, side: Side, field: PeerField) -> Option<String> {
            match (side, field) {
                (Side::Upstream, PeerField::App) => Some("httpbin".to_owned()),
                (Side::Upstream, PeerField::Type) => Some("deployment".to_owned()),
                (Side::Downstream, PeerField::Name) => Some("sleep-7d9f".to_owned()),
                _ => None,
            }
        }
        fn peer_label(&self, side: Side, key: &str) -> Option<String> {
            (side == Side::Downstream && key == "role").then(|| "client".to_owned())
        }
        fn filter_state(&self, key: &str) -> Option<String> {
            (key == "k").then(|| "v".to_owned())
        }
    }

    #[test]
    fn documented_forms_parse_and_evaluate() {
        let cases = [
            ("request.headers['x-user']", "alice"),
            ("request.headers[\"X-User\"]", "alice"),
            ("request.host", "httpbin:8000"),
            ("request.method", "GET"),
            ("string(destination.port)", "8080"),
            ("source.address", "10.0.0.1:5555"),
            ("response.code", "200"),
            ("connection.mtls", "true"),
            ("xds.cluster_name", "inbound-vip|8000|http|httpbin"),
            ("xds.route_name", "default"),
            ("upstream_peer.app", "httpbin"),
            ("downstream_peer.app", "unknown"),
            ("upstream_peer.type", "deployment"),
            ("downstream_peer.name", "sleep-7d9f"),
            ("upstream_peer.name", "unknown"),
            ("downstream_peer.labels['role']", "client"),
            ("downstream_peer.labels[\"role\"]", "client"),
            ("upstream_peer.labels['role']", "unknown"),
            ("upstream_peer.labels['app']", "unknown"),
            // Istio's documented `.value` form: a field of a string, a CEL error.
            ("downstream_peer.labels['role'].value", "unknown"),
            ("filter_state['k']", "v"),
            ("'fixed'", "fixed"),
            ("42", "42"),
            ("request.headers['missing']", "unknown"),
            ("response.grpc_status", "unknown"),
        ];
        for (text, want) in cases {
            let e = Expr::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(e.eval(&Fixed), want, "{text}");
        }
    }

    #[test]
    fn value_expressions_compile_to_what_istio_stats_records() {
        let cases = [
            ("1", ValueExpr::Integer(1)),
            (" 42u ", ValueExpr::Integer(42)),
            ("int(7)", ValueExpr::Integer(7)),
            ("'5'", ValueExpr::Integer(5)),
            // A literal that is not an integer records 0, as istio_stats's SimpleAtoi fails.
            ("'five'", ValueExpr::Integer(0)),
            ("request.total_size", ValueExpr::RequestTotalSize),
            ("uint(response.total_size)", ValueExpr::ResponseTotalSize),
            ("request.size", ValueExpr::RequestSize),
            ("int(response.size)", ValueExpr::ResponseSize),
            (
                "upstream_peer.labels['cost']",
                ValueExpr::Text(Expr::PeerLabel {
                    side: Side::Upstream,
                    key: "cost".into(),
                    value: false,
                }),
            ),
            ("response.code", ValueExpr::ResponseCode),
            ("response.grpc_status", ValueExpr::ResponseGrpcStatus),
            (
                "request.headers['x-cost']",
                ValueExpr::Text(Expr::RequestHeader("x-cost".into())),
            ),
            (
                "destination.port",
                ValueExpr::Text(Expr::Destination(AddrField::Port)),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(ValueExpr::parse(text), Ok(want), "{text}");
        }
        // Durations print as text istio_stats cannot parse as an integer: always 0.
        for text in ["request.duration", "response.duration"] {
            assert_eq!(ValueExpr::parse(text), Ok(ValueExpr::Integer(0)), "{text}");
        }
        for (text, why) in [
            ("-1", "negative"),
            ("99999999999999999999", "does not fit"),
            ("request.total_size * 2", "only attribute paths"),
            ("int(has(request.headers.x))", "only attribute paths"),
            ("", "only attribute paths"),
        ] {
            let e = ValueExpr::parse(text).expect_err(text);
            assert!(e.0.contains(why) && e.0.contains(text), "{text}: {e}");
        }
    }

    #[test]
    fn integer_text_parses_as_simple_atoi() {
        assert_eq!(integer_text("12"), Some(12));
        assert_eq!(integer_text(" +12 "), Some(12));
        assert_eq!(integer_text("unknown"), None);
        assert_eq!(integer_text("-3"), None);
        assert_eq!(integer_text("1.5"), None);
        assert_eq!(integer_text(""), None);
        assert_eq!(integer_text("18446744073709551616"), None);
    }

    #[test]
    fn other_cel_is_refused_with_the_expression_named() {
        for text in [
            "request.headers['a'] + 'b'",
            "has(request.headers.x)",
            "node.metadata['X']",
            "upstream_peer.labels",
            "upstream_peer.labels['a'].key",
            "request.headers['a'].value",
            "upstream_peer.owner",
            "request.headers[0]",
            "a ? b : c",
            "",
        ] {
            let err = Expr::parse(text).expect_err(text);
            assert!(err.0.contains(text) || text.is_empty(), "{err}");
        }
    }
}
