//! `envoy.filters.http.jwt_authn` on the data path: JWS verification (with `ring`), claim checks,
//! token extraction, Envoy's requirement semantics, and what a verified token does to the request
//! (token removal, payload and claim headers, dynamic metadata for RBAC).
//!
//! Envoy is the spec: its filter (`source/extensions/filters/http/jwt_authn`) and
//! `google/jwt_verify_lib` decide the order of the checks, which failure a request reports, the
//! failure strings (they are the body of the 401 and part of `%RESPONSE_CODE_DETAILS%`) and the
//! `www-authenticate` header. An inline JWKS is parsed once, when the config is compiled
//! ([`Jwks::parse`]); a remote one is fetched by [`super::jwks_fetch`] when a token first needs
//! it (the request waits, [`JwtAuthn::verify`]) or ahead of time with `async_fetch`.

use std::{collections::BTreeSet, fmt, sync::Arc};

use base64::{
    Engine as _, alphabet,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig, general_purpose::STANDARD},
};
use http::{HeaderValue, StatusCode, request::Parts};
use ring::{hmac, signature};
use serde_json::{Map, Value as Json};

use super::{
    jwks_fetch::{ClusterSource, Outcome, RemoteJwks},
    route_select,
    stream_info::DynamicMetadata,
};
use crate::{
    config::filters::jwt::{
        ClaimToHeader, JwksSource, JwtAuthn, PerRoute, Provider, Requirement, TokenLocation,
    },
    dataplane::DataPlane,
};

/// The dynamic metadata namespace jwt_authn writes (`payload_in_metadata`, `header_in_metadata`).
pub const METADATA_NAMESPACE: &str = "envoy.filters.http.jwt_authn";

/// The prefix of jwt_authn's `%RESPONSE_CODE_DETAILS%`.
const DETAILS_PREFIX: &str = "jwt_authn_access_denied";

/// Envoy cuts the URI in the `www-authenticate` realm to this many path bytes.
const MAX_REALM_PATH: usize = 256;

/// JOSE's base64url. Envoy (absl's `WebSafeBase64Unescape`) also accepts padded input.
const B64URL: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

fn b64url(s: &str) -> Option<Vec<u8>> {
    B64URL.decode(s).ok()
}

/// A verification failure, with `jwt_verify_lib`'s wording (Envoy sends it as the body).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Status {
    /// No token where the provider looks.
    #[error("Jwt is missing")]
    Missing,
    /// `nbf` is in the future (beyond the clock skew).
    #[error("Jwt not yet valid")]
    NotYetValid,
    /// `exp` is in the past (beyond the clock skew).
    #[error("Jwt is expired")]
    Expired,
    /// Not three non-empty dot-separated parts.
    #[error("Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")]
    BadFormat,
    /// The header is not base64url.
    #[error("Jwt header is an invalid Base64url encoded")]
    HeaderBadBase64,
    /// The header is not a JSON object.
    #[error("Jwt header is an invalid JSON")]
    HeaderBadJson,
    /// `alg` is missing or not a string.
    #[error("Jwt header [alg] field is required and must be a string")]
    HeaderBadAlg,
    /// `alg` names an algorithm JWS verification does not know (`none` included).
    #[error("Jwt header [alg] is not supported")]
    HeaderNotImplementedAlg,
    /// `kid` is not a string.
    #[error("Jwt header [kid] field is not a string")]
    HeaderBadKid,
    /// The payload is not base64url.
    #[error("Jwt payload is an invalid Base64url encoded")]
    PayloadBadBase64,
    /// The payload is not a JSON object.
    #[error("Jwt payload is an invalid JSON")]
    PayloadBadJson,
    /// `iss` is not a string.
    #[error("Jwt payload [iss] field is not a string")]
    IssNotString,
    /// `sub` is not a string.
    #[error("Jwt payload [sub] field is not a string")]
    SubNotString,
    /// `iat` is not a number.
    #[error("Jwt payload [iat] field is not an integer")]
    IatNotInteger,
    /// `iat` is negative or too large.
    #[error("Jwt payload [iat] field is not a positive 64 bit integer")]
    IatOutOfRange,
    /// `nbf` is not a number.
    #[error("Jwt payload [nbf] field is not an integer")]
    NbfNotInteger,
    /// `nbf` is negative or too large.
    #[error("Jwt payload [nbf] field is not a positive 64 bit integer")]
    NbfOutOfRange,
    /// `exp` is not a number.
    #[error("Jwt payload [exp] field is not an integer")]
    ExpNotInteger,
    /// `exp` is negative or too large.
    #[error("Jwt payload [exp] field is not a positive 64 bit integer")]
    ExpOutOfRange,
    /// `jti` is not a string.
    #[error("Jwt payload [jti] field is not a string")]
    JtiNotString,
    /// `aud` is neither a string nor a list of strings.
    #[error("Jwt payload [aud] field is not a string or string list")]
    AudNotString,
    /// The signature is not base64url.
    #[error("Jwt signature is an invalid Base64url encoded")]
    SignatureBadBase64,
    /// An EdDSA signature is not 64 bytes.
    #[error("Jwt ED25519 signature is wrong length")]
    Ed25519SignatureWrongLength,
    /// No provider accepts the token's `iss` at the place it was found.
    #[error("Jwt issuer is not configured")]
    UnknownIssuer,
    /// None of the token's audiences is allowed (Envoy answers 403).
    #[error("Audiences in Jwt are not allowed")]
    AudienceNotAllowed,
    /// The signature does not verify with any candidate key (or `subjects`/`max_lifetime` refuse).
    #[error("Jwt verification fails")]
    VerificationFail,
    /// The provider's JWKS has no usable key.
    #[error("Jwks doesn't have any valid public key")]
    JwksNoValidKeys,
    /// No key of the JWKS has the token's `kid` and `alg`.
    #[error("Jwks doesn't have key to match kid or alg from Jwt")]
    JwksKidAlgMismatch,
    /// The provider's `remote_jwks` could not be fetched.
    #[error("Jwks remote fetch is failed")]
    JwksFetchFail,
}

// ---------------------------------------------------------------------------------------------
// JWKS

/// An elliptic curve ring can verify ES256/ES384 signatures on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Curve {
    P256,
    P384,
}

impl Curve {
    fn coordinate_len(self) -> usize {
        match self {
            Curve::P256 => 32,
            Curve::P384 => 48,
        }
    }
}

/// The key material of one JWK.
#[derive(Clone)]
enum Key {
    /// RSA modulus and exponent, big-endian without leading zeros (as ring wants them).
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// An uncompressed SEC1 point (`04 || x || y`).
    Ec { curve: Curve, point: Vec<u8> },
    /// An HMAC secret (`kty: oct`).
    Oct(Vec<u8>),
    /// An Ed25519 public key (`kty: OKP`, `crv: Ed25519`).
    Ed25519(Vec<u8>),
}

/// One usable key of a JWKS.
#[derive(Clone)]
struct Jwk {
    /// `kid` (empty: none).
    kid: String,
    /// `alg` (empty: none).
    alg: String,
    key: Key,
}

// The HMAC secret must not reach logs or `/config_dump`-style debug output.
impl fmt::Debug for Jwk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kty = match &self.key {
            Key::Rsa { .. } => "RSA",
            Key::Ec {
                curve: Curve::P256, ..
            } => "EC P-256",
            Key::Ec {
                curve: Curve::P384, ..
            } => "EC P-384",
            Key::Oct(_) => "oct",
            Key::Ed25519(_) => "OKP Ed25519",
        };
        f.debug_struct("Jwk")
            .field("kty", &kty)
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// A JWKS Envoy accepts but this proxy cannot verify with: the config is refused (NACK) rather
/// than tokens silently failing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksUnsupported {
    /// ring has no P-521 ECDSA.
    #[error(
        "key {0}: EC keys on curve P-521 (ES512) are not supported (ring verifies P-256 and P-384 only)"
    )]
    P521(usize),
    /// The Google `{"kid": "-----BEGIN CERTIFICATE-----..."}` form.
    #[error("a JWKS of X.509 certificates (kid → PEM) is not supported; use a JWK set with 'keys'")]
    X509,
}

/// A provider's parsed JWKS. Like Envoy, keys that do not parse are skipped; a JWKS without any
/// usable key is accepted in config and fails every token of that provider with
/// `Jwks doesn't have any valid public key` (Envoy logs "Invalid inline jwks" and does the same).
#[derive(Debug, Clone, Default)]
pub struct Jwks {
    keys: Vec<Jwk>,
    /// Why the first bad key (or the whole document) was refused, for the config-time warning.
    problem: Option<String>,
}

fn str_field<'a>(o: &'a Map<String, Json>, k: &str) -> Result<Option<&'a str>, ()> {
    match o.get(k) {
        None => Ok(None),
        Some(Json::String(s)) => Ok(Some(s)),
        Some(_) => Err(()),
    }
}

/// A required string field of a JWK: `missing` / `bad` are Envoy's status strings.
fn required<'a>(
    o: &'a Map<String, Json>,
    k: &str,
    missing: &'static str,
    bad: &'static str,
) -> Result<&'a str, KeyProblem> {
    match str_field(o, k) {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(KeyProblem::Invalid(missing)),
        Err(()) => Err(KeyProblem::Invalid(bad)),
    }
}

