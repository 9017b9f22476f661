//! The agent supervising a proxy process (the test bed's `fake-proxy`) with real signals: restart
//! after `kill -9` with its config and certificate re-served from the agent's sockets, capped
//! exponential backoff, giving up after too many unstable restarts, the stable-run reset, and
//! pilot-agent's `EXIT_ON_PROXY_EXIT` behaviour.

mod common;

use std::time::{Duration, Instant};

use common::{Pod, PodOptions};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

fn kill9(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill -9 the proxy");
}

/// The `delay_ms` of every "restarting it in" log line, in order.
fn restart_delays(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("restarting it in"))
        .filter_map(|l| {
            let at = l.find("delay_ms=")? + "delay_ms=".len();
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_restarts_the_proxy_ready_within_2s() {
    let mut pod = Pod::start(PodOptions::new("restart")).await;
    let first = pod.wait_ready(Duration::from_secs(30)).await;
    println!("timing: first readiness after start: {first:?}");
    assert!(
        pod.log_text().contains("fake-proxy["),
        "the proxy's stderr flows into the agent's"
    );

    for round in 1..=3 {
        let pid = pod.proxy_pid().expect("pid file");
        let t0 = Instant::now();
        kill9(pid);
        // Readiness follows the new proxy only: wait for its process, then for 200.
        let new_pid = pod.wait_new_proxy(Some(pid), Duration::from_secs(2)).await;
        pod.wait_ready(Duration::from_secs(2).saturating_sub(t0.elapsed()))
            .await;
        let took = t0.elapsed();
        println!("timing: restart {round}: kill -9 → new proxy {new_pid} ready in {took:?}");
        assert!(
            took < Duration::from_secs(2),
            "restart {round} took {took:?}"
        );
        assert!(pod.try_exit().is_none(), "the agent must not exit");
    }
    assert_eq!(pod.restarts_metric().await, Some(3));
    let log = pod.log_text();
    assert_eq!(
        restart_delays(&log),
        [100, 200, 400],
        "backoff doubles from 100 ms\n{log}"
    );
    assert!(log.contains("signal: SIGKILL"), "the exit is logged\n{log}");
    // The certificate came from the CA once; restarted proxies got it from the SDS socket.
    assert_eq!(
        pod.istiod.ca.issued().await.len(),
        1,
        "no new CSR for a restarted proxy"
    );

    pod.signal(Signal::SIGTERM);
    let (status, _) = pod.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_backoff_grows_to_the_cap() {
    // The proxy crashes 50 ms after each start; the backoff doubles from 100 ms up to the 400 ms cap.
    let mut pod = Pod::start(
        PodOptions::new("backoff")
            .env("FAKE_PROXY_EXIT_AFTER_MS", "50")
            .env("PROXY_RESTART_BACKOFF_MAX", "400ms")
            .env("PROXY_MAX_RESTARTS", "0"),
    )
    .await;
    let start = Instant::now();
    let delays = common::eventually(Duration::from_secs(15), "six restarts", || async {
        let d = restart_delays(&pod.log_text());
        (d.len() >= 6).then_some(d)
    })
    .await;
    println!(
        "timing: six crash-loop restarts in {:?}, delays {delays:?}",
        start.elapsed()
    );
    assert_eq!(delays[..6], [100, 200, 400, 400, 400, 400]);
    let restarts = pod.restarts_metric().await.expect("metric");
    assert!(restarts >= 5, "istio_agent_proxy_restarts = {restarts}");
    // Readiness says why while the proxy is down.
    assert!(pod.try_exit().is_none());

    // SIGTERM in the middle of a crash loop still ends cleanly.
    pod.signal(Signal::SIGTERM);
    let (status, _) = pod.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gives_up_after_max_restarts_and_exits_1() {
    let mut pod = Pod::start(
        PodOptions::new("giveup")
            .env("FAKE_PROXY_EXIT_AFTER_MS", "20")
            .env("PROXY_RESTART_BACKOFF_BASE", "10ms")
            .env("PROXY_MAX_RESTARTS", "3"),
    )
    .await;
    let (status, _) = pod.wait_exit(Duration::from_secs(20)).await;
    let log = pod.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert_eq!(restart_delays(&log), [10, 20, 40]);
    assert!(log.contains("giving up after 3 restarts"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stable_run_resets_the_backoff() {
    // Every proxy runs 600 ms, longer than the 300 ms stable period: each restart starts the backoff
    // over, and two allowed restarts never run out.
    let mut pod = Pod::start(
        PodOptions::new("stable")
            .env("FAKE_PROXY_EXIT_AFTER_MS", "600")
            .env("PROXY_RESTART_STABLE_PERIOD", "300ms")
            .env("PROXY_MAX_RESTARTS", "2"),
    )
    .await;
    let delays = common::eventually(Duration::from_secs(20), "four restarts", || async {
        let d = restart_delays(&pod.log_text());
        (d.len() >= 4).then_some(d)
    })
    .await;
    assert_eq!(delays[..4], [100, 100, 100, 100]);
    assert!(pod.try_exit().is_none(), "the agent keeps going");
    pod.signal(Signal::SIGTERM);
    let (status, _) = pod.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_on_proxy_exit_is_pilot_agents_behaviour() {
    let mut pod = Pod::start(PodOptions::new("exitonexit").env("EXIT_ON_PROXY_EXIT", "true")).await;
    pod.wait_ready(Duration::from_secs(30)).await;
    let pid = pod.proxy_pid().expect("pid file");
    let t0 = Instant::now();
    kill9(pid);
    let (status, at) = pod.wait_exit(Duration::from_secs(5)).await;
    println!("timing: agent exit {:?} after the proxy's kill -9", at - t0);
    let log = pod.log_text();
    assert_eq!(
        status.code(),
        Some(0),
        "pilot-agent exits 0 when Envoy exits\n{log}"
    );
    assert!(log.contains("EXIT_ON_PROXY_EXIT is set"), "{log}");
    assert!(restart_delays(&log).is_empty());
}
