//! The agent supervising the real proxy, with real signals (`kill -9` of the proxy's pid): a killed
//! proxy is replaced and ready again within 2 s, and serves traffic through the waypoint with its
//! config and certificate re-served from the agent's sockets (no new CSR); in a crash loop the restart delay grows as configured up to its cap;
//! after `PROXY_MAX_RESTARTS` restarts without a stable run the agent gives up and exits 1; and
//! pilot-agent's `EXIT_ON_PROXY_EXIT` behaviour. (The stable-run reset is a unit test of
//! `supervisor`.)

mod common;

use std::time::{Duration, Instant};

use common::{env, kill9, mesh, serial, wait_new_proxy, wait_ready};
use waypoint_testbed::waypoint::http_get;

/// The bound: `kill -9` of the proxy → readiness 200 again.
const READY_AGAIN: Duration = Duration::from_secs(2);
/// What the crash-loop test configures.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_millis(400);
const MAX_RESTARTS: usize = 4;
/// The restart delays those settings give: doubling from the base, capped.
const DELAYS_MS: [u64; MAX_RESTARTS] = [100, 200, 400, 400];
/// How much later than its configured delay a new proxy may show up (reaping, fork/exec, and this
/// test's 5 ms /proc polling on a busy 2-core machine). Smaller than the cap's doubling (400 ms),
/// so a delay that kept doubling past the cap fails.
const SPAWN_SLACK: Duration = Duration::from_millis(300);

/// The `delay_ms` of every "restarting it in" log line, in order.
fn logged_delays(log: &str) -> Vec<u64> {
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

/// One mesh, five crashes: the first restart is ready within 2 s, the delays then grow as
/// configured (observed as kill → new pid, and in the agent's log), and the fifth crash exhausts
/// `PROXY_MAX_RESTARTS`: the agent exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_restart_ready_within_2s_backoff_grows_then_gives_up() {
    let _serial = serial().await;
    let mesh = mesh("crashloop", |o| {
        env(
            o,
            "PROXY_RESTART_BACKOFF_BASE",
            &format!("{}ms", BACKOFF_BASE.as_millis()),
        );
        env(
            o,
            "PROXY_RESTART_BACKOFF_MAX",
            &format!("{}ms", BACKOFF_MAX.as_millis()),
        );
        env(o, "PROXY_MAX_RESTARTS", &MAX_RESTARTS.to_string());
        // Longer than the whole test: every crash counts against PROXY_MAX_RESTARTS.
        env(o, "PROXY_RESTART_STABLE_PERIOD", "60s");
    })
    .await;
    wait_ready(&mesh, Duration::from_secs(30)).await;
    let csrs_before = mesh.istiod.ca.issued().await.len();

    // 1. kill -9 → a new proxy, ready again within 2 s; the agent keeps running.
    let first = mesh.proxy_pid().expect("the proxy runs");
    let t0 = Instant::now();
    kill9(first);
    let second = wait_new_proxy(&mesh, Some(first), READY_AGAIN).await;
    let respawned = t0.elapsed();
    wait_ready(&mesh, READY_AGAIN.saturating_sub(t0.elapsed())).await;
    let ready_again = t0.elapsed();
    println!(
        "timing: kill -9 → new proxy {second} after {respawned:?}, readiness 200 after {ready_again:?}"
    );
    assert!(
        ready_again < READY_AGAIN,
        "ready again after {ready_again:?}"
    );
    assert!(mesh.agent_exit().is_none(), "the agent must not exit");
    // Traffic flows through the waypoint again: the new proxy got its config and certificate from
    // the agent's XDS and SDS sockets ...
    let client = mesh.client_addr();
    mesh.wait_for(
        "traffic through the restarted waypoint",
        Duration::from_secs(10),
        || async move {
            match http_get(client, "/after-restart").await {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // ... without a new CSR.
    assert_eq!(
        mesh.istiod.ca.issued().await.len(),
        csrs_before,
        "a restarted proxy must not cost a CSR"
    );

    // 2. Crash loop: kill each new proxy as soon as it shows up.
    let mut observed = vec![respawned];
    let mut pid = second;
    for _ in 1..MAX_RESTARTS {
        let t = Instant::now();
        kill9(pid);
        pid = wait_new_proxy(&mesh, Some(pid), Duration::from_secs(5)).await;
        observed.push(t.elapsed());
    }
    println!("timing: kill -9 → next proxy, per crash: {observed:?} (configured {DELAYS_MS:?} ms)");
    for (i, (seen, want)) in observed.iter().zip(DELAYS_MS).enumerate() {
        let want = Duration::from_millis(want);
        assert!(
            *seen >= want && *seen < want + SPAWN_SLACK,
            "restart {} came {seen:?} after the crash; configured delay {want:?}",
            i + 1
        );
    }
    // Growth, and the cap: 100 → 200 → 400 → 400, never 800.
    assert!(observed[1] > observed[0] && observed[2] > observed[1]);
    assert!(observed[3] < BACKOFF_MAX * 2);
    assert_eq!(
        common::restarts_metric(&mesh).await,
        Some(MAX_RESTARTS as u64),
        "istio_agent_proxy_restarts"
    );
    assert!(mesh.agent_exit().is_none(), "the agent must not exit");

    // 3. One crash more than PROXY_MAX_RESTARTS allows: the agent gives up and exits 1.
    let t = Instant::now();
    kill9(pid);
    let (status, at) = mesh
        .wait_agent_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    println!("timing: agent gave up {:?} after the last crash", at - t);
    let log = mesh.log_text();
    assert_eq!(status.code(), Some(1), "{}", mesh.log_tail(40));
    assert_eq!(
        logged_delays(&log),
        DELAYS_MS,
        "logged restart delays\n{}",
        mesh.log_tail(40)
    );
    assert!(
        log.contains(&format!("giving up after {MAX_RESTARTS} restarts")),
        "{}",
        mesh.log_tail(40)
    );
    assert!(log.contains("signal: SIGKILL"), "the exit is logged");
    assert_eq!(mesh.proxy_pid(), None, "no proxy is left behind");
}

/// `EXIT_ON_PROXY_EXIT=true`: pilot-agent's behaviour, the agent exits 0 when the proxy dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_on_proxy_exit_is_pilot_agents_behaviour() {
    let _serial = serial().await;
    let mesh = mesh("exitonexit", |o| env(o, "EXIT_ON_PROXY_EXIT", "true")).await;
    wait_ready(&mesh, Duration::from_secs(30)).await;
    let t0 = Instant::now();
    kill9(mesh.proxy_pid().expect("the proxy runs"));
    let (status, at) = mesh
        .wait_agent_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    println!("timing: agent exit {:?} after the proxy's kill -9", at - t0);
    let log = mesh.log_text();
    assert_eq!(status.code(), Some(0), "{}", mesh.log_tail(40));
    assert!(
        log.contains("EXIT_ON_PROXY_EXIT is set"),
        "{}",
        mesh.log_tail(40)
    );
    assert!(logged_delays(&log).is_empty(), "no restart");
}