enum KeyProblem {
    /// Envoy skips the key too (its status string).
    Invalid(&'static str),
    /// Envoy would use the key; we cannot.
    Unsupported(JwksUnsupported),
}

fn strip_leading_zeros(mut b: Vec<u8>) -> Vec<u8> {
    let zeros = b.iter().take_while(|x| **x == 0).count();
    b.drain(..zeros);
    b
}

fn rsa_key(o: &Map<String, Json>, alg: &str) -> Result<Key, KeyProblem> {
    if !(alg.is_empty() || alg.starts_with("RS") || alg.starts_with("PS")) {
        return Err(KeyProblem::Invalid(
            "[alg] is not started with [RS] or [PS] for an RSA key",
        ));
    }
    let n = required(
        o,
        "n",
        "[n] field is missing for a RSA key",
        "[n] field is not string for a RSA key",
    )?;
    let e = required(
        o,
        "e",
        "[e] field is missing for a RSA key",
        "[e] field is not string for a RSA key",
    )?;
    const PARSE: &str = "Jwks RSA [n] or [e] field is missing or has a parse error";
    let n = strip_leading_zeros(b64url(n).ok_or(KeyProblem::Invalid(PARSE))?);
    let e = strip_leading_zeros(b64url(e).ok_or(KeyProblem::Invalid(PARSE))?);
    // jwt_verify_lib rejects non-standard public exponents early.
    if n.is_empty() || !(e == [3] || e == [1, 0, 1]) {
        return Err(KeyProblem::Invalid(PARSE));
    }
    Ok(Key::Rsa { n, e })
}

fn ec_key(o: &Map<String, Json>, alg: &str, index: usize) -> Result<Key, KeyProblem> {
    if !alg.is_empty() && !alg.starts_with("ES") {
        return Err(KeyProblem::Invalid(
            "[alg] is not started with [ES] for an EC key",
        ));
    }
    let crv = str_field(o, "crv")
        .map_err(|()| KeyProblem::Invalid("[crv] field is not string for an EC key"))?
        .unwrap_or("");
    if !alg.is_empty()
        && !crv.is_empty()
        && !matches!(
            (alg, crv),
            ("ES256", "P-256") | ("ES384", "P-384") | ("ES512", "P-521")
        )
    {
        return Err(KeyProblem::Invalid(
            "[crv] field specified is not compatible with [alg] for an EC key",
        ));
    }
    // Neither set: P-256, as jwt_verify_lib assumes.
    let curve = if alg == "ES256" || crv == "P-256" || (alg.is_empty() && crv.is_empty()) {
        Curve::P256
    } else if alg == "ES384" || crv == "P-384" {
        Curve::P384
    } else if alg == "ES512" || crv == "P-521" {
        return Err(KeyProblem::Unsupported(JwksUnsupported::P521(index)));
    } else {
        return Err(KeyProblem::Invalid(
            "[crv] or [alg] field is not supported for an EC key",
        ));
    };
    let x = required(
        o,
        "x",
        "[x] field is missing for an EC key",
        "[x] field is not string for an EC key",
    )?;
    let y = required(
        o,
        "y",
        "[y] field is missing for an EC key",
        "[y] field is not string for an EC key",
    )?;
    const BASE64: &str = "Jwks EC [x] or [y] field is an invalid Base64.";
    const PARSE: &str = "Jwks EC [x] and [y] fields have a parse error.";
    let len = curve.coordinate_len();
    let mut point = Vec::with_capacity(1 + 2 * len);
    point.push(4);
    for c in [x, y] {
        // Big-endian integers: a short encoding is left-padded, as BN_bin2bn reads it.
        let bytes = strip_leading_zeros(b64url(c).ok_or(KeyProblem::Invalid(BASE64))?);
        if bytes.len() > len {
            return Err(KeyProblem::Invalid(PARSE));
        }
        point.extend(std::iter::repeat_n(0, len - bytes.len()));
        point.extend(bytes);
    }
    Ok(Key::Ec { curve, point })
}

fn oct_key(o: &Map<String, Json>, alg: &str) -> Result<Key, KeyProblem> {
    if !alg.is_empty() && !matches!(alg, "HS256" | "HS384" | "HS512") {
        return Err(KeyProblem::Invalid(
            "[alg] does not start with [HS] for an HMAC key",
        ));
    }
    let k = required(
        o,
        "k",
        "[k] field is missing for an HMAC key",
        "[k] field is not string for an HMAC key",
    )?;
    match b64url(k) {
        Some(k) if !k.is_empty() => Ok(Key::Oct(k)),
        _ => Err(KeyProblem::Invalid("Jwks Oct key is an invalid Base64")),
    }
}

fn okp_key(o: &Map<String, Json>, alg: &str) -> Result<Key, KeyProblem> {
    if !alg.is_empty() && alg != "EdDSA" {
        return Err(KeyProblem::Invalid("[alg] is not [EdDSA] for an OKP key"));
    }
    let crv = required(
        o,
        "crv",
        "[crv] field is missing for an OKP key",
        "[crv] field is not string for an OKP key",
    )?;
    if crv != "Ed25519" {
        return Err(KeyProblem::Invalid(
            "[crv] field is not supported for an OKP key",
        ));
    }
    let x = required(
        o,
        "x",
        "[x] field is missing for an OKP key",
        "[x] field is not string for an OKP key",
    )?;
    let x = b64url(x).ok_or(KeyProblem::Invalid(
        "Jwks OKP [x] field is an invalid Base64.",
    ))?;
    if x.len() != 32 {
        return Err(KeyProblem::Invalid("Jwks OKP [x] field is wrong length."));
    }
    Ok(Key::Ed25519(x))
}

fn jwk(o: &Map<String, Json>, index: usize) -> Result<Jwk, KeyProblem> {
    let kty = required(
        o,
        "kty",
        "[kty] is missing in [keys]",
        "[kty] is bad in [keys]",
    )?;
    // `kid` and `alg` of another type are ignored, as jwt_verify_lib does.
    let kid = str_field(o, "kid").ok().flatten().unwrap_or("").to_owned();
    let alg = str_field(o, "alg").ok().flatten().unwrap_or("").to_owned();
    let key = match kty {
        "RSA" => rsa_key(o, &alg)?,
        "EC" => ec_key(o, &alg, index)?,
        "oct" => oct_key(o, &alg)?,
        "OKP" => okp_key(o, &alg)?,
        _ => {
            return Err(KeyProblem::Invalid("[kty] is not supported in [keys]"));
        }
    };
    Ok(Jwk { kid, alg, key })
}

/// Google's certificate map: every value a PEM certificate (jwt_verify_lib's `shouldCheckX509`).
fn is_x509_map(doc: &Map<String, Json>) -> bool {
    !doc.is_empty()
        && doc.iter().all(|(k, v)| {
            !k.is_empty()
                && v.as_str().is_some_and(|c| {
                    c.starts_with("-----BEGIN CERTIFICATE-----\n")
                        && c.ends_with("\n-----END CERTIFICATE-----\n")
                })
        })
}

impl Jwks {
    /// Parses a JWKS document. `Err` only for key types Envoy verifies and we cannot.
    pub fn parse(text: &str) -> Result<Jwks, JwksUnsupported> {
        let invalid = |why: &str| Jwks {
            keys: Vec::new(),
            problem: Some(why.to_owned()),
        };
        let Ok(Json::Object(doc)) = serde_json::from_str::<Json>(text) else {
            return Ok(invalid("Jwks is an invalid JSON"));
        };
        let Some(keys) = doc.get("keys") else {
            if is_x509_map(&doc) {
                return Err(JwksUnsupported::X509);
            }
            return Ok(invalid("Jwks does not have [keys] field"));
        };
        let Json::Array(list) = keys else {
            return Ok(invalid("[keys] in Jwks is not an array"));
        };
        let mut out = Jwks::default();
        for (i, k) in list.iter().enumerate() {
            let Json::Object(o) = k else { continue };
            match jwk(o, i) {
                Ok(k) => out.keys.push(k),
                Err(KeyProblem::Unsupported(u)) => return Err(u),
                Err(KeyProblem::Invalid(why)) => {
                    out.problem.get_or_insert_with(|| format!("key {i}: {why}"));
                }
            }
        }
        if out.keys.is_empty() && out.problem.is_none() {
            out.problem = Some(Status::JwksNoValidKeys.to_string());
        }
        Ok(out)
    }

    /// How many keys are usable.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is usable (every token of the provider fails).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Why a key (or the document) was skipped, if one was.
    pub fn problem(&self) -> Option<&str> {
        self.problem.as_deref()
    }

