//! Traffic-management scenarios for the waypoint mesh ([`WaypointMesh`]): the resources istiod
//! renders for a waypoint from one Istio resource each, built from the mesh fixture as
//! proto3-JSON for istiod-lite to push, and what drives them — a push that waits for the proxy's
//! ACK, ES256 token signing for RequestAuthentication, the second echo a mirror reaches, and a
//! small request client that reports what came back.
//!
//! Shapes follow istiod: `pilot/pkg/networking/core/listener_waypoint.go`
//! (`translateWaypointRoute`), `route/retry/retry.go`, `route/route.go` (`setTimeout`,
//! `TranslateFault`, `TranslateCORSPolicy`, mirrors), `security/authz/builder` and
//! `security/authn` (`convertToEnvoyJwtConfig`). Nothing here asserts: `proxy/tests/traffic_e2e.rs`
//! checks every detail, the `mesh` report prints one line per scenario.

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::{Request, StatusCode, Uri, uri::PathAndQuery};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ring::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, KeyPair as _},
};
use serde_json::{Value as Json, json};
use waypoint_proto::{json::yaml_to_json, resource::ResourceKind};

use crate::{
    echo::{EchoConfig, EchoError, EchoFault, EchoJournal, EchoServer},
    hbone::{AcceptedStream, HboneSink, SinkConfig},
    istiod_lite::{
        Resource,
        ads::{ConnStatus, TypeStatus},
    },
    waypoint::{
        EchoSeen, FIXTURE_TEMPLATE, MeshError, SLEEP_IDENTITY, VIP_CLUSTER, WaypointMesh,
        http1_request, read_body, render_fixture,
    },
};

/// The `Host` of requests sent through the sleep client's forwarder.
pub const HOST: &str = "httpbin.default.svc.cluster.local:8000";
/// The service's hostname.
pub const SERVICE_HOST: &str = "httpbin.default.svc.cluster.local";
/// Prefix of the service cluster's stats (istiod sets `alt_stat_name` to `<name>;`).
pub const VIP_STATS: &str = "cluster.inbound-vip|8000|http|httpbin.default.svc.cluster.local;";
/// The VirtualService the pushed routes stand for (route `metadata`).
pub const VS_CONFIG: &str =
    "/apis/networking.istio.io/v1/namespaces/default/virtual-service/httpbin";
/// The DestinationRule the pushed cluster stands for (cluster `metadata`).
pub const DR_CONFIG: &str =
    "/apis/networking.istio.io/v1/namespaces/default/destination-rule/httpbin";
/// The httpbin pod's WDS uid in the fixture.
pub const HTTPBIN_UID: &str = "Kubernetes//Pod/default/httpbin-6b9c7d8f5-abcde";
/// httpbin's second HTTP port, the mirror's target.
pub const MIRROR_PORT: u16 = 8001;
/// The waypoint's cluster for [`MIRROR_PORT`].
pub const MIRROR_CLUSTER: &str = "inbound-vip|8001|http|httpbin.default.svc.cluster.local";
/// Prefix of [`MIRROR_CLUSTER`]'s stats.
pub const MIRROR_STATS: &str = "cluster.inbound-vip|8001|http|httpbin.default.svc.cluster.local;";
/// The authority a mirrored request carries: `-shadow` after the host part of [`HOST`].
pub const SHADOW_HOST: &str = "httpbin.default.svc.cluster.local-shadow:8000";
/// The RequestAuthentication's issuer.
pub const ISSUER: &str = "testing@secure.istio.io";
/// The HTTP filter that verifies JWTs (and names their claims' metadata).
pub const JWT_FILTER: &str = "envoy.filters.http.jwt_authn";
/// The CORS policy's one allowed origin.
pub const ALLOWED_ORIGIN: &str = "https://allowed.example";
/// An origin the CORS policy does not allow.
pub const OTHER_ORIGIN: &str = "https://other.example";
/// The fault delay of [`vs_listener`]'s `/fault/delay` route.
pub const FAULT_DELAY: Duration = Duration::from_secs(1);
/// Bound for the proxy to ACK (or NACK) a pushed resource.
pub const ACK_WAIT: Duration = Duration::from_secs(30);
/// Bound for one request of [`send`] / [`send_h2`].
pub const REQUEST: Duration = Duration::from_secs(30);
/// Largest answer body [`send`] reads.
pub const BODY_LIMIT: usize = 64 * 1024;
/// How often [`wait_requests_total`] scrapes.
const SCRAPE_INTERVAL: Duration = Duration::from_millis(50);

