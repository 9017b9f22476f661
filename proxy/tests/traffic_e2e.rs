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
//! * **timeouts** — VirtualService `timeout: 0.5s` (route `timeout` and `max_grpc_timeout`): a 2 s
//!   upstream gets 504 `upstream request timeout` at 0.5 s with flag `UT`, a fast one sees
//!   `x-envoy-expected-rq-timeout-ms: 500`; on istiod's default route (`timeout: 0s,
//!   max_grpc_timeout: 0s`) `grpc-timeout: 300m` cuts a gRPC request at 0.3 s and `2S` is passed
//!   on as `2000m`.
//! * **mirroring** — VirtualService `mirror: {port: 8001}` + `mirrorPercentage: 100` (route
//!   `request_mirror_policies` to the waypoint's `inbound-vip|8001|…` cluster, pushed with its EDS
//!   and WDS port): 20 POSTs (HTTP/1.1 and h2c) each reach a second echo on the pod, over HBONE
//!   as the waypoint, with authority `…svc.cluster.local-shadow:8000` and the same body (SHA-1);
//!   with the endpoint moved to a dead port the primaries answer exactly as before.
//! * **JWT** — RequestAuthentication (`jwt_authn` as `convertToEnvoyJwtConfig` builds it, inline
//!   JWKS of an ES256 key made here) + AuthorizationPolicy `when: request.auth.claims[group] =
//!   admins`: the claim (string or list) → 200, without it → 403, expired or forged → 401 with
//!   Envoy's reason and challenge, no token → 403; the fixture's listener restored after.
//! * **CORS** — VirtualService `corsPolicy` (per-route `CorsPolicy`): a preflight from the allowed
//!   origin is answered by the waypoint (never reaches the echo), another origin's is forwarded
//!   unmarked; simple requests get `Access-Control-Allow-Origin` / `-Expose-Headers` only from
//!   the allowed origin on the route with the policy.
//! * **local rate limit** — EnvoyFilter as in Istio's task (`TypedStruct` filter with a stat prefix
//!   only, the route's own 5-token bucket): 5 pass, then 429 `local_rate_limited` with
//!   `x-local-rate-limit: true` and `response_flags="RL"`; other routes pass.
//!
//! The pushed resources, the push-and-wait-for-ACK, token signing, the mirror's echo and the
//! request client are `waypoint_testbed::scenarios`, shared with the `mesh` report.
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
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use waypoint_proto::resource::ResourceKind;
use waypoint_shared::identity::SpiffeId;
use waypoint_testbed::{
    hbone::{ForwarderConfig, HboneForwarder, PeerMatch},
    scenarios::{
        self, ALLOWED_ORIGIN, Answer, FAULT_DELAY, Fixture, HOST, Issuer, MIRROR_STATS, MirrorEcho,
        OTHER_ORIGIN, SHADOW_HOST, ScenarioError, VIP_STATS, breaker_cluster, cors_listener,
        jwt_claims, jwt_listener, mirror_endpoints, mirror_listener, rate_limit_listener,
        rbac_listener, timeout_listener, tunnels_to, vs_listener,
    },
    waypoint::{ECHO_NAME, EchoSeen, MeshOptions, WAYPOINT_IDENTITY, WaypointMesh, read_body},
};

/// Bound for the waypoint to serve HBONE once the agent is ready.
const HBONE_READY: Duration = Duration::from_secs(30);
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
/// The requests that check the fault delay.
const DELAYED_REQUESTS: usize = 3;
/// The request that holds the circuit breaker's only slot, and the burst behind it.
const SLOW_MS: u64 = 4_000;
const BURST: usize = 9;
/// The retried POST body.
const RETRY_BODY_LEN: usize = 256 * 1024;
/// Requests mirrored to the live mirror, and sent while the mirror is a dead endpoint.
const MIRRORED: usize = 20;
const DEAD_MIRRORED: usize = 6;
/// Tokens of the rate-limited route's bucket (refilled once an hour: none come back in a run).
const RATE_LIMIT_TOKENS: usize = 5;
/// The VirtualService `timeout` of the `/timeout` route, and the upstream delay it cuts short.
const ROUTE_TIMEOUT: Duration = Duration::from_millis(500);
const SLOW_UPSTREAM_MS: &str = "2000";

