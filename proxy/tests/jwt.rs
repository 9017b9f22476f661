//! RequestAuthentication through the real proxy: a static bootstrap whose HTTP chain is what
//! istiod builds for one `jwtRules` entry (`jwt_authn` with `requires_any{provider,
//! allow_missing}`, payload in dynamic metadata) followed by an RBAC ALLOW engine with Istio's
//! `request.auth.claims[groups]` and `requestPrincipals` translations, in front of an echo
//! backend. Tokens are signed in the test: RS256 with a fixed key (ring cannot generate RSA),
//! ES256 and EdDSA with keys generated here.

mod common;

use std::{
    net::SocketAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair},
};
use serde_json::{Value as Json, json};

const RSA_PEM: &str = include_str!("data/jwt-rsa-2048.pem");
const ISS: &str = "https://accounts.example.com";
const JWT: &str = "envoy.filters.http.jwt_authn";

struct Signers {
    rsa: RsaKeyPair,
    ec: EcdsaKeyPair,
    ed: Ed25519KeyPair,
    /// Not in the JWKS: its signatures must fail.
    stranger: EcdsaKeyPair,
}

impl Signers {
    fn new() -> Signers {
        let rng = SystemRandom::new();
        let der: String = RSA_PEM
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(der)
            .expect("pem");
        let ec = || {
            let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("keygen");
            EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("ec key")
        };
        let ed = Ed25519KeyPair::generate_pkcs8(&rng).expect("keygen");
        Signers {
            rsa: RsaKeyPair::from_pkcs8(&der).expect("rsa key"),
            ec: ec(),
            ed: Ed25519KeyPair::from_pkcs8(ed.as_ref()).expect("ed key"),
            stranger: ec(),
        }
    }

