//! The agent's status server on `:statusPort` (15020), as pilot-agent's (reference/istio-facts.md
//! §1.11): `/healthz/ready`, merged `/stats/prometheus` (also `/metrics`), and the loopback-only
//! `POST /quitquitquit` and `POST /drain`.
//!
//! Differences from pilot-agent: responses are not gzip-compressed; the readiness cache belongs to one
//! proxy process (the proxy can be restarted, see `supervisor`); readiness also fails after `POST
//! /drain`, as a drained proxy should not receive new traffic.

use std::{
    collections::HashSet,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot, watch},
};

use crate::{
    http_client, metrics::AgentMetrics, proxy_admin::ReadinessProbe, secrets::WorkloadSecret,
    supervisor::ProxyState,
};

/// The Prometheus text format content type.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Where the agent is in its life, as readiness sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Serving.
    Running,
    /// Drain requested (`POST /drain`): the proxy drains, the agent keeps running.
    Drained,
    /// SIGTERM/SIGINT or `/quitquitquit`: draining, then exiting.
    Terminating,
}

/// Requests from the status server to the agent's lifecycle.
#[derive(Debug)]
pub enum Control {
    /// `POST /quitquitquit`: exit now.
    Quit,
    /// `POST /drain`: drain the proxy now; the reply says whether the proxy accepted.
    DrainNow(oneshot::Sender<Result<(), String>>),
}

/// What the status server reads.
pub struct StatusState {
    /// `DISABLE_ENVOY`: readiness is the certificate alone and there are no proxy metrics.
    pub disable_envoy: bool,
    /// The workload certificate (`None` until the CA answered).
    pub secrets: watch::Receiver<Option<Arc<WorkloadSecret>>>,
    /// The lifecycle phase.
    pub phase: watch::Receiver<Phase>,
    /// The proxy process.
    pub proxy: watch::Receiver<ProxyState>,
    /// pilot-agent's probe of the proxy's admin API.
    pub probe: ReadinessProbe,
    /// The agent's metrics.
    pub metrics: Arc<AgentMetrics>,
    /// The proxy's prometheus port (`ENVOY_PROMETHEUS_PORT`), scraped on 127.0.0.1.
    pub prometheus_port: u16,
    /// Where `/quitquitquit` and `/drain` go.
    pub control: mpsc::Sender<Control>,
}

impl StatusState {
    /// `Ok` when ready; else the reason.
    pub async fn readiness(&self) -> Result<(), String> {
        match *self.phase.borrow() {
            Phase::Running => {}
            Phase::Drained => return Err("the proxy was drained (POST /drain)".to_owned()),
            Phase::Terminating => return Err("server is terminated".to_owned()),
        }
        if self.secrets.borrow().is_none() {
            return Err("workload certificate not yet received from the CA".to_owned());
        }
        if self.disable_envoy {
            return Ok(());
        }
        let state = *self.proxy.borrow();
        match state {
            ProxyState::Starting => Err("proxy not started yet".to_owned()),
            ProxyState::Exited { exit } => Err(format!(
                "proxy is not running ({exit}); it is being restarted"
            )),
            ProxyState::Running { epoch, .. } => {
                self.probe.check(epoch).await.map_err(|e| e.to_string())
            }
        }
    }
}

