//! The calls the agent makes to the proxy's admin API (127.0.0.1:`proxyAdminPort`), as pilot-agent
//! does (reference/istio-facts.md §1.11, §1.13): the two-step readiness probe on `/stats`, `POST
//! /drain_listeners`, and the active-connection count polled while draining.
//!
//! Stat filters are sent percent-encoded; Envoy (and our proxy) decode admin query parameters.

use std::{
    collections::BTreeSet,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use crate::http_client::{self, HttpError};

/// `/stats` filter for the first readiness step: have CDS and LDS been applied?
pub const UPDATE_STATS_FILTER: &str =
    r"^(cluster_manager\.cds|listener_manager\.lds)\.(update_success|update_rejected)$";
/// `/stats` filter for the second readiness step: is the server live with its workers started?
pub const READY_STATS_FILTER: &str = r"^(server\.state|listener_manager\.workers_started)";
/// `/stats` filter for the active-connection poll during drain.
pub const ACTIVE_CX_FILTER: &str = "downstream_cx_active$";

/// Why the proxy is not (yet) ready, or why an admin call failed. The text is what `/healthz/ready`
/// answers with its 503.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The admin API could not be reached.
    #[error("proxy admin API: {0}")]
    Http(#[from] HttpError),
    /// The admin API answered with a non-2xx status.
    #[error("proxy admin API {path}: HTTP {status}")]
    Status {
        /// The path called.
        path: String,
        /// The status.
        status: u16,
    },
    /// CDS or LDS not applied yet.
    #[error("config not received from Pilot (is Pilot running?): {0}")]
    ConfigNotReceived(UpdateStats),
    /// A stat the probe needs is missing from the answer.
    #[error("{0} is not yet updated")]
    StatMissing(&'static str),
    /// `server.state` is not LIVE (0).
    #[error("server is not live, current state is: {0}")]
    NotLive(String),
    /// `listener_manager.workers_started` is not 1.
    #[error("workers have not yet started")]
    WorkersNotStarted,
}

/// The CDS/LDS update counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpdateStats {
    /// `cluster_manager.cds.update_success`.
    pub cds_success: u64,
    /// `cluster_manager.cds.update_rejected`.
    pub cds_rejected: u64,
    /// `listener_manager.lds.update_success`.
    pub lds_success: u64,
    /// `listener_manager.lds.update_rejected`.
    pub lds_rejected: u64,
}

impl std::fmt::Display for UpdateStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cds updates: {} successful, {} rejected; lds updates: {} successful, {} rejected",
            self.cds_success, self.cds_rejected, self.lds_success, self.lds_rejected
        )
    }
}

/// Parses Envoy's `/stats` text (`name: value` per line) into the numeric stats; histogram lines and
/// anything else that is not an integer are skipped.
pub fn parse_stats(text: &str) -> Vec<(&str, u64)> {
    text.lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            Some((name.trim(), value.trim().parse::<u64>().ok()?))
        })
        .collect()
}