    /// jwt_verify_lib's `verifyJwtWithoutTimeChecking`: a key whose `kid` (when both have one)
    /// and `alg` (when the key has one) fit the token is tried; the first that verifies wins.
    fn verify(&self, jwt: &Jwt<'_>) -> Result<(), Status> {
        if self.keys.is_empty() {
            return Err(Status::JwksNoValidKeys);
        }
        let mut candidate = false;
        for k in &self.keys {
            if !jwt.kid.is_empty() && !k.kid.is_empty() && k.kid != jwt.kid {
                continue;
            }
            if !k.alg.is_empty() && k.alg != jwt.alg {
                continue;
            }
            candidate = true;
            match k
                .key
                .verify(&jwt.alg, jwt.signing_input.as_bytes(), &jwt.signature)
            {
                Ok(()) => return Ok(()),
                // A malformed EdDSA signature is the token's fault, whatever the other keys.
                Err(Status::Ed25519SignatureWrongLength) => {
                    return Err(Status::Ed25519SignatureWrongLength);
                }
                Err(_) => {}
            }
        }
        Err(if candidate {
            Status::VerificationFail
        } else {
            Status::JwksKidAlgMismatch
        })
    }
}

impl Key {
    /// Verifies `sig` over `msg` for the token's `alg`. A key of another family than `alg`
    /// never verifies (no algorithm confusion: an RSA public key is never an HMAC secret).
    fn verify(&self, alg: &str, msg: &[u8], sig: &[u8]) -> Result<(), Status> {
        let fail = |_| Status::VerificationFail;
        match (self, alg) {
            (Key::Rsa { n, e }, _) => {
                let params: &signature::RsaParameters = match alg {
                    "RS256" => &signature::RSA_PKCS1_2048_8192_SHA256,
                    "RS384" => &signature::RSA_PKCS1_2048_8192_SHA384,
                    "RS512" => &signature::RSA_PKCS1_2048_8192_SHA512,
                    "PS256" => &signature::RSA_PSS_2048_8192_SHA256,
                    "PS384" => &signature::RSA_PSS_2048_8192_SHA384,
                    "PS512" => &signature::RSA_PSS_2048_8192_SHA512,
                    _ => return Err(Status::VerificationFail),
                };
                signature::RsaPublicKeyComponents {
                    n: n.as_slice(),
                    e: e.as_slice(),
                }
                .verify(params, msg, sig)
                .map_err(fail)
            }
            (Key::Ec { curve, point }, _) => {
                let algorithm = match (curve, alg) {
                    (Curve::P256, "ES256") => &signature::ECDSA_P256_SHA256_FIXED,
                    (Curve::P384, "ES384") => &signature::ECDSA_P384_SHA384_FIXED,
                    _ => return Err(Status::VerificationFail),
                };
                signature::UnparsedPublicKey::new(algorithm, point)
                    .verify(msg, sig)
                    .map_err(fail)
            }
            (Key::Oct(secret), _) => {
                let algorithm = match alg {
                    "HS256" => hmac::HMAC_SHA256,
                    "HS384" => hmac::HMAC_SHA384,
                    "HS512" => hmac::HMAC_SHA512,
                    _ => return Err(Status::VerificationFail),
                };
                // Constant-time comparison inside ring.
                hmac::verify(&hmac::Key::new(algorithm, secret), msg, sig).map_err(fail)
            }
            (Key::Ed25519(x), "EdDSA") => {
                if sig.len() != 64 {
                    return Err(Status::Ed25519SignatureWrongLength);
                }
                signature::UnparsedPublicKey::new(&signature::ED25519, x)
                    .verify(msg, sig)
                    .map_err(fail)
            }
            (Key::Ed25519(_), _) => Err(Status::VerificationFail),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// JWT

/// The algorithms JWS verification knows (jwt_verify_lib's list); anything else, `none`
/// included, is `Jwt header [alg] is not supported`.
const ALGORITHMS: &[&str] = &[
    "ES256", "ES384", "ES512", "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256",
    "PS384", "PS512", "EdDSA",
];

/// A parsed (not yet verified) JWS in compact serialization.
#[derive(Debug, Clone)]
pub struct Jwt<'t> {
    /// `alg` of the header.
    pub alg: String,
    /// `kid` of the header (empty: none).
    pub kid: String,
    /// `iss` (empty: none).
    pub iss: String,
    /// `sub` (empty: none).
    pub sub: String,
    /// `aud`, a string or a list of strings in the token.
    pub audiences: Vec<String>,
    /// `exp` (0: none).
    pub exp: u64,
    /// `nbf` (0: none).
    pub nbf: u64,
    /// The decoded header.
    pub header: Map<String, Json>,
    /// The decoded payload (the claims).
    pub payload: Map<String, Json>,
    /// The payload as it appears in the token (base64url).
    pub payload_b64: &'t str,
    /// `header.payload`: what the signature covers.
    signing_input: &'t str,
    signature: Vec<u8>,
}

fn json_object(bytes: &[u8]) -> Option<Map<String, Json>> {
    match serde_json::from_slice::<Json>(bytes) {
        Ok(Json::Object(m)) => Some(m),
        _ => None,
    }
}

/// jwt_verify_lib's `GetUInt64`: a number in `[0, 2^64)`, truncated; absent is 0.
fn time_claim(
    payload: &Map<String, Json>,
    key: &str,
    not_integer: Status,
    out_of_range: Status,
) -> Result<u64, Status> {
    match payload.get(key) {
        None => Ok(0),
        Some(Json::Number(n)) => {
            if let Some(u) = n.as_u64() {
                return Ok(u);
            }
            match n.as_f64() {
                // 2^64 as f64; the cast truncates a fraction as Envoy's does.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                Some(f) if (0.0..18_446_744_073_709_551_616.0).contains(&f) => Ok(f as u64),
                _ => Err(out_of_range),
            }
        }
        Some(_) => Err(not_integer),
    }
}

fn string_claim(payload: &Map<String, Json>, key: &str, bad: Status) -> Result<String, Status> {
    match payload.get(key) {
        None => Ok(String::new()),
        Some(Json::String(s)) => Ok(s.clone()),
        Some(_) => Err(bad),
    }
}

impl<'t> Jwt<'t> {
    /// Parses `token` as jwt_verify_lib does (`Jwt::parseFromString`), in its order of checks.
    pub fn parse(token: &'t str) -> Result<Jwt<'t>, Status> {
        if token.matches('.').count() != 2 {
            return Err(Status::BadFormat);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(Status::BadFormat);
        };
        // An unsecured JWS (`alg: none`) has an empty signature and ends here.
        if h.is_empty() || p.is_empty() || s.is_empty() {
            return Err(Status::BadFormat);
        }
        let header = b64url(h).ok_or(Status::HeaderBadBase64)?;
        let header = json_object(&header).ok_or(Status::HeaderBadJson)?;
        let alg = match header.get("alg") {
            Some(Json::String(a)) => a.clone(),
            _ => return Err(Status::HeaderBadAlg),
        };
        if !ALGORITHMS.contains(&alg.as_str()) {
            return Err(Status::HeaderNotImplementedAlg);
        }
        let kid = string_claim(&header, "kid", Status::HeaderBadKid)?;
        let payload = b64url(p).ok_or(Status::PayloadBadBase64)?;
        let payload = json_object(&payload).ok_or(Status::PayloadBadJson)?;
        let iss = string_claim(&payload, "iss", Status::IssNotString)?;
        let sub = string_claim(&payload, "sub", Status::SubNotString)?;
        time_claim(
            &payload,
            "iat",
            Status::IatNotInteger,
            Status::IatOutOfRange,
        )?;
        let nbf = time_claim(
            &payload,
            "nbf",
            Status::NbfNotInteger,
            Status::NbfOutOfRange,
        )?;
        let exp = time_claim(
            &payload,
            "exp",
            Status::ExpNotInteger,
            Status::ExpOutOfRange,
        )?;
        string_claim(&payload, "jti", Status::JtiNotString)?;
        let audiences = match payload.get("aud") {
            None => Vec::new(),
            Some(Json::String(a)) => vec![a.clone()],
            Some(Json::Array(list)) => list
                .iter()
                .map(|a| a.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or(Status::AudNotString)?,
            Some(_) => return Err(Status::AudNotString),
        };
        let signature = b64url(s).ok_or(Status::SignatureBadBase64)?;
        Ok(Jwt {
            alg,
            kid,
            iss,
            sub,
            audiences,
            exp,
            nbf,
            header,
            payload,
            payload_b64: p,
            signing_input: &token[..h.len() + 1 + p.len()],
            signature,
        })
    }

    /// `nbf` and `exp` against `now` (Unix seconds), each with `skew` seconds of tolerance.
    pub fn check_time(&self, now: u64, skew: u64) -> Result<(), Status> {
        if now.saturating_add(skew) < self.nbf {
            return Err(Status::NotYetValid);
        }
        if self.exp != 0 && now > self.exp.saturating_add(skew) {
            return Err(Status::Expired);
        }
        Ok(())
    }
}

/// jwt_verify_lib's audience normalisation: the scheme and one trailing slash do not count.
fn sanitize_audience(a: &str) -> &str {
    let a = a
        .strip_prefix("https://")
        .or_else(|| a.strip_prefix("http://"))
        .unwrap_or(a);
    a.strip_suffix('/').unwrap_or(a)
}

/// Whether one of `token` audiences is among `allowed` (none configured: any).
pub fn audiences_allowed(allowed: &[String], token: &[String]) -> bool {
    allowed.is_empty()
        || token.iter().any(|t| {
            allowed
                .iter()
                .any(|a| sanitize_audience(a) == sanitize_audience(t))
        })
}

/// Envoy's `isLifetimeAllowed`: with `require_expiration` an `exp` must be present; with
/// `max_lifetime` the remaining lifetime must also be below it.
fn lifetime_allowed(p: &Provider, jwt: &Jwt<'_>, now: u64) -> bool {
    if !p.require_expiration && p.max_lifetime.is_none() {
        return true;
    }
    if jwt.exp == 0 {
        return false;
    }
    match p.max_lifetime {
        None => true,
        Some(max) => u128::from(jwt.exp.saturating_sub(now)) * 1_000_000_000 < max.as_nanos(),
    }
}

/// Checks the claims of one token for provider `p` as Envoy does before it looks for keys:
/// time, audiences (`audiences` overrides the provider's for `provider_and_audiences`), subject,
/// lifetime. The signature is checked against the provider's keys after this.
pub fn verify_claims(
    p: &Provider,
    jwt: &Jwt<'_>,
    audiences: Option<&[String]>,
    now: u64,
) -> Result<(), Status> {
    jwt.check_time(now, p.clock_skew.as_secs())?;
    if !audiences_allowed(audiences.unwrap_or(&p.audiences), &jwt.audiences) {
        return Err(Status::AudienceNotAllowed);
    }
    if p.subjects.as_ref().is_some_and(|m| !m.matches(&jwt.sub)) {
        return Err(Status::VerificationFail);
    }
    if !lifetime_allowed(p, jwt, now) {
        return Err(Status::VerificationFail);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Token extraction

/// Issuers a location serves (Envoy's `JwtIssuerChecker`): an empty provider issuer allows all.
#[derive(Debug, Default, Clone)]
struct Issuers<'c> {
    any: bool,
    list: BTreeSet<&'c str>,
}

impl<'c> Issuers<'c> {
    fn add(&mut self, issuer: &'c str) {
        if issuer.is_empty() {
            self.any = true;
        } else {
            self.list.insert(issuer);
        }
    }

    fn allows(&self, iss: &str) -> bool {
        self.any || self.list.contains(iss)
    }
}

/// Where a token was found, to remove it after success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found<'c> {
    Header(&'c str),
    Param(&'c str),
    Cookie,
}

/// One extracted token.
#[derive(Debug, Clone)]
struct Token<'c> {
    value: String,
    found: Found<'c>,
    issuers: Issuers<'c>,
}

/// The locations of `providers`, merged like Envoy's extractor (same header and prefix, same
/// parameter, same cookie: one location with the union of issuers), in its order: headers (by
/// name, then prefix), then parameters, then cookies, each sorted.
#[derive(Debug, Default)]
struct Extractor<'c> {
    headers: std::collections::BTreeMap<(&'c str, &'c str), Issuers<'c>>,
    params: std::collections::BTreeMap<&'c str, Issuers<'c>>,
    cookies: std::collections::BTreeMap<&'c str, Issuers<'c>>,
}

impl<'c> Extractor<'c> {
    fn new(providers: impl IntoIterator<Item = &'c Provider>) -> Self {
        let mut x = Extractor::default();
        for p in providers {
            for l in &p.locations {
                match l {
                    TokenLocation::Header { name, value_prefix } => x
                        .headers
                        .entry((name.as_str(), value_prefix.as_str()))
                        .or_default()
                        .add(&p.issuer),
                    TokenLocation::Param(n) => x.params.entry(n).or_default().add(&p.issuer),
                    TokenLocation::Cookie(n) => x.cookies.entry(n).or_default().add(&p.issuer),
                }
            }
        }
        x
    }

    fn extract(&self, parts: &Parts) -> Vec<Token<'c>> {
        let mut out = Vec::new();
        for ((name, prefix), issuers) in &self.headers {
            for v in parts.headers.get_all(*name) {
                let Ok(v) = v.to_str() else { continue };
                let value = if prefix.is_empty() {
                    v
                } else {
                    // Envoy looks for the prefix anywhere in the value, case-sensitively.
                    let Some(at) = v.find(*prefix) else { continue };
                    token_after(v, at + prefix.len())
                };
                out.push(Token {
                    value: value.to_owned(),
                    found: Found::Header(name),
                    issuers: issuers.clone(),
                });
            }
        }
        if !self.params.is_empty()
            && let Some(query) = parts.uri.query()
        {
            for (name, issuers) in &self.params {
                if let Some(v) = query_param(query, name) {
                    out.push(Token {
                        value: v,
                        found: Found::Param(name),
                        issuers: issuers.clone(),
                    });
                }
            }
        }
        for (name, issuers) in &self.cookies {
            if let Some(v) = cookie(parts, name) {
                out.push(Token {
                    value: v,
                    found: Found::Cookie,
                    issuers: issuers.clone(),
                });
            }
        }
        out
    }
}

/// Envoy's `extractJWT`: the value from the first base64url-or-dot character at or after
/// `after`; the whole value when there is none.
fn token_after(value: &str, after: usize) -> &str {
    let rest = value.get(after..).unwrap_or("");
    match rest.find(|c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        Some(i) => &rest[i..],
        None => value,
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            // Two hex digits are below 256.
            out.push(u8::try_from(h * 16 + l).unwrap_or(0));
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first value of query parameter `name`, decoded.
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

/// The first cookie `name` of the request's `cookie` headers, without surrounding quotes.
fn cookie(parts: &Parts, name: &str) -> Option<String> {
    parts
        .headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k.trim() == name).then(|| {
                let v = v.trim();
                v.strip_prefix('"')
                    .and_then(|x| x.strip_suffix('"'))
                    .unwrap_or(v)
                    .to_owned()
            })
        })
}

/// Removes every `name` parameter from the request's query (`forward: false`).
fn remove_param(parts: &mut Parts, name: &str) {
    let Some(pq) = parts.uri.path_and_query() else {
        return;
    };
    let Some(query) = pq.query() else { return };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| percent_decode(pair.split_once('=').map_or(*pair, |(k, _)| k)) != name)
        .collect();
    let new = if kept.is_empty() {
        pq.path().to_owned()
    } else {
        format!("{}?{}", pq.path(), kept.join("&"))
    };
    let mut uri = parts.uri.clone().into_parts();
    let Ok(pq) = new.parse() else { return };
    uri.path_and_query = Some(pq);
    if let Ok(u) = http::Uri::from_parts(uri) {
        parts.uri = u;
    }
}

// ---------------------------------------------------------------------------------------------
// The filter

/// Why jwt_authn answered a request itself: Envoy's local reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// 401, or 403 for disallowed audiences and an unknown per-route `requirement_name`.
    pub status: StatusCode,
    /// The failure (`Jwt is expired`); `%RESPONSE_CODE_DETAILS%` carries it with `_` for spaces.
    pub reason: String,
    /// The response body (empty with `strip_failure_response`).
    pub body: String,
    /// `www-authenticate: Bearer realm="<original URI>"[, error="invalid_token"]`.
    pub www_authenticate: Option<String>,
}

impl Denial {
    /// `jwt_authn_access_denied{Jwt_is_expired}`.
    pub fn details(&self) -> String {
        let reason: String = self
            .reason
            .chars()
            .map(|c| if c.is_whitespace() { '_' } else { c })
            .collect();
        format!("{DETAILS_PREFIX}{{{reason}}}")
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.reason)
    }
}

