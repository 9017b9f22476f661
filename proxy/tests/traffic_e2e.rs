//! Traffic management through the real waypoint (issue #7, "must hold"), end to end over HBONE:
//!
//! ```text
//! client ─TCP─▶ forwarder (sleep) ─HBONE─▶ WAYPOINT_IP:15008 ─▶ main_internal ─▶ VIP route
//!        ─▶ connect_originate ─HBONE (as the waypoint)─▶ POD_IP:15008 sink ─TCP─▶ echo
//! ```
//!
//! One [`WaypointMesh`] (the real `agent` spawning this crate's `proxy`, istiod-lite serving
//! `tests/fixtures/mesh/waypoint.yaml`) serves every case in turn; each case pushes through
//! istiod-lite the resources istiod renders for a waypoint from the Istio resource named below
//! (shapes from `pilot/pkg/networking/core/listener_waypoint.go` `translateWaypointRoute`,
//! `route/retry/retry.go`, `security/authz/builder`), waits for the proxy's ACK, then drives
//! traffic from the sleep client:
//!
//! * **retries** — VirtualService `retries: {attempts: 2, retryOn: 5xx}` (and `retryOn: "503"`):
//!   an upstream answering 503 twice then 200 gives the client one 200 after exactly 3 attempts
//!   at the echo, the POST body replayed intact (SHA-1 checked by the echo) and
//!   `x-envoy-attempt-count: 3` seen by the echo; a status outside `retriable_status_codes` is not
//!   retried; exhausted retries pass the last 503 on.
//! * **fault** — VirtualService `fault.abort` 50 % / 503: 2,000 h2c requests abort 50 % ± 3 %;
//!   `fault.delay` 100 % / 1 s adds at least 1 s; `istio_requests_total` carries `FI` / `DI`.
//! * **circuit breaker** — DestinationRule `connectionPool.http.http2MaxRequests: 1` (cluster
//!   `circuit_breakers.thresholds[].max_requests: 1`): with one slow request in flight, 9 more
//!   get 503 with `x-envoy-overloaded: true` and response flag `UO`.
//! * **RBAC** — AuthorizationPolicies bound to the service (istiod's waypoint form: principals
//!   as `filter_state io.istio.peer_principal`): ALLOW the sleep principal admits sleep and denies
//!   another SPIFFE identity with 403 `RBAC: access denied`; DENY `paths: ["/admin"]` cannot be
//!   bypassed with `//admin`, `/./admin`, `/%61dmin` under meshConfig `pathNormalization:
//!   MERGE_SLASHES` (HCM `normalize_path` + `merge_slashes`).
//!
//! gRPC through the waypoint (Python grpcio client and server) is `tests/python/test_grpc_waypoint.py`.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::{StreamExt as _, stream};
use http::{Request, StatusCode, Uri, uri::PathAndQuery};
use http_body_util::{Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value as Json, json};
use waypoint_proto::{
    json::yaml_to_json,
    resource::{CLUSTER_TYPE, LISTENER_TYPE, ResourceKind},
};
use waypoint_shared::identity::SpiffeId;
use waypoint_testbed::{
    hbone::{ForwarderConfig, HboneForwarder, PeerMatch},
    istiod_lite::ads::{ConnStatus, TypeStatus},
    waypoint::{
        EchoSeen, FIXTURE_TEMPLATE, MeshOptions, SLEEP_IDENTITY, VIP_CLUSTER, WAYPOINT_IDENTITY,
        WaypointMesh, http1_request, read_body, render_fixture,
    },
};

