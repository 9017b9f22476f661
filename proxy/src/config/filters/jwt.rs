//! `jwt_authn` (RequestAuthentication): providers with inline JWKS (istiod fetches and inlines
//! them) or remote ones (`remote_jwks`, with `PILOT_JWT_ENABLE_REMOTE_JWKS=envoy`), token
//! locations, claim-to-header copies and per-route requirements. An inline JWKS is parsed here,
//! once; a remote one compiles into a [`RemoteJwks`] handle whose keys the data plane fetches
//! ([`crate::http::jwks_fetch`]). [`crate::http::jwt`] verifies requests against the compiled form.

use std::{
    collections::BTreeMap,
    sync::{Arc, OnceLock},
    time::Duration,
};

use waypoint_proto::envoy::{
    config::core::v3::{RetryPolicy as CoreRetryPolicy, http_uri::HttpUpstreamType},
    extensions::filters::http::jwt_authn::v3::{
        JwtAuthentication, JwtProvider, JwtRequirement, PerRouteConfig,
        RemoteJwks as RawRemoteJwks, jwt_provider::JwksSourceSpecifier,
        jwt_requirement::RequiresType, per_route_config::RequirementSpecifier,
        requirement_rule::RequirementType,
    },
};

use crate::{
    config::{
        CompileResult, ConfigError, duration, field, index, inline_text, key,
        matchers::StringMatch, opt_duration, route::RouteMatch,
    },
    http::{
        jwks_fetch::{
            AsyncFetch, DEFAULT_CACHE_DURATION, DEFAULT_FAILED_REFETCH, FetchRetry, RemoteJwks,
            RemoteJwksConfig,
        },
        jwt::{Jwks, JwtStats},
    },
};

/// Where a provider's keys come from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    /// `local_jwks`, parsed at compile time. Without usable keys every token of the provider
    /// fails, as in Envoy.
    Local(Arc<Jwks>),
    /// `remote_jwks`: fetched from a cluster by the data plane.
    Remote(Arc<RemoteJwks>),
}

/// Where a token is looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenLocation {
    /// A header, with a value prefix (`Bearer `).
    Header {
        /// Header name (lower-case).
        name: String,
        /// Prefix before the token.
        value_prefix: String,
    },
    /// A query parameter.
    Param(String),
    /// A cookie.
    Cookie(String),
}

/// A compiled JWT provider.
#[derive(Debug, Clone)]
pub struct Provider {
    /// `issuer` (empty: any).
    pub issuer: String,
    /// `audiences` (empty: any).
    pub audiences: Vec<String>,
    /// `subjects`.
    pub subjects: Option<StringMatch>,
    /// `require_expiration`.
    pub require_expiration: bool,
    /// `max_lifetime`.
    pub max_lifetime: Option<Duration>,
    /// The keys: `local_jwks` or `remote_jwks`.
    pub jwks: JwksSource,
    /// `forward`: keep the token in the request.
    pub forward: bool,
    /// Token locations (`from_headers`, `from_params`, `from_cookies`; default: Authorization Bearer
    /// and the `access_token` parameter).
    pub locations: Vec<TokenLocation>,
    /// `forward_payload_header`.
    pub forward_payload_header: Option<String>,
    /// `pad_forward_payload_header`.
    pub pad_forward_payload_header: bool,
    /// `payload_in_metadata`: dynamic metadata key of the verified payload (read by RBAC).
    pub payload_in_metadata: Option<String>,
    /// `normalize_payload_in_metadata.space_delimited_claims`: string claims stored as word lists.
    pub space_delimited_claims: Vec<String>,
    /// `header_in_metadata`: dynamic metadata key of the verified JOSE header.
    pub header_in_metadata: Option<String>,
    /// `clock_skew_seconds` (default 60).
    pub clock_skew: Duration,
    /// `claim_to_headers`.
    pub claim_to_headers: Vec<ClaimToHeader>,
    /// `clear_route_cache`.
    pub clear_route_cache: bool,
}

/// One `claim_to_headers` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimToHeader {
    /// The header to add (lower case).
    pub header: String,
    /// Keys into the payload: `claim_name` split on `.`, or `claim_path`.
    pub path: Vec<String>,
}

