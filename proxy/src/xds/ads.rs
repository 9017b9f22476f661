//! The ADS client (delta xDS): wildcard CDS, LDS and `istio.workload.Workload`, EDS by name for EDS
//! clusters, Envoy's warming order (CDS, then EDS, then LDS), ACK with the applied version, NACK per
//! resource with `error_detail` naming resource, field and reason (the last good version stays), and
//! reconnects with backoff, declaring the versions it holds.

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use waypoint_proto::{
    envoy::{
        config::{cluster::v3::cluster::DiscoveryType, core::v3::Node},
        service::discovery::v3::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    },
    google::rpc::Status as RpcStatus,
    resource::ResourceKind,
};
use waypoint_shared::backoff::Backoff;

use crate::{
    bootstrap::{AdsSettings, GrpcTarget},
    config::Update,
    server::{Server, ServerState},
    xds::Entry,
};

/// gRPC code carried in NACKs (INVALID_ARGUMENT, as Envoy).
const NACK_CODE: i32 = 3;

/// Errors of one ADS session.
#[derive(Debug, thiserror::Error)]
pub enum AdsError {
    /// Could not connect.
    #[error("connect {target}: {reason}")]
    Connect {
        /// Where.
        target: String,
        /// Why.
        reason: String,
    },
    /// The stream failed.
    #[error("stream: {0}")]
    Stream(Box<tonic::Status>),
    /// The stream closed.
    #[error("the server closed the stream")]
    Closed,
}

/// Opens a gRPC channel to an xDS server.
pub async fn connect(target: &GrpcTarget) -> Result<Channel, AdsError> {
    let err = |reason: String| AdsError::Connect {
        target: format!("{target:?}"),
        reason,
    };
    match target {
        GrpcTarget::Tcp(addr) => Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| err(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| err(e.to_string())),
        GrpcTarget::Pipe(path) => {
            let path: PathBuf = path.clone();
            Endpoint::from_static("http://uds.local")
                .connect_timeout(Duration::from_secs(5))
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        tokio::net::UnixStream::connect(path)
                            .await
                            .map(hyper_util::rt::TokioIo::new)
                    }
                }))
                .await
                .map_err(|e| err(e.to_string()))
        }
    }
}

