//! A CDS push of 1,000 EDS clusters shaped like istiod's waypoint `inbound-vip|<port>|http|<host>`
//! clusters (circuit breakers, `istio.services` metadata, the `internal_upstream` transport socket
//! with passthrough metadata, `HttpProtocolOptions`), through `ConfigStore::apply` — the allowlist
//! walk and the compile of every resource, then the snapshot swap — as the ADS client runs it.

use criterion::{Criterion, SamplingMode};
use proxy::config::{ConfigStore, Update};
use serde_json::{Value as Json, json};
use waypoint_proto::resource::ResourceKind;

use crate::fixture;

/// Number of clusters in the push.
pub const CLUSTERS: usize = 1_000;

/// Cluster `i`: the reference `inbound-vip` cluster for service `svc<i>` in one of 20 namespaces;
/// half the ports are auto-detected (downstream protocol), half HTTP/2 (gRPC).
fn cluster(template: &Json, i: usize) -> Json {
    let ns = format!("ns{}", i % 20);
    let host = format!("svc{i}.{ns}.svc.cluster.local");
    let port = 8000 + i % 7;
    let name = format!("inbound-vip|{port}|http|{host}");
    let mut c = template.clone();
    c["name"] = json!(name);
    c["alt_stat_name"] = json!(format!("{name};"));
    c["eds_cluster_config"]["service_name"] = json!(name);
    c["metadata"]["filter_metadata"]["istio"]["services"] =
        json!([{"host": host, "name": format!("svc{i}"), "namespace": ns}]);
    let protocol = if i.is_multiple_of(2) {
        json!({"use_downstream_protocol_config": {"http_protocol_options": {}, "http2_protocol_options": {}}})
    } else {
        json!({"explicit_http_config": {"http2_protocol_options": {}}})
    };
    let mut options = json!({
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "common_http_protocol_options": {"idle_timeout": "3600s"}
    });
    if let (Some(o), Some(p)) = (options.as_object_mut(), protocol.as_object()) {
        o.extend(p.clone());
    }
    c["typed_extension_protocol_options"] =
        json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options});
    c
}

fn updates() -> Vec<Update> {
    let template = fixture::reference(
        ResourceKind::Cluster,
        "inbound-vip|8000|http|httpbin.default.svc.cluster.local",
    );
    (0..CLUSTERS)
        .map(|i| fixture::update(ResourceKind::Cluster, &cluster(&template, i)))
        .collect()
}

fn push(store: &ConfigStore, updates: &[Update]) {
    let errors = store.apply(ResourceKind::Cluster, updates, &[]);
    assert!(errors.is_empty(), "NACK: {errors:#?}");
}

/// `xds_push/*`: 1,000 clusters into an empty store (the first push after start), and the same
/// 1,000 again into a store holding them (a state-of-the-world re-push).
pub fn bench(c: &mut Criterion) {
    let updates = updates();
    let warm = ConfigStore::default();
    push(&warm, &updates);
    assert_eq!(warm.snapshot().clusters.len(), CLUSTERS);
    let mut group = c.benchmark_group("xds_push");
    group.sampling_mode(SamplingMode::Flat).sample_size(20);
    group.bench_function("cds_1k_clusters_first_push", |b| {
        b.iter(|| {
            let store = ConfigStore::default();
            push(&store, &updates);
            store
        })
    });
    group.bench_function("cds_1k_clusters_repush", |b| {
        b.iter(|| push(&warm, &updates))
    });
    group.finish();
}