/// A compiled requirement, in the shape Envoy's verifier tree takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// A token from this provider (`provider_name`), or with one of these audiences instead of
    /// the provider's (`provider_and_audiences`).
    Provider {
        /// The provider.
        name: String,
        /// `provider_and_audiences.audiences`.
        audiences: Option<Vec<String>>,
    },
    /// `requires_any`: the regular members, and whether `allow_missing` /
    /// `allow_missing_or_failed` were members (Envoy folds them into flags of the group).
    Any {
        /// Provider / group members, in order.
        of: Vec<Requirement>,
        /// `allow_missing` was a member: a missing token passes.
        allow_missing: bool,
        /// `allow_missing_or_failed` was a member: any outcome passes.
        allow_missing_or_failed: bool,
    },
    /// `requires_all`.
    All(Vec<Requirement>),
    /// A token is optional; an invalid one is ignored (any provider's).
    AllowMissingOrFailed,
    /// A token is optional; an invalid one is rejected (any provider's).
    AllowMissing,
    /// An empty `JwtRequirement`: nothing is verified.
    Nothing,
}

/// A route's `envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PerRoute {
    /// `disabled: true`: no verification on this route.
    Disabled,
    /// `requirement_name`: a `requirement_map` entry (unknown: 403 at request time, as Envoy).
    RequirementName(String),
}

impl PerRoute {
    /// Compiles `c` (at `path`).
    pub fn compile(c: &PerRouteConfig, path: &str) -> CompileResult<Self> {
        match &c.requirement_specifier {
            Some(RequirementSpecifier::Disabled(true)) => Ok(PerRoute::Disabled),
            Some(RequirementSpecifier::Disabled(false)) => Err(ConfigError::new(
                field(path, "disabled"),
                "disabled must be true when set",
            )),
            Some(RequirementSpecifier::RequirementName(n)) if !n.is_empty() => {
                Ok(PerRoute::RequirementName(n.clone()))
            }
            Some(RequirementSpecifier::RequirementName(_)) => Err(ConfigError::new(
                field(path, "requirement_name"),
                "requirement_name must not be empty",
            )),
            None => Err(ConfigError::new(
                path,
                "one of disabled or requirement_name is required",
            )),
        }
    }
}

/// A route-matched requirement.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Which requests.
    pub matcher: RouteMatch,
    /// What is required (`None`: nothing).
    pub requires: Option<Requirement>,
}

/// A compiled `JwtAuthentication`.
#[derive(Debug, Clone)]
pub struct JwtAuthn {
    /// Providers by name.
    pub providers: BTreeMap<String, Provider>,
    /// Rules, first match wins.
    pub rules: Vec<Rule>,
    /// `requirement_map` (for per-route `requirement_name`).
    pub requirement_map: BTreeMap<String, Requirement>,
    /// `bypass_cors_preflight`.
    pub bypass_cors_preflight: bool,
    /// `strip_failure_response`.
    pub strip_failure_response: bool,
    /// `stat_prefix` (inserted after `jwt_authn.`).
    pub stat_prefix: String,
    /// The filter's counters, looked up on first use (the HCM's stat prefix is known then).
    pub stats: OnceLock<Arc<JwtStats>>,
    /// Some provider has `remote_jwks` (requests may have to wait for keys).
    pub has_remote: bool,
}