fn stat(stats: &[(&str, u64)], name: &str) -> Option<u64> {
    stats.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// Envoy's `server.state` values (`envoy.admin.v3.ServerInfo.State`).
fn server_state_name(state: u64) -> String {
    match state {
        0 => "LIVE".to_owned(),
        1 => "DRAINING".to_owned(),
        2 => "PRE_INITIALIZING".to_owned(),
        3 => "INITIALIZING".to_owned(),
        other => other.to_string(),
    }
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved characters).
pub fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A client of the proxy's admin API.
#[derive(Debug, Clone)]
pub struct ProxyAdmin {
    base: String,
    timeout: Duration,
    excluded_listeners: BTreeSet<String>,
}

impl ProxyAdmin {
    /// The admin API at `127.0.0.1:admin_port`. `status_port` and `prometheus_port` are the proxy's
    /// own readiness and prometheus listeners, whose connections do not count as active traffic.
    pub fn new(admin_port: u16, status_port: u16, prometheus_port: u16, timeout: Duration) -> Self {
        let excluded_listeners = [
            format!("listener.0.0.0.0_{status_port}.downstream_cx_active"),
            format!("listener.0.0.0.0_{prometheus_port}.downstream_cx_active"),
            format!("listener.[__]_{status_port}.downstream_cx_active"),
            format!("listener.[__]_{prometheus_port}.downstream_cx_active"),
            "listener.admin.downstream_cx_active".to_owned(),
            "listener.admin.main_thread.downstream_cx_active".to_owned(),
        ]
        .into_iter()
        .collect();
        ProxyAdmin {
            base: format!("http://127.0.0.1:{admin_port}"),
            timeout,
            excluded_listeners,
        }
    }

    async fn stats(&self, filter: &str) -> Result<String, AdminError> {
        let path = format!("/stats?usedonly&filter={}", encode_query_value(filter));
        let resp = http_client::get(&format!("{}{path}", self.base), self.timeout).await?;
        if !resp.status.is_success() {
            return Err(AdminError::Status {
                path,
                status: resp.status.as_u16(),
            });
        }
        Ok(resp.text())
    }

    /// First readiness step: CDS and LDS have each been applied at least once.
    pub async fn check_config_received(&self) -> Result<(), AdminError> {
        let text = self.stats(UPDATE_STATS_FILTER).await?;
        let stats = parse_stats(&text);
        let get = |n: &str| stat(&stats, n).unwrap_or(0);
        let update = UpdateStats {
            cds_success: get("cluster_manager.cds.update_success"),
            cds_rejected: get("cluster_manager.cds.update_rejected"),
            lds_success: get("listener_manager.lds.update_success"),
            lds_rejected: get("listener_manager.lds.update_rejected"),
        };
        if update.cds_success > 0 && update.lds_success > 0 {
            Ok(())
        } else {
            Err(AdminError::ConfigNotReceived(update))
        }
    }

    /// Second readiness step: `server.state` is LIVE and the workers have started.
    pub async fn check_live(&self) -> Result<(), AdminError> {
        let text = self.stats(READY_STATS_FILTER).await?;
        let stats = parse_stats(&text);
        let state = stat(&stats, "server.state").ok_or(AdminError::StatMissing("server.state"))?;
        let workers = stat(&stats, "listener_manager.workers_started")
            .ok_or(AdminError::StatMissing("listener_manager.workers_started"))?;
        if state != 0 {
            return Err(AdminError::NotLive(server_state_name(state)));
        }
        if workers != 1 {
            return Err(AdminError::WorkersNotStarted);
        }
        Ok(())
    }

    /// `POST /drain_listeners?<query>` (`graceful` on termination, `graceful&skip_exit` for `/drain`).
    pub async fn drain_listeners(&self, query: &str) -> Result<(), AdminError> {
        let path = format!("/drain_listeners?{query}");
        let resp = http_client::post(&format!("{}{path}", self.base), self.timeout).await?;
        if !resp.status.is_success() {
            return Err(AdminError::Status {
                path,
                status: resp.status.as_u16(),
            });
        }
        Ok(())
    }

    /// The proxy's active downstream connections, as pilot-agent counts them: `listener.*` stats
    /// only, no per-worker stats, no internal listeners (`listener.envoy_internal_*`), and not the
    /// proxy's own readiness, prometheus and admin listeners. `None` when the proxy reports no such
    /// stat at all (pilot-agent then stops waiting).
    pub async fn active_connections(&self) -> Result<Option<u64>, AdminError> {
        let text = self.stats(ACTIVE_CX_FILTER).await?;
        Ok(self.count_active(&text))
    }

    /// The counting rule of [`ProxyAdmin::active_connections`] on a `/stats` answer.
    pub fn count_active(&self, text: &str) -> Option<u64> {
        if text.trim().is_empty() {
            return None;
        }
        let total = parse_stats(text)
            .into_iter()
            .filter(|(name, _)| {
                name.starts_with("listener.")
                    && !name.contains("worker_")
                    && !name.starts_with("listener.envoy_internal_")
                    && !self.excluded_listeners.contains(*name)
            })
            .map(|(_, v)| v)
            .sum();
        Some(total)
    }
}

/// pilot-agent's readiness probe with its caching: once CDS/LDS were received, and once the server
/// was seen live, those steps are not asked again. Unlike pilot-agent, whose proxy never restarts,
/// the cache belongs to one proxy process (`epoch`): a restarted proxy is probed afresh.
#[derive(Debug)]
pub struct ReadinessProbe {
    admin: ProxyAdmin,
    config_epoch: AtomicU64,
    live_epoch: AtomicU64,
}

impl ReadinessProbe {
    /// A probe using `admin`.
    pub fn new(admin: ProxyAdmin) -> Self {
        ReadinessProbe {
            admin,
            config_epoch: AtomicU64::new(0),
            live_epoch: AtomicU64::new(0),
        }
    }

    /// Checks the proxy of `epoch` (≥ 1).
    pub async fn check(&self, epoch: u64) -> Result<(), AdminError> {
        if self.config_epoch.load(Ordering::Acquire) != epoch {
            self.admin.check_config_received().await?;
            self.config_epoch.store(epoch, Ordering::Release);
        }
        if self.live_epoch.load(Ordering::Acquire) != epoch {
            self.admin.check_live().await?;
            self.live_epoch.store(epoch, Ordering::Release);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stats_text() {
        let text = "cluster_manager.cds.update_success: 3\nlistener_manager.lds.update_rejected: 0\nhttp.admin.downstream_rq_time: P0(nan,0) P25(nan,0)\nbogus line\n";
        assert_eq!(
            parse_stats(text),
            [
                ("cluster_manager.cds.update_success", 3),
                ("listener_manager.lds.update_rejected", 0)
            ]
        );
    }

    #[test]
    fn encodes_filters() {
        assert_eq!(
            encode_query_value("downstream_cx_active$"),
            "downstream_cx_active%24"
        );
        assert_eq!(encode_query_value(r"^(a\.b|c)"), "%5E%28a%5C.b%7Cc%29");
    }

    #[test]
    fn counts_active_connections_like_pilot_agent() {
        let admin = ProxyAdmin::new(15000, 15021, 15090, Duration::from_secs(1));
        let text = "\
http.inbound_0.0.0.0_8080.downstream_cx_active: 7
listener.0.0.0.0_15008.downstream_cx_active: 2
listener.0.0.0.0_15008.worker_0.downstream_cx_active: 1
listener.0.0.0.0_15008.worker_1.downstream_cx_active: 1
listener.0.0.0.0_15021.downstream_cx_active: 4
listener.0.0.0.0_15090.downstream_cx_active: 1
listener.admin.downstream_cx_active: 1
listener.admin.main_thread.downstream_cx_active: 1
listener.envoy_internal_main_internal.downstream_cx_active: 5
listener.10.0.0.1_9090.downstream_cx_active: 3
";
        assert_eq!(admin.count_active(text), Some(5));
        assert_eq!(admin.count_active(""), None);
        assert_eq!(
            admin.count_active("listener.admin.downstream_cx_active: 1\n"),
            Some(0)
        );
    }
}
