//! Envoy response flags and the one error type of the data path: every failure maps to a status
//! code, a response flag (`UF`, `UH`, `NR`, …) and a details string, kept for access logs and
//! metrics (`response_flags` label).

use std::fmt;

use http::StatusCode;

use crate::http::timeout::Expired;

/// Envoy's response flags (short names, as in `%RESPONSE_FLAGS%`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResponseFlag {
    /// `UH`: no healthy upstream host.
    NoHealthyUpstream,
    /// `UF`: upstream connection failure.
    UpstreamConnectionFailure,
    /// `UO`: upstream overflow (circuit breaking).
    UpstreamOverflow,
    /// `NR`: no route (or no filter chain) found.
    NoRouteFound,
    /// `URX`: retry limit or max connect attempts reached.
    UpstreamRetryLimitExceeded,
    /// `NC`: no cluster found.
    NoClusterFound,
    /// `DC`: downstream connection termination.
    DownstreamConnectionTermination,
    /// `UC`: upstream connection termination.
    UpstreamConnectionTermination,
    /// `UT`: upstream request timeout.
    UpstreamRequestTimeout,
    /// `UR`: upstream remote reset.
    UpstreamRemoteReset,
    /// `LR`: local reset.
    LocalReset,
    /// `DPE`: downstream protocol error.
    DownstreamProtocolError,
    /// `UPE`: upstream protocol error.
    UpstreamProtocolError,
    /// `SI`: stream idle timeout.
    StreamIdleTimeout,
    /// `UAEX`: unauthorized (external).
    UnauthorizedExternalService,
    /// `RBAC`: denied by RBAC.
    RbacAccessDenied,
    /// `FI`: fault injected (abort).
    FaultInjected,
    /// `DI`: delay injected.
    DelayInjected,
    /// `RL`: rate limited.
    RateLimited,
    /// `UMSDR`: the upstream stream exceeded the cluster's `max_stream_duration`.
    UpstreamMaxStreamDurationReached,
    /// `DT`: a connection exceeded `max_connection_duration` /
    /// `max_downstream_connection_duration`.
    DurationTimeout,
}

impl ResponseFlag {
    /// The short name.
    pub fn short(self) -> &'static str {
        match self {
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamConnectionFailure => "UF",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::NoRouteFound => "NR",
            ResponseFlag::UpstreamRetryLimitExceeded => "URX",
            ResponseFlag::NoClusterFound => "NC",
            ResponseFlag::DownstreamConnectionTermination => "DC",
            ResponseFlag::UpstreamConnectionTermination => "UC",
            ResponseFlag::UpstreamRequestTimeout => "UT",
            ResponseFlag::UpstreamRemoteReset => "UR",
            ResponseFlag::LocalReset => "LR",
            ResponseFlag::DownstreamProtocolError => "DPE",
            ResponseFlag::UpstreamProtocolError => "UPE",
            ResponseFlag::StreamIdleTimeout => "SI",
            ResponseFlag::UnauthorizedExternalService => "UAEX",
            ResponseFlag::RbacAccessDenied => "RBAC",
            ResponseFlag::FaultInjected => "FI",
            ResponseFlag::DelayInjected => "DI",
            ResponseFlag::RateLimited => "RL",
            ResponseFlag::UpstreamMaxStreamDurationReached => "UMSDR",
            ResponseFlag::DurationTimeout => "DT",
        }
    }
}

impl fmt::Display for ResponseFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short())
    }
}

/// Envoy's order of the flags in `%RESPONSE_FLAGS%` (`ResponseFlagUtils`), for the ones we set.
const ORDER: [ResponseFlag; 21] = [
    ResponseFlag::NoHealthyUpstream,
    ResponseFlag::UpstreamRequestTimeout,
    ResponseFlag::LocalReset,
    ResponseFlag::UpstreamRemoteReset,
    ResponseFlag::UpstreamConnectionFailure,
    ResponseFlag::UpstreamConnectionTermination,
    ResponseFlag::UpstreamOverflow,
    ResponseFlag::NoRouteFound,
    ResponseFlag::DelayInjected,
    ResponseFlag::FaultInjected,
    ResponseFlag::RateLimited,
    ResponseFlag::UnauthorizedExternalService,
    ResponseFlag::DownstreamConnectionTermination,
    ResponseFlag::UpstreamRetryLimitExceeded,
    ResponseFlag::StreamIdleTimeout,
    ResponseFlag::DownstreamProtocolError,
    ResponseFlag::UpstreamMaxStreamDurationReached,
    ResponseFlag::DurationTimeout,
    ResponseFlag::UpstreamProtocolError,
    ResponseFlag::NoClusterFound,
    ResponseFlag::RbacAccessDenied,
];