/// Why a scenario could not be set up or driven.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The fixture lacks a part a builder edits.
    #[error("fixture: {0}")]
    Fixture(String),
    /// istiod-lite would not take a resource.
    #[error("istiod-lite refused {what}: {reason}")]
    Refused {
        /// The resource.
        what: String,
        /// istiod-lite's reason.
        reason: String,
    },
    /// The proxy did not answer a push in time.
    #[error("{what}: no ACK within {after:?} (last state: {state}); agent/proxy log tail:\n{log}")]
    NoAck {
        /// The resource.
        what: String,
        /// The bound.
        after: Duration,
        /// The type's state on the live stream, last seen.
        state: String,
        /// The end of the agent/proxy log.
        log: String,
    },
    /// The proxy NACKed a push.
    #[error("{what} was NACKed: {message}")]
    Nacked {
        /// The resource.
        what: String,
        /// The NACK's error detail.
        message: String,
    },
    /// A key could not be made or used.
    #[error("signing: {0}")]
    Signing(String),
    /// The harness failed (rendering, waiting, HTTP helpers).
    #[error(transparent)]
    Mesh(#[from] MeshError),
    /// The mirror's echo server failed.
    #[error("echo: {0}")]
    Echo(#[from] EchoError),
    /// A socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// A request went wrong before an answer came back.
    #[error("{method} {path} via {addr}: {reason}")]
    Request {
        /// Request method.
        method: String,
        /// Request path.
        path: String,
        /// Where it was sent.
        addr: SocketAddr,
        /// What failed.
        reason: String,
    },
}

fn fixture_err(what: impl Into<String>) -> ScenarioError {
    ScenarioError::Fixture(what.into())
}

// ---------------------------------------------------------------------------------------------
// The fixture, as istiod would change it
// ---------------------------------------------------------------------------------------------

/// The parts of the mesh fixture (rendered for one mesh) that scenarios change, as proto3-JSON.
#[derive(Debug, Clone)]
pub struct Fixture {
    main_internal: Json,
    vip_cluster: Json,
    vip_endpoints: Json,
    httpbin_workload: Json,
}

impl Fixture {
    /// Renders `tests/fixtures/mesh/waypoint.yaml` for `mesh` and picks the parts.
    pub fn of(mesh: &WaypointMesh) -> Result<Self, ScenarioError> {
        Fixture::for_addrs(&mesh.addrs)
    }

    /// Renders `tests/fixtures/mesh/waypoint.yaml` for the addresses `addrs` (no mesh needed: for
    /// checking builders) and picks the parts.
    pub fn for_addrs(addrs: &crate::waypoint::MeshAddrs) -> Result<Self, ScenarioError> {
        let text = render_fixture(FIXTURE_TEMPLATE, addrs)?;
        let doc = yaml_to_json(&text).map_err(|e| fixture_err(format!("not YAML: {e}")))?;
        let named = |list: &str, field: &str, name: &str| {
            doc[list]
                .as_array()
                .and_then(|l| l.iter().find(|r| r[field] == name))
                .cloned()
                .ok_or_else(|| fixture_err(format!("no {list} '{name}'")))
        };
        let fixture = Fixture {
            main_internal: named("listeners", "name", "main_internal")?,
            vip_cluster: named("clusters", "name", VIP_CLUSTER)?,
            vip_endpoints: named("endpoints", "cluster_name", VIP_CLUSTER)?,
            httpbin_workload: named("workloads", "uid", HTTPBIN_UID)?,
        };
        // Every listener builder starts from the service's route: check it once here.
        let mut l = fixture.main_internal();
        default_route(service_vhost(service_hcm(&mut l)?)?)?;
        Ok(fixture)
    }

    /// The fixture's `main_internal` listener (what a push restores).
    pub fn main_internal(&self) -> Json {
        self.main_internal.clone()
    }

    /// The fixture's service cluster ([`VIP_CLUSTER`]).
    pub fn vip_cluster(&self) -> Json {
        self.vip_cluster.clone()
    }

    /// The fixture's EDS of the service cluster.
    pub fn vip_endpoints(&self) -> Json {
        self.vip_endpoints.clone()
    }

    /// The fixture's WDS entry of the httpbin pod.
    pub fn httpbin_workload(&self) -> Json {
        self.httpbin_workload.clone()
    }
}

/// The `HttpConnectionManager` config of the service's HTTP filter chain of `main_internal`.
pub fn service_hcm(main_internal: &mut Json) -> Result<&mut Json, ScenarioError> {
    let chain = main_internal["filter_chains"]
        .as_array_mut()
        .and_then(|c| c.iter_mut().find(|c| c["name"] == VIP_CLUSTER))
        .ok_or_else(|| fixture_err("main_internal has no service filter chain"))?;
    let hcm = chain["filters"]
        .as_array_mut()
        .and_then(|f| {
            f.iter_mut()
                .find(|f| f["name"] == "envoy.filters.network.http_connection_manager")
        })
        .ok_or_else(|| fixture_err("the service chain has no HCM"))?;
    Ok(&mut hcm["typed_config"])
}

/// The service's single virtual host (`inbound|http|8000`) of an HCM's inline route config.
pub fn service_vhost(hcm: &mut Json) -> Result<&mut Json, ScenarioError> {
    let vhost = &mut hcm["route_config"]["virtual_hosts"][0];
    if vhost.is_object() {
        Ok(vhost)
    } else {
        Err(fixture_err("the service HCM has no virtual host"))
    }
}

/// The virtual host's first route: istiod's `default` route to the service.
fn default_route(vhost: &Json) -> Result<Json, ScenarioError> {
    let r = &vhost["routes"][0];
    if r["route"].is_object() {
        Ok(r.clone())
    } else {
        Err(fixture_err("the service virtual host has no default route"))
    }
}

/// The HCM's `http_filters`, to insert policy filters ahead of the fixture's.
fn http_filters(hcm: &mut Json) -> Result<&mut Vec<Json>, ScenarioError> {
    hcm["http_filters"]
        .as_array_mut()
        .ok_or_else(|| fixture_err("the service HCM has no http_filters"))
}

/// A route of a VirtualService `http` entry as `translateWaypointRoute` renders it: name, prefix
/// match, config metadata, decorator, and the action of the default route with `retry_policy`
/// (istiod: the VS `retries`, else the mesh default the fixture's route carries).
pub fn vs_route(
    default_route: &Json,
    name: &str,
    prefix: &str,
    retry_policy: Option<Json>,
) -> Json {
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
pub fn vs_retry_policy(retry_on: &str, codes: &[u16]) -> Json {
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
pub fn fault_config(fault: Json) -> Json {
    let mut config =
        json!({"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"});
    if let (Some(c), Some(f)) = (config.as_object_mut(), fault.as_object()) {
        c.extend(f.clone());
    }
    json!({"envoy.filters.http.fault": config})
}

/// Istio's percentage (`value: 50`) as the `FractionalPercent` istiod emits (per million).
pub fn percent(value: f64) -> Json {
    json!({"numerator": (value * 10_000.0).round() as u64, "denominator": "MILLION"})
}

/// `main_internal` for the VirtualService of the retry and fault scenarios:
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
pub fn vs_listener(fixture: &Fixture) -> Result<Json, ScenarioError> {
    let mut l = fixture.main_internal();
    let vhost = service_vhost(service_hcm(&mut l)?)?;
    let default = default_route(vhost)?;
    let mut abort = vs_route(&default, "abort", "/fault/abort", None);
    abort["typed_per_filter_config"] =
        fault_config(json!({"abort": {"http_status": 503, "percentage": percent(50.0)}}));
    let mut delay = vs_route(&default, "delay", "/fault/delay", None);
    delay["typed_per_filter_config"] = fault_config(json!({"delay": {
        "fixed_delay": format!("{}s", FAULT_DELAY.as_secs_f64()),
        "percentage": percent(100.0)
    }}));
    vhost["routes"] = json!([
        vs_route(
            &default,
            "retry-5xx",
            "/retry/5xx",
            Some(vs_retry_policy("5xx", &[]))
        ),
        vs_route(
            &default,
            "retry-codes",
            "/retry/codes",
            Some(vs_retry_policy("retriable-status-codes", &[503]))
        ),
        abort,
        delay,
        vs_route(&default, "default", "/", None),
    ]);
    vhost["include_request_attempt_count"] = json!(true);
    Ok(l)
}

/// `main_internal` for a VirtualService with `timeout` on `/timeout` (`setTimeout`: the route's
/// `timeout`, and `max_grpc_timeout` capped at the same value); the other routes keep istiod's
/// `timeout: 0s, max_grpc_timeout: 0s`, where a gRPC request's `grpc-timeout` is the limit:
///
/// ```yaml
/// http:
/// - {name: timeout, match: [{uri: {prefix: /timeout}}], timeout: <timeout>, route: [httpbin]}
/// - {name: default, route: [httpbin]}
/// ```
pub fn timeout_listener(fixture: &Fixture, timeout: Duration) -> Result<Json, ScenarioError> {
    let mut l = fixture.main_internal();
    let vhost = service_vhost(service_hcm(&mut l)?)?;
    let default = default_route(vhost)?;
    let mut limited = vs_route(&default, "timeout", "/timeout", None);
    let value = format!("{}s", timeout.as_secs_f64());
    limited["route"]["timeout"] = json!(value);
    limited["route"]["max_grpc_timeout"] = json!(value);
    vhost["routes"] = json!([limited, vs_route(&default, "default", "/", None)]);
    Ok(l)
}

/// The service cluster with DestinationRule `trafficPolicy.connectionPool.http.http2MaxRequests:
/// 1`: istiod's thresholds with `max_requests` 1, the others at their defaults, and the DR named
/// in the cluster metadata.
pub fn breaker_cluster(fixture: &Fixture) -> Json {
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

/// An `envoy.filters.http.rbac` filter as istiod's authz builder renders it for a waypoint
/// (`action` `None` is ALLOW).
pub fn rbac_filter(
    action: Option<&str>,
    policy: &str,
    permissions: Json,
    principals: Json,
) -> Json {
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
pub fn rbac_listener(fixture: &Fixture) -> Result<Json, ScenarioError> {
    let mut l = fixture.main_internal();
    let hcm = service_hcm(&mut l)?;
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
    let filters = http_filters(hcm)?;
    filters.insert(0, allow);
    filters.insert(0, deny);
    Ok(l)
}

/// The cluster istiod renders for httpbin's second HTTP port 8001 (the mirror's target): the
/// 8000 cluster's shape under the port's name.
pub fn mirror_cluster(fixture: &Fixture) -> Json {
    let mut c = fixture.vip_cluster();
    c["name"] = json!(MIRROR_CLUSTER);
    c["alt_stat_name"] = json!(format!("{MIRROR_CLUSTER};"));
    c["eds_cluster_config"]["service_name"] = json!(MIRROR_CLUSTER);
    c
}

/// The EDS of the mirror port: the httpbin pod at `target` (its target port), tunnelled through
/// `connect_originate` as every waypoint endpoint is.
pub fn mirror_endpoints(fixture: &Fixture, target: SocketAddr) -> Json {
    let mut e = fixture.vip_endpoints();
    e["cluster_name"] = json!(MIRROR_CLUSTER);
    let lb = &mut e["endpoints"][0]["lb_endpoints"][0];
    lb["endpoint"]["address"]["envoy_internal_address"]["endpoint_id"] = json!(target.to_string());
    lb["metadata"]["filter_metadata"]["envoy.filters.listener.original_dst"]["local"] =
        json!(target.to_string());
    e
}

/// The httpbin pod's WDS entry with the service's port 8001 → `target_port` added.
pub fn httpbin_workload_with_mirror_port(
    fixture: &Fixture,
    target_port: u16,
) -> Result<Json, ScenarioError> {
    let mut w = fixture.httpbin_workload();
    w["services"][format!("default/{SERVICE_HOST}")]["ports"]
        .as_array_mut()
        .ok_or_else(|| fixture_err("the httpbin workload has no service ports"))?
        .push(json!({"service_port": MIRROR_PORT, "target_port": target_port}));
    Ok(w)
}

/// `main_internal` for a VirtualService that mirrors `/mirror` to httpbin's port 8001
/// (`translateWaypointRoute` → `TranslateRequestMirrorPolicyCluster`; the port is httpbin's, so
/// `getWaypointDestinationCluster` names the waypoint's own `inbound-vip` cluster):
///
/// ```yaml
/// http:
/// - name: mirror
///   match: [{uri: {prefix: /mirror}}]
///   route: [{destination: {host: httpbin.default.svc.cluster.local}}]
///   mirror: {host: httpbin.default.svc.cluster.local, port: {number: 8001}}
///   mirrorPercentage: {value: 100}
/// - {name: default, route: [{destination: {host: httpbin.default.svc.cluster.local}}]}
/// ```
pub fn mirror_listener(fixture: &Fixture) -> Result<Json, ScenarioError> {
    let mut l = fixture.main_internal();
    let vhost = service_vhost(service_hcm(&mut l)?)?;
    let default = default_route(vhost)?;
    let mut mirror = vs_route(&default, "mirror", "/mirror", None);
    mirror["route"]["request_mirror_policies"] = json!([{
        "cluster": MIRROR_CLUSTER,
        "runtime_fraction": {"default_value": percent(100.0)},
        "trace_sampled": false
    }]);
    vhost["routes"] = json!([mirror, vs_route(&default, "default", "/", None)]);
    Ok(l)
}

/// A `request.auth.claims[<claim>]` condition as istiod's authz builder writes it
/// (`MetadataListValueMatcherForJWTClaims`): the claim under jwt_authn's `payload` metadata,
/// matched as a string or as one element of a list.
pub fn claim_principal(claim: &str, value: &str) -> Json {
    let m = json!({"exact": value});
    json!({"metadata": {
        "filter": JWT_FILTER,
        "path": [{"key": "payload"}, {"key": claim}],
        "value": {"or_match": {"value_matchers": [
            {"list_match": {"one_of": {"string_match": m}}},
            {"string_match": m}
        ]}}
    }})
}

/// `main_internal` with a RequestAuthentication and an AuthorizationPolicy on the service:
///
/// ```yaml
/// # RequestAuthentication jwt
/// spec: {targetRefs: [{kind: Service, name: httpbin}],
///        jwtRules: [{issuer: testing@secure.istio.io, jwks: <jwks>}]}
/// # AuthorizationPolicy admins-only
/// spec: {targetRefs: [{kind: Service, name: httpbin}], action: ALLOW,
///        rules: [{when: [{key: "request.auth.claims[group]", values: [admins]}]}]}
/// ```
///
/// istiod's `convertToEnvoyJwtConfig` for one rule (provider `origins-0`, inline JWKS, payload in
/// metadata, `requires_any{provider, allow_missing}`, CORS preflights bypassed) goes first, then
/// the RBAC filter (jwt_authn before rbac), then the fixture's filters.
pub fn jwt_listener(fixture: &Fixture, jwks: &Json) -> Result<Json, ScenarioError> {
    jwt_policy_listener(
        fixture,
        "local_jwks",
        json!({"inline_string": jwks.to_string()}),
    )
}

/// [`jwt_listener`] for `jwtRules: [{issuer: testing@secure.istio.io, jwksUri: <uri>}]` under
/// `PILOT_JWT_ENABLE_REMOTE_JWKS=envoy`, the JWKS server being a ServiceEntry host istiod finds a
/// cluster for (`model.LookupCluster`): the provider's `remote_jwks` names that cluster, with
/// istiod's default 5 s fetch timeout and 300 s `cache_duration`, and no `async_fetch` (istiod
/// sets none, so the keys are fetched on the first request that needs them).
pub fn remote_jwks_listener(fixture: &Fixture, jwks: &JwksServer) -> Result<Json, ScenarioError> {
    jwt_policy_listener(
        fixture,
        "remote_jwks",
        json!({
            "http_uri": {"uri": jwks.uri(), "cluster": jwks.cluster_name(), "timeout": "5s"},
            "cache_duration": "300s"
        }),
    )
}

/// The RequestAuthentication + AuthorizationPolicy listener with the provider's JWKS source
/// `source_field: source`.
fn jwt_policy_listener(
    fixture: &Fixture,
    source_field: &str,
    source: Json,
) -> Result<Json, ScenarioError> {
    let mut l = fixture.main_internal();
    let hcm = service_hcm(&mut l)?;
    let mut provider = json!({
        "issuer": ISSUER,
        "payload_in_metadata": "payload",
        "normalize_payload_in_metadata": {"space_delimited_claims": ["permission", "scope"]}
    });
    provider[source_field] = source;
    let jwt = json!({
        "name": JWT_FILTER,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"origins-0": provider},
            "rules": [{
                "match": {"prefix": "/"},
                "requires": {"requires_any": {"requirements": [
                    {"provider_name": "origins-0"},
                    {"allow_missing": {}}
                ]}}
            }],
            "bypass_cors_preflight": true
        }
    });
    let allow = rbac_filter(
        None,
        "ns[default]-policy[admins-only]-rule[0]",
        json!([{"and_rules": {"rules": [{"any": true}]}}]),
        json!([{"and_ids": {"ids": [{"or_ids": {"ids": [claim_principal("group", "admins")]}}]}}]),
    );
    let filters = http_filters(hcm)?;
    filters.insert(0, allow);
    filters.insert(0, jwt);
    Ok(l)
}

/// `main_internal` for a VirtualService with a CORS policy on `/cors`
/// (`istio_route.TranslateCORSPolicy`; the waypoint's chain already has the `cors` filter):
///
/// ```yaml
/// http:
/// - name: cors
///   match: [{uri: {prefix: /cors}}]
///   corsPolicy: {allowOrigins: [{exact: "https://allowed.example"}], allowMethods: [GET, POST],
///                allowHeaders: [x-custom], exposeHeaders: [x-echo-server], maxAge: 24h,
///                allowCredentials: true}
///   route: [{destination: {host: httpbin.default.svc.cluster.local}}]
/// - {name: default, route: [{destination: {host: httpbin.default.svc.cluster.local}}]}
/// ```
pub fn cors_listener(fixture: &Fixture) -> Result<Json, ScenarioError> {
    let mut l = fixture.main_internal();
    let vhost = service_vhost(service_hcm(&mut l)?)?;
    let default = default_route(vhost)?;
    let mut cors = vs_route(&default, "cors", "/cors", None);
    cors["typed_per_filter_config"] = json!({"envoy.filters.http.cors": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": [{"exact": ALLOWED_ORIGIN}],
        "allow_methods": "GET,POST",
        "allow_headers": "x-custom",
        "expose_headers": "x-echo-server",
        "max_age": "86400",
        "allow_credentials": true,
        "filter_enabled": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        "forward_not_matching_preflights": true
    }});
    vhost["routes"] = json!([cors, vs_route(&default, "default", "/", None)]);
    Ok(l)
}

/// A `LocalRateLimit` in the `TypedStruct` an EnvoyFilter patch carries (Istio's local rate
/// limit task): `value` is the message as proto3 JSON.
pub fn local_rate_limit_config(value: Json) -> Json {
    json!({
        "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
        "type_url": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "value": value
    })
}

/// `main_internal` as Istio's local rate limit task configures a waypoint with an EnvoyFilter:
/// an `HTTP_FILTER` patch `INSERT_BEFORE` (no sub-filter: first in the chain) adding
/// `envoy.filters.http.local_ratelimit` with only a stat prefix (it limits nothing by itself),
/// and an `HTTP_ROUTE` patch `MERGE` giving the `/ratelimit` route its own bucket: `tokens`
/// tokens, refilled once an hour (none come back during a run), enforced, with
/// `x-local-rate-limit: true` on refused requests. The other routes are not limited.
pub fn rate_limit_listener(fixture: &Fixture, tokens: usize) -> Result<Json, ScenarioError> {
    let mut l = fixture.main_internal();
    let hcm = service_hcm(&mut l)?;
    let vhost = service_vhost(hcm)?;
    let default = default_route(vhost)?;
    let mut limited = default.clone();
    limited["name"] = json!("ratelimit");
    limited["match"] = json!({"prefix": "/ratelimit"});
    limited["typed_per_filter_config"] = json!({"envoy.filters.http.local_ratelimit":
        local_rate_limit_config(json!({
            "stat_prefix": "http_local_rate_limiter",
            "token_bucket": {
                "max_tokens": tokens,
                "tokens_per_fill": tokens,
                "fill_interval": "3600s"
            },
            "filter_enabled": {"runtime_key": "local_rate_limit_enabled",
                "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            "filter_enforced": {"runtime_key": "local_rate_limit_enforced",
                "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            "response_headers_to_add": [{"append": false,
                "header": {"key": "x-local-rate-limit", "value": "true"}}]
        }))
    });
    vhost["routes"] = json!([limited, default]);
    http_filters(hcm)?.insert(
        0,
        json!({
            "name": "envoy.filters.http.local_ratelimit",
            "typed_config": local_rate_limit_config(json!({"stat_prefix": "http_local_rate_limiter"}))
        }),
    );
    Ok(l)
}

/// `main_internal` with a WebSocket route whose streams end after `idle` without a byte either
/// way. No VirtualService field sets a route's `idle_timeout` (and the waypoint's HCM keeps
/// `stream_idle_timeout: 0s`), so it comes from an EnvoyFilter on the waypoint merging into the
/// VirtualService's route:
///
/// ```yaml
/// # VirtualService httpbin
/// http:
/// - {name: ws, match: [{uri: {prefix: /ws}}], route: [{destination: {host: httpbin.default.svc.cluster.local}}]}
/// - {name: default, route: [{destination: {host: httpbin.default.svc.cluster.local}}]}
/// # EnvoyFilter ws-idle (targetRefs: [{kind: Gateway, name: waypoint}])
/// configPatches:
/// - applyTo: HTTP_ROUTE
///   match: {routeConfiguration: {vhost: {route: {name: ws}}}}
///   patch: {operation: MERGE, value: {route: {idle_timeout: <idle>}}}
/// ```
pub fn ws_idle_listener(fixture: &Fixture, idle: Duration) -> Result<Json, ScenarioError> {
    let mut l = fixture.main_internal();
    let vhost = service_vhost(service_hcm(&mut l)?)?;
    let default = default_route(vhost)?;
    let mut ws = vs_route(&default, "ws", "/ws", None);
    ws["route"]["idle_timeout"] = json!(format!("{}s", idle.as_secs_f64()));
    vhost["routes"] = json!([ws, vs_route(&default, "default", "/", None)]);
    Ok(l)
}

// ---------------------------------------------------------------------------------------------
// Pushing and waiting for the proxy's answer
// ---------------------------------------------------------------------------------------------

/// The state of `type_url` on the proxy's live ADS stream (the newest connected one).
pub fn live_type(conns: &[ConnStatus], type_url: &str) -> Option<TypeStatus> {
    conns
        .iter()
        .filter(|c| c.connected)
        .filter_map(|c| c.types.get(type_url).map(|t| (c.id, t)))
        .max_by_key(|(id, _)| *id)
        .map(|(_, t)| t.clone())
}

/// Pushes `doc` as a `kind` resource through istiod-lite and waits (up to [`ACK_WAIT`]) until
/// the proxy ACKs it; a NACK is an error with its message. `what` names the resource in errors.
/// A document istiod-lite already serves unchanged is not sent again (as istiod), so there is
/// nothing to wait for.
pub async fn push(
    mesh: &WaypointMesh,
    kind: ResourceKind,
    doc: &Json,
    what: &str,
) -> Result<(), ScenarioError> {
    let refused = |reason: String| ScenarioError::Refused {
        what: what.to_owned(),
        reason,
    };
    let resource = Resource::from_json(kind, doc).map_err(refused)?;
    let unchanged = mesh
        .istiod
        .store
        .snapshot()
        .get(kind, &resource.name)
        .is_some_and(|served| served.version == resource.version);
    let type_url = kind.type_url();
    let before = live_type(&mesh.istiod.book.connections().await, type_url).unwrap_or_default();
    mesh.istiod.push_json(kind, doc).await.map_err(refused)?;
    if unchanged {
        return Ok(());
    }
    await_answer(mesh, type_url, &before, what).await
}

/// Pushes `doc` without waiting for an answer: for EDS, which the proxy only receives once a
/// cluster asks for it.
pub async fn push_unacked(
    mesh: &WaypointMesh,
    kind: ResourceKind,
    doc: &Json,
    what: &str,
) -> Result<(), ScenarioError> {
    mesh.istiod
        .push_json(kind, doc)
        .await
        .map_err(|reason| ScenarioError::Refused {
            what: what.to_owned(),
            reason,
        })
}

/// Removes the `kind` resource `name` from istiod-lite and waits until the proxy ACKs the delta
/// response that removes it.
pub async fn remove(
    mesh: &WaypointMesh,
    kind: ResourceKind,
    name: &str,
) -> Result<(), ScenarioError> {
    let type_url = kind.type_url();
    let before = live_type(&mesh.istiod.book.connections().await, type_url).unwrap_or_default();
    mesh.istiod.remove(kind, name).await;
    await_answer(mesh, type_url, &before, &format!("removing {name}")).await
}

/// Waits for the proxy's next answer on `type_url` after `before`: an ACK of the version sent,
/// or a NACK (an error).
async fn await_answer(
    mesh: &WaypointMesh,
    type_url: &str,
    before: &TypeStatus,
    what: &str,
) -> Result<(), ScenarioError> {
    let answered = mesh
        .istiod
        .book
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
        Err(conns) => {
            return Err(ScenarioError::NoAck {
                what: what.to_owned(),
                after: ACK_WAIT,
                state: format!("{:?}", live_type(&conns, type_url)),
                log: mesh.log_tail(40),
            });
        }
    };
    if status.nacks > before.nacks {
        return Err(ScenarioError::Nacked {
            what: what.to_owned(),
            message: status.last_nack.map(|n| n.message).unwrap_or_default(),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Mirroring: the second echo and its port
// ---------------------------------------------------------------------------------------------

/// A second echo server on the httpbin pod (its own port), recording every answer: where a
/// mirror policy sends copies whose answers the proxy discards. Stops when dropped.
#[derive(Debug)]
pub struct MirrorEcho {
    /// Its HTTP address on the pod.
    pub addr: SocketAddr,
    /// The answers it made, in order.
    pub journal: Arc<EchoJournal>,
    task: tokio::task::JoinHandle<()>,
}

impl MirrorEcho {
    /// Name the mirror echo reports in its answers.
    pub const NAME: &str = "httpbin-mirror";

    /// Binds and starts the echo on the pod's IP.
    pub async fn start(mesh: &WaypointMesh) -> Result<Self, ScenarioError> {
        let journal = EchoJournal::new();
        let echo = EchoServer::bind(&EchoConfig {
            name: Self::NAME.to_owned(),
            http: SocketAddr::V4(SocketAddrV4::new(mesh.addrs.pod_ip, 0)),
            grpc: None,
        })
        .await?
        .with_journal(journal.clone());
        let addr = echo.http_addr();
        let task = tokio::spawn(async move {
            if let Err(e) = echo.run().await {
                tracing::warn!("the mirror echo stopped: {e}");
            }
        });
        Ok(MirrorEcho {
            addr,
            journal,
            task,
        })
    }
}

impl Drop for MirrorEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A port of the pod that nothing listens on (bound by the OS, then released): a dead endpoint.
pub fn dead_pod_port(mesh: &WaypointMesh) -> Result<SocketAddr, ScenarioError> {
    std::net::TcpListener::bind((mesh.addrs.pod_ip, 0))
        .and_then(|l| l.local_addr())
        .map_err(|source| ScenarioError::Io {
            what: "a free port on the pod".to_owned(),
            source,
        })
}

/// Adds httpbin's port 8001 → `target` as istiod pushes a new service port: WDS, EDS (sent once
/// the cluster asks for it), CDS; then waits until the cluster has a healthy endpoint.
pub async fn add_mirror_port(
    mesh: &WaypointMesh,
    fixture: &Fixture,
    target: SocketAddr,
) -> Result<(), ScenarioError> {
    push(
        mesh,
        ResourceKind::Workload,
        &httpbin_workload_with_mirror_port(fixture, target.port())?,
        "the httpbin workload with port 8001",
    )
    .await?;
    push_unacked(
        mesh,
        ResourceKind::Endpoint,
        &mirror_endpoints(fixture, target),
        "the mirror port's endpoints",
    )
    .await?;
    push(
        mesh,
        ResourceKind::Cluster,
        &mirror_cluster(fixture),
        "the mirror port's cluster",
    )
    .await?;
    wait_stat(
        mesh,
        &format!("{MIRROR_STATS}.membership_healthy"),
        1,
        ACK_WAIT,
    )
    .await?;
    Ok(())
}

/// Takes port 8001 away again (after a listener without the mirror is in force): the cluster and
/// its EDS removed, the fixture's httpbin workload back.
pub async fn remove_mirror_port(
    mesh: &WaypointMesh,
    fixture: &Fixture,
) -> Result<(), ScenarioError> {
    remove(mesh, ResourceKind::Cluster, MIRROR_CLUSTER).await?;
    mesh.istiod
        .remove(ResourceKind::Endpoint, MIRROR_CLUSTER)
        .await;
    push(
        mesh,
        ResourceKind::Workload,
        &fixture.httpbin_workload(),
        "the fixture's httpbin workload",
    )
    .await
}

/// The `i`th mirrored POST body: a size from empty to 48 KiB, bytes that are not a pattern.
pub fn mirror_body(i: usize) -> Bytes {
    let len = [0usize, 1, 1_000, 17_000, 49_152][i % 5];
    Bytes::from(
        (0..len)
            .map(|k| ((k * 31 + i * 7 + k / 253) % 256) as u8)
            .collect::<Vec<u8>>(),
    )
}

/// `POST /mirror/<i>?seq=<i>` with [`mirror_body`]`(i)` and `x-mirror-seq: <i>`, over HTTP/1.1
/// for even `i` and h2c for odd ones; the echo reports the body's digest. Returns the path, the
/// body and the answer.
pub async fn mirrored_post(
    client: SocketAddr,
    i: usize,
) -> Result<(String, Bytes, Answer), ScenarioError> {
    let path = format!("/mirror/{i}?seq={i}");
    let body = mirror_body(i);
    let seq = i.to_string();
    let headers = [("x-echo-body-sha1", "1"), ("x-mirror-seq", seq.as_str())];
    let answer = if i.is_multiple_of(2) {
        send(client, "POST", &path, &headers, body.clone()).await?
    } else {
        send_h2(client, "POST", &path, &headers, body.clone()).await?
    };
    Ok((path, body, answer))
}

/// The sink's CONNECT streams to `authority`.
pub fn tunnels_to(mesh: &WaypointMesh, authority: &str) -> Vec<AcceptedStream> {
    mesh.sink_streams()
        .into_iter()
        .filter(|s| s.authority.as_deref() == Some(authority))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// JWT
// ---------------------------------------------------------------------------------------------

/// ES256 keys for the RequestAuthentication: the issuer's (its JWKS is inlined in the filter)
/// and a stranger's with the same `kid`, whose signatures must not verify.
pub struct Issuer {
    key: EcdsaKeyPair,
    stranger: EcdsaKeyPair,
    rng: SystemRandom,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The keys stay out of logs.
        f.debug_struct("Issuer").finish_non_exhaustive()
    }
}

impl Issuer {
    /// Two fresh P-256 keys.
    pub fn new() -> Result<Issuer, ScenarioError> {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let key = || {
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng)
                .map_err(|e| ScenarioError::Signing(format!("generate a P-256 key: {e}")))?;
            EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng)
                .map_err(|e| ScenarioError::Signing(format!("load the P-256 key: {e}")))
        };
        Ok(Issuer {
            key: key()?,
            stranger: key()?,
            rng,
        })
    }

    /// The JWKS a RequestAuthentication's `jwks` holds: the issuer's public key.
    pub fn jwks(&self) -> Json {
        // An uncompressed point: 0x04 || x || y.
        let point = self.key.public_key().as_ref();
        let coord = |range: std::ops::Range<usize>| {
            URL_SAFE_NO_PAD.encode(point.get(range).unwrap_or_default())
        };
        json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "issuer-1",
            "x": coord(1..33),
            "y": coord(33..65)
        }]})
    }

    /// A compact JWS of `claims`, signed by the issuer (or, `forged`, by the stranger).
    pub fn token(&self, claims: &Json, forged: bool) -> Result<String, ScenarioError> {
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": "issuer-1"});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let key = if forged { &self.stranger } else { &self.key };
        let sig = key
            .sign(&self.rng, input.as_bytes())
            .map_err(|e| ScenarioError::Signing(format!("sign the token: {e}")))?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())))
    }
}

