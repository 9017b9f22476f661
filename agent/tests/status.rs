//! The status server and the subcommands against the built agent and the real proxy: readiness
//! reasons while starting, the merged `/stats/prometheus` (and `/metrics`) checked by `promtool
//! check metrics` and by the checks promtool does not make, `DISABLE_ENVOY`, and `agent
//! wait|request|version`.
//!
//! # What "promtool passes" means here
//!
//! Debian's promtool (2.42 on this image; `.ci/run` installs the `prometheus` package) has no lint
//! switch for `check metrics`: it parses the exposition with Prometheus' text parser — a parse
//! error (a second `# TYPE` for a name, an invalid metric or label name, a bad escape in a label
//! value, ...) exits **1** — and then runs promlint, whose findings alone exit **3**. On the real
//! merged output the only findings are naming conventions of names we must not change:
//!
//! * `counter metrics should have "_total" suffix` for Envoy's counters
//!   (`envoy_cluster_upstream_cx_connect_fail`, `envoy_listener_manager_lds_update_success`, ...:
//!   Envoy's own `/stats/prometheus` writes them without `_total`, and dashboards query those names)
//!   and for pilot-agent's `istio_agent_*` counters (`istio_agent_num_outgoing_requests`, ...: Istio
//!   exports them without the suffix too);
//! * `use base unit "seconds" instead of "days"` for Envoy's
//!   `envoy_server_days_until_first_cert_expiring` (and, once the proxy has Istio's histograms,
//!   `"milliseconds"` for `istio_request_duration_milliseconds`);
//! * `non-counter metrics should not have "_total" suffix` for Envoy's
//!   `envoy_cluster_membership_total` gauge only.
//!
//! Renaming those would break every Envoy/Istio dashboard, so exit 3 is accepted when — and only
//! when — every finding is one of those conventions on an `envoy_`/`istio_` name; any other
//! finding, and any parse error, fails. Because promtool's parser lets some broken expositions
//! through (a family split into two blocks, the same series twice, histogram buckets without `le`,
//! decreasing, or without a `+Inf` bucket equal to `_count`), [`check_exposition`] checks those
//! itself; `exposition_checks_have_teeth` proves both halves reject broken input.

mod common;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{agent_bin, mesh, metrics, readiness, serial, status_url, wait_ready};
use nix::sys::signal::Signal;

// ---------------------------------------------------------------------------------------------
// The exposition checks
// ---------------------------------------------------------------------------------------------

/// promlint findings accepted on names Envoy and pilot-agent fix (see the module docs).
const ACCEPTED_NAMING_LINTS: [&str; 2] = [
    "counter metrics should have \"_total\" suffix",
    "use base unit \"seconds\" instead of",
];

/// A gauge named `_total` is accepted for Envoy's `cluster.<name>.membership_total` only.
const GAUGE_TOTAL_LINT: &str = "non-counter metrics should not have \"_total\" suffix";

/// `promtool check metrics` on `text`: its exit code and output. Panics when promtool is missing
/// (`.ci/run` installs it: Debian's `prometheus` package).
fn promtool(text: &str) -> (i32, String) {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!("promtool: {e} (install Debian's prometheus package, as .ci/run does)"),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool output");
    let mut report = String::from_utf8_lossy(&out.stdout).into_owned();
    report.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), report)
}

/// promtool's verdict on `text`: `Ok` with the accepted findings, `Err` with why it fails.
fn promtool_verdict(text: &str) -> Result<Vec<String>, String> {
    let (code, report) = promtool(text);
    match code {
        0 => Ok(Vec::new()),
        3 => {
            let findings: Vec<String> = report
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_owned)
                .collect();
            for line in &findings {
                let (name, problem) = line.split_once(' ').unwrap_or((line, ""));
                let fixed_name = name.starts_with("envoy_") || name.starts_with("istio_");
                let naming = ACCEPTED_NAMING_LINTS.iter().any(|l| problem.starts_with(l))
                    || (problem.starts_with(GAUGE_TOTAL_LINT)
                        && name == "envoy_cluster_membership_total");
                if !(fixed_name && naming) {
                    return Err(format!("promtool finding not accepted: {line}\n{report}"));
                }
            }
            Ok(findings)
        }
        other => Err(format!("promtool exit {other}:\n{report}")),
    }
}