/// The `Host` of requests sent through the forwarder.
const HOST: &str = "httpbin.default.svc.cluster.local:8000";
/// Prefix of the service cluster's stats (istiod sets `alt_stat_name` to `<name>;`).
const VIP_STATS: &str = "cluster.inbound-vip|8000|http|httpbin.default.svc.cluster.local;";
/// The Istio resources the pushed config stands for (route and cluster `metadata`).
const VS_CONFIG: &str = "/apis/networking.istio.io/v1/namespaces/default/virtual-service/httpbin";
const DR_CONFIG: &str = "/apis/networking.istio.io/v1/namespaces/default/destination-rule/httpbin";
/// Bound for the waypoint to serve HBONE once the agent is ready.
const HBONE_READY: Duration = Duration::from_secs(30);
/// Bound for the proxy to ACK (or NACK) a pushed resource.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// Bound for one request (the fault delay and the slow circuit-breaker request included).
const REQUEST: Duration = Duration::from_secs(30);
/// Bound for metrics to show what was sent, and for a stat to reach a value.
const OBSERVE: Duration = Duration::from_secs(20);
/// Largest answer body read.
const BODY_LIMIT: usize = 64 * 1024;
/// The fault-abort sample: requests, concurrency on one h2c connection, and the tolerance.
const ABORT_REQUESTS: usize = 2_000;
const ABORT_CONCURRENCY: usize = 64;
const ABORT_TOLERANCE: f64 = 0.03;
/// The fixed fault delay, and the requests that check it.
const FAULT_DELAY: Duration = Duration::from_secs(1);
const DELAYED_REQUESTS: usize = 3;
/// The request that holds the circuit breaker's only slot, and the burst behind it.
const SLOW_MS: u64 = 4_000;
const BURST: usize = 9;
/// The retried POST body.
const RETRY_BODY_LEN: usize = 256 * 1024;

fn agent_bin() -> PathBuf {
    waypoint_testbed::waypoint::agent_beside(Path::new(env!("CARGO_BIN_EXE_proxy")))
}

// ---------------------------------------------------------------------------------------------
// The fixture, as istiod would change it
// ---------------------------------------------------------------------------------------------

/// The mesh fixture rendered for this mesh, as proto3-JSON documents.
struct Fixture {
    doc: Json,
}

impl Fixture {
    fn of(mesh: &WaypointMesh) -> Self {
        let text = render_fixture(FIXTURE_TEMPLATE, &mesh.addrs).expect("render the fixture");
        Fixture {
            doc: yaml_to_json(&text).expect("the fixture is YAML"),
        }
    }

    fn named(&self, list: &str, field: &str, name: &str) -> Json {
        self.doc[list]
            .as_array()
            .and_then(|l| l.iter().find(|r| r[field] == name))
            .cloned()
            .unwrap_or_else(|| panic!("{list} '{name}' in the fixture"))
    }

    fn main_internal(&self) -> Json {
        self.named("listeners", "name", "main_internal")
    }

    fn vip_cluster(&self) -> Json {
        self.named("clusters", "name", VIP_CLUSTER)
    }
}

/// The `HttpConnectionManager` of the service's HTTP filter chain of `main_internal`.
fn service_hcm(main_internal: &mut Json) -> &mut Json {
    let chain = main_internal["filter_chains"]
        .as_array_mut()
        .and_then(|c| c.iter_mut().find(|c| c["name"] == VIP_CLUSTER))
        .expect("the service's filter chain");
    let hcm = chain["filters"]
        .as_array_mut()
        .and_then(|f| {
            f.iter_mut()
                .find(|f| f["name"] == "envoy.filters.network.http_connection_manager")
        })
        .expect("the chain's HCM");
    &mut hcm["typed_config"]
}

/// The service's single virtual host (`inbound|http|8000`).
fn service_vhost(hcm: &mut Json) -> &mut Json {
    &mut hcm["route_config"]["virtual_hosts"][0]
}

/// A route of a VirtualService `http` entry as `translateWaypointRoute` renders it: name, prefix
/// match, config metadata, decorator, and the action of the default route with `retry_policy`
/// (istiod: the VS `retries`, else the mesh default the fixture's route carries).
fn vs_route(default_route: &Json, name: &str, prefix: &str, retry_policy: Option<Json>) -> Json {
    let mut r = default_route.clone();
    r["name"] = json!(name);
    r["match"] = json!({"prefix": prefix});
    r["metadata"] = json!({"filter_metadata": {"istio": {"config": VS_CONFIG}}});
    if let Some(policy) = retry_policy {
        r["route"]["retry_policy"] = policy;
    }
    r
}

/// `retry.ConvertPolicy` for `retries: {attempts: 2, retryOn: <retry_on>}`: the mesh default with
/// `retry_on` and the status codes `retryOn` listed.
fn vs_retry_policy(retry_on: &str, codes: &[u16]) -> Json {
    let mut p = json!({
        "retry_on": retry_on,
        "num_retries": 2,
        "retry_host_predicate": [{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}
        }],
        "host_selection_retry_max_attempts": "5"
    });
    if !codes.is_empty() {
        p["retriable_status_codes"] = json!(codes);
    }
    p
}