/// The host of the JWKS server's ServiceEntry (`resolution: DNS`, one endpoint `localhost`).
pub const JWKS_HOST: &str = "jwks.mesh.local";
/// The path [`JwksServer`] serves the JWKS on.
pub const JWKS_PATH: &str = "/keys";

/// An HTTP server on 127.0.0.1 serving a JWKS on [`JWKS_PATH`] (404 elsewhere) and counting the
/// fetches, standing for the `jwksUri` of a RequestAuthentication; the waypoint reaches it
/// through the cluster istiod renders for the ServiceEntry `jwks.mesh.local` whose port is the
/// server's. Stops when dropped.
#[derive(Debug)]
pub struct JwksServer {
    addr: SocketAddr,
    fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    /// Binds 127.0.0.1 on a free port and serves `jwks`.
    pub async fn start(jwks: &Json) -> Result<Self, ScenarioError> {
        let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(|source| ScenarioError::Io {
                what: "binding the JWKS server".to_owned(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ScenarioError::Io {
            what: "the JWKS server's address".to_owned(),
            source,
        })?;
        let fetches = Arc::new(AtomicUsize::new(0));
        let body = Bytes::from(jwks.to_string());
        let counted = fetches.clone();
        let task = tokio::spawn(async move {
            // Connections live in the set, so that dropping the server ends them too.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                while conns.try_join_next().is_some() {}
                let (counted, body) = (counted.clone(), body.clone());
                conns.spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (counted, body) = (counted.clone(), body.clone());
                            async move {
                                let mut answer = http::Response::new(Full::new(Bytes::new()));
                                if req.uri().path() == JWKS_PATH {
                                    counted.fetch_add(1, Ordering::SeqCst);
                                    *answer.body_mut() = Full::new(body);
                                    answer.headers_mut().insert(
                                        http::header::CONTENT_TYPE,
                                        http::HeaderValue::from_static("application/json"),
                                    );
                                } else {
                                    *answer.status_mut() = StatusCode::NOT_FOUND;
                                }
                                Ok::<_, std::convert::Infallible>(answer)
                            }
                        });
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await
                    {
                        tracing::debug!("a JWKS server connection ended: {e}");
                    }
                });
            }
        });
        Ok(JwksServer {
            addr,
            fetches,
            task,
        })
    }

    /// The RequestAuthentication's `jwksUri`: the ServiceEntry host on the server's port.
    pub fn uri(&self) -> String {
        format!("http://{JWKS_HOST}:{}{JWKS_PATH}", self.addr.port())
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The cluster istiod finds for the `jwksUri` (`outbound|<port>||<host>`).
    pub fn cluster_name(&self) -> String {
        format!("outbound|{}||{JWKS_HOST}", self.addr.port())
    }

    /// How many times the JWKS has been fetched.
    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// The cluster istiod renders for the ServiceEntry (`resolution: DNS`, its one endpoint
    /// `localhost`, which /etc/hosts resolves to the server's 127.0.0.1): STRICT_DNS with
    /// istiod's DNS settings, default connection pool, load balancer and service metadata.
    pub fn cluster(&self) -> Json {
        let name = self.cluster_name();
        json!({
            "name": name,
            "type": "STRICT_DNS",
            "dns_lookup_family": "V4_ONLY",
            "dns_refresh_rate": "60s",
            "respect_dns_ttl": true,
            "typed_dns_resolver_config": {
                "name": "envoy.network.dns_resolver.cares",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
                    "udp_max_queries": 100
                }
            },
            "connect_timeout": "10s",
            "lb_policy": "LEAST_REQUEST",
            "common_lb_config": {},
            "circuit_breakers": {"thresholds": [{
                "max_connections": 4_294_967_295u64,
                "max_pending_requests": 4_294_967_295u64,
                "max_requests": 4_294_967_295u64,
                "max_retries": 4_294_967_295u64,
                "track_remaining": true
            }]},
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"locality": {}, "lb_endpoints": [{
                    "endpoint": {"address": {"socket_address": {
                        "address": "localhost",
                        "port_value": self.addr.port()
                    }}},
                    "load_balancing_weight": 1
                }]}]
            },
            "metadata": {"filter_metadata": {"istio": {"services": [
                {"host": JWKS_HOST, "name": JWKS_HOST, "namespace": "default"}
            ]}}}
        })
    }

    /// Pushes the cluster as istiod does when the ServiceEntry appears and waits until its
    /// first resolution gave it a healthy host.
    pub async fn install(&self, mesh: &WaypointMesh) -> Result<(), ScenarioError> {
        push(
            mesh,
            ResourceKind::Cluster,
            &self.cluster(),
            "the JWKS server's cluster",
        )
        .await?;
        wait_stat(
            mesh,
            &format!("cluster.{}.membership_healthy", self.cluster_name()),
            1,
            ACK_WAIT,
        )
        .await?;
        Ok(())
    }

    /// Removes the cluster again (after a listener that names it is gone).
    pub async fn uninstall(&self, mesh: &WaypointMesh) -> Result<(), ScenarioError> {
        remove(mesh, ResourceKind::Cluster, &self.cluster_name()).await
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Claims of a token from [`ISSUER`] for `alice`, expiring `ttl_secs` from now (negative: already
/// expired), with a `group` claim when given.
pub fn jwt_claims(group: Option<Json>, ttl_secs: i64) -> Json {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut c = json!({"iss": ISSUER, "sub": "alice", "iat": now - 60, "exp": now + ttl_secs});
    if let Some(g) = group {
        c["group"] = g;
    }
    c
}

// ---------------------------------------------------------------------------------------------
// Requests and observations
// ---------------------------------------------------------------------------------------------

/// What came back for one request.
#[derive(Debug)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// The response headers.
    pub headers: http::HeaderMap,
    /// The body (up to [`BODY_LIMIT`]).
    pub body: Bytes,
    /// From sending the request to the end of the body.
    pub took: Duration,
}

impl Answer {
    /// The echo's report, if this is a 200 from an echo.
    pub fn echo(&self) -> Result<EchoSeen, String> {
        if self.status != StatusCode::OK {
            return Err(format!("{}: {}", self.status, self.text()));
        }
        EchoSeen::parse(&self.body).map_err(|e| e.to_string())
    }

    /// A header's value, when it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request on a new connection to `addr` with `Host:` [`HOST`] (through the
/// forwarder each one is a new HBONE stream, so it sees the config in force when it starts).
/// `path` goes on the wire as given (`//admin` stays `//admin`).
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Answer, ScenarioError> {
    let fail = |reason: String| ScenarioError::Request {
        method: method.to_owned(),
        path: path.to_owned(),
        addr,
        reason,
    };
    let pq = PathAndQuery::try_from(path).map_err(|e| fail(format!("path: {e}")))?;
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(pq);
    let uri = Uri::from_parts(parts).map_err(|e| fail(format!("uri: {e}")))?;
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", HOST);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(body))
        .map_err(|e| fail(format!("request: {e}")))?;
    let started = Instant::now();
    let resp = http1_request(addr, req, REQUEST)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let (parts, body) = resp.into_parts();
    let body = read_body(body, BODY_LIMIT, REQUEST)
        .await
        .map_err(|e| fail(e.to_string()))?;
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
        took: started.elapsed(),
    })
}

