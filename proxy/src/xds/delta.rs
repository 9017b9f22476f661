//! Delta xDS framing (`DeltaAggregatedResources`): responses carry only what changed, each resource
//! with its own name and version, and explicit removals; subscriptions change by name
//! (`resource_names_subscribe` / `_unsubscribe`); on (re)connect the versions we hold go in
//! `initial_resource_versions` so the server skips them; an ACK or NACK names only the nonce.

use std::collections::{BTreeSet, HashMap};

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Streaming, transport::Channel};
use waypoint_proto::{
    envoy::{
        config::core::v3::Node,
        service::discovery::v3::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    },
    google::rpc::Status as RpcStatus,
    resource::ResourceKind,
};

use crate::{
    config::Update,
    xds::{
        TypeRecord,
        ads::{Interest, Received, Wire},
    },
};

/// The delta framing; it keeps no state of its own.
#[derive(Debug, Default)]
pub(crate) struct DeltaWire;

/// The versions we hold of a type (resources that were only ever rejected do not count).
fn held_versions(held: &TypeRecord) -> HashMap<String, String> {
    held.resources
        .iter()
        .filter(|(_, e)| e.resource.is_some())
        .map(|(n, e)| (n.clone(), e.version.clone()))
        .collect()
}

impl Wire for DeltaWire {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const NAME: &'static str = "delta";

    async fn open(
        mut client: AggregatedDiscoveryServiceClient<Channel>,
        requests: ReceiverStream<DeltaDiscoveryRequest>,
    ) -> Result<Streaming<DeltaDiscoveryResponse>, tonic::Status> {
        Ok(client
            .delta_aggregated_resources(requests)
            .await?
            .into_inner())
    }

    fn type_url(resp: &DeltaDiscoveryResponse) -> &str {
        &resp.type_url
    }

    fn read(
        &mut self,
        _kind: ResourceKind,
        resp: &DeltaDiscoveryResponse,
        _held: &TypeRecord,
    ) -> Received {
        let mut out = Received {
            version_info: resp.system_version_info.clone(),
            removed: resp.removed_resources.clone(),
            ..Default::default()
        };
        for r in &resp.resources {
            match &r.resource {
                Some(any) => out.updates.push(Update {
                    name: r.name.clone(),
                    version: r.version.clone(),
                    resource: any.clone(),
                }),
                None => out.rejected.push((
                    r.name.clone(),
                    r.version.clone(),
                    "resource body missing".to_owned(),
                )),
            }
        }
        out
    }

    fn reply(
        &mut self,
        resp: &DeltaDiscoveryResponse,
        nack: Option<RpcStatus>,
        _held: &TypeRecord,
        _names: &BTreeSet<String>,
    ) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
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
    ) -> DeltaDiscoveryRequest {
        let mut versions = held_versions(held);
        if !interest.subscribe.is_empty() || !interest.unsubscribe.is_empty() {
            versions.retain(|n, _| interest.subscribe.contains(n));
        }
        DeltaDiscoveryRequest {
            node,
            type_url: interest.kind.type_url().to_owned(),
            initial_resource_versions: versions,
            resource_names_subscribe: interest.subscribe.clone(),
            resource_names_unsubscribe: interest.unsubscribe.clone(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::xds::Entry;

    fn held(names: &[(&str, &str)]) -> TypeRecord {
        let mut rec = TypeRecord::default();
        for (n, v) in names {
            rec.resources.insert(
                (*n).to_owned(),
                Entry {
                    version: (*v).to_owned(),
                    resource: Some(Default::default()),
                    last_updated: SystemTime::now(),
                    error: None,
                },
            );
        }
        rec
    }

    #[test]
    fn wildcard_request_declares_every_held_version() {
        let rec = held(&[("a", "1"), ("b", "2")]);
        let req = DeltaWire.request(
            &Interest::wildcard(ResourceKind::Cluster),
            &rec,
            Some(Node::default()),
        );
        assert_eq!(req.initial_resource_versions.len(), 2);
        assert!(req.node.is_some());
        assert!(req.resource_names_subscribe.is_empty());
    }

    #[test]
    fn named_request_declares_only_new_names() {
        let rec = held(&[("a", "1"), ("b", "2")]);
        let req = DeltaWire.request(
            &Interest {
                kind: ResourceKind::Endpoint,
                names: ["b".to_owned(), "c".to_owned()].into(),
                subscribe: vec!["b".into(), "c".into()],
                unsubscribe: vec!["a".into()],
            },
            &rec,
            None,
        );
        assert_eq!(
            req.initial_resource_versions,
            HashMap::from([("b".to_owned(), "2".to_owned())])
        );
        assert_eq!(req.resource_names_unsubscribe, ["a"]);
    }

    #[test]
    fn missing_body_is_rejected_by_name() {
        let resp = DeltaDiscoveryResponse {
            system_version_info: "v".into(),
            resources: vec![waypoint_proto::envoy::service::discovery::v3::Resource {
                name: "x".into(),
                version: "3".into(),
                ..Default::default()
            }],
            removed_resources: vec!["gone".into()],
            ..Default::default()
        };
        let r = DeltaWire.read(ResourceKind::Cluster, &resp, &TypeRecord::default());
        assert!(r.updates.is_empty());
        assert_eq!(
            r.rejected,
            [("x".into(), "3".into(), "resource body missing".into())]
        );
        assert_eq!(r.removed, ["gone"]);
        let nack = DeltaWire.reply(
            &resp,
            Some(RpcStatus::default()),
            &TypeRecord::default(),
            &BTreeSet::new(),
        );
        assert!(nack.error_detail.is_some());
    }
}
