//! The XDS proxy: serves `AggregatedDiscoveryService` (SotW and delta) to the proxy on a Unix socket
//! and, for each stream the proxy opens, opens the same kind of stream to istiod over TLS with the
//! bearer token, `ClusterID` and `XDS_HEADER_*` metadata (reference/istio-facts.md §1.10).
//!
//! Requests are forwarded unchanged; responses only when their type URL is an Envoy type or
//! `istio.workload.Workload`. Any upstream failure ends the downstream stream with UNAVAILABLE so the
//! proxy reconnects (and the agent dials istiod again). As in pilot-agent, only the newest downstream
//! stream is kept: opening one closes the previous.

use std::{
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming, transport::Channel};
use waypoint_proto::{
    envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        aggregated_discovery_service_server::{
            AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
        },
    },
    resource::WORKLOAD_TYPE,
};

use crate::{ca::add_auth_headers, config::AgentConfig, metrics::AgentMetrics};

/// How to reach istiod.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `host:port` of istiod's xDS.
    pub addr: String,
    /// Plaintext (`:15010`).
    pub plaintext: bool,
    /// Root certificate file.
    pub root_path: PathBuf,
    /// TLS server name.
    pub server_name: String,
    /// Bearer token file.
    pub token_path: PathBuf,
    /// `ClusterID` header.
    pub cluster_id: String,
    /// `XDS_HEADER_*`.
    pub headers: Vec<(String, String)>,
    /// Dial timeout.
    pub connect_timeout: Duration,
}