fn provider(p: &JwtProvider, path: &str) -> CompileResult<Provider> {
    let jwks = match &p.jwks_source_specifier {
        Some(JwksSourceSpecifier::LocalJwks(d)) => {
            let jpath = field(path, "local_jwks");
            let text = inline_text(d, &jpath)?;
            let jwks = Jwks::parse(&text).map_err(|e| ConfigError::new(&jpath, e.to_string()))?;
            if let Some(why) = jwks.problem() {
                // Envoy accepts the config too ("Invalid inline jwks") and fails the tokens.
                tracing::warn!(target: "config", "{jpath}: JWKS key skipped: {why} ({} usable keys)", jwks.len());
            }
            JwksSource::Local(Arc::new(jwks))
        }
        Some(JwksSourceSpecifier::RemoteJwks(r)) => JwksSource::Remote(RemoteJwks::new(
            remote_jwks(r, &field(path, "remote_jwks"))?,
        )),
        None => {
            return Err(ConfigError::new(
                path,
                "one of local_jwks and remote_jwks is required",
            ));
        }
    };
    let mut locations = Vec::new();
    for (i, h) in p.from_headers.iter().enumerate() {
        locations.push(TokenLocation::Header {
            name: crate::config::matchers::header_name(
                &h.name,
                &field(&index(path, "from_headers", i), "name"),
            )?,
            value_prefix: h.value_prefix.clone(),
        });
    }
    locations.extend(p.from_params.iter().cloned().map(TokenLocation::Param));
    locations.extend(p.from_cookies.iter().cloned().map(TokenLocation::Cookie));
    if locations.is_empty() {
        locations.push(TokenLocation::Header {
            name: "authorization".into(),
            value_prefix: "Bearer ".into(),
        });
        locations.push(TokenLocation::Param("access_token".into()));
    }
    let claim_to_headers = p
        .claim_to_headers
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let cpath = index(path, "claim_to_headers", i);
            let claim = match (c.claim_name.is_empty(), c.claim_path.is_empty()) {
                (false, true) => c.claim_name.split('.').map(str::to_owned).collect(),
                (true, false) => {
                    let mut keys = Vec::with_capacity(c.claim_path.len());
                    for (j, s) in c.claim_path.iter().enumerate() {
                        if s.key.is_empty() {
                            return Err(ConfigError::new(
                                field(&index(&cpath, "claim_path", j), "key"),
                                "key must not be empty",
                            ));
                        }
                        keys.push(s.key.clone());
                    }
                    keys
                }
                _ => {
                    return Err(ConfigError::new(
                        field(&cpath, "claim_name"),
                        "exactly one of claim_name and claim_path is required",
                    ));
                }
            };
            Ok(ClaimToHeader {
                header: crate::config::matchers::header_name(
                    &c.header_name,
                    &field(&cpath, "header_name"),
                )?,
                path: claim,
            })
        })
        .collect::<CompileResult<_>>()?;
    let forward_payload_header = if p.forward_payload_header.is_empty() {
        None
    } else {
        Some(crate::config::matchers::header_name(
            &p.forward_payload_header,
            &field(path, "forward_payload_header"),
        )?)
    };
    Ok(Provider {
        issuer: p.issuer.clone(),
        audiences: p.audiences.clone(),
        subjects: p
            .subjects
            .as_ref()
            .map(|s| StringMatch::compile(s, &field(path, "subjects")))
            .transpose()?,
        require_expiration: p.require_expiration,
        max_lifetime: opt_duration(p.max_lifetime.as_ref(), &field(path, "max_lifetime"))?,
        jwks,
        forward: p.forward,
        locations,
        forward_payload_header,
        pad_forward_payload_header: p.pad_forward_payload_header,
        payload_in_metadata: (!p.payload_in_metadata.is_empty())
            .then(|| p.payload_in_metadata.clone()),
        space_delimited_claims: p
            .normalize_payload_in_metadata
            .as_ref()
            .map(|n| n.space_delimited_claims.clone())
            .unwrap_or_default(),
        header_in_metadata: (!p.header_in_metadata.is_empty())
            .then(|| p.header_in_metadata.clone()),
        clock_skew: Duration::from_secs(if p.clock_skew_seconds == 0 {
            60
        } else {
            u64::from(p.clock_skew_seconds)
        }),
        claim_to_headers,
        clear_route_cache: p.clear_route_cache,
    })
}

