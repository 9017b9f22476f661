//! Worker threads, as Envoy has them: `--concurrency` threads, each running its own
//! single-threaded runtime and accepting from every socket listener. A connection, the in-process
//! internal connections it opens, its upstream requests and their timers stay on the thread that
//! accepted it — no work stealing, no wake-ups across cores on the request path. The control plane
//! (xDS, SDS, admin, cluster rebuilds) runs on the main runtime.
//!
//! Without workers (unit tests, in-process tools) listeners are served on the caller's runtime.

use std::{
    cell::Cell,
    sync::{OnceLock, mpsc},
    thread,
    time::Duration,
};

use tokio::runtime::Handle;

/// The data-path runtimes.
static WORKERS: OnceLock<Vec<Handle>> = OnceLock::new();

/// Run on each worker at every [`TIMER_FLOOR`] tick (see [`on_tick`]).
static TICK_HOOK: OnceLock<fn()> = OnceLock::new();

thread_local! {
    /// 1 + this thread's worker index; 0 off the workers.
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Why the workers could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A runtime or thread could not be created.
    #[error("worker {index}: {source}")]
    Start {
        /// Which worker.
        index: usize,
        /// The cause.
        source: std::io::Error,
    },
    /// A worker thread ended before reporting its runtime.
    #[error("worker {0} ended while starting")]
    Died(usize),
    /// [`start`] ran twice.
    #[error("workers already started")]
    AlreadyStarted,
}

/// Starts `count` (at least one) worker threads, each with a current-thread runtime that runs
/// until the process exits.
pub fn start(count: usize) -> Result<(), WorkerError> {
    let mut handles = Vec::with_capacity(count.max(1));
    for index in 0..count.max(1) {
        let (tx, rx) = mpsc::sync_channel(1);
        thread::Builder::new()
            .name(format!("worker_{index}"))
            .spawn(move || {
                INDEX.set(index + 1);
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(runtime.handle().clone()));
                runtime.block_on(timer_floor());
            })
            .map_err(|source| WorkerError::Start { index, source })?;
        match rx.recv() {
            Ok(Ok(handle)) => handles.push(handle),
            Ok(Err(source)) => return Err(WorkerError::Start { index, source }),
            Err(_) => return Err(WorkerError::Died(index)),
        }
    }
    WORKERS
        .set(handles)
        .map_err(|_| WorkerError::AlreadyStarted)
}

/// How far ahead a worker always has a timer due (see [`timer_floor`]).
const TIMER_FLOOR: Duration = Duration::from_secs(1);

/// Keeps a timer due within [`TIMER_FLOOR`] in the worker's timer wheel. tokio wakes its driver
/// (an eventfd write, then one more turn through `epoll_wait`) whenever a timer is registered
/// that is due before every timer the driver last saw; on a worker whose other timers are
/// connection idle timeouts (1 h), each request's route and stream timers (15 s, 5 min) were
/// such timers: two system calls and a wake-up per request, for nothing, since the driver is
/// not asleep while this thread registers them. With a timer due within a second, timers of a
/// second or more never come first. It costs an idle worker one wake-up per second.
async fn timer_floor() {
    let mut tick = tokio::time::interval(TIMER_FLOOR);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Some(hook) = TICK_HOOK.get() {
            hook();
        }
    }
}

/// Has every worker run `hook` once a second, on its own thread (the proxy binary trims the
/// thread's allocator cache there). Only the first hook set counts; `false` for a later one.
pub fn on_tick(hook: fn()) -> bool {
    TICK_HOOK.set(hook).is_ok()
}

/// The worker runtimes, when [`start`] ran.
pub fn handles() -> Option<&'static [Handle]> {
    WORKERS.get().map(Vec::as_slice)
}

/// Which worker runs the caller: 1 + its index, 0 off the workers. Connection pools are kept per
/// worker (as Envoy's are), so a request and its upstream connection share a thread.
pub fn current() -> usize {
    INDEX.get()
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Instant,
    };

    use super::*;

    static TICKS_ON_WORKERS: AtomicUsize = AtomicUsize::new(0);

    fn count_if_on_a_worker() {
        if current() > 0 {
            TICKS_ON_WORKERS.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn the_tick_hook_runs_on_the_workers() {
        assert!(on_tick(count_if_on_a_worker));
        assert!(!on_tick(count_if_on_a_worker), "only the first hook counts");
        match start(1) {
            Ok(()) | Err(WorkerError::AlreadyStarted) => {}
            Err(e) => panic!("workers: {e}"),
        }
        // Bounded wait for the condition (the first tick is due at once, the next after 1 s).
        let deadline = Instant::now() + Duration::from_secs(10);
        while TICKS_ON_WORKERS.load(Ordering::Relaxed) == 0 {
            assert!(
                Instant::now() < deadline,
                "no worker ran the hook within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
