//! The agent as PID 1 of its own PID namespace (`unshare --pid --fork --mount-proc`, as in a container
//! without an init): proxy restarts leave no zombie, orphans re-parented to the agent are reaped, and
//! SIGTERM still drains and exits 0.

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::{Pod, PodOptions, ProcInfo, processes};
use nix::sys::signal::Signal;

/// Whether `unshare --pid --fork --mount-proc` works here (it needs root or user namespaces).
fn unshare_works() -> bool {
    Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child", "true"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn pid_ns(pid: u32) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

/// Processes (host view) in the PID namespace of `pid`.
fn namespace_processes(pid: u32) -> Vec<ProcInfo> {
    let Some(ns) = pid_ns(pid) else {
        return Vec::new();
    };
    processes()
        .into_iter()
        .filter(|p| pid_ns(p.pid).as_ref() == Some(&ns))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_pid_1_the_agent_reaps_every_child() {
    if !unshare_works() {
        println!(
            "SKIPPED: `unshare --pid --fork --mount-proc` does not work here (needs root or user namespaces)"
        );
        return;
    }
    let wrapper = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
        .map(str::to_owned)
        .to_vec();
    // Each proxy leaves a child that outlives it by up to 1 s: when the proxy is killed, that child
    // is re-parented to PID 1, the agent.
    let mut pod = Pod::start(
        PodOptions {
            wrapper,
            ..PodOptions::new("pid1")
        }
        .env("FAKE_PROXY_ORPHAN_MS", "1000"),
    )
    .await;
    let unshare_pid = pod.child.id();
    let agent_pid = common::eventually(
        Duration::from_secs(10),
        "the agent under unshare",
        || async {
            processes()
                .into_iter()
                .find(|p| p.ppid == unshare_pid)
                .map(|p| p.pid)
        },
    )
    .await;
    assert_ne!(
        pid_ns(agent_pid),
        pid_ns(std::process::id()),
        "the agent runs in its own PID namespace"
    );
    let ready = pod.wait_ready(Duration::from_secs(30)).await;
    println!("timing: ready as PID 1 after {ready:?}");
    assert!(
        pod.log_text().contains("running as PID 1"),
        "{}",
        pod.log_text()
    );

    for round in 1..=3 {
        // The pid file holds the namespace's pid; find the proxy in the host's view.
        let ns_pid = pod.proxy_pid().expect("pid file");
        let proxy = common::eventually(Duration::from_secs(5), "the proxy process", || async {
            namespace_processes(agent_pid)
                .into_iter()
                .find(|p| common::is_fake_proxy(p.pid) && p.ppid == agent_pid)
        })
        .await;
        let t0 = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(proxy.pid as i32),
            Signal::SIGKILL,
        )
        .expect("kill -9");
        pod.wait_new_proxy(Some(ns_pid), Duration::from_secs(3))
            .await;
        pod.wait_ready(Duration::from_secs(3)).await;
        println!(
            "timing: PID 1 restart {round}: ready again after {:?}",
            t0.elapsed()
        );
    }

    // Killed proxies (the agent's children) and their orphans (re-parented to the agent) are all
    // reaped: no zombie, and only the agent, the current proxy and its own child remain.
    let t0 = Instant::now();
    let settled = common::eventually(
        Duration::from_secs(5),
        "no zombie and no leftover orphan",
        || async {
            let procs = namespace_processes(agent_pid);
            let zombies = procs.iter().filter(|p| p.state == 'Z').count();
            let orphans = procs
                .iter()
                .filter(|p| {
                    p.ppid == agent_pid && p.cmdline.iter().any(|a| a == "--orphan-sleep-ms")
                })
                .count();
            (zombies == 0 && orphans == 0).then_some(procs)
        },
    )
    .await;
    println!(
        "timing: namespace settled {:?} later: {:?}",
        t0.elapsed(),
        settled
            .iter()
            .map(|p| (
                p.pid,
                p.state,
                p.cmdline.first().cloned().unwrap_or_default()
            ))
            .collect::<Vec<_>>()
    );
    // Hold it: zombies would be permanent, so a second look must agree.
    let zombies: Vec<_> = namespace_processes(agent_pid)
        .into_iter()
        .filter(|p| p.state == 'Z')
        .collect();
    assert!(zombies.is_empty(), "zombies: {zombies:?}");
    let reaped = pod.log_text().matches("reaped an orphaned process").count();
    assert!(
        reaped >= 1,
        "orphans were re-parented to the agent and reaped by it\n{}",
        pod.log_text()
    );
    println!("orphans reaped by the agent: {reaped}");

    // unshare ignores SIGTERM while it waits: signal the agent itself, as the kubelet's would reach it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent_pid as i32),
        Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let (status, _) = pod.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{}", pod.log_text());
}
