//! Compiled value matchers shared by routes, RBAC, JWT rules and TLS: string matchers (with regexes
//! compiled once by the `regex` crate, whose syntax is RE2's), header and query-parameter matchers,
//! IP ranges, metadata matchers and fractional percents.

use std::{cell::RefCell, collections::HashMap, net::IpAddr};

use regex::Regex;
use waypoint_proto::envoy::{
    config::{
        core::v3::RuntimeFractionalPercent,
        route::v3::{
            HeaderMatcher, QueryParameterMatcher, header_matcher::HeaderMatchSpecifier,
            query_parameter_matcher::QueryParameterMatchSpecifier,
        },
    },
    r#type::{
        matcher::v3::{
            MetadataMatcher, RegexMatchAndSubstitute, RegexMatcher, StringMatcher, ValueMatcher,
            metadata_matcher::path_segment::Segment, string_matcher::MatchPattern,
            value_matcher::MatchPattern as ValuePattern,
        },
        v3::{FractionalPercent, fractional_percent::DenominatorType},
    },
};

use super::{CompileResult, ConfigError, field, index};

thread_local! {
    /// Full-match regexes compiled inside the current [`share_regexes`] scope, by pattern.
    static SHARED_REGEXES: RefCell<Option<HashMap<String, Regex>>> = const { RefCell::new(None) };
}

#[cfg(test)]
thread_local! {
    static COMPILED_REGEXES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Full-match regexes compiled on this thread so far (tests of [`share_regexes`]).
#[cfg(test)]
pub(crate) fn compiled_regexes() -> usize {
    COMPILED_REGEXES.with(|c| c.get())
}

/// Ends a [`share_regexes`] scope, also when the compile inside it panics.
struct SharedRegexScope;

impl Drop for SharedRegexScope {
    fn drop(&mut self) {
        SHARED_REGEXES.with(|s| s.borrow_mut().take());
    }
}

/// Runs `f` (a compile) with identical full-match regexes compiled once: a `Regex` clone shares the
/// compiled automaton, so a pattern repeated on thousands of routes costs one compile and one
/// program. Nested scopes join the outermost one.
pub fn share_regexes<R>(f: impl FnOnce() -> R) -> R {
    let outermost = SHARED_REGEXES.with(|s| {
        let mut s = s.borrow_mut();
        let fresh = s.is_none();
        if fresh {
            *s = Some(HashMap::new());
        }
        fresh
    });
    let _scope = outermost.then_some(SharedRegexScope);
    f()
}

/// Envoy's safe_regex matches the whole input (RE2 `FullMatch`).
pub fn full_regex(pattern: &str, path: &str) -> CompileResult<Regex> {
    let shared = SHARED_REGEXES.with(|s| s.borrow().as_ref().and_then(|m| m.get(pattern).cloned()));
    if let Some(re) = shared {
        return Ok(re);
    }
    let re = Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| ConfigError::new(path, format!("invalid regex '{pattern}': {e}")))?;
    #[cfg(test)]
    COMPILED_REGEXES.with(|c| c.set(c.get() + 1));
    SHARED_REGEXES.with(|s| {
        if let Some(m) = s.borrow_mut().as_mut() {
            m.insert(pattern.to_owned(), re.clone());
        }
    });
    Ok(re)
}

/// A regex used for searching and substitution (not anchored).
pub fn search_regex(pattern: &str, path: &str) -> CompileResult<Regex> {
    Regex::new(pattern)
        .map_err(|e| ConfigError::new(path, format!("invalid regex '{pattern}': {e}")))
}

/// A compiled `RegexMatcher` (full match).
pub fn regex_matcher(m: &RegexMatcher, path: &str) -> CompileResult<Regex> {
    full_regex(&m.regex, &field(path, "regex"))
}

/// A compiled `RegexMatchAndSubstitute`.
#[derive(Debug, Clone)]
pub struct RegexRewrite {
    /// The pattern (every match is replaced).
    pub pattern: Regex,
    /// The replacement; `\1`-style group references are translated to the regex crate's `${1}`.
    pub substitution: String,
}

