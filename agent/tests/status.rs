//! The status server and the subcommands, against the built agent and the test bed's `fake-proxy`:
//! readiness reasons, merged metrics that `promtool check metrics` accepts, `DISABLE_ENVOY`, and
//! `agent wait|request|version`.

mod common;

use std::{
    collections::HashSet,
    io::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{Pod, PodOptions, agent_bin};
use nix::sys::signal::Signal;

/// Every `# TYPE` name, asserting none appears twice.
fn families(text: &str) -> HashSet<String> {
    let mut seen = HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_whitespace().next().expect("name").to_owned();
            assert!(
                seen.insert(name.clone()),
                "family {name} declared twice:\n{text}"
            );
        }
    }
    seen
}

/// promtool lints that follow from metric names Istio and Envoy fix (see the metrics test).
const ACCEPTED_LINTS: [&str; 3] = [
    "counter metrics should have \"_total\" suffix",
    "use base unit \"seconds\" instead of \"milliseconds\"",
    "no help text",
];

/// `promtool check metrics` on `text`: `None` when promtool is not installed, else its exit code and
/// output.
fn promtool(text: &str) -> Option<(i32, String)> {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("promtool: {e}"),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool output");
    let mut report = String::from_utf8_lossy(&out.stdout).into_owned();
    report.push_str(&String::from_utf8_lossy(&out.stderr));
    Some((out.status.code().unwrap_or(-1), report))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reasons_and_merged_metrics() {
    let mut pod = Pod::start(PodOptions::new("status")).await;
    // Until ready, every answer is a 503 with a reason (or the server is not up yet).
    let start = Instant::now();
    let mut reasons = Vec::new();
    loop {
        let (code, body) = pod.readiness().await;
        match code {
            200 => break,
            0 => {}
            503 => {
                assert!(!body.trim().is_empty(), "a 503 says why");
                if reasons.last() != Some(&body) {
                    reasons.push(body);
                }
            }
            other => panic!("unexpected readiness {other}: {body}"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never ready; reasons {reasons:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    println!(
        "timing: ready {:?} after start; reasons seen before: {reasons:?}",
        start.elapsed()
    );

    for path in ["/stats/prometheus", "/metrics"] {
        let resp = agent::http_client::get(&pod.status_url(path), Duration::from_secs(5))
            .await
            .expect("metrics");
        assert_eq!(resp.status.as_u16(), 200);
        assert_eq!(
            resp.content_type.as_deref(),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        let text = resp.text();
        let fams = families(&text);
        assert!(
            fams.contains("istio_agent_proxy_restarts"),
            "agent part\n{text}"
        );
        assert!(fams.contains("envoy_server_live"), "proxy part\n{text}");
        assert!(text.contains("envoy_server_live 1"));
        // The agent's families come first.
        let agent_at = text.find("istio_agent_").expect("agent");
        let proxy_at = text.find("envoy_").expect("proxy");
        assert!(agent_at < proxy_at);
        match promtool(&text) {
            None => println!(
                "SKIPPED promtool check: promtool is not installed (apt-get install prometheus)"
            ),
            Some((0, _)) => {}
            Some((code, report)) => {
                // Exit 3 is lint only. Some names are fixed by Istio and Envoy and break promtool's
                // naming conventions: Istio's agent counters have no `_total` (its exporter runs
                // WithoutCounterSuffixes for OpenCensus compatibility), `istio_request_duration_
                // milliseconds` is in milliseconds, Envoy writes no HELP. Those lints are accepted;
                // a parse error (exit 1) or any other lint fails.
                assert_eq!(
                    code, 3,
                    "promtool failed to parse the exposition:\n{report}\n{text}"
                );
                for line in report.lines().filter(|l| !l.trim().is_empty()) {
                    assert!(
                        ACCEPTED_LINTS.iter().any(|lint| line.ends_with(lint)),
                        "promtool: {line}\n{report}"
                    );
                }
                println!("promtool: only Istio/Envoy fixed names were linted:\n{report}");
            }
        }
    }
    let resp = agent::http_client::get(&pod.status_url("/nope"), Duration::from_secs(5))
        .await
        .expect("404");
    assert_eq!(resp.status.as_u16(), 404);

    // The proxy's readiness listener forwards to the agent, as Envoy's does: `agent wait` on it.
    let out = Command::new(agent_bin())
        .args(["wait", "--timeoutSeconds", "5", "--periodMillis", "50"])
        .arg(format!(
            "--url=http://localhost:{}/healthz/ready",
            pod.ports.envoy_status
        ))
        .output()
        .expect("agent wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `agent request` to the proxy admin (the configured proxyAdminPort is allowed).
    let out = Command::new(agent_bin())
        .args([
            "request",
            "GET",
            "/stats?filter=server.state",
            "--debug-port",
            &pod.ports.admin.to_string(),
        ])
        .env(
            "PROXY_CONFIG",
            format!("{{\"proxyAdminPort\":{}}}", pod.ports.admin),
        )
        .output()
        .expect("agent request");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout, "server.state: 0\n", "only the body goes to stdout");
    let out = Command::new(agent_bin())
        .args([
            "request",
            "GET",
            "/nope",
            "--debug-port",
            &pod.ports.admin.to_string(),
        ])
        .env(
            "PROXY_CONFIG",
            format!("{{\"proxyAdminPort\":{}}}", pod.ports.admin),
        )
        .output()
        .expect("agent request");
    assert_eq!(out.status.code(), Some(1), "non-2xx exits 1");

    pod.signal(Signal::SIGINT);
    let (status, _) = pod.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "SIGINT drains like SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_envoy_readiness_is_the_certificate() {
    let mut pod = Pod::start(PodOptions::new("noenvoy").env("DISABLE_ENVOY", "true")).await;
    let took = pod.wait_ready(Duration::from_secs(30)).await;
    println!("timing: DISABLE_ENVOY ready (certificate loaded) {took:?} after start");
    assert!(pod.proxy_pid().is_none(), "no proxy is started");
    let resp =
        agent::http_client::get(&pod.status_url("/stats/prometheus"), Duration::from_secs(5))
            .await
            .expect("metrics");
    let fams = families(&resp.text());
    assert!(
        fams.iter().all(|f| f.starts_with("istio_agent_")),
        "{fams:?}"
    );
    pod.signal(Signal::SIGTERM);
    let (status, _) = pod.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0));
}

#[test]
fn subcommand_errors_and_version() {
    let out = Command::new(agent_bin())
        .arg("version")
        .output()
        .expect("version");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("agent version "));

    // Nothing listens: `wait` gives up after its timeout with exit 1.
    let port = common::free_port();
    let t0 = Instant::now();
    let out = Command::new(agent_bin())
        .args([
            "wait",
            "--timeoutSeconds",
            "1",
            "--periodMillis",
            "100",
            "--requestTimeoutMillis",
            "100",
        ])
        .arg(format!("--url=http://127.0.0.1:{port}/healthz/ready"))
        .output()
        .expect("wait");
    assert_eq!(out.status.code(), Some(1));
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("timeout waiting for Envoy proxy to become ready")
    );

    // A port outside pilot-agent's list (and not configured) is refused.
    let out = Command::new(agent_bin())
        .args(["request", "GET", "/x", "--debug-port", "8081"])
        .env_remove("PROXY_CONFIG")
        .env_remove("ENVOY_STATUS_PORT")
        .output()
        .expect("request");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in allowed list"));
    assert!(out.stdout.is_empty());
}
