//! `envoy.filters.http.local_ratelimit` (`envoy.extensions.filters.http.local_ratelimit.v3
//! .LocalRateLimit`), as an HCM filter and as a per-route `typed_per_filter_config` value.
//!
//! One token bucket per compiled config, shared by every connection and worker (or one per
//! connection with `local_rate_limit_per_downstream_connection`): a new config (an LDS or RDS
//! update that changes it) starts a new, full bucket, as Envoy's does. Descriptors and
//! `rate_limits` are not implemented, so the allowlist refuses them.

use std::{sync::Arc, time::Duration};

use waypoint_proto::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit as RawLocalRateLimit;

use crate::{
    config::{
        CompileResult, ConfigError, field, headers::HeaderMutations, matchers::Fraction,
        opt_duration,
    },
    http::local_ratelimit::Limiter,
};

/// Envoy's shortest `fill_interval`.
const MIN_FILL_INTERVAL: Duration = Duration::from_millis(50);

/// `token_bucket`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    /// `max_tokens` (the bucket starts full).
    pub max_tokens: u32,
    /// `tokens_per_fill` (default 1).
    pub tokens_per_fill: u32,
    /// `fill_interval` (at least 50ms).
    pub fill_interval: Duration,
}

/// A compiled local rate limit config.
#[derive(Debug, Clone)]
pub struct LocalRateLimit {
    /// `stat_prefix`: counters are `<stat_prefix>.http_local_rate_limit.*`.
    pub stat_prefix: String,
    /// `status` (default 429; below 400 means 429, as in Envoy).
    pub status: u16,
    /// `token_bucket` (`None` at filter level: nothing is limited unless a route configures it).
    pub bucket: Option<TokenBucket>,
    /// `filter_enabled` (default 0%: the filter does nothing unless set, as in Envoy).
    pub enabled: Fraction,
    /// `filter_enforced` (default 0%).
    pub enforced: Fraction,
    /// `request_headers_to_add_when_not_enforced`.
    pub request_headers_when_not_enforced: HeaderMutations,
    /// `response_headers_to_add` (to limited responses).
    pub response_headers: HeaderMutations,
    /// `local_rate_limit_per_downstream_connection`: a bucket per connection.
    pub per_connection: bool,
    /// `enable_x_ratelimit_headers` is `DRAFT_VERSION_03`.
    pub x_ratelimit_headers: bool,
    /// `enable_retry_after_header`.
    pub retry_after_header: bool,
    /// The run-time side: the shared bucket and the counters.
    pub limiter: Arc<Limiter>,
}

