//! jwt_authn with `remote_jwks` through the real proxy, from a static bootstrap: the JWKS is
//! served by a small HTTP server in the test (counting its fetches) behind a STATIC cluster, as
//! istiod's `outbound|443||issuer` cluster would be. Shown: a valid token passes after the fetch,
//! several requests (concurrent ones included) within `cache_duration` cause one fetch, a provider
//! whose JWKS server is down (or whose cluster does not exist) answers Envoy's 401
//! `Jwks remote fetch is failed`, and with `async_fetch` the keys are fetched before any request.

mod common;

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use ring::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, KeyPair as _},
};
use serde_json::{Value as Json, json};

const ISS: &str = "https://issuer.example.com";
const ISS_EAGER: &str = "https://eager.example.com";
const ISS_DEAD: &str = "https://dead.example.com";
const ISS_NOCLUSTER: &str = "https://nocluster.example.com";

/// An ES256 key and its JWKS (the signing shape of `tests/jwt.rs`).
struct Signer(EcdsaKeyPair);

impl Signer {
    fn new() -> Signer {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("keygen");
        Signer(EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("ec key"))
    }

    fn jwks(&self) -> String {
        let p = self.0.public_key().as_ref();
        json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "ec-1", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(&p[1..33]), "y": URL_SAFE_NO_PAD.encode(&p[33..])}]})
        .to_string()
    }

    fn token(&self, iss: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = json!({"iss": iss, "sub": "alice", "iat": now, "exp": now + 600});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(json!({"alg": "ES256", "kid": "ec-1"}).to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .0
            .sign(&SystemRandom::new(), input.as_bytes())
            .expect("sign");
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

/// A JWKS server on 127.0.0.1: serves `body` on every path, counting requests per path.
struct JwksServer {
    port: u16,
    hits: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl JwksServer {
    async fn start(body: String) -> JwksServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let hits: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
        let (seen, body) = (hits.clone(), Bytes::from(body));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (seen, body) = (seen.clone(), body.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (seen, body) = (seen.clone(), body.clone());
                        async move {
                            *seen
                                .lock()
                                .expect("hits")
                                .entry(req.uri().path().to_owned())
                                .or_default() += 1;
                            Ok::<_, Infallible>(Response::new(Full::new(body)))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        JwksServer { port, hits }
    }

    fn hits(&self, path: &str) -> usize {
        self.hits
            .lock()
            .expect("hits")
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

fn addr(port: u16) -> Json {
    json!({"socket_address": {"address": "127.0.0.1", "port_value": port}})
}

fn static_cluster(name: &str, port: u16) -> Json {
    json!({"name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": addr(port)}}]}]}})
}

fn remote(port: u16, path: &str, cluster: &str, extra: Json) -> Json {
    let mut r = json!({"http_uri": {"uri": format!("http://127.0.0.1:{port}{path}"),
        "cluster": cluster, "timeout": "2s"}, "cache_duration": "300s"});
    if let (Some(r), Json::Object(extra)) = (r.as_object_mut(), extra) {
        r.extend(extra);
    }
    r
}

fn bootstrap(ports: &common::Ports, backend: u16, jwks: u16, dead: u16) -> String {
    let provider =
        |iss: &str, remote_jwks: Json| json!({"issuer": iss, "remote_jwks": remote_jwks});
    let jwt = json!({"name": "envoy.filters.http.jwt_authn", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {
            "lazy": provider(ISS, remote(jwks, "/lazy", "jwks", json!({}))),
            "eager": provider(ISS_EAGER, remote(jwks, "/eager", "jwks",
                json!({"async_fetch": {"fast_listener": true}}))),
            "dead": provider(ISS_DEAD, remote(dead, "/dead", "dead",
                json!({"retry_policy": {"num_retries": 1,
                    "retry_back_off": {"base_interval": "0.01s"}}}))),
            "nocluster": provider(ISS_NOCLUSTER, remote(dead, "/x", "missing", json!({})))},
        "rules": [
            {"match": {"prefix": "/eager"}, "requires": {"provider_name": "eager"}},
            {"match": {"prefix": "/dead"}, "requires": {"provider_name": "dead"}},
            {"match": {"prefix": "/nocluster"}, "requires": {"provider_name": "nocluster"}},
            {"match": {"prefix": "/"}, "requires": {"provider_name": "lazy"}}]}});
    let hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "remote",
        "route_config": {"name": "r", "virtual_hosts": [{"name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}]}]},
        "http_filters": [jwt, {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]});
    json!({
        "node": {"id": "sidecar~127.0.0.1~jwt.default~default.svc.cluster.local", "cluster": "jwt"},
        "admin": {"address": addr(ports.get("ADMIN"))},
        "static_resources": {
            "listeners": [{"name": "jwt", "address": addr(ports.get("LISTEN")),
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm}]}]}],
            "clusters": [static_cluster("backend", backend), static_cluster("jwks", jwks),
                static_cluster("dead", dead)]}})
    .to_string()
}

