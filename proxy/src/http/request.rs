//! Request and response header processing (hop-by-hop, x-forwarded-*, x-request-id, header ops,
//! rewrites, redirects).
//!
//! Pure functions over header maps and request parts, each doing one of the steps Envoy's HTTP
//! connection manager and router take, in Envoy's way:
//! - downstream: [`normalize_path`], [`strip_hop_by_hop`], [`apply_xff`] then
//!   [`set_forwarded_proto`], [`apply_internal_status`], [`ensure_request_id`];
//! - routed: [`apply_policies`] / [`apply_header_ops`], [`rewrite_host`] (on the path as received),
//!   then [`rewrite_path`]; or [`redirect_location`] for a redirect route;
//! - response: [`strip_hop_by_hop`], header operations, [`server_header`].

use std::{borrow::Cow, net::IpAddr};

use http::{
    HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header, request::Parts, uri::Authority,
};

use crate::config::{
    filters::hcm::{EscapedSlashes, ServerHeader},
    format::FormatValues,
    headers::{AppendAction, HeaderMutations},
    route::{Forward, HostRewrite, PathMatch, Redirect, RedirectPath, RouteMatch},
};

/// Why a request path is refused by [`normalize_path`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// A NUL byte, raw or `%00`: the path cannot be canonicalized (Envoy answers 400).
    #[error("the path contains a NUL character")]
    Nul,
    /// `%2F`/`%5C` with `path_with_escaped_slashes_action: REJECT_REQUEST`.
    #[error("the path contains an escaped slash (%2F or %5C)")]
    EscapedSlash,
    /// `%2F`/`%5C` with `UNESCAPE_AND_REDIRECT`: the client is sent to the normalized path.
    #[error("escaped slashes in the path: redirect to {0}")]
    Redirect(String),
}

impl PathError {
    /// The status of the local reply: 307 (with `Location` = the path) for [`PathError::Redirect`],
    /// else 400.
    pub fn status(&self) -> StatusCode {
        match self {
            PathError::Redirect(_) => StatusCode::TEMPORARY_REDIRECT,
            PathError::Nul | PathError::EscapedSlash => StatusCode::BAD_REQUEST,
        }
    }
}

/// `:path` as the HTTP connection manager hands it to routing: a fragment is dropped; then, in
/// Envoy's order, escaped slashes (`%2F`, `%5C`, any case, in the path only) are handled per
/// `escaped_slashes`, the path is canonicalized when `normalize` (RFC 3986: `\` is `/`, escaped
/// unreserved characters are decoded, `.`/`..` segments are removed without climbing above the
/// root, bytes that must be escaped are), and adjacent slashes are merged when `merge_slashes`.
/// The query is kept as sent. `*` (OPTIONS) is left alone.
pub fn normalize_path(
    path_and_query: &str,
    normalize: bool,
    merge_slashes: bool,
    escaped_slashes: EscapedSlashes,
) -> Result<Cow<'_, str>, PathError> {
    // Most paths have nothing any of the steps below would change: no escape, backslash, dot
    // segment or (when merging) double slash. They are kept as they are, without a copy.
    if !path_and_query.contains('#') {
        let path = path_and_query.split('?').next().unwrap_or("");
        if is_plain(path, merge_slashes) {
            return Ok(Cow::Borrowed(path_and_query));
        }
    }
    let without_fragment = path_and_query.split('#').next().unwrap_or("");
    let (path, query) = match without_fragment.find('?') {
        Some(q) => without_fragment.split_at(q),
        None => (without_fragment, ""),
    };
    if path == "*" {
        return Ok(Cow::Owned(without_fragment.to_owned()));
    }
    let mut path = Cow::Borrowed(path);
    let mut redirect = false;
    let unescape = match escaped_slashes {
        EscapedSlashes::Default | EscapedSlashes::KeepUnchanged => false,
        EscapedSlashes::RejectRequest
        | EscapedSlashes::UnescapeAndRedirect
        | EscapedSlashes::UnescapeAndForward => true,
    };
    if unescape && let Some(unescaped) = unescape_slashes(&path) {
        match escaped_slashes {
            EscapedSlashes::RejectRequest => return Err(PathError::EscapedSlash),
            EscapedSlashes::UnescapeAndRedirect => redirect = true,
            _ => {}
        }
        path = Cow::Owned(unescaped);
    }
    if normalize {
        path = Cow::Owned(canonicalize(&path)?);
    }
    if merge_slashes && let Some(merged) = merge_adjacent_slashes(&path) {
        path = Cow::Owned(merged);
    }
    let out = format!("{path}{query}");
    if redirect {
        return Err(PathError::Redirect(out));
    }
    Ok(Cow::Owned(out))
}

/// Whether normalization leaves `path` as it is: it starts with `/` and has only unreserved
/// characters and slashes, no `.` or `..` segment, and no `//` when slashes are merged.
fn is_plain(path: &str, merge_slashes: bool) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return false;
    }
    let safe = b
        .iter()
        .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'/' | b'-' | b'_' | b'~' | b'.'));
    safe && !(merge_slashes && path.contains("//"))
        && !path.split('/').any(|seg| seg == "." || seg == "..")
}

/// `path` with `%2F`/`%5C` (any case) decoded, or `None` when it has none.
fn unescape_slashes(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut copied = 0;
    let mut i = 0;
    while i + 2 < bytes.len() {
        if bytes[i] == b'%' {
            let decoded = match (bytes[i + 1], bytes[i + 2].to_ascii_uppercase()) {
                (b'2', b'F') => Some('/'),
                (b'5', b'C') => Some('\\'),
                _ => None,
            };
            if let Some(c) = decoded {
                out.push_str(&path[copied..i]);
                out.push(c);
                i += 3;
                copied = i;
                continue;
            }
        }
        i += 1;
    }
    if copied == 0 {
        return None;
    }
    out.push_str(&path[copied..]);
    Some(out)
}

/// RFC 3986 unreserved characters, which are the same escaped or not.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Bytes a canonical path carries escaped: controls, space, non-ASCII, `"`, `<`, `>`, backtick,
/// `{` and `}`.
fn must_escape(b: u8) -> bool {
    b <= 0x20 || b >= 0x7f || matches!(b, b'"' | b'<' | b'>' | b'`' | b'{' | b'}')
}

fn hex_value(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

fn push_escaped(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 0xf)]));
}

/// The canonical form of a path without query (what Envoy's `normalize_path` produces).
fn canonicalize(path: &str) -> Result<String, PathError> {
    // Pass 1: character level. The output is ASCII.
    let bytes = path.as_bytes();
    let mut clean = String::with_capacity(path.len() + 1);
    if !path.starts_with(['/', '\\']) {
        clean.push('/');
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            0 => return Err(PathError::Nul),
            b'\\' => clean.push('/'),
            b'%' => {
                let escaped = bytes
                    .get(i + 1)
                    .and_then(|h| hex_value(*h))
                    .zip(bytes.get(i + 2).and_then(|l| hex_value(*l)))
                    .map(|(h, l)| (h << 4) | l);
                match escaped {
                    Some(0) => return Err(PathError::Nul),
                    Some(v) if is_unreserved(v) => {
                        clean.push(char::from(v));
                        i += 3;
                        continue;
                    }
                    Some(_) => {
                        // Kept as sent (case included): it may mean something to the upstream.
                        clean.push_str(&path[i..i + 3]);
                        i += 3;
                        continue;
                    }
                    // Not an escape: a literal `%`, passed through as browsers do.
                    None => clean.push('%'),
                }
            }
            b if must_escape(b) => push_escaped(&mut clean, b),
            b => clean.push(char::from(b)),
        }
        i += 1;
    }
    // Pass 2: dot segments (RFC 3986 §5.2.4); `..` never climbs above the root.
    let segments: Vec<&str> = clean[1..].split('/').collect();
    let last = segments.len().saturating_sub(1);
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (n, s) in segments.iter().enumerate() {
        match *s {
            "." => {}
            ".." => {
                out.pop();
            }
            s => {
                out.push(s);
                continue;
            }
        }
        // A trailing dot segment leaves the directory: `/a/b/..` is `/a/`.
        if n == last {
            out.push("");
        }
    }
    Ok(format!("/{}", out.join("/")))
}