impl UpstreamConfig {
    /// istiod settings from the agent configuration.
    pub fn from_agent(cfg: &AgentConfig) -> Self {
        let addr = cfg.proxy_config.discovery_address.clone();
        UpstreamConfig {
            plaintext: addr.ends_with(":15010"),
            server_name: cfg.server_name(&addr),
            addr,
            root_path: cfg.xds_root_path(),
            token_path: PathBuf::from(crate::config::paths::TOKEN),
            cluster_id: cfg.cluster_id.clone(),
            headers: cfg.xds_headers.clone(),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Whether a response type may reach the proxy.
pub fn forwardable(type_url: &str) -> bool {
    type_url.starts_with("type.googleapis.com/envoy.") || type_url == WORKLOAD_TYPE
}

/// The XDS proxy service.
#[derive(Clone)]
pub struct XdsProxy {
    upstream: UpstreamConfig,
    metrics: Arc<AgentMetrics>,
    /// Bumped for every new downstream stream; older streams end when it moves on.
    current: Arc<AtomicU64>,
    newest: watch::Sender<u64>,
}

impl XdsProxy {
    /// A proxy to `upstream`.
    pub fn new(upstream: UpstreamConfig, metrics: Arc<AgentMetrics>) -> Self {
        let (newest, _) = watch::channel(0);
        XdsProxy {
            upstream,
            metrics,
            current: Arc::new(AtomicU64::new(0)),
            newest,
        }
    }

    /// Serves on the Unix socket at `path` until `shutdown`.
    pub async fn serve(
        self,
        path: &Path,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), crate::uds::UdsError> {
        let listener = crate::uds::bind(path)?;
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        tonic::transport::Server::builder()
            .add_service(
                AggregatedDiscoveryServiceServer::new(self)
                    .max_decoding_message_size(usize::MAX)
                    .max_encoding_message_size(usize::MAX),
            )
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(|e| crate::uds::UdsError::Serve(e.to_string()))
    }

    async fn client(&self) -> Result<AggregatedDiscoveryServiceClient<Channel>, Status> {
        let fail = |reason: String| {
            self.metrics.istiod_connection_failures.inc();
            tracing::warn!(target: "xdsproxy", upstream = %self.upstream.addr, "connecting to istiod failed: {reason}");
            Status::unavailable(format!(
                "agent could not reach istiod at {}: {reason}",
                self.upstream.addr
            ))
        };
        let dial = crate::istiod::Dial {
            addr: &self.upstream.addr,
            plaintext: self.upstream.plaintext,
            root_path: &self.upstream.root_path,
            server_name: &self.upstream.server_name,
            connect_timeout: self.upstream.connect_timeout,
            request_timeout: None,
        };
        let channel = crate::istiod::channel(dial).await.map_err(fail)?;
        Ok(AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(usize::MAX))
    }

    /// Registers a new downstream stream and returns its id plus a receiver that fires when a newer
    /// stream replaces it.
    fn register(&self) -> (u64, watch::Receiver<u64>) {
        let id = self.current.fetch_add(1, Ordering::SeqCst) + 1;
        self.newest.send_replace(id);
        (id, self.newest.subscribe())
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Pumps one downstream/upstream stream pair until either side ends.
#[allow(clippy::too_many_arguments)]
async fn pump<Req, Resp>(
    id: u64,
    mut downstream: Streaming<Req>,
    up_tx: mpsc::Sender<Req>,
    mut upstream: Streaming<Resp>,
    down_tx: mpsc::Sender<Result<Resp, Status>>,
    mut newest: watch::Receiver<u64>,
    metrics: Arc<AgentMetrics>,
    type_url: fn(&Resp) -> &str,
) where
    Req: Send + 'static,
    Resp: Send + 'static,
{
    loop {
        tokio::select! {
            req = downstream.message() => match req {
                Ok(Some(req)) => {
                    metrics.xds_proxy_requests.inc();
                    if up_tx.send(req).await.is_err() {
                        metrics.istiod_connection_terminations.inc();
                        let _ = down_tx.send(Err(Status::unavailable("istiod stream closed"))).await;
                        return;
                    }
                }
                Ok(None) | Err(_) => {
                    metrics.envoy_connection_terminations.inc();
                    tracing::debug!(target: "xdsproxy", stream = id, "proxy closed its xDS stream");
                    return;
                }
            },
            resp = upstream.message() => match resp {
                Ok(Some(resp)) => {
                    let t = type_url(&resp);
                    if !forwardable(t) {
                        metrics.xds_proxy_dropped.inc();
                        tracing::warn!(target: "xdsproxy", type_url = %t, "dropping response of a type the proxy does not consume");
                        continue;
                    }
                    metrics.xds_proxy_responses.inc();
                    if down_tx.send(Ok(resp)).await.is_err() {
                        metrics.envoy_connection_terminations.inc();
                        return;
                    }
                }
                Ok(None) => {
                    metrics.istiod_connection_terminations.inc();
                    tracing::info!(target: "xdsproxy", stream = id, "istiod closed the stream");
                    let _ = down_tx.send(Err(Status::unavailable("istiod closed the xDS stream"))).await;
                    return;
                }
                Err(status) => {
                    metrics.istiod_connection_terminations.inc();
                    tracing::warn!(target: "xdsproxy", stream = id, %status, "istiod stream failed");
                    let _ = down_tx.send(Err(Status::unavailable(format!("istiod stream failed: {}", status.message())))).await;
                    return;
                }
            },
            _ = newest.changed() => {
                if *newest.borrow() != id {
                    tracing::info!(target: "xdsproxy", stream = id, "a newer xDS stream replaced this one");
                    let _ = down_tx.send(Err(Status::aborted("replaced by a newer xDS stream"))).await;
                    return;
                }
            }
        }
    }
}

impl XdsProxy {
    /// Bridges one downstream stream to a new upstream stream opened by `open`.
    async fn bridge<Req, Resp, F, Fut>(
        &self,
        request: Request<Streaming<Req>>,
        open: F,
        type_url: fn(&Resp) -> &str,
    ) -> Result<Response<ResponseStream<Resp>>, Status>
    where
        Req: Send + 'static,
        Resp: Send + 'static,
        F: FnOnce(AggregatedDiscoveryServiceClient<Channel>, Request<ReceiverStream<Req>>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<Streaming<Resp>>, Status>>,
    {
        let (id, newest) = self.register();
        let client = self.client().await?;
        let (up_tx, up_rx) = mpsc::channel::<Req>(64);
        // Forward the proxy's first request before waiting for istiod's response headers: gRPC
        // servers may send headers only with the first response.
        let mut downstream = request.into_inner();
        match downstream.message().await {
            Ok(Some(first)) => {
                self.metrics.xds_proxy_requests.inc();
                let _ = up_tx.send(first).await;
            }
            Ok(None) => {
                return Err(Status::cancelled(
                    "proxy closed the stream before its first request",
                ));
            }
            Err(status) => return Err(status),
        }
        let mut up_req = Request::new(ReceiverStream::new(up_rx));
        add_auth_headers(
            &mut up_req,
            &self.upstream.token_path,
            &self.upstream.cluster_id,
            &self.upstream.headers,
        )
        .await;
        let upstream = open(client, up_req).await.map_err(|s| {
            self.metrics.istiod_connection_failures.inc();
            Status::unavailable(format!("istiod refused the xDS stream: {}", s.message()))
        })?;
        let (down_tx, down_rx) = mpsc::channel(4);
        tokio::spawn(pump(
            id,
            downstream,
            up_tx,
            upstream.into_inner(),
            down_tx,
            newest,
            self.metrics.clone(),
            type_url,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(down_rx))))
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsProxy {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        self.bridge(
            request,
            |mut c, r| async move { c.stream_aggregated_resources(r).await },
            |r: &DiscoveryResponse| r.type_url.as_str(),
        )
        .await
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        self.bridge(
            request,
            |mut c, r| async move { c.delta_aggregated_resources(r).await },
            |r: &DeltaDiscoveryResponse| r.type_url.as_str(),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_only_envoy_and_workload_types() {
        assert!(forwardable(
            "type.googleapis.com/envoy.config.cluster.v3.Cluster"
        ));
        assert!(forwardable(WORKLOAD_TYPE));
        assert!(!forwardable(
            "type.googleapis.com/istio.networking.nds.v1.NameTable"
        ));
        assert!(!forwardable(
            "type.googleapis.com/istio.mesh.v1alpha1.ProxyConfig"
        ));
    }
}