    /// The JWKS istiod would inline for the issuer (RSA, EC P-256, Ed25519).
    fn jwks(&self) -> Json {
        let rsa: signature::RsaPublicKeyComponents<Vec<u8>> = self.rsa.public().into();
        let ec = self.ec.public_key().as_ref();
        json!({"keys": [
            {"kty": "RSA", "kid": "rsa-1", "alg": "RS256", "use": "sig",
                "n": URL_SAFE_NO_PAD.encode(&rsa.n), "e": URL_SAFE_NO_PAD.encode(&rsa.e)},
            {"kty": "EC", "crv": "P-256", "kid": "ec-1",
                "x": URL_SAFE_NO_PAD.encode(&ec[1..33]), "y": URL_SAFE_NO_PAD.encode(&ec[33..])},
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed-1",
                "x": URL_SAFE_NO_PAD.encode(self.ed.public_key().as_ref())}]})
    }

    /// A compact JWS: `alg` picks the key (`ES256-stranger` signs with the unknown key).
    fn token(&self, alg: &str, claims: &Json) -> String {
        let rng = SystemRandom::new();
        let (header_alg, kid) = match alg {
            "RS256" => ("RS256", "rsa-1"),
            "ES256" | "ES256-stranger" => ("ES256", "ec-1"),
            _ => ("EdDSA", "ed-1"),
        };
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(json!({"alg": header_alg, "kid": kid}).to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = match alg {
            "RS256" => {
                let mut sig = vec![0; self.rsa.public().modulus_len()];
                self.rsa
                    .sign(
                        &signature::RSA_PKCS1_SHA256,
                        &rng,
                        input.as_bytes(),
                        &mut sig,
                    )
                    .expect("sign");
                sig
            }
            "ES256" => self
                .ec
                .sign(&rng, input.as_bytes())
                .expect("sign")
                .as_ref()
                .to_vec(),
            "ES256-stranger" => self
                .stranger
                .sign(&rng, input.as_bytes())
                .expect("sign")
                .as_ref()
                .to_vec(),
            _ => self.ed.sign(input.as_bytes()).as_ref().to_vec(),
        };
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn claims(sub: &str, groups: &[&str]) -> Json {
    json!({"iss": ISS, "sub": sub, "aud": ["bookinfo"], "groups": groups,
        "scope": "read write", "iat": now(), "exp": now() + 600})
}

/// `metadata` principal on a claim as istiod writes it (`MetadataListValueMatcherForJWTClaims`).
fn claim_principal(claim: &str, value: &str) -> Json {
    json!({"metadata": {"filter": JWT, "path": [{"key": "payload"}, {"key": claim}],
        "value": {"or_match": {"value_matchers": [
            {"list_match": {"one_of": {"string_match": {"exact": value}}}},
            {"string_match": {"exact": value}}]}}}})
}

/// `requestPrincipals: ["<iss>/<sub>"]` as istiod writes it: iss and sub string matchers.
fn request_principal(iss: &str, sub: &str) -> Json {
    let m = |k: &str, v: &str| {
        json!({"metadata": {"filter": JWT, "path": [{"key": "payload"}, {"key": k}],
            "value": {"string_match": {"exact": v}}}})
    };
    json!({"and_ids": {"ids": [m("iss", iss), m("sub", sub)]}})
}

fn prefix(p: &str) -> Json {
    json!({"url_path": {"path": {"prefix": p}}})
}

fn bootstrap(dir: &std::path::Path, listen: u16, admin: u16, backend: u16, jwks: &Json) -> Json {
    let addr = |port: u16| json!({"socket_address": {"address": "127.0.0.1", "port_value": port}});
    let jwt_filter = json!({"name": JWT, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {"origins-0": {
            "issuer": ISS, "audiences": ["bookinfo"],
            "local_jwks": {"inline_string": jwks.to_string()},
            "payload_in_metadata": "payload",
            "normalize_payload_in_metadata": {"space_delimited_claims": ["permission", "scope"]},
            "claim_to_headers": [{"header_name": "x-jwt-sub", "claim_name": "sub"}],
            "forward_payload_header": "x-jwt-payload"}},
        "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": [
            {"provider_name": "origins-0"}, {"allow_missing": {}}]}}}],
        "requirement_map": {"strict": {"provider_name": "origins-0"}},
        "bypass_cors_preflight": true}});
    let rbac_filter = json!({"name": "envoy.filters.http.rbac", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
        "rules": {"action": "ALLOW", "policies": {
            "ns[default]-policy[admins]-rule[0]": {
                "permissions": [{"and_rules": {"rules": [{"or_rules": {"rules": [prefix("/admin")]}}]}}],
                "principals": [{"and_ids": {"ids": [{"or_ids": {"ids": [
                    claim_principal("groups", "admin")]}}]}}]},
            "ns[default]-policy[alice]-rule[0]": {
                "permissions": [{"and_rules": {"rules": [{"or_rules": {"rules": [prefix("/alice")]}}]}}],
                "principals": [{"and_ids": {"ids": [{"or_ids": {"ids": [
                    request_principal(ISS, "alice")]}}]}}]},
            "ns[default]-policy[scoped]-rule[0]": {
                "permissions": [{"and_rules": {"rules": [{"or_rules": {"rules": [prefix("/write")]}}]}}],
                "principals": [{"and_ids": {"ids": [{"or_ids": {"ids": [
                    claim_principal("scope", "write")]}}]}}]},
            "ns[default]-policy[rest]-rule[0]": {
                "permissions": [{"not_rule": {"or_rules": {"rules": [
                    prefix("/admin"), prefix("/alice"), prefix("/write")]}}}],
                "principals": [{"any": true}]}}}}});
    let per_route = |cfg: Json| {
        let mut c = cfg;
        c["@type"] =
            json!("type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig");
        json!({ JWT: c })
    };
    let hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "jwt_test",
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": dir.join("access.log").display().to_string(),
            "log_format": {"text_format_source": {"inline_string":
                "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_CODE_DETAILS%\n"}}}}],
        "route_config": {"name": "r", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/open"}, "route": {"cluster": "backend"},
                "typed_per_filter_config": per_route(json!({"disabled": true}))},
            {"match": {"prefix": "/strict"}, "route": {"cluster": "backend"},
                "typed_per_filter_config": per_route(json!({"requirement_name": "strict"}))},
            {"match": {"prefix": "/"}, "route": {"cluster": "backend"}}]}]},
        "http_filters": [jwt_filter, rbac_filter, {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]});
    json!({
        "node": {"id": "sidecar~127.0.0.1~jwt.default~default.svc.cluster.local", "cluster": "jwt"},
        "admin": {"address": addr(admin)},
        "static_resources": {
            "listeners": [{"name": "jwt", "address": addr(listen), "filter_chains": [{"filters": [
                {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}],
            "clusters": [{"name": "backend", "type": "STATIC", "connect_timeout": "2s",
                "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": addr(backend)}}]}]}}]}})
}

