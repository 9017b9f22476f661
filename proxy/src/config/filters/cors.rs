//! CORS policies for `envoy.filters.http.cors`: the per-route `typed_per_filter_config` value
//! (`envoy.extensions.filters.http.cors.v3.CorsPolicy`, what istiod sends for a VirtualService
//! `corsPolicy`) and the deprecated `cors` field of `RouteAction` / `VirtualHost`
//! (`envoy.config.route.v3.CorsPolicy`). Both have the same fields and compile to one type.
//!
//! Optional fields stay optional: Envoy resolves each attribute separately, taking it from the
//! most specific policy that sets it (route, then virtual host, then route table).

use waypoint_proto::envoy::{
    config::{
        core::v3::RuntimeFractionalPercent,
        route::v3::{CorsPolicy as RawRouteCorsPolicy, cors_policy::EnabledSpecifier},
    },
    extensions::filters::http::cors::v3::CorsPolicy as RawCorsPolicy,
    r#type::matcher::v3::StringMatcher,
};

use crate::config::{
    CompileResult, ConfigError, field,
    matchers::{Fraction, StringMatch, string_matches},
};

/// A compiled CORS policy (one level: route, virtual host or route table).
#[derive(Debug, Clone)]
pub struct CorsPolicy {
    /// `allow_origin_string_match` (empty: not set at this level).
    pub allow_origins: Vec<StringMatch>,
    /// `allow_methods` (comma-separated, sent as is; `*` echoes the requested method).
    pub allow_methods: String,
    /// `allow_headers` (`*` echoes the requested headers).
    pub allow_headers: String,
    /// `expose_headers`.
    pub expose_headers: String,
    /// `max_age` (seconds, as text).
    pub max_age: String,
    /// `allow_credentials` (`None`: not set at this level).
    pub allow_credentials: Option<bool>,
    /// `filter_enabled` (default: always).
    pub enabled: Fraction,
    /// `shadow_enabled` (default: never): origins are checked and counted, responses untouched.
    pub shadow: Fraction,
    /// `allow_private_network_access`.
    pub allow_private_network_access: Option<bool>,
    /// `forward_not_matching_preflights` (Envoy's default when no level sets it: true).
    pub forward_not_matching_preflights: Option<bool>,
}

/// The fields both CORS messages share.
struct Fields<'a> {
    origins: &'a [StringMatcher],
    allow_methods: &'a str,
    allow_headers: &'a str,
    expose_headers: &'a str,
    max_age: &'a str,
    allow_credentials: Option<bool>,
    filter_enabled: Option<&'a RuntimeFractionalPercent>,
    shadow_enabled: Option<&'a RuntimeFractionalPercent>,
    allow_private_network_access: Option<bool>,
    forward_not_matching_preflights: Option<bool>,
}

impl CorsPolicy {
    /// Compiles the per-route filter config `c` (at `path`).
    pub fn compile(c: &RawCorsPolicy, path: &str) -> CompileResult<Self> {
        Self::from_fields(
            Fields {
                origins: &c.allow_origin_string_match,
                allow_methods: &c.allow_methods,
                allow_headers: &c.allow_headers,
                expose_headers: &c.expose_headers,
                max_age: &c.max_age,
                allow_credentials: c.allow_credentials.as_ref().map(|b| b.value),
                filter_enabled: c.filter_enabled.as_ref(),
                shadow_enabled: c.shadow_enabled.as_ref(),
                allow_private_network_access: c
                    .allow_private_network_access
                    .as_ref()
                    .map(|b| b.value),
                forward_not_matching_preflights: c
                    .forward_not_matching_preflights
                    .as_ref()
                    .map(|b| b.value),
            },
            path,
        )
    }

    /// Compiles the deprecated `RouteAction.cors` / `VirtualHost.cors` `c` (at `path`).
    pub fn compile_route(c: &RawRouteCorsPolicy, path: &str) -> CompileResult<Self> {
        let filter_enabled = c
            .enabled_specifier
            .as_ref()
            .map(|EnabledSpecifier::FilterEnabled(f)| f);
        Self::from_fields(
            Fields {
                origins: &c.allow_origin_string_match,
                allow_methods: &c.allow_methods,
                allow_headers: &c.allow_headers,
                expose_headers: &c.expose_headers,
                max_age: &c.max_age,
                allow_credentials: c.allow_credentials.as_ref().map(|b| b.value),
                filter_enabled,
                shadow_enabled: c.shadow_enabled.as_ref(),
                allow_private_network_access: c
                    .allow_private_network_access
                    .as_ref()
                    .map(|b| b.value),
                forward_not_matching_preflights: c
                    .forward_not_matching_preflights
                    .as_ref()
                    .map(|b| b.value),
            },
            path,
        )
    }