/// What the filter did to a request it let through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Passed {
    /// A provider with `clear_route_cache` added claim headers: the route must be picked again.
    pub clear_route_cache: bool,
    /// A CORS preflight passed without verification (`bypass_cors_preflight`).
    pub cors_preflight_bypassed: bool,
}

/// Who an authenticator verifies for: one provider, or any provider whose issuer fits
/// (`allow_missing` / `allow_missing_or_failed`).
#[derive(Debug, Clone, Copy)]
enum Who<'c> {
    Provider {
        name: &'c str,
        audiences: Option<&'c [String]>,
    },
    Anyone {
        allow_failed: bool,
    },
}

/// One request's verification: what verified tokens extracted, and whether claim headers asked
/// for a new route.
struct Run<'c> {
    cfg: &'c JwtAuthn,
    now: u64,
    extracted: Map<String, Json>,
    clear_route_cache: bool,
    /// Remote keys fetched for this request (they win over the cache, which a zero-length
    /// `cache_duration` leaves empty).
    fetched: &'c Fetched,
    /// Whether a remote provider without keys may ask for a fetch ([`Run::pending`]) instead of
    /// failing at once.
    can_fetch: bool,
    /// The first remote provider found without keys: the run's outcome is void, the caller
    /// fetches and runs again.
    pending: Option<Arc<RemoteJwks>>,
}

/// Outcomes of the fetches one request waited for.
#[derive(Default)]
struct Fetched(Vec<(Arc<RemoteJwks>, Outcome)>);

impl Fetched {
    fn get(&self, r: &Arc<RemoteJwks>) -> Option<&Outcome> {
        self.0
            .iter()
            .find(|(h, _)| Arc::ptr_eq(h, r))
            .map(|(_, o)| o)
    }
}

/// One pass of the filter over a request.
enum Attempt {
    /// The verdict.
    Done(Result<Passed, Denial>),
    /// A token needs the keys of this remote provider first.
    NeedKeys(Arc<RemoteJwks>),
}

impl<'c> Run<'c> {
    /// Envoy's verifier tree, run synchronously: `requires_any` stops at the first success,
    /// `requires_all` at the first failure.
    fn requirement(&mut self, r: &'c Requirement, parts: &mut Parts) -> Result<(), Status> {
        match r {
            Requirement::Provider { name, audiences } => self.authenticate(
                Who::Provider {
                    name,
                    audiences: audiences.as_deref(),
                },
                parts,
            ),
            Requirement::All(list) => list.iter().try_for_each(|r| self.requirement(r, parts)),
            Requirement::Any {
                of,
                allow_missing,
                allow_missing_or_failed,
            } => {
                if of.is_empty() {
                    // Only allow_missing(_or_failed) members: one authenticator over all
                    // providers.
                    return self.authenticate(
                        Who::Anyone {
                            allow_failed: *allow_missing_or_failed,
                        },
                        parts,
                    );
                }
                let mut failures = Vec::with_capacity(of.len());
                for r in of {
                    match self.requirement(r, parts) {
                        Ok(()) => return Ok(()),
                        Err(s) => failures.push(s),
                    }
                }
                // Envoy's aggregation: an error other than "missing" or "unknown issuer" wins
                // (the last such), then "unknown issuer", then "missing".
                let mut status = Status::Missing;
                for s in failures {
                    if !matches!(s, Status::Missing | Status::UnknownIssuer)
                        || status == Status::Missing
                    {
                        status = s;
                    }
                }
                if *allow_missing_or_failed || (*allow_missing && status == Status::Missing) {
                    Ok(())
                } else {
                    Err(status)
                }
            }
            Requirement::AllowMissingOrFailed => {
                self.authenticate(Who::Anyone { allow_failed: true }, parts)
            }
            Requirement::AllowMissing => self.authenticate(
                Who::Anyone {
                    allow_failed: false,
                },
                parts,
            ),
            Requirement::Nothing => Ok(()),
        }
    }

    /// Envoy's authenticator: verifies every extracted token (the last found first); for a
    /// provider the first failure decides, for `allow_missing*` the last token's result does.
    fn authenticate(&mut self, who: Who<'c>, parts: &mut Parts) -> Result<(), Status> {
        let cfg = self.cfg;
        let (extractor, tolerant, allow_failed) = match who {
            Who::Provider { name, .. } => (Extractor::new(cfg.providers.get(name)), false, false),
            Who::Anyone { allow_failed } => {
                (Extractor::new(cfg.providers.values()), true, allow_failed)
            }
        };
        let mut tokens = extractor.extract(parts);
        let mut status = Err(Status::Missing);
        while let Some(t) = tokens.pop() {
            status = self.verify_token(&t, who, parts);
            if status.is_err() && !tolerant {
                break;
            }
        }
        match status {
            Err(_) if allow_failed => Ok(()),
            Err(Status::Missing) if tolerant => Ok(()),
            other => other,
        }
    }

    fn verify_token(
        &mut self,
        t: &Token<'c>,
        who: Who<'c>,
        parts: &mut Parts,
    ) -> Result<(), Status> {
        let cfg = self.cfg;
        // A fetch is due: nothing else counts until it is done.
        if self.pending.is_some() {
            return Err(Status::JwksFetchFail);
        }
        let jwt = Jwt::parse(&t.value)?;
        if !t.issuers.allows(&jwt.iss) {
            return Err(Status::UnknownIssuer);
        }
        let (provider, audiences) = match who {
            Who::Provider { name, audiences } => (cfg.providers.get(name), audiences),
            Who::Anyone { .. } => (cfg.provider_for_issuer(&jwt.iss), None),
        };
        let provider = provider.ok_or(Status::UnknownIssuer)?;
        verify_claims(provider, &jwt, audiences, self.now)?;
        self.keys(provider)?.verify(&jwt)?;
        self.succeed(provider, t, &jwt, parts);
        Ok(())
    }

    /// The provider's keys: inline, fetched for this request, or cached and fresh. A remote
    /// provider without them fails the token, after recording that a fetch is due when the
    /// caller can fetch.
    fn keys(&mut self, p: &Provider) -> Result<Arc<Jwks>, Status> {
        match &p.jwks {
            JwksSource::Local(k) => Ok(k.clone()),
            JwksSource::Remote(r) => match self.fetched.get(r) {
                Some(Ok(k)) => Ok(k.clone()),
                Some(Err(_)) => Err(Status::JwksFetchFail),
                None => r.fresh().ok_or_else(|| {
                    if self.can_fetch {
                        self.pending = Some(r.clone());
                    }
                    Status::JwksFetchFail
                }),
            },
        }
    }

    /// Envoy's `handleGoodJwt`: payload header, claim headers, token removal, metadata.
    fn succeed(&mut self, p: &Provider, t: &Token<'c>, jwt: &Jwt<'_>, parts: &mut Parts) {
        if let Some(h) = &p.forward_payload_header {
            let mut v = jwt.payload_b64.to_owned();
            if p.pad_forward_payload_header {
                let pad = (4 - v.len() % 4) % 4;
                v.extend(std::iter::repeat_n('=', pad));
            }
            append(parts, h, &v);
        }
        let mut added = false;
        for c in &p.claim_to_headers {
            if let Some(v) = claim_value(&jwt.payload, c) {
                added |= append(parts, &c.header, &v);
            }
        }
        if p.clear_route_cache && added {
            self.clear_route_cache = true;
        }
        if !p.forward {
            match t.found {
                Found::Header(name) => {
                    parts.headers.remove(name);
                }
                Found::Param(name) => remove_param(parts, name),
                // Envoy leaves cookies in place (`forward` has no effect on them).
                Found::Cookie => {}
            }
        }
        if let Some(k) = &p.header_in_metadata {
            self.extracted
                .insert(k.clone(), Json::Object(jwt.header.clone()));
        }
        if let Some(k) = &p.payload_in_metadata {
            let mut payload = jwt.payload.clone();
            normalize(&mut payload, &p.space_delimited_claims);
            self.extracted.insert(k.clone(), Json::Object(payload));
        }
    }
}

/// Appends header `name: value`; false when the value cannot be a header value.
fn append(parts: &mut Parts, name: &str, value: &str) -> bool {
    match (
        http::HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_str(value),
    ) {
        (Ok(n), Ok(v)) => {
            parts.headers.append(n, v);
            true
        }
        _ => false,
    }
}

/// `normalize_payload_in_metadata`: listed claims that are strings become lists of their
/// space-separated words (`scope: "a b"` → `["a", "b"]`), so RBAC can match one scope.
fn normalize(payload: &mut Map<String, Json>, claims: &[String]) {
    for c in claims {
        if let Some(Json::String(s)) = payload.get(c) {
            let words = s
                .split(' ')
                .filter(|w| !w.is_empty())
                .map(|w| Json::String(w.to_owned()))
                .collect();
            payload.insert(c.clone(), Json::Array(words));
        }
    }
}

/// A claim as a header value: strings as they are, integral numbers without a fraction (other
/// numbers as C++ `std::to_string` prints them), booleans as `true`/`false`, lists and objects as
/// base64 of their JSON. `None` for a missing or null claim.
fn claim_value(payload: &Map<String, Json>, c: &ClaimToHeader) -> Option<String> {
    let mut path = c.path.iter();
    let first = path.next()?;
    let value = path.try_fold(payload.get(first)?, |v, k| v.as_object()?.get(k))?;
    match value {
        Json::String(s) => Some(s.clone()),
        Json::Bool(b) => Some(b.to_string()),
        Json::Number(n) => {
            if let Some(u) = n.as_u64() {
                return Some(u.to_string());
            }
            let f = n.as_f64()?;
            if f >= 0.0 && f.fract() == 0.0 && f < 18_446_744_073_709_551_616.0 {
                // Integral and in range: printed as an integer, as Envoy does.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                return Some((f as u64).to_string());
            }
            Some(format!("{f:.6}"))
        }
        Json::Array(_) | Json::Object(_) => Some(STANDARD.encode(value.to_string())),
        Json::Null => None,
    }
}

/// Whether `parts` is a CORS preflight (`OPTIONS` with `origin` and
/// `access-control-request-method`).
fn is_cors_preflight(parts: &Parts) -> bool {
    let present = |h: &str| {
        parts
            .headers
            .get(h)
            .is_some_and(|v| !v.as_bytes().is_empty())
    };
    parts.method == http::Method::OPTIONS
        && present("origin")
        && present("access-control-request-method")
}

/// Envoy's `buildOriginalUri`: `x-forwarded-proto://host/path`, the path cut at 256 bytes.
fn original_uri(parts: &Parts) -> String {
    let scheme = parts
        .headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .or(parts.uri.scheme_str())
        .unwrap_or("http");
    let host = parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
        })
        .unwrap_or("");
    let path = parts.uri.path_and_query().map_or("", |p| p.as_str());
    let mut cut = path.len().min(MAX_REALM_PATH);
    while !path.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{scheme}://{host}{}", &path[..cut])
}