fn agent_bin() -> PathBuf {
    waypoint_testbed::waypoint::agent_beside(Path::new(env!("CARGO_BIN_EXE_proxy")))
}

// ---------------------------------------------------------------------------------------------
// The shared scenarios (waypoint_testbed::scenarios), failing the test on errors
// ---------------------------------------------------------------------------------------------

/// The value of a scenario step, or the test fails with its error.
fn ok<T>(r: Result<T, ScenarioError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// Pushes `doc` and waits for the proxy's ACK; a NACK or no answer fails the test.
async fn push(mesh: &WaypointMesh, kind: ResourceKind, doc: &serde_json::Value, what: &str) {
    ok(scenarios::push(mesh, kind, doc, what).await);
}

/// [`scenarios::send`]; a failed exchange fails the test.
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Answer {
    ok(scenarios::send(addr, method, path, headers, body).await)
}

/// [`scenarios::send_h2`]; a failed exchange fails the test.
async fn send_h2(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Answer {
    ok(scenarios::send_h2(addr, method, path, headers, body).await)
}

/// An answer that must be the echo's 200.
trait Echoed {
    /// The echo's report; anything else fails the test with `what`.
    fn echoed(&self, what: &str) -> EchoSeen;
}

impl Echoed for Answer {
    fn echoed(&self, what: &str) -> EchoSeen {
        self.echo().unwrap_or_else(|e| panic!("{what}: {e}"))
    }
}

/// The value of a counter or gauge in the proxy's `/stats` (0 when absent).
async fn stat(mesh: &WaypointMesh, name: &str) -> u64 {
    ok(scenarios::stat(mesh, name).await)
}

/// Waits until the `/stats` value `name` is at least `want`; returns it.
async fn wait_stat(mesh: &WaypointMesh, name: &str, want: u64) -> u64 {
    ok(scenarios::wait_stat(mesh, name, want, OBSERVE).await)
}

/// Scrapes until the `istio_requests_total` series with `labels` sum to `want` (bounded).
async fn wait_requests_total(mesh: &WaypointMesh, labels: &[&str], want: f64) -> (f64, String) {
    ok(scenarios::wait_requests_total(mesh, labels, want, OBSERVE).await)
}

fn istio_request_lines(text: &str) -> String {
    scenarios::istio_request_lines(text)
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
    .echoed("the body sent to the echo directly");
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
    let seen = a.echoed("POST /retry/5xx (fails twice)");
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
    let seen = a.echoed("POST /retry/codes (503 twice)");
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
        let seen = a.echoed(&format!("GET /fault/delay/{i}"));
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
    assert_eq!(slow.echoed("the slow request").path, "/cb/slow");
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
        a.echoed("a request after the DestinationRule is gone");
    }
}

/// AuthorizationPolicies: ALLOW by principal, DENY by path under path normalisation.
async fn rbac(mesh: &WaypointMesh, fixture: &Fixture) {
    push(
        mesh,
        ResourceKind::Listener,
        &ok(rbac_listener(fixture)),
        "main_internal with the AuthorizationPolicies",
    )
    .await;
    let client = mesh.client_addr();

    // The sleep principal is allowed; istiod's waypoint host adds no attempt count.
    let a = send(client, "GET", "/get", &[], Bytes::new()).await;
    let seen = a.echoed("sleep GET /get");
    assert!(
        !seen.headers.contains_key("x-envoy-attempt-count"),
        "include_request_attempt_count is off on istiod's waypoint host: {:?}",
        seen.headers
    );
    // merge_slashes and normalize_path apply to what goes upstream, too.
    for path in ["//get", "/./get", "/x/../get", "/%67et"] {
        let a = send(client, "GET", path, &[], Bytes::new()).await;
        assert_eq!(
            a.echoed(&format!("sleep GET {path}")).path,
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
    a.echoed("sleep GET /admin/x (the policy names /admin exactly)");

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
        .echoed("sleep GET /get after the denial");
}

/// VirtualService `timeout`: a slow upstream is cut at the route timeout with 504 `upstream
/// request timeout` and flag `UT`; on istiod's default route (`timeout: 0s, max_grpc_timeout:
/// 0s`) a gRPC request's `grpc-timeout` is the limit, and is passed on to the upstream.
async fn timeouts(mesh: &WaypointMesh, fixture: &Fixture) {
    push(
        mesh,
        ResourceKind::Listener,
        &ok(timeout_listener(fixture, ROUTE_TIMEOUT)),
        "main_internal with the timeout VirtualService",
    )
    .await;
    let client = mesh.client_addr();
    // The gRPC call's timeout reaches its client as a trailers-only UNAVAILABLE (HTTP 200, as
    // Envoy shapes local replies to gRPC requests): count the flag alone.
    let ut = ["response_flags=\"UT\""];
    let (ut_before, _) = wait_requests_total(mesh, &ut, 0.0).await;
    let grpc = ("content-type", "application/grpc");

    let a = send(
        client,
        "GET",
        "/timeout/slow",
        &[("x-echo-delay-ms", SLOW_UPSTREAM_MS)],
        Bytes::new(),
    )
    .await;
    assert_eq!(
        (a.status, a.text().as_str()),
        (StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
        "a 2 s upstream on the route with the timeout"
    );
    assert!(
        a.took >= ROUTE_TIMEOUT && a.took < Duration::from_millis(1_500),
        "answered at the route timeout, not the upstream's: {:?}",
        a.took
    );
    let seen = send(client, "GET", "/timeout/fast", &[], Bytes::new())
        .await
        .echoed("a fast upstream on the route with the timeout");
    assert_eq!(
        seen.headers
            .get("x-envoy-expected-rq-timeout-ms")
            .map(String::as_str),
        Some("500"),
        "{:?}",
        seen.headers
    );

    // The default route: grpc-timeout is the route timeout.
    let a = send(
        client,
        "POST",
        "/grpc/slow",
        &[
            grpc,
            ("grpc-timeout", "300m"),
            ("x-echo-delay-ms", SLOW_UPSTREAM_MS),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let grpc_header = |name: &str| a.headers.get(name).and_then(|v| v.to_str().ok());
    assert_eq!(grpc_header("grpc-status"), Some("14"), "{:?}", a.headers);
    assert_eq!(
        grpc_header("grpc-message"),
        Some("upstream request timeout"),
        "{:?}",
        a.headers
    );
    assert!(a.body.is_empty(), "trailers-only: {}", a.text());
    assert!(
        a.took >= Duration::from_millis(300) && a.took < Duration::from_millis(1_500),
        "answered at the grpc-timeout: {:?}",
        a.took
    );
    let seen = send(
        client,
        "POST",
        "/grpc/fast",
        &[grpc, ("grpc-timeout", "2S")],
        Bytes::new(),
    )
    .await
    .echoed("a gRPC request within its grpc-timeout");
    assert_eq!(
        seen.headers.get("grpc-timeout").map(String::as_str),
        Some("2000m"),
        "{:?}",
        seen.headers
    );
    let (flagged, text) = wait_requests_total(mesh, &ut, ut_before + 2.0).await;
    assert_eq!(
        flagged,
        ut_before + 2.0,
        "istio_requests_total{{response_flags=\"UT\"}}:\n{}",
        istio_request_lines(&text)
    );

    push(
        mesh,
        ResourceKind::Listener,
        &fixture.main_internal(),
        "the fixture's main_internal",
    )
    .await;
}

/// VirtualService `mirror` + `mirrorPercentage: 100`: every request reaches a second echo on the
/// pod (port 8001 → its own target port, through the sink like any waypoint upstream) with the
/// `-shadow` host and the same body; with the mirror pointed at a dead endpoint the primary
/// answers stay the same.
async fn mirroring(mesh: &WaypointMesh, fixture: &Fixture) {
    let mirror = ok(MirrorEcho::start(mesh).await);
    let (mirror_addr, journal) = (mirror.addr, mirror.journal.clone());
    let dead = ok(scenarios::dead_pod_port(mesh));

    // The port as istiod pushes it (WDS, EDS, CDS), then the VirtualService's routes.
    ok(scenarios::add_mirror_port(mesh, fixture, mirror_addr).await);
    push(
        mesh,
        ResourceKind::Listener,
        &ok(mirror_listener(fixture)),
        "main_internal with the mirroring VirtualService",
    )
    .await;
    let client = mesh.client_addr();

    let mut primaries = Vec::new();
    for i in 0..MIRRORED {
        let (path, body, a) = ok(scenarios::mirrored_post(client, i).await);
        let seen = a.echoed(&format!("primary {i}"));
        assert_eq!(seen.server, ECHO_NAME, "primary {i} answered by httpbin");
        assert_eq!(seen.path, path, "primary {i}");
        assert_eq!(seen.body_len, body.len() as u64, "primary {i}");
        assert_eq!(
            seen.headers.get("host").map(String::as_str),
            Some(HOST),
            "primary {i}"
        );
        assert!(seen.body_sha1.is_some(), "primary {i}: the echo's digest");
        primaries.push(seen);
    }
    let entries = journal.wait_for(MIRRORED, OBSERVE).await;
    assert_eq!(
        entries.len(),
        MIRRORED,
        "mirrored requests at the mirror echo\n{}",
        mesh.log_tail(30)
    );
    let mut mirrored: BTreeMap<usize, EchoSeen> = BTreeMap::new();
    for e in &entries {
        let seen = EchoSeen::parse(e).unwrap_or_else(|e| panic!("a mirror journal entry: {e}"));
        let seq = seen
            .headers
            .get("x-mirror-seq")
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("a mirrored request without its sequence: {seen:?}"));
        assert!(
            mirrored.insert(seq, seen).is_none(),
            "request {seq} mirrored twice"
        );
    }
    for (i, primary) in primaries.iter().enumerate() {
        let m = mirrored
            .get(&i)
            .unwrap_or_else(|| panic!("request {i} was not mirrored: {mirrored:?}"));
        assert_eq!(
            m.headers.get("host").map(String::as_str),
            Some(SHADOW_HOST),
            "mirror {i}: the -shadow authority"
        );
        assert_eq!(m.listener, mirror_addr.to_string(), "mirror {i}");
        assert_eq!(
            (m.method.as_str(), m.path.as_str()),
            ("POST", primary.path.as_str()),
            "mirror {i}"
        );
        assert_eq!(m.body_len, primary.body_len, "mirror {i}: body length");
        assert_eq!(m.body_sha1, primary.body_sha1, "mirror {i}: the same body");
    }
    // The mirrors took the waypoint's way to the pod: HBONE as the waypoint, counted under the
    // mirror port's cluster.
    let tunnels = tunnels_to(mesh, &mirror_addr.to_string());
    assert!(!tunnels.is_empty(), "no HBONE stream to the mirror port");
    for t in &tunnels {
        assert_eq!(t.peer_identity, WAYPOINT_IDENTITY, "{t:?}");
        assert_eq!(t.status, 200, "{t:?}");
    }
    let total = wait_stat(
        mesh,
        &format!("{MIRROR_STATS}.upstream_rq_total"),
        MIRRORED as u64,
    )
    .await;
    assert_eq!(total, MIRRORED as u64, "{MIRROR_STATS}.upstream_rq_total");

    // The mirror port's endpoint moves to a port nothing listens on: the sink answers the
    // waypoint's CONNECTs with 503, and the primaries are answered exactly as before.
    push(
        mesh,
        ResourceKind::Endpoint,
        &mirror_endpoints(fixture, dead),
        "the mirror port's endpoints on a dead port",
    )
    .await;
    for (i, before) in primaries.iter().enumerate().take(DEAD_MIRRORED) {
        let (path, body, a) = ok(scenarios::mirrored_post(client, i).await);
        let seen = a.echoed(&format!("primary {i} with a dead mirror"));
        assert_eq!(
            (seen.server.as_str(), seen.path.as_str(), seen.body_len),
            (ECHO_NAME, path.as_str(), body.len() as u64),
            "primary {i} with a dead mirror"
        );
        assert_eq!(
            seen.body_sha1, before.body_sha1,
            "primary {i}: the same body"
        );
    }
    let dead_authority = dead.to_string();
    if let Err(e) = mesh
        .wait_for("the mirrors' CONNECTs to the dead port", OBSERVE, || {
            let found = tunnels_to(mesh, &dead_authority);
            async move {
                if found.len() >= DEAD_MIRRORED {
                    Ok(())
                } else {
                    Err(format!("{} CONNECTs: {found:?}", found.len()))
                }
            }
        })
        .await
    {
        panic!("{e}");
    }
    for t in tunnels_to(mesh, &dead_authority) {
        assert_eq!(t.status, 503, "the sink cannot reach a dead port: {t:?}");
    }
    assert_eq!(
        journal.len(),
        MIRRORED,
        "nothing more reached the live mirror"
    );
    drop(mirror);
}

/// RequestAuthentication + AuthorizationPolicy `request.auth.claims[group] = admins`: a valid
/// token with the claim passes, one without is denied by RBAC, an expired or forged token is
/// refused by jwt_authn, no token is denied by RBAC; then the original listener comes back.
async fn request_authentication(mesh: &WaypointMesh, fixture: &Fixture) {
    let issuer = ok(Issuer::new());
    push(
        mesh,
        ResourceKind::Listener,
        &ok(jwt_listener(fixture, &issuer.jwks())),
        "main_internal with the RequestAuthentication and the claim policy",
    )
    .await;
    let client = mesh.client_addr();
    let get = |path: &'static str, token: Option<String>| async move {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("authorization", a)])
            .unwrap_or_default();
        send(client, "GET", path, &headers, Bytes::new()).await
    };

    // The claim as a string and as a list holding it: admitted; the token is not sent on
    // (istiod leaves `forward` off unless forwardOriginalToken).
    for group in [json!("admins"), json!(["dev", "admins"])] {
        let t = ok(issuer.token(&jwt_claims(Some(group.clone()), 600), false));
        let seen = get("/jwt/admins", Some(t))
            .await
            .echoed(&format!("a valid token with group {group}"));
        assert_eq!(seen.path, "/jwt/admins");
        assert!(
            !seen.headers.contains_key("authorization"),
            "the token went upstream: {:?}",
            seen.headers
        );
    }
    // Valid tokens without the claim's value: authenticated, then denied by the policy.
    for group in [None, Some(json!("dev")), Some(json!(["dev", "ops"]))] {
        let t = ok(issuer.token(&jwt_claims(group.clone(), 600), false));
        let a = get("/jwt/others", Some(t)).await;
        assert_eq!(
            (a.status, a.text().as_str()),
            (StatusCode::FORBIDDEN, "RBAC: access denied"),
            "a valid token with group {group:?}"
        );
    }
    // Tokens jwt_authn refuses: 401 with Envoy's reason and challenge.
    let expired = ok(issuer.token(&jwt_claims(Some(json!("admins")), -3_600), false));
    let forged = ok(issuer.token(&jwt_claims(Some(json!("admins")), 600), true));
    for (what, path, token, reason) in [
        ("expired", "/jwt/expired", expired, "Jwt is expired"),
        ("forged", "/jwt/forged", forged, "Jwt verification fails"),
    ] {
        let a = get(path, Some(token)).await;
        assert_eq!(
            (a.status, a.text().as_str()),
            (StatusCode::UNAUTHORIZED, reason),
            "an {what} token"
        );
        let challenge = format!(r#"Bearer realm="http://{HOST}{path}", error="invalid_token""#);
        assert_eq!(
            a.header("www-authenticate"),
            Some(challenge.as_str()),
            "an {what} token"
        );
    }
    // No token: allowed by jwt_authn (allow_missing), denied by the claim policy.
    let a = get("/jwt/anonymous", None).await;
    assert_eq!(
        (a.status, a.text().as_str()),
        (StatusCode::FORBIDDEN, "RBAC: access denied"),
        "no token"
    );

    // The policies removed: the fixture's listener again, where no token is looked at.
    push(
        mesh,
        ResourceKind::Listener,
        &fixture.main_internal(),
        "the fixture's main_internal",
    )
    .await;
    let a = send(
        client,
        "GET",
        "/jwt/after",
        &[("authorization", "Bearer not-a-jwt")],
        Bytes::new(),
    )
    .await;
    let seen = a.echoed("a broken token once the RequestAuthentication is gone");
    assert_eq!(
        seen.headers.get("authorization").map(String::as_str),
        Some("Bearer not-a-jwt"),
        "sent on untouched"
    );
    get("/jwt/after", None)
        .await
        .echoed("no token once the policies are gone");
}

/// VirtualService `corsPolicy`: a preflight from the allowed origin is answered by the
/// waypoint, one from another origin goes to the echo unmarked; simple requests from the allowed
/// origin get the CORS response headers, others do not.
async fn cors(mesh: &WaypointMesh, fixture: &Fixture) {
    push(
        mesh,
        ResourceKind::Listener,
        &ok(cors_listener(fixture)),
        "main_internal with the CORS VirtualService",
    )
    .await;
    let client = mesh.client_addr();
    let preflight = |origin: &'static str, key: &'static str| async move {
        send(
            client,
            "OPTIONS",
            "/cors/items",
            &[
                ("origin", origin),
                ("access-control-request-method", "POST"),
                ("access-control-request-headers", "x-custom"),
                ("x-echo-key", key),
            ],
            Bytes::new(),
        )
        .await
    };
    let echo_count = |key: &'static str| async move {
        send(
            mesh.addrs.pod_app(),
            "GET",
            "/count",
            &[("x-echo-key", key)],
            Bytes::new(),
        )
        .await
        .header("x-echo-request-count")
        .map(str::to_owned)
    };

    let a = preflight(ALLOWED_ORIGIN, "cors-preflight-allowed").await;
    assert_eq!(a.status, StatusCode::OK, "allowed preflight: {}", a.text());
    assert!(a.body.is_empty(), "answered by the waypoint: {}", a.text());
    for (name, want) in [
        ("access-control-allow-origin", ALLOWED_ORIGIN),
        ("access-control-allow-methods", "GET,POST"),
        ("access-control-allow-headers", "x-custom"),
        ("access-control-max-age", "86400"),
        ("access-control-allow-credentials", "true"),
    ] {
        assert_eq!(
            a.header(name),
            Some(want),
            "allowed preflight: {:?}",
            a.headers
        );
    }
    assert_eq!(
        echo_count("cors-preflight-allowed").await.as_deref(),
        Some("1"),
        "the allowed preflight never reached the echo (only the count request did)"
    );

    let a = preflight(OTHER_ORIGIN, "cors-preflight-other").await;
    let seen = a.echoed("a preflight from another origin (forward_not_matching_preflights)");
    assert_eq!(seen.method, "OPTIONS");
    assert!(
        a.headers
            .keys()
            .all(|k| !k.as_str().starts_with("access-control-")),
        "another origin gets no CORS headers: {:?}",
        a.headers
    );
    assert_eq!(
        echo_count("cors-preflight-other").await.as_deref(),
        Some("2"),
        "the other origin's preflight was forwarded"
    );

    for h2 in [false, true] {
        let headers = [("origin", ALLOWED_ORIGIN)];
        let a = if h2 {
            send_h2(client, "GET", "/cors/items", &headers, Bytes::new()).await
        } else {
            send(client, "GET", "/cors/items", &headers, Bytes::new()).await
        };
        a.echoed(&format!(
            "a simple request from the allowed origin (h2c: {h2})"
        ));
        assert_eq!(
            a.header("access-control-allow-origin"),
            Some(ALLOWED_ORIGIN),
            "h2c: {h2}"
        );
        assert_eq!(
            a.header("access-control-expose-headers"),
            Some("x-echo-server"),
            "h2c: {h2}"
        );
        assert_eq!(
            a.header("access-control-allow-credentials"),
            Some("true"),
            "h2c: {h2}"
        );
    }
    for (what, path, origin) in [
        ("another origin", "/cors/items", OTHER_ORIGIN),
        ("a route without a policy", "/other", ALLOWED_ORIGIN),
    ] {
        let a = send(client, "GET", path, &[("origin", origin)], Bytes::new()).await;
        a.echoed(what);
        assert!(
            a.headers
                .keys()
                .all(|k| !k.as_str().starts_with("access-control-")),
            "{what}: no CORS headers: {:?}",
            a.headers
        );
    }
}

/// A local rate limit on one route (EnvoyFilter, as in Istio's task): the bucket's tokens pass,
/// the next requests get 429 `local_rate_limited` with flag `RL`; other routes are not limited.
async fn local_rate_limit(mesh: &WaypointMesh, fixture: &Fixture) {
    push(
        mesh,
        ResourceKind::Listener,
        &ok(rate_limit_listener(fixture, RATE_LIMIT_TOKENS)),
        "main_internal with the local rate limit",
    )
    .await;
    let client = mesh.client_addr();
    for i in 0..RATE_LIMIT_TOKENS {
        let a = send(client, "GET", &format!("/ratelimit/{i}"), &[], Bytes::new()).await;
        a.echoed(&format!("request {i} within the bucket"));
        assert_eq!(a.header("x-local-rate-limit"), None, "request {i}");
    }
    let limited = [
        send(client, "GET", "/ratelimit/over", &[], Bytes::new()).await,
        send_h2(client, "GET", "/ratelimit/over-h2", &[], Bytes::new()).await,
    ];
    for a in &limited {
        assert_eq!(
            (a.status, a.text().as_str()),
            (StatusCode::TOO_MANY_REQUESTS, "local_rate_limited"),
            "beyond the bucket"
        );
        assert_eq!(
            a.header("x-local-rate-limit"),
            Some("true"),
            "response_headers_to_add: {:?}",
            a.headers
        );
        // Envoy's local_ratelimit filter sends only its configured headers (its docs mention
        // x-envoy-ratelimited, which only the global ratelimit filter sets).
        assert_eq!(a.header("x-envoy-ratelimited"), None, "{:?}", a.headers);
    }
    // The route's bucket is its own: the other routes pass.
    for i in 0..3 {
        send(client, "GET", &format!("/unlimited/{i}"), &[], Bytes::new())
            .await
            .echoed("a route without a rate limit");
    }
    let want = limited.len() as f64;
    let (flagged, text) = wait_requests_total(
        mesh,
        &["response_code=\"429\"", "response_flags=\"RL\""],
        want,
    )
    .await;
    assert_eq!(
        flagged,
        want,
        "istio_requests_total{{response_flags=\"RL\"}}:\n{}",
        istio_request_lines(&text)
    );

    push(
        mesh,
        ResourceKind::Listener,
        &fixture.main_internal(),
        "the fixture's main_internal",
    )
    .await;
    send(client, "GET", "/ratelimit/after", &[], Bytes::new())
        .await
        .echoed("the route once the EnvoyFilter is gone");
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
    let fixture = ok(Fixture::of(&mesh));
    let started = Instant::now();

    push(
        &mesh,
        ResourceKind::Listener,
        &ok(vs_listener(&fixture)),
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
    timeouts(&mesh, &fixture).await;
    eprintln!("timeouts done after {:?}", started.elapsed());
    mirroring(&mesh, &fixture).await;
    eprintln!("mirroring done after {:?}", started.elapsed());
    request_authentication(&mesh, &fixture).await;
    eprintln!("JWT done after {:?}", started.elapsed());
    cors(&mesh, &fixture).await;
    eprintln!("CORS done after {:?}", started.elapsed());
    local_rate_limit(&mesh, &fixture).await;
    eprintln!("local rate limit done after {:?}", started.elapsed());

    let nacks = mesh.nacks().await;
    assert!(nacks.is_empty(), "NACKs: {nacks:?}");
}
