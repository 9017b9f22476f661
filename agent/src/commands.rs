//! The small subcommands: `agent wait` (poll readiness until ready) and `agent request` (an HTTP call
//! to a local port, as `istioctl proxy-config` uses through `kubectl exec`), with pilot-agent's flags
//! (`pilot/cmd/pilot-agent/app/{wait,request}.go`).

use std::{collections::BTreeMap, time::Duration};

use bytes::Bytes;

use crate::http_client;

/// Command-line errors of the subcommands.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    /// A flag or argument problem.
    #[error("{0}")]
    Usage(String),
    /// `--debug-port` is not one we allow.
    #[error("debug port {port} is not in allowed list {allowed:?}")]
    PortNotAllowed {
        /// The port asked for.
        port: u16,
        /// The allowed ports.
        allowed: Vec<u16>,
    },
}

/// `agent wait` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitArgs {
    /// `--timeoutSeconds` (60).
    pub timeout: Duration,
    /// `--requestTimeoutMillis` (500).
    pub request_timeout: Duration,
    /// `--periodMillis` (500).
    pub period: Duration,
    /// `--url` (`http://localhost:15021/healthz/ready`).
    pub url: String,
}

/// Splits `--flag value` / `--flag=value` / `-flag value` flags from positional arguments.
fn split_flags(
    args: &[String],
    known: &[&str],
) -> Result<(BTreeMap<String, String>, Vec<String>), CommandError> {
    let mut flags = BTreeMap::new();
    let mut positional = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let Some(stripped) = arg
            .strip_prefix("--")
            .or_else(|| arg.strip_prefix('-'))
            .filter(|s| !s.is_empty())
        else {
            positional.push(arg.clone());
            continue;
        };
        let (name, value) = match stripped.split_once('=') {
            Some((n, v)) => (n.to_owned(), v.to_owned()),
            None => {
                let v = it
                    .next()
                    .ok_or_else(|| CommandError::Usage(format!("--{stripped} needs a value")))?;
                (stripped.to_owned(), v.clone())
            }
        };
        if !known.contains(&name.as_str()) {
            return Err(CommandError::Usage(format!(
                "unknown flag --{name} (known: {})",
                known.join(", ")
            )));
        }
        flags.insert(name, value);
    }
    Ok((flags, positional))
}

fn number<T: std::str::FromStr>(
    flags: &BTreeMap<String, String>,
    name: &str,
    default: T,
) -> Result<T, CommandError> {
    match flags.get(name) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| CommandError::Usage(format!("--{name} {v:?} is not a number"))),
    }
}

impl WaitArgs {
    /// Parses the arguments after `wait`.
    pub fn parse(args: &[String]) -> Result<Self, CommandError> {
        let (flags, positional) = split_flags(
            args,
            &[
                "timeoutSeconds",
                "requestTimeoutMillis",
                "periodMillis",
                "url",
            ],
        )?;
        if let Some(extra) = positional.first() {
            return Err(CommandError::Usage(format!(
                "unexpected argument {extra:?}"
            )));
        }
        Ok(WaitArgs {
            timeout: Duration::from_secs(number(&flags, "timeoutSeconds", 60u64)?),
            request_timeout: Duration::from_millis(number(&flags, "requestTimeoutMillis", 500u64)?),
            period: Duration::from_millis(number(&flags, "periodMillis", 500u64)?),
            url: flags
                .get("url")
                .cloned()
                .unwrap_or_else(|| "http://localhost:15021/healthz/ready".to_owned()),
        })
    }
}

/// Polls `args.url` every `period` until it answers 200 (`Ok`) or `timeout` passes (`Err` with the
/// last error), as `pilot-agent wait`.
pub async fn wait(args: &WaitArgs) -> Result<(), String> {
    tracing::info!(
        "Waiting for Envoy proxy to be ready (timeout: {} seconds)...",
        args.timeout.as_secs()
    );
    let deadline = tokio::time::Instant::now() + args.timeout;
    let mut last = "no attempt made".to_owned();
    loop {
        let next = tokio::time::Instant::now() + args.period;
        if next > deadline {
            return Err(format!(
                "timeout waiting for Envoy proxy to become ready. Last error: {last}"
            ));
        }
        tokio::time::sleep_until(next).await;
        match http_client::get(&args.url, args.request_timeout).await {
            Ok(resp) if resp.status == http::StatusCode::OK => {
                tracing::info!("Envoy is ready!");
                return Ok(());
            }
            Ok(resp) => last = format!("HTTP status code {}", resp.status.as_u16()),
            Err(err) => last = err.to_string(),
        }
        tracing::debug!("Not ready yet: {last}");
    }
}