/// [`send`] over h2c (prior knowledge) on a new connection to `addr`: `:authority` is [`HOST`].
pub async fn send_h2(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Answer, ScenarioError> {
    let started = Instant::now();
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .map_err(|e| format!("h2c handshake: {e}"))?;
        let driver = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{HOST}{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let (parts, body) = resp.into_parts();
        let body = read_body(body, BODY_LIMIT, REQUEST)
            .await
            .map_err(|e| e.to_string())?;
        driver.abort();
        Ok::<_, String>(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
            took: started.elapsed(),
        })
    };
    let fail = |reason: String| ScenarioError::Request {
        method: format!("h2c {method}"),
        path: path.to_owned(),
        addr,
        reason,
    };
    match tokio::time::timeout(REQUEST, exchange).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(fail(e)),
        Err(_) => Err(fail(format!("no answer within {REQUEST:?}"))),
    }
}

/// How many requests the echo has seen under `x-echo-key: key` (asked directly, not through the
/// waypoint; this request counts too).
pub async fn echo_count(mesh: &WaypointMesh, key: &str) -> Result<Option<u64>, ScenarioError> {
    let a = send(
        mesh.addrs.pod_app(),
        "GET",
        "/count",
        &[("x-echo-key", key)],
        Bytes::new(),
    )
    .await?;
    Ok(a.header("x-echo-request-count")
        .and_then(|c| c.parse().ok()))
}

