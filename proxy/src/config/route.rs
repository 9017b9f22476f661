//! Route tables: virtual hosts (domain matching), routes (path/header/query matchers compiled once)
//! and their actions — forwarding with retries, timeouts, mirrors, weighted clusters, hash policies,
//! header operations and rewrites; redirects; direct responses. Each virtual host carries a
//! [`RouteIndex`] and each table a [`DomainIndex`] (`lookup`), so selection does not scan.

mod hash;
mod lookup;

pub use hash::{CookiePolicy, HashKind, HashPolicy};
pub use lookup::{DomainIndex, RouteIndex};

use std::{collections::BTreeMap, time::Duration};

use regex::Regex;
use waypoint_proto::envoy::config::{
    core::v3::RoutingPriority,
    route::v3::{
        RetryPolicy as RawRetryPolicy, Route as RawRoute, RouteAction as RawRouteAction,
        RouteConfiguration, RouteMatch as RawRouteMatch, VirtualHost as RawVirtualHost,
        redirect_action::{PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier},
        retry_policy::retry_host_predicate::ConfigType as PredicateConfig,
        retry_policy::retry_priority::ConfigType as PriorityConfig,
        route::Action as RawAction,
        route_action::{
            ClusterNotFoundResponseCode, ClusterSpecifier, HostRewriteSpecifier,
            RequestMirrorPolicy,
        },
        route_match::PathSpecifier,
        weighted_cluster::{RandomValueSpecifier, cluster_weight},
    },
};

use super::{
    CompileResult, ConfigError, duration, field,
    filters::{cors::CorsPolicy, http::PerFilterConfig},
    headers::HeaderPolicy,
    index, inline_text, key,
    matchers::{
        Fraction, HeaderMatch, QueryMatch, RegexRewrite, header_matches, header_name,
        regex_matcher, share_regexes,
    },
    opt_duration,
    supported::ExtensionKind,
    typed::Typed,
};

/// Envoy's default cap on direct response bodies.
const DEFAULT_MAX_DIRECT_RESPONSE_BODY: u32 = 4096;

/// Retry conditions Envoy understands in `retry_on` (HTTP and gRPC).
const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// Per-filter configs by filter name.
pub type PerFilter = BTreeMap<String, PerFilterConfig>;

fn per_filter(
    map: &std::collections::HashMap<String, waypoint_proto::google::protobuf::Any>,
    path: &str,
) -> CompileResult<PerFilter> {
    let mut out = BTreeMap::new();
    for (name, any) in map {
        if let Some(c) = PerFilterConfig::compile(any, &key(path, "typed_per_filter_config", name))?
        {
            out.insert(name.clone(), c);
        }
    }
    Ok(out)
}

/// A virtual host domain pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Domain {
    /// `*`.
    Any,
    /// An exact host (lower-case).
    Exact(String),
    /// `*.example.com` → suffix `.example.com`.
    Suffix(String),
    /// `example.*` → prefix `example.`.
    Prefix(String),
}

impl Domain {
    fn parse(d: &str, path: &str) -> CompileResult<Self> {
        let d = d.to_ascii_lowercase();
        if d == "*" {
            return Ok(Domain::Any);
        }
        let wildcards = d.matches('*').count();
        if wildcards == 0 {
            if d.is_empty() {
                return Err(ConfigError::new(path, "empty domain"));
            }
            return Ok(Domain::Exact(d));
        }
        if wildcards == 1 {
            if let Some(rest) = d.strip_prefix('*')
                && !rest.is_empty()
            {
                return Ok(Domain::Suffix(rest.to_owned()));
            }
            if let Some(rest) = d.strip_suffix('*')
                && !rest.is_empty()
            {
                return Ok(Domain::Prefix(rest.to_owned()));
            }
        }
        Err(ConfigError::new(
            path,
            format!("'{d}': a wildcard is only allowed as a whole, leading or trailing"),
        ))
    }

    /// Whether `host` (lower-case, port stripped as configured) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Domain::Any => true,
            Domain::Exact(d) => host == d,
            Domain::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
            Domain::Prefix(p) => host.len() > p.len() && host.starts_with(p.as_str()),
        }
    }
}

/// How the path is matched.
#[derive(Debug, Clone)]
pub enum PathMatch {
    /// Starts with.
    Prefix(String),
    /// Equal.
    Exact(String),
    /// Whole-path regex.
    Regex(Regex),
    /// Prefix on a `/` boundary.
    PathSeparatedPrefix(String),
    /// A CONNECT request (any path).
    Connect,
}

/// A compiled route match.
#[derive(Debug, Clone)]
pub struct RouteMatch {
    /// The path rule.
    pub path: PathMatch,
    /// `case_sensitive` (default true).
    pub case_sensitive: bool,
    /// All must match.
    pub headers: Vec<HeaderMatch>,
    /// All must match.
    pub query_parameters: Vec<QueryMatch>,
    /// `grpc`: only gRPC requests.
    pub grpc: bool,
    /// `runtime_fraction`: the share of requests that may match.
    pub runtime_fraction: Option<Fraction>,
    /// `tls_context`: (presented, validated) requirements.
    pub tls_context: Option<(Option<bool>, Option<bool>)>,
}

