//! The data plane: what every connection needs — the server state (config snapshots, stats,
//! drain), TLS contexts from SDS, the cluster manager (load balancing, pools) and the listener
//! manager (socket listeners, in-process internal listeners).

use std::sync::Arc;

use crate::{
    listener::manager::ListenerManager, server::Server, tls::TlsContexts,
    upstream::cluster_manager::ClusterManager, xds::sds::SecretStore,
};

/// Shared by every connection.
pub struct DataPlane {
    /// Process state: config, stats, drain.
    pub server: Arc<Server>,
    /// SDS secrets.
    pub secrets: Arc<SecretStore>,
    /// rustls configurations built from transport sockets and secrets.
    pub tls: TlsContexts,
    /// Clusters at run time.
    pub clusters: ClusterManager,
    /// Listeners at run time.
    pub listeners: ListenerManager,
}

impl DataPlane {
    /// A data plane over `server` and `secrets`.
    pub fn new(server: Arc<Server>, secrets: Arc<SecretStore>) -> Arc<DataPlane> {
        crate::telemetry::configure(&server);
        Arc::new(DataPlane {
            tls: TlsContexts::new(secrets.clone()),
            clusters: ClusterManager::default(),
            listeners: ListenerManager::default(),
            server,
            secrets,
        })
    }
}
