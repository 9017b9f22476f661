//! The admin API on the bootstrap's admin address (127.0.0.1:15000 in a waypoint), with Envoy's paths
//! and shapes — what pilot-agent and `istioctl proxy-config` rely on.
//!
//! Every handler is synchronous and works on snapshots (`ArcSwap` loads, short std-lock reads): no
//! lock is held across an await, and a request never waits on the xDS clients.

pub mod certs;
pub mod clusters;
pub mod config_dump;
pub mod logging;
pub mod stats;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::Value as Json;
use tokio::net::TcpListener;
use waypoint_proto::{
    envoy::admin::v3::{CommandLineOptions, Memory, ServerInfo, command_line_options, server_info},
    google::protobuf::Duration as PbDuration,
};
use waypoint_shared::logging::LogControl;

use crate::{
    server::{Server, ServerState},
    xds::sds::SecretStore,
};

/// Response body type.
pub type Body = Full<Bytes>;

/// What the admin handlers read: the server, the SDS secrets and the log-level control.
pub struct Admin {
    /// Process-wide state.
    pub server: Arc<Server>,
    /// Secrets from SDS.
    pub secrets: Arc<SecretStore>,
    /// Runtime log levels (`None` when another subscriber was installed first, e.g. in tests).
    pub logging: Option<Arc<LogControl>>,
    tags: stats::TagExtractors,
}

impl Admin {
    /// The admin state for `server`.
    pub fn new(
        server: Arc<Server>,
        secrets: Arc<SecretStore>,
        logging: Option<Arc<LogControl>>,
    ) -> Arc<Admin> {
        let tags = stats::TagExtractors::from_bootstrap(&server.bootstrap.bootstrap);
        Arc::new(Admin {
            server,
            secrets,
            logging,
            tags,
        })
    }
}

/// Serves the admin API on `addr` until the process exits; returns the bound address.
pub async fn serve(admin: Arc<Admin>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(err) => {
                    tracing::warn!(target: "admin", %err, "accept failed");
                    // EMFILE and friends: back off a little instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let admin = admin.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(handle(&admin, req.method(), req.uri())) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(err) = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(30))
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

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=UTF-8")
        .header("cache-control", "no-cache, max-age=0")
        .header("x-content-type-options", "nosniff")
        .body(Full::new(Bytes::from(body.into())))
        .unwrap_or_default()
}

/// A pretty-printed JSON response.
pub fn json(value: &Json) -> Response<Body> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    Response::builder()
        .header("content-type", "application/json")
        .header("cache-control", "no-cache, max-age=0")
        .header("x-content-type-options", "nosniff")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

/// Writes a proto as JSON with every primitive field printed (Envoy's `/server_info`, `/certs`,
/// `/memory` use `always_print_primitive_fields`); unset message fields are left out.
pub fn proto_json_all_fields<M: prost::Message + prost::Name>(msg: &M) -> Json {
    use prost_reflect::SerializeOptions;
    let Ok(dynamic) = waypoint_proto::json::decode_dynamic(&M::full_name(), &msg.encode_to_vec())
    else {
        return Json::Null;
    };
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(false);
    let mut value = dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .unwrap_or(Json::Null);
    drop_nulls(&mut value);
    value
}

fn drop_nulls(value: &mut Json) {
    match value {
        Json::Object(map) => {
            map.retain(|_, v| !v.is_null());
            for v in map.values_mut() {
                drop_nulls(v);
            }
        }
        Json::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

/// Query parameters (`a=b&c`), percent-decoded. As Envoy, `+` is not a space.
pub fn query(uri: &http::Uri) -> Vec<(String, String)> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Admin paths that change server state: Envoy answers them only to POST.
const MUTATING: &[&str] = &[
    "/drain_listeners",
    "/healthcheck/fail",
    "/healthcheck/ok",
    "/quitquitquit",
    "/reset_counters",
];

const HELP: &str = "admin commands are:
  /: this help
  /certs: print certs on machine
  /clusters: upstream cluster status (?format=json)
  /config_dump: dump current Envoy configs (?resource=, ?mask=, ?name_regex=, ?include_eds)
  /drain_listeners (POST): drain listeners (?graceful, ?inboundonly, ?skip_exit)
  /healthcheck/fail (POST): cause the server to fail health checks
  /healthcheck/ok (POST): cause the server to pass health checks
  /help: this help
  /listeners: print listener info (?format=json)
  /logging: query (GET or POST) / change (POST ?level=, ?<component>=<level>, ?paths=a:l,b:l) logging levels
  /memory: print current allocation/heap usage
  /quitquitquit (POST): exit the server
  /ready: print server state, return 200 if LIVE, otherwise return 503
  /reset_counters (POST): reset all counters to zero
  /server_info: print server version/status information
  /stats: print server stats (?usedonly, ?filter=<regex>, ?type=Counters|Gauges|All, ?format=json|prometheus)
  /stats/prometheus: print server stats in prometheus format (?usedonly, ?filter=<regex>)
";

/// Routes one admin request.
pub fn handle(admin: &Admin, method: &Method, uri: &http::Uri) -> Response<Body> {
    let server = &admin.server;
    let params = query(uri);
    let has = |k: &str| params.iter().any(|(p, _)| p == k);
    let param = |k: &str| params.iter().find(|(p, _)| p == k).map(|(_, v)| v.clone());
    let path = uri.path();
    if MUTATING.contains(&path) && method != Method::POST {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("Method {method} not allowed, POST required.\n"),
        );
    }
    if method != Method::GET && method != Method::POST && method != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("Method {method} not allowed.\n"),
        );
    }
    match path {
        "/" | "/help" => text(StatusCode::OK, HELP),
        "/ready" => {
            let state = server.state();
            let status = if state == ServerState::Live {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, format!("{}\n", state.name()))
        }
        "/server_info" => json(&server_info(admin)),
        "/memory" => {
            let rss = stats::resident_bytes().unwrap_or(0);
            json(&proto_json_all_fields(&Memory {
                allocated: rss,
                heap_size: rss,
                total_physical_bytes: rss,
                ..Default::default()
            }))
        }
        "/stats" => stats::handle_stats(admin, &params),
        "/stats/prometheus" => stats::prometheus_response(admin, &params),
        "/config_dump" => config_dump::handle(admin, &params),
        "/clusters" => clusters::handle_clusters(admin, param("format").as_deref()),
        "/listeners" => clusters::handle_listeners(admin, param("format").as_deref()),
        "/certs" => json(&certs::render(admin)),
        "/logging" => logging::handle(admin, method, &params),
        "/healthcheck/fail" => {
            server.health_check_failed.store(true, Ordering::Relaxed);
            server.stats.gauge("server.healthcheck_failed").set(1);
            text(StatusCode::OK, "OK\n")
        }
        "/healthcheck/ok" => {
            server.health_check_failed.store(false, Ordering::Relaxed);
            server.stats.gauge("server.healthcheck_failed").set(0);
            text(StatusCode::OK, "OK\n")
        }
        "/drain_listeners" => {
            let graceful = has("graceful");
            let inbound_only = has("inboundonly");
            tracing::info!(target: "admin", graceful, inbound_only, skip_exit = has("skip_exit"), "draining listeners");
            server.drain_listeners(graceful, inbound_only);
            text(StatusCode::OK, "OK\n")
        }
        "/quitquitquit" => {
            tracing::info!(target: "admin", "quitquitquit");
            server.shutdown.send_replace(true);
            text(StatusCode::OK, "OK\n")
        }
        "/reset_counters" => {
            for (name, kind, _, _) in server.stats.snapshot() {
                if kind == crate::stats::Kind::Counter {
                    server.stats.counter(&name).set(0);
                }
            }
            text(StatusCode::OK, "OK\n")
        }
        _ => text(StatusCode::NOT_FOUND, format!("invalid path. {HELP}")),
    }
}