/// Compiles `remote_jwks` (at `path`) with Envoy's validation rules.
fn remote_jwks(r: &RawRemoteJwks, path: &str) -> CompileResult<RemoteJwksConfig> {
    let upath = field(path, "http_uri");
    let u = r
        .http_uri
        .as_ref()
        .ok_or_else(|| ConfigError::new(&upath, "http_uri is required"))?;
    let uri: http::Uri = u.uri.parse().map_err(|e| {
        ConfigError::new(
            field(&upath, "uri"),
            format!("'{}' is not a URI: {e}", u.uri),
        )
    })?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
        return Err(ConfigError::new(
            field(&upath, "uri"),
            format!("'{}' must be an absolute http or https URI", u.uri),
        ));
    }
    let cluster = match &u.http_upstream_type {
        Some(HttpUpstreamType::Cluster(c)) if !c.is_empty() => c.clone(),
        _ => {
            return Err(ConfigError::new(
                field(&upath, "cluster"),
                "cluster is required",
            ));
        }
    };
    let tpath = field(&upath, "timeout");
    let timeout = duration(
        u.timeout
            .as_ref()
            .ok_or_else(|| ConfigError::new(&tpath, "timeout is required"))?,
        &tpath,
    )?;
    let cpath = field(path, "cache_duration");
    let cache_duration =
        opt_duration(r.cache_duration.as_ref(), &cpath)?.unwrap_or(DEFAULT_CACHE_DURATION);
    if cache_duration < Duration::from_millis(1) {
        return Err(ConfigError::new(cpath, "must be at least 1ms"));
    }
    let async_fetch = r
        .async_fetch
        .as_ref()
        .map(|a| -> CompileResult<AsyncFetch> {
            Ok(AsyncFetch {
                fast_listener: a.fast_listener,
                failed_refetch: opt_duration(
                    a.failed_refetch_duration.as_ref(),
                    &field(&field(path, "async_fetch"), "failed_refetch_duration"),
                )?
                .unwrap_or(DEFAULT_FAILED_REFETCH),
            })
        })
        .transpose()?;
    let retry = r
        .retry_policy
        .as_ref()
        .map(|p| retry_policy(p, &field(path, "retry_policy")))
        .transpose()?;
    Ok(RemoteJwksConfig {
        uri,
        cluster,
        // Envoy's async client treats a zero timeout as none.
        timeout: (!timeout.is_zero()).then_some(timeout),
        cache_duration,
        async_fetch,
        retry,
    })
}

/// `remote_jwks.retry_policy` as Envoy validates and converts it (`validateCoreRetryPolicy`,
/// `convertCoreToRouteRetryPolicy`); its other fields are refused by the allowlist.
fn retry_policy(p: &CoreRetryPolicy, path: &str) -> CompileResult<FetchRetry> {
    const DEFAULT_BASE: Duration = Duration::from_millis(1000);
    let (base, max) = match &p.retry_back_off {
        None => (DEFAULT_BASE, DEFAULT_BASE * 10),
        Some(b) => {
            let bpath = field(path, "retry_back_off");
            let base_path = field(&bpath, "base_interval");
            let base = duration(
                b.base_interval
                    .as_ref()
                    .ok_or_else(|| ConfigError::new(&base_path, "base_interval is required"))?,
                &base_path,
            )?;
            if base < Duration::from_millis(1) {
                return Err(ConfigError::new(base_path, "must be at least 1ms"));
            }
            let max_path = field(&bpath, "max_interval");
            let max = opt_duration(b.max_interval.as_ref(), &max_path)?.unwrap_or(base * 10);
            if max.is_zero() {
                return Err(ConfigError::new(max_path, "must be greater than 0"));
            }
            if max < base {
                return Err(ConfigError::new(
                    max_path,
                    "max_interval must be greater than or equal to the base_interval",
                ));
            }
            (base, max)
        }
    };
    Ok(FetchRetry {
        num_retries: p.num_retries.as_ref().map_or(1, |n| n.value),
        base,
        max,
    })
}