/// Serves `listener` until `shutdown`; open requests then get up to 2 s to finish.
pub async fn serve(
    listener: TcpListener,
    state: Arc<StatusState>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    // Out of descriptors and the like: keep serving, without spinning.
                    tracing::warn!("status server accept: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let state = state.clone();
        let service = hyper::service::service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(handle(req, peer, &state).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(2), graceful.shutdown()).await;
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    state: &StatusState,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match path.as_str() {
        "/healthz/ready" => match state.readiness().await {
            Ok(()) => text(StatusCode::OK, ""),
            Err(reason) => {
                tracing::debug!("not ready: {reason}");
                text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n"))
            }
        },
        "/stats/prometheus" | "/metrics" => {
            let timeout = scrape_timeout(&req);
            let body = merged_metrics(state, req.uri().query(), timeout).await;
            let mut resp = text(StatusCode::OK, body);
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(PROMETHEUS_CONTENT_TYPE),
            );
            resp
        }
        "/quitquitquit" | "/drain" if method != Method::POST => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        "/quitquitquit" | "/drain" if !is_loopback(peer.ip()) => {
            tracing::warn!(%peer, path, "refusing a non-loopback request");
            text(StatusCode::FORBIDDEN, "only allowed from localhost\n")
        }
        "/quitquitquit" => {
            tracing::info!(%peer, "POST /quitquitquit: exiting");
            if state.control.send(Control::Quit).await.is_err() {
                return text(StatusCode::SERVICE_UNAVAILABLE, "agent is shutting down\n");
            }
            text(StatusCode::OK, "OK")
        }
        "/drain" => {
            tracing::info!(%peer, "POST /drain: draining the proxy");
            let (tx, rx) = oneshot::channel();
            if state.control.send(Control::DrainNow(tx)).await.is_err() {
                return text(StatusCode::SERVICE_UNAVAILABLE, "agent is shutting down\n");
            }
            match rx.await {
                Ok(Ok(())) => text(StatusCode::OK, ""),
                Ok(Err(reason)) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{reason}\n")),
                Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "agent is shutting down\n"),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The scrape deadline: Prometheus' `X-Prometheus-Scrape-Timeout-Seconds` (bounded), else 5 s.
fn scrape_timeout(req: &Request<Incoming>) -> Duration {
    req.headers()
        .get("x-prometheus-scrape-timeout-seconds")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(|s| Duration::from_secs_f64(s.clamp(0.1, 60.0)))
        .unwrap_or(Duration::from_secs(5))
}

/// The agent's metrics followed by the proxy's (skipped when unreachable), as one exposition.
async fn merged_metrics(state: &StatusState, query: Option<&str>, timeout: Duration) -> String {
    let agent = state.metrics.render();
    if state.disable_envoy {
        return merge_expositions(&[&agent]);
    }
    let url = match query {
        Some(q) if !q.is_empty() => format!(
            "http://127.0.0.1:{}/stats/prometheus?{q}",
            state.prometheus_port
        ),
        _ => format!(
            "http://127.0.0.1:{}/stats/prometheus",
            state.prometheus_port
        ),
    };
    let mut request = http_client::Request::new("GET", &url, timeout);
    request.headers.push(("accept", "text/plain".to_owned()));
    let proxy = match http_client::send(request).await {
        Ok(resp) if resp.status.is_success() => resp.text(),
        Ok(resp) => {
            tracing::debug!(status = resp.status.as_u16(), "proxy metrics unavailable");
            String::new()
        }
        Err(err) => {
            tracing::debug!("proxy metrics unavailable: {err}");
            String::new()
        }
    };
    merge_expositions(&[&agent, &proxy])
}

/// The metric family a sample line belongs to, given the family being read.
fn sample_family<'a>(name: &'a str, current: Option<&str>) -> &'a str {
    const SUFFIXES: [&str; 7] = [
        "", "_bucket", "_sum", "_count", "_total", "_created", "_info",
    ];
    if let Some(family) = current
        && let Some(suffix) = name.strip_prefix(family)
        && SUFFIXES.contains(&suffix)
    {
        return &name[..family.len()];
    }
    name
}

/// Concatenates Prometheus text expositions, keeping the first occurrence of every metric family:
/// a family (its `# HELP`/`# TYPE` lines and samples) seen in an earlier part, or earlier in the same
/// part, is dropped, so the result never declares a family twice. Blank lines are dropped.
pub fn merge_expositions(parts: &[&str]) -> String {
    let mut out = String::with_capacity(parts.iter().map(|p| p.len()).sum::<usize>() + parts.len());
    let mut seen: HashSet<String> = HashSet::new();
    for part in parts {
        let mut current: Option<String> = None;
        let mut skip = false;
        for line in part.lines() {
            let trimmed = line.trim();
            if trimmed.is_empty() {
                continue;
            }
            let family = if let Some(rest) = trimmed.strip_prefix('#') {
                let mut words = rest.split_whitespace();
                match (words.next(), words.next()) {
                    (Some("HELP" | "TYPE"), Some(name)) => Some(name.to_owned()),
                    // Other comments go with the family being read.
                    _ => None,
                }
            } else {
                let name_end = trimmed
                    .find(|c: char| c == '{' || c.is_whitespace())
                    .unwrap_or(trimmed.len());
                Some(sample_family(&trimmed[..name_end], current.as_deref()).to_owned())
            };
            if let Some(family) = family
                && current.as_deref() != Some(family.as_str())
            {
                skip = !seen.insert(family.clone());
                if skip {
                    tracing::debug!(
                        family,
                        "dropping a duplicate metric family from the merged metrics"
                    );
                }
                current = Some(family);
            }
            if !skip {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_keeps_first_family_and_valid_layout() {
        let agent = "# HELP a_total A.\n# TYPE a_total counter\na_total 1\n# HELP shared Shared.\n# TYPE shared gauge\nshared 1\n";
        let proxy = "\n# TYPE envoy_x counter\nenvoy_x{l=\"1\"} 2\nenvoy_x{l=\"2\"} 3\n# TYPE shared gauge\nshared 9\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 1\nh_sum 0.5\nh_count 1\n# TYPE envoy_x counter\nenvoy_x{l=\"3\"} 4\nuntyped_thing 5";
        let merged = merge_expositions(&[agent, proxy]);
        assert_eq!(
            merged,
            "# HELP a_total A.\n# TYPE a_total counter\na_total 1\n# HELP shared Shared.\n# TYPE shared gauge\nshared 1\n\
             # TYPE envoy_x counter\nenvoy_x{l=\"1\"} 2\nenvoy_x{l=\"2\"} 3\n\
             # TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 1\nh_sum 0.5\nh_count 1\n\
             untyped_thing 5\n"
        );
    }

    #[test]
    fn merge_of_agent_metrics_alone_is_the_same_text() {
        let m = AgentMetrics::default();
        let text = m.render();
        assert_eq!(merge_expositions(&[&text, ""]), text);
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback("127.0.0.1".parse().expect("ip")));
        assert!(is_loopback("127.3.2.1".parse().expect("ip")));
        assert!(is_loopback("::1".parse().expect("ip")));
        assert!(is_loopback("::ffff:127.0.0.1".parse().expect("ip")));
        assert!(!is_loopback("10.0.0.1".parse().expect("ip")));
        assert!(!is_loopback("::ffff:10.0.0.1".parse().expect("ip")));
    }
}