/// The value of a counter or gauge in the proxy's `/stats` (0 when absent).
pub async fn stat(mesh: &WaypointMesh, name: &str) -> Result<u64, ScenarioError> {
    let (status, body) = mesh.admin_get("/stats").await?;
    if status != 200 {
        return Err(MeshError::Http(format!("GET /stats: {status}")).into());
    }
    Ok(body
        .lines()
        .find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(": ")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0))
}

/// Waits (up to `bound`) until the `/stats` value `name` is at least `want`; returns it.
pub async fn wait_stat(
    mesh: &WaypointMesh,
    name: &str,
    want: u64,
    bound: Duration,
) -> Result<u64, ScenarioError> {
    let found = mesh
        .wait_for(&format!("{name} >= {want}"), bound, || async move {
            match stat(mesh, name).await {
                Ok(v) if v >= want => Ok(v),
                Ok(v) => Err(format!("{name} = {v}")),
                Err(e) => Err(e.to_string()),
            }
        })
        .await?;
    Ok(found)
}

/// The sum of the `istio_requests_total` series whose labels contain every one of `labels`.
pub fn requests_total(text: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        .sum()
}

/// The `istio_requests_total` lines of an exposition (for messages).
pub fn istio_request_lines(text: &str) -> String {
    text.lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Scrapes the proxy's Prometheus stats until the `istio_requests_total` series with `labels`
/// sum to at least `want` (a stream is counted when it ends), or `bound` passes; returns the sum
/// seen last and the exposition.
pub async fn wait_requests_total(
    mesh: &WaypointMesh,
    labels: &[&str],
    want: f64,
    bound: Duration,
) -> Result<(f64, String), ScenarioError> {
    let deadline = Instant::now() + bound;
    loop {
        let (status, text) = mesh.admin_get("/stats/prometheus").await?;
        if status != 200 {
            return Err(MeshError::Http(format!("GET /stats/prometheus: {status}")).into());
        }
        let got = requests_total(&text, labels);
        if got >= want || Instant::now() > deadline {
            return Ok((got, text));
        }
        tokio::time::sleep(SCRAPE_INTERVAL).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Load balancing: httpbin with several pods
// ---------------------------------------------------------------------------------------------

/// Host part (within the mesh's /24) of the first pod of a [`ServicePods`]; pod `i` is this + `i`.
/// The harness uses `.2`, `.5`, `.7` and `.100`, so `.10` to `.89` are free for pods.
pub const FIRST_POD_HOST: u8 = 10;
/// Most pods a [`ServicePods`] runs (hosts [`FIRST_POD_HOST`] to `.89`).
pub const MAX_PODS: usize = 80;
/// The request header the consistent-hash scenarios hash on (DestinationRule
/// `consistentHash.httpHeaderName`).
pub const HASH_HEADER: &str = "x-user";
/// The `connect_originate` internal listener every waypoint endpoint is tunnelled through.
const CONNECT_ORIGINATE: &str = "connect_originate";

/// One pod to run: its name (what its echo reports in `x-echo-server`) and its EDS
/// `load_balancing_weight` (a WorkloadEntry `weight`; pods of a Deployment have 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// The pod's name.
    pub name: String,
    /// Its load-balancing weight.
    pub weight: u32,
}

impl PodSpec {
    /// A pod of weight 1.
    pub fn new(name: &str) -> Self {
        PodSpec::weighted(name, 1)
    }

    /// A pod of weight `weight`.
    pub fn weighted(name: &str, weight: u32) -> Self {
        PodSpec {
            name: name.to_owned(),
            weight,
        }
    }

    /// `prefix-0` .. `prefix-(n-1)`, weight 1 each.
    pub fn numbered(prefix: &str, n: usize) -> Vec<Self> {
        (0..n)
            .map(|i| PodSpec::new(&format!("{prefix}-{i}")))
            .collect()
    }
}

/// One pod of httpbin as ztunnel and the app would run it: its own loopback IP, an HBONE sink on
/// `IP:15008` presenting the httpbin identity (what the waypoint's `connect_originate` dials) and
/// an echo on `IP:8080` answering as the pod's name, with a journal of its JSON answers (how many
/// attempts reached it) and an [`EchoFault`] switch (to make it fail or slow down). Stops when
/// dropped.
pub struct Pod {
    /// What was asked for.
    pub spec: PodSpec,
    /// The pod IP.
    pub ip: std::net::Ipv4Addr,
    /// The pod's HBONE terminator.
    pub sink: HboneSink,
    /// Every JSON answer of its echo.
    pub journal: Arc<EchoJournal>,
    /// Its echo's fault switch.
    pub fault: Arc<EchoFault>,
    echo: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pod")
            .field("name", &self.spec.name)
            .field("ip", &self.ip)
            .field("weight", &self.spec.weight)
            .field("answered", &self.answered())
            .finish_non_exhaustive()
    }
}

impl Pod {
    /// The pod's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// `IP:8080`, the echo (the endpoint's target).
    pub fn app(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.ip, crate::waypoint::TARGET_PORT))
    }

    /// The pod's WDS uid.
    pub fn uid(&self) -> String {
        format!(
            "Kubernetes//Pod/{}/{}",
            crate::waypoint::NAMESPACE,
            self.spec.name
        )
    }

    /// The endpoint's address as the waypoint's `/clusters` prints it (Envoy's
    /// `envoy://<internal listener>/<endpoint id>`).
    pub fn host_address(&self) -> String {
        format!("envoy://{CONNECT_ORIGINATE}/{}", self.app())
    }

    /// How many requests its echo answered with JSON so far (every attempt that reached it, the
    /// ones its fault switch failed included).
    pub fn answered(&self) -> usize {
        self.journal.len()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.echo.abort();
    }
}

/// The pods of httpbin behind the waypoint, and the WDS and EDS istiod pushes for them.
#[derive(Debug)]
pub struct ServicePods {
    /// The pods, in the order asked for.
    pub pods: Vec<Pod>,
}

impl ServicePods {
    /// Starts one [`Pod`] per spec on `127.S.T.(FIRST_POD_HOST + i)` of `mesh`'s /24, each pod's
    /// sink presenting the httpbin identity. Nothing is pushed yet: see [`ServicePods::install`].
    pub async fn start(mesh: &WaypointMesh, specs: &[PodSpec]) -> Result<Self, ScenarioError> {
        if specs.is_empty() || specs.len() > MAX_PODS {
            return Err(fixture_err(format!(
                "{} pods asked for: between 1 and {MAX_PODS} fit the /24",
                specs.len()
            )));
        }
        let [a, b, c, _] = mesh.addrs.pod_ip.octets();
        let mut pods = Vec::with_capacity(specs.len());
        for (i, spec) in (0u8..).zip(specs) {
            let ip = std::net::Ipv4Addr::new(a, b, c, FIRST_POD_HOST + i);
            let sink = HboneSink::start(SinkConfig::new(
                SocketAddr::V4(SocketAddrV4::new(ip, crate::hbone::HBONE_PORT)),
                mesh.httpbin.clone(),
            ))
            .await
            .map_err(MeshError::from)?;
            let journal = EchoJournal::new();
            let fault = EchoFault::new();
            let echo = EchoServer::bind(&EchoConfig {
                name: spec.name.clone(),
                http: SocketAddr::V4(SocketAddrV4::new(ip, crate::waypoint::TARGET_PORT)),
                grpc: None,
            })
            .await?
            .with_journal(journal.clone())
            .with_fault(fault.clone());
            let name = spec.name.clone();
            let echo = tokio::spawn(async move {
                if let Err(e) = echo.run().await {
                    tracing::warn!(pod = %name, "a pod's echo stopped: {e}");
                }
            });
            pods.push(Pod {
                spec: spec.clone(),
                ip,
                sink,
                journal,
                fault,
                echo,
            });
        }
        Ok(ServicePods { pods })
    }

    /// The pod named `name`.
    pub fn pod(&self, name: &str) -> Result<&Pod, ScenarioError> {
        self.pods
            .iter()
            .find(|p| p.spec.name == name)
            .ok_or_else(|| fixture_err(format!("no pod '{name}'")))
    }

    /// Every pod.
    pub fn all(&self) -> Vec<&Pod> {
        self.pods.iter().collect()
    }

    /// How many JSON answers each pod's echo gave so far, by pod name.
    pub fn answered(&self) -> std::collections::BTreeMap<String, usize> {
        self.pods
            .iter()
            .map(|p| (p.spec.name.clone(), p.answered()))
            .collect()
    }

    /// Switches every pod's fault off.
    pub fn clear_faults(&self) {
        for p in &self.pods {
            p.fault.clear();
        }
    }

