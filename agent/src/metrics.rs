//! The agent's own metrics (`istio_agent_*`), kept in atomics and rendered in the Prometheus text
//! format; the status server serves them ahead of the proxy's.

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicI64, AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A gauge holding an integer.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Every agent metric.
#[derive(Debug, Default)]
pub struct AgentMetrics {
    /// CSRs sent to the CA.
    pub csr_requests: Counter,
    /// CSRs that failed (connection, RPC or unusable response).
    pub csr_failures: Counter,
    /// Expiry of the served workload certificate (Unix seconds; 0 before the first).
    pub cert_expiry_timestamp: Gauge,
    /// Requests forwarded from the proxy to istiod.
    pub xds_proxy_requests: Counter,
    /// Responses forwarded from istiod to the proxy.
    pub xds_proxy_responses: Counter,
    /// Responses from istiod dropped because of their type URL.
    pub xds_proxy_dropped: Counter,
    /// Failures to connect to istiod.
    pub istiod_connection_failures: Counter,
    /// Upstream streams to istiod that ended.
    pub istiod_connection_terminations: Counter,
    /// Downstream (proxy) xDS streams that ended.
    pub envoy_connection_terminations: Counter,
    /// SDS pushes sent to the proxy.
    pub sds_pushes: Counter,
    /// Proxy restarts by the supervisor.
    pub proxy_restarts: Counter,
}

impl AgentMetrics {
    /// Renders the Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, labels: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}{labels} {v}"
            );
        };
        counter(
            "istio_agent_num_outgoing_requests",
            "Number of total outgoing requests (e.g. to a token exchange server, CA, etc.)",
            "{request_type=\"csr\"}",
            self.csr_requests.get(),
        );
        counter(
            "istio_agent_num_failed_outgoing_requests",
            "Number of failed outgoing requests (e.g. to a token exchange server, CA, etc.)",
            "{request_type=\"csr\"}",
            self.csr_failures.get(),
        );
        counter(
            "istio_agent_xds_proxy_requests",
            "The total number of Xds Proxy Requests",
            "",
            self.xds_proxy_requests.get(),
        );
        counter(
            "istio_agent_xds_proxy_responses",
            "The total number of Xds Proxy Responses",
            "",
            self.xds_proxy_responses.get(),
        );
        counter(
            "istio_agent_xds_proxy_dropped_responses",
            "Responses from istiod not forwarded because of their type URL",
            "",
            self.xds_proxy_dropped.get(),
        );
        counter(
            "istio_agent_istiod_connection_failures",
            "The total number of connection failures to Istiod",
            "",
            self.istiod_connection_failures.get(),
        );
        counter(
            "istio_agent_istiod_connection_terminations",
            "The total number of connection terminations to Istiod",
            "",
            self.istiod_connection_terminations.get(),
        );
        counter(
            "istio_agent_envoy_connection_terminations",
            "The total number of connection terminations from the proxy",
            "",
            self.envoy_connection_terminations.get(),
        );
        counter(
            "istio_agent_sds_pushes",
            "The total number of SDS responses sent to the proxy",
            "",
            self.sds_pushes.get(),
        );
        counter(
            "istio_agent_proxy_restarts",
            "The total number of times the supervisor restarted the proxy",
            "",
            self.proxy_restarts.get(),
        );
        let expiry = self.cert_expiry_timestamp.get();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let remaining = if expiry > 0 { expiry - now } else { 0 };
        let _ = writeln!(
            out,
            "# HELP istio_agent_cert_expiry_seconds The time remaining, in seconds, before the certificate chain will expire. A negative value indicates the cert is expired.\n# TYPE istio_agent_cert_expiry_seconds gauge\nistio_agent_cert_expiry_seconds{{resource_name=\"default\"}} {remaining}"
        );
        let _ = writeln!(
            out,
            "# HELP istio_agent_cert_expiry_timestamp_seconds Expiry of the served workload certificate, Unix seconds.\n# TYPE istio_agent_cert_expiry_timestamp_seconds gauge\nistio_agent_cert_expiry_timestamp_seconds{{resource_name=\"default\"}} {expiry}"
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_once() {
        let m = AgentMetrics::default();
        m.csr_requests.inc();
        m.cert_expiry_timestamp.set(4_000_000_000);
        let text = m.render();
        assert!(text.contains("istio_agent_num_outgoing_requests{request_type=\"csr\"} 1"));
        assert!(text.contains(
            "istio_agent_cert_expiry_timestamp_seconds{resource_name=\"default\"} 4000000000"
        ));
        let types = text.lines().filter(|l| l.starts_with("# TYPE")).count();
        let helps = text.lines().filter(|l| l.starts_with("# HELP")).count();
        assert_eq!(types, helps);
        assert_eq!(types, 12);
    }
}