impl RegexRewrite {
    /// Compiles `m`.
    pub fn compile(m: &RegexMatchAndSubstitute, path: &str) -> CompileResult<Self> {
        let pattern = m
            .pattern
            .as_ref()
            .ok_or_else(|| ConfigError::new(field(path, "pattern"), "pattern is required"))?;
        Ok(RegexRewrite {
            pattern: search_regex(&pattern.regex, &field(&field(path, "pattern"), "regex"))?,
            substitution: translate_substitution(&m.substitution),
        })
    }

    /// Applies the rewrite to `input`.
    pub fn apply(&self, input: &str) -> String {
        self.pattern
            .replace_all(input, self.substitution.as_str())
            .into_owned()
    }
}

/// RE2 substitutions use `\N`; the regex crate uses `${N}` (and `$` must be escaped as `$$`).
fn translate_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.peek() {
                Some(d) if d.is_ascii_digit() => {
                    out.push_str(&format!("${{{d}}}"));
                    chars.next();
                }
                Some('\\') => {
                    out.push('\\');
                    chars.next();
                }
                _ => out.push('\\'),
            },
            '$' => out.push_str("$$"),
            other => out.push(other),
        }
    }
    out
}

/// The pattern of a string matcher.
#[derive(Debug, Clone)]
pub enum StringPattern {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Ends with.
    Suffix(String),
    /// Contains.
    Contains(String),
    /// Matches the whole value.
    Regex(Regex),
}

/// A compiled `envoy.type.matcher.v3.StringMatcher`.
#[derive(Debug, Clone)]
pub struct StringMatch {
    /// What to look for.
    pub pattern: StringPattern,
    /// ASCII case-insensitive (not for regexes, as in Envoy).
    pub ignore_case: bool,
}

impl StringMatch {
    /// Compiles `m`.
    pub fn compile(m: &StringMatcher, path: &str) -> CompileResult<Self> {
        let lower = |s: &str| {
            if m.ignore_case {
                s.to_ascii_lowercase()
            } else {
                s.to_owned()
            }
        };
        let pattern = match &m.match_pattern {
            Some(MatchPattern::Exact(s)) => StringPattern::Exact(lower(s)),
            Some(MatchPattern::Prefix(s)) => StringPattern::Prefix(lower(s)),
            Some(MatchPattern::Suffix(s)) => StringPattern::Suffix(lower(s)),
            Some(MatchPattern::Contains(s)) => StringPattern::Contains(lower(s)),
            Some(MatchPattern::SafeRegex(r)) => {
                StringPattern::Regex(regex_matcher(r, &field(path, "safe_regex"))?)
            }
            Some(MatchPattern::Custom(_)) => {
                return Err(ConfigError::new(
                    field(path, "custom"),
                    "custom string matchers are not supported",
                ));
            }
            None => {
                return Err(ConfigError::new(
                    path,
                    "a string matcher needs exact, prefix, suffix, contains or safe_regex",
                ));
            }
        };
        Ok(StringMatch {
            pattern,
            ignore_case: m.ignore_case,
        })
    }

    /// An exact matcher (for tests and synthesized rules).
    pub fn exact(s: &str) -> Self {
        StringMatch {
            pattern: StringPattern::Exact(s.to_owned()),
            ignore_case: false,
        }
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        let owned;
        let v = if self.ignore_case && !matches!(self.pattern, StringPattern::Regex(_)) {
            owned = value.to_ascii_lowercase();
            owned.as_str()
        } else {
            value
        };
        match &self.pattern {
            StringPattern::Exact(s) => v == s,
            StringPattern::Prefix(s) => v.starts_with(s.as_str()),
            StringPattern::Suffix(s) => v.ends_with(s.as_str()),
            StringPattern::Contains(s) => v.contains(s.as_str()),
            StringPattern::Regex(r) => r.is_match(v),
        }
    }
}

