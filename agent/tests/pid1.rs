//! The agent as PID 1 of its own PID namespace (`unshare --pid --fork --mount-proc`, as in a
//! container without an init) supervising the real proxy: after `kill -9` restarts no zombie is
//! left (`/proc/*/stat` state `Z` count 0), an orphan re-parented to the agent is reaped, and
//! SIGTERM still drains and exits 0.

mod common;

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use common::{eventually, kill9, mesh, proc_state, serial, wait_new_proxy, wait_ready};
use nix::sys::signal::Signal;
use waypoint_testbed::waypoint::{descendants, processes};

/// The `unshare` arguments that make a PID namespace here, if any: as root, or else with a user
/// namespace (`-r`) where unprivileged ones are allowed.
fn unshare_wrapper() -> Option<Vec<String>> {
    for args in [
        &["--pid", "--fork", "--mount-proc", "--kill-child"][..],
        &["-r", "--pid", "--fork", "--mount-proc", "--kill-child"][..],
    ] {
        let works = Command::new("unshare")
            .args(args)
            .arg("true")
            .output()
            .is_ok_and(|o| o.status.success());
        if works {
            let mut wrapper = vec!["unshare".to_owned()];
            wrapper.extend(args.iter().map(|a| (*a).to_owned()));
            return Some(wrapper);
        }
    }
    None
}

fn pid_ns(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

/// Pids (host view) in the PID namespace of `pid`, with their state letters.
fn namespace(pid: u32) -> Vec<(u32, char)> {
    let Some(ns) = pid_ns(pid) else {
        return Vec::new();
    };
    processes()
        .into_iter()
        .filter(|p| pid_ns(p.pid).as_ref() == Some(&ns))
        .filter_map(|p| Some((p.pid, proc_state(p.pid)?)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_pid_1_the_agent_reaps_every_child_and_exits_0_after_a_drain() {
    let Some(wrapper) = unshare_wrapper() else {
        println!(
            "SKIPPED: neither `unshare --pid --fork --mount-proc` nor `unshare -r ...` works here \
             (needs root, or unprivileged user namespaces)"
        );
        return;
    };
    let _serial = serial().await;
    let user_ns = wrapper.iter().any(|a| a == "-r");
    let mesh = mesh("pid1", |o| o.wrapper = wrapper).await;
    // unshare forks the agent: its only child.
    let unshare_pid = mesh.agent_pid();
    let agent_pid = eventually(
        Duration::from_secs(10),
        "the agent under unshare",
        || async { descendants(unshare_pid).first().copied() },
    )
    .await;
    assert_ne!(
        pid_ns(agent_pid),
        pid_ns(std::process::id()),
        "the agent runs in a PID namespace of its own"
    );
    wait_ready(&mesh, Duration::from_secs(30)).await;
    assert!(
        mesh.log_text().contains("running as PID 1"),
        "{}",
        mesh.log_tail(40)
    );

    // Proxy restarts: each killed proxy is the agent's child to reap.
    let mut pid = mesh.proxy_pid().expect("the proxy runs");
    for round in 1..=3 {
        let t0 = Instant::now();
        kill9(pid);
        pid = wait_new_proxy(&mesh, Some(pid), Duration::from_secs(3)).await;
        wait_ready(&mesh, Duration::from_secs(3)).await;
        println!(
            "timing: PID 1 restart {round}: ready again after {:?}",
            t0.elapsed()
        );
    }

    // An orphan: a shell in the namespace starts `sleep` in the background and exits; the kernel
    // re-parents the sleep to the namespace's PID 1, the agent, which must reap it when it ends.
    let mut nsenter = Command::new("nsenter");
    nsenter.args(["-t", &agent_pid.to_string(), "-p", "-m"]);
    if user_ns {
        nsenter.args(["-U", "--preserve-credentials"]);
    }
    let out = nsenter
        .args(["sh", "-c", "sleep 0.3 & echo $!"])
        .output()
        .expect("nsenter");
    assert!(
        out.status.success(),
        "nsenter: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "orphan started (namespace pid {})",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    eventually(
        Duration::from_secs(5),
        "the orphan reaped by the agent",
        || async {
            mesh.log_text()
                .contains("reaped an orphaned process")
                .then_some(())
        },
    )
    .await;

    // No zombie, and nothing but the agent and the current proxy left in the namespace.
    let settled = eventually(Duration::from_secs(5), "a settled namespace", || async {
        let procs = namespace(agent_pid);
        (procs.len() == 2).then_some(procs)
    })
    .await;
    let zombies: Vec<_> = settled.iter().filter(|(_, s)| *s == 'Z').collect();
    assert!(zombies.is_empty(), "zombies: {zombies:?}");
    assert!(
        settled.iter().any(|(p, _)| *p == agent_pid) && settled.iter().any(|(p, _)| *p == pid),
        "{settled:?}"
    );

    // unshare ignores SIGTERM while it waits: signal the agent, as the kubelet's would reach it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent_pid as i32),
        Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let t0 = Instant::now();
    let (status, at) = mesh
        .wait_agent_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "timing: PID 1 agent exit {:?} after SIGTERM (terminationDrainDuration 1s)",
        at - t0
    );
    assert_eq!(status.code(), Some(0), "{}", mesh.log_tail(40));
    assert!(mesh.log_text().contains("graceful termination period is"));
}