impl RouteMatch {
    /// Compiles `m` (at `path`).
    pub fn compile(m: &RawRouteMatch, path: &str) -> CompileResult<Self> {
        let case_sensitive = m.case_sensitive.is_none_or(|b| b.value);
        let p = match &m.path_specifier {
            Some(PathSpecifier::Prefix(s)) => PathMatch::Prefix(s.clone()),
            Some(PathSpecifier::Path(s)) => PathMatch::Exact(s.clone()),
            Some(PathSpecifier::SafeRegex(r)) => {
                PathMatch::Regex(regex_matcher(r, &field(path, "safe_regex"))?)
            }
            Some(PathSpecifier::ConnectMatcher(_)) => PathMatch::Connect,
            Some(PathSpecifier::PathSeparatedPrefix(s)) => {
                let ppath = field(path, "path_separated_prefix");
                if !s.starts_with('/')
                    || (s.len() > 1 && s.ends_with('/'))
                    || s.contains(['?', '#'])
                {
                    return Err(ConfigError::new(
                        ppath,
                        format!(
                            "'{s}' must start with '/', not end with '/', and have no '?' or '#'"
                        ),
                    ));
                }
                PathMatch::PathSeparatedPrefix(s.clone())
            }
            Some(PathSpecifier::PathMatchPolicy(_)) => {
                return Err(ConfigError::new(
                    field(path, "path_match_policy"),
                    "not supported",
                ));
            }
            None => {
                return Err(ConfigError::new(
                    path,
                    "a path rule (prefix, path, safe_regex, path_separated_prefix or connect_matcher) is required",
                ));
            }
        };
        Ok(RouteMatch {
            path: p,
            case_sensitive,
            headers: header_matches(&m.headers, path, "headers")?,
            query_parameters: m
                .query_parameters
                .iter()
                .enumerate()
                .map(|(i, q)| QueryMatch::compile(q, &index(path, "query_parameters", i)))
                .collect::<CompileResult<_>>()?,
            grpc: m.grpc.is_some(),
            runtime_fraction: m.runtime_fraction.as_ref().map(Fraction::runtime),
            tls_context: m
                .tls_context
                .as_ref()
                .map(|t| (t.presented.map(|b| b.value), t.validated.map(|b| b.value))),
        })
    }

    /// Whether a request path matches the path rule (headers etc. are checked by the data path).
    pub fn matches_path(&self, request_path: &str, is_connect: bool) -> bool {
        let path = request_path.split(['?', '#']).next().unwrap_or("");
        let eq = |a: &str, b: &str| {
            if self.case_sensitive {
                a == b
            } else {
                a.eq_ignore_ascii_case(b)
            }
        };
        let starts = |p: &str| {
            path.len() >= p.len() && path.is_char_boundary(p.len()) && eq(&path[..p.len()], p)
        };
        match &self.path {
            PathMatch::Connect => is_connect,
            _ if is_connect => false,
            PathMatch::Prefix(p) => starts(p),
            PathMatch::Exact(p) => eq(path, p),
            PathMatch::Regex(r) => r.is_match(path),
            PathMatch::PathSeparatedPrefix(p) => {
                starts(p) && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
            }
        }
    }
}

/// Which cluster(s) a request goes to.
#[derive(Debug, Clone)]
pub enum ClusterTarget {
    /// A named cluster.
    Name(String),
    /// The cluster named by a request header.
    Header(String),
    /// A weighted choice.
    Weighted {
        /// The clusters.
        clusters: Vec<WeightedTarget>,
        /// `header_name`: a header carrying the random value.
        header_name: Option<String>,
        /// `use_hash_policy`: pick by the route's hash instead of at random.
        use_hash_policy: bool,
    },
}

/// One weighted cluster.
#[derive(Debug, Clone)]
pub struct WeightedTarget {
    /// `name` or `cluster_header`.
    pub cluster: ClusterRef,
    /// `weight`.
    pub weight: u32,
    /// Header operations.
    pub headers: HeaderPolicy,
    /// `host_rewrite_literal`.
    pub host_rewrite_literal: Option<String>,
}

/// A cluster by name or by request header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterRef {
    /// A name.
    Name(String),
    /// A header whose value names the cluster.
    Header(String),
}

/// How `Host` is rewritten upstream.
#[derive(Debug, Clone)]
pub enum HostRewrite {
    /// A fixed value.
    Literal(String),
    /// The upstream host's hostname.
    Auto,
    /// The value of a request header.
    Header(String),
    /// A regex substitution on the path.
    PathRegex(RegexRewrite),
}

/// A retry policy.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// `retry_on` conditions.
    pub retry_on: Vec<String>,
    /// `num_retries` (default 1).
    pub num_retries: u32,
    /// `per_try_timeout`.
    pub per_try_timeout: Option<Duration>,
    /// `per_try_idle_timeout`.
    pub per_try_idle_timeout: Option<Duration>,
    /// `retry_host_predicate` previous_hosts: avoid hosts already tried.
    pub avoid_previous_hosts: bool,
    /// `host_selection_retry_max_attempts` (Envoy's default 1 when unset or 0). Envoy re-picks up
    /// to this many times while the predicate rejects the host; our balancer leaves the tried
    /// hosts out in one pick instead (see `upstream::lb`), which is what those re-picks approach,
    /// so the bound is recorded but never needed.
    pub host_selection_retry_max_attempts: i64,
    /// `retry_priority` (`envoy.retry_priorities.previous_priorities`).
    pub retry_priority: Option<RetryPriority>,
    /// `retriable_status_codes`.
    pub retriable_status_codes: Vec<u32>,
    /// `retry_back_off` (base, max); Envoy's default is 25ms / 250ms.
    pub back_off: (Duration, Duration),
    /// `retriable_headers` (response).
    pub retriable_headers: Vec<HeaderMatch>,
    /// `retriable_request_headers`.
    pub retriable_request_headers: Vec<HeaderMatch>,
}

/// A retry priority plugin: the only one Envoy ships, `previous_priorities`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPriority {
    /// `PreviousPrioritiesConfig.update_frequency` (at least 1): how many attempts pass between
    /// recomputations of the excluded priorities (see `upstream::retry_priority`).
    pub update_frequency: u32,
}

/// The type of `envoy.retry_priorities.previous_priorities`' config.
const PREVIOUS_PRIORITIES: &str =
    "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig";