/// Compiles a list of string matchers under `path.name[i]`.
pub fn string_matches(
    list: &[StringMatcher],
    path: &str,
    name: &str,
) -> CompileResult<Vec<StringMatch>> {
    list.iter()
        .enumerate()
        .map(|(i, m)| StringMatch::compile(m, &index(path, name, i)))
        .collect()
}

/// A header (or pseudo-header) name: lowercase token characters, optionally a leading `:`.
pub fn header_name(name: &str, path: &str) -> CompileResult<String> {
    let body = name.strip_prefix(':').unwrap_or(name);
    if body.is_empty()
        || !body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    {
        return Err(ConfigError::new(
            path,
            format!("'{name}' is not a valid header name"),
        ));
    }
    Ok(name.to_ascii_lowercase())
}

/// What a header matcher checks.
#[derive(Debug, Clone)]
pub enum HeaderRule {
    /// Present (true) or absent (false).
    Present(bool),
    /// The value parses as an integer in `[start, end)`.
    Range {
        /// Inclusive start.
        start: i64,
        /// Exclusive end.
        end: i64,
    },
    /// The value matches.
    Value(StringMatch),
}

/// A compiled `envoy.config.route.v3.HeaderMatcher`.
#[derive(Debug, Clone)]
pub struct HeaderMatch {
    /// Lower-case header name.
    pub name: String,
    /// The check.
    pub rule: HeaderRule,
    /// Negate the result.
    pub invert: bool,
    /// A missing header is matched as the empty string.
    pub treat_missing_as_empty: bool,
}

impl HeaderMatch {
    /// Compiles `m`.
    // Deprecated forms are honoured: Istio and older control planes still send them.
    #[allow(deprecated)]
    pub fn compile(m: &HeaderMatcher, path: &str) -> CompileResult<Self> {
        let string = |pattern| {
            HeaderRule::Value(StringMatch {
                pattern,
                ignore_case: false,
            })
        };
        let rule = match &m.header_match_specifier {
            None => HeaderRule::Present(true),
            Some(HeaderMatchSpecifier::ExactMatch(s)) => string(StringPattern::Exact(s.clone())),
            Some(HeaderMatchSpecifier::PrefixMatch(s)) => string(StringPattern::Prefix(s.clone())),
            Some(HeaderMatchSpecifier::SuffixMatch(s)) => string(StringPattern::Suffix(s.clone())),
            Some(HeaderMatchSpecifier::ContainsMatch(s)) => {
                string(StringPattern::Contains(s.clone()))
            }
            Some(HeaderMatchSpecifier::SafeRegexMatch(r)) => string(StringPattern::Regex(
                regex_matcher(r, &field(path, "safe_regex_match"))?,
            )),
            Some(HeaderMatchSpecifier::RangeMatch(r)) => {
                if r.start >= r.end {
                    return Err(ConfigError::new(
                        field(path, "range_match"),
                        format!("empty range [{}, {})", r.start, r.end),
                    ));
                }
                HeaderRule::Range {
                    start: r.start,
                    end: r.end,
                }
            }
            Some(HeaderMatchSpecifier::PresentMatch(p)) => HeaderRule::Present(*p),
            Some(HeaderMatchSpecifier::StringMatch(s)) => {
                HeaderRule::Value(StringMatch::compile(s, &field(path, "string_match"))?)
            }
        };
        Ok(HeaderMatch {
            name: header_name(&m.name, &field(path, "name"))?,
            rule,
            invert: m.invert_match,
            treat_missing_as_empty: m.treat_missing_header_as_empty,
        })
    }

    /// Whether a header with this value (None: absent; several values joined by `,`) matches.
    pub fn matches(&self, value: Option<&str>) -> bool {
        let value = match value {
            None if self.treat_missing_as_empty => Some(""),
            v => v,
        };
        let hit = match (&self.rule, value) {
            (HeaderRule::Present(want), v) => v.is_some() == *want,
            (_, None) => return false,
            (HeaderRule::Range { start, end }, Some(v)) => v
                .trim()
                .parse::<i64>()
                .is_ok_and(|n| n >= *start && n < *end),
            (HeaderRule::Value(m), Some(v)) => m.matches(v),
        };
        hit != self.invert
    }
}

