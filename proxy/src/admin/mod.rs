//! The admin API on the bootstrap's admin address (127.0.0.1:15000 in a waypoint), with Envoy's paths
//! and shapes — what pilot-agent and `istioctl proxy-config` rely on.

pub mod config_dump;

use std::{convert::Infallible, net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use tokio::net::TcpListener;

use crate::{
    server::{Server, ServerState},
    stats::Kind,
};

type Body = Full<Bytes>;

/// Serves the admin API on `addr` until the process exits.
pub async fn serve(server: Arc<Server>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(err) => {
                    tracing::warn!(target: "admin", %err, "accept failed");
                    continue;
                }
            };
            let server = server.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let server = server.clone();
                    async move { Ok::<_, Infallible>(handle(&server, req.method(), req.uri())) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(err) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await
                {
                    tracing::debug!(target: "admin", %err, "admin connection ended");
                }
            });
        }
    });
    Ok(bound)
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=UTF-8")
        .body(Full::new(Bytes::from(body.into())))
        .unwrap_or_default()
}

fn json(value: &serde_json::Value) -> Response<Body> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

/// Query parameters (`a=b&c`).
fn query(uri: &http::Uri) -> Vec<(String, String)> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_owned(), percent_decode(v)),
            None => (p.to_owned(), String::new()),
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Routes one admin request.
pub fn handle(server: &Server, method: &Method, uri: &http::Uri) -> Response<Body> {
    let params = query(uri);
    let has = |k: &str| params.iter().any(|(p, _)| p == k);
    let param = |k: &str| params.iter().find(|(p, _)| p == k).map(|(_, v)| v.clone());
    match (method, uri.path()) {
        (_, "/ready") => {
            let state = server.state();
            let status = if state == ServerState::Live {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, format!("{}\n", state.name()))
        }
        (_, "/server_info") => json(&serde_json::json!({
            "version": format!("waypoint-proxy/{}", env!("CARGO_PKG_VERSION")),
            "state": server.state().name(),
            "uptime_current_epoch": format!("{}s", server.started.elapsed().as_secs()),
            "uptime_all_epochs": format!("{}s", server.started.elapsed().as_secs()),
            "hot_restart_version": "disabled",
            "node": waypoint_proto::json::to_json(&server.bootstrap.node).unwrap_or_default(),
            "command_line_options": {
                "concurrency": server.options.concurrency,
                "drain_time": format!("{}s", server.options.drain_time_s),
                "drain_strategy": if server.options.drain_strategy_immediate { "Immediate" } else { "Gradual" },
                "log_level": server.options.log_level,
                "component_log_level": server.options.component_log_level,
                "mode": format!("{:?}", server.options.mode),
            },
        })),
        (_, "/stats") => stats_text(server, param("filter").as_deref(), has("usedonly")),
        (_, "/stats/prometheus") => prometheus(server, has("usedonly")),
        (_, "/config_dump") => match config_dump::render(
            server,
            param("resource").as_deref(),
            param("mask").as_deref(),
            has("include_eds"),
        ) {
            Ok(v) => json(&v),
            Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        },
        (&Method::POST, "/healthcheck/fail") => {
            server.health_check_failed.store(true, Ordering::Relaxed);
            text(StatusCode::OK, "OK\n")
        }
        (&Method::POST, "/healthcheck/ok") => {
            server.health_check_failed.store(false, Ordering::Relaxed);
            text(StatusCode::OK, "OK\n")
        }
        (&Method::POST, "/drain_listeners") => {
            server.drain.send_replace(true);
            if !has("skip_exit") {
                server.set_state(ServerState::Draining);
            }
            tracing::info!(target: "admin", graceful = has("graceful"), inboundonly = has("inboundonly"), "draining listeners");
            text(StatusCode::OK, "OK\n")
        }
        (&Method::POST, "/quitquitquit") => {
            server.shutdown.send_replace(true);
            text(StatusCode::OK, "OK\n")
        }
        (_, "/listeners") => {
            let snap = server.config.snapshot();
            let body: String = snap
                .listeners
                .keys()
                .map(|n| format!("{n}::{}\n", listener_address(&snap, n)))
                .collect();
            text(StatusCode::OK, body)
        }
        (_, "/clusters") => {
            let snap = server.config.snapshot();
            let mut body = String::new();
            for name in snap.clusters.keys() {
                body.push_str(&format!("{name}::observability_name::{name}\n"));
            }
            text(StatusCode::OK, body)
        }
        (&Method::POST, "/logging") | (&Method::GET, "/logging") => text(
            StatusCode::OK,
            "active loggers: set with RUST_LOG / -l at start\n",
        ),
        (_, "/certs") => json(&serde_json::json!({ "certificates": [] })),
        (
            &Method::GET,
            "/healthcheck/fail" | "/healthcheck/ok" | "/drain_listeners" | "/quitquitquit",
        ) => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "This endpoint requires POST\n",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "admin paths: /ready /server_info /stats /stats/prometheus /config_dump /listeners /clusters /certs /logging /drain_listeners /healthcheck/{fail,ok} /quitquitquit\n",
        ),
    }
}

fn listener_address(snap: &crate::config::Snapshot, name: &str) -> String {
    use waypoint_proto::envoy::config::core::v3::{
        address::Address, socket_address::PortSpecifier,
    };
    let Some(l) = snap.listeners.get(name) else {
        return String::new();
    };
    match l.address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(Address::SocketAddress(sa)) => match sa.port_specifier {
            Some(PortSpecifier::PortValue(p)) => format!("{}:{p}", sa.address),
            _ => sa.address.clone(),
        },
        Some(Address::EnvoyInternalAddress(_)) | None => format!("envoy://{name}/"),
        Some(Address::Pipe(p)) => p.path.clone(),
    }
}

/// Envoy's `/stats` text: `name: value`, sorted; `filter` is a regex, `usedonly` drops unwritten stats.
fn stats_text(server: &Server, filter: Option<&str>, used_only: bool) -> Response<Body> {
    let re = match filter.map(regex::Regex::new).transpose() {
        Ok(re) => re,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("Invalid regex: {e}\n")),
    };
    let mut body = String::new();
    for (name, _kind, value, used) in server.stats.snapshot() {
        if used_only && !used {
            continue;
        }
        if re.as_ref().is_some_and(|r| !r.is_match(&name)) {
            continue;
        }
        body.push_str(&format!("{name}: {value}\n"));
    }
    text(StatusCode::OK, body)
}

/// Prometheus text for our stats: `envoy_` prefix, dots to underscores (tag extraction: telemetry issue).
fn prometheus(server: &Server, used_only: bool) -> Response<Body> {
    let mut body = String::new();
    for (name, kind, value, used) in server.stats.snapshot() {
        if used_only && !used {
            continue;
        }
        let metric: String = format!("envoy_{name}")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let t = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        body.push_str(&format!("# TYPE {metric} {t}\n{metric}{{}} {value}\n"));
    }
    Response::builder()
        .header("content-type", "text/plain; version=0.0.4")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let uri: http::Uri = "/stats?usedonly&filter=%5E(server%5C.state)"
            .parse()
            .expect("uri");
        let q = query(&uri);
        assert_eq!(
            q,
            [
                ("usedonly".to_owned(), String::new()),
                ("filter".to_owned(), "^(server\\.state)".to_owned())
            ]
        );
        assert_eq!(percent_decode("a%2"), "a%2");
    }
}