impl RetryPriority {
    /// Compiles `RetryPolicy.retry_priority` (at `path`); `None` when Envoy ignores it.
    fn compile(
        p: &waypoint_proto::envoy::config::route::v3::retry_policy::RetryPriority,
        path: &str,
    ) -> CompileResult<Option<Self>> {
        // Envoy's `RetryPolicyImpl` only builds the plugin when `name` is set; a config without a
        // name is ignored there, so it is here.
        if p.name.is_empty() {
            return Ok(None);
        }
        let tpath = field(path, "typed_config");
        let any = match &p.config_type {
            Some(PriorityConfig::TypedConfig(a)) => a,
            None => return Err(ConfigError::new(tpath, "typed_config is required")),
        };
        let t = Typed::new(any, &tpath)?;
        t.check_kind(&[ExtensionKind::RetryPriority], "a retry priority", &tpath)?;
        let cfg: waypoint_proto::envoy::extensions::retry::priority::previous_priorities::v3::PreviousPrioritiesConfig =
            t.decode(PREVIOUS_PRIORITIES, &tpath)?;
        // Envoy's validation: `update_frequency` must be greater than 0.
        let update_frequency = u32::try_from(cfg.update_frequency)
            .ok()
            .filter(|&f| f > 0)
            .ok_or_else(|| {
                ConfigError::new(
                    field(&t.inner_path(&tpath), "update_frequency"),
                    format!("must be greater than 0, got {}", cfg.update_frequency),
                )
            })?;
        Ok(Some(RetryPriority { update_frequency }))
    }
}

impl RetryPolicy {
    /// Compiles `r` (at `path`).
    pub fn compile(r: &RawRetryPolicy, path: &str) -> CompileResult<Self> {
        let retry_on: Vec<String> = r
            .retry_on
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        for cond in &retry_on {
            if !RETRY_ON.contains(&cond.as_str()) {
                return Err(ConfigError::new(
                    field(path, "retry_on"),
                    format!("unknown retry condition '{cond}'"),
                ));
            }
        }
        let mut avoid_previous_hosts = false;
        for (i, p) in r.retry_host_predicate.iter().enumerate() {
            let ppath = field(&index(path, "retry_host_predicate", i), "typed_config");
            let any = match &p.config_type {
                Some(PredicateConfig::TypedConfig(a)) => a,
                None => return Err(ConfigError::new(ppath, "typed_config is required")),
            };
            let t = Typed::new(any, &ppath)?;
            t.check_kind(
                &[ExtensionKind::RetryHostPredicate],
                "a retry host predicate",
                &ppath,
            )?;
            avoid_previous_hosts = true;
        }
        let back_off = match &r.retry_back_off {
            None => (Duration::from_millis(25), Duration::from_millis(250)),
            Some(b) => {
                let bpath = field(path, "retry_back_off");
                let base = b.base_interval.as_ref().ok_or_else(|| {
                    ConfigError::new(field(&bpath, "base_interval"), "base_interval is required")
                })?;
                let base = duration(base, &field(&bpath, "base_interval"))?;
                if base.is_zero() {
                    return Err(ConfigError::new(
                        field(&bpath, "base_interval"),
                        "must be positive",
                    ));
                }
                // Envoy counts back-off in whole milliseconds, a sub-millisecond interval
                // rounded up to 1 ms.
                let millis = |d: Duration| {
                    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1))
                };
                let base = millis(base);
                let max =
                    match opt_duration(b.max_interval.as_ref(), &field(&bpath, "max_interval"))? {
                        Some(m) if m.is_zero() => {
                            return Err(ConfigError::new(
                                field(&bpath, "max_interval"),
                                "must be positive",
                            ));
                        }
                        Some(m) => millis(m),
                        None => base.checked_mul(10).unwrap_or(Duration::MAX),
                    };
                if max < base {
                    return Err(ConfigError::new(
                        field(&bpath, "max_interval"),
                        "max_interval is below base_interval",
                    ));
                }
                (base, max)
            }
        };
        Ok(RetryPolicy {
            retry_on,
            num_retries: r.num_retries.as_ref().map_or(1, |v| v.value),
            per_try_timeout: opt_duration(
                r.per_try_timeout.as_ref(),
                &field(path, "per_try_timeout"),
            )?,
            per_try_idle_timeout: opt_duration(
                r.per_try_idle_timeout.as_ref(),
                &field(path, "per_try_idle_timeout"),
            )?,
            avoid_previous_hosts,
            host_selection_retry_max_attempts: r.host_selection_retry_max_attempts,
            retry_priority: match &r.retry_priority {
                Some(p) => RetryPriority::compile(p, &field(path, "retry_priority"))?,
                None => None,
            },
            retriable_status_codes: r.retriable_status_codes.clone(),
            back_off,
            retriable_headers: header_matches(&r.retriable_headers, path, "retriable_headers")?,
            retriable_request_headers: header_matches(
                &r.retriable_request_headers,
                path,
                "retriable_request_headers",
            )?,
        })
    }
}

/// A request mirror.
#[derive(Debug, Clone)]
pub struct Mirror {
    /// Target.
    pub cluster: ClusterRef,
    /// Share of requests mirrored (default all).
    pub fraction: Fraction,
    /// `disable_shadow_host_suffix_append` (else `-shadow` is appended to Host).
    pub disable_shadow_host_suffix_append: bool,
    /// `host_rewrite_literal`.
    pub host_rewrite_literal: Option<String>,
}

fn mirrors(list: &[RequestMirrorPolicy], path: &str) -> CompileResult<Vec<Mirror>> {
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let mpath = index(path, "request_mirror_policies", i);
            let cluster = match (m.cluster.is_empty(), m.cluster_header.is_empty()) {
                (false, true) => ClusterRef::Name(m.cluster.clone()),
                (true, false) => ClusterRef::Header(header_name(
                    &m.cluster_header,
                    &field(&mpath, "cluster_header"),
                )?),
                _ => {
                    return Err(ConfigError::new(
                        mpath,
                        "exactly one of cluster and cluster_header is required",
                    ));
                }
            };
            Ok(Mirror {
                cluster,
                fraction: m
                    .runtime_fraction
                    .as_ref()
                    .map_or(Fraction::ALWAYS, Fraction::runtime),
                disable_shadow_host_suffix_append: m.disable_shadow_host_suffix_append,
                host_rewrite_literal: (!m.host_rewrite_literal.is_empty())
                    .then(|| m.host_rewrite_literal.clone()),
            })
        })
        .collect()
}