fn requirement(
    r: &JwtRequirement,
    providers: &BTreeMap<String, Provider>,
    path: &str,
) -> CompileResult<Requirement> {
    let known = |name: &str, p: &str| {
        if providers.contains_key(name) {
            Ok(name.to_owned())
        } else {
            Err(ConfigError::new(p, format!("unknown provider '{name}'")))
        }
    };
    let list = |reqs: &[JwtRequirement], p: &str| -> CompileResult<Vec<Requirement>> {
        if reqs.len() < 2 {
            return Err(ConfigError::new(
                field(p, "requirements"),
                "at least two requirements are required",
            ));
        }
        reqs.iter()
            .enumerate()
            .map(|(i, x)| requirement(x, providers, &index(p, "requirements", i)))
            .collect()
    };
    Ok(match &r.requires_type {
        Some(RequiresType::ProviderName(n)) => Requirement::Provider {
            name: known(n, &field(path, "provider_name"))?,
            audiences: None,
        },
        Some(RequiresType::ProviderAndAudiences(pa)) => {
            let p = field(path, "provider_and_audiences");
            Requirement::Provider {
                name: known(&pa.provider_name, &field(&p, "provider_name"))?,
                audiences: Some(pa.audiences.clone()),
            }
        }
        Some(RequiresType::RequiresAny(l)) => {
            let mut of = Vec::new();
            let (mut allow_missing, mut allow_missing_or_failed) = (false, false);
            for r in list(&l.requirements, &field(path, "requires_any"))? {
                match r {
                    Requirement::AllowMissing => allow_missing = true,
                    Requirement::AllowMissingOrFailed => allow_missing_or_failed = true,
                    other => of.push(other),
                }
            }
            Requirement::Any {
                of,
                allow_missing,
                allow_missing_or_failed,
            }
        }
        Some(RequiresType::RequiresAll(l)) => {
            Requirement::All(list(&l.requirements, &field(path, "requires_all"))?)
        }
        Some(RequiresType::AllowMissingOrFailed(_)) => Requirement::AllowMissingOrFailed,
        Some(RequiresType::AllowMissing(_)) => Requirement::AllowMissing,
        Some(RequiresType::ExtractOnlyWithoutValidation(_)) => {
            return Err(ConfigError::new(
                field(path, "extract_only_without_validation"),
                "not supported",
            ));
        }
        // Envoy's `AllowAllVerifierImpl`: an empty requirement asks for nothing.
        None => Requirement::Nothing,
    })
}

