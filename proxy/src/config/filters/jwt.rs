//! `jwt_authn` (RequestAuthentication): providers with inline JWKS (istiod fetches and inlines
//! them), token locations, claim-to-header copies and per-route requirements.

use std::{collections::BTreeMap, time::Duration};

use serde_json::Value as Json;
use waypoint_proto::envoy::extensions::filters::http::jwt_authn::v3::{
    JwtAuthentication, JwtProvider, JwtRequirement, jwt_provider::JwksSourceSpecifier,
    jwt_requirement::RequiresType, requirement_rule::RequirementType,
};

use crate::config::{
    CompileResult, ConfigError, field, index, inline_text, key, matchers::StringMatch,
    opt_duration, route::RouteMatch,
};

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
    /// The JWKS document (`local_jwks`), validated as JSON with a `keys` list.
    pub jwks: String,
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
    /// `clock_skew_seconds` (default 60).
    pub clock_skew: Duration,
    /// `claim_to_headers`: (header, claim).
    pub claim_to_headers: Vec<(String, String)>,
    /// `clear_route_cache`.
    pub clear_route_cache: bool,
}

/// A compiled requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// A token from this provider.
    Provider(String),
    /// A token from this provider with one of these audiences.
    ProviderWithAudiences(String, Vec<String>),
    /// Any of.
    Any(Vec<Requirement>),
    /// All of.
    All(Vec<Requirement>),
    /// A token is optional; an invalid one is ignored.
    AllowMissingOrFailed,
    /// A token is optional; an invalid one is rejected.
    AllowMissing,
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
}

fn provider(p: &JwtProvider, path: &str) -> CompileResult<Provider> {
    let jwks = match &p.jwks_source_specifier {
        Some(JwksSourceSpecifier::LocalJwks(d)) => {
            let jpath = field(path, "local_jwks");
            let text = inline_text(d, &jpath)?;
            match serde_json::from_str::<Json>(&text) {
                Ok(Json::Object(m)) if m.get("keys").is_some_and(Json::is_array) => text,
                Ok(_) => {
                    return Err(ConfigError::new(
                        jpath,
                        "the JWKS must be an object with a 'keys' list",
                    ));
                }
                Err(e) => return Err(ConfigError::new(jpath, format!("JWKS is not JSON: {e}"))),
            }
        }
        Some(JwksSourceSpecifier::RemoteJwks(_)) => {
            return Err(ConfigError::new(
                field(path, "remote_jwks"),
                "remote JWKS fetching is not supported; let istiod inline the keys (PILOT_JWT_ENABLE_REMOTE_JWKS=false)",
            ));
        }
        None => return Err(ConfigError::new(path, "local_jwks is required")),
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
            if c.claim_name.is_empty() {
                return Err(ConfigError::new(
                    field(&cpath, "claim_name"),
                    "claim_name is required",
                ));
            }
            Ok((
                crate::config::matchers::header_name(
                    &c.header_name,
                    &field(&cpath, "header_name"),
                )?,
                c.claim_name.clone(),
            ))
        })
        .collect::<CompileResult<_>>()?;
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
        forward_payload_header: (!p.forward_payload_header.is_empty())
            .then(|| p.forward_payload_header.clone()),
        pad_forward_payload_header: p.pad_forward_payload_header,
        payload_in_metadata: (!p.payload_in_metadata.is_empty())
            .then(|| p.payload_in_metadata.clone()),
        clock_skew: Duration::from_secs(if p.clock_skew_seconds == 0 {
            60
        } else {
            u64::from(p.clock_skew_seconds)
        }),
        claim_to_headers,
        clear_route_cache: p.clear_route_cache,
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
        Some(RequiresType::ProviderName(n)) => {
            Requirement::Provider(known(n, &field(path, "provider_name"))?)
        }
        Some(RequiresType::ProviderAndAudiences(pa)) => {
            let p = field(path, "provider_and_audiences");
            Requirement::ProviderWithAudiences(
                known(&pa.provider_name, &field(&p, "provider_name"))?,
                pa.audiences.clone(),
            )
        }
        Some(RequiresType::RequiresAny(l)) => {
            Requirement::Any(list(&l.requirements, &field(path, "requires_any"))?)
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
        None => return Err(ConfigError::new(path, "a requirement is required")),
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
        Ok(JwtAuthn {
            providers,
            rules,
            requirement_map,
            bypass_cors_preflight: j.bypass_cors_preflight,
            strip_failure_response: j.strip_failure_response,
        })
    }
}
