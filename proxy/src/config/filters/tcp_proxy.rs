//! `tcp_proxy`: to one cluster or weighted clusters, optionally tunnelled over HTTP CONNECT/POST
//! (`tunneling_config`, how `connect_originate` originates HBONE).

use std::time::Duration;

use waypoint_proto::envoy::{
    extensions::filters::network::tcp_proxy::v3::{
        TcpProxy as RawTcpProxy, tcp_proxy::ClusterSpecifier,
    },
    r#type::v3::hash_policy::PolicySpecifier,
};

use crate::config::{
    CompileResult, ConfigError,
    access_log::{self, AccessLog},
    field,
    format::{Format, FormatContext},
    headers::HeaderOp,
    index, opt_duration,
};

/// Which cluster(s) a connection goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpTarget {
    /// One cluster.
    Cluster(String),
    /// Weighted choice.
    Weighted(Vec<(String, u32)>),
}

/// How a connection is hashed (for ring hash / maglev upstreams).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpHash {
    /// The downstream source IP.
    SourceIp,
    /// A filter state object.
    FilterState(String),
}

/// HTTP tunnelling of the TCP payload.
#[derive(Debug, Clone)]
pub struct Tunneling {
    /// `hostname`: the CONNECT `:authority` (a format, e.g. `%DOWNSTREAM_LOCAL_ADDRESS%`).
    pub hostname: Format,
    /// `use_post`: POST instead of CONNECT.
    pub use_post: bool,
    /// `post_path` (with `use_post`).
    pub post_path: Option<String>,
    /// `headers_to_add` to the CONNECT request.
    pub headers_to_add: Vec<HeaderOp>,
    /// `propagate_response_headers` into filter state.
    pub propagate_response_headers: bool,
    /// `propagate_response_trailers` into filter state.
    pub propagate_response_trailers: bool,
}

/// A compiled tcp_proxy.
#[derive(Debug, Clone)]
pub struct TcpProxy {
    /// `stat_prefix`.
    pub stat_prefix: String,
    /// `cluster` / `weighted_clusters`.
    pub target: TcpTarget,
    /// `idle_timeout` (`None`: Envoy's 1h default; `Some(0)`: none).
    pub idle_timeout: Option<Duration>,
    /// `downstream_idle_timeout`: validated, not applied (Envoy does not implement it either).
    pub downstream_idle_timeout: Option<Duration>,
    /// `upstream_idle_timeout`: validated, not applied (Envoy does not implement it either).
    pub upstream_idle_timeout: Option<Duration>,
    /// `max_connect_attempts` (default 1).
    pub max_connect_attempts: u32,
    /// `max_downstream_connection_duration`.
    pub max_downstream_connection_duration: Option<Duration>,
    /// `hash_policy`.
    pub hash_policy: Vec<TcpHash>,
    /// `tunneling_config`.
    pub tunneling: Option<Tunneling>,
    /// `access_log`.
    pub access_log: Vec<AccessLog>,
}

impl TcpProxy {
    /// Compiles `t` (at `path`, the typed_config).
    pub fn compile(t: &RawTcpProxy, path: &str) -> CompileResult<Self> {
        if t.stat_prefix.is_empty() {
            return Err(ConfigError::new(
                field(path, "stat_prefix"),
                "stat_prefix is required",
            ));
        }
        let target = match &t.cluster_specifier {
            Some(ClusterSpecifier::Cluster(c)) if !c.is_empty() => TcpTarget::Cluster(c.clone()),
            Some(ClusterSpecifier::WeightedClusters(w)) => {
                let wpath = field(path, "weighted_clusters");
                if w.clusters.is_empty() {
                    return Err(ConfigError::new(
                        field(&wpath, "clusters"),
                        "at least one cluster is required",
                    ));
                }
                let mut out = Vec::new();
                for (i, c) in w.clusters.iter().enumerate() {
                    if c.name.is_empty() {
                        return Err(ConfigError::new(
                            field(&index(&wpath, "clusters", i), "name"),
                            "name is required",
                        ));
                    }
                    out.push((c.name.clone(), c.weight));
                }
                if out.iter().all(|(_, w)| *w == 0) {
                    return Err(ConfigError::new(
                        field(&wpath, "clusters"),
                        "the total weight must be positive",
                    ));
                }
                TcpTarget::Weighted(out)
            }
            _ => {
                return Err(ConfigError::new(
                    path,
                    "tcp_proxy needs a cluster or weighted_clusters",
                ));
            }
        };
        let hash_policy = t
            .hash_policy
            .iter()
            .enumerate()
            .map(|(i, h)| match &h.policy_specifier {
                Some(PolicySpecifier::SourceIp(_)) => Ok(TcpHash::SourceIp),
                Some(PolicySpecifier::FilterState(f)) if !f.key.is_empty() => {
                    Ok(TcpHash::FilterState(f.key.clone()))
                }
                _ => Err(ConfigError::new(
                    index(path, "hash_policy", i),
                    "source_ip or filter_state with a key is required",
                )),
            })
            .collect::<CompileResult<Vec<_>>>()?;
        let tunneling = match &t.tunneling_config {
            None => None,
            Some(c) => {
                let tpath = field(path, "tunneling_config");
                if c.hostname.is_empty() {
                    return Err(ConfigError::new(
                        field(&tpath, "hostname"),
                        "hostname is required",
                    ));
                }
                if !c.post_path.is_empty() && !c.use_post {
                    return Err(ConfigError::new(
                        field(&tpath, "post_path"),
                        "post_path needs use_post",
                    ));
                }
                Some(Tunneling {
                    hostname: Format::parse(
                        &c.hostname,
                        FormatContext::TunnelHostname,
                        &field(&tpath, "hostname"),
                    )?,
                    use_post: c.use_post,
                    post_path: (!c.post_path.is_empty()).then(|| c.post_path.clone()),
                    headers_to_add: c
                        .headers_to_add
                        .iter()
                        .enumerate()
                        .map(|(i, h)| HeaderOp::compile(h, &index(&tpath, "headers_to_add", i)))
                        .collect::<CompileResult<_>>()?,
                    propagate_response_headers: c.propagate_response_headers,
                    propagate_response_trailers: c.propagate_response_trailers,
                })
            }
        };
        Ok(TcpProxy {
            stat_prefix: t.stat_prefix.clone(),
            target,
            idle_timeout: opt_duration(t.idle_timeout.as_ref(), &field(path, "idle_timeout"))?,
            downstream_idle_timeout: opt_duration(
                t.downstream_idle_timeout.as_ref(),
                &field(path, "downstream_idle_timeout"),
            )?,
            upstream_idle_timeout: opt_duration(
                t.upstream_idle_timeout.as_ref(),
                &field(path, "upstream_idle_timeout"),
            )?,
            max_connect_attempts: t
                .max_connect_attempts
                .as_ref()
                .map_or(1, |v| v.value.max(1)),
            max_downstream_connection_duration: opt_duration(
                t.max_downstream_connection_duration.as_ref(),
                &field(path, "max_downstream_connection_duration"),
            )?,
            hash_policy,
            tunneling,
            access_log: access_log::compile_all(&t.access_log, path)?,
        })
    }
}
