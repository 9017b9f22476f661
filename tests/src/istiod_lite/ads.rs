//! `AggregatedDiscoveryService`: state-of-the-world and delta ADS over the resource [`Store`],
//! following the xDS protocol (versions, nonces, ACK/NACK, wildcard and named subscriptions,
//! removals in delta), with every ACK and NACK recorded in a [`StatusBook`] that tests and
//! `/debug/xds` read.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use tokio::sync::{Mutex, mpsc, watch};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use waypoint_proto::{
    envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        Resource as XdsResource, aggregated_discovery_service_server::AggregatedDiscoveryService,
    },
    resource::ResourceKind,
};

use super::store::{Snapshot, Store, fnv1a};

/// How many closed connections the status book keeps.
const CLOSED_HISTORY: usize = 256;

/// A NACK as the client sent it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Nack {
    /// The version the client rejected (what we sent with the nonce it answered).
    pub version: String,
    /// The nonce it answered.
    pub nonce: String,
    /// `error_detail.code`.
    pub code: i32,
    /// `error_detail.message`.
    pub message: String,
}

/// Per-type state of one stream.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeStatus {
    /// Wildcard subscription.
    pub wildcard: bool,
    /// Explicitly subscribed names.
    pub subscribed: Vec<String>,
    /// Version of the last response sent.
    pub sent_version: Option<String>,
    /// Nonce of the last response sent.
    pub sent_nonce: Option<String>,
    /// Responses sent.
    pub responses: u64,
    /// Last version the client ACKed.
    pub acked_version: Option<String>,
    /// ACKs received.
    pub acks: u64,
    /// NACKs received.
    pub nacks: u64,
    /// The most recent NACK.
    pub last_nack: Option<Nack>,
    /// Names removed in the last delta response.
    pub last_removed: Vec<String>,
}

/// One ADS stream as seen by istiod-lite.
#[derive(Debug, Clone, Serialize)]
pub struct ConnStatus {
    /// Stream id (increasing).
    pub id: u64,
    /// `node.id` from the first request.
    pub node_id: String,
    /// `sotw` or `delta`.
    pub stream: &'static str,
    /// Whether the stream is still open.
    pub connected: bool,
    /// Per type URL.
    pub types: BTreeMap<String, TypeStatus>,
}

/// ACK/NACK bookkeeping for all streams.
pub struct StatusBook {
    conns: Mutex<BTreeMap<u64, ConnStatus>>,
    next_id: AtomicU64,
    changed: watch::Sender<u64>,
}

impl Default for StatusBook {
    fn default() -> Self {
        let (changed, _) = watch::channel(0);
        StatusBook {
            conns: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            changed,
        }
    }
}

impl StatusBook {
    /// Every stream, open and recently closed.
    pub async fn connections(&self) -> Vec<ConnStatus> {
        self.conns.lock().await.values().cloned().collect()
    }

