//! State-of-the-world framing (`StreamAggregatedResources`), as Envoy's SotW gRPC mux speaks it:
//!
//! - every request of a type carries its whole subscription in `resource_names` (empty for the
//!   wildcard types CDS, LDS and WDS; the names for EDS and RDS), the `version_info` we last
//!   accepted of that type and the nonce of the last response of that type (empty on a new stream,
//!   so a reconnect re-requests with the last versions);
//! - an ACK is the response's `version_info` and nonce; a NACK is the previously accepted
//!   `version_info`, the nonce and `error_detail`;
//! - a response carries whole resources without names (taken from the resource itself, or from a
//!   `envoy.service.discovery.v3.Resource` wrapper) and one version for all; for the wildcard types
//!   it is the complete set, so what we hold and it lacks is removed; for EDS and RDS it carries
//!   only named resources and an absent one is not a removal;
//! - a resource whose bytes did not change is not re-applied (it keeps its version and time).

use std::collections::{BTreeSet, HashMap};

use prost::Message as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Streaming, transport::Channel};
use waypoint_proto::{
    envoy::{
        config::{
            cluster::v3::Cluster, core::v3::Node, endpoint::v3::ClusterLoadAssignment,
            listener::v3::Listener, route::v3::RouteConfiguration,
        },
        extensions::transport_sockets::tls::v3::Secret,
        service::discovery::v3::{
            DiscoveryRequest, DiscoveryResponse, Resource,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    },
    google::{protobuf::Any, rpc::Status as RpcStatus},
    istio::workload::Workload,
    resource::ResourceKind,
};

use crate::{
    config::Update,
    xds::{
        TypeRecord,
        ads::{Interest, Received, Wire, is_wildcard},
    },
};

/// The type URL of the optional per-resource wrapper in SotW responses.
const RESOURCE_WRAPPER: &str = "type.googleapis.com/envoy.service.discovery.v3.Resource";

/// The SotW framing: the last nonce seen per type.
#[derive(Debug, Default)]
pub(crate) struct SotwWire {
    nonces: HashMap<String, String>,
}

/// The resource inside `any` and its name.
fn named(kind: ResourceKind, any: &Any) -> Result<(String, Any), String> {
    if any.type_url == RESOURCE_WRAPPER {
        let r = Resource::decode(any.value.as_slice())
            .map_err(|e| format!("envoy.service.discovery.v3.Resource does not decode: {e}"))?;
        let inner = r
            .resource
            .ok_or_else(|| format!("Resource '{}' has no resource", r.name))?;
        if inner.type_url != kind.type_url() {
            return Err(format!(
                "type_url {} inside a {} response",
                inner.type_url,
                kind.type_url()
            ));
        }
        return Ok((r.name, inner));
    }
    if any.type_url != kind.type_url() {
        return Err(format!(
            "type_url {} inside a {} response",
            any.type_url,
            kind.type_url()
        ));
    }
    let bytes = any.value.as_slice();
    let name = match kind {
        ResourceKind::Listener => Listener::decode(bytes).map(|m| m.name),
        ResourceKind::Cluster => Cluster::decode(bytes).map(|m| m.name),
        ResourceKind::Endpoint => ClusterLoadAssignment::decode(bytes).map(|m| m.cluster_name),
        ResourceKind::Route => RouteConfiguration::decode(bytes).map(|m| m.name),
        ResourceKind::Workload => Workload::decode(bytes).map(|m| m.uid),
        ResourceKind::Secret => Secret::decode(bytes).map(|m| m.name),
    }
    .map_err(|e| format!("{} does not decode: {e}", kind.message_name()))?;
    if name.is_empty() {
        return Err(format!(
            "{} without {}",
            kind.message_name(),
            kind.name_field()
        ));
    }
    Ok((name, any.clone()))
}

impl Wire for SotwWire {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const NAME: &'static str = "state of the world";

    async fn open(
        mut client: AggregatedDiscoveryServiceClient<Channel>,
        requests: ReceiverStream<DiscoveryRequest>,
    ) -> Result<Streaming<DiscoveryResponse>, tonic::Status> {
        Ok(client
            .stream_aggregated_resources(requests)
            .await?
            .into_inner())
    }

    fn type_url(resp: &DiscoveryResponse) -> &str {
        &resp.type_url
    }

    fn read(
        &mut self,
        kind: ResourceKind,
        resp: &DiscoveryResponse,
        held: &TypeRecord,
    ) -> Received {
        let mut out = Received {
            version_info: resp.version_info.clone(),
            ..Default::default()
        };
        let mut seen = BTreeSet::new();
        for (i, any) in resp.resources.iter().enumerate() {
            let (name, resource) = match named(kind, any) {
                Ok(n) => n,
                Err(e) => {
                    out.invalid.push(format!("resources[{i}]: {e}"));
                    continue;
                }
            };
            if !seen.insert(name.clone()) {
                out.invalid.push(format!(
                    "resources[{i}]: duplicate {} '{name}' in the response",
                    kind.message_name()
                ));
                continue;
            }
            let unchanged = held
                .resources
                .get(&name)
                .is_some_and(|e| e.error.is_none() && e.resource.as_ref() == Some(&resource));
            if !unchanged {
                out.updates.push(Update {
                    name,
                    version: resp.version_info.clone(),
                    resource,
                });
            }
        }
        // The complete set: what it lacks is gone. Not when some resource could not even be
        // named: the response cannot be trusted as complete then.
        if is_wildcard(kind) && out.invalid.is_empty() {
            out.removed = held
                .resources
                .keys()
                .filter(|n| !seen.contains(*n))
                .cloned()
                .collect();
        }
        out
    }

    fn reply(
        &mut self,
        resp: &DiscoveryResponse,
        nack: Option<RpcStatus>,
        held: &TypeRecord,
        names: &BTreeSet<String>,
    ) -> DiscoveryRequest {
        self.nonces
            .insert(resp.type_url.clone(), resp.nonce.clone());
        DiscoveryRequest {
            // ACK: the version just applied; NACK: the one accepted before.
            version_info: if nack.is_none() {
                resp.version_info.clone()
            } else {
                held.version_info.clone()
            },
            resource_names: names.iter().cloned().collect(),
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail: nack,
            ..Default::default()
        }
    }

    fn request(
        &mut self,
        interest: &Interest,
        held: &TypeRecord,
        node: Option<Node>,
    ) -> DiscoveryRequest {
        let type_url = interest.kind.type_url().to_owned();
        DiscoveryRequest {
            node,
            version_info: held.version_info.clone(),
            resource_names: interest.names.iter().cloned().collect(),
            response_nonce: self.nonces.get(&type_url).cloned().unwrap_or_default(),
            type_url,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::xds::Entry;

    fn listener(name: &str, port: u32) -> Any {
        Any {
            type_url: ResourceKind::Listener.type_url().to_owned(),
            value: Listener {
                name: name.to_owned(),
                stat_prefix: format!("p{port}"),
                ..Default::default()
            }
            .encode_to_vec(),
        }
    }

    fn held(items: &[(&str, Any)], version_info: &str) -> TypeRecord {
        let mut rec = TypeRecord {
            version_info: version_info.to_owned(),
            ..Default::default()
        };
        for (n, any) in items {
            rec.resources.insert(
                (*n).to_owned(),
                Entry {
                    version: version_info.to_owned(),
                    resource: Some(any.clone()),
                    last_updated: SystemTime::now(),
                    error: None,
                },
            );
        }
        rec
    }

    fn response(
        kind: ResourceKind,
        version: &str,
        nonce: &str,
        items: Vec<Any>,
    ) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: version.to_owned(),
            resources: items,
            type_url: kind.type_url().to_owned(),
            nonce: nonce.to_owned(),
            ..Default::default()
        }
    }

    fn interest(kind: ResourceKind, names: &[&str]) -> Interest {
        Interest {
            kind,
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            subscribe: vec![],
            unsubscribe: vec![],
        }
    }

    #[test]
    fn wildcard_response_is_the_complete_set() {
        let rec = held(&[("a", listener("a", 1)), ("b", listener("b", 1))], "v1");
        let resp = response(
            ResourceKind::Listener,
            "v2",
            "n2",
            vec![listener("a", 1), listener("c", 1)],
        );
        let r = SotwWire::default().read(ResourceKind::Listener, &resp, &rec);
        // `a` is unchanged (not re-applied), `c` is new, `b` is gone.
        assert_eq!(
            r.updates
                .iter()
                .map(|u| u.name.as_str())
                .collect::<Vec<_>>(),
            ["c"]
        );
        assert_eq!(r.updates[0].version, "v2");
        assert_eq!(r.removed, ["b"]);
        assert_eq!(r.version_info, "v2");
    }

    #[test]
    fn named_response_does_not_remove() {
        let cla = |name: &str| Any {
            type_url: ResourceKind::Endpoint.type_url().to_owned(),
            value: ClusterLoadAssignment {
                cluster_name: name.to_owned(),
                ..Default::default()
            }
            .encode_to_vec(),
        };
        let rec = held(&[("x", cla("x"))], "v1");
        let resp = response(ResourceKind::Endpoint, "v2", "n", vec![cla("y")]);
        let r = SotwWire::default().read(ResourceKind::Endpoint, &resp, &rec);
        assert!(r.removed.is_empty());
        assert_eq!(r.updates[0].name, "y");
    }

    #[test]
    fn wrapped_bad_and_duplicate_resources() {
        let wrapped = Any {
            type_url: RESOURCE_WRAPPER.to_owned(),
            value: Resource {
                name: "w".into(),
                resource: Some(listener("w", 2)),
                ..Default::default()
            }
            .encode_to_vec(),
        };
        let bad = Any {
            type_url: ResourceKind::Cluster.type_url().to_owned(),
            value: vec![],
        };
        let rec = held(&[("old", listener("old", 1))], "v1");
        let resp = response(
            ResourceKind::Listener,
            "v2",
            "n",
            vec![wrapped, listener("w", 3), bad],
        );
        let r = SotwWire::default().read(ResourceKind::Listener, &resp, &rec);
        assert_eq!(r.updates.len(), 1);
        assert_eq!(r.updates[0].name, "w");
        assert_eq!(r.invalid.len(), 2, "{:?}", r.invalid);
        assert!(r.invalid[0].starts_with("resources[1]: duplicate"));
        assert!(r.invalid[1].contains("type_url"));
        // Not trusted as complete: nothing removed.
        assert!(r.removed.is_empty());
    }

    #[test]
    fn ack_nack_and_requests() {
        let mut wire = SotwWire::default();
        let rec = held(&[], "v1");
        // First request: node, last accepted version, no nonce, names.
        let first = wire.request(
            &interest(ResourceKind::Endpoint, &["e1", "e2"]),
            &rec,
            Some(Node {
                id: "n".into(),
                ..Default::default()
            }),
        );
        assert_eq!(first.version_info, "v1");
        assert!(first.response_nonce.is_empty());
        assert_eq!(first.resource_names, ["e1", "e2"]);
        assert_eq!(first.node.map(|n| n.id), Some("n".to_owned()));

        let resp = response(ResourceKind::Endpoint, "v2", "7", vec![]);
        let ack = wire.reply(
            &resp,
            None,
            &rec,
            &interest(ResourceKind::Endpoint, &["e1"]).names,
        );
        assert_eq!(
            (ack.version_info.as_str(), ack.response_nonce.as_str()),
            ("v2", "7")
        );
        assert_eq!(ack.resource_names, ["e1"]);
        assert!(ack.error_detail.is_none() && ack.node.is_none());

        let resp = response(ResourceKind::Endpoint, "v3", "8", vec![]);
        let nack = wire.reply(
            &resp,
            Some(RpcStatus {
                code: 3,
                message: "ClusterLoadAssignment 'e1': bad".into(),
                details: vec![],
            }),
            &rec,
            &interest(ResourceKind::Endpoint, &["e1"]).names,
        );
        assert_eq!(nack.version_info, "v1", "the previously accepted version");
        assert_eq!(nack.response_nonce, "8");
        assert!(
            nack.error_detail
                .is_some_and(|d| d.message.contains("'e1'"))
        );

        // A later subscription change carries the last nonce of its type.
        let change = wire.request(&interest(ResourceKind::Endpoint, &["e3"]), &rec, None);
        assert_eq!(change.response_nonce, "8");
        assert_eq!(change.resource_names, ["e3"]);
        // Wildcard types: no names.
        let lds = wire.request(&interest(ResourceKind::Listener, &[]), &rec, None);
        assert!(lds.resource_names.is_empty() && lds.response_nonce.is_empty());
    }
}