impl JwtAuthn {
    /// Compiles `j` (at `path`).
    pub fn compile(j: &JwtAuthentication, path: &str) -> CompileResult<Self> {
        let mut providers = BTreeMap::new();
        for (name, p) in &j.providers {
            providers.insert(name.clone(), provider(p, &key(path, "providers", name))?);
        }
        let mut requirement_map = BTreeMap::new();
        for (name, r) in &j.requirement_map {
            requirement_map.insert(
                name.clone(),
                requirement(r, &providers, &key(path, "requirement_map", name))?,
            );
        }
        let mut rules = Vec::new();
        for (i, r) in j.rules.iter().enumerate() {
            let rpath = index(path, "rules", i);
            let m = r
                .r#match
                .as_ref()
                .ok_or_else(|| ConfigError::new(field(&rpath, "match"), "match is required"))?;
            let requires = match &r.requirement_type {
                Some(RequirementType::Requires(req)) => {
                    Some(requirement(req, &providers, &field(&rpath, "requires"))?)
                }
                Some(RequirementType::RequirementName(n)) => {
                    Some(requirement_map.get(n).cloned().ok_or_else(|| {
                        ConfigError::new(
                            field(&rpath, "requirement_name"),
                            format!("unknown requirement '{n}'"),
                        )
                    })?)
                }
                None => None,
            };
            rules.push(Rule {
                matcher: RouteMatch::compile(m, &field(&rpath, "match"))?,
                requires,
            });
        }
        let has_remote = providers
            .values()
            .any(|p| matches!(p.jwks, JwksSource::Remote(_)));
        Ok(JwtAuthn {
            has_remote,
            providers,
            rules,
            requirement_map,
            bypass_cors_preflight: j.bypass_cors_preflight,
            strip_failure_response: j.strip_failure_response,
            stat_prefix: j.stat_prefix.clone(),
            stats: OnceLock::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use serde_json::{Value as Json, json};
    use waypoint_proto::json as pjson;

    use super::*;

    fn compile(doc: &Json) -> CompileResult<JwtAuthn> {
        let dynamic = pjson::dynamic_from_json(
            "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            doc,
        )
        .expect("jwt_authn json");
        let raw = JwtAuthentication::decode(dynamic.encode_to_vec().as_slice()).expect("decodes");
        JwtAuthn::compile(&raw, "jwt")
    }

    fn with_provider(p: Json) -> Json {
        json!({"providers": {"p": p},
            "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": [
                {"provider_name": "p"}, {"allow_missing": {}}]}}}]})
    }

    fn jwks(keys: Json) -> Json {
        json!({"inline_string": json!({ "keys": keys }).to_string()})
    }

    #[test]
    fn istio_shape_compiles_into_envoy_verifier_tree() {
        let j = compile(&with_provider(
            json!({"issuer": "i", "local_jwks": jwks(json!([
            {"kty": "oct", "k": "c2VjcmV0"}])),
            "claim_to_headers": [{"header_name": "X-Org-Level", "claim_name": "org.level"},
                {"header_name": "x-url", "claim_path": [{"key": "https://e.com/r"}]}],
            "normalize_payload_in_metadata": {"space_delimited_claims": ["scope"]}}),
        ))
        .expect("compiles");
        let p = &j.providers["p"];
        assert_eq!(local(p).len(), 1);
        assert_eq!(p.clock_skew, Duration::from_secs(60));
        assert_eq!(p.space_delimited_claims, ["scope"]);
        assert_eq!(
            p.claim_to_headers,
            [
                ClaimToHeader {
                    header: "x-org-level".into(),
                    path: vec!["org".into(), "level".into()]
                },
                ClaimToHeader {
                    header: "x-url".into(),
                    path: vec!["https://e.com/r".into()]
                }
            ]
        );
        assert_eq!(
            j.rules[0].requires,
            Some(Requirement::Any {
                of: vec![Requirement::Provider {
                    name: "p".into(),
                    audiences: None
                }],
                allow_missing: true,
                allow_missing_or_failed: false,
            })
        );
    }

    #[test]
    fn invalid_config_is_refused_with_its_path() {
        let err = |doc: Json| {
            compile(&doc)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let e = err(with_provider(json!({"local_jwks": jwks(json!([
            {"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}]))})));
        assert!(
            e.contains("jwt.providers[\"p\"].local_jwks") && e.contains("P-521"),
            "{e}"
        );
        let e = err(with_provider(json!({"local_jwks": jwks(json!([])),
            "claim_to_headers": [{"header_name": "x", "claim_name": "a",
                "claim_path": [{"key": "a"}]}]})));
        assert!(e.contains("claim_to_headers[0].claim_name"), "{e}");
        let e = err(json!({"providers": {"p": {"local_jwks": jwks(json!([]))}},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "q"}}]}));
        assert!(e.contains("unknown provider 'q'"), "{e}");
        let e = err(json!({"providers": {"p": {"local_jwks": jwks(json!([]))}},
            "rules": [{"match": {"prefix": "/"}, "requirement_name": "nope"}]}));
        assert!(e.contains("unknown requirement 'nope'"), "{e}");
        // A JWKS Envoy would warn about is accepted: its tokens fail at request time.
        let j = compile(&with_provider(
            json!({"local_jwks": {"inline_string": "not json"}}),
        ))
        .expect("accepted like Envoy");
        assert!(local(&j.providers["p"]).is_empty());
    }

    fn local(p: &Provider) -> &Jwks {
        match &p.jwks {
            JwksSource::Local(j) => j,
            JwksSource::Remote(_) => panic!("remote"),
        }
    }

    fn remote(doc: Json) -> CompileResult<RemoteJwksConfig> {
        let j = compile(&with_provider(json!({"issuer": "i", "remote_jwks": doc})))?;
        assert!(j.has_remote);
        match &j.providers["p"].jwks {
            JwksSource::Remote(r) => Ok(r.config().clone()),
            JwksSource::Local(_) => panic!("local"),
        }
    }

    #[test]
    fn remote_jwks_compiles_istio_shape_with_envoy_defaults() {
        // What istiod emits with PILOT_JWT_ENABLE_REMOTE_JWKS=envoy.
        let c = remote(
            json!({"http_uri": {"uri": "https://issuer.example.com/jwks",
            "cluster": "outbound|443||issuer.example.com", "timeout": "5s"},
            "cache_duration": "300s"}),
        )
        .expect("compiles");
        assert_eq!(c.uri, "https://issuer.example.com/jwks");
        assert_eq!(c.cluster, "outbound|443||issuer.example.com");
        assert_eq!(c.timeout, Some(Duration::from_secs(5)));
        assert_eq!(c.cache_duration, Duration::from_secs(300));
        assert_eq!((c.async_fetch, c.retry), (None, None));
        let c = remote(
            json!({"http_uri": {"uri": "http://h/k", "cluster": "c", "timeout": "0s"},
            "async_fetch": {}, "retry_policy": {}}),
        )
        .expect("compiles");
        assert_eq!(c.timeout, None, "0: no timeout");
        assert_eq!(c.cache_duration, DEFAULT_CACHE_DURATION);
        assert_eq!(
            c.async_fetch,
            Some(AsyncFetch {
                fast_listener: false,
                failed_refetch: Duration::from_secs(1)
            })
        );
        assert_eq!(
            c.retry,
            Some(FetchRetry {
                num_retries: 1,
                base: Duration::from_secs(1),
                max: Duration::from_secs(10)
            })
        );
        let c = remote(
            json!({"http_uri": {"uri": "http://h/k", "cluster": "c", "timeout": "1s"},
            "async_fetch": {"fast_listener": true, "failed_refetch_duration": "3s"},
            "retry_policy": {"num_retries": 4, "retry_back_off": {"base_interval": "0.01s"}}}),
        )
        .expect("compiles");
        assert_eq!(
            c.async_fetch.map(|a| a.failed_refetch),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            c.retry,
            Some(FetchRetry {
                num_retries: 4,
                base: Duration::from_millis(10),
                max: Duration::from_millis(100)
            })
        );
    }

    #[test]
    fn the_allowlist_accepts_remote_jwks_and_refuses_what_envoy_ignores() {
        let problems = |remote: Json| {
            let doc = with_provider(json!({"issuer": "i", "remote_jwks": remote}));
            let dynamic = pjson::dynamic_from_json(
                "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                &doc,
            )
            .expect("json");
            crate::config::allowlist::check(&dynamic)
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        };
        let uri = json!({"uri": "http://h/k", "cluster": "c", "timeout": "1s"});
        assert_eq!(
            problems(json!({"http_uri": uri, "cache_duration": "60s",
                "async_fetch": {"fast_listener": true, "failed_refetch_duration": "2s"},
                "retry_policy": {"num_retries": 2,
                    "retry_back_off": {"base_interval": "0.1s", "max_interval": "1s"}}})),
            Vec::<String>::new()
        );
        let p = problems(json!({"http_uri": uri, "retry_policy": {"retry_on": "5xx"}}));
        assert!(
            p.len() == 1 && p[0].contains("remote_jwks.retry_policy.retry_on"),
            "{p:?}"
        );
    }

    #[test]
    fn invalid_remote_jwks_is_refused_with_its_path() {
        let err = |doc: Json| remote(doc).err().map(|e| e.to_string()).unwrap_or_default();
        let p = "jwt.providers[\"p\"].remote_jwks";
        let e = err(json!({"cache_duration": "1s"}));
        assert!(e.contains(&format!("{p}.http_uri")), "{e}");
        let e = err(json!({"http_uri": {"uri": "/relative", "cluster": "c", "timeout": "1s"}}));
        assert!(e.contains(&format!("{p}.http_uri.uri")), "{e}");
        let e = err(json!({"http_uri": {"uri": "http://h/", "timeout": "1s"}}));
        assert!(e.contains(&format!("{p}.http_uri.cluster")), "{e}");
        let e = err(json!({"http_uri": {"uri": "http://h/", "cluster": "c"}}));
        assert!(e.contains(&format!("{p}.http_uri.timeout")), "{e}");
        let e = err(
            json!({"http_uri": {"uri": "http://h/", "cluster": "c", "timeout": "1s"},
            "retry_policy": {"retry_back_off": {"base_interval": "2s", "max_interval": "1s"}}}),
        );
        assert!(
            e.contains(&format!("{p}.retry_policy.retry_back_off.max_interval")),
            "{e}"
        );
        let e = err(
            json!({"http_uri": {"uri": "http://h/", "cluster": "c", "timeout": "1s"},
            "retry_policy": {"retry_back_off": {"max_interval": "1s"}}}),
        );
        assert!(e.contains("base_interval is required"), "{e}");
    }
}