/// Runs the ADS client forever (reconnecting with capped backoff).
pub async fn run(server: Arc<Server>, settings: AdsSettings, subscribe_workloads: bool) {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    loop {
        let mut session = Session::new(server.clone(), subscribe_workloads);
        match session.run(&settings).await {
            Ok(()) => {}
            Err(err) => {
                let delay = backoff.next_delay();
                tracing::warn!(target: "xds", attempt = backoff.attempts(), retry_in_ms = delay.as_millis() as u64, "ADS: {err}");
                if session.responses > 0 {
                    backoff.reset();
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// The stat prefix Envoy uses for a type's update counters.
fn stat_prefix(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::Cluster => "cluster_manager.cds",
        ResourceKind::Listener => "listener_manager.lds",
        ResourceKind::Endpoint => "cluster_manager.eds",
        ResourceKind::Route => "http.rds",
        ResourceKind::Secret => "sds",
        ResourceKind::Workload => "workload_discovery",
    }
}

struct Session {
    server: Arc<Server>,
    subscribe_workloads: bool,
    eds_names: BTreeSet<String>,
    rds_names: BTreeSet<String>,
    lds_requested: bool,
    eds_answered: bool,
    cds_applied: bool,
    responses: u64,
}

impl Session {
    fn new(server: Arc<Server>, subscribe_workloads: bool) -> Self {
        Session {
            server,
            subscribe_workloads,
            eds_names: BTreeSet::new(),
            rds_names: BTreeSet::new(),
            lds_requested: false,
            eds_answered: false,
            cds_applied: false,
            responses: 0,
        }
    }

    /// The versions we hold, sent on (re)connect so the server skips what we have.
    fn known_versions(&self, kind: ResourceKind) -> HashMap<String, String> {
        self.server
            .xds
            .record(kind)
            .resources
            .into_iter()
            .filter(|(_, e)| e.resource.is_some())
            .map(|(n, e)| (n, e.version))
            .collect()
    }

    fn request(&self, kind: ResourceKind, node: Option<Node>) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            node,
            type_url: kind.type_url().to_owned(),
            initial_resource_versions: self.known_versions(kind),
            ..Default::default()
        }
    }

    async fn run(&mut self, settings: &AdsSettings) -> Result<(), AdsError> {
        let channel = connect(&settings.target).await?;
        let mut client =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(usize::MAX);
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(64);
        // Node on the first message only (set_node_on_first_message_only).
        let send = |req: DeltaDiscoveryRequest| {
            let tx = tx.clone();
            async move { tx.send(req).await.map_err(|_| AdsError::Closed) }
        };
        send(self.request(
            ResourceKind::Cluster,
            Some(self.server.bootstrap.node.clone()),
        ))
        .await?;
        if self.subscribe_workloads {
            send(self.request(ResourceKind::Workload, None)).await?;
        }
        let mut stream = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .map_err(|s| AdsError::Stream(Box::new(s)))?
            .into_inner();
        tracing::info!(target: "xds", cluster = %settings.cluster, "ADS stream open (delta)");
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Err(AdsError::Closed),
                Err(status) => return Err(AdsError::Stream(Box::new(status))),
            };
            self.responses += 1;
            let Some(kind) = ResourceKind::from_type_url(&resp.type_url) else {
                tracing::warn!(target: "xds", type_url = %resp.type_url, "response for a type we did not ask for; NACK");
                send(DeltaDiscoveryRequest {
                    type_url: resp.type_url.clone(),
                    response_nonce: resp.nonce.clone(),
                    error_detail: Some(RpcStatus {
                        code: NACK_CODE,
                        message: format!("type {} is not supported by this proxy", resp.type_url),
                        details: vec![],
                    }),
                    ..Default::default()
                })
                .await?;
                continue;
            };
            let ack = self.apply(kind, &resp);
            send(ack).await?;
            for follow_up in self.follow_ups(kind) {
                send(follow_up).await?;
            }
        }
    }

    /// Applies one response and returns the ACK or NACK to send.
    fn apply(
        &mut self,
        kind: ResourceKind,
        resp: &DeltaDiscoveryResponse,
    ) -> DeltaDiscoveryRequest {
        let stats = &self.server.stats;
        let prefix = stat_prefix(kind);
        stats.counter(&format!("{prefix}.update_attempt")).inc();
        let mut updates = Vec::with_capacity(resp.resources.len());
        let mut errors = Vec::new();
        for r in &resp.resources {
            match &r.resource {
                Some(any) => updates.push(Update {
                    name: r.name.clone(),
                    version: r.version.clone(),
                    resource: any.clone(),
                }),
                None => errors.push(crate::config::ResourceError {
                    name: r.name.clone(),
                    message: "resource body missing".to_owned(),
                }),
            }
        }
        errors.extend(
            self.server
                .config
                .apply(kind, &updates, &resp.removed_resources),
        );
        let now = SystemTime::now();
        let failed: BTreeSet<&str> = errors.iter().map(|e| e.name.as_str()).collect();
        self.server.xds.update(kind, |rec| {
            for u in &updates {
                if failed.contains(u.name.as_str()) {
                    continue;
                }
                rec.resources.insert(
                    u.name.clone(),
                    Entry {
                        version: u.version.clone(),
                        resource: Some(u.resource.clone()),
                        last_updated: now,
                        error: None,
                    },
                );
            }
            for e in &errors {
                let version = resp
                    .resources
                    .iter()
                    .find(|r| r.name == e.name)
                    .map(|r| r.version.clone())
                    .unwrap_or_default();
                let entry = rec
                    .resources
                    .entry(e.name.clone())
                    .or_insert_with(|| Entry {
                        version: String::new(),
                        resource: None,
                        last_updated: now,
                        error: None,
                    });
                entry.error = Some((e.message.clone(), version, now));
            }
            for name in &resp.removed_resources {
                rec.resources.remove(name);
            }
            if errors.is_empty() {
                rec.version_info = resp.system_version_info.clone();
            }
            rec.last_updated = Some(now);
        });
        if kind == ResourceKind::Endpoint {
            for u in &updates {
                if !failed.contains(u.name.as_str()) {
                    stats
                        .counter(&format!("cluster.{}.update_success", u.name))
                        .inc();
                }
            }
        }
        let mut ack = DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        };
        if errors.is_empty() {
            stats.counter(&format!("{prefix}.update_success")).inc();
            tracing::debug!(target: "xds", kind = kind.short_name(), updated = updates.len(), removed = resp.removed_resources.len(), "ACK");
        } else {
            stats.counter(&format!("{prefix}.update_rejected")).inc();
            let message = errors
                .iter()
                .map(|e| format!("{} '{}': {}", kind.message_name(), e.name, e.message))
                .collect::<Vec<_>>()
                .join("; ");
            tracing::warn!(target: "xds", kind = kind.short_name(), "NACK: {message}");
            ack.error_detail = Some(RpcStatus {
                code: NACK_CODE,
                message,
                details: vec![],
            });
        }
        match kind {
            ResourceKind::Cluster => self.cds_applied = true,
            ResourceKind::Endpoint => self.eds_answered = true,
            ResourceKind::Listener
                if self.cds_applied && self.server.state() == ServerState::PreInitializing =>
            {
                self.server.set_state(ServerState::Live);
                tracing::info!(target: "xds", "initial configuration applied: LIVE");
            }
            _ => {}
        }
        ack
    }

    /// Subscription changes after applying `kind`: EDS names follow CDS; LDS is requested once the
    /// clusters (and their endpoints) are in, as Envoy warms clusters before listeners.
    fn follow_ups(&mut self, kind: ResourceKind) -> Vec<DeltaDiscoveryRequest> {
        let mut out = Vec::new();
        if kind == ResourceKind::Cluster {
            let snapshot = self.server.config.snapshot();
            let wanted: BTreeSet<String> = snapshot
                .clusters
                .values()
                .filter(|c| matches!(&c.cluster_discovery_type, Some(waypoint_proto::envoy::config::cluster::v3::cluster::ClusterDiscoveryType::Type(t)) if *t == DiscoveryType::Eds as i32))
                .map(|c| c.eds_cluster_config.as_ref().map(|e| e.service_name.clone()).filter(|s| !s.is_empty()).unwrap_or_else(|| c.name.clone()))
                .collect();
            let subscribe: Vec<String> = wanted.difference(&self.eds_names).cloned().collect();
            let unsubscribe: Vec<String> = self.eds_names.difference(&wanted).cloned().collect();
            if !subscribe.is_empty() || !unsubscribe.is_empty() {
                let mut req = self.request(ResourceKind::Endpoint, None);
                // Nothing new to wait for when we already hold every newly subscribed name.
                if subscribe
                    .iter()
                    .all(|n| req.initial_resource_versions.contains_key(n))
                {
                    self.eds_answered = true;
                }
                req.initial_resource_versions
                    .retain(|n, _| subscribe.contains(n));
                req.resource_names_subscribe = subscribe;
                req.resource_names_unsubscribe = unsubscribe;
                out.push(req);
                self.eds_names = wanted;
            }
            if self.eds_names.is_empty() {
                self.eds_answered = true;
            }
        }
        if kind == ResourceKind::Listener {
            // RDS names follow the listeners' HTTP connection managers (`rds` over ADS).
            let wanted = rds_names(&self.server.config.snapshot());
            let subscribe: Vec<String> = wanted.difference(&self.rds_names).cloned().collect();
            let unsubscribe: Vec<String> = self.rds_names.difference(&wanted).cloned().collect();
            if !subscribe.is_empty() || !unsubscribe.is_empty() {
                let mut req = self.request(ResourceKind::Route, None);
                req.initial_resource_versions
                    .retain(|n, _| subscribe.contains(n));
                req.resource_names_subscribe = subscribe;
                req.resource_names_unsubscribe = unsubscribe;
                out.push(req);
                self.rds_names = wanted;
            }
        }
        if !self.lds_requested && self.cds_applied && self.eds_answered {
            self.lds_requested = true;
            out.push(self.request(ResourceKind::Listener, None));
        }
        out
    }
}

/// The RouteConfiguration names the snapshot's listeners ask for over ADS.
fn rds_names(snapshot: &crate::config::Snapshot) -> BTreeSet<String> {
    use crate::config::filters::{NetworkFilterKind, hcm::Routes};
    snapshot
        .listeners
        .values()
        .flat_map(|l| l.filter_chains.iter().chain(l.default_filter_chain.iter()))
        .flat_map(|c| c.filters.iter())
        .filter_map(|f| match &f.kind {
            NetworkFilterKind::HttpConnectionManager(h) => match &h.routes {
                Routes::Rds { name, .. } => Some(name.clone()),
                Routes::Inline(_) => None,
            },
            _ => None,
        })
        .collect()
}