/// A route-level upgrade setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteUpgrade {
    /// `upgrade_type`.
    pub upgrade_type: String,
    /// `enabled` (default true).
    pub enabled: bool,
    /// `connect_config`: terminate CONNECT and forward the payload (`Some(allow_post)`).
    pub connect: Option<bool>,
}

/// `max_stream_duration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamDuration {
    /// The route sets `max_stream_duration` at all (Envoy's "new timeouts": the route `timeout`
    /// and the legacy `max_grpc_timeout`/`grpc_timeout_offset` then no longer apply).
    pub present: bool,
    /// `max_stream_duration`.
    pub max: Option<Duration>,
    /// `grpc_timeout_header_max`.
    pub grpc_timeout_header_max: Option<Duration>,
    /// `grpc_timeout_header_offset`.
    pub grpc_timeout_header_offset: Option<Duration>,
}

/// Forwarding to a cluster.
#[derive(Debug, Clone)]
pub struct Forward {
    /// Where.
    pub target: ClusterTarget,
    /// `cluster_not_found_response_code` (503 default).
    pub cluster_not_found_status: u16,
    /// `prefix_rewrite`.
    pub prefix_rewrite: Option<String>,
    /// `regex_rewrite`.
    pub regex_rewrite: Option<RegexRewrite>,
    /// Host rewrite.
    pub host_rewrite: Option<HostRewrite>,
    /// `append_x_forwarded_host`.
    pub append_x_forwarded_host: bool,
    /// `timeout` (`None`: Envoy's 15s; `Some(0)`: none).
    pub timeout: Option<Duration>,
    /// `idle_timeout`.
    pub idle_timeout: Option<Duration>,
    /// `retry_policy` (else the virtual host's).
    pub retry_policy: Option<RetryPolicy>,
    /// `request_mirror_policies`.
    pub mirrors: Vec<Mirror>,
    /// The deprecated `cors` (used when no `typed_per_filter_config` CORS policy applies).
    pub cors: Option<CorsPolicy>,
    /// `priority` HIGH (circuit breaker set).
    pub high_priority: bool,
    /// `hash_policy`.
    pub hash_policy: Vec<HashPolicy>,
    /// `upgrade_configs`.
    pub upgrades: Vec<RouteUpgrade>,
    /// `max_stream_duration`.
    pub max_stream_duration: StreamDuration,
    /// `max_grpc_timeout` (deprecated; still sent by istiod as 0s).
    pub max_grpc_timeout: Option<Duration>,
    /// `grpc_timeout_offset` (deprecated).
    pub grpc_timeout_offset: Option<Duration>,
}

fn cluster_name_required(name: &str, path: &str) -> CompileResult<String> {
    if name.is_empty() {
        Err(ConfigError::new(path, "cluster name is required"))
    } else {
        Ok(name.to_owned())
    }
}