/// `agent request` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestArgs {
    /// HTTP method.
    pub method: String,
    /// Path (and query) on `localhost:<port>`.
    pub path: String,
    /// Optional body.
    pub body: String,
    /// `--debug-port` (15000).
    pub port: u16,
}

/// pilot-agent's allowed `--debug-port` values.
pub const ALLOWED_DEBUG_PORTS: [u16; 4] = [15000, 15004, 15020, 15021];

impl RequestArgs {
    /// Parses the arguments after `request`. `extra_ports` are allowed besides pilot-agent's list:
    /// the agent's configured admin/status ports when they differ from the defaults.
    pub fn parse(args: &[String], extra_ports: &[u16]) -> Result<Self, CommandError> {
        let (flags, positional) = split_flags(args, &["debug-port"])?;
        let [method, path, rest @ ..] = positional.as_slice() else {
            return Err(CommandError::Usage(
                "usage: agent request <method> <path> [<body>] [--debug-port 15000]".to_owned(),
            ));
        };
        if rest.len() > 1 {
            return Err(CommandError::Usage(format!(
                "unexpected arguments {:?}",
                &rest[1..]
            )));
        }
        let port: u16 = number(&flags, "debug-port", 15000u16)?;
        let mut allowed: Vec<u16> = ALLOWED_DEBUG_PORTS
            .iter()
            .chain(extra_ports)
            .copied()
            .collect();
        allowed.sort_unstable();
        allowed.dedup();
        if !allowed.contains(&port) {
            return Err(CommandError::PortNotAllowed { port, allowed });
        }
        let path = if path.starts_with('/') {
            path.clone()
        } else {
            format!("/{path}")
        };
        Ok(RequestArgs {
            method: method.to_ascii_uppercase(),
            path,
            body: rest.first().cloned().unwrap_or_default(),
            port,
        })
    }
}

/// Sends the request to `localhost:<port><path>`; returns the status and body.
pub async fn request(args: &RequestArgs) -> Result<http_client::Response, http_client::HttpError> {
    let url = format!("http://localhost:{}{}", args.port, args.path);
    let mut req = http_client::Request::new(&args.method, &url, Duration::from_secs(60));
    req.body = Bytes::from(args.body.clone());
    http_client::send(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn wait_flags() {
        let w = WaitArgs::parse(&args("")).expect("defaults");
        assert_eq!(w.timeout, Duration::from_secs(60));
        assert_eq!(w.period, Duration::from_millis(500));
        assert_eq!(w.url, "http://localhost:15021/healthz/ready");
        let w = WaitArgs::parse(&args(
            "--timeoutSeconds 2 --periodMillis=100 --url http://127.0.0.1:1/x",
        ))
        .expect("flags");
        assert_eq!(w.timeout, Duration::from_secs(2));
        assert_eq!(w.period, Duration::from_millis(100));
        assert_eq!(w.url, "http://127.0.0.1:1/x");
        assert!(WaitArgs::parse(&args("--bogus 1")).is_err());
        assert!(WaitArgs::parse(&args("--timeoutSeconds soon")).is_err());
    }

    #[test]
    fn request_args_and_ports() {
        let r = RequestArgs::parse(&args("GET config_dump"), &[]).expect("defaults");
        assert_eq!(
            r,
            RequestArgs {
                method: "GET".into(),
                path: "/config_dump".into(),
                body: String::new(),
                port: 15000
            }
        );
        let r = RequestArgs::parse(
            &args("post /logging?level=debug {} --debug-port 15020"),
            &[],
        )
        .expect("flags");
        assert_eq!(
            (r.method.as_str(), r.body.as_str(), r.port),
            ("POST", "{}", 15020)
        );
        let e = RequestArgs::parse(&args("GET /x --debug-port 8080"), &[]).expect_err("port");
        assert!(matches!(e, CommandError::PortNotAllowed { port: 8080, .. }));
        assert_eq!(
            RequestArgs::parse(&args("GET /x --debug-port 8080"), &[8080])
                .expect("extra")
                .port,
            8080
        );
        assert!(RequestArgs::parse(&args("GET"), &[]).is_err());
    }

    #[tokio::test]
    async fn wait_times_out_with_the_last_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let w = WaitArgs {
            timeout: Duration::from_millis(300),
            request_timeout: Duration::from_millis(100),
            period: Duration::from_millis(50),
            url: format!("http://127.0.0.1:{port}/healthz/ready"),
        };
        let err = wait(&w).await.expect_err("times out");
        assert!(
            err.starts_with("timeout waiting for Envoy proxy to become ready. Last error: connect"),
            "{err}"
        );
    }
}