impl JwtAuthn {
    /// The provider Envoy picks for a token outside a provider requirement: the first with this
    /// issuer, else (for a token with an issuer) the first with no issuer.
    fn provider_for_issuer(&self, iss: &str) -> Option<&Provider> {
        let with = |want: &str| self.providers.values().find(|p| p.issuer == want);
        with(iss).or_else(|| if iss.is_empty() { None } else { with("") })
    }

    /// The headers a verified token may set (`forward_payload_header`, `claim_to_headers`):
    /// a client must not be able to send them itself.
    fn sanitize(&self, parts: &mut Parts) {
        for p in self.providers.values() {
            if let Some(h) = &p.forward_payload_header {
                parts.headers.remove(h.as_str());
            }
            for c in &p.claim_to_headers {
                parts.headers.remove(c.header.as_str());
            }
        }
    }

    fn denial(&self, status: StatusCode, reason: String, realm: Option<String>) -> Denial {
        if self.strip_failure_response {
            return Denial {
                status,
                reason,
                body: String::new(),
                www_authenticate: None,
            };
        }
        Denial {
            status,
            body: reason.clone(),
            reason,
            www_authenticate: realm,
        }
    }

    /// Runs the filter on one request without waiting for the network: remote providers use the
    /// keys they have cached, and a token whose provider has none fails as a failed fetch.
    /// `per_route` is the route's `PerRouteConfig`, if any; `now` is Unix seconds. Verified
    /// payloads go to `metadata` under [`METADATA_NAMESPACE`].
    pub fn run(
        &self,
        per_route: Option<&PerRoute>,
        parts: &mut Parts,
        metadata: &mut DynamicMetadata,
        now: u64,
    ) -> Result<Passed, Denial> {
        match self.attempt(per_route, parts, metadata, now, &Fetched::default(), false) {
            Attempt::Done(r) => r,
            // Unreachable without `can_fetch`; failing closed is the safe answer regardless.
            Attempt::NeedKeys(_) => Err(self.denial(
                StatusCode::UNAUTHORIZED,
                Status::JwksFetchFail.to_string(),
                None,
            )),
        }
    }

    /// Runs the filter on one request as Envoy's does: a token whose remote provider has no
    /// fresh keys waits for them to be fetched (one fetch per provider at a time, bounded by
    /// `http_uri.timeout`), then verification goes on where it stopped. Without remote
    /// providers this is [`JwtAuthn::run`].
    pub async fn verify(
        &self,
        per_route: Option<&PerRoute>,
        parts: &mut Parts,
        metadata: &mut DynamicMetadata,
        now: u64,
    ) -> Result<Passed, Denial> {
        if !self.has_remote {
            return self.run(per_route, parts, metadata, now);
        }
        let mut fetched = Fetched::default();
        // Each pass either ends or adds a provider to `fetched`, which never asks again: at most
        // one pass per remote provider, plus one.
        loop {
            // A pass that stops for keys must leave the request as it was (a verified token of
            // another provider may already have been removed), so passes work on a copy.
            let mut trial = parts.clone();
            match self.attempt(per_route, &mut trial, metadata, now, &fetched, true) {
                Attempt::Done(r) => {
                    *parts = trial;
                    return r;
                }
                Attempt::NeedKeys(r) => {
                    let outcome = r.get().await;
                    fetched.0.push((r, outcome));
                }
            }
        }
    }

    /// The filter's counters (`http.<hcm_prefix>.jwt_authn.<stat_prefix>*`), registered on
    /// first use.
    pub fn counters(&self, stats: &crate::stats::Stats, hcm_prefix: &str) -> &Arc<JwtStats> {
        self.stats
            .get_or_init(|| Arc::new(JwtStats::new(stats, hcm_prefix, &self.stat_prefix)))
    }

    /// Lets the remote providers fetch through `dp`'s clusters and count into `stats` (once;
    /// [`super::jwks_fetch::bind_snapshot`] usually did it when the listener was published).
    pub fn bind(&self, dp: &Arc<DataPlane>, stats: &Arc<JwtStats>) {
        if !self.has_remote {
            return;
        }
        for p in self.providers.values() {
            if let JwksSource::Remote(r) = &p.jwks
                && !r.is_bound()
            {
                r.bind(ClusterSource::shared(dp), Some(stats));
            }
        }
    }

    /// One pass: the verdict, or the remote provider whose keys must be fetched first (only
    /// with `can_fetch`; `metadata` is then untouched).
    fn attempt(
        &self,
        per_route: Option<&PerRoute>,
        parts: &mut Parts,
        metadata: &mut DynamicMetadata,
        now: u64,
        fetched: &Fetched,
        can_fetch: bool,
    ) -> Attempt {
        let r = self.pass(per_route, parts, now, fetched, can_fetch);
        match r {
            Pass::NeedKeys(h) => Attempt::NeedKeys(h),
            Pass::Done(result, extracted) => {
                if !extracted.is_empty() {
                    metadata.merge(METADATA_NAMESPACE, extracted);
                }
                Attempt::Done(result)
            }
        }
    }

    fn pass(
        &self,
        per_route: Option<&PerRoute>,
        parts: &mut Parts,
        now: u64,
        fetched: &Fetched,
        can_fetch: bool,
    ) -> Pass {
        let done = |r| Pass::Done(r, Map::new());
        // Before anything else, including requests that skip verification (Envoy's API doc).
        self.sanitize(parts);
        if self.bypass_cors_preflight && is_cors_preflight(parts) {
            return done(Ok(Passed {
                cors_preflight_bypassed: true,
                ..Passed::default()
            }));
        }
        let requirement = match per_route {
            Some(PerRoute::Disabled) => None,
            Some(PerRoute::RequirementName(n)) => match self.requirement_map.get(n) {
                Some(r) => Some(r),
                None => {
                    let names: Vec<&str> =
                        self.requirement_map.keys().map(String::as_str).collect();
                    let reason = format!(
                        "Wrong requirement_name: {n}. It should be one of [{}]",
                        names.join(",")
                    );
                    return done(Err(Denial {
                        status: StatusCode::FORBIDDEN,
                        body: if self.strip_failure_response {
                            String::new()
                        } else {
                            format!("Failed JWT authentication: {reason}")
                        },
                        reason,
                        www_authenticate: None,
                    }));
                }
            },
            None => {
                let view = route_select::RequestView::from_parts(parts);
                self.rules
                    .iter()
                    .find(|r| route_select::route_matches(&r.matcher, &view, rand::random(), false))
                    .and_then(|r| r.requires.as_ref())
            }
        };
        let Some(requirement) = requirement else {
            return done(Ok(Passed::default()));
        };
        let uri = original_uri(parts);
        let mut run = Run {
            cfg: self,
            now,
            extracted: Map::new(),
            clear_route_cache: false,
            fetched,
            can_fetch,
            pending: None,
        };
        let result = run.requirement(requirement, parts);
        if let Some(r) = run.pending {
            return Pass::NeedKeys(r);
        }
        let verdict = match result {
            Ok(()) => Ok(Passed {
                clear_route_cache: run.clear_route_cache,
                cors_preflight_bypassed: false,
            }),
            Err(s) => {
                let status = if s == Status::AudienceNotAllowed {
                    StatusCode::FORBIDDEN
                } else {
                    StatusCode::UNAUTHORIZED
                };
                let realm = if s == Status::Missing {
                    format!("Bearer realm=\"{uri}\"")
                } else {
                    format!("Bearer realm=\"{uri}\", error=\"invalid_token\"")
                };
                Err(self.denial(status, s.to_string(), Some(realm)))
            }
        };
        Pass::Done(verdict, run.extracted)
    }
}

/// What [`JwtAuthn::pass`] ended with.
enum Pass {
    /// The verdict and the metadata verified tokens extracted.
    Done(Result<Passed, Denial>, Map<String, Json>),
    /// Keys must be fetched first.
    NeedKeys(Arc<RemoteJwks>),
}

/// `http.<hcm stat_prefix>.jwt_authn.<filter stat_prefix>` counters (Envoy's names).
#[derive(Debug)]
pub struct JwtStats {
    /// Requests the filter let through (including those no requirement applies to).
    pub allowed: std::sync::Arc<crate::stats::Stat>,
    /// Requests it answered with 401/403.
    pub denied: std::sync::Arc<crate::stats::Stat>,
    /// CORS preflights passed without verification.
    pub cors_preflight_bypassed: std::sync::Arc<crate::stats::Stat>,
    /// Remote JWKS fetches that succeeded.
    pub jwks_fetch_success: std::sync::Arc<crate::stats::Stat>,
    /// Remote JWKS fetches that failed.
    pub jwks_fetch_failed: std::sync::Arc<crate::stats::Stat>,
}

