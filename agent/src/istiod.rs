//! Connections to istiod (CA and xDS share the rules): TLS with the mesh root and istiod's server
//! name, or plaintext for `:15010`; the bearer token re-read per call plus `ClusterID` and extra
//! headers (reference/istio-facts.md §1.7, §1.10).

use std::{path::Path, time::Duration};

use tonic::{Request, transport::Channel};

/// Where and how to dial.
#[derive(Debug, Clone, Copy)]
pub struct Dial<'a> {
    /// `host:port`.
    pub addr: &'a str,
    /// Plaintext HTTP/2 instead of TLS.
    pub plaintext: bool,
    /// Root certificate file (read at every dial, so a rotated root is picked up).
    pub root_path: &'a Path,
    /// TLS server name to verify.
    pub server_name: &'a str,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Per-request deadline (none for long-lived streams).
    pub request_timeout: Option<Duration>,
}

/// Dials istiod; the error is one line naming what failed.
pub async fn channel(d: Dial<'_>) -> Result<Channel, String> {
    let scheme = if d.plaintext { "http" } else { "https" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{}", d.addr))
        .map_err(|e| e.to_string())?
        .connect_timeout(d.connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    if let Some(t) = d.request_timeout {
        endpoint = endpoint.timeout(t);
    }
    if !d.plaintext {
        let root = tokio::fs::read_to_string(d.root_path)
            .await
            .map_err(|e| format!("root certificate {}: {e}", d.root_path.display()))?;
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(root))
            .domain_name(d.server_name.to_owned());
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    endpoint.connect().await.map_err(|e| error_chain(&e))
}

/// An error with its sources, for one-line logs.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Adds the bearer token (re-read now; none if the file is missing or empty), `ClusterID` and extra
/// headers to a request.
pub async fn add_auth_headers<T>(
    req: &mut Request<T>,
    token_path: &Path,
    cluster_id: &str,
    headers: &[(String, String)],
) {
    if let Ok(token) = tokio::fs::read_to_string(token_path).await {
        let token = token.trim();
        if !token.is_empty()
            && let Ok(v) = format!("Bearer {token}").parse()
        {
            req.metadata_mut().insert("authorization", v);
        }
    }
    if let Ok(v) = cluster_id.parse() {
        req.metadata_mut().insert("clusterid", v);
    }
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            k.parse::<tonic::metadata::MetadataKey<tonic::metadata::Ascii>>(),
            v.parse(),
        ) {
            req.metadata_mut().insert(k, v);
        }
    }
}
