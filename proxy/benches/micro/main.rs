//! Criterion micro-benchmarks of the proxy's hot and heavy paths, at the scale istiod produces for
//! a busy waypoint: route selection over 10,000 routes, filter-chain selection over 1,000 VIPs, a
//! 1,000-cluster CDS push, Istio metric recording and rendering, and HBONE stream setup.
//!
//! One bench binary (one release link) with a module per area; run one area with a filter, e.g.
//! `cargo bench -p proxy --bench micro -- route_select`. Results and what they mean for the proxy:
//! `docs/microbenchmarks.md`.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};

mod alloc_count;
mod chain_select;
mod fixture;
mod hbone;
mod metrics;
mod route_select;
mod xds_push;

/// Short warm-up and measurement windows: the whole run must fit in a few minutes on 2 cores
/// (command-line flags such as `--measurement-time` still override these).
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
        .nresamples(20_000)
}

/// Counts allocations (see `alloc_count`): the render bench reports its bytes.
#[global_allocator]
static ALLOCATOR: alloc_count::Counting = alloc_count::Counting;

criterion_group! {
    name = micro;
    config = config();
    targets =
        route_select::bench,
        chain_select::bench,
        xds_push::bench,
        metrics::bench,
        hbone::bench
}
criterion_main!(micro);
