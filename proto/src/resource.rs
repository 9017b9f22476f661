//! The xDS resource kinds the waypoint exchanges, with their type URLs and how each is named.

use serde_json::Value as Json;

/// One xDS resource type served over ADS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    /// LDS: `envoy.config.listener.v3.Listener`.
    Listener,
    /// CDS: `envoy.config.cluster.v3.Cluster`.
    Cluster,
    /// EDS: `envoy.config.endpoint.v3.ClusterLoadAssignment`.
    Endpoint,
    /// RDS: `envoy.config.route.v3.RouteConfiguration`.
    Route,
    /// SDS: `envoy.extensions.transport_sockets.tls.v3.Secret`.
    Secret,
    /// WDS: `istio.workload.Workload`.
    Workload,
}

/// Type URL of LDS resources.
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Type URL of CDS resources.
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Type URL of EDS resources.
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// Type URL of RDS resources.
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// Type URL of SDS resources.
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// Type URL of Istio workload (WDS) resources.
pub const WORKLOAD_TYPE: &str = "type.googleapis.com/istio.workload.Workload";

impl ResourceKind {
    /// Every kind, in Istio's push order (clusters before endpoints before listeners ...).
    pub const ALL: [ResourceKind; 6] = [
        ResourceKind::Cluster,
        ResourceKind::Endpoint,
        ResourceKind::Listener,
        ResourceKind::Route,
        ResourceKind::Secret,
        ResourceKind::Workload,
    ];

    /// The xDS type URL.
    pub fn type_url(self) -> &'static str {
        match self {
            ResourceKind::Listener => LISTENER_TYPE,
            ResourceKind::Cluster => CLUSTER_TYPE,
            ResourceKind::Endpoint => ENDPOINT_TYPE,
            ResourceKind::Route => ROUTE_TYPE,
            ResourceKind::Secret => SECRET_TYPE,
            ResourceKind::Workload => WORKLOAD_TYPE,
        }
    }

    /// The kind for a type URL.
    pub fn from_type_url(url: &str) -> Option<ResourceKind> {
        ResourceKind::ALL.into_iter().find(|k| k.type_url() == url)
    }

    /// The protobuf message name.
    pub fn message_name(self) -> &'static str {
        crate::json::type_name_of_url(self.type_url())
    }

    /// The top-level list key in resource files (`listeners`, `clusters`, ...).
    pub fn file_key(self) -> &'static str {
        match self {
            ResourceKind::Listener => "listeners",
            ResourceKind::Cluster => "clusters",
            ResourceKind::Endpoint => "endpoints",
            ResourceKind::Route => "routes",
            ResourceKind::Secret => "secrets",
            ResourceKind::Workload => "workloads",
        }
    }

    /// The kind stored under a resource-file key.
    pub fn from_file_key(key: &str) -> Option<ResourceKind> {
        ResourceKind::ALL.into_iter().find(|k| k.file_key() == key)
    }

    /// The field that carries the resource name.
    pub fn name_field(self) -> &'static str {
        match self {
            ResourceKind::Endpoint => "cluster_name",
            ResourceKind::Workload => "uid",
            _ => "name",
        }
    }

    /// The resource name inside a proto3-JSON document (snake_case or camelCase key).
    pub fn name_in_json(self, doc: &Json) -> Option<&str> {
        let snake = self.name_field();
        let camel = match snake {
            "cluster_name" => "clusterName",
            other => other,
        };
        doc.get(snake)
            .or_else(|| doc.get(camel))
            .and_then(Json::as_str)
    }

    /// Short name used in logs and debug output (`LDS`, `CDS`, ...).
    pub fn short_name(self) -> &'static str {
        match self {
            ResourceKind::Listener => "LDS",
            ResourceKind::Cluster => "CDS",
            ResourceKind::Endpoint => "EDS",
            ResourceKind::Route => "RDS",
            ResourceKind::Secret => "SDS",
            ResourceKind::Workload => "WDS",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_resolve() {
        for kind in ResourceKind::ALL {
            assert_eq!(ResourceKind::from_type_url(kind.type_url()), Some(kind));
            assert_eq!(ResourceKind::from_file_key(kind.file_key()), Some(kind));
            assert!(
                crate::json::message_descriptor(kind.message_name()).is_ok(),
                "{kind:?}"
            );
        }
        let doc = serde_json::json!({"clusterName": "c"});
        assert_eq!(ResourceKind::Endpoint.name_in_json(&doc), Some("c"));
    }
}