/// The response flags of one stream (a response may carry several, e.g. `DI,UF`). Travels in
/// response extensions; rendered as Envoy does: comma-joined in Envoy's order, `-` when empty.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags(u32);

impl ResponseFlags {
    /// A set holding `flag`.
    pub fn of(flag: ResponseFlag) -> ResponseFlags {
        let mut f = ResponseFlags::default();
        f.insert(flag);
        f
    }

    /// Adds `flag`.
    pub fn insert(&mut self, flag: ResponseFlag) {
        self.0 |= 1 << (flag as u32);
    }

    /// Adds every flag of `other`.
    pub fn extend(&mut self, other: ResponseFlags) {
        self.0 |= other.0;
    }

    /// Whether `flag` is set.
    pub fn contains(self, flag: ResponseFlag) -> bool {
        self.0 & (1 << (flag as u32)) != 0
    }

    /// Whether no flag is set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The flags, in Envoy's order.
    pub fn iter(self) -> impl Iterator<Item = ResponseFlag> {
        ORDER.into_iter().filter(move |f| self.contains(*f))
    }

    /// Adds `flag` to the set a response carries.
    pub fn add_to<B>(resp: &mut http::Response<B>, flag: ResponseFlag) {
        match resp.extensions_mut().get_mut::<ResponseFlags>() {
            Some(set) => set.insert(flag),
            None => {
                resp.extensions_mut().insert(ResponseFlags::of(flag));
            }
        }
    }

    /// The set a response carries.
    pub fn of_response<B>(resp: &http::Response<B>) -> ResponseFlags {
        resp.extensions()
            .get::<ResponseFlags>()
            .copied()
            .unwrap_or_default()
    }
}

impl fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("-");
        }
        for (i, flag) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(flag.short())?;
        }
        Ok(())
    }
}

