//! Graceful termination of the agent and the real proxy, with real signals and long requests in
//! flight through the waypoint (client → forwarder → HBONE → proxy → sink → echo, 2 s answers):
//! readiness fails within 100 ms, every in-flight request completes, new connections are refused
//! once the proxy's drain time has passed, and the agent exits 0 within terminationDrainDuration +
//! 1 s. Then the variants: `EXIT_ON_ZERO_ACTIVE_CONNECTIONS`, a second SIGTERM, `POST /drain`, `POST
//! /quitquitquit`, the proxy dying during the drain, and no status server.

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::{eventually, mesh, proxy_config, readiness, serial, status_url, wait_ready};
use nix::sys::signal::Signal;
use serde_json::json;
use waypoint_testbed::waypoint::{EchoSeen, WaypointMesh, http_get};

/// `terminationDrainDuration` of the main drain test.
const TERMINATION_DRAIN: Duration = Duration::from_secs(3);
/// `drainDuration` (the proxy's `--drain-time-s`): after it the proxy's listeners stop accepting.
const PROXY_DRAIN_TIME: Duration = Duration::from_secs(1);
/// How long the echo holds each in-flight request.
const SLOW_MS: u64 = 2000;

/// A request in flight: its answer (or error) and when it completed.
type InFlight = tokio::task::JoinHandle<(Result<(u16, String), String>, Instant)>;

/// Requests of `delay_ms` through the waypoint, one connection each, started now.
fn slow_requests(mesh: &WaypointMesh, n: usize, delay_ms: u64) -> Vec<InFlight> {
    let client = mesh.client_addr();
    (0..n)
        .map(|i| {
            tokio::spawn(async move {
                let r = http_get(client, &format!("/slow/{i}?x-echo-delay-ms={delay_ms}")).await;
                (r.map_err(|e| e.to_string()), Instant::now())
            })
        })
        .collect()
}

/// Waits until the sink has `n` more tunnels than `before` (the waypoint passed the requests on).
async fn wait_tunnels(mesh: &WaypointMesh, before: usize, n: usize) {
    eventually(
        Duration::from_secs(10),
        "the requests at the sink",
        || async { (mesh.sink_streams().len() >= before + n).then_some(()) },
    )
    .await;
}

/// Every request answered 200 by the echo; returns when the last one completed.
async fn all_ok(requests: Vec<InFlight>, mesh: &WaypointMesh) -> (usize, Instant) {
    let mut last = None;
    let n = requests.len();
    for (i, r) in requests.into_iter().enumerate() {
        let (result, at) = r.await.expect("request task");
        match result {
            Ok((200, body)) => {
                let seen = EchoSeen::parse(body.as_bytes()).expect("an echo answer");
                assert!(seen.path.starts_with(&format!("/slow/{i}")), "{seen:?}");
            }
            other => panic!(
                "in-flight request {i} failed during the drain: {other:?}\n{}",
                mesh.log_tail(60)
            ),
        }
        last = last.max(Some(at));
    }
    (n, last.expect("at least one request"))
}

