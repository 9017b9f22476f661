//! Istio standard metrics (`istio.stats` with reporter `waypoint`): recording one finished HTTP
//! stream into a hot series and across 1,000 live series, and rendering 1,000 series for a
//! Prometheus scrape.

use std::{
    hint::black_box,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use criterion::{Criterion, SamplingMode};
use proxy::{
    flags::ResponseFlags,
    telemetry::istio::{
        HttpSample, IstioMetrics, PeerLabels, Plan, Protocol, SeriesKey, ServiceLabels,
    },
};

/// Number of distinct series in the "many series" cases.
pub const SERIES: usize = 1_000;

fn peer(workload: &str, ns: &str) -> Arc<PeerLabels> {
    Arc::new(PeerLabels {
        workload: workload.into(),
        namespace: ns.into(),
        canonical_service: workload.into(),
        canonical_revision: "v1".into(),
        app: workload.into(),
        version: "v1".into(),
        cluster: "Kubernetes".into(),
        identity: format!("spiffe://cluster.local/ns/{ns}/sa/{workload}"),
        ..PeerLabels::default()
    })
}

/// Series `i` of [`SERIES`]: 100 destination services × 5 client workloads × 2 response codes, the
/// label sets a waypoint in front of 100 services sees.
fn keys(plan: &Arc<Plan>) -> Vec<SeriesKey> {
    let clients: Vec<Arc<PeerLabels>> = (0..5)
        .map(|c| peer(&format!("client{c}"), "apps"))
        .collect();
    (0..SERIES)
        .map(|i| {
            let svc = i / 10;
            let ns = format!("ns{}", svc % 20);
            let host = format!("svc{svc}.{ns}.svc.cluster.local");
            let client = &clients[(i / 2) % 5];
            SeriesKey {
                plan: plan.clone(),
                source: Some(client.clone()),
                source_principal: Some(Arc::from(client.identity.as_str())),
                destination: Some(peer(&format!("svc{svc}"), &ns)),
                service: Some(Arc::new(ServiceLabels::for_cluster(
                    &format!("inbound-vip|8000|http|{host}"),
                    [(host.as_str(), format!("svc{svc}").as_str(), ns.as_str())].into_iter(),
                ))),
                protocol: Protocol::Http,
                response_code: if i.is_multiple_of(2) { 200 } else { 503 },
                grpc_status: None,
                flags: ResponseFlags::default(),
                mutual_tls: Some(true),
                extra: Arc::from(Vec::new()),
            }
        })
        .collect()
}

const SAMPLE: HttpSample = HttpSample {
    duration_ms: 3,
    request_bytes: 420,
    response_bytes: 1_300,
    request_body: Some(0),
    response_body: 1_000,
};

/// `metrics/*`: `record_http` into one hot series and round-robin over 1,000 series (the key is
/// cloned per record, as the data path builds one per stream); `render_prometheus` of 1,000 series.
pub fn bench(c: &mut Criterion) {
    let plan = Arc::new(Plan::standard("waypoint"));
    let keys = keys(&plan);
    let mut group = c.benchmark_group("metrics");

    let hot = IstioMetrics::default();
    let key = keys[0].clone();
    group.bench_function("record_http_hot_series", |b| {
        b.iter(|| hot.record_http(black_box(key.clone()), SAMPLE))
    });

    let many = IstioMetrics::default();
    for k in &keys {
        many.record_http(k.clone(), SAMPLE);
    }
    assert_eq!(many.series_count(), SERIES);
    let next = AtomicUsize::new(0);
    group.bench_function("record_http_1k_series", |b| {
        b.iter(|| {
            let i = next.fetch_add(1, Ordering::Relaxed) % SERIES;
            many.record_http(black_box(keys[i].clone()), SAMPLE)
        })
    });

    // One scrape as the admin handler does it: a fresh buffer.
    let (out, allocated, peak) = crate::alloc_count::measure(|| {
        let mut out = String::new();
        many.render_prometheus(&mut out);
        out
    });
    let bytes = out.len();
    assert!(out.contains("istio_requests_total{"));
    let mut out = out;
    group.sampling_mode(SamplingMode::Flat).sample_size(10);
    // The buffer is reused across iterations: its growth is not part of this figure.
    group.bench_function("render_prometheus_1k_series", |b| {
        b.iter(|| {
            out.clear();
            many.render_prometheus(&mut out);
            out.len()
        })
    });
    // What a scrape costs: a fresh buffer every time (allocation and first touch of its pages).
    group.bench_function("render_prometheus_1k_series_fresh_buffer", |b| {
        b.iter(|| {
            let mut out = String::new();
            many.render_prometheus(&mut out);
            out.len()
        })
    });
    group.finish();
    println!(
        "metrics/render_prometheus_1k_series: {bytes} bytes of exposition text; one render into a \
         fresh buffer allocated {allocated} bytes in total, peak live heap +{peak} bytes"
    );
}