/// Compiles a list of header matchers under `path.name[i]`.
pub fn header_matches(
    list: &[HeaderMatcher],
    path: &str,
    name: &str,
) -> CompileResult<Vec<HeaderMatch>> {
    list.iter()
        .enumerate()
        .map(|(i, m)| HeaderMatch::compile(m, &index(path, name, i)))
        .collect()
}

/// A compiled `QueryParameterMatcher`.
#[derive(Debug, Clone)]
pub struct QueryMatch {
    /// Parameter name.
    pub name: String,
    /// `None`: present; else the value must match.
    pub value: Option<StringMatch>,
}

impl QueryMatch {
    /// Compiles `m`.
    pub fn compile(m: &QueryParameterMatcher, path: &str) -> CompileResult<Self> {
        if m.name.is_empty() {
            return Err(ConfigError::new(field(path, "name"), "name is required"));
        }
        let value = match &m.query_parameter_match_specifier {
            Some(QueryParameterMatchSpecifier::StringMatch(s)) => {
                Some(StringMatch::compile(s, &field(path, "string_match"))?)
            }
            Some(QueryParameterMatchSpecifier::PresentMatch(_)) | None => None,
        };
        Ok(QueryMatch {
            name: m.name.clone(),
            value,
        })
    }
}

/// An IP range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The network address (host bits cleared).
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
}

impl Cidr {
    /// Parses `address_prefix` / `prefix_len` (unset length is 0, as in Envoy).
    pub fn parse(prefix: &str, len: Option<u32>, path: &str) -> CompileResult<Self> {
        let addr: IpAddr = prefix.parse().map_err(|_| {
            ConfigError::new(
                field(path, "address_prefix"),
                format!("'{prefix}' is not an IP address"),
            )
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = len.unwrap_or(0);
        if len > max {
            return Err(ConfigError::new(
                field(path, "prefix_len"),
                format!("prefix length {len} exceeds {max} for {addr}"),
            ));
        }
        let len = len as u8;
        Ok(Cidr {
            addr: mask(addr, len),
            len,
        })
    }

    /// A single address (/32 or /128).
    pub fn host(addr: IpAddr) -> Self {
        Cidr {
            addr,
            len: if addr.is_ipv4() { 32 } else { 128 },
        }
    }

    /// Whether `ip` is inside the range (v4 and v6 never mix).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                mask(ip, self.len) == self.addr
            }
            _ => false,
        }
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            IpAddr::V6((bits & m).into())
        }
    }
}

/// A compiled `envoy.config.core.v3.CidrRange`.
pub fn cidr(
    range: &waypoint_proto::envoy::config::core::v3::CidrRange,
    path: &str,
) -> CompileResult<Cidr> {
    Cidr::parse(
        &range.address_prefix,
        range.prefix_len.as_ref().map(|v| v.value),
        path,
    )
}

/// Compiles a list of ranges under `path.name[i]`.
pub fn cidrs(
    list: &[waypoint_proto::envoy::config::core::v3::CidrRange],
    path: &str,
    name: &str,
) -> CompileResult<Vec<Cidr>> {
    list.iter()
        .enumerate()
        .map(|(i, r)| cidr(r, &index(path, name, i)))
        .collect()
}

/// A probability as numerator / denominator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fraction {
    /// Numerator (clamped to the denominator when used).
    pub numerator: u32,
    /// 100, 10 000 or 1 000 000.
    pub denominator: u32,
}

impl Fraction {
    /// Always.
    pub const ALWAYS: Fraction = Fraction {
        numerator: 100,
        denominator: 100,
    };

    /// Compiles a `FractionalPercent`.
    pub fn compile(p: &FractionalPercent) -> Self {
        let denominator = match DenominatorType::try_from(p.denominator) {
            Ok(DenominatorType::TenThousand) => 10_000,
            Ok(DenominatorType::Million) => 1_000_000,
            _ => 100,
        };
        Fraction {
            numerator: p.numerator.min(denominator),
            denominator,
        }
    }

