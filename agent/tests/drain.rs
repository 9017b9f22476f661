//! Graceful termination with real signals and requests in flight through the proxy (the test bed's
//! `fake-proxy`, whose slow listener answers after 2 s): readiness fails at once, in-flight requests
//! complete, the agent exits 0 in time; the `EXIT_ON_ZERO_ACTIVE_CONNECTIONS` variant; a second
//! SIGTERM; `POST /drain` and `POST /quitquitquit`; the proxy exiting during the drain.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Pod, PodOptions};
use nix::sys::signal::Signal;
use tokio::task::JoinHandle;

/// One request's outcome: status, body and when it completed.
type Outcome = Result<(u16, String, Instant), String>;

/// Clients that keep slow requests in flight until told to stop starting new ones.
struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<Vec<Outcome>>>,
}

impl Load {
    fn start(pod: &Pod, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let url = format!("http://127.0.0.1:{}/slow", pod.ports.slow);
        let workers = (0..clients)
            .map(|_| {
                let (stop, url) = (stop.clone(), url.clone());
                tokio::spawn(async move {
                    let mut results = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let r = agent::http_client::get(&url, Duration::from_secs(10)).await;
                        results.push(
                            r.map(|r| (r.status.as_u16(), r.text(), Instant::now()))
                                .map_err(|e| e.to_string()),
                        );
                    }
                    results
                })
            })
            .collect();
        Load { stop, workers }
    }

    /// Stops starting requests; returns every result once the ones in flight ended.
    async fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        for w in self.workers {
            all.extend(w.await.expect("worker"));
        }
        all
    }
}

