//! Route selection over one virtual host of 10,000 routes, shaped like istiod's translation of many
//! VirtualService HTTP rules: prefix + header, exact path + method, regex path, prefix + header
//! prefix + query parameter, gRPC prefix + header regex. Selection keeps Envoy's first-match order
//! but goes through the virtual host's path index (trie + one regex set), so the cost no longer
//! grows with the position of the matching route.

use std::{hint::black_box, sync::Arc, time::Duration};

use criterion::{Criterion, SamplingMode};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use proxy::{
    config::RouteConfig,
    http::route_select::{RequestView, select},
};
use serde_json::{Value as Json, json};
use waypoint_proto::resource::ResourceKind;

use crate::fixture;

/// Number of routes in the table.
pub const ROUTES: usize = 10_000;

const HOST: &str = "reviews.default.svc.cluster.local";

/// The route istiod would emit for rule `i` of a VirtualService on `reviews`.
fn route(i: usize) -> Json {
    let (matcher, cluster) = match i % 5 {
        0 => (
            json!({"prefix": format!("/api/v{i}/"), "case_sensitive": true,
                   "headers": [{"name": "end-user", "string_match": {"exact": format!("user-{i}")}}]}),
            "v2",
        ),
        1 => (
            json!({"path": format!("/svc{i}/items"), "case_sensitive": true,
                   "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]}),
            "v1",
        ),
        2 => (
            json!({"safe_regex": {"regex": format!("/regex{i}/[0-9]+")}}),
            "v1",
        ),
        3 => (
            json!({"prefix": format!("/tenant{i}/"), "case_sensitive": true,
                   "headers": [{"name": "x-tenant", "string_match": {"prefix": format!("t{i}-")}}],
                   "query_parameters": [{"name": "version", "string_match": {"exact": format!("v{i}")}}]}),
            "v3",
        ),
        _ => (
            json!({"prefix": format!("/grpc.Service{i}/"), "grpc": {},
                   "headers": [{"name": "user-agent", "string_match": {"safe_regex": {"regex": "grpc-go/1\\.[0-9]+.*"}}}]}),
            "v2",
        ),
    };
    json!({
        "name": format!("reviews.default.{i}"),
        "match": matcher,
        "decorator": {"operation": format!("{HOST}:9080/*")},
        "metadata": {"filter_metadata": {"istio": {
            "config": "/apis/networking.istio.io/v1/namespaces/default/virtual-service/reviews"}}},
        "route": {
            "cluster": format!("inbound-vip|9080|http|reviews-{cluster}.default.svc.cluster.local"),
            "timeout": "0s",
            "max_grpc_timeout": "0s",
            "retry_policy": {
                "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
                "num_retries": 2,
                "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
                "host_selection_retry_max_attempts": 5
            }
        }
    })
}

/// The RDS resource: one virtual host (`*`, as on a waypoint's `inbound-vip` chain) of [`ROUTES`].
fn route_configuration() -> Json {
    json!({
        "name": format!("inbound-vip|9080|http|{HOST}"),
        "validate_clusters": false,
        "max_direct_response_body_size_bytes": 1_048_576,
        "virtual_hosts": [{
            "name": "inbound|http|9080",
            "domains": ["*"],
            "routes": (0..ROUTES).map(route).collect::<Vec<_>>()
        }]
    })
}

/// A request as a client sends it, with the usual headers around the ones routes look at.
struct Request {
    method: Method,
    path: String,
    headers: HeaderMap,
}

impl Request {
    fn new(method: Method, path: String, extra: &[(&'static str, String)]) -> Self {
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("user-agent", "curl/8.5.0".to_owned()),
            ("accept", "*/*".to_owned()),
            ("x-forwarded-proto", "http".to_owned()),
            (
                "x-request-id",
                "9f1c5a7e-3f0e-4c1b-9b7a-2d0c7f6f4e11".to_owned(),
            ),
            ("baggage", "k8s.namespace.name=default".to_owned()),
        ]
        .into_iter()
        .chain(extra.iter().cloned())
        {
            headers.insert(
                HeaderName::from_static(k),
                HeaderValue::from_str(&v).expect("header value"),
            );
        }
        Request {
            method,
            path,
            headers,
        }
    }

    /// A request that route `i` (and no earlier one) matches.
    fn matching(i: usize) -> Self {
        match i % 5 {
            0 => Request::new(
                Method::GET,
                format!("/api/v{i}/reviews/1"),
                &[("end-user", format!("user-{i}"))],
            ),
            1 => Request::new(Method::GET, format!("/svc{i}/items"), &[]),
            2 => Request::new(Method::GET, format!("/regex{i}/12345"), &[]),
            3 => Request::new(
                Method::GET,
                format!("/tenant{i}/orders?version=v{i}"),
                &[("x-tenant", format!("t{i}-eu"))],
            ),
            _ => Request::new(
                Method::POST,
                format!("/grpc.Service{i}/Get"),
                &[
                    ("content-type", "application/grpc".to_owned()),
                    ("user-agent", "grpc-go/1.62.1".to_owned()),
                ],
            ),
        }
    }

    fn view(&self) -> RequestView<'_> {
        RequestView::new(&self.method, HOST, &self.path, &self.headers)
    }
}

fn compiled(doc: &Json) -> Arc<RouteConfig> {
    let name = ResourceKind::Route
        .name_in_json(doc)
        .expect("named")
        .to_owned();
    let store = fixture::applied(ResourceKind::Route, std::slice::from_ref(doc));
    store
        .snapshot()
        .routes
        .get(&name)
        .cloned()
        .expect("route table applied")
}

/// `route_select/*`: select() for a request matching the first, the middle and the last route, and
/// one matching none (a full scan); `route_select/rds_push_10k_routes` compiles the table.
pub fn bench(c: &mut Criterion) {
    let doc = route_configuration();
    let rc = compiled(&doc);
    let mut group = c.benchmark_group("route_select");
    for (label, req, want) in [
        ("first_of_10k", Request::matching(0), Some(0)),
        (
            "middle_of_10k",
            Request::matching(ROUTES / 2),
            Some(ROUTES / 2),
        ),
        (
            "last_of_10k",
            Request::matching(ROUTES - 1),
            Some(ROUTES - 1),
        ),
        (
            "none_of_10k",
            Request::new(
                Method::GET,
                "/unknown/path?version=v3".into(),
                &[("end-user", "jason".into())],
            ),
            None,
        ),
    ] {
        let view = req.view();
        let got = select(&rc, &view, 0).map(|(_, r)| r.name.clone());
        assert_eq!(got, want.map(|i| format!("reviews.default.{i}")), "{label}");
        group.bench_function(label, |b| {
            b.iter(|| select(black_box(&rc), black_box(&view), 0).is_some())
        });
    }
    // The whole RDS resource: allowlist walk + compile of 10,000 routes (4,000 regexes: 2,000 on
    // paths, 2,000 on headers).
    let update = fixture::update(ResourceKind::Route, &doc);
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .measurement_time(Duration::from_secs(8));
    group.bench_function("rds_push_10k_routes", |b| {
        b.iter(|| {
            let store = proxy::config::ConfigStore::default();
            let errors = store.apply(ResourceKind::Route, std::slice::from_ref(&update), &[]);
            assert!(errors.is_empty());
            store
        })
    });
    group.finish();
}