fn pb_duration(d: std::time::Duration) -> PbDuration {
    PbDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// Envoy's `version` string: `<sha>/<version>/<Clean|Modified>/<RELEASE|DEBUG>/<TLS library>`.
pub fn version_string() -> String {
    format!(
        "waypoint-proxy/{}/Clean/{}/rustls",
        env!("CARGO_PKG_VERSION"),
        if cfg!(debug_assertions) {
            "DEBUG"
        } else {
            "RELEASE"
        }
    )
}

/// `/server_info` in Envoy's `envoy.admin.v3.ServerInfo` shape.
pub fn server_info(admin: &Admin) -> Json {
    let server = &admin.server;
    let o = &server.options;
    let uptime = pb_duration(std::time::Duration::from_secs(
        server.started.elapsed().as_secs(),
    ));
    let state = match server.state() {
        ServerState::Live => server_info::State::Live,
        ServerState::Draining => server_info::State::Draining,
        ServerState::PreInitializing => server_info::State::PreInitializing,
        ServerState::Initializing => server_info::State::Initializing,
    };
    let info = ServerInfo {
        version: version_string(),
        state: state as i32,
        uptime_current_epoch: Some(uptime),
        uptime_all_epochs: Some(uptime),
        hot_restart_version: "disabled".to_owned(),
        command_line_options: Some(CommandLineOptions {
            concurrency: stats::concurrency(server) as u32,
            config_path: o
                .config_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            config_yaml: o.config_yaml.clone().unwrap_or_default(),
            allow_unknown_static_fields: o
                .ignored
                .iter()
                .any(|f| f == "--allow-unknown-static-fields"),
            skip_deprecated_logs: o.ignored.iter().any(|f| f == "--skip-deprecated-logs"),
            local_address_ip_version: if o.ipv6 {
                command_line_options::IpVersion::V6
            } else {
                command_line_options::IpVersion::V4
            } as i32,
            log_level: o.log_level.clone(),
            component_log_level: o.component_log_level.clone(),
            drain_time: Some(pb_duration(std::time::Duration::from_secs(o.drain_time_s))),
            drain_strategy: if o.drain_strategy_immediate {
                command_line_options::DrainStrategy::Immediate
            } else {
                command_line_options::DrainStrategy::Gradual
            } as i32,
            mode: match o.mode {
                crate::cli::Mode::Serve => command_line_options::Mode::Serve,
                crate::cli::Mode::Validate => command_line_options::Mode::Validate,
            } as i32,
            disable_hot_restart: true,
            ..Default::default()
        }),
        node: Some(server.bootstrap.node.clone()),
        hot_restart_initializing: false,
    };
    let mut value = proto_json_all_fields(&info);
    // Top-level fields all printed (as Envoy); the command line without its defaults, because
    // printing every default also prints options newer than older clients' protos know.
    if let (Some(options), Json::Object(map)) = (&info.command_line_options, &mut value)
        && let Ok(cli) = waypoint_proto::json::to_json(options)
    {
        map.insert("command_line_options".to_owned(), cli);
        // Newer than many clients' protos, and always false here (no hot restart).
        map.remove("hot_restart_initializing");
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let uri: http::Uri = "/stats?usedonly&filter=%5E(server%5C.state)%2B.+x&bad=%zz%4"
            .parse()
            .expect("uri");
        let q = query(&uri);
        assert_eq!(
            q,
            [
                ("usedonly".to_owned(), String::new()),
                ("filter".to_owned(), "^(server\\.state)+.+x".to_owned()),
                ("bad".to_owned(), "%zz%4".to_owned()),
            ]
        );
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%C3%A9%"), "é%");
    }
}