    /// The default value of a `RuntimeFractionalPercent` (there is no runtime layer); unset
    /// default means 0%, as in Envoy.
    pub fn runtime(p: &RuntimeFractionalPercent) -> Self {
        p.default_value
            .as_ref()
            .map(Fraction::compile)
            .unwrap_or(Fraction {
                numerator: 0,
                denominator: 100,
            })
    }

    /// Whether a uniformly random `draw` in `[0, denominator)` falls inside.
    pub fn hit(&self, draw: u32) -> bool {
        draw < self.numerator
    }

    /// Whether a uniformly random `random` (any `u64`) falls inside: the draw is `random` modulo
    /// the denominator, as Envoy's `featureEnabled` takes it.
    pub fn sample(&self, random: u64) -> bool {
        self.denominator > 0 && self.hit((random % u64::from(self.denominator)) as u32)
    }
}

/// What a metadata value must look like.
#[derive(Debug, Clone)]
pub enum ValueMatch {
    /// Null.
    Null,
    /// A number equal to.
    DoubleExact(f64),
    /// A number in `[start, end)`.
    DoubleRange(f64, f64),
    /// A string that matches.
    String(StringMatch),
    /// A bool equal to.
    Bool(bool),
    /// Present at all.
    Present(bool),
    /// A list with an element that matches.
    ListOneOf(Box<ValueMatch>),
    /// Any of (`or_match`; istiod uses it for `request.auth.claims[...]`).
    Or(Vec<ValueMatch>),
}

impl ValueMatch {
    /// Compiles `m`.
    pub fn compile(m: &ValueMatcher, path: &str) -> CompileResult<Self> {
        use waypoint_proto::envoy::r#type::matcher::v3::double_matcher::MatchPattern as D;
        Ok(match &m.match_pattern {
            Some(ValuePattern::NullMatch(_)) => ValueMatch::Null,
            Some(ValuePattern::DoubleMatch(d)) => match &d.match_pattern {
                Some(D::Exact(x)) => ValueMatch::DoubleExact(*x),
                Some(D::Range(r)) => ValueMatch::DoubleRange(r.start, r.end),
                None => {
                    return Err(ConfigError::new(
                        field(path, "double_match"),
                        "exact or range is required",
                    ));
                }
            },
            Some(ValuePattern::StringMatch(s)) => {
                ValueMatch::String(StringMatch::compile(s, &field(path, "string_match"))?)
            }
            Some(ValuePattern::BoolMatch(b)) => ValueMatch::Bool(*b),
            Some(ValuePattern::PresentMatch(p)) => ValueMatch::Present(*p),
            Some(ValuePattern::ListMatch(l)) => {
                use waypoint_proto::envoy::r#type::matcher::v3::list_matcher::MatchPattern as L;
                match &l.match_pattern {
                    Some(L::OneOf(v)) => ValueMatch::ListOneOf(Box::new(ValueMatch::compile(
                        v,
                        &field(&field(path, "list_match"), "one_of"),
                    )?)),
                    None => {
                        return Err(ConfigError::new(
                            field(path, "list_match"),
                            "one_of is required",
                        ));
                    }
                }
            }
            Some(ValuePattern::OrMatch(o)) => {
                let opath = field(path, "or_match");
                if o.value_matchers.len() < 2 {
                    return Err(ConfigError::new(
                        field(&opath, "value_matchers"),
                        "at least two value matchers are required",
                    ));
                }
                ValueMatch::Or(
                    o.value_matchers
                        .iter()
                        .enumerate()
                        .map(|(i, v)| ValueMatch::compile(v, &index(&opath, "value_matchers", i)))
                        .collect::<CompileResult<_>>()?,
                )
            }
            None => return Err(ConfigError::new(path, "a value matcher is required")),
        })
    }
}

/// A compiled `MetadataMatcher`: dynamic metadata `filter` at `path` must match `value`.
#[derive(Debug, Clone)]
pub struct MetadataMatch {
    /// The metadata namespace (filter name).
    pub filter: String,
    /// Keys into nested Structs.
    pub path: Vec<String>,
    /// The check.
    pub value: ValueMatch,
    /// Negate.
    pub invert: bool,
}