impl Forward {
    fn compile(a: &RawRouteAction, path: &str) -> CompileResult<Self> {
        let target = match &a.cluster_specifier {
            Some(ClusterSpecifier::Cluster(c)) => {
                ClusterTarget::Name(cluster_name_required(c, &field(path, "cluster"))?)
            }
            Some(ClusterSpecifier::ClusterHeader(h)) => {
                ClusterTarget::Header(header_name(h, &field(path, "cluster_header"))?)
            }
            Some(ClusterSpecifier::WeightedClusters(w)) => {
                let wpath = field(path, "weighted_clusters");
                if w.clusters.is_empty() {
                    return Err(ConfigError::new(
                        field(&wpath, "clusters"),
                        "at least one cluster is required",
                    ));
                }
                let mut clusters = Vec::new();
                let mut total: u64 = 0;
                for (i, c) in w.clusters.iter().enumerate() {
                    let cpath = index(&wpath, "clusters", i);
                    let cluster = match (c.name.is_empty(), c.cluster_header.is_empty()) {
                        (false, true) => ClusterRef::Name(c.name.clone()),
                        (true, false) => ClusterRef::Header(header_name(
                            &c.cluster_header,
                            &field(&cpath, "cluster_header"),
                        )?),
                        _ => {
                            return Err(ConfigError::new(
                                cpath,
                                "exactly one of name and cluster_header is required",
                            ));
                        }
                    };
                    let weight = c.weight.as_ref().map_or(0, |v| v.value);
                    total += u64::from(weight);
                    clusters.push(WeightedTarget {
                        cluster,
                        weight,
                        headers: HeaderPolicy::compile(
                            &c.request_headers_to_add,
                            &c.request_headers_to_remove,
                            &c.response_headers_to_add,
                            &c.response_headers_to_remove,
                            &cpath,
                        )?,
                        host_rewrite_literal: c.host_rewrite_specifier.as_ref().map(
                            |cluster_weight::HostRewriteSpecifier::HostRewriteLiteral(h)| h.clone(),
                        ),
                    });
                }
                if total == 0 {
                    return Err(ConfigError::new(
                        field(&wpath, "clusters"),
                        "the total weight must be positive",
                    ));
                }
                #[allow(deprecated)]
                if let Some(t) = &w.total_weight
                    && u64::from(t.value) != total
                {
                    return Err(ConfigError::new(
                        field(&wpath, "total_weight"),
                        format!(
                            "total_weight {} differs from the sum of weights {total}",
                            t.value
                        ),
                    ));
                }
                let (header_name_v, use_hash_policy) = match &w.random_value_specifier {
                    Some(RandomValueSpecifier::HeaderName(h)) => {
                        (Some(header_name(h, &field(&wpath, "header_name"))?), false)
                    }
                    Some(RandomValueSpecifier::UseHashPolicy(b)) => (None, b.value),
                    None => (None, false),
                };
                ClusterTarget::Weighted {
                    clusters,
                    header_name: header_name_v,
                    use_hash_policy,
                }
            }
            Some(_) => {
                return Err(ConfigError::new(
                    path,
                    "cluster specifier plugins are not supported",
                ));
            }
            None => {
                return Err(ConfigError::new(
                    path,
                    "a route action needs cluster, cluster_header or weighted_clusters",
                ));
            }
        };
        let host_rewrite = match &a.host_rewrite_specifier {
            None => None,
            Some(HostRewriteSpecifier::HostRewriteLiteral(h)) => {
                Some(HostRewrite::Literal(h.clone()))
            }
            Some(HostRewriteSpecifier::AutoHostRewrite(b)) => b.value.then_some(HostRewrite::Auto),
            Some(HostRewriteSpecifier::HostRewriteHeader(h)) => Some(HostRewrite::Header(
                header_name(h, &field(path, "host_rewrite_header"))?,
            )),
            Some(HostRewriteSpecifier::HostRewritePathRegex(r)) => Some(HostRewrite::PathRegex(
                RegexRewrite::compile(r, &field(path, "host_rewrite_path_regex"))?,
            )),
            #[allow(unreachable_patterns)]
            Some(_) => return Err(ConfigError::new(path, "this host rewrite is not supported")),
        };
        let prefix_rewrite = (!a.prefix_rewrite.is_empty()).then(|| a.prefix_rewrite.clone());
        let regex_rewrite = a
            .regex_rewrite
            .as_ref()
            .map(|r| RegexRewrite::compile(r, &field(path, "regex_rewrite")))
            .transpose()?;
        if prefix_rewrite.is_some() && regex_rewrite.is_some() {
            return Err(ConfigError::new(
                path,
                "prefix_rewrite and regex_rewrite are mutually exclusive",
            ));
        }
        let hash_policy = hash::compile(&a.hash_policy, path)?;
        let upgrades = a
            .upgrade_configs
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let upath = index(path, "upgrade_configs", i);
                if u.upgrade_type.is_empty() {
                    return Err(ConfigError::new(
                        field(&upath, "upgrade_type"),
                        "upgrade_type is required",
                    ));
                }
                let connect = u.connect_config.as_ref().map(|c| c.allow_post);
                if connect.is_some() && !u.upgrade_type.eq_ignore_ascii_case("CONNECT") {
                    return Err(ConfigError::new(
                        field(&upath, "connect_config"),
                        "connect_config is only valid for CONNECT",
                    ));
                }
                Ok(RouteUpgrade {
                    upgrade_type: u.upgrade_type.clone(),
                    enabled: u.enabled.is_none_or(|b| b.value),
                    connect,
                })
            })
            .collect::<CompileResult<_>>()?;
        let msd = a.max_stream_duration.as_ref();
        let mpath = field(path, "max_stream_duration");
        #[allow(deprecated)]
        let (max_grpc_timeout, grpc_timeout_offset) = (
            opt_duration(
                a.max_grpc_timeout.as_ref(),
                &field(path, "max_grpc_timeout"),
            )?,
            opt_duration(
                a.grpc_timeout_offset.as_ref(),
                &field(path, "grpc_timeout_offset"),
            )?,
        );
        Ok(Forward {
            target,
            cluster_not_found_status: match ClusterNotFoundResponseCode::try_from(
                a.cluster_not_found_response_code,
            ) {
                Ok(ClusterNotFoundResponseCode::NotFound) => 404,
                Ok(ClusterNotFoundResponseCode::InternalServerError) => 500,
                _ => 503,
            },
            prefix_rewrite,
            regex_rewrite,
            host_rewrite,
            append_x_forwarded_host: a.append_x_forwarded_host,
            timeout: opt_duration(a.timeout.as_ref(), &field(path, "timeout"))?,
            idle_timeout: opt_duration(a.idle_timeout.as_ref(), &field(path, "idle_timeout"))?,
            retry_policy: a
                .retry_policy
                .as_ref()
                .map(|r| RetryPolicy::compile(r, &field(path, "retry_policy")))
                .transpose()?,
            mirrors: mirrors(&a.request_mirror_policies, path)?,
            #[allow(deprecated)]
            cors: a
                .cors
                .as_ref()
                .map(|c| CorsPolicy::compile_route(c, &field(path, "cors")))
                .transpose()?,
            high_priority: RoutingPriority::try_from(a.priority) == Ok(RoutingPriority::High),
            hash_policy,
            upgrades,
            max_stream_duration: StreamDuration {
                present: msd.is_some(),
                max: opt_duration(
                    msd.and_then(|m| m.max_stream_duration.as_ref()),
                    &field(&mpath, "max_stream_duration"),
                )?,
                grpc_timeout_header_max: opt_duration(
                    msd.and_then(|m| m.grpc_timeout_header_max.as_ref()),
                    &field(&mpath, "grpc_timeout_header_max"),
                )?,
                grpc_timeout_header_offset: opt_duration(
                    msd.and_then(|m| m.grpc_timeout_header_offset.as_ref()),
                    &field(&mpath, "grpc_timeout_header_offset"),
                )?,
            },
            max_grpc_timeout,
            grpc_timeout_offset,
        })
    }
}

/// Where a redirect sends the client.
#[derive(Debug, Clone)]
pub enum RedirectPath {
    /// Keep the path.
    Keep,
    /// Replace the whole path.
    Path(String),
    /// Replace the matched prefix.
    Prefix(String),
    /// Regex substitution.
    Regex(RegexRewrite),
}

/// A redirect.
#[derive(Debug, Clone)]
pub struct Redirect {
    /// New scheme (`https_redirect` → `https`).
    pub scheme: Option<String>,
    /// `host_redirect`.
    pub host: Option<String>,
    /// `port_redirect`.
    pub port: Option<u32>,
    /// Path change.
    pub path: RedirectPath,
    /// Status (301 default).
    pub status: u16,
    /// `strip_query`.
    pub strip_query: bool,
}

/// A direct response.
#[derive(Debug, Clone)]
pub struct DirectResponse {
    /// Status.
    pub status: u16,
    /// Body.
    pub body: Option<String>,
}