/// One GET through the proxy on a fresh connection, host `bookinfo.local`.
async fn request(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> common::Reply {
    common::request(addr, "bookinfo.local", path, headers).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_authentication_and_claim_based_authorization() {
    let keys = Signers::new();
    let backend = common::echo("backend").await;
    let jwks = keys.jwks();
    let proxy = common::Launch::new("jwt")
        .level("debug")
        .start(&["LISTEN", "ADMIN"], |dir, ports| {
            bootstrap(dir, ports.get("LISTEN"), ports.get("ADMIN"), backend, &jwks).to_string()
        })
        .await;
    let addr = proxy.addr();
    let bearer = |t: &str| format!("Bearer {t}");

    // A valid token of each algorithm passes; the token is consumed (forward: false), the client's
    // own x-jwt-sub is replaced by the claim, the payload is forwarded.
    for alg in ["RS256", "ES256", "EdDSA"] {
        let t = keys.token(alg, &claims("alice", &["dev"]));
        let r = request(
            addr,
            "/hello",
            &[("authorization", &bearer(&t)), ("x-jwt-sub", "mallory")],
        )
        .await;
        assert_eq!(r.status, 200, "{alg}: {}\n{}", r.text(), proxy.log_tail());
        assert_eq!(r.seen("x-jwt-sub"), "alice", "{alg}: {}", r.text());
        assert_eq!(r.seen("authorization"), Json::Null, "{alg}: token removed");
        assert_eq!(
            r.seen("x-jwt-payload"),
            t.split('.').nth(1).expect("payload"),
            "{alg}"
        );
    }

    // Failures: 401 with Envoy's reason and challenge, 403 for audiences.
    let mut expired = claims("alice", &[]);
    expired["exp"] = json!(now() - 3600);
    let mut other_iss = claims("alice", &[]);
    other_iss["iss"] = json!("https://evil.example");
    let mut other_aud = claims("alice", &[]);
    other_aud["aud"] = json!("reviews");
    let cases = [
        (keys.token("RS256", &expired), 401, "Jwt is expired"),
        (
            keys.token("ES256-stranger", &claims("alice", &[])),
            401,
            "Jwt verification fails",
        ),
        (
            keys.token("EdDSA", &other_iss),
            401,
            "Jwt issuer is not configured",
        ),
        (
            keys.token("RS256", &other_aud),
            403,
            "Audiences in Jwt are not allowed",
        ),
    ];
    for (t, status, reason) in &cases {
        let r = request(addr, "/hello?q=1", &[("authorization", &bearer(t))]).await;
        assert_eq!((r.status, r.text()), (*status, (*reason).to_owned()));
        assert_eq!(
            r.headers
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some(r#"Bearer realm="http://bookinfo.local/hello?q=1", error="invalid_token""#),
            "{reason}"
        );
    }

    // Missing token: allowed by allow_missing; a route requiring the provider answers 401.
    let r = request(addr, "/hello", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = request(addr, "/strict", &[]).await;
    assert_eq!((r.status, r.text().as_str()), (401, "Jwt is missing"));
    assert_eq!(
        r.headers
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some(r#"Bearer realm="http://bookinfo.local/strict""#)
    );
    let good = keys.token("ES256", &claims("alice", &[]));
    let r = request(addr, "/strict", &[("authorization", &bearer(&good))]).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // Per-route disabled: even a broken token is not looked at and goes upstream as sent.
    let r = request(addr, "/open", &[("authorization", "Bearer garbage")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.seen("authorization"), "Bearer garbage");

    // RBAC on request.auth.claims[groups]: a token with the group, one without, none at all.
    let admin_token = keys.token("RS256", &claims("bob", &["dev", "admin"]));
    let r = request(
        addr,
        "/admin/x",
        &[("authorization", &bearer(&admin_token))],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let dev_token = keys.token("RS256", &claims("bob", &["dev"]));
    let r = request(addr, "/admin/x", &[("authorization", &bearer(&dev_token))]).await;
    assert_eq!((r.status, r.text().as_str()), (403, "RBAC: access denied"));
    let r = request(addr, "/admin/x", &[]).await;
    assert_eq!(r.status, 403);

    // A space-delimited claim normalized into a list (istiod's `scope`).
    let r = request(addr, "/write", &[("authorization", &bearer(&dev_token))]).await;
    assert_eq!(
        r.status,
        200,
        "scope 'read write' holds 'write': {}",
        r.text()
    );

    // RBAC on the request principal iss/sub.
    let r = request(addr, "/alice", &[("authorization", &bearer(&good))]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = request(addr, "/alice", &[("authorization", &bearer(&dev_token))]).await;
    assert_eq!(r.status, 403, "bob is not alice");

    // Envoy's counters and response code details.
    assert_eq!(proxy.stat("http.jwt_test.jwt_authn.denied").await, 5);
    assert!(proxy.stat("http.jwt_test.jwt_authn.allowed").await >= 12);
    let log = proxy.path("access.log");
    let lines = common::eventually(
        "access log lines",
        || proxy.log_tail(),
        || async {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            (text.lines().count() >= 17).then_some(text)
        },
    )
    .await;
    assert!(
        lines.contains("/hello?q=1 401 jwt_authn_access_denied{Jwt_is_expired}"),
        "{lines}"
    );
    assert!(
        lines.contains("/strict 401 jwt_authn_access_denied{Jwt_is_missing}"),
        "{lines}"
    );
}
