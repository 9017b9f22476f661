//! Route hash policies (`RouteAction.hash_policy`): what a ring hash or Maglev cluster hashes for
//! one request, compiled once. A cookie policy with a `ttl` also carries the `Set-Cookie` the
//! router sends when the request lacks the cookie (Envoy's `CookieHashMethod` and the router's
//! `addDownstreamSetCookie`): `name="<value>"; Max-Age=<ttl s>; Path=<path>; <attributes>;
//! HttpOnly`, with no `Max-Age` for a zero ttl (a session cookie).

use std::fmt::Write as _;

use http::HeaderValue;
use waypoint_proto::envoy::config::route::v3::route_action::{
    HashPolicy as RawHashPolicy, hash_policy::Cookie as RawCookie, hash_policy::PolicySpecifier,
};

use crate::config::{
    CompileResult, ConfigError, duration, field, index,
    matchers::{RegexRewrite, header_name},
};

/// What one hash policy hashes.
#[derive(Debug, Clone)]
pub enum HashKind {
    /// A header value, optionally rewritten.
    Header {
        /// Lower-case header name.
        name: String,
        /// `regex_rewrite`.
        rewrite: Option<RegexRewrite>,
    },
    /// A cookie (generated when absent and a ttl is set).
    Cookie(CookiePolicy),
    /// The downstream source IP.
    SourceIp,
    /// A query parameter.
    QueryParameter(String),
    /// A filter state object.
    FilterState(String),
}

/// A hash policy entry.
#[derive(Debug, Clone)]
pub struct HashPolicy {
    /// What is hashed.
    pub kind: HashKind,
    /// `terminal`: once a hash exists after this policy, later policies are skipped.
    pub terminal: bool,
}

/// `HashPolicy.Cookie`.
#[derive(Debug, Clone)]
pub struct CookiePolicy {
    /// Cookie name.
    pub name: String,
    /// `ttl` in whole seconds (Envoy keeps only the seconds); `None` when unset, and then a
    /// request without the cookie produces no hash and no cookie.
    pub ttl_seconds: Option<u64>,
    /// What follows the value in a generated `Set-Cookie`, built once.
    tail: String,
}

impl CookiePolicy {
    /// Compiles `c` (at `path`, the `cookie` field).
    pub fn compile(c: &RawCookie, path: &str) -> CompileResult<Self> {
        if c.name.is_empty() {
            return Err(ConfigError::new(field(path, "name"), "name is required"));
        }
        let ttl_seconds = c
            .ttl
            .as_ref()
            .map(|d| duration(d, &field(path, "ttl")).map(|d| d.as_secs()))
            .transpose()?;
        // Envoy's `makeSetCookieValue`: Max-Age unless zero, Path when set, the attributes in
        // order (`name` alone when the value is empty), HttpOnly last.
        let mut tail = String::new();
        if let Some(s) = ttl_seconds.filter(|s| *s != 0) {
            let _ = write!(tail, "; Max-Age={s}");
        }
        if !c.path.is_empty() {
            let _ = write!(tail, "; Path={}", c.path);
        }
        for (i, a) in c.attributes.iter().enumerate() {
            if a.name.is_empty() {
                return Err(ConfigError::new(
                    field(&index(path, "attributes", i), "name"),
                    "name is required",
                ));
            }
            if a.value.is_empty() {
                let _ = write!(tail, "; {}", a.name);
            } else {
                let _ = write!(tail, "; {}={}", a.name, a.value);
            }
        }
        tail.push_str("; HttpOnly");
        let policy = CookiePolicy {
            name: c.name.clone(),
            ttl_seconds,
            tail,
        };
        // Generated values are 16 hex digits; what else goes into the header is config, so a
        // character a header cannot carry (CR, LF, NUL, …) is refused here, not per request.
        if ttl_seconds.is_some() && policy.set_cookie("0123456789abcdef").is_none() {
            return Err(ConfigError::new(
                path,
                "name, path and attributes must be valid in a Set-Cookie header",
            ));
        }
        Ok(policy)
    }

    /// The `Set-Cookie` value giving this cookie `value`.
    pub fn set_cookie(&self, value: &str) -> Option<HeaderValue> {
        HeaderValue::from_str(&format!("{}=\"{value}\"{}", self.name, self.tail)).ok()
    }
}