/// What a route does.
#[derive(Debug, Clone)]
pub enum Action {
    /// Forward upstream.
    Forward(Box<Forward>),
    /// Redirect.
    Redirect(Box<Redirect>),
    /// Answer directly.
    DirectResponse(DirectResponse),
}

/// A compiled route.
#[derive(Debug, Clone)]
pub struct Route {
    /// `name`.
    pub name: String,
    /// `match`.
    pub matcher: RouteMatch,
    /// The action.
    pub action: Action,
    /// Header operations.
    pub headers: HeaderPolicy,
    /// `typed_per_filter_config`.
    pub per_filter: PerFilter,
}

impl Route {
    fn compile(r: &RawRoute, max_body: u32, path: &str) -> CompileResult<Self> {
        let m = r
            .r#match
            .as_ref()
            .ok_or_else(|| ConfigError::new(field(path, "match"), "match is required"))?;
        let action = match &r.action {
            Some(RawAction::Route(a)) => {
                Action::Forward(Box::new(Forward::compile(a, &field(path, "route"))?))
            }
            Some(RawAction::Redirect(rd)) => {
                let rpath = field(path, "redirect");
                let scheme = match &rd.scheme_rewrite_specifier {
                    Some(SchemeRewriteSpecifier::HttpsRedirect(true)) => Some("https".to_owned()),
                    Some(SchemeRewriteSpecifier::SchemeRedirect(s)) if !s.is_empty() => {
                        Some(s.to_ascii_lowercase())
                    }
                    _ => None,
                };
                let p = match &rd.path_rewrite_specifier {
                    None => RedirectPath::Keep,
                    Some(PathRewriteSpecifier::PathRedirect(p)) => RedirectPath::Path(p.clone()),
                    Some(PathRewriteSpecifier::PrefixRewrite(p)) => RedirectPath::Prefix(p.clone()),
                    Some(PathRewriteSpecifier::RegexRewrite(x)) => RedirectPath::Regex(
                        RegexRewrite::compile(x, &field(&rpath, "regex_rewrite"))?,
                    ),
                    Some(_) => {
                        return Err(ConfigError::new(
                            &rpath,
                            "this path rewrite is not supported",
                        ));
                    }
                };
                if rd.port_redirect > 65_535 {
                    return Err(ConfigError::new(
                        field(&rpath, "port_redirect"),
                        "port out of range",
                    ));
                }
                Action::Redirect(Box::new(Redirect {
                    scheme,
                    host: (!rd.host_redirect.is_empty()).then(|| rd.host_redirect.clone()),
                    port: (rd.port_redirect != 0).then_some(rd.port_redirect),
                    path: p,
                    status: match RedirectResponseCode::try_from(rd.response_code) {
                        Ok(RedirectResponseCode::Found) => 302,
                        Ok(RedirectResponseCode::SeeOther) => 303,
                        Ok(RedirectResponseCode::TemporaryRedirect) => 307,
                        Ok(RedirectResponseCode::PermanentRedirect) => 308,
                        _ => 301,
                    },
                    strip_query: rd.strip_query,
                }))
            }
            Some(RawAction::DirectResponse(d)) => {
                let dpath = field(path, "direct_response");
                if !(200..600).contains(&d.status) {
                    return Err(ConfigError::new(
                        field(&dpath, "status"),
                        format!("{} is not an HTTP status in [200, 600)", d.status),
                    ));
                }
                let body = d
                    .body
                    .as_ref()
                    .map(|b| inline_text(b, &field(&dpath, "body")))
                    .transpose()?;
                if let Some(b) = &body
                    && b.len() > max_body as usize
                {
                    return Err(ConfigError::new(
                        field(&dpath, "body"),
                        format!(
                            "{} bytes exceed max_direct_response_body_size_bytes {max_body}",
                            b.len()
                        ),
                    ));
                }
                Action::DirectResponse(DirectResponse {
                    status: d.status as u16,
                    body,
                })
            }
            Some(_) => return Err(ConfigError::new(path, "this route action is not supported")),
            None => {
                return Err(ConfigError::new(
                    path,
                    "a route needs route, redirect or direct_response",
                ));
            }
        };
        let matcher = RouteMatch::compile(m, &field(path, "match"))?;
        Ok(Route {
            name: r.name.clone(),
            matcher,
            action,
            headers: HeaderPolicy::compile(
                &r.request_headers_to_add,
                &r.request_headers_to_remove,
                &r.response_headers_to_add,
                &r.response_headers_to_remove,
                path,
            )?,
            per_filter: per_filter(&r.typed_per_filter_config, path)?,
        })
    }
}

/// A compiled virtual host.
#[derive(Debug, Clone)]
pub struct VirtualHost {
    /// `name`.
    pub name: String,
    /// `domains`.
    pub domains: Vec<Domain>,
    /// `routes`, first match wins.
    pub routes: Vec<Route>,
    /// Which `routes` can match a path (built from `routes`; selection goes through it).
    pub route_index: RouteIndex,
    /// Header operations.
    pub headers: HeaderPolicy,
    /// `retry_policy` (routes without their own use it).
    pub retry_policy: Option<RetryPolicy>,
    /// `request_mirror_policies`.
    pub mirrors: Vec<Mirror>,
    /// The deprecated `cors` (used when no `typed_per_filter_config` CORS policy applies).
    pub cors: Option<CorsPolicy>,
    /// `include_request_attempt_count`.
    pub include_request_attempt_count: bool,
    /// `include_attempt_count_in_response`.
    pub include_attempt_count_in_response: bool,
    /// `typed_per_filter_config`.
    pub per_filter: PerFilter,
}