/// A failure on the data path.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No route matched.
    #[error("route_not_found")]
    NoRoute,
    /// No filter chain matched the connection.
    #[error("filter_chain_not_found")]
    NoFilterChain,
    /// The route names a cluster we do not have.
    #[error("cluster_not_found: {0}")]
    NoCluster(String),
    /// The cluster has no host to pick.
    #[error("no_healthy_upstream: {0}")]
    NoHealthyUpstream(String),
    /// Connecting failed.
    #[error("upstream_reset_before_response_started{{connection_failure,{0}}}")]
    ConnectFailure(String),
    /// A retriable failure that was not tried again: the retries (or tcp_proxy's connect
    /// attempts) were used up (`URX`), or the `max_retries` breaker was open (`UO`). The reply is
    /// the last failure's (e.g. 503 `UF` or a per-try timeout's 504 `UT`) with `flag` added, as
    /// Envoy's router sets both.
    #[error("{last} (not retried: {flag})")]
    NotRetried {
        /// The last attempt's failure.
        last: Box<ProxyError>,
        /// `URX` or `UO`.
        flag: ResponseFlag,
        /// Whether an earlier attempt was retried (Envoy's reply body then says so).
        retried: bool,
    },
    /// The upstream closed or reset before answering.
    #[error("upstream_reset_before_response_started{{{0}}}")]
    UpstreamReset(String),
    /// The upstream spoke badly.
    #[error("upstream protocol error: {0}")]
    UpstreamProtocol(String),
    /// The route `timeout` fired (`upstream_response_timeout`). The router's per-try timers are
    /// [`ProxyError::StreamTimeout`] with their own kind, as Envoy reports them apart.
    #[error("upstream_response_timeout")]
    Timeout,
    /// A stream timer fired before the response started: the HCM's (`stream_idle_timeout`,
    /// `request_timeout`, `max_stream_duration`), the router's per attempt (`per_try_timeout`,
    /// `per_try_idle_timeout`: 504 `UT`, details `upstream_per_try_timeout` /
    /// `upstream_per_try_idle_timeout`) or the cluster's `max_stream_duration`.
    #[error("{kind}")]
    StreamTimeout {
        /// Which timer.
        kind: Expired,
        /// Whether the whole request had been received (504; else 408).
        request_complete: bool,
    },
    /// The downstream request is malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A circuit breaker is open.
    #[error("upstream overflow: {0}")]
    Overflow(String),
    /// Path normalization redirects (`UNESCAPE_AND_REDIRECT`) to this location.
    #[error("path normalization redirect to {0}")]
    Redirect(String),
    /// jwt_authn refused the request (its status, reason and `www-authenticate`).
    #[error("jwt_authn: {0}")]
    Unauthorized(Box<crate::http::jwt::Denial>),
    /// RBAC denied the request or connection.
    #[error("rbac_access_denied: {0}")]
    RbacDenied(String),
    /// The local rate limit filter refused the request (its configured status).
    #[error("local_rate_limited")]
    RateLimited(StatusCode),
    /// The configuration asks for something this data path cannot do for this request.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl ProxyError {
    /// Status code of the local reply.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::RbacDenied(_) => StatusCode::FORBIDDEN,
            ProxyError::Unauthorized(d) => d.status,
            ProxyError::Redirect(_) => StatusCode::TEMPORARY_REDIRECT,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::StreamTimeout {
                kind,
                request_complete,
            } => kind.status(*request_complete),
            ProxyError::UpstreamProtocol(_) => StatusCode::BAD_GATEWAY,
            ProxyError::RateLimited(status) => *status,
            ProxyError::NotRetried { last, .. } => last.status(),
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The response flag.
    pub fn flag(&self) -> ResponseFlag {
        match self {
            ProxyError::NoRoute | ProxyError::NoFilterChain => ResponseFlag::NoRouteFound,
            ProxyError::NoCluster(_) => ResponseFlag::NoClusterFound,
            ProxyError::NoHealthyUpstream(_) => ResponseFlag::NoHealthyUpstream,
            ProxyError::ConnectFailure(_) => ResponseFlag::UpstreamConnectionFailure,
            ProxyError::NotRetried { flag, .. } => *flag,
            ProxyError::UpstreamReset(_) => ResponseFlag::UpstreamConnectionTermination,
            ProxyError::UpstreamProtocol(_) => ResponseFlag::UpstreamProtocolError,
            ProxyError::Timeout => ResponseFlag::UpstreamRequestTimeout,
            ProxyError::StreamTimeout { kind, .. } => kind
                .response_flags()
                .iter()
                .next()
                .unwrap_or(ResponseFlag::LocalReset),
            ProxyError::BadRequest(_) => ResponseFlag::DownstreamProtocolError,
            ProxyError::Overflow(_) => ResponseFlag::UpstreamOverflow,
            ProxyError::RbacDenied(_) => ResponseFlag::RbacAccessDenied,
            ProxyError::RateLimited(_) => ResponseFlag::RateLimited,
            ProxyError::Unauthorized(_) => ResponseFlag::UnauthorizedExternalService,
            ProxyError::Redirect(_) => ResponseFlag::LocalReset,
            ProxyError::Unsupported(_) => ResponseFlag::LocalReset,
        }
    }

    /// The flags a local reply for this error carries: Envoy sets none for RBAC denials,
    /// JWT failures and redirects (their details go to `%RESPONSE_CODE_DETAILS%`).
    pub fn response_flags(&self) -> ResponseFlags {
        match self {
            ProxyError::RbacDenied(_) | ProxyError::Unauthorized(_) | ProxyError::Redirect(_) => {
                ResponseFlags::default()
            }
            ProxyError::StreamTimeout { kind, .. } => kind.response_flags(),
            ProxyError::NotRetried { last, flag, .. } => {
                let mut flags = last.response_flags();
                flags.insert(*flag);
                flags
            }
            other => ResponseFlags::of(other.flag()),
        }
    }

    /// The local reply body Envoy sends (`no healthy upstream`, …).
    pub fn body(&self) -> String {
        match self {
            ProxyError::NoHealthyUpstream(_) => "no healthy upstream".to_owned(),
            ProxyError::ConnectFailure(_)
            | ProxyError::UpstreamReset(_)
            | ProxyError::Overflow(_) => self.reset_body(false),
            ProxyError::NotRetried { last, retried, .. } => last.reset_body(*retried),
            // Envoy's router answers every one of its timers with the same body.
            ProxyError::Timeout
            | ProxyError::StreamTimeout {
                kind: Expired::Route | Expired::PerTry | Expired::PerTryIdle,
                ..
            } => "upstream request timeout".to_owned(),
            ProxyError::NoRoute => String::new(),
            ProxyError::RbacDenied(_) => "RBAC: access denied".to_owned(),
            ProxyError::RateLimited(_) => "local_rate_limited".to_owned(),
            ProxyError::Unauthorized(d) => d.body.clone(),
            other => other.to_string(),
        }
    }

    /// Envoy's reply to an upstream reset before the response (`onUpstreamReset`); after a retry
    /// it names the latest reset. Other failures keep their own body.
    fn reset_body(&self, retried: bool) -> String {
        let reason = match self {
            ProxyError::ConnectFailure(r) => {
                format!("connection failure, transport failure reason: {r}")
            }
            ProxyError::UpstreamReset(r) => r.clone(),
            ProxyError::Overflow(_) => "overflow".to_owned(),
            other => return other.body(),
        };
        let retried = if retried {
            "retried and the latest "
        } else {
            ""
        };
        format!(
            "upstream connect error or disconnect/reset before headers. {retried}reset reason: {reason}"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_envoy_statuses_and_flags() {
        let cases = [
            (ProxyError::NoRoute, 404, "NR"),
            (ProxyError::NoFilterChain, 503, "NR"),
            (ProxyError::NoCluster("c".into()), 503, "NC"),
            (ProxyError::NoHealthyUpstream("c".into()), 503, "UH"),
            (ProxyError::ConnectFailure("refused".into()), 503, "UF"),
            (ProxyError::UpstreamReset("reset".into()), 503, "UC"),
            (ProxyError::Timeout, 504, "UT"),
            (ProxyError::BadRequest("x".into()), 400, "DPE"),
        ];
        for (e, status, flag) in cases {
            assert_eq!(e.status().as_u16(), status, "{e}");
            assert_eq!(e.flag().short(), flag, "{e}");
        }
    }

    #[test]
    fn a_failure_not_retried_keeps_its_reply_and_adds_the_flag() {
        let not_retried = |last: ProxyError, flag, retried| ProxyError::NotRetried {
            last: Box::new(last),
            flag,
            retried,
        };
        // Envoy: a connect failure after the last retry is 503 `UF,URX`, naming the latest reset.
        let e = not_retried(
            ProxyError::ConnectFailure("refused".into()),
            ResponseFlag::UpstreamRetryLimitExceeded,
            true,
        );
        assert_eq!(e.status().as_u16(), 503);
        assert_eq!(e.response_flags().to_string(), "UF,URX");
        assert_eq!(e.flag(), ResponseFlag::UpstreamRetryLimitExceeded);
        assert_eq!(
            e.body(),
            "upstream connect error or disconnect/reset before headers. retried and the latest \
             reset reason: connection failure, transport failure reason: refused"
        );
        // A per-try timeout on the last try stays the timeout's 504, `UT,URX`.
        let e = not_retried(
            ProxyError::Timeout,
            ResponseFlag::UpstreamRetryLimitExceeded,
            true,
        );
        assert_eq!(e.status().as_u16(), 504);
        assert_eq!(e.response_flags().to_string(), "UT,URX");
        assert_eq!(e.body(), "upstream request timeout");
        // The per-try timers keep their kind (for the details) and answer like the route timer.
        for kind in [Expired::PerTry, Expired::PerTryIdle] {
            let e = not_retried(
                ProxyError::StreamTimeout {
                    kind,
                    request_complete: true,
                },
                ResponseFlag::UpstreamRetryLimitExceeded,
                true,
            );
            assert_eq!(e.status().as_u16(), 504, "{kind:?}");
            assert_eq!(e.response_flags().to_string(), "UT,URX", "{kind:?}");
            assert_eq!(e.body(), "upstream request timeout", "{kind:?}");
        }
        // The retry breaker open on a reset (no retry before): `UC,UO`, the plain reset body.
        let e = not_retried(
            ProxyError::UpstreamReset("connection termination".into()),
            ResponseFlag::UpstreamOverflow,
            false,
        );
        assert_eq!(e.status().as_u16(), 503);
        assert_eq!(e.response_flags().to_string(), "UC,UO");
        assert_eq!(
            e.body(),
            "upstream connect error or disconnect/reset before headers. reset reason: \
             connection termination"
        );
    }
}