/// Adjacent slashes merged (Envoy's `merge_slashes`, on a path without query); `None` when there
/// are none.
fn merge_adjacent_slashes(path: &str) -> Option<String> {
    if !path.contains("//") {
        return None;
    }
    let inner: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if inner.is_empty() {
        return Some("/".to_owned());
    }
    let lead = if path.starts_with('/') { "/" } else { "" };
    let trail = if path.ends_with('/') { "/" } else { "" };
    Some(format!("{lead}{}{trail}", inner.join("/")))
}

/// Hop-by-hop headers removed from every request and response that crosses the proxy.
const HOP_BY_HOP: &[&str] = &[
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "http2-settings",
];

/// Headers a `Connection` header may not remove: the proxy needs them to route and frame.
const NOT_NOMINATABLE: &[&str] = &["host", "content-length", "te"];

/// Removes hop-by-hop headers: `keep-alive`, `proxy-connection`, `transfer-encoding`,
/// `http2-settings`, the headers `Connection` names, `te` unless it asks for `trailers` (then
/// exactly `te: trailers` stays, as gRPC needs), and `connection`/`upgrade` — unless `upgrade`
/// (an upgrade is being forwarded): then `upgrade` stays and `connection` becomes `upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // One pass over the names instead of a lookup per candidate: most requests carry none of
    // them, and a lookup by `&str` parses and hashes the name each time.
    let mut doomed: Vec<HeaderName> = Vec::new();
    let (mut connection, mut te) = (false, false);
    for name in headers.keys() {
        if name == header::CONNECTION {
            connection = true;
        } else if name == header::TE {
            te = true;
        } else if (!upgrade && name == header::UPGRADE) || HOP_BY_HOP.contains(&name.as_str()) {
            doomed.push(name.clone());
        }
    }
    if connection {
        let nominated = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !NOT_NOMINATABLE.contains(&t.as_str()))
            .filter(|t| !(upgrade && t == "upgrade"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok());
        doomed.extend(nominated);
    }
    for name in doomed {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if connection {
        headers.remove(header::CONNECTION);
    }
    if te {
        let trailers = headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| {
                t.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
            });
        if trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            headers.remove(header::TE);
        }
    }
}