impl MetadataMatch {
    /// Compiles `m`.
    pub fn compile(m: &MetadataMatcher, path: &str) -> CompileResult<Self> {
        if m.filter.is_empty() {
            return Err(ConfigError::new(
                field(path, "filter"),
                "filter is required",
            ));
        }
        let keys = m
            .path
            .iter()
            .enumerate()
            .map(|(i, s)| match &s.segment {
                Some(Segment::Key(k)) => Ok(k.clone()),
                None => Err(ConfigError::new(
                    index(path, "path", i),
                    "a path segment needs a key",
                )),
            })
            .collect::<CompileResult<Vec<_>>>()?;
        if keys.is_empty() {
            return Err(ConfigError::new(field(path, "path"), "path is required"));
        }
        let value = m
            .value
            .as_ref()
            .ok_or_else(|| ConfigError::new(field(path, "value"), "value is required"))?;
        Ok(MetadataMatch {
            filter: m.filter.clone(),
            path: keys,
            value: ValueMatch::compile(value, &field(path, "value"))?,
            invert: m.invert,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_matchers_follow_envoy() {
        let m = StringMatch::compile(
            &StringMatcher {
                match_pattern: Some(MatchPattern::Prefix("/API".into())),
                ignore_case: true,
            },
            "m",
        )
        .expect("compiles");
        assert!(m.matches("/api/v1"));
        let r = StringMatch::compile(
            &StringMatcher {
                match_pattern: Some(MatchPattern::SafeRegex(RegexMatcher {
                    regex: "a+".into(),
                    ..Default::default()
                })),
                ignore_case: false,
            },
            "m",
        )
        .expect("compiles");
        assert!(r.matches("aaa"));
        assert!(!r.matches("aaab"), "safe_regex is a full match");
    }

    #[test]
    fn bad_regex_names_the_path() {
        let err = full_regex("a(", "match.safe_regex.regex").expect_err("bad");
        assert!(
            err.to_string()
                .starts_with("match.safe_regex.regex: invalid regex 'a('"),
            "{err}"
        );
    }

    #[test]
    fn regex_rewrite_translates_group_references() {
        let rw = RegexRewrite::compile(
            &RegexMatchAndSubstitute {
                pattern: Some(RegexMatcher {
                    regex: "^/service/([^/]+)(/.*)$".into(),
                    ..Default::default()
                }),
                substitution: "\\2/instance/\\1".into(),
            },
            "r",
        )
        .expect("compiles");
        assert_eq!(rw.apply("/service/foo/v1/api"), "/v1/api/instance/foo");
    }

    #[test]
    fn cidr_parses_masks_and_contains() {
        let c = Cidr::parse("10.96.0.100", Some(24), "r").expect("parses");
        assert_eq!(c.addr, "10.96.0.0".parse::<IpAddr>().expect("ip"));
        assert!(c.contains("10.96.0.7".parse().expect("ip")));
        assert!(!c.contains("10.96.1.7".parse().expect("ip")));
        assert!(!c.contains("::1".parse().expect("ip")));
        let err = Cidr::parse("10.0.0.300", Some(32), "ranges[0]").expect_err("bad ip");
        assert_eq!(
            err.to_string(),
            "ranges[0].address_prefix: '10.0.0.300' is not an IP address"
        );
        let err = Cidr::parse("10.0.0.1", Some(33), "ranges[0]").expect_err("bad len");
        assert!(
            err.to_string().starts_with("ranges[0].prefix_len:"),
            "{err}"
        );
    }

    #[test]
    fn header_range_and_invert() {
        let m = HeaderMatch {
            name: "x".into(),
            rule: HeaderRule::Range { start: 1, end: 10 },
            invert: true,
            treat_missing_as_empty: false,
        };
        assert!(!m.matches(Some("5")));
        assert!(m.matches(Some("10")));
        assert!(!m.matches(None));
    }
}