/// `istio_route.TranslateFault`: the per-route `envoy.filters.http.fault` config.
fn fault_config(fault: Json) -> Json {
    let mut config =
        json!({"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"});
    if let (Some(c), Some(f)) = (config.as_object_mut(), fault.as_object()) {
        c.extend(f.clone());
    }
    json!({"envoy.filters.http.fault": config})
}

/// Istio's percentage (`value: 50`) as the `FractionalPercent` istiod emits (per million).
fn percent(value: f64) -> Json {
    json!({"numerator": (value * 10_000.0).round() as u64, "denominator": "MILLION"})
}

/// `main_internal` for the VirtualService of the retry and fault cases:
///
/// ```yaml
/// http:
/// - {name: retry-5xx,   match: [{uri: {prefix: /retry/5xx}}],   retries: {attempts: 2, retryOn: 5xx}, route: [httpbin]}
/// - {name: retry-codes, match: [{uri: {prefix: /retry/codes}}], retries: {attempts: 2, retryOn: "503"}, route: [httpbin]}
/// - {name: abort, match: [{uri: {prefix: /fault/abort}}], fault: {abort: {percentage: {value: 50}, httpStatus: 503}}, route: [httpbin]}
/// - {name: delay, match: [{uri: {prefix: /fault/delay}}], fault: {delay: {percentage: {value: 100}, fixedDelay: 1s}}, route: [httpbin]}
/// - {name: default, route: [httpbin]}
/// ```
///
/// istiod leaves `include_request_attempt_count` off on the waypoint's inbound virtual host (it
/// sets it on sidecar and gateway hosts from `ProxyHeaders`); it is set here, as an EnvoyFilter
/// would, so that the echo can report the attempt count.
fn vs_listener(fixture: &Fixture) -> Json {
    let mut l = fixture.main_internal();
    let vhost = service_vhost(service_hcm(&mut l));
    let default_route = vhost["routes"][0].clone();
    let mut abort = vs_route(&default_route, "abort", "/fault/abort", None);
    abort["typed_per_filter_config"] =
        fault_config(json!({"abort": {"http_status": 503, "percentage": percent(50.0)}}));
    let mut delay = vs_route(&default_route, "delay", "/fault/delay", None);
    delay["typed_per_filter_config"] =
        fault_config(json!({"delay": {"fixed_delay": "1s", "percentage": percent(100.0)}}));
    let catch_all = vs_route(&default_route, "default", "/", None);
    vhost["routes"] = json!([
        vs_route(
            &default_route,
            "retry-5xx",
            "/retry/5xx",
            Some(vs_retry_policy("5xx", &[]))
        ),
        vs_route(
            &default_route,
            "retry-codes",
            "/retry/codes",
            Some(vs_retry_policy("retriable-status-codes", &[503]))
        ),
        abort,
        delay,
        catch_all,
    ]);
    vhost["include_request_attempt_count"] = json!(true);
    l
}

/// The service cluster with DestinationRule `trafficPolicy.connectionPool.http.http2MaxRequests:
/// 1`: istiod's thresholds with `max_requests` 1, the others at their defaults, and the DR named
/// in the cluster metadata.
fn breaker_cluster(fixture: &Fixture) -> Json {
    let mut c = fixture.vip_cluster();
    c["circuit_breakers"] = json!({"thresholds": [{
        "max_connections": 4_294_967_295u64,
        "max_pending_requests": 4_294_967_295u64,
        "max_requests": 1,
        "max_retries": 4_294_967_295u64,
        "track_remaining": true
    }]});
    c["metadata"]["filter_metadata"]["istio"]["config"] = json!(DR_CONFIG);
    c
}

/// An `envoy.filters.http.rbac` filter as istiod's authz builder renders it for a waypoint.
fn rbac_filter(action: Option<&str>, policy: &str, permissions: Json, principals: Json) -> Json {
    let mut rules =
        json!({"policies": {policy: {"permissions": permissions, "principals": principals}}});
    let shadow = match action {
        Some(a) => {
            rules["action"] = json!(a);
            "istio_dry_run_deny_"
        }
        None => "istio_dry_run_allow_",
    };
    json!({
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": rules,
            "shadow_rules_stat_prefix": shadow
        }
    })
}