impl JwtStats {
    /// The counters of a filter with `filter_prefix` in an HCM with `hcm_prefix`.
    pub fn new(stats: &crate::stats::Stats, hcm_prefix: &str, filter_prefix: &str) -> JwtStats {
        let name = |n: &str| format!("http.{hcm_prefix}.jwt_authn.{filter_prefix}{n}");
        JwtStats {
            allowed: stats.counter(&name("allowed")),
            denied: stats.counter(&name("denied")),
            cors_preflight_bypassed: stats.counter(&name("cors_preflight_bypassed")),
            jwks_fetch_success: stats.counter(&name("jwks_fetch_success")),
            jwks_fetch_failed: stats.counter(&name("jwks_fetch_failed")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use prost::Message as _;
    use ring::{
        rand::SystemRandom,
        signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair},
    };
    use serde_json::json;
    use waypoint_proto::{
        envoy::extensions::filters::http::jwt_authn::v3::{
            JwtAuthentication, PerRouteConfig as RawPerRoute,
        },
        json as pjson,
    };

    use super::*;
    use crate::http::jwks_fetch::{FetchError, RemoteJwksConfig, Source};

    /// A fixed RSA-2048 key (ring cannot generate RSA keys), shared with `tests/jwt.rs`.
    const RSA_PEM: &str = include_str!("../../tests/data/jwt-rsa-2048.pem");
    const NOW: u64 = 1_700_000_000;
    const ISS: &str = "https://issuer.example";

    struct Keys {
        rsa: RsaKeyPair,
        ec256: EcdsaKeyPair,
        ec384: EcdsaKeyPair,
        ed: Ed25519KeyPair,
        hmac: Vec<u8>,
        other_ec256: EcdsaKeyPair,
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        STANDARD.decode(b64).expect("pem base64")
    }

    fn keys() -> &'static Keys {
        static KEYS: OnceLock<Keys> = OnceLock::new();
        KEYS.get_or_init(|| {
            let rng = SystemRandom::new();
            let ec = |alg| {
                let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("ec keygen");
                EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("ec key")
            };
            let ed = Ed25519KeyPair::generate_pkcs8(&rng).expect("ed keygen");
            Keys {
                rsa: RsaKeyPair::from_pkcs8(&pem_der(RSA_PEM)).expect("rsa key"),
                ec256: ec(&signature::ECDSA_P256_SHA256_FIXED_SIGNING),
                ec384: ec(&signature::ECDSA_P384_SHA384_FIXED_SIGNING),
                ed: Ed25519KeyPair::from_pkcs8(ed.as_ref()).expect("ed key"),
                hmac: b"a shared secret of thirty-two bytes!".to_vec(),
                other_ec256: ec(&signature::ECDSA_P256_SHA256_FIXED_SIGNING),
            }
        })
    }

    fn enc(b: &[u8]) -> String {
        B64URL.encode(b)
    }

    fn jwk_rsa(kid: &str) -> Json {
        let c: signature::RsaPublicKeyComponents<Vec<u8>> = keys().rsa.public().into();
        json!({"kty": "RSA", "kid": kid, "n": enc(&c.n), "e": enc(&c.e)})
    }

    fn jwk_ec(k: &EcdsaKeyPair, crv: &str, kid: &str) -> Json {
        let p = k.public_key().as_ref();
        let len = (p.len() - 1) / 2;
        json!({"kty": "EC", "crv": crv, "kid": kid, "x": enc(&p[1..=len]), "y": enc(&p[1 + len..])})
    }

    fn jwk_ed(kid: &str) -> Json {
        json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": enc(keys().ed.public_key().as_ref())})
    }

    fn jwk_oct(kid: &str) -> Json {
        json!({"kty": "oct", "kid": kid, "k": enc(&keys().hmac)})
    }

    /// Every key kind, one JWKS.
    fn all_keys() -> Json {
        let k = keys();
        json!({"keys": [jwk_rsa("rsa"), jwk_ec(&k.ec256, "P-256", "ec256"),
            jwk_ec(&k.ec384, "P-384", "ec384"), jwk_ed("ed"), jwk_oct("oct")]})
    }

    fn sign_with(alg: &str, msg: &[u8]) -> Vec<u8> {
        let k = keys();
        let rng = SystemRandom::new();
        let rsa = |pad: &'static dyn signature::RsaEncoding| {
            let mut sig = vec![0; k.rsa.public().modulus_len()];
            k.rsa.sign(pad, &rng, msg, &mut sig).expect("rsa sign");
            sig
        };
        match alg {
            "RS256" => rsa(&signature::RSA_PKCS1_SHA256),
            "RS384" => rsa(&signature::RSA_PKCS1_SHA384),
            "RS512" => rsa(&signature::RSA_PKCS1_SHA512),
            "PS256" => rsa(&signature::RSA_PSS_SHA256),
            "PS384" => rsa(&signature::RSA_PSS_SHA384),
            "PS512" => rsa(&signature::RSA_PSS_SHA512),
            "ES256" => k.ec256.sign(&rng, msg).expect("sign").as_ref().to_vec(),
            "ES384" => k.ec384.sign(&rng, msg).expect("sign").as_ref().to_vec(),
            "EdDSA" => k.ed.sign(msg).as_ref().to_vec(),
            "HS256" | "HS384" | "HS512" => {
                let a = match alg {
                    "HS256" => hmac::HMAC_SHA256,
                    "HS384" => hmac::HMAC_SHA384,
                    _ => hmac::HMAC_SHA512,
                };
                hmac::sign(&hmac::Key::new(a, &k.hmac), msg)
                    .as_ref()
                    .to_vec()
            }
            other => panic!("no signer for {other}"),
        }
    }

    /// A compact JWS with `header` (alg is taken from it) over `claims`.
    fn token_with(header: &Json, claims: &Json) -> String {
        let alg = header["alg"].as_str().expect("alg");
        let input = format!(
            "{}.{}",
            enc(header.to_string().as_bytes()),
            enc(claims.to_string().as_bytes())
        );
        let sig = sign_with(alg, input.as_bytes());
        format!("{input}.{}", enc(&sig))
    }

    fn token(alg: &str, claims: &Json) -> String {
        token_with(&json!({"alg": alg, "typ": "JWT"}), claims)
    }

    fn claims() -> Json {
        json!({"iss": ISS, "sub": "alice", "aud": "svc", "exp": NOW + 600, "iat": NOW})
    }

    /// A provider `p` for [`ISS`] with `extra` fields and the JWKS `jwks`, compiled.
    fn provider_json(extra: &Json, jwks: &Json) -> Json {
        let mut p = json!({"issuer": ISS, "local_jwks": {"inline_string": jwks.to_string()}});
        if let (Json::Object(p), Json::Object(e)) = (&mut p, extra) {
            p.extend(e.clone());
        }
        p
    }

    fn compile(doc: &Json) -> JwtAuthn {
        let dynamic = pjson::dynamic_from_json(
            "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            doc,
        )
        .expect("jwt_authn json");
        let raw = JwtAuthentication::decode(dynamic.encode_to_vec().as_slice()).expect("decodes");
        JwtAuthn::compile(&raw, "jwt").expect("compiles")
    }