async fn get(addr: SocketAddr, path: &str, token: &str) -> common::Reply {
    let bearer = format!("Bearer {token}");
    common::request(addr, "svc.local", path, &[("authorization", &bearer)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_jwks_is_fetched_through_a_cluster_cached_and_failures_are_401() {
    let signer = Signer::new();
    let server = JwksServer::start(signer.jwks()).await;
    let backend = common::echo("backend").await;
    // Nothing listens there: connections are refused.
    let dead = common::free_port();
    let proxy = common::Launch::new("jwt-remote")
        .level("debug")
        .start(&["LISTEN", "ADMIN"], |_, ports| {
            bootstrap(ports, backend, server.port, dead)
        })
        .await;
    let addr = proxy.addr();
    let stat = |n: &str| format!("http.remote.jwt_authn.{n}");

    // async_fetch: fetched when the config was installed, before any request.
    common::eventually(
        "the async fetch",
        || proxy.log_tail(),
        || async { (server.hits("/eager") == 1).then_some(()) },
    )
    .await;
    assert_eq!(
        server.hits("/lazy"),
        0,
        "no request yet: nothing fetched on demand"
    );
    let r = get(addr, "/eager/x", &signer.token(ISS_EAGER)).await;
    assert_eq!(r.status, 200, "{}\n{}", r.text(), proxy.log_tail());
    assert_eq!(
        server.hits("/eager"),
        1,
        "the request used the prefetched keys"
    );

    // On demand: five concurrent requests wait for one fetch, later ones use the cache.
    let token = signer.token(ISS);
    let paths: Vec<String> = (0..5).map(|i| format!("/a/{i}")).collect();
    let replies = futures::future::join_all(paths.iter().map(|p| get(addr, p, &token))).await;
    for r in &replies {
        assert_eq!(r.status, 200, "{}\n{}", r.text(), proxy.log_tail());
    }
    for i in 0..3 {
        let r = get(addr, &format!("/b/{i}"), &token).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(server.hits("/lazy"), 1, "one fetch within cache_duration");
    // The token was verified, not just let through: a token from another key fails.
    let stranger = Signer::new().token(ISS);
    let r = get(addr, "/c", &stranger).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (401, "Jwt verification fails")
    );

    // A dead JWKS server (after one retry) and an unknown cluster: Envoy's 401.
    for (path, iss) in [("/dead", ISS_DEAD), ("/nocluster", ISS_NOCLUSTER)] {
        let r = get(addr, path, &signer.token(iss)).await;
        assert_eq!(
            (r.status, r.text().as_str()),
            (401, "Jwks remote fetch is failed"),
            "{path}"
        );
        assert_eq!(
            r.headers
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some(
                format!("Bearer realm=\"http://svc.local{path}\", error=\"invalid_token\"")
                    .as_str()
            )
        );
    }

    assert_eq!(
        proxy.stat(&stat("jwks_fetch_success")).await,
        2,
        "eager + lazy"
    );
    assert_eq!(
        proxy.stat(&stat("jwks_fetch_failed")).await,
        2,
        "dead + nocluster"
    );
    assert_eq!(proxy.stat(&stat("denied")).await, 3);
    // retry_policy num_retries 1: the dead cluster saw two attempts for the one fetch.
    assert_eq!(proxy.stat("cluster.dead.upstream_rq_total").await, 2);
    assert_eq!(proxy.stat("cluster.jwks.upstream_rq_total").await, 2);
}