    fn from_fields(f: Fields<'_>, path: &str) -> CompileResult<Self> {
        // Envoy sends `max_age` as is; a value that is not a number of seconds would be a broken
        // `Access-Control-Max-Age` for every preflight, so it is refused here.
        if !f.max_age.is_empty() && f.max_age.parse::<u64>().is_err() {
            return Err(ConfigError::new(
                field(path, "max_age"),
                format!("'{}' is not a number of seconds", f.max_age),
            ));
        }
        for (name, value) in [
            ("allow_methods", f.allow_methods),
            ("allow_headers", f.allow_headers),
            ("expose_headers", f.expose_headers),
        ] {
            if http::HeaderValue::from_str(value).is_err() {
                return Err(ConfigError::new(
                    field(path, name),
                    format!("'{value}' is not a valid header value"),
                ));
            }
        }
        let never = Fraction {
            numerator: 0,
            denominator: 100,
        };
        Ok(CorsPolicy {
            allow_origins: string_matches(f.origins, path, "allow_origin_string_match")?,
            allow_methods: f.allow_methods.to_owned(),
            allow_headers: f.allow_headers.to_owned(),
            expose_headers: f.expose_headers.to_owned(),
            max_age: f.max_age.to_owned(),
            allow_credentials: f.allow_credentials,
            enabled: f.filter_enabled.map_or(Fraction::ALWAYS, Fraction::runtime),
            shadow: f.shadow_enabled.map_or(never, Fraction::runtime),
            allow_private_network_access: f.allow_private_network_access,
            forward_not_matching_preflights: f.forward_not_matching_preflights,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(json: serde_json::Value) -> CompileResult<CorsPolicy> {
        let raw: RawCorsPolicy = waypoint_proto::json::from_json(&json).expect("decodes");
        CorsPolicy::compile(&raw, "p")
    }

    #[test]
    fn unset_fields_stay_unset_and_defaults_are_envoys() {
        let p = compile(serde_json::json!({"allow_methods": "GET"})).expect("compiles");
        assert_eq!(p.allow_methods, "GET");
        assert!(p.allow_origins.is_empty());
        assert_eq!(p.allow_credentials, None);
        assert_eq!(p.forward_not_matching_preflights, None);
        assert_eq!(p.enabled, Fraction::ALWAYS);
        assert_eq!(p.shadow.numerator, 0);
    }

    #[test]
    fn fields_compile() {
        let p = compile(serde_json::json!({
            "allow_origin_string_match": [{"exact": "https://a.example"}, {"prefix": "https://b."}],
            "allow_headers": "x-a", "expose_headers": "x-b", "max_age": "60",
            "allow_credentials": true, "allow_private_network_access": false,
            "forward_not_matching_preflights": false,
            "filter_enabled": {"default_value": {"numerator": 25}},
            "shadow_enabled": {"default_value": {"numerator": 100}}
        }))
        .expect("compiles");
        assert_eq!(p.allow_origins.len(), 2);
        assert_eq!(p.allow_credentials, Some(true));
        assert_eq!(p.allow_private_network_access, Some(false));
        assert_eq!(p.forward_not_matching_preflights, Some(false));
        assert_eq!(p.enabled.numerator, 25);
        assert_eq!(p.shadow.numerator, 100);
        assert_eq!(p.max_age, "60");
    }

    #[test]
    fn bad_values_are_refused_with_their_path() {
        let e = compile(serde_json::json!({"max_age": "soon"})).expect_err("max_age");
        assert_eq!(e.path, "p.max_age");
        let e = compile(serde_json::json!({"allow_headers": "a\nb"})).expect_err("header value");
        assert_eq!(e.path, "p.allow_headers");
    }

    #[test]
    fn the_route_level_message_compiles_the_same() {
        let raw: RawRouteCorsPolicy = waypoint_proto::json::from_json(&serde_json::json!({
            "allow_origin_string_match": [{"exact": "https://a.example"}],
            "filter_enabled": {"default_value": {"numerator": 50}},
            "allow_credentials": true
        }))
        .expect("decodes");
        let p = CorsPolicy::compile_route(&raw, "cors").expect("compiles");
        assert_eq!(p.enabled.numerator, 50);
        assert_eq!(p.allow_credentials, Some(true));
        assert_eq!(p.allow_origins.len(), 1);
    }
}
