//! Istio workloads (WDS, `istio.workload.Workload`): the peer information the waypoint looks up by
//! address — identity (SPIFFE id), telemetry labels and network.

use std::{collections::BTreeMap, net::IpAddr};

use waypoint_proto::istio::workload::{TunnelProtocol, Workload as RawWorkload, WorkloadStatus};

use super::{CompileResult, ConfigError, index, key};

/// A compiled workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// `uid` (the resource name).
    pub uid: String,
    /// `name` (pod name).
    pub name: String,
    /// `namespace`.
    pub namespace: String,
    /// `addresses` (4- or 16-byte IPs).
    pub addresses: Vec<IpAddr>,
    /// `hostname`.
    pub hostname: String,
    /// `network`.
    pub network: String,
    /// `tunnel_protocol` HBONE.
    pub hbone: bool,
    /// SPIFFE id: `spiffe://<trust_domain|cluster.local>/ns/<namespace|default>/sa/<service_account|default>`.
    pub identity: String,
    /// `node`.
    pub node: String,
    /// `canonical_name` (the app label).
    pub canonical_name: String,
    /// `canonical_revision` (the version label).
    pub canonical_revision: String,
    /// `workload_name` (the owning Deployment …).
    pub workload_name: String,
    /// `workload_type` as Istio spells it (`deployment`, `cronjob`, `pod`, `job`).
    pub workload_type: &'static str,
    /// `cluster_id`.
    pub cluster_id: String,
    /// `status` HEALTHY.
    pub healthy: bool,
    /// `authorization_policies`.
    pub authorization_policies: Vec<String>,
    /// `services`: `namespace/hostname` → (service port, target port) pairs.
    pub services: BTreeMap<String, Vec<(u32, u32)>>,
    /// Its telemetry labels (Envoy's conversion of a WDS workload: app = canonical name,
    /// version = canonical revision, type and instance name as given), built once.
    pub peer_labels: std::sync::Arc<crate::telemetry::istio::PeerLabels>,
}

/// Envoy's derivation of a workload's identity (workload_discovery.cc).
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    let or = |s: &str, d: &'static str| {
        if s.is_empty() {
            d.to_owned()
        } else {
            s.to_owned()
        }
    };
    format!(
        "spiffe://{}/ns/{}/sa/{}",
        or(trust_domain, "cluster.local"),
        or(namespace, "default"),
        or(service_account, "default")
    )
}

impl Workload {
    /// Compiles `w` (at `path`).
    pub fn compile(w: &RawWorkload, path: &str) -> CompileResult<Self> {
        if w.uid.is_empty() {
            return Err(ConfigError::new(
                super::field(path, "uid"),
                "uid is required",
            ));
        }
        let addresses = w
            .addresses
            .iter()
            .enumerate()
            .map(|(i, a)| match a.len() {
                4 => Ok(IpAddr::from(
                    <[u8; 4]>::try_from(a.as_slice()).unwrap_or_default(),
                )),
                16 => Ok(IpAddr::from(
                    <[u8; 16]>::try_from(a.as_slice()).unwrap_or_default(),
                )),
                n => Err(ConfigError::new(
                    index(path, "addresses", i),
                    format!("an address must be 4 or 16 bytes, got {n}"),
                )),
            })
            .collect::<CompileResult<Vec<_>>>()?;
        let mut services = BTreeMap::new();
        for (name, ports) in &w.services {
            if name.is_empty() {
                return Err(ConfigError::new(
                    key(path, "services", name),
                    "empty service key",
                ));
            }
            services.insert(
                name.clone(),
                ports
                    .ports
                    .iter()
                    .map(|p| (p.service_port, p.target_port))
                    .collect(),
            );
        }
        use waypoint_proto::istio::workload::WorkloadType;
        let identity = spiffe_id(&w.trust_domain, &w.namespace, &w.service_account);
        let workload_type = match WorkloadType::try_from(w.workload_type) {
            Ok(WorkloadType::Cronjob) => "cronjob",
            Ok(WorkloadType::Pod) => "pod",
            Ok(WorkloadType::Job) => "job",
            _ => "deployment",
        };
        let peer_labels = std::sync::Arc::new(crate::telemetry::istio::PeerLabels {
            workload: w.workload_name.clone(),
            namespace: w.namespace.clone(),
            canonical_service: w.canonical_name.clone(),
            canonical_revision: w.canonical_revision.clone(),
            app: w.canonical_name.clone(),
            version: w.canonical_revision.clone(),
            cluster: w.cluster_id.clone(),
            identity: identity.clone(),
            workload_type,
            instance: w.name.clone(),
        });
        Ok(Workload {
            uid: w.uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            addresses,
            hostname: w.hostname.clone(),
            network: w.network.clone(),
            hbone: TunnelProtocol::try_from(w.tunnel_protocol) == Ok(TunnelProtocol::Hbone),
            identity,
            node: w.node.clone(),
            canonical_name: w.canonical_name.clone(),
            canonical_revision: w.canonical_revision.clone(),
            workload_name: w.workload_name.clone(),
            workload_type,
            cluster_id: w.cluster_id.clone(),
            healthy: WorkloadStatus::try_from(w.status) != Ok(WorkloadStatus::Unhealthy),
            authorization_policies: w.authorization_policies.clone(),
            services,
            peer_labels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_identity() {
        let w = Workload::compile(
            &RawWorkload {
                uid: "Kubernetes//Pod/default/httpbin-1".into(),
                namespace: "default".into(),
                service_account: "httpbin".into(),
                addresses: vec![vec![10, 244, 1, 5], vec![0; 16]],
                ..Default::default()
            },
            "",
        )
        .expect("compiles");
        assert_eq!(w.addresses[0], "10.244.1.5".parse::<IpAddr>().expect("ip"));
        assert_eq!(w.addresses[1], "::".parse::<IpAddr>().expect("ip"));
        assert_eq!(w.identity, "spiffe://cluster.local/ns/default/sa/httpbin");
        let err = Workload::compile(
            &RawWorkload {
                uid: "u".into(),
                addresses: vec![vec![1, 2, 3]],
                ..Default::default()
            },
            "",
        )
        .expect_err("3 bytes");
        assert_eq!(err.path, "addresses[0]");
    }
}