impl VirtualHost {
    fn compile(v: &RawVirtualHost, max_body: u32, path: &str) -> CompileResult<Self> {
        if v.name.is_empty() {
            return Err(ConfigError::new(field(path, "name"), "name is required"));
        }
        if v.domains.is_empty() {
            return Err(ConfigError::new(
                field(path, "domains"),
                "at least one domain is required",
            ));
        }
        let routes: Vec<Route> = v
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| Route::compile(r, max_body, &index(path, "routes", i)))
            .collect::<CompileResult<_>>()?;
        Ok(VirtualHost {
            name: v.name.clone(),
            domains: v
                .domains
                .iter()
                .enumerate()
                .map(|(i, d)| Domain::parse(d, &index(path, "domains", i)))
                .collect::<CompileResult<_>>()?,
            route_index: RouteIndex::build(&routes),
            routes,
            headers: HeaderPolicy::compile(
                &v.request_headers_to_add,
                &v.request_headers_to_remove,
                &v.response_headers_to_add,
                &v.response_headers_to_remove,
                path,
            )?,
            retry_policy: v
                .retry_policy
                .as_ref()
                .map(|r| RetryPolicy::compile(r, &field(path, "retry_policy")))
                .transpose()?,
            mirrors: mirrors(&v.request_mirror_policies, path)?,
            #[allow(deprecated)]
            cors: v
                .cors
                .as_ref()
                .map(|c| CorsPolicy::compile_route(c, &field(path, "cors")))
                .transpose()?,
            include_request_attempt_count: v.include_request_attempt_count,
            include_attempt_count_in_response: v.include_attempt_count_in_response,
            per_filter: per_filter(&v.typed_per_filter_config, path)?,
        })
    }
}

/// A compiled route configuration.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// `name`.
    pub name: String,
    /// `virtual_hosts`.
    pub virtual_hosts: Vec<VirtualHost>,
    /// `internal_only_headers`: stripped from external requests.
    pub internal_only_headers: Vec<String>,
    /// Header operations.
    pub headers: HeaderPolicy,
    /// `most_specific_header_mutations_wins`.
    pub most_specific_header_mutations_wins: bool,
    /// `validate_clusters`.
    pub validate_clusters: bool,
    /// `max_direct_response_body_size_bytes`.
    pub max_direct_response_body_size_bytes: u32,
    /// `request_mirror_policies`.
    pub mirrors: Vec<Mirror>,
    /// `ignore_port_in_host_matching`.
    pub ignore_port_in_host_matching: bool,
    /// `ignore_path_parameters_in_path_matching`.
    pub ignore_path_parameters_in_path_matching: bool,
    /// `typed_per_filter_config`.
    pub per_filter: PerFilter,
    /// `virtual_hosts` by domain (built from them; selection goes through it).
    pub domain_index: DomainIndex,
}

impl RouteConfig {
    /// Compiles `r` (at `path`). Identical regexes in the table are compiled once and shared: istiod
    /// repeats a VirtualService's header regex on every route it generates from the rule.
    pub fn compile(r: &RouteConfiguration, path: &str) -> CompileResult<Self> {
        share_regexes(|| Self::compile_shared(r, path))
    }