    /// Pushes what istiod pushes when httpbin's pods are these: one WDS workload per pod, then the
    /// service cluster's EDS listing every pod (the fixture's single httpbin endpoint replaced);
    /// waits for each ACK and until the waypoint lists exactly these hosts.
    pub async fn install(
        &self,
        mesh: &WaypointMesh,
        fixture: &Fixture,
    ) -> Result<(), ScenarioError> {
        for pod in &self.pods {
            push(
                mesh,
                ResourceKind::Workload,
                &pod_workload(fixture, pod),
                &format!("the workload of pod {}", pod.spec.name),
            )
            .await?;
        }
        self.set_endpoints(mesh, fixture, &self.all()).await
    }

    /// Pushes the service cluster's EDS with only `pods` (as istiod does when the others go
    /// away), waits for the ACK and until the waypoint lists exactly their hosts.
    pub async fn set_endpoints(
        &self,
        mesh: &WaypointMesh,
        fixture: &Fixture,
        pods: &[&Pod],
    ) -> Result<(), ScenarioError> {
        push(
            mesh,
            ResourceKind::Endpoint,
            &pod_endpoints(fixture, pods),
            &format!("the service's EDS with {} pods", pods.len()),
        )
        .await?;
        let want: std::collections::BTreeSet<String> =
            pods.iter().map(|p| p.host_address()).collect();
        wait_cluster_hosts(mesh, &want, ACK_WAIT).await
    }

    /// Gives the service back its fixture pod, as istiod pushes when these pods go away: the
    /// fixture's EDS (waiting until the waypoint lists only the fixture's host), then each pod's
    /// WDS entry removed. Every pod's fault is switched off first.
    pub async fn uninstall(
        &self,
        mesh: &WaypointMesh,
        fixture: &Fixture,
    ) -> Result<(), ScenarioError> {
        self.clear_faults();
        push(
            mesh,
            ResourceKind::Endpoint,
            &fixture.vip_endpoints(),
            "the fixture's EDS of the service",
        )
        .await?;
        let fixture_host = format!(
            "envoy://{CONNECT_ORIGINATE}/{}:{}",
            mesh.addrs.pod_ip,
            crate::waypoint::TARGET_PORT
        );
        wait_cluster_hosts(mesh, &std::iter::once(fixture_host).collect(), ACK_WAIT).await?;
        for pod in &self.pods {
            remove(mesh, ResourceKind::Workload, &pod.uid()).await?;
        }
        Ok(())
    }
}

/// The WDS entry istiod (the ambient index) sends for `pod`: the fixture's httpbin pod with the
/// pod's uid, name and address.
pub fn pod_workload(fixture: &Fixture, pod: &Pod) -> Json {
    let mut w = fixture.httpbin_workload();
    w["uid"] = json!(pod.uid());
    w["name"] = json!(pod.spec.name);
    w["addresses"] = json!([base64::engine::general_purpose::STANDARD.encode(pod.ip.octets())]);
    w
}

/// The service cluster's EDS as istiod renders it for a waypoint with `pods` behind the service:
/// one `lb_endpoint` per pod in one locality, each tunnelled through `connect_originate` (internal
/// address `endpoint_id` and `original_dst` metadata `local` = `podIP:8080`), `HEALTHY`, with the
/// pod's weight and `istio.workload` metadata.
pub fn pod_endpoints(fixture: &Fixture, pods: &[&Pod]) -> Json {
    let mut e = fixture.vip_endpoints();
    let template = e["endpoints"][0]["lb_endpoints"][0].clone();
    let lb_endpoints: Vec<Json> = pods
        .iter()
        .map(|pod| {
            let target = pod.app().to_string();
            let mut lb = template.clone();
            lb["endpoint"]["address"]["envoy_internal_address"] = json!({
                "server_listener_name": CONNECT_ORIGINATE,
                "endpoint_id": target
            });
            lb["metadata"]["filter_metadata"]["envoy.filters.listener.original_dst"]["local"] =
                json!(target);
            lb["load_balancing_weight"] = json!(pod.spec.weight);
            lb["health_status"] = json!("HEALTHY");
            lb
        })
        .collect();
    e["endpoints"][0]["lb_endpoints"] = json!(lb_endpoints);
    e
}

/// The hosts of the service cluster as the waypoint's `/clusters` lists them: address
/// ([`Pod::host_address`]) → health flags (`healthy`, `/failed_outlier_check`, ...).
pub async fn cluster_hosts(
    mesh: &WaypointMesh,
) -> Result<std::collections::BTreeMap<String, String>, ScenarioError> {
    let (status, body) = mesh.admin_get("/clusters").await?;
    if status != 200 {
        return Err(MeshError::Http(format!("GET /clusters: {status}")).into());
    }
    let prefix = format!("{VIP_CLUSTER}::");
    Ok(body
        .lines()
        .filter_map(|l| {
            let (addr, flags) = l.strip_prefix(&prefix)?.rsplit_once("::health_flags::")?;
            Some((addr.to_owned(), flags.trim().to_owned()))
        })
        .collect())
}

/// Waits (up to `bound`) until `/clusters` lists exactly the hosts `want` for the service.
pub async fn wait_cluster_hosts(
    mesh: &WaypointMesh,
    want: &std::collections::BTreeSet<String>,
    bound: Duration,
) -> Result<(), ScenarioError> {
    mesh.wait_for(
        &format!("/clusters to list the service's {} hosts", want.len()),
        bound,
        || async move {
            let hosts = cluster_hosts(mesh).await.map_err(|e| e.to_string())?;
            if hosts.keys().eq(want.iter()) {
                Ok(())
            } else {
                Err(format!("listed: {:?}", hosts.keys().collect::<Vec<_>>()))
            }
        },
    )
    .await?;
    Ok(())
}

/// A DestinationRule's `trafficPolicy.loadBalancer`, as istiod's `applyLoadBalancer` /
/// `ApplyRingHashLoadBalancer` set the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadBalancer {
    /// `simple: ROUND_ROBIN`: `lb_policy` ROUND_ROBIN, the enum's zero, which istiod's proto3
    /// JSON leaves out.
    RoundRobin,
    /// `simple: LEAST_REQUEST`, and istiod's default without a DestinationRule.
    LeastRequest,
    /// `consistentHash: {httpHeaderName: x-user, ringHash: {minimumRingSize: N}}`: RING_HASH with
    /// `ring_hash_lb_config.minimum_ring_size` (left out when 0).
    RingHash {
        /// `minimumRingSize`.
        minimum_ring_size: u64,
    },
    /// `consistentHash: {httpHeaderName: x-user, maglev: {tableSize: N}}`: MAGLEV with
    /// `maglev_lb_config.table_size` (left out when 0: Envoy's 65537).
    Maglev {
        /// `tableSize`.
        table_size: u64,
    },
}

impl LoadBalancer {
    /// Whether the policy hashes requests (the route then carries the DR's `hash_policy`).
    pub fn is_consistent_hash(self) -> bool {
        matches!(
            self,
            LoadBalancer::RingHash { .. } | LoadBalancer::Maglev { .. }
        )
    }
}

/// A DestinationRule's `trafficPolicy.outlierDetection` (`consecutive5xxErrors`, `interval`,
/// `baseEjectionTime`, `maxEjectionPercent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierPolicy {
    /// `consecutive5xxErrors`.
    pub consecutive_5xx: u32,
    /// `interval`.
    pub interval: Duration,
    /// `baseEjectionTime`.
    pub base_ejection_time: Duration,
    /// `maxEjectionPercent`.
    pub max_ejection_percent: u32,
}

/// A duration as proto3 JSON (`"1s"`, `"0.5s"`).
fn duration_json(d: Duration) -> Json {
    json!(format!("{}s", d.as_secs_f64()))
}

/// The service cluster with a DestinationRule's traffic policy applied as istiod does:
/// `applyLoadBalancer` for `lb`, and for `outlier` `applyOutlierDetection` (success-rate ejection
/// off, `consecutive_5xx` enforced at 100 %, interval, base ejection time, max ejection percent,
/// and `common_lb_config.healthy_panic_threshold` set to `minHealthPercent` 0, which proto3 JSON
/// writes as `{}`); the DR named in the cluster metadata.
pub fn dr_cluster(fixture: &Fixture, lb: LoadBalancer, outlier: Option<&OutlierPolicy>) -> Json {
    let mut c = fixture.vip_cluster();
    if let Some(o) = c.as_object_mut() {
        o.remove("lb_policy");
        o.remove("ring_hash_lb_config");
        o.remove("maglev_lb_config");
    }
    match lb {
        LoadBalancer::RoundRobin => {}
        LoadBalancer::LeastRequest => c["lb_policy"] = json!("LEAST_REQUEST"),
        LoadBalancer::RingHash { minimum_ring_size } => {
            c["lb_policy"] = json!("RING_HASH");
            if minimum_ring_size > 0 {
                // uint64 wrappers are strings in proto3 JSON.
                c["ring_hash_lb_config"] =
                    json!({"minimum_ring_size": minimum_ring_size.to_string()});
            }
        }
        LoadBalancer::Maglev { table_size } => {
            c["lb_policy"] = json!("MAGLEV");
            if table_size > 0 {
                c["maglev_lb_config"] = json!({"table_size": table_size.to_string()});
            }
        }
    }
    if let Some(o) = outlier {
        c["outlier_detection"] = json!({
            "enforcing_success_rate": 0,
            "consecutive_5xx": o.consecutive_5xx,
            "enforcing_consecutive_5xx": if o.consecutive_5xx > 0 { 100 } else { 0 },
            "interval": duration_json(o.interval),
            "base_ejection_time": duration_json(o.base_ejection_time),
            "max_ejection_percent": o.max_ejection_percent
        });
        c["common_lb_config"]["healthy_panic_threshold"] = json!({});
    }
    c["metadata"]["filter_metadata"]["istio"]["config"] = json!(DR_CONFIG);
    c
}

/// `retry.ConvertPolicy` for `retries: {attempts: <attempts>, retryOn: <retry_on>}` (no status
/// codes in `retryOn`): the mesh default with previous-hosts predicate, `num_retries` and
/// `retry_on` replaced.
pub fn retries_policy(retry_on: &str, attempts: u32) -> Json {
    let mut p = vs_retry_policy(retry_on, &[]);
    p["num_retries"] = json!(attempts);
    p
}

/// `main_internal` for a VirtualService with one catch-all route to httpbin:
///
/// ```yaml
/// http:
/// - {name: default-route, retries: <retries>, route: [{destination: {host: httpbin}}]}
/// ```
///
/// `retries` `None` leaves istiod's mesh default, or with `hash_header` (a DestinationRule
/// `consistentHash.httpHeaderName` for the service) its consistent-hash variant without the
/// previous-hosts predicate (`DefaultConsistentHashPolicy`, so that retries stay on the key's
/// host), and the route hashes on the header. As in [`vs_listener`], the virtual host also gets
/// `include_request_attempt_count` so that the echo sees `x-envoy-attempt-count`.
pub fn lb_listener(
    fixture: &Fixture,
    retries: Option<Json>,
    hash_header: Option<&str>,
) -> Result<Json, ScenarioError> {
    let mut l = fixture.main_internal();
    let vhost = service_vhost(service_hcm(&mut l)?)?;
    let default = default_route(vhost)?;
    let mut route = vs_route(&default, "default-route", "/", retries.clone());
    if let Some(header) = hash_header {
        if retries.is_none()
            && let Some(policy) = route["route"]["retry_policy"].as_object_mut()
        {
            policy.remove("retry_host_predicate");
        }
        route["route"]["hash_policy"] = json!([{"header": {"header_name": header}}]);
    }
    vhost["routes"] = json!([route]);
    vhost["include_request_attempt_count"] = json!(true);
    Ok(l)
}