/// `x-forwarded-for` (a parsed name: a `&str` key is parsed on every lookup).
const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-envoy-external-address`.
const EXTERNAL_ADDRESS: HeaderName = HeaderName::from_static("x-envoy-external-address");
/// `x-forwarded-proto`.
const XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// What x-forwarded-for processing decided about the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddress {
    /// The trusted client address: from XFF as `xff_num_trusted_hops` allows, else the peer's.
    pub ip: Option<IpAddr>,
    /// Envoy's internal request: XFF held a single address (or none and we appended the peer's) and
    /// it is internal (RFC 1918, loopback, `fd00::/8`).
    pub internal: bool,
    /// An edge request: not internal, and `use_remote_address` (we are the first trusted hop).
    pub edge: bool,
}

/// The address `skip` entries from the right end of the XFF list, and whether the list is that
/// single address (Envoy's `getLastAddressFromXFF`).
fn xff_address(headers: &HeaderMap, skip: u32) -> (Option<IpAddr>, bool) {
    let joined = joined_values(headers, XFF);
    let Some(list) = joined.as_deref() else {
        return (None, false);
    };
    let entries: Vec<&str> = list.split(',').collect();
    let skip = usize::try_from(skip).unwrap_or(usize::MAX);
    if skip >= entries.len() {
        return (None, false);
    }
    let index = entries.len() - 1 - skip;
    match entries[index].trim().parse::<IpAddr>() {
        Ok(ip) => (Some(ip), entries.len() == 1),
        Err(_) => (None, false),
    }
}

/// All values of `name` joined by `,`.
fn joined_values(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let mut joined = String::from_utf8_lossy(first.as_bytes()).into_owned();
    for v in values {
        joined.push(',');
        joined.push_str(&String::from_utf8_lossy(v.as_bytes()));
    }
    Some(joined)
}

/// Whether `ip` is internal by Envoy's default rule: RFC 1918, loopback, or `fd00::/8`.
pub fn is_internal_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.octets()[0] == 0xfd,
    }
}

/// Processes `x-forwarded-for` as Envoy's HTTP connection manager does and returns the client.
///
/// With `use_remote_address`, the client is the address `xff_num_trusted_hops` from the right of the
/// incoming XFF (when that many trusted proxies are in front), else the peer `remote_ip`; the peer is
/// appended to XFF unless `skip_xff_append`. Without it, the client is read from XFF, skipping the
/// `xff_num_trusted_hops` rightmost entries, and XFF is left alone. An edge request gets
/// `x-envoy-external-address: <client>`.
pub fn apply_xff(
    headers: &mut HeaderMap,
    remote_ip: Option<IpAddr>,
    use_remote_address: bool,
    skip_xff_append: bool,
    xff_num_trusted_hops: u32,
) -> ClientAddress {
    let (client, single) = if use_remote_address {
        let single = !headers.contains_key(XFF);
        let trusted = if xff_num_trusted_hops > 0 {
            xff_address(headers, xff_num_trusted_hops - 1).0
        } else {
            None
        };
        if !skip_xff_append && let Some(peer) = remote_ip {
            let list = match joined_values(headers, XFF) {
                Some(existing) if !existing.is_empty() => format!("{existing},{peer}"),
                _ => peer.to_string(),
            };
            if let Ok(v) = HeaderValue::from_str(&list) {
                headers.insert(XFF, v);
            }
        }
        (trusted.or(remote_ip), single)
    } else {
        xff_address(headers, xff_num_trusted_hops)
    };
    let internal = single && client.is_some_and(is_internal_address);
    let client = client.or(remote_ip);
    let edge = !internal && use_remote_address;
    headers.remove(EXTERNAL_ADDRESS);
    if edge
        && let Some(ip) = client
        && let Ok(v) = HeaderValue::from_str(&ip.to_string())
    {
        headers.insert(EXTERNAL_ADDRESS, v);
    }
    ClientAddress {
        ip: client,
        internal,
        edge,
    }
}

/// Sets `x-forwarded-proto` from the downstream connection (`https` over TLS): always with
/// `use_remote_address` (we are the edge), else only when a trusted proxy has not set it.
pub fn set_forwarded_proto(
    headers: &mut HeaderMap,
    downstream_tls: bool,
    use_remote_address: bool,
) {
    if use_remote_address || !headers.contains_key(XFP) {
        let proto = if downstream_tls { "https" } else { "http" };
        headers.insert(XFP, HeaderValue::from_static(proto));
    }
}

/// `x-envoy-*` request headers that steer the proxy; an external client may not set them.
const ENVOY_CONTROL_HEADERS: &[&str] = &[
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-max-retries",
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-force-trace",
    "x-envoy-ip-tags",
];

/// Marks or cleans a request by its internal status, as Envoy does: an internal request gets
/// `x-envoy-internal: true`; any other loses `x-envoy-internal`, the `x-envoy-*` control headers and
/// the route table's `internal_only_headers`; an edge request also loses
/// `x-envoy-decorator-operation` and `x-envoy-downstream-service-{cluster,node}`.
pub fn apply_internal_status(
    headers: &mut HeaderMap,
    client: &ClientAddress,
    internal_only_headers: &[String],
) {
    // One pass over the names (see `strip_hop_by_hop`): typically nothing is removed.
    let mut doomed: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        let n = name.as_str();
        let remove = match n.strip_prefix("x-envoy-") {
            Some("internal") => true,
            Some(_) if client.internal => false,
            Some(_) => {
                ENVOY_CONTROL_HEADERS.contains(&n)
                    || (client.edge && EDGE_ONLY_HEADERS.contains(&n))
            }
            None => false,
        } || (!client.internal
            && internal_only_headers
                .iter()
                .any(|h| h.eq_ignore_ascii_case(n)));
        if remove {
            doomed.push(name.clone());
        }
    }
    for name in doomed {
        headers.remove(name);
    }
    if client.internal {
        const INTERNAL: HeaderName = HeaderName::from_static("x-envoy-internal");
        headers.insert(INTERNAL, HeaderValue::from_static("true"));
    }
}

/// What an edge request loses on top of [`ENVOY_CONTROL_HEADERS`].
const EDGE_ONLY_HEADERS: &[&str] = &[
    "x-envoy-decorator-operation",
    "x-envoy-downstream-service-cluster",
    "x-envoy-downstream-service-node",
];

/// `x-request-id` (a const: `HeaderName::from_static` at run time parses the name).
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Ensures `x-request-id` (a UUID v4) when `generate`: an absent or empty id is generated; an edge
/// request's own id (`is_internal` false) is replaced unless `preserve_external`.
///
/// `is_internal` is the opposite of [`ClientAddress::edge`]: only edge requests have their id
/// replaced, as in Envoy.
pub fn ensure_request_id(
    headers: &mut HeaderMap,
    generate: bool,
    preserve_external: bool,
    is_internal: bool,
) {
    let present = headers.get(REQUEST_ID).is_some_and(|v| !v.is_empty());
    let force = !preserve_external && !is_internal;
    if !generate || (present && !force) {
        return;
    }
    // The thread's seeded generator instead of `Uuid::new_v4` (a getrandom system call per
    // request), formatted on the stack.
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = uuid::Builder::from_random_bytes(rand::random())
        .into_uuid()
        .hyphenated()
        .encode_lower(&mut buf);
    // A hyphenated UUID is always a valid header value.
    if let Ok(v) = HeaderValue::from_str(id) {
        headers.insert(REQUEST_ID, v);
    }
}

/// Applies one level of header operations as Envoy's `HeaderParser` does: removals first; then every
/// value is rendered with `values` and the append actions are decided on the headers as they are
/// before any addition; overwrites are applied, then appends. A value that renders empty is skipped
/// unless `keep_empty_value`; one that is not a valid header value is skipped.
pub fn apply_header_ops(headers: &mut HeaderMap, ops: &HeaderMutations, values: &dyn FormatValues) {
    // Most levels have none: every request passes three of them, every response three more.
    if ops.add.is_empty() && ops.remove.is_empty() {
        return;
    }
    for name in &ops.remove {
        headers.remove(name.as_str());
    }
    let mut overwrite = Vec::new();
    let mut append = Vec::new();
    for op in &ops.add {
        let value = op.value.render(values);
        if value.is_empty() && !op.keep_empty_value {
            continue;
        }
        let (Ok(name), Ok(v)) = (
            HeaderName::from_bytes(op.name.as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) else {
            tracing::debug!(target: "http", header = %op.name, "header operation skipped: invalid value");
            continue;
        };
        let present = headers.contains_key(&name);
        match op.action {
            AppendAction::AppendIfExistsOrAdd => append.push((name, v)),
            AppendAction::AddIfAbsent if !present => append.push((name, v)),
            AppendAction::AddIfAbsent => {}
            AppendAction::OverwriteIfExists if present => overwrite.push((name, v)),
            AppendAction::OverwriteIfExists => {}
            AppendAction::OverwriteIfExistsOrAdd => overwrite.push((name, v)),
        }
    }
    for (name, v) in overwrite {
        headers.insert(name, v);
    }
    for (name, v) in append {
        headers.append(name, v);
    }
}

/// Applies the header operations of several levels. `layers` lists them most specific first —
/// route, virtual host, route configuration — and Envoy evaluates them in that order, so the least
/// specific one is applied last and its overwrites win; `most_specific_wins`
/// (`most_specific_header_mutations_wins`) reverses the order so the route's win.
/// A weighted cluster's own operations are not a layer here: Envoy applies them before these.
pub fn apply_policies(
    headers: &mut HeaderMap,
    layers: &[&HeaderMutations],
    most_specific_wins: bool,
    values: &dyn FormatValues,
) {
    if most_specific_wins {
        for ops in layers.iter().rev() {
            apply_header_ops(headers, ops, values);
        }
    } else {
        for ops in layers {
            apply_header_ops(headers, ops, values);
        }
    }
}

/// The byte index where the query or fragment of `path_and_query` starts (its length if none).
fn path_end(path_and_query: &str) -> usize {
    path_and_query
        .find(['?', '#'])
        .unwrap_or(path_and_query.len())
}

/// How many leading bytes of `path_and_query` the route's path rule matched: the prefix of a prefix
/// rule, else the whole path without its query.
pub fn matched_len(matcher: &RouteMatch, path_and_query: &str) -> usize {
    let end = path_end(path_and_query);
    match &matcher.path {
        PathMatch::Prefix(p) | PathMatch::PathSeparatedPrefix(p) => {
            let head = path_and_query.get(..p.len());
            let hit = head.is_some_and(|h| {
                if matcher.case_sensitive {
                    h == p
                } else {
                    h.eq_ignore_ascii_case(p)
                }
            });
            if hit { p.len() } else { 0 }
        }
        PathMatch::Exact(_) | PathMatch::Regex(_) | PathMatch::Connect => end,
    }
}

/// The upstream `:path` after the route's `prefix_rewrite` (which replaces what the path rule
/// matched: the prefix, or the whole path for exact and regex rules) or `regex_rewrite` (applied to
/// the path without the query). The query is kept. `None` when the route rewrites nothing.
pub fn rewrite_path(path_and_query: &str, fwd: &Forward, matcher: &RouteMatch) -> Option<String> {
    if let Some(prefix) = &fwd.prefix_rewrite {
        let len = matched_len(matcher, path_and_query);
        return Some(format!("{prefix}{}", &path_and_query[len..]));
    }
    if let Some(rewrite) = &fwd.regex_rewrite {
        let end = path_end(path_and_query);
        return Some(format!(
            "{}{}",
            rewrite.apply(&path_and_query[..end]),
            &path_and_query[end..]
        ));
    }
    None
}

/// `:authority` or `Host`.
fn request_authority(parts: &Parts) -> Option<String> {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
}

/// The host a route's host rewrite yields, if any: the literal; the upstream host for `Auto`
/// (`upstream_host`, known to the caller after host selection); the named request header when set
/// and not empty; or the regex rewrite of `path_and_query`'s path, which is the path as received,
/// before path rewrites (Envoy rewrites the host first).
pub fn rewritten_host(
    rewrite: &HostRewrite,
    parts: &Parts,
    path_and_query: &str,
    upstream_host: Option<&str>,
) -> Option<String> {
    match rewrite {
        HostRewrite::Literal(h) => Some(h.clone()),
        HostRewrite::Auto => upstream_host.map(str::to_owned),
        HostRewrite::Header(name) => parts
            .headers
            .get(name.as_str())
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_owned),
        HostRewrite::PathRegex(r) => Some(r.apply(&path_and_query[..path_end(path_and_query)])),
    }
}

/// Sets the request's authority to `host`: the URI's authority when it has one, and the `Host`
/// header when present or when the URI has none. With `append_x_forwarded_host`, the old authority
/// is first appended to `x-forwarded-host` unless it is already the last entry (Envoy). `false`, and
/// nothing changed, when `host` is not a valid authority.
pub fn update_authority(parts: &mut Parts, host: &str, append_x_forwarded_host: bool) -> bool {
    let (Ok(authority), Ok(value)) = (host.parse::<Authority>(), HeaderValue::from_str(host))
    else {
        return false;
    };
    let original = request_authority(parts);
    if parts.uri.authority().is_some() {
        let mut p = parts.uri.clone().into_parts();
        p.authority = Some(authority);
        match Uri::from_parts(p) {
            Ok(u) => parts.uri = u,
            Err(_) => return false,
        }
    }
    if parts.headers.contains_key(header::HOST) || parts.uri.authority().is_none() {
        parts.headers.insert(header::HOST, value);
    }
    if append_x_forwarded_host && let Some(original) = original.filter(|o| !o.is_empty()) {
        let existing = joined_values(&parts.headers, XFH).filter(|e| !e.is_empty());
        let list = match existing {
            Some(e) if e.rsplit(',').next().map(str::trim) == Some(original.as_str()) => None,
            Some(e) => Some(format!("{e},{original}")),
            None => Some(original),
        };
        if let Some(v) = list.and_then(|l| HeaderValue::from_str(&l).ok()) {
            parts.headers.insert(XFH, v);
        }
    }
    true
}

/// `x-forwarded-host`.
const XFH: &str = "x-forwarded-host";

/// Applies a route's host rewrite to `parts` (see [`rewritten_host`]; call it before
/// [`rewrite_path`]). `true` when the authority changed.
pub fn rewrite_host(
    parts: &mut Parts,
    rewrite: &HostRewrite,
    upstream_host: Option<&str>,
    append_x_forwarded_host: bool,
) -> bool {
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(String::new, |p| p.as_str().to_owned());
    match rewritten_host(rewrite, parts, &path, upstream_host) {
        Some(host) => update_authority(parts, &host, append_x_forwarded_host),
        None => false,
    }
}

/// The request host as a redirect keeps it: its port is dropped when the redirect sets a port, or
/// when the scheme changes and the port is the default of the request's scheme (Envoy).
fn redirect_host<'h>(
    host: &'h str,
    request_scheme: &str,
    new_scheme: &str,
    new_port: bool,
) -> &'h str {
    let port_start = if host.starts_with('[') {
        host.rfind("]:").map(|i| i + 1)
    } else {
        host.rfind(':')
    };
    let Some(i) = port_start else {
        return host;
    };
    let port = &host[i..];
    let default_port = new_scheme != request_scheme
        && ((request_scheme == "https" && port == ":443")
            || (request_scheme == "http" && port == ":80"));
    if new_port || default_port {
        &host[..i]
    } else {
        host
    }
}

/// The status and `Location` of a redirect route's reply, per Envoy: the scheme from
/// `https_redirect`/`scheme_redirect` or the request's (`scheme`, its `x-forwarded-proto`); the host
/// from `host_redirect` or the request's `host` (see the port rule of Envoy's `processRequestHost`),
/// `:port_redirect` appended; the path from `path_redirect` (its own query wins, else the request's
/// is kept), `prefix_rewrite` (replacing what `matcher` matched) or `regex_rewrite`, else the
/// request's; `strip_query` drops the request's query. Status 301 unless configured.
pub fn redirect_location(
    rd: &Redirect,
    scheme: &str,
    host: &str,
    path_and_query: &str,
    matcher: &RouteMatch,
) -> (StatusCode, String) {
    let pq = path_and_query.split('#').next().unwrap_or("");
    let final_scheme = rd.scheme.as_deref().unwrap_or(scheme);
    let final_port = rd.port.map(|p| format!(":{p}")).unwrap_or_default();
    let final_host = match &rd.host {
        Some(h) => h.as_str(),
        None => redirect_host(host, scheme, final_scheme, rd.port.is_some()),
    };
    let end = path_end(pq);
    let (path, query) = pq.split_at(end);
    let mut path_has_own_query = false;
    let mut final_path = match &rd.path {
        RedirectPath::Keep => pq.to_owned(),
        RedirectPath::Path(p) if p.contains('?') => {
            path_has_own_query = true;
            p.clone()
        }
        RedirectPath::Path(p) => format!("{p}{query}"),
        RedirectPath::Prefix(p) => format!("{p}{}", &pq[matched_len(matcher, pq)..]),
        RedirectPath::Regex(r) => format!("{}{query}", r.apply(path)),
    };
    if !final_path.starts_with('/') {
        final_path.insert(0, '/');
    }
    if rd.strip_query
        && !path_has_own_query
        && let Some(q) = final_path.find('?')
    {
        final_path.truncate(q);
    }
    let status = StatusCode::from_u16(rd.status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    (
        status,
        format!("{final_scheme}://{final_host}{final_port}{final_path}"),
    )
}

/// Sets the response's `server` header per `server_header_transformation`: always `server_name`
/// (`OVERWRITE`), only when the upstream sent none (`APPEND_IF_ABSENT`), or never
/// (`PASS_THROUGH`).
pub fn server_header(headers: &mut HeaderMap, mode: ServerHeader, server_name: &str) {
    let set = match mode {
        ServerHeader::Overwrite => true,
        ServerHeader::AppendIfAbsent => !headers.contains_key(header::SERVER),
        ServerHeader::PassThrough => false,
    };
    if set && let Ok(v) = HeaderValue::from_str(server_name) {
        headers.insert(header::SERVER, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        RouteConfig,
        format::{Format, FormatContext, NoValues, Operator},
        headers::HeaderOp,
        route::{Action, Route},
    };
    use serde_json::{Value as Json, json};
    use std::net::{Ipv4Addr, Ipv6Addr};
    use waypoint_proto::{envoy::config::route::v3::RouteConfiguration, json as pjson};

    fn route(r: Json) -> Route {
        let doc = json!({"name": "r", "virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": [r]}]});
        let raw: RouteConfiguration = pjson::from_json(&doc).expect("decodes");
        let mut rc = RouteConfig::compile(&raw, "rc").expect("compiles");
        rc.virtual_hosts.remove(0).routes.remove(0)
    }

    fn forward(m: Json, action: Json) -> (Box<Forward>, RouteMatch) {
        let r = route(json!({"match": m, "route": action}));
        match r.action {
            Action::Forward(f) => (f, r.matcher),
            _ => panic!("forward route"),
        }
    }

    fn redirect(m: Json, action: Json) -> (Box<Redirect>, RouteMatch) {
        let r = route(json!({"match": m, "redirect": action}));
        match r.action {
            Action::Redirect(rd) => (rd, r.matcher),
            _ => panic!("redirect route"),
        }
    }

    fn headers(list: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in list {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn all(h: &HeaderMap, name: &str) -> Vec<String> {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().expect("ascii").to_owned())
            .collect()
    }

    fn one(h: &HeaderMap, name: &str) -> Option<String> {
        h.get(name).map(|v| v.to_str().expect("ascii").to_owned())
    }

    fn norm(p: &str) -> Result<String, PathError> {
        normalize_path(p, true, false, EscapedSlashes::KeepUnchanged).map(Cow::into_owned)
    }

    // ---- normalize_path ----

    #[test]
    fn dot_segments_are_removed() {
        for (input, want) in [
            ("/a/b/../c", "/a/c"),
            ("/a/b/./c", "/a/b/c"),
            ("/a/b/../../../../c", "/c"),
            ("/..", "/"),
            ("/a/..", "/"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/./", "/a/"),
            ("/a/b/%2E%2E/c", "/a/c"),
            ("/a/b/%2e./c", "/a/c"),
            ("/a/b/.%2e", "/a/"),
            ("/a/..\\c", "/c"),
            ("a/b/../c", "/a/c"),
            ("/", "/"),
            ("/a//../b", "/a/b"),
            ("//a/../b", "//b"),
            ("/..a/b../.c", "/..a/b../.c"),
        ] {
            assert_eq!(norm(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn empty_path_and_asterisk() {
        assert_eq!(norm("").as_deref(), Ok("/"));
        assert_eq!(
            normalize_path("", false, false, EscapedSlashes::Default).as_deref(),
            Ok("")
        );
        assert_eq!(norm("*").as_deref(), Ok("*"));
        assert_eq!(norm("?q=1").as_deref(), Ok("/?q=1"));
    }

    #[test]
    fn query_is_kept_verbatim_and_fragment_dropped() {
        assert_eq!(
            norm("/a/../b?x=/../y&z=%2e").as_deref(),
            Ok("/b?x=/../y&z=%2e")
        );
        assert_eq!(norm("/a/./b#frag").as_deref(), Ok("/a/b"));
        assert_eq!(norm("/a?q#f").as_deref(), Ok("/a?q"));
        assert_eq!(
            normalize_path("/a//b?x=//y", false, true, EscapedSlashes::Default).as_deref(),
            Ok("/a/b?x=//y")
        );
    }

    #[test]
    fn escapes_are_canonicalized() {
        for (input, want) in [
            // Unreserved characters are decoded (so /%61dmin is /admin).
            ("/%61dmin/%7Euser", "/admin/~user"),
            // Reserved and other escapes are kept as sent.
            ("/%c0%af", "/%c0%af"),
            ("/%5c%25", "/%5c%25"),
            ("/a%2Fb", "/a%2Fb"),
            // A `%` that starts no escape passes through.
            ("/100%", "/100%"),
            ("/%zz", "/%zz"),
            // Bytes that must be escaped are.
            ("/a b\"{}", "/a%20b%22%7B%7D"),
            ("/caf\u{e9}", "/caf%C3%A9"),
        ] {
            assert_eq!(norm(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn nul_cannot_be_normalized() {
        assert_eq!(norm("/ab%00c"), Err(PathError::Nul));
        assert_eq!(norm("/ab\0c"), Err(PathError::Nul));
        assert_eq!(PathError::Nul.status(), StatusCode::BAD_REQUEST);
        // Without normalization the path is not inspected.
        assert!(normalize_path("/ab%00c", false, false, EscapedSlashes::Default).is_ok());
    }

    #[test]
    fn plain_paths_are_kept_without_a_copy() {
        let borrowed = |p: &str, merge: bool| {
            matches!(
                normalize_path(p, true, merge, EscapedSlashes::UnescapeAndRedirect),
                Ok(Cow::Borrowed(b)) if b == p
            )
        };
        for p in [
            "/",
            "/bench",
            "/a/b.html?x=1&y=/../z",
            "/v1/x-y_z~w/..a/b..",
            "/a//b",
        ] {
            assert!(borrowed(p, false), "{p}");
        }
        // Anything a step could change goes the long way, whose result the tests above check.
        for p in [
            "", "a", "/a/./b", "/a/../b", "/a/..", "/%61", "/a\\b", "/a b", "/a#f",
        ] {
            assert!(!borrowed(p, false), "{p}");
        }
        assert!(!borrowed("/a//b", true));
        assert_eq!(norm("/a//b").as_deref(), Ok("/a//b"));
    }

    #[test]
    fn merge_slashes_after_normalization() {
        let merge =
            |p: &str| normalize_path(p, false, true, EscapedSlashes::Default).map(Cow::into_owned);
        for (input, want) in [
            ("//a//b///c", "/a/b/c"),
            ("/a/b/c//", "/a/b/c/"),
            ("/a", "/a"),
            ("//", "/"),
            ("//a/?b", "/a/?b"),
            ("/a//b?", "/a/b?"),
        ] {
            assert_eq!(merge(input).as_deref(), Ok(want), "{input}");
        }
        assert_eq!(
            normalize_path("//a/../b", true, true, EscapedSlashes::Default).as_deref(),
            Ok("/b")
        );
    }

    #[test]
    fn escaped_slash_actions() {
        let p = "/a%2F..%2fb%5Cc?q=%2F";
        for keep in [EscapedSlashes::Default, EscapedSlashes::KeepUnchanged] {
            assert_eq!(
                normalize_path(p, true, false, keep).as_deref(),
                Ok("/a%2F..%2fb%5Cc?q=%2F")
            );
        }
        assert_eq!(
            normalize_path(p, true, false, EscapedSlashes::RejectRequest),
            Err(PathError::EscapedSlash)
        );
        // Unescaped, the `..` is a real segment: /a/../b\c → /b/c. The query is untouched.
        assert_eq!(
            normalize_path(p, true, false, EscapedSlashes::UnescapeAndForward).as_deref(),
            Ok("/b/c?q=%2F")
        );
        let err = normalize_path(p, true, false, EscapedSlashes::UnescapeAndRedirect)
            .expect_err("redirect");
        assert_eq!(err, PathError::Redirect("/b/c?q=%2F".into()));
        assert_eq!(err.status(), StatusCode::TEMPORARY_REDIRECT);
        // Without escaped slashes, no action applies.
        for action in [
            EscapedSlashes::RejectRequest,
            EscapedSlashes::UnescapeAndRedirect,
        ] {
            assert_eq!(
                normalize_path("/a/b?q=%2F", true, false, action).as_deref(),
                Ok("/a/b?q=%2F")
            );
        }
        // Unescaping without normalization still merges when asked.
        assert_eq!(
            normalize_path("/a%2F%2Fb", false, true, EscapedSlashes::UnescapeAndForward).as_deref(),
            Ok("/a/b")
        );
    }

    // ---- hop-by-hop ----

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Private"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-private", "secret"),
            ("te", "gzip"),
            ("x-kept", "1"),
            ("http2-settings", "AAA"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, vec!["x-kept"]);
    }

    #[test]
    fn te_trailers_survives_alone() {
        let mut h = headers(&[("te", "trailers, deflate;q=0.5")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(all(&h, "te"), vec!["trailers"]);
        let mut h = headers(&[("te", "trailers"), ("connection", "te")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(all(&h, "te"), vec!["trailers"]);
    }

    #[test]
    fn a_forwarded_upgrade_keeps_upgrade_and_connection() {
        let mut h = headers(&[
            ("connection", "Upgrade, keep-alive"),
            ("upgrade", "websocket"),
            ("keep-alive", "1"),
            ("sec-websocket-key", "k"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(one(&h, "connection").as_deref(), Some("upgrade"));
        assert_eq!(one(&h, "upgrade").as_deref(), Some("websocket"));
        assert_eq!(one(&h, "sec-websocket-key").as_deref(), Some("k"));
        assert!(!h.contains_key("keep-alive"));
    }

    #[test]
    fn connection_cannot_remove_host_or_content_length() {
        let mut h = headers(&[
            ("connection", "host, content-length, x-a"),
            ("host", "h"),
            ("content-length", "3"),
            ("x-a", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert!(h.contains_key("host") && h.contains_key("content-length"));
        assert!(!h.contains_key("x-a"));
    }

    // ---- x-forwarded-for ----

    const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9));
    const PUBLIC: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));

    #[test]
    fn use_remote_address_appends_the_peer() {
        let mut h = HeaderMap::new();
        let c = apply_xff(&mut h, Some(PEER), true, false, 0);
        assert_eq!(one(&h, XFF.as_str()).as_deref(), Some("10.0.0.9"));
        assert_eq!(c.ip, Some(PEER));
        assert!(c.internal && !c.edge);
        assert!(!h.contains_key("x-envoy-external-address"));

        let mut h = headers(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
        ]);
        let c = apply_xff(&mut h, Some(PUBLIC), true, false, 0);
        assert_eq!(all(&h, XFF.as_str()), vec!["1.1.1.1,2.2.2.2,203.0.113.7"]);
        assert_eq!(c.ip, Some(PUBLIC));
        assert!(!c.internal && c.edge);
        assert_eq!(
            one(&h, "x-envoy-external-address").as_deref(),
            Some("203.0.113.7")
        );
    }

    #[test]
    fn trusted_hops_pick_the_client_from_the_chain() {
        // use_remote_address with 1 trusted hop: the last XFF entry (set by that hop) is the client.
        let mut h = headers(&[("x-forwarded-for", "198.51.100.1, 203.0.113.7")]);
        let c = apply_xff(&mut h, Some(PEER), true, false, 1);
        assert_eq!(c.ip, Some(PUBLIC));
        assert!(c.edge);
        assert_eq!(
            one(&h, XFF.as_str()).as_deref(),
            Some("198.51.100.1, 203.0.113.7,10.0.0.9")
        );
        // Without use_remote_address, 1 trusted hop skips the rightmost entry.
        let mut h = headers(&[("x-forwarded-for", "198.51.100.1, 203.0.113.7")]);
        let c = apply_xff(&mut h, Some(PEER), false, false, 1);
        assert_eq!(c.ip, Some("198.51.100.1".parse().expect("ip")));
        assert!(!c.internal && !c.edge);
        assert_eq!(
            one(&h, XFF.as_str()).as_deref(),
            Some("198.51.100.1, 203.0.113.7"),
            "XFF untouched"
        );
        // More trusted hops than entries: the peer is the client (for logging), not internal.
        let mut h = headers(&[("x-forwarded-for", "10.1.1.1")]);
        let c = apply_xff(&mut h, Some(PEER), false, false, 3);
        assert_eq!(c.ip, Some(PEER));
        assert!(!c.internal);
    }

    #[test]
    fn xff_without_use_remote_address() {
        // The last entry; a single internal one makes the request internal.
        let mut h = headers(&[("x-forwarded-for", "10.1.1.1")]);
        let c = apply_xff(&mut h, Some(PUBLIC), false, false, 0);
        assert_eq!(c.ip, Some("10.1.1.1".parse().expect("ip")));
        assert!(c.internal);
        // No XFF: the peer, external.
        let mut h = HeaderMap::new();
        let c = apply_xff(&mut h, Some(PEER), false, false, 0);
        assert_eq!(c.ip, Some(PEER));
        assert!(!c.internal && !c.edge);
        assert!(!h.contains_key(XFF));
        // A garbage entry is no address.
        let mut h = headers(&[("x-forwarded-for", "1.1.1.1,not-an-ip")]);
        assert_eq!(
            apply_xff(&mut h, Some(PEER), false, false, 0).ip,
            Some(PEER)
        );
        // IPv6 entries.
        let mut h = headers(&[("x-forwarded-for", "2001:db8::1, fd00::5")]);
        let c = apply_xff(&mut h, None, false, false, 0);
        assert_eq!(c.ip, Some("fd00::5".parse().expect("ip")));
    }

    #[test]
    fn skip_xff_append_and_spoofed_external_address() {
        let mut h = headers(&[("x-envoy-external-address", "6.6.6.6")]);
        let c = apply_xff(&mut h, Some(PUBLIC), true, true, 0);
        assert!(!h.contains_key(XFF));
        assert!(c.edge);
        assert_eq!(
            one(&h, "x-envoy-external-address").as_deref(),
            Some("203.0.113.7")
        );
        let mut h = headers(&[("x-envoy-external-address", "6.6.6.6")]);
        apply_xff(&mut h, Some(PEER), false, false, 0);
        assert!(!h.contains_key("x-envoy-external-address"));
    }

    #[test]
    fn internal_addresses() {
        for ip in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "127.0.0.1",
            "::1",
            "fd12::1",
        ] {
            assert!(is_internal_address(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["8.8.8.8", "172.32.0.1", "2001:db8::1", "fe80::1"] {
            assert!(!is_internal_address(ip.parse().expect("ip")), "{ip}");
        }
        assert!(is_internal_address(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    }

    #[test]
    fn forwarded_proto() {
        let mut h = HeaderMap::new();
        set_forwarded_proto(&mut h, true, false);
        assert_eq!(one(&h, "x-forwarded-proto").as_deref(), Some("https"));
        let mut h = headers(&[("x-forwarded-proto", "https")]);
        set_forwarded_proto(&mut h, false, false);
        assert_eq!(one(&h, "x-forwarded-proto").as_deref(), Some("https"));
        set_forwarded_proto(&mut h, false, true);
        assert_eq!(one(&h, "x-forwarded-proto").as_deref(), Some("http"));
    }

    #[test]
    fn internal_status_marks_or_cleans() {
        let dirty = || {
            headers(&[
                ("x-envoy-internal", "true"),
                ("x-envoy-retry-on", "5xx"),
                ("x-envoy-decorator-operation", "op"),
                ("x-secret", "1"),
                ("x-kept", "1"),
            ])
        };
        let only = vec!["x-secret".to_owned()];
        let mut h = dirty();
        let internal = ClientAddress {
            ip: Some(PEER),
            internal: true,
            edge: false,
        };
        apply_internal_status(&mut h, &internal, &only);
        assert_eq!(one(&h, "x-envoy-internal").as_deref(), Some("true"));
        assert!(h.contains_key("x-envoy-retry-on") && h.contains_key("x-secret"));

        let mut h = dirty();
        let external = ClientAddress {
            ip: Some(PUBLIC),
            internal: false,
            edge: false,
        };
        apply_internal_status(&mut h, &external, &only);
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, vec!["x-envoy-decorator-operation", "x-kept"]);

        let mut h = dirty();
        apply_internal_status(
            &mut h,
            &ClientAddress {
                edge: true,
                ..external
            },
            &only,
        );
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, vec!["x-kept"]);
    }

    // ---- x-request-id ----

    #[test]
    fn request_id_is_generated_kept_or_replaced() {
        let is_uuid = |s: Option<String>| {
            s.and_then(|s| uuid::Uuid::parse_str(&s).ok())
                .is_some_and(|u| u.get_version_num() == 4)
        };
        let id = |h: &HeaderMap| one(h, REQUEST_ID.as_str());
        let mut h = HeaderMap::new();
        ensure_request_id(&mut h, true, false, true);
        assert!(is_uuid(id(&h)), "generated: {h:?}");
        // Internal: kept.
        let mut h = headers(&[("x-request-id", "abc")]);
        ensure_request_id(&mut h, true, false, true);
        assert_eq!(id(&h).as_deref(), Some("abc"));
        // Edge: replaced unless preserved.
        let mut h = headers(&[("x-request-id", "abc")]);
        ensure_request_id(&mut h, true, false, false);
        assert!(is_uuid(id(&h)), "replaced: {h:?}");
        let mut h = headers(&[("x-request-id", "abc")]);
        ensure_request_id(&mut h, true, true, false);
        assert_eq!(id(&h).as_deref(), Some("abc"));
        // Not generating: nothing changes.
        let mut h = HeaderMap::new();
        ensure_request_id(&mut h, false, false, false);
        assert!(h.is_empty());
        // An empty id is replaced.
        let mut h = headers(&[("x-request-id", "")]);
        ensure_request_id(&mut h, true, true, true);
        assert!(is_uuid(id(&h)), "empty replaced: {h:?}");
    }

    // ---- header operations ----

    fn op(name: &str, value: &str, action: AppendAction) -> HeaderOp {
        HeaderOp {
            name: name.into(),
            value: Format::parse(value, FormatContext::Header, "t").expect("format"),
            action,
            keep_empty_value: false,
        }
    }

    fn values() -> impl FormatValues {
        crate::config::format::FnValues(|o: &Operator| match o.name.as_str() {
            "DOWNSTREAM_REMOTE_ADDRESS" => Some("10.0.0.9:5000".to_owned()),
            "HOSTNAME" => Some(String::new()),
            _ => None,
        })
    }

    #[test]
    fn header_ops_follow_the_append_actions() {
        use AppendAction::*;
        let ops = HeaderMutations {
            add: vec![
                op("x-append", "b", AppendIfExistsOrAdd),
                op("x-new", "n", AppendIfExistsOrAdd),
                op("x-absent", "a", AddIfAbsent),
                op("x-present", "ignored", AddIfAbsent),
                op("x-over", "o", OverwriteIfExistsOrAdd),
                op("x-over-missing", "m", OverwriteIfExistsOrAdd),
                op("x-if-exists", "e", OverwriteIfExists),
                op("x-if-exists-missing", "no", OverwriteIfExists),
                op(
                    "x-peer",
                    "%DOWNSTREAM_REMOTE_ADDRESS%",
                    OverwriteIfExistsOrAdd,
                ),
            ],
            remove: vec![],
        };
        let mut h = headers(&[
            ("x-append", "a"),
            ("x-present", "p"),
            ("x-over", "1"),
            ("x-over", "2"),
            ("x-if-exists", "old"),
        ]);
        apply_header_ops(&mut h, &ops, &values());
        assert_eq!(all(&h, "x-append"), vec!["a", "b"]);
        assert_eq!(all(&h, "x-new"), vec!["n"]);
        assert_eq!(all(&h, "x-absent"), vec!["a"]);
        assert_eq!(all(&h, "x-present"), vec!["p"]);
        assert_eq!(all(&h, "x-over"), vec!["o"]);
        assert_eq!(all(&h, "x-over-missing"), vec!["m"]);
        assert_eq!(all(&h, "x-if-exists"), vec!["e"]);
        assert!(!h.contains_key("x-if-exists-missing"));
        assert_eq!(all(&h, "x-peer"), vec!["10.0.0.9:5000"]);
    }

    #[test]
    fn removals_come_first_and_checks_see_the_headers_before_additions() {
        use AppendAction::*;
        let ops = HeaderMutations {
            add: vec![
                // Removed first, so absent: added.
                op("x-gone", "new", AddIfAbsent),
                // Two additions of one absent header both happen (decided before adding).
                op("x-twice", "1", AddIfAbsent),
                op("x-twice", "2", AddIfAbsent),
                // An overwrite then an append of the same header: both apply.
                op("x-mixed", "o", OverwriteIfExistsOrAdd),
                op("x-mixed", "a", AppendIfExistsOrAdd),
            ],
            remove: vec!["x-gone".into()],
        };
        let mut h = headers(&[("x-gone", "old"), ("x-mixed", "z")]);
        apply_header_ops(&mut h, &ops, &NoValues);
        assert_eq!(all(&h, "x-gone"), vec!["new"]);
        assert_eq!(all(&h, "x-twice"), vec!["1", "2"]);
        assert_eq!(all(&h, "x-mixed"), vec!["o", "a"]);
    }

    #[test]
    fn empty_values_need_keep_empty_value() {
        let mut keep = op("x-keep", "%HOSTNAME%", AppendAction::OverwriteIfExistsOrAdd);
        keep.keep_empty_value = true;
        let ops = HeaderMutations {
            add: vec![
                op("x-drop", "%HOSTNAME%", AppendAction::OverwriteIfExistsOrAdd),
                op(
                    "x-missing",
                    "%ROUTE_NAME%",
                    AppendAction::OverwriteIfExistsOrAdd,
                ),
                keep,
            ],
            remove: vec![],
        };
        let mut h = headers(&[("x-drop", "stays")]);
        apply_header_ops(&mut h, &ops, &values());
        assert_eq!(all(&h, "x-drop"), vec!["stays"]);
        assert!(!h.contains_key("x-missing"));
        assert_eq!(all(&h, "x-keep"), vec![""]);
    }

    #[test]
    fn invalid_rendered_values_are_skipped() {
        let ops = HeaderMutations {
            add: vec![op("x-bad", "%REQ(X)%", AppendAction::AppendIfExistsOrAdd)],
            remove: vec![],
        };
        let bad = crate::config::format::FnValues(|_: &Operator| Some("a\r\nb".to_owned()));
        let mut h = HeaderMap::new();
        apply_header_ops(&mut h, &ops, &bad);
        assert!(h.is_empty());
    }

    #[test]
    fn policy_layers_least_specific_wins_unless_configured() {
        let set = |v: &str| HeaderMutations {
            add: vec![op("x-level", v, AppendAction::OverwriteIfExistsOrAdd)],
            remove: vec![],
        };
        let (route, vhost, table) = (set("route"), set("vhost"), set("table"));
        let layers = [&route, &vhost, &table];
        let mut h = HeaderMap::new();
        apply_policies(&mut h, &layers, false, &NoValues);
        assert_eq!(all(&h, "x-level"), vec!["table"]);
        let mut h = HeaderMap::new();
        apply_policies(&mut h, &layers, true, &NoValues);
        assert_eq!(all(&h, "x-level"), vec!["route"]);
        // Appends accumulate in evaluation order.
        let add = |v: &str| HeaderMutations {
            add: vec![op("x-trail", v, AppendAction::AppendIfExistsOrAdd)],
            remove: vec![],
        };
        let (r, v, t) = (add("r"), add("v"), add("t"));
        let mut h = HeaderMap::new();
        apply_policies(&mut h, &[&r, &v, &t], false, &NoValues);
        assert_eq!(all(&h, "x-trail"), vec!["r", "v", "t"]);
    }

    #[test]
    fn compiled_route_header_policy_applies() {
        let r = route(json!({"match": {"prefix": "/"}, "route": {"cluster": "c"},
            "request_headers_to_add": [
                {"header": {"key": "x-peer", "value": "%DOWNSTREAM_REMOTE_ADDRESS%"},
                 "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
            "request_headers_to_remove": ["x-drop"]}));
        let mut h = headers(&[("x-drop", "1"), ("x-peer", "spoofed")]);
        apply_header_ops(&mut h, &r.headers.request, &values());
        assert!(!h.contains_key("x-drop"));
        assert_eq!(all(&h, "x-peer"), vec!["10.0.0.9:5000"]);
    }

    // ---- path rewrites ----

    #[test]
    fn prefix_rewrite_replaces_the_matched_prefix_and_keeps_the_query() {
        let (f, m) = forward(
            json!({"prefix": "/api"}),
            json!({"cluster": "c", "prefix_rewrite": "/v2"}),
        );
        assert_eq!(
            rewrite_path("/api/users?id=1", &f, &m).as_deref(),
            Some("/v2/users?id=1")
        );
        assert_eq!(rewrite_path("/api", &f, &m).as_deref(), Some("/v2"));
        // Envoy's documented trailing-slash behaviour: prefix "/api/" → "/" keeps one slash.
        let (f, m) = forward(
            json!({"prefix": "/api/"}),
            json!({"cluster": "c", "prefix_rewrite": "/"}),
        );
        assert_eq!(
            rewrite_path("/api/users", &f, &m).as_deref(),
            Some("/users")
        );
        let (f, m) = forward(
            json!({"prefix": "/API", "case_sensitive": false}),
            json!({"cluster": "c", "prefix_rewrite": "/x"}),
        );
        assert_eq!(rewrite_path("/api/y", &f, &m).as_deref(), Some("/x/y"));
        let (f, m) = forward(
            json!({"path_separated_prefix": "/svc"}),
            json!({"cluster": "c", "prefix_rewrite": "/"}),
        );
        assert_eq!(rewrite_path("/svc/a?b", &f, &m).as_deref(), Some("//a?b"));
        // An exact or regex rule matched the whole path: it is replaced, the query stays.
        let (f, m) = forward(
            json!({"path": "/old"}),
            json!({"cluster": "c", "prefix_rewrite": "/new"}),
        );
        assert_eq!(
            rewrite_path("/old?x=1", &f, &m).as_deref(),
            Some("/new?x=1")
        );
        let (f, m) = forward(
            json!({"safe_regex": {"regex": "/r/.*"}}),
            json!({"cluster": "c", "prefix_rewrite": "/fixed"}),
        );
        assert_eq!(
            rewrite_path("/r/abc?x", &f, &m).as_deref(),
            Some("/fixed?x")
        );
    }

    #[test]
    fn regex_rewrite_works_on_the_path_only() {
        let (f, m) = forward(
            json!({"prefix": "/"}),
            json!({"cluster": "c", "regex_rewrite": {
                "pattern": {"regex": "^/service/([^/]+)(/.*)$"}, "substitution": "\\2/instance/\\1"}}),
        );
        assert_eq!(
            rewrite_path("/service/foo/v1/api?service=/service/x/y", &f, &m).as_deref(),
            Some("/v1/api/instance/foo?service=/service/x/y")
        );
        let (f, m) = forward(
            json!({"prefix": "/"}),
            json!({"cluster": "c", "regex_rewrite": {"pattern": {"regex": "a"}, "substitution": "b"}}),
        );
        assert_eq!(
            rewrite_path("/aaa?a=a", &f, &m).as_deref(),
            Some("/bbb?a=a")
        );
        // No rewrite configured: unchanged.
        let (f, m) = forward(json!({"prefix": "/"}), json!({"cluster": "c"}));
        assert_eq!(rewrite_path("/x?y", &f, &m), None);
    }

    // ---- host rewrites ----

    fn parts(uri: &str, list: &[(&'static str, &'static str)]) -> Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in list {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    fn host_rewrite(action: Json) -> (HostRewrite, bool) {
        let mut a = json!({"cluster": "c"});
        if let (Some(o), Some(extra)) = (a.as_object_mut(), action.as_object()) {
            o.extend(extra.clone());
        }
        let (f, _) = forward(json!({"prefix": "/"}), a);
        (
            f.host_rewrite.clone().expect("host rewrite"),
            f.append_x_forwarded_host,
        )
    }

    #[test]
    fn host_rewrite_literal_with_x_forwarded_host() {
        let (rw, xfh) = host_rewrite(json!({"host_rewrite_literal": "backend.internal",
                                            "append_x_forwarded_host": true}));
        assert!(xfh);
        let mut p = parts("/a", &[("host", "front.example:8080")]);
        assert!(rewrite_host(&mut p, &rw, None, xfh));
        assert_eq!(one(&p.headers, "host").as_deref(), Some("backend.internal"));
        assert_eq!(one(&p.headers, XFH).as_deref(), Some("front.example:8080"));
        // Appending twice the same original does not repeat it.
        let mut p = parts(
            "/a",
            &[("host", "front"), ("x-forwarded-host", "edge,front")],
        );
        assert!(rewrite_host(&mut p, &rw, None, true));
        assert_eq!(all(&p.headers, XFH), vec!["edge,front"]);
        let mut p = parts("/a", &[("host", "front"), ("x-forwarded-host", "edge")]);
        assert!(rewrite_host(&mut p, &rw, None, true));
        assert_eq!(all(&p.headers, XFH), vec!["edge,front"]);
        // Without the flag, no x-forwarded-host.
        let mut p = parts("/a", &[("host", "front")]);
        assert!(rewrite_host(&mut p, &rw, None, false));
        assert!(!p.headers.contains_key(XFH));
    }

    #[test]
    fn host_rewrite_updates_an_h2_authority() {
        let (rw, _) = host_rewrite(json!({"host_rewrite_literal": "b.internal:81"}));
        let mut p = parts("http://a.example/x?y", &[]);
        assert!(rewrite_host(&mut p, &rw, None, false));
        assert_eq!(p.uri.to_string(), "http://b.internal:81/x?y");
        assert!(
            !p.headers.contains_key("host"),
            "no Host added to an HTTP/2 request"
        );
        // An invalid host leaves the request alone.
        let mut p = parts("/x", &[("host", "a")]);
        assert!(!update_authority(&mut p, "bad host", true));
        assert_eq!(one(&p.headers, "host").as_deref(), Some("a"));
        assert!(!p.headers.contains_key(XFH));
    }

    #[test]
    fn host_rewrite_header_auto_and_path_regex() {
        let (rw, _) = host_rewrite(json!({"host_rewrite_header": "x-target"}));
        let mut p = parts("/a", &[("host", "h"), ("x-target", "t.internal")]);
        assert!(rewrite_host(&mut p, &rw, None, false));
        assert_eq!(one(&p.headers, "host").as_deref(), Some("t.internal"));
        let mut p = parts("/a", &[("host", "h")]);
        assert!(
            !rewrite_host(&mut p, &rw, None, false),
            "absent header: no rewrite"
        );
        let mut p = parts("/a", &[("host", "h"), ("x-target", "")]);
        assert!(
            !rewrite_host(&mut p, &rw, None, false),
            "empty header: no rewrite"
        );

        let (rw, _) = host_rewrite(json!({"auto_host_rewrite": true}));
        assert!(matches!(rw, HostRewrite::Auto));
        let mut p = parts("/a", &[("host", "h")]);
        assert!(!rewrite_host(&mut p, &rw, None, false));
        assert!(rewrite_host(&mut p, &rw, Some("pod-1.svc"), false));
        assert_eq!(one(&p.headers, "host").as_deref(), Some("pod-1.svc"));

        let (rw, _) = host_rewrite(json!({"host_rewrite_path_regex": {
            "pattern": {"regex": "^/prefix/(.+)/suffix$"}, "substitution": "\\1"}}));
        let mut p = parts("/prefix/api.example.com/suffix?q=1", &[("host", "h")]);
        assert!(rewrite_host(&mut p, &rw, None, false));
        assert_eq!(one(&p.headers, "host").as_deref(), Some("api.example.com"));
        assert_eq!(
            rewritten_host(&rw, &p, "/prefix/x.y/suffix", None).as_deref(),
            Some("x.y")
        );
    }

    // ---- redirects ----

    fn location(m: Json, action: Json, scheme: &str, host: &str, pq: &str) -> (u16, String) {
        let (rd, matcher) = redirect(m, action);
        let (status, loc) = redirect_location(&rd, scheme, host, pq, &matcher);
        (status.as_u16(), loc)
    }

    #[test]
    fn https_redirect_drops_the_default_port() {
        let any = json!({"prefix": "/"});
        assert_eq!(
            location(
                any.clone(),
                json!({"https_redirect": true}),
                "http",
                "a.com",
                "/x?y"
            ),
            (301, "https://a.com/x?y".into())
        );
        assert_eq!(
            location(
                any.clone(),
                json!({"https_redirect": true}),
                "http",
                "a.com:80",
                "/x"
            ),
            (301, "https://a.com/x".into())
        );
        // A non-default port stays.
        assert_eq!(
            location(
                any.clone(),
                json!({"https_redirect": true}),
                "http",
                "a.com:8080",
                "/x"
            ),
            (301, "https://a.com:8080/x".into())
        );
        // Same scheme: the port stays.
        assert_eq!(
            location(
                any.clone(),
                json!({"https_redirect": true}),
                "https",
                "a.com:443",
                "/"
            ),
            (301, "https://a.com:443/".into())
        );
        assert_eq!(
            location(
                any.clone(),
                json!({"scheme_redirect": "http"}),
                "https",
                "[::1]:443",
                "/"
            ),
            (301, "http://[::1]/".into())
        );
        // No scheme change: the request's scheme.
        assert_eq!(
            location(
                any,
                json!({"host_redirect": "b.com"}),
                "https",
                "a.com:443",
                "/p"
            ),
            (301, "https://b.com/p".into())
        );
    }

    #[test]
    fn host_and_port_redirects() {
        let any = json!({"prefix": "/"});
        assert_eq!(
            location(
                any.clone(),
                json!({"port_redirect": 8443}),
                "http",
                "a.com:8080",
                "/p?q"
            ),
            (301, "http://a.com:8443/p?q".into())
        );
        assert_eq!(
            location(
                any,
                json!({"host_redirect": "b.com", "port_redirect": 9000, "response_code": "FOUND"}),
                "http",
                "a.com:8080",
                "/p"
            ),
            (302, "http://b.com:9000/p".into())
        );
    }

    #[test]
    fn path_redirects_and_query_handling() {
        let any = json!({"prefix": "/"});
        // path_redirect keeps the request's query…
        assert_eq!(
            location(
                any.clone(),
                json!({"path_redirect": "/new"}),
                "http",
                "a",
                "/old?q=1"
            )
            .1,
            "http://a/new?q=1"
        );
        // …unless it has its own, which strip_query does not remove.
        assert_eq!(
            location(
                any.clone(),
                json!({"path_redirect": "/new?v=2", "strip_query": true}),
                "http",
                "a",
                "/old?q=1"
            )
            .1,
            "http://a/new?v=2"
        );
        assert_eq!(
            location(
                any.clone(),
                json!({"strip_query": true}),
                "http",
                "a",
                "/keep?q=1"
            )
            .1,
            "http://a/keep"
        );
        assert_eq!(
            location(
                json!({"prefix": "/old"}),
                json!({"prefix_rewrite": "/new", "response_code": "TEMPORARY_REDIRECT"}),
                "http",
                "a",
                "/old/x?q"
            ),
            (307, "http://a/new/x?q".into())
        );
        assert_eq!(
            location(
                any.clone(),
                json!({"regex_rewrite": {"pattern": {"regex": "^/v1/(.*)$"}, "substitution": "/v2/\\1"},
                       "response_code": "PERMANENT_REDIRECT"}),
                "http",
                "a",
                "/v1/x?v1=1"
            ),
            (308, "http://a/v2/x?v1=1".into())
        );
        // A relative path_redirect gets its leading slash.
        assert_eq!(
            location(
                any.clone(),
                json!({"path_redirect": "rel"}),
                "http",
                "a",
                "/x"
            )
            .1,
            "http://a/rel"
        );
        assert_eq!(
            location(
                any,
                json!({"response_code": "SEE_OTHER"}),
                "http",
                "a",
                "/x#frag"
            ),
            (303, "http://a/x".into())
        );
    }

    // ---- server header ----

    #[test]
    fn server_header_transformations() {
        let mut h = headers(&[("server", "upstream")]);
        server_header(&mut h, ServerHeader::Overwrite, "istio-envoy");
        assert_eq!(one(&h, "server").as_deref(), Some("istio-envoy"));
        let mut h = headers(&[("server", "upstream")]);
        server_header(&mut h, ServerHeader::AppendIfAbsent, "istio-envoy");
        assert_eq!(one(&h, "server").as_deref(), Some("upstream"));
        let mut h = HeaderMap::new();
        server_header(&mut h, ServerHeader::AppendIfAbsent, "istio-envoy");
        assert_eq!(one(&h, "server").as_deref(), Some("istio-envoy"));
        let mut h = HeaderMap::new();
        server_header(&mut h, ServerHeader::PassThrough, "istio-envoy");
        assert!(!h.contains_key("server"));
        let mut h = headers(&[("server", "upstream")]);
        server_header(&mut h, ServerHeader::PassThrough, "istio-envoy");
        assert_eq!(one(&h, "server").as_deref(), Some("upstream"));
    }
}