    /// Waits until `pred` holds for the current connections, or `timeout` passes.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&[ConnStatus]) -> bool,
    ) -> Result<Vec<ConnStatus>, Vec<ConnStatus>> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let conns = self.connections().await;
            if pred(&conns) {
                return Ok(conns);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(self.connections().await),
            }
        }
    }

    async fn open(&self, stream: &'static str) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut conns = self.conns.lock().await;
        conns.insert(
            id,
            ConnStatus {
                id,
                node_id: String::new(),
                stream,
                connected: true,
                types: BTreeMap::new(),
            },
        );
        let closed: Vec<u64> = conns
            .values()
            .filter(|c| !c.connected)
            .map(|c| c.id)
            .collect();
        if closed.len() > CLOSED_HISTORY {
            for old in closed.iter().take(closed.len() - CLOSED_HISTORY) {
                conns.remove(old);
            }
        }
        drop(conns);
        self.bump();
        id
    }

    async fn update(&self, id: u64, f: impl FnOnce(&mut ConnStatus)) {
        if let Some(c) = self.conns.lock().await.get_mut(&id) {
            f(c);
        }
        self.bump();
    }

    /// Records an ACK (no `detail`) or a NACK answering `nonce`, which carried `sent_version`.
    async fn record_reply(
        &self,
        id: u64,
        type_url: String,
        nonce: String,
        sent_version: String,
        acked_version: String,
        detail: Option<waypoint_proto::google::rpc::Status>,
    ) {
        self.update(id, |c| {
            let t = c.types.entry(type_url).or_default();
            match detail {
                Some(err) => {
                    t.nacks += 1;
                    t.last_nack = Some(Nack {
                        version: sent_version,
                        nonce,
                        code: err.code,
                        message: err.message,
                    });
                }
                None => {
                    t.acks += 1;
                    t.acked_version = Some(acked_version);
                }
            }
        })
        .await;
    }

    /// Records the subscription state of one type.
    async fn record_subscription(
        &self,
        id: u64,
        type_url: String,
        wildcard: bool,
        subscribed: Vec<String>,
    ) {
        self.update(id, |c| {
            let t = c.types.entry(type_url).or_default();
            t.wildcard = wildcard;
            t.subscribed = subscribed;
        })
        .await;
    }

    /// Records a response sent.
    async fn record_sent(
        &self,
        id: u64,
        type_url: String,
        version: String,
        nonce: String,
        removed: Option<Vec<String>>,
    ) {
        self.update(id, |c| {
            let t = c.types.entry(type_url).or_default();
            t.sent_version = Some(version);
            t.sent_nonce = Some(nonce);
            t.responses += 1;
            if let Some(removed) = removed {
                t.last_removed = removed;
            }
        })
        .await;
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

/// The tonic service.
#[derive(Clone)]
pub struct AdsService {
    store: Arc<Store>,
    book: Arc<StatusBook>,
}

impl AdsService {
    /// Serves `store`, recording into `book`.
    pub fn new(store: Arc<Store>, book: Arc<StatusBook>) -> Self {
        AdsService { store, book }
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let id = self.book.open("sotw").await;
        let stream = SotwStream {
            id,
            store: self.store.clone(),
            book: self.book.clone(),
            tx,
            subs: BTreeMap::new(),
            nonce: 0,
        };
        tokio::spawn(stream.run(request.into_inner()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let id = self.book.open("delta").await;
        let stream = DeltaStream {
            id,
            store: self.store.clone(),
            book: self.book.clone(),
            tx,
            subs: BTreeMap::new(),
            nonce: 0,
        };
        tokio::spawn(stream.run(request.into_inner()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Kinds a client may subscribe to with an empty name list meaning "everything" (legacy wildcard).
fn wildcard_capable(kind: ResourceKind) -> bool {
    matches!(
        kind,
        ResourceKind::Listener | ResourceKind::Cluster | ResourceKind::Workload
    )
}

#[derive(Default)]
struct SotwSub {
    wildcard: bool,
    names: BTreeSet<String>,
    last_version: Option<String>,
    last_nonce: Option<String>,
    nonce_versions: HashMap<String, String>,
}

struct SotwStream {
    id: u64,
    store: Arc<Store>,
    book: Arc<StatusBook>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    subs: BTreeMap<ResourceKind, SotwSub>,
    nonce: u64,
}

impl SotwStream {
    async fn run(mut self, mut requests: Streaming<DiscoveryRequest>) {
        let mut snapshots = self.store.subscribe();
        loop {
            tokio::select! {
                req = requests.message() => match req {
                    Ok(Some(req)) => {
                        let snap = snapshots.borrow().clone();
                        if self.on_request(req, &snap).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(stream = self.id, %status, "SotW stream ended");
                        break;
                    }
                },
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let snap = snapshots.borrow_and_update().clone();
                    let kinds: Vec<ResourceKind> = self.subs.keys().copied().collect();
                    for kind in kinds {
                        if self.respond(kind, &snap, false).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
        self.book.update(self.id, |c| c.connected = false).await;
    }

    async fn on_request(&mut self, req: DiscoveryRequest, snap: &Snapshot) -> Result<(), ()> {
        if let Some(node) = &req.node {
            let node_id = node.id.clone();
            self.book.update(self.id, |c| c.node_id = node_id).await;
        }
        let Some(kind) = ResourceKind::from_type_url(&req.type_url) else {
            tracing::warn!(type_url = %req.type_url, "SotW request for a type istiod-lite does not serve");
            return Ok(());
        };
        let sub = self.subs.entry(kind).or_default();
        let first = sub.last_nonce.is_none() && req.response_nonce.is_empty();
        if !req.response_nonce.is_empty() {
            if sub.last_nonce.as_deref() != Some(req.response_nonce.as_str()) {
                // A stale nonce: the client answered an older response; per the protocol it is ignored.
                tracing::debug!(nonce = %req.response_nonce, "ignoring stale SotW nonce");
                return Ok(());
            }
            let version = sub
                .nonce_versions
                .get(&req.response_nonce)
                .cloned()
                .unwrap_or_default();
            let nonce = req.response_nonce.clone();
            let type_url = req.type_url.clone();
            let acked = req.version_info.clone();
            let detail = req.error_detail.clone();
            self.book
                .record_reply(self.id, type_url, nonce, version, acked, detail)
                .await;
        }
        let sub = self.subs.entry(kind).or_default();
        let names: BTreeSet<String> = req
            .resource_names
            .iter()
            .filter(|n| *n != "*")
            .cloned()
            .collect();
        let wildcard = req.resource_names.iter().any(|n| n == "*")
            || (req.resource_names.is_empty() && wildcard_capable(kind));
        let changed = first || names != sub.names || wildcard != sub.wildcard;
        sub.names = names;
        sub.wildcard = wildcard;
        let (subscribed, type_url) = (
            sub.names.iter().cloned().collect::<Vec<_>>(),
            req.type_url.clone(),
        );
        self.book
            .record_subscription(self.id, type_url, wildcard, subscribed)
            .await;
        self.respond(kind, snap, changed).await
    }

    async fn respond(
        &mut self,
        kind: ResourceKind,
        snap: &Snapshot,
        force: bool,
    ) -> Result<(), ()> {
        let Some(sub) = self.subs.get_mut(&kind) else {
            return Ok(());
        };
        let resources: Vec<_> = if sub.wildcard {
            snap.of(kind).cloned().collect()
        } else {
            sub.names
                .iter()
                .filter_map(|n| snap.get(kind, n).cloned())
                .collect()
        };
        let version = if sub.wildcard {
            snap.kind_version(kind)
        } else {
            let text: String = resources
                .iter()
                .map(|r| format!("{}={};", r.name, r.version))
                .collect();
            format!("{:016x}", fnv1a(text.as_bytes()))
        };
        if !force && sub.last_version.as_deref() == Some(version.as_str()) {
            return Ok(());
        }
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        sub.last_version = Some(version.clone());
        sub.last_nonce = Some(nonce.clone());
        sub.nonce_versions.insert(nonce.clone(), version.clone());
        if sub.nonce_versions.len() > 64 {
            let keep = nonce.clone();
            sub.nonce_versions.retain(|k, _| *k == keep);
        }
        let response = DiscoveryResponse {
            version_info: version.clone(),
            resources: resources.iter().map(|r| r.any.clone()).collect(),
            type_url: kind.type_url().to_owned(),
            nonce: nonce.clone(),
            ..Default::default()
        };
        self.book
            .record_sent(self.id, kind.type_url().to_owned(), version, nonce, None)
            .await;
        self.tx.send(Ok(response)).await.map_err(|_| ())
    }
}

#[derive(Default)]
struct DeltaSub {
    wildcard: bool,
    names: BTreeSet<String>,
    /// name → version the client has (sent by us or declared in initial_resource_versions).
    known: HashMap<String, String>,
    /// Explicit names we already told the client do not exist.
    announced_absent: BTreeSet<String>,
    nonce_versions: HashMap<String, String>,
}

struct DeltaStream {
    id: u64,
    store: Arc<Store>,
    book: Arc<StatusBook>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    subs: BTreeMap<ResourceKind, DeltaSub>,
    nonce: u64,
}

impl DeltaStream {
    async fn run(mut self, mut requests: Streaming<DeltaDiscoveryRequest>) {
        let mut snapshots = self.store.subscribe();
        loop {
            tokio::select! {
                req = requests.message() => match req {
                    Ok(Some(req)) => {
                        let snap = snapshots.borrow().clone();
                        if self.on_request(req, &snap).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(stream = self.id, %status, "delta stream ended");
                        break;
                    }
                },
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let snap = snapshots.borrow_and_update().clone();
                    let kinds: Vec<ResourceKind> = self.subs.keys().copied().collect();
                    for kind in kinds {
                        if self.respond(kind, &snap).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
        self.book.update(self.id, |c| c.connected = false).await;
    }

    async fn on_request(&mut self, req: DeltaDiscoveryRequest, snap: &Snapshot) -> Result<(), ()> {
        if let Some(node) = &req.node {
            let node_id = node.id.clone();
            self.book.update(self.id, |c| c.node_id = node_id).await;
        }
        let Some(kind) = ResourceKind::from_type_url(&req.type_url) else {
            tracing::warn!(type_url = %req.type_url, "delta request for a type istiod-lite does not serve");
            return Ok(());
        };
        let is_new = !self.subs.contains_key(&kind);
        let sub = self.subs.entry(kind).or_default();
        if !req.response_nonce.is_empty() {
            let version = sub
                .nonce_versions
                .get(&req.response_nonce)
                .cloned()
                .unwrap_or_default();
            let nonce = req.response_nonce.clone();
            let detail = req.error_detail.clone();
            let type_url = req.type_url.clone();
            self.book
                .record_reply(self.id, type_url, nonce, version.clone(), version, detail)
                .await;
        }
        let sub = self.subs.entry(kind).or_default();
        if is_new && req.resource_names_subscribe.is_empty() && wildcard_capable(kind) {
            sub.wildcard = true;
        }
        for name in &req.resource_names_subscribe {
            if name == "*" {
                sub.wildcard = true;
            } else {
                sub.names.insert(name.clone());
                sub.announced_absent.remove(name);
            }
        }
        for name in &req.resource_names_unsubscribe {
            if name == "*" {
                sub.wildcard = false;
            } else {
                sub.names.remove(name);
                sub.announced_absent.remove(name);
                if !sub.wildcard {
                    sub.known.remove(name);
                }
            }
        }
        for (name, version) in &req.initial_resource_versions {
            sub.known.insert(name.clone(), version.clone());
        }
        let (wildcard, subscribed, type_url) = (
            sub.wildcard,
            sub.names.iter().cloned().collect::<Vec<_>>(),
            req.type_url.clone(),
        );
        self.book
            .record_subscription(self.id, type_url, wildcard, subscribed)
            .await;
        self.respond(kind, snap).await
    }

    async fn respond(&mut self, kind: ResourceKind, snap: &Snapshot) -> Result<(), ()> {
        let Some(sub) = self.subs.get_mut(&kind) else {
            return Ok(());
        };
        let mut wanted: BTreeSet<String> = sub.names.clone();
        if sub.wildcard {
            wanted.extend(snap.of(kind).map(|r| r.name.clone()));
        }
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        for name in &wanted {
            match snap.get(kind, name) {
                Some(r) => {
                    if sub.known.get(name) != Some(&r.version) {
                        sub.known.insert(name.clone(), r.version.clone());
                        resources.push(XdsResource {
                            name: r.name.clone(),
                            version: r.version.clone(),
                            resource: Some(r.any.clone()),
                            ..Default::default()
                        });
                    }
                }
                None => {
                    if sub.known.remove(name).is_some() {
                        removed.push(name.clone());
                    } else if sub.names.contains(name) && sub.announced_absent.insert(name.clone())
                    {
                        // Tell the client an explicitly requested resource does not exist.
                        removed.push(name.clone());
                    }
                }
            }
        }
        // Resources the client knows that left the wildcard set.
        let gone: Vec<String> = sub
            .known
            .keys()
            .filter(|n| !wanted.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            sub.known.remove(&name);
            removed.push(name);
        }
        if resources.is_empty() && removed.is_empty() {
            return Ok(());
        }
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let version = snap.kind_version(kind);
        sub.nonce_versions.insert(nonce.clone(), version.clone());
        if sub.nonce_versions.len() > 64 {
            let keep = nonce.clone();
            sub.nonce_versions.retain(|k, _| *k == keep);
        }
        let response = DeltaDiscoveryResponse {
            system_version_info: version.clone(),
            resources,
            type_url: kind.type_url().to_owned(),
            removed_resources: removed.clone(),
            nonce: nonce.clone(),
            ..Default::default()
        };
        self.book
            .record_sent(
                self.id,
                kind.type_url().to_owned(),
                version,
                nonce,
                Some(removed),
            )
            .await;
        self.tx.send(Ok(response)).await.map_err(|_| ())
    }
}
