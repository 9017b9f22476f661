//! Filter-chain selection on a `main_internal` listener fronting 1,000 services: istiod's
//! `filter_chain_matcher` (IPMatcher on the destination IP, then an exact map on the destination
//! port) with 1,000 VIP ranges leading to 1,000 HTTP chains, each the reference snapshot's
//! `inbound-vip` chain renamed for its service. The same 1,000 chains are also selected by classic
//! `filter_chain_match` (destination port + a `/32` prefix range each).

use std::{hint::black_box, net::IpAddr};

use criterion::{Criterion, SamplingMode};
use proxy::{
    config::{ConfigStore, matcher::ConnectionInfo},
    listener::chain::{Selector, select},
};
use serde_json::{Value as Json, json};
use waypoint_proto::resource::ResourceKind;

use crate::fixture;

/// Number of services (VIPs and chains).
pub const VIPS: usize = 1_000;

const PORT: u16 = 8000;

fn host(i: usize) -> String {
    format!("svc{i}.default.svc.cluster.local")
}

fn vip(i: usize) -> IpAddr {
    // 10.96.0.1 … 10.96.3.232: one /32 per service, as istiod lists ClusterIPs.
    let (hi, lo) = (i / 250, i % 250 + 1);
    IpAddr::from([10, 96, hi as u8, lo as u8])
}

fn chain_name(i: usize) -> String {
    format!("inbound-vip|{PORT}|http|{}", host(i))
}

/// The reference `main_internal`, scaled to [`VIPS`] services.
fn listener() -> Json {
    let mut l = fixture::reference(ResourceKind::Listener, "main_internal");
    let template = l["filter_chains"][0].clone();
    let chains: Vec<Json> = (0..VIPS)
        .map(|i| {
            let mut c = template.clone();
            let name = chain_name(i);
            c["name"] = json!(name);
            let hcm = &mut c["filters"][0]["typed_config"];
            hcm["route_config"]["name"] = json!(name);
            let route = &mut hcm["route_config"]["virtual_hosts"][0]["routes"][0];
            route["route"]["cluster"] = json!(name);
            route["decorator"]["operation"] = json!(format!("{}:{PORT}/*", host(i)));
            c
        })
        .collect();
    let others: Vec<Json> = l["filter_chains"]
        .as_array()
        .expect("chains")
        .iter()
        .skip(1)
        .cloned()
        .collect();
    l["filter_chains"] = Json::Array(chains.into_iter().chain(others).collect());
    let ranges: Vec<Json> = (0..VIPS)
        .map(|i| {
            let name = chain_name(i);
            json!({
                "ranges": [{"address_prefix": vip(i).to_string(), "prefix_len": 32}],
                "on_match": {"matcher": {"matcher_tree": {
                    "input": {"name": "port", "typed_config": {"@type":
                        "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.DestinationPortInput"}},
                    "exact_match_map": {"map": {PORT.to_string(): {"action": {"name": name,
                        "typed_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": name}}}}}
                }}}
            })
        })
        .collect();
    l["filter_chain_matcher"]["matcher_tree"]["custom_match"]["typed_config"]["range_matchers"] =
        Json::Array(ranges);
    l
}

/// The same services with classic `filter_chain_match`es instead of the matcher (only the 1,000
/// VIP chains: the reference's other chains would all have an empty match).
fn classic_listener() -> Json {
    let mut l = listener();
    if let Some(obj) = l.as_object_mut() {
        obj.remove("filter_chain_matcher");
    }
    let chains: Vec<Json> = l["filter_chains"]
        .as_array()
        .expect("chains")
        .iter()
        .take(VIPS)
        .enumerate()
        .map(|(i, c)| {
            let mut c = c.clone();
            c["filter_chain_match"] = json!({
                "destination_port": PORT,
                "prefix_ranges": [{"address_prefix": vip(i).to_string(), "prefix_len": 32}]
            });
            c
        })
        .collect();
    l["filter_chains"] = Json::Array(chains);
    l
}

fn no_filter_state(_: &str) -> Option<String> {
    None
}

fn info(ip: IpAddr) -> ConnectionInfo<'static> {
    ConnectionInfo {
        destination_ip: ip,
        destination_port: PORT,
        source_ip: IpAddr::from([10, 244, 0, 9]),
        server_name: None,
        transport_protocol: "raw_buffer",
        application_protocols: &[],
        filter_state: &no_filter_state,
    }
}

/// `chain_select/*`: `ChainMatcher::select` for the first, middle and last VIP and an unknown IP;
/// `listener::chain::select` (matcher + chain lookup) for the last VIP, with the matcher and with
/// classic `filter_chain_match`es; the LDS push of the 1,000-chain listener.
pub fn bench(c: &mut Criterion) {
    let doc = listener();
    let store = fixture::applied(ResourceKind::Listener, std::slice::from_ref(&doc));
    let snap = store.snapshot();
    let l = snap.listeners.get("main_internal").expect("main_internal");
    let matcher = l.chain_matcher.as_ref().expect("filter_chain_matcher");
    let mut group = c.benchmark_group("chain_select");
    for (label, ip, want) in [
        ("matcher_first_of_1k_vips", vip(0), Some(0)),
        ("matcher_middle_of_1k_vips", vip(VIPS / 2), Some(VIPS / 2)),
        ("matcher_last_of_1k_vips", vip(VIPS - 1), Some(VIPS - 1)),
        ("matcher_unknown_vip", IpAddr::from([10, 97, 0, 1]), None),
    ] {
        let conn = info(ip);
        assert_eq!(
            matcher.select(&conn),
            want.map(chain_name).as_deref(),
            "{label}"
        );
        group.bench_function(label, |b| {
            b.iter(|| matcher.select(black_box(&conn)).is_some())
        });
    }
    let selector = Selector {
        destination: Some((vip(VIPS - 1), PORT)),
        source: Some((IpAddr::from([10, 244, 0, 9]), 40_000)),
        direct_source: None,
        server_name: None,
        transport_protocol: "raw_buffer",
        application_protocols: &[],
        filter_state: &no_filter_state,
    };
    assert_eq!(
        select(l, &selector).map(|c| c.name.clone()),
        Some(chain_name(VIPS - 1))
    );
    group.bench_function("listener_select_last_of_1k_vips", |b| {
        b.iter(|| select(black_box(l), black_box(&selector)).is_some())
    });
    let classic = fixture::applied(ResourceKind::Listener, &[classic_listener()]);
    let classic_snap = classic.snapshot();
    let cl = classic_snap
        .listeners
        .get("main_internal")
        .expect("main_internal");
    assert!(cl.chain_matcher.is_none());
    assert_eq!(
        select(cl, &selector).map(|c| c.name.clone()),
        Some(chain_name(VIPS - 1))
    );
    group.bench_function("classic_select_last_of_1k_vips", |b| {
        b.iter(|| select(black_box(cl), black_box(&selector)).is_some())
    });
    // The whole LDS resource: allowlist walk + compile of 1,000 HCM chains and the matcher.
    let update = fixture::update(ResourceKind::Listener, &doc);
    group.sampling_mode(SamplingMode::Flat).sample_size(10);
    group.bench_function("lds_push_1k_chains", |b| {
        b.iter(|| {
            let store = ConfigStore::default();
            let errors = store.apply(ResourceKind::Listener, std::slice::from_ref(&update), &[]);
            assert!(errors.is_empty());
            store
        })
    });
    group.finish();
}