/// `main_internal` with two AuthorizationPolicies on the service and meshConfig
/// `pathNormalization: {normalization: MERGE_SLASHES}`:
///
/// ```yaml
/// # deny-admin
/// spec: {targetRefs: [{kind: Service, name: httpbin}], action: DENY,
///        rules: [{to: [{operation: {paths: ["/admin"]}}]}]}
/// # allow-sleep
/// spec: {targetRefs: [{kind: Service, name: httpbin}], action: ALLOW,
///        rules: [{from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]}]}
/// ```
///
/// DENY filters come first, then ALLOW, both ahead of the fixture's filters; the route config is
/// the fixture's (no VirtualService).
fn rbac_listener(fixture: &Fixture) -> Json {
    let mut l = fixture.main_internal();
    let hcm = service_hcm(&mut l);
    hcm["normalize_path"] = json!(true);
    hcm["merge_slashes"] = json!(true);
    hcm["path_with_escaped_slashes_action"] = json!("KEEP_UNCHANGED");
    let deny = rbac_filter(
        Some("DENY"),
        "ns[default]-policy[deny-admin]-rule[0]",
        json!([{"and_rules": {"rules": [{"or_rules": {"rules": [
            {"url_path": {"path": {"exact": "/admin"}}}
        ]}}]}}]),
        json!([{"and_ids": {"ids": [{"any": true}]}}]),
    );
    let allow = rbac_filter(
        None,
        "ns[default]-policy[allow-sleep]-rule[0]",
        json!([{"and_rules": {"rules": [{"any": true}]}}]),
        json!([{"and_ids": {"ids": [{"or_ids": {"ids": [{"filter_state": {
            "key": "io.istio.peer_principal",
            "string_match": {"exact": SLEEP_IDENTITY}
        }}]}}]}}]),
    );
    let filters = hcm["http_filters"]
        .as_array_mut()
        .expect("the HCM's http_filters");
    filters.insert(0, allow);
    filters.insert(0, deny);
    l
}

// ---------------------------------------------------------------------------------------------
// Pushing and waiting for the proxy's answer
// ---------------------------------------------------------------------------------------------

/// The state of `type_url` on the proxy's live ADS stream (the newest connected one).
fn live_type(conns: &[ConnStatus], type_url: &str) -> Option<TypeStatus> {
    conns
        .iter()
        .filter(|c| c.connected)
        .filter_map(|c| c.types.get(type_url).map(|t| (c.id, t)))
        .max_by_key(|(id, _)| *id)
        .map(|(_, t)| t.clone())
}

/// Pushes `doc` as a `kind` resource and waits until the proxy ACKs the push; a NACK fails the
/// test with its message.
async fn push(mesh: &WaypointMesh, kind: ResourceKind, type_url: &str, doc: &Json, what: &str) {
    let book = mesh.istiod.book.clone();
    let before = live_type(&book.connections().await, type_url).unwrap_or_default();
    if let Err(e) = mesh.istiod.push_json(kind, doc).await {
        panic!("istiod-lite refused {what}: {e}");
    }
    let answered = book
        .wait_until(ACK_WAIT, |conns| {
            live_type(conns, type_url).is_some_and(|t| {
                t.responses > before.responses
                    && (t.nacks > before.nacks
                        || (t.acks > before.acks && t.acked_version == t.sent_version))
            })
        })
        .await;
    let status = match answered {
        Ok(conns) => live_type(&conns, type_url).unwrap_or_default(),
        Err(conns) => panic!(
            "{what}: no ACK within {ACK_WAIT:?}: {:#?}\n{}",
            live_type(&conns, type_url),
            mesh.log_tail(40)
        ),
    };
    assert_eq!(
        status.nacks,
        before.nacks,
        "{what} was NACKed: {:?}",
        status.last_nack.map(|n| n.message)
    );
}

// ---------------------------------------------------------------------------------------------
// Traffic helpers
// ---------------------------------------------------------------------------------------------