/// The fake proxy's active connections on its slow listener (from its admin API).
async fn slow_active(pod: &Pod) -> u64 {
    let url = format!(
        "http://127.0.0.1:{}/stats?usedonly&filter=downstream_cx_active%24",
        pod.ports.admin
    );
    let Ok(resp) = agent::http_client::get(&url, Duration::from_secs(2)).await else {
        return 0;
    };
    let key = format!("listener.0.0.0.0_{}.downstream_cx_active: ", pod.ports.slow);
    resp.text()
        .lines()
        .find_map(|l| l.strip_prefix(key.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Polls readiness as fast as it answers until it is not 200; returns when that was seen.
async fn until_unready(pod: &Pod, within: Duration) -> (Instant, String) {
    let deadline = Instant::now() + within;
    loop {
        let (code, body) = pod.readiness().await;
        if code != 200 {
            return (Instant::now(), format!("{code} {body}"));
        }
        assert!(
            Instant::now() < deadline,
            "readiness still 200 after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn assert_all_ok(results: &[Outcome], log: &str) {
    assert!(!results.is_empty());
    for r in results {
        match r {
            Ok((200, body, _)) if body == "slow ok\n" => {}
            other => panic!("a request failed: {other:?}\n--- agent log ---\n{log}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_0() {
    let mut pod = Pod::start(PodOptions {
        termination_drain: "3s",
        ..PodOptions::new("drain")
    })
    .await;
    pod.wait_ready(Duration::from_secs(30)).await;
    let load = Load::start(&pod, 4);
    common::eventually(Duration::from_secs(5), "4 requests in flight", || async {
        (slow_active(&pod).await >= 4).then_some(())
    })
    .await;

    let t0 = Instant::now();
    pod.signal(Signal::SIGTERM);
    let (unready_at, answer) = until_unready(&pod, Duration::from_secs(1)).await;
    let to_503 = unready_at - t0;
    println!("timing: readiness {answer:?} {to_503:?} after SIGTERM");
    assert!(answer.starts_with("503"), "{answer}");
    assert!(
        to_503 < Duration::from_millis(100),
        "readiness failed only after {to_503:?}"
    );

    let results = load.finish().await;
    let last_done = results
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|(_, _, at)| *at))
        .max()
        .expect("results");
    let (status, exited_at) = pod.wait_exit(Duration::from_secs(5)).await;
    let exit_after = exited_at - t0;
    println!(
        "timing: {} requests OK, last completed {:?} after SIGTERM; agent exited {exit_after:?} after SIGTERM (terminationDrainDuration 3s)",
        results.len(),
        last_done.saturating_duration_since(t0)
    );
    let log = pod.log_text();
    assert_all_ok(&results, &log);
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        exit_after >= Duration::from_secs(3),
        "exited before the drain period: {exit_after:?}"
    );
    assert!(
        exit_after < Duration::from_secs(4),
        "exit took {exit_after:?}"
    );
    assert!(
        log.contains("POST /drain_listeners?graceful: draining"),
        "{log}"
    );
    assert!(log.contains("stopping the proxy (SIGTERM)"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_on_zero_active_connections_ends_the_drain_early() {
    let mut pod = Pod::start(
        PodOptions {
            termination_drain: "30s",
            ..PodOptions::new("zerocx")
        }
        .env("EXIT_ON_ZERO_ACTIVE_CONNECTIONS", "true")
        .env("MINIMUM_DRAIN_DURATION", "300ms"),
    )
    .await;
    pod.wait_ready(Duration::from_secs(30)).await;
    let load = Load::start(&pod, 3);
    common::eventually(Duration::from_secs(5), "3 requests in flight", || async {
        (slow_active(&pod).await >= 3).then_some(())
    })
    .await;
    let t0 = Instant::now();
    pod.signal(Signal::SIGTERM);
    let (unready_at, _) = until_unready(&pod, Duration::from_secs(1)).await;
    let results = load.finish().await;
    let last_done = results
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|(_, _, at)| *at))
        .max()
        .expect("results");
    let (status, exited_at) = pod.wait_exit(Duration::from_secs(10)).await;
    println!(
        "timing: zero-cx drain: 503 after {:?}, last request done {:?}, exit {:?} after SIGTERM (terminationDrainDuration 30s, minimum 300ms)",
        unready_at - t0,
        last_done.saturating_duration_since(t0),
        exited_at - t0
    );
    let log = pod.log_text();
    assert_all_ok(&results, &log);
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        exited_at >= last_done,
        "exited before the last connection closed"
    );
    assert!(
        exited_at - last_done < Duration::from_millis(1500),
        "one poll period after the last connection"
    );
    assert!(
        log.contains("there are still"),
        "the poll saw the connections\n{log}"
    );
    assert!(
        log.contains("there are no more active connections"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_the_drain_at_once() {
    let mut pod = Pod::start(PodOptions {
        termination_drain: "30s",
        ..PodOptions::new("twice")
    })
    .await;
    pod.wait_ready(Duration::from_secs(30)).await;
    pod.signal(Signal::SIGTERM);
    until_unready(&pod, Duration::from_secs(1)).await;
    common::eventually(Duration::from_secs(5), "the drain to start", || async {
        pod.log_text()
            .contains("graceful termination period is")
            .then_some(())
    })
    .await;
    let t0 = Instant::now();
    pod.signal(Signal::SIGTERM);
    let (status, at) = pod.wait_exit(Duration::from_secs(5)).await;
    println!("timing: second SIGTERM → exit in {:?}", at - t0);
    assert_eq!(status.code(), Some(0));
    assert!(at - t0 < Duration::from_secs(1));
    assert!(pod.log_text().contains("second SIGTERM during the drain"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_exiting_during_the_drain_finishes_it() {
    let mut pod = Pod::start(PodOptions {
        termination_drain: "30s",
        ..PodOptions::new("proxyexit")
    })
    .await;
    pod.wait_ready(Duration::from_secs(30)).await;
    let pid = pod.proxy_pid().expect("pid");
    pod.signal(Signal::SIGTERM);
    until_unready(&pod, Duration::from_secs(1)).await;
    common::eventually(Duration::from_secs(5), "the drain to start", || async {
        pod.log_text()
            .contains("graceful termination period is")
            .then_some(())
    })
    .await;
    let t0 = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL)
        .expect("kill proxy");
    let (status, at) = pod.wait_exit(Duration::from_secs(5)).await;
    println!(
        "timing: proxy died during the drain → agent exit in {:?}",
        at - t0
    );
    let log = pod.log_text();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("the proxy exited during the drain"), "{log}");
    assert!(
        !log.contains("restarting it in"),
        "no restart while draining\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_endpoint_then_sigterm_exits_at_once() {
    let mut pod = Pod::start(PodOptions {
        termination_drain: "30s",
        ..PodOptions::new("drainnow")
    })
    .await;
    pod.wait_ready(Duration::from_secs(30)).await;

    let get = agent::http_client::get(&pod.status_url("/drain"), Duration::from_secs(5))
        .await
        .expect("GET /drain");
    assert_eq!(get.status.as_u16(), 405);
    let post = agent::http_client::post(&pod.status_url("/drain"), Duration::from_secs(5))
        .await
        .expect("POST /drain");
    assert_eq!(post.status.as_u16(), 200, "{}", post.text());
    let (code, body) = pod.readiness().await;
    assert_eq!(code, 503, "{body}");
    assert!(
        pod.log_text()
            .contains("POST /drain_listeners?graceful&skip_exit: draining")
    );
    assert!(pod.try_exit().is_none(), "/drain does not exit");

    let t0 = Instant::now();
    pod.signal(Signal::SIGTERM);
    let (status, at) = pod.wait_exit(Duration::from_secs(5)).await;
    println!("timing: SIGTERM after /drain → exit in {:?}", at - t0);
    assert_eq!(status.code(), Some(0));
    assert!(at - t0 < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quitquitquit_exits_at_once() {
    let mut pod = Pod::start(PodOptions {
        termination_drain: "30s",
        ..PodOptions::new("quit")
    })
    .await;
    pod.wait_ready(Duration::from_secs(30)).await;
    let t0 = Instant::now();
    let resp = agent::http_client::post(&pod.status_url("/quitquitquit"), Duration::from_secs(5))
        .await
        .expect("POST");
    assert_eq!(resp.status.as_u16(), 200);
    let (status, at) = pod.wait_exit(Duration::from_secs(5)).await;
    println!("timing: /quitquitquit → exit in {:?}", at - t0);
    assert_eq!(status.code(), Some(0));
    assert!(at - t0 < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_status_server_signals_still_drain_and_exit() {
    for disable_envoy in ["false", "true"] {
        let mut opts = PodOptions {
            termination_drain: "500ms",
            ..PodOptions::new("nostatus")
        }
        .env("DISABLE_ENVOY", disable_envoy);
        opts.proxy_config.push(("statusPort", serde_json::json!(0)));
        let mut pod = Pod::start(opts).await;
        common::eventually(Duration::from_secs(20), "the agent to start", || async {
            let log = pod.log_text();
            let started = if disable_envoy == "true" {
                log.contains("DISABLE_ENVOY is set")
            } else {
                pod.proxy_pid().is_some()
            };
            started.then_some(())
        })
        .await;
        assert!(!pod.log_text().contains("status server listening"));
        let t0 = Instant::now();
        pod.signal(Signal::SIGTERM);
        let (status, at) = pod.wait_exit(Duration::from_secs(5)).await;
        println!(
            "timing: statusPort 0, DISABLE_ENVOY={disable_envoy}: exit {:?} after SIGTERM",
            at - t0
        );
        assert_eq!(status.code(), Some(0), "{}", pod.log_text());
    }
}