/// Polls readiness as fast as it answers until it is not 200; returns when and what.
async fn until_unready(mesh: &WaypointMesh, within: Duration) -> (Instant, u16, String) {
    let deadline = Instant::now() + within;
    loop {
        let (code, body) = readiness(mesh).await;
        if code != 200 {
            return (Instant::now(), code, body);
        }
        assert!(
            Instant::now() < deadline,
            "readiness still 200 after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Whether a TCP connection to `addr` is refused (as opposed to accepted).
async fn refused(addr: SocketAddr) -> bool {
    match tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => false,
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        Err(_) => false,
    }
}

/// Waits until the log holds `text`.
async fn wait_log(mesh: &WaypointMesh, text: &str) {
    eventually(Duration::from_secs(10), text, || async {
        mesh.log_text().contains(text).then_some(())
    })
    .await;
}

/// The drain bounds, measured from the SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0_in_time() {
    let _serial = serial().await;
    let mesh = mesh("drain", |o| {
        proxy_config(
            o,
            "terminationDrainDuration",
            json!(format!("{}s", TERMINATION_DRAIN.as_secs())),
        );
        proxy_config(
            o,
            "drainDuration",
            json!(format!("{}s", PROXY_DRAIN_TIME.as_secs())),
        );
    })
    .await;
    mesh.wait_hbone_ready(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    wait_ready(&mesh, Duration::from_secs(30)).await;
    let hbone = mesh.addrs.waypoint_hbone();

    let before = mesh.sink_streams().len();
    let in_flight = slow_requests(&mesh, 4, SLOW_MS);
    wait_tunnels(&mesh, before, 4).await;

    let t0 = Instant::now();
    mesh.signal_agent(Signal::SIGTERM).expect("SIGTERM");
    let (unready_at, code, body) = until_unready(&mesh, Duration::from_secs(1)).await;
    let to_503 = unready_at - t0;
    println!(
        "timing: readiness {code} {:?} {to_503:?} after SIGTERM",
        body.trim()
    );
    assert_eq!(code, 503, "{body}");
    assert!(
        to_503 < Duration::from_millis(100),
        "readiness failed only {to_503:?} after SIGTERM"
    );

    // Within the proxy's drain time new connections are still accepted (Envoy: discouraged, not
    // refused); once it has passed they are refused, while the proxy still runs.
    assert!(
        !refused(hbone).await,
        "{hbone} refused inside the drain window"
    );
    let refused_at = eventually(
        PROXY_DRAIN_TIME + Duration::from_secs(1),
        "new connections refused after the drain window",
        || async { refused(hbone).await.then(Instant::now) },
    )
    .await;
    let proxy_alive = mesh.proxy_pid().is_some();
    let late = http_get(mesh.client_addr(), "/late").await;
    println!(
        "timing: new connections refused {:?} after SIGTERM (proxy drain time {PROXY_DRAIN_TIME:?}); a new request through the forwarder: {late:?}",
        refused_at - t0
    );
    assert!(
        refused_at - t0 >= PROXY_DRAIN_TIME,
        "refused before the drain window ended"
    );
    assert!(proxy_alive, "the proxy itself refused, not its absence");
    assert!(
        !matches!(late, Ok((200, _))),
        "a request on a new connection after the drain window was served: {late:?}"
    );

    let (n, last_done) = all_ok(in_flight, &mesh).await;
    let (status, exited_at) = mesh
        .wait_agent_exit(TERMINATION_DRAIN + Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let exit_after = exited_at - t0;
    println!(
        "timing: {n} in-flight requests OK, the last {:?} after SIGTERM; agent exit {exit_after:?} after SIGTERM (terminationDrainDuration {TERMINATION_DRAIN:?})",
        last_done - t0
    );
    assert_eq!(status.code(), Some(0), "{}", mesh.log_tail(40));
    assert!(
        exit_after >= TERMINATION_DRAIN,
        "exited before terminationDrainDuration: {exit_after:?}"
    );
    assert!(
        exit_after < TERMINATION_DRAIN + Duration::from_secs(1),
        "exit took {exit_after:?}"
    );
    let log = mesh.log_text();
    assert!(
        log.contains("listener stopped (drained)"),
        "{}",
        mesh.log_tail(40)
    );
    assert!(
        log.contains("stopping the proxy (SIGTERM)"),
        "{}",
        mesh.log_tail(40)
    );
}

/// `EXIT_ON_ZERO_ACTIVE_CONNECTIONS=true`: after `MINIMUM_DRAIN_DURATION` the agent polls the
/// proxy's `downstream_cx_active` and exits within a poll period of the last connection's end,
/// long before terminationDrainDuration (30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_on_zero_active_connections_ends_the_drain_early() {
    let _serial = serial().await;
    let mesh = mesh("zerocx", |o| {
        proxy_config(o, "terminationDrainDuration", json!("30s"));
        common::env(o, "EXIT_ON_ZERO_ACTIVE_CONNECTIONS", "true");
        common::env(o, "MINIMUM_DRAIN_DURATION", "300ms");
    })
    .await;
    mesh.wait_hbone_ready(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let before = mesh.sink_streams().len();
    let in_flight = slow_requests(&mesh, 3, 1500);
    wait_tunnels(&mesh, before, 3).await;
    let t0 = Instant::now();
    mesh.signal_agent(Signal::SIGTERM).expect("SIGTERM");
    let (n, last_done) = all_ok(in_flight, &mesh).await;
    let (status, exited_at) = mesh
        .wait_agent_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "timing: zero-cx drain: {n} requests done {:?} after SIGTERM, agent exit {:?} after SIGTERM",
        last_done - t0,
        exited_at - t0
    );
    let log = mesh.log_text();
    assert_eq!(status.code(), Some(0), "{}", mesh.log_tail(40));
    assert!(
        exited_at >= last_done,
        "exited before the last request ended"
    );
    assert!(
        exited_at - last_done < Duration::from_millis(1500),
        "more than a poll period after the last connection: {:?}",
        exited_at - last_done
    );
    assert!(
        log.contains("there are still"),
        "the poll saw the connections\n{}",
        mesh.log_tail(40)
    );
    assert!(
        log.contains("there are no more active connections"),
        "{}",
        mesh.log_tail(40)
    );
}

/// Starts a mesh with a long termination drain and waits until it is ready.
async fn long_drain_mesh(name: &str) -> WaypointMesh {
    let mesh = mesh(name, |o| {
        proxy_config(o, "terminationDrainDuration", json!("30s"))
    })
    .await;
    wait_ready(&mesh, Duration::from_secs(30)).await;
    mesh
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_the_drain_at_once() {
    let _serial = serial().await;
    let mesh = long_drain_mesh("twice").await;
    mesh.signal_agent(Signal::SIGTERM).expect("SIGTERM");
    wait_log(&mesh, "graceful termination period is").await;
    let t0 = Instant::now();
    mesh.signal_agent(Signal::SIGTERM).expect("SIGTERM");
    let (status, at) = mesh
        .wait_agent_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    println!("timing: second SIGTERM → exit in {:?}", at - t0);
    assert_eq!(status.code(), Some(0));
    assert!(at - t0 < Duration::from_secs(1));
    assert!(mesh.log_text().contains("second SIGTERM during the drain"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_dying_during_the_drain_finishes_it() {
    let _serial = serial().await;
    let mesh = long_drain_mesh("proxyexit").await;
    let pid = mesh.proxy_pid().expect("the proxy runs");
    mesh.signal_agent(Signal::SIGTERM).expect("SIGTERM");
    wait_log(&mesh, "graceful termination period is").await;
    let t0 = Instant::now();
    common::kill9(pid);
    let (status, at) = mesh
        .wait_agent_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "timing: proxy killed during the drain → agent exit in {:?}",
        at - t0
    );
    let log = mesh.log_text();
    assert_eq!(status.code(), Some(0), "{}", mesh.log_tail(40));
    assert!(
        log.contains("the proxy exited during the drain"),
        "{}",
        mesh.log_tail(40)
    );
    assert!(
        !log.contains("restarting it in"),
        "no restart while draining"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_endpoint_then_sigterm_exits_at_once() {
    let _serial = serial().await;
    let mesh = long_drain_mesh("drainnow").await;
    let get = agent::http_client::get(&status_url(&mesh, "/drain"), Duration::from_secs(5))
        .await
        .expect("GET /drain");
    assert_eq!(get.status.as_u16(), 405);
    let post = agent::http_client::post(&status_url(&mesh, "/drain"), Duration::from_secs(5))
        .await
        .expect("POST /drain");
    assert_eq!(post.status.as_u16(), 200, "{}", post.text());
    let (code, body) = readiness(&mesh).await;
    assert_eq!(code, 503, "{body}");
    // The proxy drained (pilot-agent's DrainNow: `graceful&skip_exit`) and says so.
    let (_, state) = mesh.admin_get("/ready").await.expect("proxy /ready");
    assert_eq!(state.trim(), "DRAINING");
    assert!(mesh.agent_exit().is_none(), "/drain does not exit");

    let t0 = Instant::now();
    mesh.signal_agent(Signal::SIGTERM).expect("SIGTERM");
    let (status, at) = mesh
        .wait_agent_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    println!("timing: SIGTERM after /drain → exit in {:?}", at - t0);
    assert_eq!(status.code(), Some(0));
    assert!(at - t0 < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quitquitquit_exits_at_once() {
    let _serial = serial().await;
    let mesh = long_drain_mesh("quit").await;
    let t0 = Instant::now();
    let resp =
        agent::http_client::post(&status_url(&mesh, "/quitquitquit"), Duration::from_secs(5))
            .await
            .expect("POST /quitquitquit");
    assert_eq!(resp.status.as_u16(), 200);
    let (status, at) = mesh
        .wait_agent_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    println!("timing: /quitquitquit → exit in {:?}", at - t0);
    assert_eq!(status.code(), Some(0));
    assert!(at - t0 < Duration::from_secs(1));
    assert_eq!(mesh.proxy_pid(), None, "the proxy went with the agent");
}

/// `statusPort: 0` (no status server), with the proxy and with `DISABLE_ENVOY`: signals alone
/// drive the lifecycle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_status_server_signals_still_drain_and_exit() {
    let _serial = serial().await;
    for disable_envoy in ["false", "true"] {
        let mesh = mesh("nostatus", |o| {
            o.wait_ready = false;
            proxy_config(o, "statusPort", json!(0));
            proxy_config(o, "terminationDrainDuration", json!("500ms"));
            common::env(o, "DISABLE_ENVOY", disable_envoy);
        })
        .await;
        if disable_envoy == "true" {
            wait_log(&mesh, "DISABLE_ENVOY is set").await;
        } else {
            // Ready as far as the proxy goes: it answers its admin `/ready` with LIVE.
            eventually(Duration::from_secs(30), "the proxy LIVE", || async {
                matches!(mesh.admin_get("/ready").await, Ok((200, _))).then_some(())
            })
            .await;
        }
        assert!(!mesh.log_text().contains("status server listening"));
        let t0 = Instant::now();
        mesh.signal_agent(Signal::SIGTERM).expect("SIGTERM");
        let (status, at) = mesh
            .wait_agent_exit(Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        println!(
            "timing: statusPort 0, DISABLE_ENVOY={disable_envoy}: exit {:?} after SIGTERM",
            at - t0
        );
        assert_eq!(status.code(), Some(0), "{}", mesh.log_tail(40));
    }
}