/// One sample line: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parses `name{a="x",b="y"} value [timestamp]`.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or_else(|| format!("no value: {line}"))?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let mut end = None;
        loop {
            while chars.next_if(|(_, c)| *c == ',' || *c == ' ').is_some() {}
            match chars.peek() {
                Some((i, '}')) => {
                    end = Some(*i);
                    break;
                }
                None => break,
                _ => {}
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key} not quoted: {line}"));
            }
            let mut value = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some(e @ ('\\' | '"')) => value.push(e),
                        other => return Err(format!("bad escape {other:?}: {line}")),
                    },
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return Err(format!("unterminated label value: {line}"));
            }
            if labels.insert(key.clone(), value).is_some() {
                return Err(format!("label {key} twice: {line}"));
            }
        }
        let end = end.ok_or_else(|| format!("unterminated labels: {line}"))?;
        rest = &body[end + 1..];
    }
    let value = rest
        .split_whitespace()
        .next()
        .ok_or_else(|| format!("no value: {line}"))?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().map_err(|_| format!("bad value {v}: {line}"))?,
    };
    Ok((name, labels, value))
}

/// The family a sample of `name` belongs to, given the `# TYPE`s seen.
fn family_of<'a>(name: &'a str, types: &HashMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types
                .get(base)
                .is_some_and(|t| t == "histogram" || t == "summary")
        {
            return base;
        }
    }
    name
}

/// What promtool's parser lets through: a family must be one block (not split by another
/// family), a series must appear once, and a histogram series needs `le` on every bucket,
/// non-decreasing counts in `le` order, a `+Inf` bucket equal to its `_count`, and a `_sum`.
fn check_exposition(text: &str) -> Result<(), String> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut closed: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    let mut series: HashSet<(String, BTreeMap<String, String>)> = HashSet::new();
    // histogram family → series labels (without `le`) → (buckets, sum, count)
    type Hist = (Vec<(f64, f64)>, Option<f64>, Option<f64>);
    let mut hists: BTreeMap<String, BTreeMap<BTreeMap<String, String>, Hist>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let family = if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let (name, kind) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            types.insert(name.to_owned(), kind.to_owned());
            name.to_owned()
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            rest.split_whitespace().next().unwrap_or("").to_owned()
        } else if line.starts_with('#') {
            continue;
        } else {
            let (name, labels, value) = parse_sample(line)?;
            let family = family_of(&name, &types).to_owned();
            if !series.insert((name.clone(), labels.clone())) {
                return Err(format!("series twice: {line}"));
            }
            if types.get(&family).is_some_and(|t| t == "histogram") {
                let mut key = labels.clone();
                let le = key.remove("le");
                let entry = hists
                    .entry(family.clone())
                    .or_default()
                    .entry(key)
                    .or_default();
                match &name[family.len()..] {
                    "_bucket" => {
                        let le = le.ok_or_else(|| format!("bucket without le: {line}"))?;
                        let le = if le == "+Inf" {
                            f64::INFINITY
                        } else {
                            le.parse().map_err(|_| format!("bad le: {line}"))?
                        };
                        entry.0.push((le, value));
                    }
                    "_sum" => entry.1 = Some(value),
                    "_count" => entry.2 = Some(value),
                    _ => return Err(format!("not a histogram sample: {line}")),
                }
            }
            family
        };
        if current.as_deref() != Some(family.as_str()) {
            if closed.contains(&family) {
                return Err(format!("family {family} split into two blocks at: {line}"));
            }
            if let Some(prev) = current.replace(family.clone()) {
                closed.insert(prev);
            }
        }
    }
    for (family, all) in &hists {
        for (labels, (buckets, sum, count)) in all {
            let mut sorted = buckets.clone();
            sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
            if sorted
                .windows(2)
                .any(|w| w[1].1 < w[0].1 || w[1].0 == w[0].0)
            {
                return Err(format!(
                    "{family}{labels:?}: buckets not cumulative: {sorted:?}"
                ));
            }
            let inf = sorted.last().filter(|b| b.0.is_infinite()).map(|b| b.1);
            match (inf, count) {
                (Some(inf), Some(count)) if inf == *count => {}
                _ => {
                    return Err(format!(
                        "{family}{labels:?}: +Inf bucket {inf:?} vs _count {count:?}"
                    ));
                }
            }
            if sum.is_none() {
                return Err(format!("{family}{labels:?}: no _sum"));
            }
        }
    }
    Ok(())
}