/// Compiles `RouteAction.hash_policy` (`path` is the route action's).
pub fn compile(policies: &[RawHashPolicy], path: &str) -> CompileResult<Vec<HashPolicy>> {
    policies
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let hpath = index(path, "hash_policy", i);
            let kind = match &h.policy_specifier {
                Some(PolicySpecifier::Header(x)) => {
                    let xpath = field(&hpath, "header");
                    HashKind::Header {
                        name: header_name(&x.header_name, &field(&xpath, "header_name"))?,
                        rewrite: x
                            .regex_rewrite
                            .as_ref()
                            .map(|r| RegexRewrite::compile(r, &field(&xpath, "regex_rewrite")))
                            .transpose()?,
                    }
                }
                Some(PolicySpecifier::Cookie(c)) => {
                    HashKind::Cookie(CookiePolicy::compile(c, &field(&hpath, "cookie"))?)
                }
                Some(PolicySpecifier::ConnectionProperties(c)) if c.source_ip => HashKind::SourceIp,
                Some(PolicySpecifier::QueryParameter(q)) if !q.name.is_empty() => {
                    HashKind::QueryParameter(q.name.clone())
                }
                Some(PolicySpecifier::FilterState(f)) if !f.key.is_empty() => {
                    HashKind::FilterState(f.key.clone())
                }
                _ => {
                    return Err(ConfigError::new(
                        hpath,
                        "an effective hash policy is required",
                    ));
                }
            };
            Ok(HashPolicy {
                kind,
                terminal: h.terminal,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use waypoint_proto::{
        envoy::config::route::v3::route_action::hash_policy::CookieAttribute,
        google::protobuf::Duration as PbDuration,
    };

    use super::*;

    fn cookie(ttl: Option<i64>, path: &str, attributes: &[(&str, &str)]) -> RawCookie {
        RawCookie {
            name: "sticky".into(),
            ttl: ttl.map(|seconds| PbDuration { seconds, nanos: 0 }),
            path: path.into(),
            attributes: attributes
                .iter()
                .map(|(n, v)| CookieAttribute {
                    name: (*n).into(),
                    value: (*v).into(),
                })
                .collect(),
        }
    }

    fn set_cookie(c: &RawCookie) -> String {
        let p = CookiePolicy::compile(c, "cookie").expect("compiles");
        p.set_cookie("00ff")
            .and_then(|v| v.to_str().ok().map(str::to_owned))
            .expect("valid header")
    }

    #[test]
    fn set_cookie_has_envoys_shape() {
        assert_eq!(
            set_cookie(&cookie(Some(60), "/", &[])),
            "sticky=\"00ff\"; Max-Age=60; Path=/; HttpOnly"
        );
        // A zero ttl is a session cookie: no Max-Age.
        assert_eq!(
            set_cookie(&cookie(Some(0), "", &[])),
            "sticky=\"00ff\"; HttpOnly"
        );
        assert_eq!(
            set_cookie(&cookie(
                Some(5),
                "/app",
                &[("SameSite", "Strict"), ("Secure", "")]
            )),
            "sticky=\"00ff\"; Max-Age=5; Path=/app; SameSite=Strict; Secure; HttpOnly"
        );
        // Envoy keeps whole seconds of the ttl.
        let mut half = cookie(Some(0), "", &[]);
        half.ttl = Some(PbDuration {
            seconds: 0,
            nanos: 500_000_000,
        });
        let p = CookiePolicy::compile(&half, "cookie").expect("compiles");
        assert_eq!(p.ttl_seconds, Some(0));
    }

    #[test]
    fn bad_cookie_configs_name_the_field() {
        let mut unnamed = cookie(Some(1), "", &[]);
        unnamed.name.clear();
        let e = CookiePolicy::compile(&unnamed, "hash_policy[0].cookie").expect_err("no name");
        assert!(e.to_string().contains("hash_policy[0].cookie.name"), "{e}");
        let e = CookiePolicy::compile(&cookie(Some(1), "", &[("", "x")]), "c").expect_err("attr");
        assert!(e.to_string().contains("c.attributes[0].name"), "{e}");
        let e = CookiePolicy::compile(&cookie(Some(1), "/a\r\nx: y", &[]), "c")
            .expect_err("CRLF in path");
        assert!(e.to_string().contains("Set-Cookie"), "{e}");
    }

    #[test]
    fn policies_compile_in_order_and_reject_empty_ones() {
        let raw = vec![
            RawHashPolicy {
                policy_specifier: Some(PolicySpecifier::Cookie(cookie(None, "", &[]))),
                terminal: true,
            },
            RawHashPolicy {
                policy_specifier: Some(PolicySpecifier::QueryParameter(
                    waypoint_proto::envoy::config::route::v3::route_action::hash_policy::QueryParameter {
                        name: "u".into(),
                    },
                )),
                terminal: false,
            },
        ];
        let compiled = compile(&raw, "route").expect("compiles");
        assert!(
            matches!(&compiled[0].kind, HashKind::Cookie(c) if c.name == "sticky" && c.ttl_seconds.is_none())
        );
        assert!(compiled[0].terminal);
        assert!(matches!(&compiled[1].kind, HashKind::QueryParameter(q) if q == "u"));
        let e = compile(&[RawHashPolicy::default()], "route").expect_err("empty");
        assert!(e.to_string().contains("route.hash_policy[0]"), "{e}");
    }
}