    /// Istio's shape for one RequestAuthentication rule: any of {origins-0, allow_missing}.
    fn istio(provider_extra: &Json) -> JwtAuthn {
        compile(&json!({
            "providers": {"origins-0": provider_json(provider_extra, &all_keys())},
            "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": [
                {"provider_name": "origins-0"}, {"allow_missing": {}}]}}}],
            "bypass_cors_preflight": true}))
    }

    fn request(path: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder()
            .uri(path)
            .header("host", "svc.local")
            .header("x-forwarded-proto", "http");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    fn bearer(t: &str) -> String {
        format!("Bearer {t}")
    }

    fn run(cfg: &JwtAuthn, parts: &mut Parts) -> (Result<Passed, Denial>, DynamicMetadata) {
        let mut md = DynamicMetadata::default();
        let r = cfg.run(None, parts, &mut md, NOW);
        (r, md)
    }

    fn verify(jwks: &Json, t: &str) -> Result<(), Status> {
        let jwks = Jwks::parse(&jwks.to_string()).expect("jwks");
        let jwt = Jwt::parse(t)?;
        jwks.verify(&jwt)
    }

    #[test]
    fn every_algorithm_verifies_and_a_bad_signature_fails() {
        for alg in [
            "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
            "HS256", "HS384", "HS512",
        ] {
            let t = token(alg, &claims());
            assert_eq!(verify(&all_keys(), &t), Ok(()), "{alg}");
            // One flipped bit in the payload: the signature no longer covers it.
            let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
            let mut payload = b64url(&parts[1]).expect("payload");
            payload[2] ^= 1;
            parts[1] = enc(&payload);
            let forged = parts.join(".");
            let r = verify(&all_keys(), &forged);
            assert!(matches!(r, Err(Status::VerificationFail)), "{alg}: {r:?}");
        }
        // A signature by another P-256 key.
        let rng = SystemRandom::new();
        let input = format!(
            "{}.{}",
            enc(br#"{"alg":"ES256"}"#),
            enc(claims().to_string().as_bytes())
        );
        let sig = keys()
            .other_ec256
            .sign(&rng, input.as_bytes())
            .expect("sign");
        let t = format!("{input}.{}", enc(sig.as_ref()));
        assert_eq!(verify(&all_keys(), &t), Err(Status::VerificationFail));
        // EdDSA signatures have one length.
        let t = format!(
            "{}.{}.{}",
            enc(br#"{"alg":"EdDSA"}"#),
            enc(b"{}"),
            enc(&[1; 63])
        );
        assert_eq!(
            verify(&all_keys(), &t),
            Err(Status::Ed25519SignatureWrongLength)
        );
    }

    #[test]
    fn kid_selects_the_key_and_alg_must_fit() {
        let k = keys();
        let jwks =
            json!({"keys": [jwk_ec(&k.other_ec256, "P-256", "a"), jwk_ec(&k.ec256, "P-256", "b")]});
        let with_kid = |kid: &str| token_with(&json!({"alg": "ES256", "kid": kid}), &claims());
        assert_eq!(verify(&jwks, &with_kid("b")), Ok(()));
        assert_eq!(
            verify(&jwks, &with_kid("a")),
            Err(Status::VerificationFail),
            "kid a names the wrong key"
        );
        assert_eq!(
            verify(&jwks, &with_kid("c")),
            Err(Status::JwksKidAlgMismatch)
        );
        assert_eq!(
            verify(&jwks, &token("ES256", &claims())),
            Ok(()),
            "no kid: every key is tried"
        );
        // A key with `alg` only serves that alg.
        let mut rsa = jwk_rsa("r");
        rsa["alg"] = json!("RS384");
        let jwks = json!({ "keys": [rsa] });
        assert_eq!(verify(&jwks, &token("RS384", &claims())), Ok(()));
        assert_eq!(
            verify(&jwks, &token("RS256", &claims())),
            Err(Status::JwksKidAlgMismatch)
        );
    }

    #[test]
    fn alg_none_and_algorithm_confusion_are_refused() {
        let none = format!(
            "{}.{}.",
            enc(br#"{"alg":"none"}"#),
            enc(claims().to_string().as_bytes())
        );
        assert_eq!(Jwt::parse(&none).err(), Some(Status::BadFormat));
        let none = format!(
            "{}.{}.{}",
            enc(br#"{"alg":"none"}"#),
            enc(claims().to_string().as_bytes()),
            enc(b"x")
        );
        assert_eq!(
            Jwt::parse(&none).err(),
            Some(Status::HeaderNotImplementedAlg)
        );
        // HS256 "signed" with the RSA public key as the secret: RSA keys are never HMAC keys.
        let c: signature::RsaPublicKeyComponents<Vec<u8>> = keys().rsa.public().into();
        let input = format!(
            "{}.{}",
            enc(br#"{"alg":"HS256"}"#),
            enc(claims().to_string().as_bytes())
        );
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &c.n), input.as_bytes());
        let t = format!("{input}.{}", enc(tag.as_ref()));
        assert_eq!(
            verify(&json!({"keys": [jwk_rsa("r")]}), &t),
            Err(Status::VerificationFail)
        );
    }

    #[test]
    fn malformed_tokens_report_jwt_verify_lib_statuses() {
        let h = enc(br#"{"alg":"RS256"}"#);
        let p = enc(br#"{"iss":"x"}"#);
        let cases = [
            ("a.b".to_owned(), Status::BadFormat),
            ("a.b.c.d".to_owned(), Status::BadFormat),
            (format!("{h}..x"), Status::BadFormat),
            (format!("!!.{p}.x"), Status::HeaderBadBase64),
            (format!("{}.{p}.x", enc(b"[1]")), Status::HeaderBadJson),
            (
                format!("{}.{p}.x", enc(br#"{"alg":5}"#)),
                Status::HeaderBadAlg,
            ),
            (
                format!("{}.{p}.x", enc(br#"{"alg":"RS256","kid":1}"#)),
                Status::HeaderBadKid,
            ),
            (format!("{h}.!!.x"), Status::PayloadBadBase64),
            (format!("{h}.{}.x", enc(b"nope")), Status::PayloadBadJson),
            (
                format!("{h}.{}.x", enc(br#"{"iss":1}"#)),
                Status::IssNotString,
            ),
            (
                format!("{h}.{}.x", enc(br#"{"sub":[]}"#)),
                Status::SubNotString,
            ),
            (
                format!("{h}.{}.x", enc(br#"{"exp":"1"}"#)),
                Status::ExpNotInteger,
            ),
            (
                format!("{h}.{}.x", enc(br#"{"exp":-1}"#)),
                Status::ExpOutOfRange,
            ),
            (
                format!("{h}.{}.x", enc(br#"{"nbf":true}"#)),
                Status::NbfNotInteger,
            ),
            (
                format!("{h}.{}.x", enc(br#"{"aud":["a",1]}"#)),
                Status::AudNotString,
            ),
            (format!("{h}.{p}.!!"), Status::SignatureBadBase64),
        ];
        for (t, want) in cases {
            assert_eq!(Jwt::parse(&t).err(), Some(want), "{t}");
        }
        // Padded base64url is accepted, as absl accepts it; `aud` may be a string or a list.
        let t = format!(
            "{h}.{}.{}",
            B64URL.encode(br#"{"aud":["a","b"],"exp":1.5}"#),
            "eA=="
        );
        let jwt = Jwt::parse(&t).expect("parses");
        assert_eq!(jwt.audiences, ["a", "b"]);
        assert_eq!(jwt.exp, 1, "a fractional exp is truncated");
    }

    #[test]
    fn jwks_parsing_skips_bad_keys_and_refuses_what_ring_cannot_verify() {
        let good = jwk_rsa("r");
        let jwks = Jwks::parse(
            &json!({"keys": [{"kty": "RSA", "n": "AQAB", "e": "Bw"}, {"kid": "x"}, 7,
                {"kty": "oct", "alg": "RS256", "k": "AA"}, good]})
            .to_string(),
        )
        .expect("parses");
        assert_eq!(jwks.len(), 1, "{jwks:?}");
        assert!(
            jwks.problem().is_some_and(|p| p.contains("RSA")),
            "the first problem is kept: {:?}",
            jwks.problem()
        );
        for bad in [
            "not json",
            "[]",
            r#"{"keys": {}}"#,
            r#"{"other": 1}"#,
            r#"{"keys": []}"#,
        ] {
            let j = Jwks::parse(bad).expect("accepted like Envoy");
            assert!(j.is_empty() && j.problem().is_some(), "{bad}");
        }
        let p521 = json!({"keys": [{"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}]});
        assert_eq!(
            Jwks::parse(&p521.to_string()).err(),
            Some(JwksUnsupported::P521(0))
        );
        let x509 = json!({"k1": "-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n"});
        assert_eq!(
            Jwks::parse(&x509.to_string()).err(),
            Some(JwksUnsupported::X509)
        );
        // A provider whose JWKS has no usable key fails every token, as Envoy does.
        let empty = Jwks::parse("{}").expect("accepted");
        let t = token("RS256", &claims());
        let jwt = Jwt::parse(&t).expect("parses");
        assert_eq!(empty.verify(&jwt), Err(Status::JwksNoValidKeys));
        // An EC key without crv or alg is P-256; a short coordinate is left-padded.
        let mut ec = jwk_ec(&keys().ec256, "P-256", "e");
        ec.as_object_mut().map(|o| o.remove("crv"));
        assert_eq!(
            verify(&json!({ "keys": [ec] }), &token("ES256", &claims())),
            Ok(())
        );
    }

    #[test]
    fn time_claims_use_the_clock_skew() {
        let t = |c: Json| token("ES256", &c);
        let jwt = |s: &str| Jwt::parse(s).map(|j| j.check_time(NOW, 60)).and_then(|r| r);
        assert_eq!(jwt(&t(json!({"exp": NOW - 60}))), Ok(()), "within skew");
        assert_eq!(jwt(&t(json!({"exp": NOW - 61}))), Err(Status::Expired));
        assert_eq!(jwt(&t(json!({"nbf": NOW + 60}))), Ok(()));
        assert_eq!(jwt(&t(json!({"nbf": NOW + 61}))), Err(Status::NotYetValid));
        assert_eq!(jwt(&t(json!({}))), Ok(()), "no exp: no expiry");
    }

    #[test]
    fn audiences_ignore_scheme_and_trailing_slash() {
        let allowed = vec!["https://svc.example/".to_owned(), "other".to_owned()];
        assert!(audiences_allowed(&allowed, &["svc.example".to_owned()]));
        assert!(audiences_allowed(
            &allowed,
            &["http://svc.example".to_owned()]
        ));
        assert!(audiences_allowed(
            &allowed,
            &["x".to_owned(), "other/".to_owned()]
        ));
        assert!(!audiences_allowed(
            &allowed,
            &["svc.example.evil".to_owned()]
        ));
        assert!(!audiences_allowed(&allowed, &[]));
        assert!(audiences_allowed(&[], &[]), "none configured: any");
    }

    #[test]
    fn claim_rules_issuer_audience_subject_lifetime() {
        let cfg = istio(&json!({"audiences": ["svc"], "subjects": {"prefix": "al"},
            "max_lifetime": "3600s", "clock_skew_seconds": 10}));
        let check = |c: Json| {
            let mut parts = request("/", &[("authorization", &bearer(&token("RS256", &c)))]);
            run(&cfg, &mut parts)
                .0
                .map_err(|d| (d.status.as_u16(), d.reason))
        };
        assert!(check(claims()).is_ok());
        let mut c = claims();
        c["exp"] = json!(NOW - 11);
        assert_eq!(check(c), Err((401, "Jwt is expired".into())));
        let mut c = claims();
        c["iss"] = json!("https://elsewhere");
        assert_eq!(check(c), Err((401, "Jwt issuer is not configured".into())));
        let mut c = claims();
        c["aud"] = json!(["a", "b"]);
        assert_eq!(
            check(c),
            Err((403, "Audiences in Jwt are not allowed".into()))
        );
        let mut c = claims();
        c["sub"] = json!("bob");
        assert_eq!(check(c), Err((401, "Jwt verification fails".into())));
        let mut c = claims();
        c["exp"] = json!(NOW + 3600);
        assert_eq!(
            check(c),
            Err((401, "Jwt verification fails".into())),
            "max_lifetime: the remaining lifetime must be below it"
        );
        let mut c = claims();
        c.as_object_mut().map(|o| o.remove("exp"));
        assert_eq!(
            check(c),
            Err((401, "Jwt verification fails".into())),
            "max_lifetime needs exp"
        );
        let cfg = istio(&json!({"require_expiration": true}));
        let mut c = claims();
        c.as_object_mut().map(|o| o.remove("exp"));
        let mut parts = request("/", &[("authorization", &bearer(&token("ES256", &c)))]);
        assert!(run(&cfg, &mut parts).0.is_err());
        let mut parts = request(
            "/",
            &[("authorization", &bearer(&token("ES256", &claims())))],
        );
        assert!(run(&cfg, &mut parts).0.is_ok());
    }

    #[test]
    fn istio_requirement_missing_passes_invalid_fails_with_a_challenge() {
        let cfg = istio(&json!({"payload_in_metadata": "payload"}));
        let mut parts = request("/x?y=1", &[]);
        let (r, md) = run(&cfg, &mut parts);
        assert_eq!(r, Ok(Passed::default()), "no token: allow_missing");
        assert!(md.is_empty());
        // `e30` is `{}`: a header without alg.
        let mut parts = request("/x?y=1", &[("authorization", "Bearer e30.e30.e30")]);
        let d = run(&cfg, &mut parts).0.expect_err("invalid");
        assert_eq!(d.status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            d.body,
            "Jwt header [alg] field is required and must be a string"
        );
        assert_eq!(
            d.www_authenticate.as_deref(),
            Some(r#"Bearer realm="http://svc.local/x?y=1", error="invalid_token""#)
        );
        assert_eq!(
            d.details(),
            "jwt_authn_access_denied{Jwt_header_[alg]_field_is_required_and_must_be_a_string}"
        );
        // The Bearer prefix is case-sensitive in Envoy: another scheme is no token.
        let mut parts = request("/", &[("authorization", "bearer x.y.z")]);
        assert!(run(&cfg, &mut parts).0.is_ok());
        // A required provider: missing is 401 without error=.
        let cfg = compile(&json!({
            "providers": {"p": provider_json(&json!({}), &all_keys())},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "p"}}]}));
        let d = run(&cfg, &mut request("/a", &[])).0.expect_err("required");
        assert_eq!(
            (d.status.as_u16(), d.body.as_str()),
            (401, "Jwt is missing")
        );
        assert_eq!(
            d.www_authenticate.as_deref(),
            Some(r#"Bearer realm="http://svc.local/a""#)
        );
    }

    #[test]
    fn success_removes_the_token_copies_claims_and_publishes_the_payload() {
        let cfg = istio(&json!({
            "payload_in_metadata": "payload", "header_in_metadata": "header",
            "normalize_payload_in_metadata": {"space_delimited_claims": ["scope"]},
            "forward_payload_header": "x-jwt-payload", "pad_forward_payload_header": true,
            "claim_to_headers": [{"header_name": "x-sub", "claim_name": "sub"},
                {"header_name": "x-level", "claim_name": "org.level"},
                {"header_name": "x-url", "claim_path": [{"key": "https://e.com/role"}]},
                {"header_name": "x-groups", "claim_name": "groups"},
                {"header_name": "x-pi", "claim_name": "pi"}]}));
        let mut c = claims();
        c["scope"] = json!("read  write");
        c["org"] = json!({"level": 3});
        c["https://e.com/role"] = json!("admin");
        c["groups"] = json!(["a", "b"]);
        c["pi"] = json!(3.5);
        let t = token("PS256", &c);
        let mut parts = request(
            "/",
            &[
                ("authorization", &bearer(&t)),
                ("x-sub", "spoofed"),
                ("x-jwt-payload", "spoofed"),
            ],
        );
        let (r, md) = run(&cfg, &mut parts);
        assert_eq!(r, Ok(Passed::default()));
        assert!(
            parts.headers.get("authorization").is_none(),
            "forward: false"
        );
        let h = |n: &str| {
            parts
                .headers
                .get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap_or("?").to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(h("x-sub"), ["alice"], "the client's copy is replaced");
        assert_eq!(h("x-level"), ["3"]);
        assert_eq!(h("x-url"), ["admin"]);
        assert_eq!(h("x-groups"), [STANDARD.encode(r#"["a","b"]"#)]);
        assert_eq!(h("x-pi"), ["3.500000"]);
        let payload = &h("x-jwt-payload")[0];
        assert_eq!(payload.len() % 4, 0, "padded");
        assert_eq!(
            payload.trim_end_matches('='),
            t.split('.').nth(1).expect("payload")
        );
        let path = |k: &[&str]| k.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            md.value(METADATA_NAMESPACE, &path(&["payload", "sub"])),
            Some(&json!("alice"))
        );
        assert_eq!(
            md.value(METADATA_NAMESPACE, &path(&["payload", "scope"])),
            Some(&json!(["read", "write"]))
        );
        assert_eq!(
            md.value(METADATA_NAMESPACE, &path(&["header", "alg"])),
            Some(&json!("PS256"))
        );
        // forward: true keeps it; a query token goes from the query.
        let cfg = istio(&json!({"forward": true}));
        let mut parts = request("/", &[("authorization", &bearer(&t))]);
        assert!(run(&cfg, &mut parts).0.is_ok());
        assert!(parts.headers.get("authorization").is_some());
        let cfg = istio(&json!({}));
        let mut parts = request(&format!("/p?a=1&access_token={t}&b=2"), &[]);
        assert!(run(&cfg, &mut parts).0.is_ok());
        assert_eq!(parts.uri.to_string(), "/p?a=1&b=2");
    }

    #[test]
    fn locations_headers_params_and_cookies() {
        let cfg = istio(
            &json!({"from_headers": [{"name": "x-token", "value_prefix": "Tok "}],
            "from_params": ["jwt"], "from_cookies": ["session"]}),
        );
        let t = token("EdDSA", &claims());
        for (path, headers) in [
            ("/", vec![("x-token", format!("Tok  {t}"))]),
            (&*format!("/?jwt={t}"), vec![]),
            ("/", vec![("cookie", format!("a=b; session=\"{t}\""))]),
        ] {
            let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let mut parts = request(path, &hs);
            let (r, _) = run(&cfg, &mut parts);
            assert!(r.is_ok(), "{path} {headers:?}: {r:?}");
        }
        // The default locations are off once any location is configured.
        let mut parts = request("/", &[("authorization", "Bearer junk")]);
        assert!(run(&cfg, &mut parts).0.is_ok(), "authorization is not read");
        let mut parts = request("/", &[("cookie", "session=junk")]);
        assert!(run(&cfg, &mut parts).0.is_err());
    }

    #[test]
    fn requirement_map_per_route_rules_and_cors() {
        let cfg = compile(&json!({
            "providers": {"p": provider_json(&json!({}), &all_keys()),
                "q": {"issuer": "other", "audiences": ["q"],
                    "local_jwks": {"inline_string": all_keys().to_string()}}},
            "rules": [{"match": {"prefix": "/open"}},
                {"match": {"prefix": "/empty"}, "requires": {}},
                {"match": {"prefix": "/"}, "requires": {"provider_name": "p"}}],
            "requirement_map": {"audq": {"provider_and_audiences": {"provider_name": "p",
                "audiences": ["svc"]}},
                "both": {"requires_all": {"requirements": [{"provider_name": "p"},
                    {"allow_missing_or_failed": {}}]}}},
            "bypass_cors_preflight": true}));
        let good = bearer(&token("ES384", &claims()));
        assert!(
            run(&cfg, &mut request("/open/x", &[])).0.is_ok(),
            "no requirement"
        );
        assert!(
            run(&cfg, &mut request("/empty", &[])).0.is_ok(),
            "empty requirement"
        );
        assert!(run(&cfg, &mut request("/api", &[])).0.is_err());
        assert!(
            run(&cfg, &mut request("/api", &[("authorization", &good)]))
                .0
                .is_ok()
        );
        let cors = [
            ("origin", "https://a"),
            ("access-control-request-method", "GET"),
        ];
        let mut preflight = request("/api", &cors);
        preflight.method = http::Method::OPTIONS;
        assert_eq!(
            run(&cfg, &mut preflight).0,
            Ok(Passed {
                cors_preflight_bypassed: true,
                clear_route_cache: false
            })
        );
        let per_route = |doc: Json| {
            let d = pjson::dynamic_from_json(
                "envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig",
                &doc,
            )
            .expect("json");
            let raw = RawPerRoute::decode(d.encode_to_vec().as_slice()).expect("decodes");
            PerRoute::compile(&raw, "r").expect("compiles")
        };
        let mut md = DynamicMetadata::default();
        let disabled = per_route(json!({"disabled": true}));
        assert!(
            cfg.run(Some(&disabled), &mut request("/api", &[]), &mut md, NOW)
                .is_ok()
        );
        let audq = per_route(json!({"requirement_name": "audq"}));
        let mut other_aud = claims();
        other_aud["aud"] = json!("q");
        let r = cfg.run(
            Some(&audq),
            &mut request(
                "/api",
                &[("authorization", &bearer(&token("ES384", &other_aud)))],
            ),
            &mut md,
            NOW,
        );
        assert_eq!(r.map_err(|d| d.status.as_u16()), Err(403));
        let both = per_route(json!({"requirement_name": "both"}));
        assert!(
            cfg.run(
                Some(&both),
                &mut request("/", &[("authorization", &good)]),
                &mut md,
                NOW
            )
            .is_ok()
        );
        let wrong = per_route(json!({"requirement_name": "nope"}));
        let d = cfg
            .run(Some(&wrong), &mut request("/", &[]), &mut md, NOW)
            .expect_err("unknown name");
        assert_eq!(d.status, StatusCode::FORBIDDEN);
        assert_eq!(
            d.body,
            "Failed JWT authentication: Wrong requirement_name: nope. It should be one of [audq,both]"
        );
        assert_eq!(d.www_authenticate, None);
        assert!(
            PerRoute::compile(&RawPerRoute::default(), "r").is_err(),
            "one of the two is required"
        );
    }

    #[test]
    fn istio_multi_provider_shape_and_strip_failure_response() {
        // istiod's translation of two jwtRules: any{p0, p1, all{any{p0, allow_missing},
        // any{p1, allow_missing}}}.
        let k = keys();
        let any_missing = |p: &str| {
            json!({"requires_any": {"requirements": [
            {"provider_name": p}, {"allow_missing": {}}]}})
        };
        let cfg = compile(&json!({
            "providers": {
                "origins-0": provider_json(&json!({}), &json!({"keys": [jwk_rsa("r")]})),
                "origins-1": {"issuer": "second", "local_jwks": {"inline_string":
                    json!({"keys": [jwk_ec(&k.ec256, "P-256", "e")]}).to_string()}}},
            "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": [
                {"provider_name": "origins-0"}, {"provider_name": "origins-1"},
                {"requires_all": {"requirements": [any_missing("origins-0"), any_missing("origins-1")]}}]}}}],
            "strip_failure_response": true}));
        let mut second = claims();
        second["iss"] = json!("second");
        assert!(run(&cfg, &mut request("/", &[])).0.is_ok());
        for t in [token("RS256", &claims()), token("ES256", &second)] {
            let r = run(&cfg, &mut request("/", &[("authorization", &bearer(&t))])).0;
            assert!(r.is_ok(), "{r:?}");
        }
        // Signed by the wrong provider's key.
        let d = run(
            &cfg,
            &mut request(
                "/",
                &[("authorization", &bearer(&token("ES256", &claims())))],
            ),
        )
        .0
        .expect_err("wrong key");
        assert_eq!(d.reason, "Jwt verification fails");
        assert_eq!(
            (d.body.as_str(), d.www_authenticate),
            ("", None),
            "stripped"
        );
        let mut third = claims();
        third["iss"] = json!("third");
        let d = run(
            &cfg,
            &mut request("/", &[("authorization", &bearer(&token("RS256", &third)))]),
        )
        .0
        .expect_err("unknown issuer");
        assert_eq!(d.reason, "Jwt issuer is not configured");
    }

    #[test]
    fn allow_missing_or_failed_passes_bad_tokens_without_metadata() {
        let cfg = compile(&json!({
            "providers": {"p": provider_json(&json!({"payload_in_metadata": "payload"}), &all_keys())},
            "rules": [{"match": {"prefix": "/"}, "requires": {"allow_missing_or_failed": {}}}]}));
        let mut expired = claims();
        expired["exp"] = json!(NOW - 1000);
        let (r, md) = run(
            &cfg,
            &mut request(
                "/",
                &[("authorization", &bearer(&token("HS384", &expired)))],
            ),
        );
        assert!(r.is_ok());
        assert!(md.is_empty(), "a failed token publishes nothing");
        let (r, md) = run(
            &cfg,
            &mut request(
                "/",
                &[("authorization", &bearer(&token("HS384", &claims())))],
            ),
        );
        assert!(r.is_ok());
        assert!(!md.is_empty());
    }

    /// Serves `jwks` (or fails), counting fetches.
    struct Served(Option<Json>, std::sync::atomic::AtomicUsize);

    impl Source for Served {
        fn fetch(
            &self,
            _: Arc<RemoteJwksConfig>,
        ) -> futures::future::BoxFuture<'static, Result<Jwks, FetchError>> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let r = match &self.0 {
                Some(j) => {
                    Jwks::parse(&j.to_string()).map_err(|e| FetchError::InvalidJwks(e.to_string()))
                }
                None => Err(FetchError::Status(503)),
            };
            Box::pin(async move { r })
        }
    }

    #[tokio::test]
    async fn remote_keys_are_fetched_as_tokens_need_them() {
        let remote = |iss: &str, extra: Json| {
            let mut p = json!({"issuer": iss, "remote_jwks": {"http_uri": {
                "uri": "http://jwks.local/keys", "cluster": "jwks", "timeout": "1s"}}});
            if let (Json::Object(p), Json::Object(e)) = (&mut p, extra) {
                p.extend(e);
            }
            p
        };
        let cfg = compile(&json!({
            "providers": {"a": remote(ISS, json!({})),
                "b": remote("second", json!({"from_headers": [{"name": "x-second"}]}))},
            "rules": [{"match": {"prefix": "/only-a"}, "requires": {"provider_name": "a"}},
                {"match": {"prefix": "/"}, "requires": {"requires_all": {"requirements": [
                {"provider_name": "a"}, {"provider_name": "b"}]}}}]}));
        assert!(cfg.has_remote);
        let good = Arc::new(Served(Some(all_keys()), Default::default()));
        let down = Arc::new(Served(None, Default::default()));
        for (name, source) in [("a", good.clone()), ("b", down.clone())] {
            let JwksSource::Remote(r) = &cfg.providers[name].jwks else {
                panic!("remote")
            };
            r.bind(source, None);
        }
        let calls = |s: &Served| s.1.load(std::sync::atomic::Ordering::SeqCst);
        let a = bearer(&token("ES256", &claims()));
        let mut second = claims();
        second["iss"] = json!("second");
        let b = token("ES256", &second);
        // Without waiting (`run`), nothing is cached: the token fails as a failed fetch.
        let d = run(&cfg, &mut request("/only-a", &[("authorization", &a)]))
            .0
            .expect_err("no keys yet");
        assert_eq!(d.body, "Jwks remote fetch is failed");
        assert_eq!(calls(&good), 0, "run never fetches");
        // a's keys arrive, b's fetch fails: Envoy's 401 with its reason.
        let mut md = DynamicMetadata::default();
        let mut parts = request("/", &[("authorization", &a), ("x-second", &b)]);
        let d = cfg
            .verify(None, &mut parts, &mut md, NOW)
            .await
            .expect_err("b has no keys");
        assert_eq!(
            (d.status, d.body.as_str()),
            (StatusCode::UNAUTHORIZED, "Jwks remote fetch is failed")
        );
        assert_eq!(
            d.www_authenticate.as_deref(),
            Some(r#"Bearer realm="http://svc.local/", error="invalid_token""#)
        );
        assert_eq!((calls(&good), calls(&down)), (1, 1));
        // a's keys are cached now; b is fetched again (failures are not cached).
        let mut parts = request("/only-a", &[("authorization", &a)]);
        assert!(cfg.verify(None, &mut parts, &mut md, NOW).await.is_ok());
        assert!(
            parts.headers.get("authorization").is_none(),
            "the verified token is removed"
        );
        let mut parts = request("/", &[("authorization", &a), ("x-second", &b)]);
        assert!(cfg.verify(None, &mut parts, &mut md, NOW).await.is_err());
        assert_eq!((calls(&good), calls(&down)), (1, 2));
    }

    #[test]
    fn clear_route_cache_only_when_a_claim_header_was_added() {
        let cfg = istio(&json!({"clear_route_cache": true,
            "claim_to_headers": [{"header_name": "x-tier", "claim_name": "tier"}]}));
        let mut c = claims();
        let (r, _) = run(
            &cfg,
            &mut request("/", &[("authorization", &bearer(&token("RS256", &c)))]),
        );
        assert_eq!(r.map(|p| p.clear_route_cache), Ok(false));
        c["tier"] = json!("gold");
        let (r, _) = run(
            &cfg,
            &mut request("/", &[("authorization", &bearer(&token("RS256", &c)))]),
        );
        assert_eq!(r.map(|p| p.clear_route_cache), Ok(true));
    }
}