impl LocalRateLimit {
    /// Compiles `l` (at `path`); `per_route` configs must carry a token bucket (Envoy refuses
    /// them otherwise).
    pub fn compile(l: &RawLocalRateLimit, path: &str, per_route: bool) -> CompileResult<Self> {
        if l.stat_prefix.is_empty() {
            return Err(ConfigError::new(
                field(path, "stat_prefix"),
                "stat_prefix is required",
            ));
        }
        let status = match &l.status {
            Some(s) if s.code >= 400 => u16::try_from(s.code)
                .ok()
                .filter(|c| *c < 600)
                .ok_or_else(|| {
                    ConfigError::new(
                        field(&field(path, "status"), "code"),
                        format!("{} is not an HTTP status", s.code),
                    )
                })?,
            _ => 429,
        };
        let bucket = match &l.token_bucket {
            None if per_route => {
                return Err(ConfigError::new(
                    field(path, "token_bucket"),
                    "a per-route local rate limit config needs a token_bucket",
                ));
            }
            None => None,
            Some(b) => {
                let bpath = field(path, "token_bucket");
                let fill_interval =
                    opt_duration(b.fill_interval.as_ref(), &field(&bpath, "fill_interval"))?
                        .filter(|d| *d >= MIN_FILL_INTERVAL)
                        .ok_or_else(|| {
                            ConfigError::new(
                                field(&bpath, "fill_interval"),
                                "fill_interval of at least 50ms is required",
                            )
                        })?;
                if b.max_tokens == 0 {
                    return Err(ConfigError::new(
                        field(&bpath, "max_tokens"),
                        "max_tokens must be positive",
                    ));
                }
                let tokens_per_fill = b.tokens_per_fill.as_ref().map_or(1, |v| v.value);
                if tokens_per_fill == 0 {
                    return Err(ConfigError::new(
                        field(&bpath, "tokens_per_fill"),
                        "tokens_per_fill must be positive",
                    ));
                }
                Some(TokenBucket {
                    max_tokens: b.max_tokens,
                    tokens_per_fill,
                    fill_interval,
                })
            }
        };
        let zero = Fraction {
            numerator: 0,
            denominator: 100,
        };
        Ok(LocalRateLimit {
            stat_prefix: l.stat_prefix.clone(),
            status,
            bucket,
            enabled: l.filter_enabled.as_ref().map_or(zero, Fraction::runtime),
            enforced: l.filter_enforced.as_ref().map_or(zero, Fraction::runtime),
            request_headers_when_not_enforced: HeaderMutations::compile(
                &l.request_headers_to_add_when_not_enforced,
                &[],
                path,
                "request_headers_to_add_when_not_enforced",
                "",
            )?,
            response_headers: HeaderMutations::compile(
                &l.response_headers_to_add,
                &[],
                path,
                "response_headers_to_add",
                "",
            )?,
            per_connection: l.local_rate_limit_per_downstream_connection,
            // XRateLimitHeadersRFCVersion: OFF = 0, DRAFT_VERSION_03 = 1.
            x_ratelimit_headers: l.enable_x_ratelimit_headers == 1,
            retry_after_header: l.enable_retry_after_header,
            limiter: Arc::new(Limiter::new(bucket.as_ref())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(json: serde_json::Value, per_route: bool) -> CompileResult<LocalRateLimit> {
        let raw: RawLocalRateLimit = waypoint_proto::json::from_json(&json).expect("decodes");
        LocalRateLimit::compile(&raw, "p", per_route)
    }

    #[test]
    fn fields_compile_with_envoys_defaults() {
        let l = compile(
            serde_json::json!({
                "stat_prefix": "rl",
                "token_bucket": {"max_tokens": 5, "fill_interval": "1s"},
                "filter_enabled": {"default_value": {"numerator": 100}},
                "response_headers_to_add": [{"header": {"key": "x-limited", "value": "1"}}],
                "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
                "local_rate_limit_per_downstream_connection": true
            }),
            false,
        )
        .expect("compiles");
        assert_eq!(l.status, 429);
        assert_eq!(
            l.bucket,
            Some(TokenBucket {
                max_tokens: 5,
                tokens_per_fill: 1,
                fill_interval: Duration::from_secs(1)
            })
        );
        assert_eq!(l.enabled.numerator, 100);
        assert_eq!(l.enforced.numerator, 0, "filter_enforced defaults to 0%");
        assert_eq!(l.response_headers.add[0].name, "x-limited");
        assert!(l.x_ratelimit_headers && l.per_connection);
    }

    #[test]
    fn status_below_400_means_429() {
        let l = compile(
            serde_json::json!({"stat_prefix": "rl", "status": {"code": "OK"}}),
            false,
        )
        .expect("compiles");
        assert_eq!(l.status, 429);
        let l = compile(
            serde_json::json!({"stat_prefix": "rl", "status": {"code": "ServiceUnavailable"}}),
            false,
        )
        .expect("compiles");
        assert_eq!(l.status, 503);
    }

    #[test]
    fn invalid_configs_name_their_field() {
        let cases = [
            (serde_json::json!({}), false, "p.stat_prefix"),
            (
                serde_json::json!({"stat_prefix": "rl"}),
                true,
                "p.token_bucket",
            ),
            (
                serde_json::json!({"stat_prefix": "rl",
                    "token_bucket": {"max_tokens": 1, "fill_interval": "0.01s"}}),
                false,
                "p.token_bucket.fill_interval",
            ),
            (
                serde_json::json!({"stat_prefix": "rl",
                    "token_bucket": {"max_tokens": 0, "fill_interval": "1s"}}),
                false,
                "p.token_bucket.max_tokens",
            ),
            (
                serde_json::json!({"stat_prefix": "rl",
                    "token_bucket": {"max_tokens": 1, "tokens_per_fill": 0, "fill_interval": "1s"}}),
                false,
                "p.token_bucket.tokens_per_fill",
            ),
        ];
        for (json, per_route, path) in cases {
            let e = compile(json.clone(), per_route).expect_err("refused");
            assert_eq!(e.path, path, "{json}");
        }
    }
}