/// One request of an [`h2c_batch`]: its path and extra headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchRequest {
    /// Path and query.
    pub path: String,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
}

impl BatchRequest {
    /// `GET path` without extra headers.
    pub fn get(path: &str) -> Self {
        BatchRequest {
            path: path.to_owned(),
            headers: Vec::new(),
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
}

/// Sends `requests` as GETs over one h2c connection to `client` (through the forwarder that is one
/// HBONE stream to the waypoint, every request a stream of it), keeping `concurrency` in flight
/// (a new request starts as soon as any answer is complete, so a slow answer does not idle the
/// others); returns the answers in the order of `requests`. Each request is bounded by
/// [`REQUEST`].
pub async fn h2c_batch(
    client: SocketAddr,
    requests: &[BatchRequest],
    concurrency: usize,
) -> Result<Vec<Answer>, ScenarioError> {
    use futures::{StreamExt as _, stream};
    let fail = |path: &str, reason: String| ScenarioError::Request {
        method: "h2c GET".to_owned(),
        path: path.to_owned(),
        addr: client,
        reason,
    };
    let tcp = tokio::time::timeout(REQUEST, tokio::net::TcpStream::connect(client))
        .await
        .map_err(|_| fail("(connect)", format!("no connection within {REQUEST:?}")))?
        .map_err(|e| fail("(connect)", format!("connect: {e}")))?;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| fail("(handshake)", format!("h2c handshake: {e}")))?;
    let driver = tokio::spawn(conn);
    let mut answers: Vec<(usize, Result<Answer, ScenarioError>)> =
        stream::iter(requests.iter().enumerate())
            .map(|(i, r)| {
                let mut sender = sender.clone();
                async move {
                    let started = Instant::now();
                    let exchange = async {
                        let mut req = Request::builder()
                            .method("GET")
                            .uri(format!("http://{HOST}{}", r.path));
                        for (k, v) in &r.headers {
                            req = req.header(k.as_str(), v.as_str());
                        }
                        let req = req
                            .body(Full::new(Bytes::new()))
                            .map_err(|e| format!("request: {e}"))?;
                        let resp = sender
                            .send_request(req)
                            .await
                            .map_err(|e| format!("request: {e}"))?;
                        let (parts, body) = resp.into_parts();
                        let body = read_body(body, BODY_LIMIT, REQUEST)
                            .await
                            .map_err(|e| e.to_string())?;
                        Ok::<_, String>(Answer {
                            status: parts.status,
                            headers: parts.headers,
                            body,
                            took: started.elapsed(),
                        })
                    };
                    let answer = match tokio::time::timeout(REQUEST, exchange).await {
                        Ok(Ok(a)) => Ok(a),
                        Ok(Err(e)) => Err(fail(&r.path, e)),
                        Err(_) => Err(fail(&r.path, format!("no answer within {REQUEST:?}"))),
                    };
                    (i, answer)
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
    driver.abort();
    answers.sort_by_key(|(i, _)| *i);
    answers.into_iter().map(|(_, a)| a).collect()
}

/// How answers spread: per answering echo (`x-echo-server`, any status) and per status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Answers per echo name; answers without the header (the waypoint's own) are not counted.
    pub by_server: std::collections::BTreeMap<String, usize>,
    /// Answers per status.
    pub by_status: std::collections::BTreeMap<u16, usize>,
}

impl Tally {
    /// Counts `answers`.
    pub fn of(answers: &[Answer]) -> Self {
        let mut t = Tally::default();
        for a in answers {
            *t.by_status.entry(a.status.as_u16()).or_default() += 1;
            if let Some(server) = a.header(crate::echo::SERVER_HEADER) {
                *t.by_server.entry(server.to_owned()).or_default() += 1;
            }
        }
        t
    }

    /// Answers from the echo `server`.
    pub fn from(&self, server: &str) -> usize {
        self.by_server.get(server).copied().unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------
// Session affinity, path templates, custom metrics
// ---------------------------------------------------------------------------------------------

/// A DestinationRule `consistentHash.httpCookie: {name, ttl, path}` as istiod's
/// `consistentHashToHashPolicy` puts it on a route: one `cookie` hash policy with the name, the
/// ttl and the path (left out when empty, as proto3 JSON leaves out an empty string).
pub fn cookie_hash_policy(name: &str, ttl: Duration, path: &str) -> Json {
    let mut cookie = json!({"name": name, "ttl": duration_json(ttl)});
    if !path.is_empty() {
        cookie["path"] = json!(path);
    }
    json!([{ "cookie": cookie }])
}

/// `main_internal` for a DestinationRule `consistentHash.httpCookie` on httpbin together with a
/// VirtualService (istiod puts the DR's hash policy on the waypoint's route only when one
/// exists): [`lb_listener`]'s consistent-hash route (istiod's retries without the previous-hosts
/// predicate), hashing on the cookie of [`cookie_hash_policy`].
pub fn cookie_listener(
    fixture: &Fixture,
    name: &str,
    ttl: Duration,
    path: &str,
) -> Result<Json, ScenarioError> {
    let mut l = lb_listener(fixture, None, Some(HASH_HEADER))?;
    let vhost = service_vhost(service_hcm(&mut l)?)?;
    let route = &mut vhost["routes"][0]["route"];
    if !route.is_object() {
        return Err(fixture_err("the VirtualService's route has no action"));
    }
    route["hash_policy"] = cookie_hash_policy(name, ttl, path);
    Ok(l)
}

/// Istio's path-template operators in AuthorizationPolicy paths (`security.MatchOneTemplate`,
/// `security.MatchAnyTemplate`).
const MATCH_ONE_TEMPLATE: &str = "{*}";
const MATCH_ANY_TEMPLATE: &str = "{**}";

/// One AuthorizationPolicy `to.operation.paths` entry as istiod's `pathGenerator` renders it: a
/// path with `{*}` or `{**}` becomes `Permission.uri_template` (`permissionPathTemplate`: the
/// extension named `uri-template` with `PathTemplateMatcher`'s `UriTemplateMatchConfig`, `{*}`
/// rewritten to `*` and `{**}` to `**`); a path without wildcards an exact `url_path`. Istio's
/// `*` prefix/suffix forms are not rendered here: they are refused.
pub fn path_permission(path: &str) -> Result<Json, ScenarioError> {
    if path.contains(MATCH_ONE_TEMPLATE) || path.contains(MATCH_ANY_TEMPLATE) {
        let template = path
            .replace(MATCH_ANY_TEMPLATE, "**")
            .replace(MATCH_ONE_TEMPLATE, "*");
        return Ok(json!({"uri_template": {
            "name": "uri-template",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig",
                "path_template": template
            }
        }}));
    }
    if path.contains('*') {
        return Err(fixture_err(format!(
            "path {path:?}: only exact paths and {{*}}/{{**}} templates are rendered"
        )));
    }
    Ok(json!({"url_path": {"path": {"exact": path}}}))
}

/// `main_internal` with one ALLOW AuthorizationPolicy `policy` on the service allowing `paths`
/// from any source:
///
/// ```yaml
/// spec: {targetRefs: [{kind: Service, name: httpbin}], action: ALLOW,
///        rules: [{to: [{operation: {paths: <paths>}}]}]}
/// ```
///
/// The paths are OR-ed inside the rule's one AND (istiod's `and_rules[or_rules[...]]`), each as
/// [`path_permission`] renders it; the RBAC filter goes ahead of the fixture's filters and the
/// route config is the fixture's (no VirtualService).
pub fn path_policy_listener(
    fixture: &Fixture,
    policy: &str,
    paths: &[&str],
) -> Result<Json, ScenarioError> {
    let rules = paths
        .iter()
        .map(|p| path_permission(p))
        .collect::<Result<Vec<_>, _>>()?;
    let mut l = fixture.main_internal();
    let hcm = service_hcm(&mut l)?;
    let allow = rbac_filter(
        None,
        &format!("ns[default]-policy[{policy}]-rule[0]"),
        json!([{"and_rules": {"rules": [{"or_rules": {"rules": rules}}]}}]),
        json!([{"and_ids": {"ids": [{"any": true}]}}]),
    );
    http_filters(hcm)?.insert(0, allow);
    Ok(l)
}

/// `main_internal` with the `stats.PluginConfig` of the service chain's HTTP `istio.stats` filter
/// changed by `patch`, as an EnvoyFilter patch (custom metric `definitions`) or the Telemetry API
/// (`metrics` overrides) changes it.
pub fn istio_stats_listener(
    fixture: &Fixture,
    patch: impl FnOnce(&mut Json),
) -> Result<Json, ScenarioError> {
    let mut l = fixture.main_internal();
    let filter = http_filters(service_hcm(&mut l)?)?
        .iter_mut()
        .find(|f| f["name"] == "istio.stats")
        .ok_or_else(|| fixture_err("the service HCM has no istio.stats filter"))?;
    patch(&mut filter["typed_config"]);
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_is_per_million() {
        assert_eq!(
            percent(50.0),
            json!({"numerator": 500_000, "denominator": "MILLION"})
        );
        assert_eq!(percent(0.1)["numerator"], 1_000);
    }

    #[test]
    fn fault_config_wraps_the_fault() {
        let c = fault_config(json!({"abort": {"http_status": 503}}));
        let f = &c["envoy.filters.http.fault"];
        assert_eq!(
            f["@type"],
            "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
        );
        assert_eq!(f["abort"]["http_status"], 503);
    }

    #[test]
    fn requests_total_sums_matching_series() {
        let text = "istio_requests_total{response_code=\"503\",response_flags=\"FI\"} 3\n\
                    istio_requests_total{response_code=\"200\",response_flags=\"-\"} 5\n\
                    istio_requests_total{response_code=\"503\",response_flags=\"FI\",x=\"y\"} 2\n";
        assert_eq!(requests_total(text, &["response_flags=\"FI\""]), 5.0);
        assert_eq!(requests_total(text, &["response_code=\"200\""]), 5.0);
        assert_eq!(requests_total(text, &["response_code=\"404\""]), 0.0);
    }

    fn fixture() -> Fixture {
        Fixture::for_addrs(&crate::waypoint::MeshAddrs::in_subnet(23, 4)).expect("the fixture")
    }

    #[test]
    fn dr_cluster_renders_istiods_load_balancer_shapes() {
        let f = fixture();
        let rr = dr_cluster(&f, LoadBalancer::RoundRobin, None);
        // ROUND_ROBIN is the enum's zero: proto3 JSON leaves it out.
        assert!(rr.get("lb_policy").is_none(), "{rr}");
        assert_eq!(
            rr["metadata"]["filter_metadata"]["istio"]["config"],
            DR_CONFIG
        );
        assert!(rr.get("outlier_detection").is_none());
        assert_eq!(
            dr_cluster(&f, LoadBalancer::LeastRequest, None)["lb_policy"],
            "LEAST_REQUEST"
        );
        let ring = dr_cluster(
            &f,
            LoadBalancer::RingHash {
                minimum_ring_size: 1024,
            },
            None,
        );
        assert_eq!(ring["lb_policy"], "RING_HASH");
        assert_eq!(ring["ring_hash_lb_config"]["minimum_ring_size"], "1024");
        let maglev = dr_cluster(&f, LoadBalancer::Maglev { table_size: 0 }, None);
        assert_eq!(maglev["lb_policy"], "MAGLEV");
        assert!(maglev.get("maglev_lb_config").is_none(), "{maglev}");
        assert_eq!(
            dr_cluster(&f, LoadBalancer::Maglev { table_size: 251 }, None)["maglev_lb_config"]["table_size"],
            "251"
        );
    }

    #[test]
    fn dr_cluster_renders_istiods_outlier_detection() {
        let outlier = OutlierPolicy {
            consecutive_5xx: 3,
            interval: Duration::from_secs(1),
            base_ejection_time: Duration::from_millis(500),
            max_ejection_percent: 100,
        };
        let c = dr_cluster(&fixture(), LoadBalancer::RoundRobin, Some(&outlier));
        assert_eq!(
            c["outlier_detection"],
            json!({
                "enforcing_success_rate": 0,
                "consecutive_5xx": 3,
                "enforcing_consecutive_5xx": 100,
                "interval": "1s",
                "base_ejection_time": "0.5s",
                "max_ejection_percent": 100
            })
        );
        // minHealthPercent 0 is written as an empty Percent.
        assert_eq!(c["common_lb_config"]["healthy_panic_threshold"], json!({}));
    }

    #[test]
    fn lb_listener_hashes_without_the_previous_hosts_predicate() {
        let f = fixture();
        let mut l = lb_listener(&f, None, Some(HASH_HEADER)).expect("a listener");
        let vhost = service_vhost(service_hcm(&mut l).expect("hcm"))
            .expect("vhost")
            .clone();
        let routes = vhost["routes"].as_array().expect("routes");
        assert_eq!(routes.len(), 1);
        let action = &routes[0]["route"];
        assert_eq!(
            action["hash_policy"],
            json!([{"header": {"header_name": HASH_HEADER}}])
        );
        assert!(action["retry_policy"].get("retry_host_predicate").is_none());
        assert_eq!(action["retry_policy"]["num_retries"], 2);
        assert_eq!(routes[0]["match"], json!({"prefix": "/"}));

        let mut l = lb_listener(&f, Some(retries_policy("5xx", 1)), None).expect("a listener");
        let vhost = service_vhost(service_hcm(&mut l).expect("hcm"))
            .expect("vhost")
            .clone();
        let policy = &vhost["routes"][0]["route"]["retry_policy"];
        assert_eq!(policy["retry_on"], "5xx");
        assert_eq!(policy["num_retries"], 1);
        assert_eq!(
            policy["retry_host_predicate"][0]["name"],
            "envoy.retry_host_predicates.previous_hosts"
        );
        assert!(vhost["routes"][0]["route"].get("hash_policy").is_none());
        assert_eq!(vhost["include_request_attempt_count"], true);
    }

    #[test]
    fn tally_counts_servers_and_statuses() {
        let answer = |status: u16, server: Option<&str>| {
            let mut headers = http::HeaderMap::new();
            if let Some(s) = server {
                headers.insert(
                    crate::echo::SERVER_HEADER,
                    http::HeaderValue::from_str(s).expect("a header value"),
                );
            }
            Answer {
                status: StatusCode::from_u16(status).expect("a status"),
                headers,
                body: Bytes::new(),
                took: Duration::ZERO,
            }
        };
        let t = Tally::of(&[
            answer(200, Some("a")),
            answer(503, Some("a")),
            answer(200, Some("b")),
            answer(503, None),
        ]);
        assert_eq!(t.from("a"), 2);
        assert_eq!(t.from("b"), 1);
        assert_eq!(t.from("c"), 0);
        assert_eq!(t.by_status.get(&503), Some(&2));
        assert_eq!(t.by_status.get(&200), Some(&2));
    }

    #[test]
    fn cookie_listener_hashes_on_istios_cookie_policy() {
        let mut l = cookie_listener(&fixture(), "affinity", Duration::from_secs(60), "/")
            .expect("a listener");
        let vhost = service_vhost(service_hcm(&mut l).expect("hcm"))
            .expect("vhost")
            .clone();
        let action = &vhost["routes"][0]["route"];
        assert_eq!(
            action["hash_policy"],
            json!([{"cookie": {"name": "affinity", "ttl": "60s", "path": "/"}}])
        );
        assert!(action["retry_policy"].get("retry_host_predicate").is_none());
        // No path: proto3 JSON leaves the empty string out.
        assert_eq!(
            cookie_hash_policy("c", Duration::from_millis(1500), ""),
            json!([{"cookie": {"name": "c", "ttl": "1.5s"}}])
        );
    }

    #[test]
    fn path_templates_render_as_istios_uri_template_permissions() {
        let t = path_permission("/api/{*}/items/{**}").expect("a template");
        assert_eq!(t["uri_template"]["name"], "uri-template");
        assert_eq!(
            t["uri_template"]["typed_config"]["path_template"],
            "/api/*/items/**"
        );
        assert_eq!(
            path_permission("/admin").expect("exact"),
            json!({"url_path": {"path": {"exact": "/admin"}}})
        );
        assert!(path_permission("/admin*").is_err());

        let mut l =
            path_policy_listener(&fixture(), "api", &["/api/{*}/items", "/x"]).expect("a listener");
        let filters = http_filters(service_hcm(&mut l).expect("hcm"))
            .expect("filters")
            .clone();
        let rules = &filters[0]["typed_config"]["rules"];
        assert!(
            rules.get("action").is_none(),
            "ALLOW is the default: {rules}"
        );
        let or = &rules["policies"]["ns[default]-policy[api]-rule[0]"]["permissions"][0]["and_rules"]
            ["rules"][0]["or_rules"]["rules"];
        assert_eq!(or.as_array().map(Vec::len), Some(2), "{or}");
        assert_eq!(
            filters.last().map(|f| f["name"].clone()),
            Some(json!("envoy.filters.http.router"))
        );
    }

    #[test]
    fn istio_stats_listener_patches_the_http_stats_filter() {
        let mut l = istio_stats_listener(&fixture(), |c| {
            c["definitions"] = json!([{"name": "n", "value": "1", "type": "COUNTER"}]);
        })
        .expect("a listener");
        let filters = http_filters(service_hcm(&mut l).expect("hcm"))
            .expect("filters")
            .clone();
        let stats = filters
            .iter()
            .find(|f| f["name"] == "istio.stats")
            .expect("istio.stats");
        assert_eq!(stats["typed_config"]["definitions"][0]["name"], "n");
        assert_eq!(stats["typed_config"]["reporter"], "SERVER_GATEWAY");
    }

    #[test]
    fn tokens_verify_only_with_the_issuers_key() {
        let issuer = Issuer::new().expect("keys");
        let jwks = issuer.jwks();
        let key = &jwks["keys"][0];
        let coord = |c: &str| {
            URL_SAFE_NO_PAD
                .decode(key[c].as_str().expect("a coordinate"))
                .expect("base64url")
        };
        let mut point = vec![4u8];
        point.extend(coord("x"));
        point.extend(coord("y"));
        let public = signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point);
        for (forged, verifies) in [(false, true), (true, false)] {
            let token = issuer
                .token(&jwt_claims(Some(json!("admins")), 60), forged)
                .expect("a token");
            let (input, sig) = token.rsplit_once('.').expect("three parts");
            let sig = URL_SAFE_NO_PAD.decode(sig).expect("base64url signature");
            assert_eq!(
                public.verify(input.as_bytes(), &sig).is_ok(),
                verifies,
                "forged: {forged}"
            );
        }
    }

    #[tokio::test]
    async fn remote_jwks_listener_names_the_service_entry_cluster_and_the_server_counts_fetches() {
        let issuer = Issuer::new().expect("keys");
        let server = JwksServer::start(&issuer.jwks()).await.expect("server");
        let port = server.addr.port();
        let mut l = remote_jwks_listener(&fixture(), &server).expect("listener");
        let filters = http_filters(service_hcm(&mut l).expect("hcm")).expect("filters");
        assert_eq!(filters[0]["name"], JWT_FILTER);
        let provider = &filters[0]["typed_config"]["providers"]["origins-0"];
        assert!(provider.get("local_jwks").is_none(), "{provider}");
        assert_eq!(
            provider["remote_jwks"],
            json!({
                "http_uri": {
                    "uri": format!("http://jwks.mesh.local:{port}/keys"),
                    "cluster": format!("outbound|{port}||jwks.mesh.local"),
                    "timeout": "5s"
                },
                "cache_duration": "300s"
            })
        );
        let cluster = server.cluster();
        assert_eq!(cluster["name"], server.cluster_name());
        assert_eq!(cluster["type"], "STRICT_DNS");
        let address = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
            ["socket_address"];
        assert_eq!(address["address"], "localhost");
        assert_eq!(address["port_value"], port);

        assert_eq!(server.fetches(), 0);
        let keys = send(server.addr, "GET", JWKS_PATH, &[], Bytes::new())
            .await
            .expect("fetch");
        assert_eq!(keys.status, StatusCode::OK);
        assert_eq!(
            serde_json::from_slice::<Json>(&keys.body).expect("json"),
            issuer.jwks()
        );
        let other = send(server.addr, "GET", "/other", &[], Bytes::new())
            .await
            .expect("other");
        assert_eq!(other.status, StatusCode::NOT_FOUND);
        assert_eq!(server.fetches(), 1, "only JWKS_PATH counts");
    }

    #[test]
    fn ws_idle_listener_sets_the_ws_routes_idle_timeout_only() {
        let mut l = ws_idle_listener(&fixture(), Duration::from_millis(1500)).expect("listener");
        let vhost = service_vhost(service_hcm(&mut l).expect("hcm")).expect("vhost");
        let routes = vhost["routes"].as_array().expect("routes");
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0]["name"], "ws");
        assert_eq!(routes[0]["match"]["prefix"], "/ws");
        assert_eq!(routes[0]["route"]["idle_timeout"], "1.5s");
        assert_eq!(routes[1]["name"], "default");
        assert!(routes[1]["route"].get("idle_timeout").is_none());
    }
}
