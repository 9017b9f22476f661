//! The ADS client, whatever the wire protocol: wildcard CDS, LDS and `istio.workload.Workload`, EDS
//! by name for EDS clusters and RDS by name for the listeners' `rds` route configurations, Envoy's
//! warming order (CDS, then EDS, then LDS, then RDS), ACK with the applied version, NACK per resource
//! with `error_detail` naming resource, field and reason (the last good version stays), and
//! reconnects with capped backoff, declaring the versions it holds.
//!
//! What differs between delta xDS ([`super::delta`], `DeltaAggregatedResources`) and state of the
//! world ([`super::sotw`], `StreamAggregatedResources`) is only the framing, behind [`Wire`]: how a
//! response is read into [`Received`] (named updates and removals) and how an interest, an ACK or a
//! NACK is written. Applying resources, the subscription bookkeeping and the stream loop are here.

use std::{
    collections::BTreeSet,
    future::Future,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Streaming,
    transport::{Channel, Endpoint},
};
use waypoint_proto::{
    envoy::{
        config::{
            cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType},
            core::v3::Node,
        },
        service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
    google::rpc::Status as RpcStatus,
    resource::ResourceKind,
};
use waypoint_shared::backoff::Backoff;

use crate::{
    bootstrap::{AdsSettings, GrpcTarget},
    config::Update,
    server::Server,
    xds::{Entry, TypeRecord, delta::DeltaWire, sotw::SotwWire},
};

/// gRPC code carried in NACKs (INVALID_ARGUMENT, as Envoy).
pub(crate) const NACK_CODE: i32 = 3;

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

/// Runs the ADS client forever (reconnecting with capped backoff), delta or state of the world
/// as the bootstrap's `ads_config.api_type` says.
pub async fn run(server: Arc<Server>, settings: AdsSettings, subscribe_workloads: bool) {
    if settings.delta {
        run_with(server, settings, subscribe_workloads, DeltaWire::default).await
    } else {
        run_with(server, settings, subscribe_workloads, SotwWire::default).await
    }
}