    fn compile_shared(r: &RouteConfiguration, path: &str) -> CompileResult<Self> {
        let max_body = r
            .max_direct_response_body_size_bytes
            .as_ref()
            .map_or(DEFAULT_MAX_DIRECT_RESPONSE_BODY, |v| v.value);
        let virtual_hosts = r
            .virtual_hosts
            .iter()
            .enumerate()
            .map(|(i, v)| VirtualHost::compile(v, max_body, &index(path, "virtual_hosts", i)))
            .collect::<CompileResult<Vec<_>>>()?;
        // Envoy: a domain may appear in one virtual host only.
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for (i, raw) in r.virtual_hosts.iter().enumerate() {
            for (j, d) in raw.domains.iter().enumerate() {
                let d = d.to_ascii_lowercase();
                if let Some(first) = seen.insert(d.clone(), i) {
                    return Err(ConfigError::new(
                        index(&index(path, "virtual_hosts", i), "domains", j),
                        format!("domain '{d}' is already used by virtual_hosts[{first}]"),
                    ));
                }
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, v) in virtual_hosts.iter().enumerate() {
            if !names.insert(v.name.as_str()) {
                return Err(ConfigError::new(
                    field(&index(path, "virtual_hosts", i), "name"),
                    format!("duplicate virtual host name '{}'", v.name),
                ));
            }
        }
        Ok(RouteConfig {
            name: r.name.clone(),
            domain_index: DomainIndex::build(&virtual_hosts),
            virtual_hosts,
            internal_only_headers: r
                .internal_only_headers
                .iter()
                .enumerate()
                .map(|(i, h)| header_name(h, &index(path, "internal_only_headers", i)))
                .collect::<CompileResult<_>>()?,
            headers: HeaderPolicy::compile(
                &r.request_headers_to_add,
                &r.request_headers_to_remove,
                &r.response_headers_to_add,
                &r.response_headers_to_remove,
                path,
            )?,
            most_specific_header_mutations_wins: r.most_specific_header_mutations_wins,
            validate_clusters: r.validate_clusters.is_some_and(|b| b.value),
            max_direct_response_body_size_bytes: max_body,
            mirrors: mirrors(&r.request_mirror_policies, path)?,
            ignore_port_in_host_matching: r.ignore_port_in_host_matching,
            ignore_path_parameters_in_path_matching: r.ignore_path_parameters_in_path_matching,
            per_filter: per_filter(&r.typed_per_filter_config, path)?,
        })
    }

    /// The virtual host for `host` (Envoy's order: exact, longest suffix, longest prefix, `*`).
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        let lower;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = host.to_ascii_lowercase();
            lower.as_str()
        } else {
            host
        };
        self.domain_index
            .find(host)
            .and_then(|i| self.virtual_hosts.get(i))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value as Json, json};
    use waypoint_proto::{json as pjson, resource::ResourceKind};

    use super::*;
    use crate::config::{ConfigStore, Update};

    fn retry(policy: Json) -> CompileResult<RetryPolicy> {
        let raw: RawRetryPolicy = pjson::from_json(&policy).expect("a RetryPolicy");
        RetryPolicy::compile(&raw, "retry_policy")
    }

    /// The NACK of a route table whose only route has `policy`, if any (allowlist and compile).
    fn nack(policy: Json) -> Option<String> {
        let doc = json!({"name": "r", "virtual_hosts": [{"name": "v", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c", "retry_policy": policy}}]}]});
        let update = Update {
            name: "r".into(),
            version: "1".into(),
            resource: pjson::any_from_json(ResourceKind::Route.type_url(), &doc).expect("encodes"),
        };
        ConfigStore::default()
            .apply(ResourceKind::Route, &[update], &[])
            .into_iter()
            .next()
            .map(|e| e.message)
    }

    const PREVIOUS_PRIORITIES_URL: &str = "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig";
    const PREFIX: &str = "virtual_hosts[0].routes[0].route.retry_policy";

    #[test]
    fn istios_retry_remote_localities_compiles() {
        // What istiod renders for `retries.retryRemoteLocalities: true` (retry.go).
        let p = json!({"retry_on": "5xx", "num_retries": 2,
            "retry_priority": {"name": "envoy.retry_priorities.previous_priorities",
                "typed_config": {"@type": PREVIOUS_PRIORITIES_URL, "update_frequency": 2}}});
        assert_eq!(nack(p.clone()), None);
        let compiled = retry(p).expect("compiles");
        assert_eq!(
            compiled.retry_priority,
            Some(RetryPriority {
                update_frequency: 2
            })
        );
        // The same config inside a TypedStruct.
        let wrapped = json!({"retry_on": "5xx", "retry_priority": {"name": "p", "typed_config": {
            "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
            "type_url": PREVIOUS_PRIORITIES_URL, "value": {"update_frequency": 3}}}});
        assert_eq!(
            retry(wrapped).expect("compiles").retry_priority,
            Some(RetryPriority {
                update_frequency: 3
            })
        );
        // Envoy builds the plugin only when it has a name.
        let unnamed = json!({"retry_priority": {"typed_config": {
            "@type": PREVIOUS_PRIORITIES_URL, "update_frequency": 1}}});
        assert_eq!(retry(unnamed).expect("compiles").retry_priority, None);
    }

    #[test]
    fn bad_retry_priorities_are_nacked_with_their_path() {
        let p = json!({"retry_priority": {"name": "p", "typed_config": {
            "@type": PREVIOUS_PRIORITIES_URL, "update_frequency": 0}}});
        assert_eq!(
            nack(p),
            Some(format!(
                "{PREFIX}.retry_priority.typed_config.update_frequency: must be greater than 0, got 0"
            ))
        );
        let p = json!({"retry_priority": {"name": "p"}});
        assert_eq!(
            nack(p),
            Some(format!(
                "{PREFIX}.retry_priority.typed_config: typed_config is required"
            ))
        );
        // A host predicate is not a retry priority.
        let p = json!({"retry_priority": {"name": "p", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}});
        let msg = nack(p).expect("nack");
        assert!(
            msg.starts_with(&format!("{PREFIX}.retry_priority.typed_config: ")),
            "{msg}"
        );
    }

    #[test]
    fn unimplemented_retry_extensions_and_fields_are_nacked_with_their_path() {
        for predicate in [
            "envoy.extensions.retry.host.omit_canary_hosts.v3.OmitCanaryHostsPredicate",
            "envoy.extensions.retry.host.omit_host_metadata.v3.OmitHostMetadataConfig",
        ] {
            let p = json!({"retry_on": "5xx", "retry_host_predicate": [
                {"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}},
                {"name": "x", "typed_config": {"@type": format!("type.googleapis.com/{predicate}")}}]});
            assert_eq!(
                nack(p),
                Some(format!(
                    "{PREFIX}.retry_host_predicate[1].typed_config: extension \
                     type.googleapis.com/{predicate} is not supported"
                ))
            );
        }
        let p = json!({"retry_on": "envoy-ratelimited", "rate_limited_retry_back_off": {
            "reset_headers": [{"name": "retry-after"}]}});
        assert_eq!(
            nack(p),
            Some(format!(
                "{PREFIX}.rate_limited_retry_back_off: field 'rate_limited_retry_back_off' of \
                 envoy.config.route.v3.RetryPolicy is not supported"
            ))
        );
        let p = json!({"retry_on": "5xx", "retry_options_predicates": [{"name": "x"}]});
        let msg = nack(p).expect("nack");
        assert!(
            msg.starts_with(&format!("{PREFIX}.retry_options_predicates")),
            "{msg}"
        );
    }

    #[test]
    fn back_off_follows_envoys_millisecond_rules() {
        let back_off = |b: Json| retry(json!({"retry_on": "5xx", "retry_back_off": b}));
        let ok = |b: Json| back_off(b).expect("compiles").back_off;
        let ms = Duration::from_millis;
        assert_eq!(ok(json!({"base_interval": "0.1s"})), (ms(100), ms(1000)));
        assert_eq!(
            ok(json!({"base_interval": "0.0005s", "max_interval": "0.0002s"})),
            (ms(1), ms(1)),
            "sub-millisecond intervals round up to 1 ms"
        );
        assert_eq!(
            ok(json!({"base_interval": "0.0105s", "max_interval": "0.02s"})),
            (ms(10), ms(20))
        );
        let err = |b: Json| back_off(b).expect_err("rejected").to_string();
        assert!(err(json!({"max_interval": "1s"})).contains("base_interval is required"));
        assert!(
            err(json!({"base_interval": "1s", "max_interval": "0.5s"}))
                .contains("max_interval is below base_interval")
        );
        assert!(
            err(json!({"base_interval": "0.001s", "max_interval": "0s"})).contains("max_interval")
        );
        // Unset, Envoy's 25 ms / 250 ms.
        let default = retry(json!({"retry_on": "5xx"})).expect("compiles");
        assert_eq!(default.back_off, (ms(25), ms(250)));
        assert_eq!(default.retry_priority, None);
    }
}