/// Every `# TYPE` name.
fn families(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|r| r.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Both checks on a served exposition; prints what promtool accepted.
fn assert_valid_exposition(what: &str, text: &str) {
    if let Err(e) = check_exposition(text) {
        panic!("{what}: {e}\n{text}");
    }
    match promtool_verdict(text) {
        Ok(findings) => println!(
            "promtool on {what}: {} naming findings on Envoy/Istio-fixed names accepted",
            findings.len()
        ),
        Err(e) => panic!("{what}: {e}\n{text}"),
    }
}

/// The checks reject broken expositions: promtool's parse errors (exit 1) and what only
/// [`check_exposition`] sees. Without this a check that never fails would go unnoticed.
#[test]
fn exposition_checks_have_teeth() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{l=\"x\\\"y\\\\z\"} 1\n\
                # HELP h_seconds H.\n# TYPE h_seconds histogram\n\
                h_seconds_bucket{le=\"0.1\"} 1\nh_seconds_bucket{le=\"+Inf\"} 2\n\
                h_seconds_sum 0.3\nh_seconds_count 2\n";
    assert_eq!(check_exposition(good), Ok(()));
    assert_eq!(promtool_verdict(good), Ok(Vec::new()));

    for (why, bad) in [
        (
            "duplicate TYPE",
            "# TYPE a gauge\na 1\n# TYPE a gauge\na 2\n",
        ),
        ("bad escape", "# TYPE a gauge\na{l=\"x\\q\"} 1\n"),
        ("bad metric name", "# TYPE 1a gauge\n1a 1\n"),
        ("unterminated label value", "# TYPE a gauge\na{l=\"x} 1\n"),
    ] {
        let (code, report) = promtool(bad);
        assert_eq!(code, 1, "promtool must reject ({why}): {report}");
        assert!(promtool_verdict(bad).is_err(), "{why}");
    }
    // A naming finding outside the accepted ones, and an accepted one on a name we own.
    assert!(
        promtool_verdict("# HELP envoy_a_total A.\n# TYPE envoy_a_total gauge\nenvoy_a_total 1\n")
            .is_err()
    );
    assert!(promtool_verdict("# HELP mine M.\n# TYPE mine counter\nmine 1\n").is_err());
    assert!(promtool_verdict("# HELP envoy_x X.\n# TYPE envoy_x counter\nenvoy_x 1\n").is_ok());
    assert!(
        promtool_verdict(
            "# HELP envoy_cluster_membership_total M.\n# TYPE envoy_cluster_membership_total gauge\nenvoy_cluster_membership_total 1\n"
        )
        .is_ok()
    );

    let hist = |buckets: &str, count: u32| {
        format!("# TYPE h histogram\n{buckets}h_sum 1\nh_count {count}\n")
    };
    for (why, bad) in [
        (
            "split family",
            "# TYPE a gauge\na{x=\"1\"} 1\n# TYPE b gauge\nb 1\na{x=\"2\"} 2\n".to_owned(),
        ),
        ("series twice", "# TYPE a gauge\na 1\na 2\n".to_owned()),
        (
            "bucket without le",
            hist("h_bucket 1\nh_bucket{le=\"+Inf\"} 1\n", 1),
        ),
        (
            "decreasing buckets",
            hist(
                "h_bucket{le=\"1\"} 5\nh_bucket{le=\"2\"} 3\nh_bucket{le=\"+Inf\"} 5\n",
                5,
            ),
        ),
        ("no +Inf bucket", hist("h_bucket{le=\"1\"} 5\n", 5)),
        ("+Inf is not _count", hist("h_bucket{le=\"+Inf\"} 4\n", 5)),
    ] {
        assert!(check_exposition(&bad).is_err(), "{why} passed:\n{bad}");
    }
}

// ---------------------------------------------------------------------------------------------
// Against the agent and the real proxy
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reasons_merged_metrics_and_subcommands() {
    let _serial = serial().await;
    let mesh = mesh("status", |o| o.wait_ready = false).await;
    // Until ready, every answer is a 503 with a reason (or the server is not up yet).
    let start = Instant::now();
    let mut reasons: Vec<String> = Vec::new();
    loop {
        let (code, body) = readiness(&mesh).await;
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
            "never ready; reasons {reasons:?}\n{}",
            mesh.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    println!(
        "timing: ready {:?} after start; reasons seen before: {reasons:?}",
        start.elapsed()
    );

    for path in ["/stats/prometheus", "/metrics"] {
        let resp = metrics(&mesh, path).await;
        assert_eq!(
            resp.content_type.as_deref(),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        let text = resp.text();
        let fams = families(&text);
        assert!(
            fams.iter().any(|f| f == "istio_agent_proxy_restarts"),
            "agent part\n{text}"
        );
        assert!(
            fams.iter().any(|f| f == "envoy_server_live"),
            "proxy part\n{text}"
        );
        assert!(text.contains("envoy_server_live{} 1") || text.contains("envoy_server_live 1"));
        // The agent's families come first.
        let agent_at = text.find("istio_agent_").expect("agent");
        let proxy_at = text.find("envoy_").expect("proxy");
        assert!(agent_at < proxy_at);
        assert_valid_exposition(path, &text);
    }
    let resp = agent::http_client::get(&status_url(&mesh, "/nope"), Duration::from_secs(5))
        .await
        .expect("404");
    assert_eq!(resp.status.as_u16(), 404);

    // The proxy's readiness listener forwards to the agent, as Envoy's does: `agent wait` on it.
    let out = Command::new(agent_bin())
        .args(["wait", "--timeoutSeconds", "5", "--periodMillis", "50"])
        .arg(format!(
            "--url=http://localhost:{}/healthz/ready",
            mesh.ports.readiness
        ))
        .output()
        .expect("agent wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `agent request` to the proxy admin (the configured proxyAdminPort is allowed).
    let admin = mesh.ports.admin.to_string();
    let request = |path: &str| {
        Command::new(agent_bin())
            .args(["request", "GET", path, "--debug-port", &admin])
            .env("PROXY_CONFIG", format!("{{\"proxyAdminPort\":{admin}}}"))
            .output()
            .expect("agent request")
    };
    let out = request("/stats?filter=%5Eserver.state%24");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "server.state: 0\n",
        "only the body goes to stdout"
    );
    assert_eq!(request("/nope").status.code(), Some(1), "non-2xx exits 1");

    mesh.signal_agent(Signal::SIGINT).expect("SIGINT");
    let (status, _) = mesh
        .wait_agent_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.code(), Some(0), "SIGINT drains like SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_envoy_readiness_is_the_certificate() {
    let _serial = serial().await;
    let mesh = mesh("noenvoy", |o| {
        o.wait_ready = false;
        common::env(o, "DISABLE_ENVOY", "true");
    })
    .await;
    let took = wait_ready(&mesh, Duration::from_secs(30)).await;
    println!("timing: DISABLE_ENVOY ready (certificate loaded) {took:?} after start");
    assert_eq!(mesh.proxy_pid(), None, "no proxy is started");
    let text = metrics(&mesh, "/stats/prometheus").await.text();
    let fams = families(&text);
    assert!(!fams.is_empty());
    assert!(
        fams.iter().all(|f| f.starts_with("istio_agent_")),
        "{fams:?}"
    );
    assert_valid_exposition("the agent-only exposition", &text);
    mesh.signal_agent(Signal::SIGTERM).expect("SIGTERM");
    let (status, _) = mesh
        .wait_agent_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
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
    let port = waypoint_testbed::waypoint::free_port().expect("free port");
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