async fn run_with<W: Wire>(
    server: Arc<Server>,
    settings: AdsSettings,
    subscribe_workloads: bool,
    wire: fn() -> W,
) {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    loop {
        let mut session = Session::new(server.clone(), subscribe_workloads, wire());
        if let Err(err) = session.run(&settings).await {
            let delay = backoff.next_delay();
            tracing::warn!(target: "xds", attempt = backoff.attempts(), retry_in_ms = delay.as_millis() as u64, "ADS: {err}");
            if session.responses > 0 {
                backoff.reset();
            }
            tokio::time::sleep(delay).await;
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

/// Types subscribed with a wildcard (every resource the server has): the response to them is the
/// complete set. EDS and RDS are subscribed by name.
pub(crate) fn is_wildcard(kind: ResourceKind) -> bool {
    matches!(
        kind,
        ResourceKind::Cluster | ResourceKind::Listener | ResourceKind::Workload
    )
}

/// One response read off the wire, in the terms the shared code applies.
#[derive(Debug, Default)]
pub(crate) struct Received {
    /// The response's version (`system_version_info` / `version_info`).
    pub version_info: String,
    /// Added or changed resources.
    pub updates: Vec<Update>,
    /// Names no longer served.
    pub removed: Vec<String>,
    /// Resources that arrived unusable: (name, version, reason); recorded like compile errors.
    pub rejected: Vec<(String, String, String)>,
    /// Problems with the response itself (no resource to record them on); NACK text only.
    pub invalid: Vec<String>,
}

/// A subscription to put on the wire: the first request of a type, or a change of names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Interest {
    /// The type.
    pub kind: ResourceKind,
    /// Every name now wanted (empty for wildcard types).
    pub names: BTreeSet<String>,
    /// Names added since the last request of this type.
    pub subscribe: Vec<String>,
    /// Names dropped since the last request of this type.
    pub unsubscribe: Vec<String>,
}

impl Interest {
    /// The whole type (the subscription of CDS, LDS and WDS).
    pub(crate) fn wildcard(kind: ResourceKind) -> Self {
        Interest {
            kind,
            names: BTreeSet::new(),
            subscribe: Vec::new(),
            unsubscribe: Vec::new(),
        }
    }
}

/// The framing of one xDS variant on the ADS stream.
pub(crate) trait Wire: Send + 'static {
    /// Client → server message.
    type Request: Send + 'static;
    /// Server → client message.
    type Response: Send + 'static;
    /// For logs.
    const NAME: &'static str;

    /// Opens the bidirectional stream.
    fn open(
        client: AggregatedDiscoveryServiceClient<Channel>,
        requests: ReceiverStream<Self::Request>,
    ) -> impl Future<Output = Result<Streaming<Self::Response>, tonic::Status>> + Send;

    /// The response's type URL.
    fn type_url(resp: &Self::Response) -> &str;

    /// Reads a response of `kind`; `held` is what we hold of that type.
    fn read(&mut self, kind: ResourceKind, resp: &Self::Response, held: &TypeRecord) -> Received;

    /// The ACK (`nack` empty) or NACK answering `resp`. `held` is the record after applying it;
    /// `names` the type's current subscription.
    fn reply(
        &mut self,
        resp: &Self::Response,
        nack: Option<RpcStatus>,
        held: &TypeRecord,
        names: &BTreeSet<String>,
    ) -> Self::Request;

    /// A request declaring `interest` (node set on the first request of the stream).
    fn request(
        &mut self,
        interest: &Interest,
        held: &TypeRecord,
        node: Option<Node>,
    ) -> Self::Request;
}

/// What we subscribe to and how far the initial fetch is (Envoy's warming order).
#[derive(Debug, Default)]
pub(crate) struct Subscriptions {
    subscribe_workloads: bool,
    eds_names: BTreeSet<String>,
    rds_names: BTreeSet<String>,
    lds_requested: bool,
    eds_answered: bool,
    cds_applied: bool,
}

impl Subscriptions {
    fn new(subscribe_workloads: bool) -> Self {
        Subscriptions {
            subscribe_workloads,
            ..Default::default()
        }
    }

    /// The requests that open a stream: CDS (and WDS), the rest follows CDS.
    fn initial(&self) -> Vec<Interest> {
        let mut out = vec![Interest::wildcard(ResourceKind::Cluster)];
        if self.subscribe_workloads {
            out.push(Interest::wildcard(ResourceKind::Workload));
        }
        out
    }

    /// The current subscription of `kind`.
    fn current(&self, kind: ResourceKind) -> Interest {
        let names = match kind {
            ResourceKind::Endpoint => self.eds_names.clone(),
            ResourceKind::Route => self.rds_names.clone(),
            _ => BTreeSet::new(),
        };
        Interest {
            kind,
            names,
            subscribe: Vec::new(),
            unsubscribe: Vec::new(),
        }
    }

    /// Notes that a response of `kind` was applied.
    fn applied(&mut self, kind: ResourceKind) {
        match kind {
            ResourceKind::Cluster => self.cds_applied = true,
            ResourceKind::Endpoint => self.eds_answered = true,
            _ => {}
        }
    }

    /// Whether the initial fetch (CDS, EDS, then LDS) is complete once `kind` was applied.
    fn initial_fetch_done(&self, kind: ResourceKind) -> bool {
        kind == ResourceKind::Listener && self.cds_applied
    }

    /// Subscription changes after applying `kind`: EDS names follow CDS, RDS names follow LDS;
    /// LDS is requested once the clusters (and their endpoints) are in, as Envoy warms clusters
    /// before listeners. `held` says which names we already hold (nothing to wait for then).
    fn follow_ups(
        &mut self,
        kind: ResourceKind,
        snapshot: &crate::config::Snapshot,
        held: impl Fn(ResourceKind, &str) -> bool,
    ) -> Vec<Interest> {
        let mut out = Vec::new();
        if kind == ResourceKind::Cluster {
            let wanted = eds_names(snapshot);
            if let Some(change) = diff(ResourceKind::Endpoint, &self.eds_names, &wanted) {
                // Nothing new to wait for when we already hold every newly subscribed name.
                if change
                    .subscribe
                    .iter()
                    .all(|n| held(ResourceKind::Endpoint, n))
                {
                    self.eds_answered = true;
                }
                out.push(change);
                self.eds_names = wanted;
            }
            if self.eds_names.is_empty() {
                self.eds_answered = true;
            }
        }
        if kind == ResourceKind::Listener {
            let wanted = rds_names(snapshot);
            if let Some(change) = diff(ResourceKind::Route, &self.rds_names, &wanted) {
                out.push(change);
                self.rds_names = wanted;
            }
        }
        if !self.lds_requested && self.cds_applied && self.eds_answered {
            self.lds_requested = true;
            out.push(Interest::wildcard(ResourceKind::Listener));
        }
        out
    }
}

/// The change from `had` to `wanted`, if any.
fn diff(kind: ResourceKind, had: &BTreeSet<String>, wanted: &BTreeSet<String>) -> Option<Interest> {
    let subscribe: Vec<String> = wanted.difference(had).cloned().collect();
    let unsubscribe: Vec<String> = had.difference(wanted).cloned().collect();
    (!subscribe.is_empty() || !unsubscribe.is_empty()).then(|| Interest {
        kind,
        names: wanted.clone(),
        subscribe,
        unsubscribe,
    })
}

/// The ClusterLoadAssignment names the snapshot's EDS clusters ask for.
fn eds_names(snapshot: &crate::config::Snapshot) -> BTreeSet<String> {
    snapshot
        .clusters
        .values()
        .filter(|c| {
            matches!(&c.cluster_discovery_type,
                Some(ClusterDiscoveryType::Type(t)) if *t == DiscoveryType::Eds as i32)
        })
        .map(|c| {
            c.eds_cluster_config
                .as_ref()
                .map(|e| e.service_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| c.name.clone())
        })
        .collect()
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

/// Applies one response of `kind` to the config store and the xDS record; returns the NACK
/// status when something was rejected (the accepted resources stay applied either way).
pub(crate) fn apply(server: &Server, kind: ResourceKind, received: Received) -> Option<RpcStatus> {
    let stats = &server.stats;
    let prefix = stat_prefix(kind);
    stats.counter(&format!("{prefix}.update_attempt")).inc();
    let Received {
        version_info,
        updates,
        removed,
        rejected,
        invalid,
    } = received;
    let mut errors: Vec<(String, String, String)> = rejected;
    for e in server.config.apply(kind, &updates, &removed) {
        let version = updates
            .iter()
            .find(|u| u.name == e.name)
            .map(|u| u.version.clone())
            .unwrap_or_default();
        errors.push((e.name, version, e.message));
    }
    let now = SystemTime::now();
    let failed: BTreeSet<&str> = errors.iter().map(|(n, _, _)| n.as_str()).collect();
    server.xds.update(kind, |rec| {
        for u in &updates {
            if failed.contains(u.name.as_str()) {
                continue;
            }
            let previous = rec.resources.insert(
                u.name.clone(),
                Entry {
                    version: u.version.clone(),
                    resource: Some(u.resource.clone()),
                    last_updated: now,
                    error: None,
                },
            );
            // A listener update that is warming: the version it replaces keeps serving.
            if kind == ResourceKind::Listener
                && let Some(previous) = previous.filter(|p| p.resource.is_some())
            {
                server.warming.remember_active(&u.name, previous);
            }
        }
        for (name, version, message) in &errors {
            let entry = rec.resources.entry(name.clone()).or_insert_with(|| Entry {
                version: String::new(),
                resource: None,
                last_updated: now,
                error: None,
            });
            entry.error = Some((message.clone(), version.clone(), now));
        }
        for name in &removed {
            rec.resources.remove(name);
        }
        if errors.is_empty() && invalid.is_empty() {
            rec.version_info = version_info.clone();
        }
        rec.last_updated = Some(now);
    });
    if matches!(kind, ResourceKind::Listener | ResourceKind::Cluster) {
        server
            .lds_cds_applied
            .send_modify(|n| *n = n.wrapping_add(1));
    }
    if kind == ResourceKind::Endpoint {
        for u in &updates {
            if !failed.contains(u.name.as_str()) {
                stats
                    .counter(&format!("cluster.{}.update_success", u.name))
                    .inc();
            }
        }
    }
    if errors.is_empty() && invalid.is_empty() {
        stats.counter(&format!("{prefix}.update_success")).inc();
        // Envoy's `version` gauge: a hash of the last accepted version_info.
        stats
            .gauge(&format!("{prefix}.version"))
            .set(version_hash(&version_info));
        tracing::debug!(target: "xds", kind = kind.short_name(), updated = updates.len(), removed = removed.len(), "ACK");
        return None;
    }
    stats.counter(&format!("{prefix}.update_rejected")).inc();
    let message = invalid
        .into_iter()
        .chain(
            errors
                .iter()
                .map(|(name, _, message)| format!("{} '{name}': {message}", kind.message_name())),
        )
        .collect::<Vec<_>>()
        .join("; ");
    tracing::warn!(target: "xds", kind = kind.short_name(), "NACK: {message}");
    Some(RpcStatus {
        code: NACK_CODE,
        message,
        details: vec![],
    })
}

/// The NACK for a response of a type we do not handle.
pub(crate) fn unsupported_type(type_url: &str) -> RpcStatus {
    RpcStatus {
        code: NACK_CODE,
        message: format!("type {type_url} is not supported by this proxy"),
        details: vec![],
    }
}

struct Session<W: Wire> {
    server: Arc<Server>,
    wire: W,
    subs: Subscriptions,
    responses: u64,
}

impl<W: Wire> Session<W> {
    fn new(server: Arc<Server>, subscribe_workloads: bool, wire: W) -> Self {
        Session {
            server,
            wire,
            subs: Subscriptions::new(subscribe_workloads),
            responses: 0,
        }
    }

    async fn run(&mut self, settings: &AdsSettings) -> Result<(), AdsError> {
        let channel = connect(&settings.target).await?;
        let client =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(usize::MAX);
        let (tx, rx) = mpsc::channel::<W::Request>(64);
        let send = |req: W::Request| {
            let tx = tx.clone();
            async move { tx.send(req).await.map_err(|_| AdsError::Closed) }
        };
        // Node on the first message only (set_node_on_first_message_only).
        let mut node = Some(self.server.bootstrap.node.clone());
        for interest in self.subs.initial() {
            let held = self.server.xds.record(interest.kind);
            send(self.wire.request(&interest, &held, node.take())).await?;
        }
        let mut stream = W::open(client, ReceiverStream::new(rx))
            .await
            .map_err(|s| AdsError::Stream(Box::new(s)))?;
        tracing::info!(target: "xds", cluster = %settings.cluster, "ADS stream open ({})", W::NAME);
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Err(AdsError::Closed),
                Err(status) => return Err(AdsError::Stream(Box::new(status))),
            };
            self.responses += 1;
            let type_url = W::type_url(&resp).to_owned();
            let Some(kind) = ResourceKind::from_type_url(&type_url) else {
                tracing::warn!(target: "xds", %type_url, "response for a type we did not ask for; NACK");
                let reply = self.wire.reply(
                    &resp,
                    Some(unsupported_type(&type_url)),
                    &TypeRecord::default(),
                    &BTreeSet::new(),
                );
                send(reply).await?;
                continue;
            };
            let held = self.server.xds.record(kind);
            let received = self.wire.read(kind, &resp, &held);
            let nack = apply(&self.server, kind, received);
            self.subs.applied(kind);
            if self.subs.initial_fetch_done(kind) {
                self.server.initial_fetch_done();
            }
            let held = self.server.xds.record(kind);
            let reply = self
                .wire
                .reply(&resp, nack, &held, &self.subs.current(kind).names);
            send(reply).await?;
            let snapshot = self.server.config.snapshot();
            let xds = &self.server.xds;
            let follow_ups = self.subs.follow_ups(kind, &snapshot, |k, name| {
                xds.record(k)
                    .resources
                    .get(name)
                    .is_some_and(|e| e.resource.is_some())
            });
            for interest in follow_ups {
                let held = self.server.xds.record(interest.kind);
                send(self.wire.request(&interest, &held, None)).await?;
            }
        }
    }
}