/// What came back for one request.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Answer {
    fn echo(&self, what: &str) -> EchoSeen {
        assert_eq!(
            self.status,
            StatusCode::OK,
            "{what}: {:?}",
            String::from_utf8_lossy(&self.body)
        );
        EchoSeen::parse(&self.body).unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request on a new connection to `addr` (each one a new HBONE stream through the
/// forwarder, so it sees the config in force when it starts). `path` goes on the wire as given
/// (`//admin` stays `//admin`).
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Answer {
    let pq = PathAndQuery::try_from(path).unwrap_or_else(|e| panic!("path {path}: {e}"));
    let uri = Uri::from_parts({
        let mut parts = http::uri::Parts::default();
        parts.path_and_query = Some(pq);
        parts
    })
    .unwrap_or_else(|e| panic!("uri {path}: {e}"));
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", HOST);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body)).expect("request");
    let resp = http1_request(addr, req, REQUEST)
        .await
        .unwrap_or_else(|e| panic!("{method} {path} via {addr}: {e}"));
    let (parts, body) = resp.into_parts();
    let body = read_body(body, BODY_LIMIT, REQUEST)
        .await
        .unwrap_or_else(|e| panic!("{method} {path} via {addr}: {e}"));
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// The value of a counter or gauge in the proxy's `/stats` (0 when absent).
async fn stat(mesh: &WaypointMesh, name: &str) -> u64 {
    let (status, body) = mesh.admin_get("/stats").await.expect("GET /stats");
    assert_eq!(status, 200, "GET /stats");
    body.lines()
        .find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(": ")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// The sum of the `istio_requests_total` series whose labels contain every one of `labels`.
fn requests_total(text: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        .sum()
}

/// Scrapes the proxy's Prometheus stats until the `istio_requests_total` series with `labels`
/// sum to `want` (bounded); returns the sum seen last and the exposition.
async fn wait_requests_total(mesh: &WaypointMesh, labels: &[&str], want: f64) -> (f64, String) {
    let deadline = Instant::now() + OBSERVE;
    loop {
        let (status, text) = mesh
            .admin_get("/stats/prometheus")
            .await
            .expect("GET /stats/prometheus");
        assert_eq!(status, 200, "GET /stats/prometheus");
        let got = requests_total(&text, labels);
        if got == want || Instant::now() > deadline {
            return (got, text);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn istio_request_lines(text: &str) -> String {
    text.lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------------

/// VirtualService retries: attempts counted by the echo, body replayed, attempt count header.
async fn retries(mesh: &WaypointMesh) {
    let client = mesh.client_addr();
    // A body whose bytes are not a simple pattern, and its digest as the echo computes it when
    // the body is sent to it directly.
    let body = Bytes::from(
        (0..RETRY_BODY_LEN)
            .map(|i| ((i * 7 + i / 251) % 256) as u8)
            .collect::<Vec<u8>>(),
    );
    let len = body.len().to_string();
    let direct = send(
        mesh.addrs.pod_app(),
        "POST",
        "/digest",
        &[("x-echo-body-sha1", "1")],
        body.clone(),
    )
    .await
    .echo("the body sent to the echo directly");
    let want_sha1 = direct.body_sha1.expect("the echo reports the digest");

    // retryOn 5xx: two 503s, then the 200 goes back; the echo saw exactly three attempts.
    let retried_before = stat(mesh, &format!("{VIP_STATS}.upstream_rq_retry")).await;
    let a = send(
        client,
        "POST",
        "/retry/5xx",
        &[
            ("x-echo-key", "retry-5xx"),
            ("x-echo-fail-first", "2"),
            ("x-echo-body-sha1", "1"),
            ("content-length", &len),
        ],
        body.clone(),
    )
    .await;
    let seen = a.echo("POST /retry/5xx (fails twice)");
    assert_eq!(
        a.header("x-echo-request-count"),
        Some("3"),
        "attempts at the echo"
    );
    assert_eq!(seen.request_count, Some(3));
    assert_eq!(seen.body_len, RETRY_BODY_LEN as u64, "replayed body length");
    assert_eq!(
        seen.body_sha1.as_deref(),
        Some(want_sha1.as_str()),
        "replayed body bytes"
    );
    assert_eq!(
        seen.headers
            .get("x-envoy-attempt-count")
            .map(String::as_str),
        Some("3"),
        "include_request_attempt_count: the third attempt says so: {:?}",
        seen.headers
    );
    let retried = stat(mesh, &format!("{VIP_STATS}.upstream_rq_retry")).await;
    assert_eq!(retried - retried_before, 2, "upstream_rq_retry");

    // Exhausted: three 503s are all the echo sees, and the last one goes back.
    let a = send(
        client,
        "POST",
        "/retry/5xx",
        &[
            ("x-echo-key", "retry-5xx-exhausted"),
            ("x-echo-fail-first", "5"),
            ("content-length", &len),
        ],
        body.clone(),
    )
    .await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text());
    assert_eq!(
        a.header("x-echo-request-count"),
        Some("3"),
        "1 + num_retries"
    );
    let follow_up = send(
        mesh.addrs.pod_app(),
        "GET",
        "/count",
        &[("x-echo-key", "retry-5xx-exhausted")],
        Bytes::new(),
    )
    .await;
    assert_eq!(
        follow_up.header("x-echo-request-count"),
        Some("4"),
        "no attempt after the answer went back"
    );

    // retryOn "503" (retriable-status-codes [503]): 503 is retried, 502 is not.
    let a = send(
        client,
        "POST",
        "/retry/codes",
        &[
            ("x-echo-key", "retry-codes"),
            ("x-echo-fail-first", "2"),
            ("x-echo-body-sha1", "1"),
            ("content-length", &len),
        ],
        body.clone(),
    )
    .await;
    let seen = a.echo("POST /retry/codes (503 twice)");
    assert_eq!(seen.request_count, Some(3));
    assert_eq!(seen.body_sha1.as_deref(), Some(want_sha1.as_str()));
    let a = send(
        client,
        "POST",
        "/retry/codes",
        &[
            ("x-echo-key", "retry-codes-502"),
            ("x-echo-fail-first", "2"),
            ("x-echo-status", "502"),
        ],
        Bytes::from_static(b"once"),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", a.text());
    assert_eq!(
        a.header("x-echo-request-count"),
        Some("1"),
        "502 is not in retriable_status_codes"
    );
}

/// VirtualService faults: the abort ratio over 2,000 h2c requests, the fixed delay, FI/DI.
async fn faults(mesh: &WaypointMesh) {
    // One h2c connection (one HBONE stream) multiplexing every request.
    let tcp = tokio::net::TcpStream::connect(mesh.client_addr())
        .await
        .expect("connect to the forwarder");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2c handshake through the waypoint");
    tokio::spawn(conn);
    let started = Instant::now();
    let outcomes: Vec<Result<(StatusCode, Bytes), String>> = stream::iter(0..ABORT_REQUESTS)
        .map(|i| {
            let mut sender = sender.clone();
            async move {
                let req = Request::get(format!("http://{HOST}/fault/abort/{i}"))
                    .body(Empty::<Bytes>::new())
                    .map_err(|e| e.to_string())?;
                let exchange = async {
                    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
                    let status = resp.status();
                    let body = read_body(resp.into_body(), BODY_LIMIT, REQUEST)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>((status, body))
                };
                tokio::time::timeout(REQUEST, exchange)
                    .await
                    .map_err(|_| format!("request {i}: no answer within {REQUEST:?}"))?
            }
        })
        .buffer_unordered(ABORT_CONCURRENCY)
        .collect()
        .await;
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    let mut aborted = 0usize;
    for outcome in &outcomes {
        match outcome {
            Ok((status, body)) => {
                *by_status.entry(status.as_u16()).or_default() += 1;
                if *status == StatusCode::SERVICE_UNAVAILABLE {
                    assert_eq!(
                        &body[..],
                        b"fault filter abort",
                        "an abort's body (Envoy's local reply)"
                    );
                    aborted += 1;
                }
            }
            Err(e) => panic!("fault abort sample: {e}"),
        }
    }
    assert_eq!(
        by_status.keys().copied().collect::<Vec<_>>(),
        vec![200, 503],
        "only aborts and answers: {by_status:?}"
    );
    let ratio = aborted as f64 / ABORT_REQUESTS as f64;
    eprintln!(
        "fault abort: {aborted}/{ABORT_REQUESTS} aborted ({ratio:.3}) in {:?}",
        started.elapsed()
    );
    assert!(
        (ratio - 0.5).abs() <= ABORT_TOLERANCE,
        "abort ratio {ratio} outside 0.5 ± {ABORT_TOLERANCE}: {by_status:?}"
    );
    let (flagged, text) = wait_requests_total(
        mesh,
        &["response_code=\"503\"", "response_flags=\"FI\""],
        aborted as f64,
    )
    .await;
    assert_eq!(
        flagged,
        aborted as f64,
        "istio_requests_total{{response_flags=\"FI\"}}:\n{}",
        istio_request_lines(&text)
    );

    // The fixed delay: every request takes at least 1 s and is then answered.
    let client = mesh.client_addr();
    let delayed: Vec<(Duration, Answer)> =
        futures::future::join_all((0..DELAYED_REQUESTS).map(|i| async move {
            let t = Instant::now();
            let a = send(
                client,
                "GET",
                &format!("/fault/delay/{i}"),
                &[],
                Bytes::new(),
            )
            .await;
            (t.elapsed(), a)
        }))
        .await;
    for (i, (took, a)) in delayed.iter().enumerate() {
        let seen = a.echo(&format!("GET /fault/delay/{i}"));
        assert_eq!(seen.path, format!("/fault/delay/{i}"));
        assert!(
            *took >= FAULT_DELAY,
            "request {i} took {took:?}, under the fault's {FAULT_DELAY:?}"
        );
    }
    let (flagged, text) = wait_requests_total(
        mesh,
        &["response_code=\"200\"", "response_flags=\"DI\""],
        DELAYED_REQUESTS as f64,
    )
    .await;
    assert_eq!(
        flagged,
        DELAYED_REQUESTS as f64,
        "istio_requests_total{{response_flags=\"DI\"}}:\n{}",
        istio_request_lines(&text)
    );
}

/// DestinationRule `http2MaxRequests: 1`: with the only slot taken, the burst overflows.
async fn circuit_breaker(mesh: &WaypointMesh, fixture: &Fixture) {
    push(
        mesh,
        ResourceKind::Cluster,
        CLUSTER_TYPE,
        &breaker_cluster(fixture),
        "the service cluster with max_requests 1",
    )
    .await;
    let client = mesh.client_addr();
    let slow_ms = SLOW_MS.to_string();
    let slow = {
        let slow_ms = slow_ms.clone();
        tokio::spawn(async move {
            send(
                client,
                "GET",
                "/cb/slow",
                &[("x-echo-delay-ms", &slow_ms)],
                Bytes::new(),
            )
            .await
        })
    };
    // The slot is taken once the slow request is active upstream.
    let active = format!("{VIP_STATS}.upstream_rq_active");
    if let Err(e) = mesh
        .wait_for("the slow request to be active upstream", OBSERVE, || {
            let active = active.clone();
            async move {
                match stat(mesh, &active).await {
                    0 => Err(format!("{active} = 0")),
                    _ => Ok(()),
                }
            }
        })
        .await
    {
        panic!("{e}");
    }
    let overflow_before = stat(mesh, &format!("{VIP_STATS}.upstream_rq_pending_overflow")).await;
    let started = Instant::now();
    let burst: Vec<Answer> = futures::future::join_all((0..BURST).map(|i| {
        let slow_ms = slow_ms.clone();
        async move {
            send(
                client,
                "GET",
                &format!("/cb/burst/{i}"),
                &[("x-echo-delay-ms", &slow_ms)],
                Bytes::new(),
            )
            .await
        }
    }))
    .await;
    for (i, a) in burst.iter().enumerate() {
        assert_eq!(
            a.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "burst request {i}: {}",
            a.text()
        );
        assert_eq!(
            a.header("x-envoy-overloaded"),
            Some("true"),
            "burst request {i}: {:?}",
            a.headers
        );
    }
    assert!(
        started.elapsed() < Duration::from_millis(SLOW_MS),
        "the overflow is answered at once, not after the slow request ({:?})",
        started.elapsed()
    );
    let slow = slow.await.expect("the slow request's task");
    assert_eq!(slow.echo("the slow request").path, "/cb/slow");
    let overflow = stat(mesh, &format!("{VIP_STATS}.upstream_rq_pending_overflow")).await;
    assert_eq!(
        overflow - overflow_before,
        BURST as u64,
        "upstream_rq_pending_overflow"
    );
    let (flagged, text) = wait_requests_total(
        mesh,
        &["response_code=\"503\"", "response_flags=\"UO\""],
        BURST as f64,
    )
    .await;
    assert_eq!(
        flagged,
        BURST as f64,
        "istio_requests_total{{response_flags=\"UO\"}}:\n{}",
        istio_request_lines(&text)
    );

    // Without the DestinationRule the same burst is served.
    push(
        mesh,
        ResourceKind::Cluster,
        CLUSTER_TYPE,
        &fixture.vip_cluster(),
        "the service cluster without the DestinationRule",
    )
    .await;
    let served = futures::future::join_all((0..3).map(|i| {
        send(
            client,
            "GET",
            if i == 0 { "/cb/after/0" } else { "/cb/after/n" },
            &[("x-echo-delay-ms", "200")],
            Bytes::new(),
        )
    }))
    .await;
    for a in &served {
        a.echo("a request after the DestinationRule is gone");
    }
}

/// AuthorizationPolicies: ALLOW by principal, DENY by path under path normalisation.
async fn rbac(mesh: &WaypointMesh, fixture: &Fixture) {
    push(
        mesh,
        ResourceKind::Listener,
        LISTENER_TYPE,
        &rbac_listener(fixture),
        "main_internal with the AuthorizationPolicies",
    )
    .await;
    let client = mesh.client_addr();

    // The sleep principal is allowed; istiod's waypoint host adds no attempt count.
    let a = send(client, "GET", "/get", &[], Bytes::new()).await;
    let seen = a.echo("sleep GET /get");
    assert!(
        !seen.headers.contains_key("x-envoy-attempt-count"),
        "include_request_attempt_count is off on istiod's waypoint host: {:?}",
        seen.headers
    );
    // merge_slashes and normalize_path apply to what goes upstream, too.
    for path in ["//get", "/./get", "/x/../get", "/%67et"] {
        let a = send(client, "GET", path, &[], Bytes::new()).await;
        assert_eq!(
            a.echo(&format!("sleep GET {path}")).path,
            "/get",
            "{path} forwarded normalised"
        );
    }

    // DENY /admin in every spelling that normalises to it.
    for path in [
        "/admin",
        "//admin",
        "/./admin",
        "/%61dmin",
        "/x/../admin",
        "///admin?q=1",
    ] {
        let a = send(client, "GET", path, &[], Bytes::new()).await;
        assert_eq!(
            a.status,
            StatusCode::FORBIDDEN,
            "sleep GET {path}: {}",
            a.text()
        );
        assert_eq!(a.text(), "RBAC: access denied", "sleep GET {path}");
    }
    // What does not normalise to /admin is not denied.
    let a = send(client, "GET", "/admin/x", &[], Bytes::new()).await;
    a.echo("sleep GET /admin/x (the policy names /admin exactly)");

    // Another SPIFFE identity of the mesh: denied by the ALLOW policy.
    let other = mesh
        .mesh_signed_identity(&SpiffeId::new("cluster.local", "default", "notsleep"))
        .expect("a mesh-signed identity");
    let mut config = ForwarderConfig::new(
        SocketAddr::V4(SocketAddrV4::new(mesh.addrs.client_ip, 0)),
        mesh.addrs.waypoint_hbone(),
        mesh.addrs.service().to_string(),
        Arc::new(other),
    );
    config.expect_peer = PeerMatch::Exact(WAYPOINT_IDENTITY.to_owned());
    let forwarder = HboneForwarder::start(config)
        .await
        .expect("the other identity's forwarder");
    let a = send(forwarder.addr, "GET", "/get", &[], Bytes::new()).await;
    assert_eq!(
        a.status,
        StatusCode::FORBIDDEN,
        "notsleep GET /get: {}",
        a.text()
    );
    assert_eq!(a.text(), "RBAC: access denied");
    // The sleep client is still admitted on the same config.
    send(client, "GET", "/get", &[], Bytes::new())
        .await
        .echo("sleep GET /get after the denial");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_management_through_the_waypoint() {
    let options = MeshOptions::new(
        "traffic",
        Path::new(env!("CARGO_BIN_EXE_proxy")),
        &agent_bin(),
    );
    let mesh = match WaypointMesh::start(options).await {
        Ok(mesh) => mesh,
        Err(e) => panic!("the mesh did not start: {e}"),
    };
    if let Err(e) = mesh.wait_hbone_ready(HBONE_READY).await {
        panic!("{e}");
    }
    let fixture = Fixture::of(&mesh);
    let started = Instant::now();

    push(
        &mesh,
        ResourceKind::Listener,
        LISTENER_TYPE,
        &vs_listener(&fixture),
        "main_internal with the VirtualService",
    )
    .await;
    retries(&mesh).await;
    eprintln!("retries done after {:?}", started.elapsed());
    faults(&mesh).await;
    eprintln!("faults done after {:?}", started.elapsed());
    circuit_breaker(&mesh, &fixture).await;
    eprintln!("circuit breaker done after {:?}", started.elapsed());
    rbac(&mesh, &fixture).await;
    eprintln!("RBAC done after {:?}", started.elapsed());

    let nacks = mesh.nacks().await;
    assert!(nacks.is_empty(), "NACKs: {nacks:?}");
}
