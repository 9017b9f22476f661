//! A minimal HTTP/1.1 client for the agent's loopback calls: the proxy's admin API and prometheus
//! listener, and the `agent wait` / `agent request` subcommands. One connection per call (these calls
//! are rare and local), a deadline on the whole exchange, and a cap on the body it reads.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;

/// The largest body we read (the proxy's full `/stats/prometheus` can be several MiB).
pub const MAX_BODY: usize = 64 << 20;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The target is not a usable `http://host:port/path` URL.
    #[error("bad URL {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Connecting failed.
    #[error("connect {authority}: {source}")]
    Connect {
        /// `host:port`.
        authority: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("{method} {url}: {reason}")]
    Exchange {
        /// The method.
        method: String,
        /// The URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// No complete response within the deadline.
    #[error("{method} {url}: no response within {timeout:?}")]
    Timeout {
        /// The method.
        method: String,
        /// The URL.
        url: String,
        /// The deadline.
        timeout: Duration,
    },
}

/// A complete response.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: http::StatusCode,
    /// The content type, if any.
    pub content_type: Option<String>,
    /// The body.
    pub body: Bytes,
}

impl Response {
    /// The body as text (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A request to send.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// `GET`, `POST`, ...
    pub method: &'a str,
    /// `http://host:port/path?query`.
    pub url: &'a str,
    /// Request body (empty: none).
    pub body: Bytes,
    /// Extra headers.
    pub headers: Vec<(&'a str, String)>,
    /// Deadline for connect + request + whole response.
    pub timeout: Duration,
}

impl<'a> Request<'a> {
    /// A bodiless request.
    pub fn new(method: &'a str, url: &'a str, timeout: Duration) -> Self {
        Request {
            method,
            url,
            body: Bytes::new(),
            headers: Vec::new(),
            timeout,
        }
    }
}

/// Sends `GET url`.
pub async fn get(url: &str, timeout: Duration) -> Result<Response, HttpError> {
    send(Request::new("GET", url, timeout)).await
}

/// Sends `POST url` with an empty body.
pub async fn post(url: &str, timeout: Duration) -> Result<Response, HttpError> {
    send(Request::new("POST", url, timeout)).await
}

/// Sends a request and reads the whole response within `req.timeout`.
pub async fn send(req: Request<'_>) -> Result<Response, HttpError> {
    let (method, url, timeout) = (req.method.to_owned(), req.url.to_owned(), req.timeout);
    match tokio::time::timeout(timeout, exchange(req)).await {
        Ok(result) => result,
        Err(_) => Err(HttpError::Timeout {
            method,
            url,
            timeout,
        }),
    }
}

async fn exchange(req: Request<'_>) -> Result<Response, HttpError> {
    let url_err = |reason: &str| HttpError::Url {
        url: req.url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: http::Uri = req
        .url
        .parse()
        .map_err(|e: http::uri::InvalidUri| url_err(&e.to_string()))?;
    if uri.scheme_str() != Some("http") {
        return Err(url_err("only http:// is supported"));
    }
    let authority = uri.authority().ok_or_else(|| url_err("no host"))?.clone();
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = authority.port_u16().unwrap_or(80);
    let method: http::Method = req.method.parse().map_err(|_| url_err("bad method"))?;
    let exchange_err = |reason: String| HttpError::Exchange {
        method: req.method.to_owned(),
        url: req.url.to_owned(),
        reason,
    };

    let stream = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|source| HttpError::Connect {
            authority: authority.to_string(),
            source,
        })?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| exchange_err(e.to_string()))?;
    // The connection task ends when the response is read and the sender dropped.
    tokio::spawn(async move {
        let _ = conn.await;
    });

    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut builder = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, authority.as_str())
        .header(http::header::CONNECTION, "close");
    for (name, value) in &req.headers {
        builder = builder.header(*name, value);
    }
    let request = builder
        .body(Full::new(req.body.clone()))
        .map_err(|e| exchange_err(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| exchange_err(e.to_string()))?;
    let status = response.status();
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| exchange_err(format!("reading the body: {e}")))?
        .to_bytes();
    Ok(Response {
        status,
        content_type,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refused_and_bad_urls_are_errors() {
        // A port we just closed refuses connections.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let err = get(
            &format!("http://127.0.0.1:{port}/x"),
            Duration::from_secs(2),
        )
        .await
        .expect_err("refused");
        assert!(matches!(err, HttpError::Connect { .. }), "{err}");
        let err = get("https://127.0.0.1:1/x", Duration::from_secs(1))
            .await
            .expect_err("https");
        assert!(matches!(err, HttpError::Url { .. }), "{err}");
    }

    #[tokio::test]
    async fn reads_a_response_and_times_out_on_silence() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            // First connection: a proper response. Second: read and never answer.
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 5\r\ncontent-type: text/plain\r\n\r\nnope\n").await;
            let (mut silent, _) = listener.accept().await.expect("accept");
            let _ = silent.read(&mut buf).await;
            std::future::pending::<()>().await;
        });
        let resp = get(
            &format!("http://{addr}/healthz/ready"),
            Duration::from_secs(2),
        )
        .await
        .expect("response");
        assert_eq!(resp.status, http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.text(), "nope\n");
        assert_eq!(resp.content_type.as_deref(), Some("text/plain"));
        let err = get(&format!("http://{addr}/slow"), Duration::from_millis(200))
            .await
            .expect_err("timeout");
        assert!(matches!(err, HttpError::Timeout { .. }), "{err}");
    }
}