/// A 64-bit FNV-1a hash of a `version_info` (the `version` gauge).
fn version_hash(version: &str) -> u64 {
    version.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warming_order_and_name_changes() {
        let mut subs = Subscriptions::new(true);
        assert_eq!(
            subs.initial(),
            [
                Interest::wildcard(ResourceKind::Cluster),
                Interest::wildcard(ResourceKind::Workload)
            ]
        );
        let empty = crate::config::Snapshot::default();
        // No EDS cluster: LDS follows CDS at once.
        subs.applied(ResourceKind::Cluster);
        let ups = subs.follow_ups(ResourceKind::Cluster, &empty, |_, _| false);
        assert_eq!(ups, [Interest::wildcard(ResourceKind::Listener)]);
        // Only once.
        assert!(
            subs.follow_ups(ResourceKind::Cluster, &empty, |_, _| false)
                .is_empty()
        );
        assert!(subs.initial_fetch_done(ResourceKind::Listener));
        assert!(!subs.initial_fetch_done(ResourceKind::Endpoint));
    }

    #[test]
    fn diff_lists_added_and_dropped_names() {
        let had: BTreeSet<String> = ["a".into(), "b".into()].into();
        let wanted: BTreeSet<String> = ["b".into(), "c".into()].into();
        let d = diff(ResourceKind::Endpoint, &had, &wanted).expect("a change");
        assert_eq!(d.subscribe, ["c"]);
        assert_eq!(d.unsubscribe, ["a"]);
        assert_eq!(d.names, wanted);
        assert!(diff(ResourceKind::Endpoint, &wanted, &wanted).is_none());
    }
}
