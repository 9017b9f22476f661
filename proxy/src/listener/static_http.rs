//! The bootstrap's static HTTP listeners, served exactly as configured: each is one filter chain
//! with an HTTP connection manager whose inline routes forward by path prefix to a STATIC cluster of
//! one socket endpoint (pilot-agent's 15021 → agent `:15020/healthz/ready`, 15090 → admin
//! `/stats/prometheus`). Anything beyond that shape is refused at start with its path, never served
//! half-configured.

use std::{collections::HashMap, convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::Incoming;
use tokio::net::TcpListener;

use crate::config::{
    bootstrap::CompiledBootstrap,
    cluster::Discovery,
    endpoint::EndpointAddress,
    filters::{NetworkFilterKind, hcm::Routes},
    listener::Bind,
    route::{Action, ClusterTarget, RouteConfig},
};

type Body = BoxBody<Bytes, hyper::Error>;

/// One static HTTP listener ready to serve.
#[derive(Debug, Clone)]
pub struct StaticHttpListener {
    /// Listener name.
    pub name: String,
    /// Bind address.
    pub addr: SocketAddr,
    routes: Arc<RouteConfig>,
    /// Cluster name → its single endpoint.
    clusters: Arc<HashMap<String, SocketAddr>>,
}

/// Extracts the static HTTP listeners; each problem names the listener and why it is not servable.
pub fn plan(b: &CompiledBootstrap) -> (Vec<StaticHttpListener>, Vec<String>) {
    let mut clusters = HashMap::new();
    for c in &b.clusters {
        if let Discovery::Static(la) = &c.discovery {
            let eps: Vec<SocketAddr> = la
                .localities
                .iter()
                .flat_map(|l| l.endpoints.iter())
                .filter_map(|e| match e.address {
                    EndpointAddress::Socket(a) => Some(a),
                    _ => None,
                })
                .collect();
            if let [one] = eps.as_slice() {
                clusters.insert(c.name.clone(), *one);
            }
        }
    }
    let clusters = Arc::new(clusters);
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for l in &b.listeners {
        let Bind::Socket { addr, .. } = &l.bind else {
            problems.push(format!(
                "static listener '{}': only socket listeners are served statically",
                l.name
            ));
            continue;
        };
        let hcm = match l.filter_chains.as_slice() {
            [chain] => chain.filters.iter().find_map(|f| match &f.kind {
                NetworkFilterKind::HttpConnectionManager(h) => Some(h),
                _ => None,
            }),
            _ => None,
        };
        let Some(hcm) = hcm else {
            problems.push(format!(
                "static listener '{}': want one filter chain with an HTTP connection manager",
                l.name
            ));
            continue;
        };
        let Routes::Inline(routes) = &hcm.routes else {
            problems.push(format!(
                "static listener '{}': routes must be inline",
                l.name
            ));
            continue;
        };
        out.push(StaticHttpListener {
            name: l.name.clone(),
            addr: *addr,
            routes: Arc::new((**routes).clone()),
            clusters: clusters.clone(),
        });
    }
    (out, problems)
}

fn status(code: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = code;
    r
}

impl StaticHttpListener {
    /// Binds and serves until the process exits; returns the bound address.
    pub async fn serve(self) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(self.addr).await?;
        let bound = listener.local_addr()?;
        let this = Arc::new(self);
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Incoming>();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (this, client) = (this.clone(), client.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (this, client) = (this.clone(), client.clone());
                        async move { Ok::<_, Infallible>(this.route(req, &client).await) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(io, svc)
                    .await;
                });
            }
        });
        Ok(bound)
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        client: &hyper_util::client::legacy::Client<
            hyper_util::client::legacy::connect::HttpConnector,
            Incoming,
        >,
    ) -> Response<Body> {
        let host = req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .unwrap_or("");
        let Some(vhost) = self.routes.virtual_host(host) else {
            return status(StatusCode::NOT_FOUND, "");
        };
        let path = req.uri().path().to_owned();
        let Some(route) = vhost
            .routes
            .iter()
            .find(|r| r.matcher.matches_path(&path, false))
        else {
            return status(StatusCode::NOT_FOUND, "");
        };
        let cluster = match &route.action {
            Action::Forward(f) => match &f.target {
                ClusterTarget::Name(n) => n.clone(),
                _ => return status(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"),
            },
            _ => return status(StatusCode::NOT_FOUND, ""),
        };
        let Some(endpoint) = self.clusters.get(&cluster) else {
            return status(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
        };
        let (mut parts, body) = req.into_parts();
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned());
        parts.uri = match format!("http://{endpoint}{pq}").parse() {
            Ok(u) => u,
            Err(_) => return status(StatusCode::BAD_REQUEST, "bad path"),
        };
        parts.version = http::Version::HTTP_11;
        match client.request(Request::from_parts(parts, body)).await {
            Ok(resp) => resp.map(|b| b.boxed()),
            Err(e) => {
                tracing::debug!(listener = %self.name, %cluster, "upstream connect error: {e}");
                status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers",
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_listener_forwards_to_the_agent_cluster() {
        // An "agent" answering /healthz/ready, and the golden bootstrap's listeners moved to it.
        let agent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let agent_addr = agent.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((s, _)) = agent.accept().await {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let body = format!("agent saw {}", req.uri().path());
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/istio/bootstrap_ambient_golden.json"
        ))
        .expect("fixture");
        let mut doc: serde_json::Value = serde_json::from_str(&text).expect("json");
        for c in doc["static_resources"]["clusters"]
            .as_array_mut()
            .expect("clusters")
        {
            if c["name"] == "agent" {
                c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
                    ["port_value"] = agent_addr.port().into();
            }
        }
        for l in doc["static_resources"]["listeners"]
            .as_array_mut()
            .expect("listeners")
        {
            l["address"]["socket_address"]["address"] = "127.0.0.1".into();
            l["address"]["socket_address"]["port_value"] = 0.into();
        }
        let bootstrap: waypoint_proto::envoy::config::bootstrap::v3::Bootstrap =
            waypoint_proto::json::from_json(&doc).expect("bootstrap");
        let compiled = crate::config::bootstrap::compile(&bootstrap).expect("compiles");
        let (listeners, problems) = plan(&compiled);
        assert!(problems.is_empty(), "{problems:?}");
        let readiness = listeners
            .into_iter()
            .find(|l| l.name.ends_with("15021"))
            .expect("15021 listener");
        let addr = readiness.serve().await.expect("serves");

        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<Bytes>>();
        let resp = client
            .get(format!("http://{addr}/healthz/ready").parse().expect("uri"))
            .await
            .expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"agent saw /healthz/ready");
        let resp = client
            .get(format!("http://{addr}/other").parse().expect("uri"))
            .await
            .expect("response");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "no route");
    }
}
