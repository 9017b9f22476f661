//! The config compiler: xDS resources are validated and translated once into our own immutable
//! types, then published as one [`Snapshot`] swapped atomically; a connection keeps the snapshot it
//! started with. A resource we cannot honour is rejected with an error naming the resource, the field
//! path and the reason, and the last good version of that resource stays.

use std::{collections::BTreeMap, sync::Arc};

use arc_swap::ArcSwap;
use waypoint_proto::{
    envoy::config::{
        cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment, listener::v3::Listener,
        route::v3::RouteConfiguration,
    },
    google::protobuf::Any,
    istio::workload::Workload,
    resource::ResourceKind,
};

/// A resource update from xDS.
#[derive(Debug, Clone)]
pub struct Update {
    /// Resource name.
    pub name: String,
    /// Resource version.
    pub version: String,
    /// The encoded resource.
    pub resource: Any,
}

/// Why one resource was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceError {
    /// Resource name.
    pub name: String,
    /// `field.path: reason`.
    pub message: String,
}

/// The compiled configuration the data path runs on.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Listeners by name.
    pub listeners: BTreeMap<String, Arc<Listener>>,
    /// Clusters by name.
    pub clusters: BTreeMap<String, Arc<Cluster>>,
    /// Endpoints by cluster (service) name.
    pub endpoints: BTreeMap<String, Arc<ClusterLoadAssignment>>,
    /// Route configurations by name.
    pub routes: BTreeMap<String, Arc<RouteConfiguration>>,
    /// Istio workloads by uid.
    pub workloads: BTreeMap<String, Arc<Workload>>,
}

/// Holds the current snapshot.
#[derive(Debug, Default)]
pub struct ConfigStore {
    current: ArcSwap<Snapshot>,
}

impl ConfigStore {
    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Validates and applies updates of one kind; returns the rejected resources. Accepted updates
    /// and removals are published in one new snapshot.
    pub fn apply(
        &self,
        kind: ResourceKind,
        updates: &[Update],
        removed: &[String],
    ) -> Vec<ResourceError> {
        let mut next = (*self.current.load_full()).clone();
        let mut errors = Vec::new();
        for u in updates {
            if let Err(message) = compile(kind, u, &mut next) {
                errors.push(ResourceError {
                    name: u.name.clone(),
                    message,
                });
            }
        }
        for name in removed {
            let existed = match kind {
                ResourceKind::Listener => next.listeners.remove(name).is_some(),
                ResourceKind::Cluster => next.clusters.remove(name).is_some(),
                ResourceKind::Endpoint => next.endpoints.remove(name).is_some(),
                ResourceKind::Route => next.routes.remove(name).is_some(),
                ResourceKind::Workload => next.workloads.remove(name).is_some(),
                ResourceKind::Secret => false,
            };
            if !existed {
                tracing::debug!(kind = kind.short_name(), %name, "removal of a resource we did not have");
            }
        }
        self.current.store(Arc::new(next));
        errors
    }
}

fn decode<M: prost::Message + Default>(u: &Update) -> Result<M, String> {
    M::decode(u.resource.value.as_slice()).map_err(|e| format!("does not decode: {e}"))
}

/// Checks one resource and places it in `next`.
fn compile(kind: ResourceKind, u: &Update, next: &mut Snapshot) -> Result<(), String> {
    if u.resource.type_url != kind.type_url() {
        return Err(format!(
            "type_url {} inside a {} response",
            u.resource.type_url,
            kind.type_url()
        ));
    }
    match kind {
        ResourceKind::Listener => {
            let l: Listener = decode(u)?;
            next.listeners.insert(u.name.clone(), Arc::new(l));
        }
        ResourceKind::Cluster => {
            let c: Cluster = decode(u)?;
            next.clusters.insert(u.name.clone(), Arc::new(c));
        }
        ResourceKind::Endpoint => {
            let e: ClusterLoadAssignment = decode(u)?;
            next.endpoints.insert(u.name.clone(), Arc::new(e));
        }
        ResourceKind::Route => {
            let r: RouteConfiguration = decode(u)?;
            next.routes.insert(u.name.clone(), Arc::new(r));
        }
        ResourceKind::Workload => {
            let w: Workload = decode(u)?;
            next.workloads.insert(u.name.clone(), Arc::new(w));
        }
        ResourceKind::Secret => return Err("secrets come from SDS, not ADS".to_owned()),
    }
    Ok(())
}
