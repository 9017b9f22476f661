//! `proxy`: the waypoint proxy, started by the agent with Envoy's command line.

use std::{process::ExitCode, sync::Arc};

use proxy::{admin, bootstrap, cli, server::Server, xds, xds::sds::SecretStore};
use waypoint_shared::logging::LogControl;

// jemalloc instead of glibc's malloc: the data path allocates and frees small buffers on every
// request from worker threads (Envoy links tcmalloc for the same reason).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main`. By default jemalloc keeps freed pages for 10 s before
/// handing them back; a streamed 100 MiB body through the waypoint (HBONE frames, copies of up to
/// 64 KiB) then left 15-45 MiB of such pages behind, growing from transfer to transfer. Purging
/// after 30 ms keeps the peak within ~8 MiB of idle at the same CPU per request (scripts/bench).
///
/// The thread caches are larger and trimmed less often than by default: at least 64 objects per
/// size class, 8 slabs' worth up to 512, and a trim event every 1 MiB a thread allocates instead
/// of 64 KiB (each event trims one of the 41 cached size classes in turn). What one thread can
/// hold at most grows from ~4.6 to ~9.7 MB (small classes 2.2 → 7.2 MB; only a thread that has
/// allocated that much of every class gets there).
/// Under HTTP/2 load the number of live per-request objects (8 KiB read buffers, stream state)
/// swings by hundreds: with the default caches each swing went through the arena (a slab made and
/// freed per request, cache refills and flushes under the arena lock), 8.4k of the ~71k
/// instructions per h2c request; with these 4.3k (66.4k in all), and the proxy's CPU per request
/// fell ~6 % over ten interleaved h2c c64 rounds at the same peak RSS (about 50 MiB either way).
///
/// `_RJEM_MALLOC_CONF` in the environment still overrides it.
// The symbol name is jemalloc's (prefixed by tikv-jemalloc-sys); nothing else reads or writes it.
#[allow(unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: Option<&'static std::ffi::c_char> =
    // SAFETY: a pointer to the first byte of a NUL-terminated string literal, valid forever.
    Some(unsafe {
        &*c"dirty_decay_ms:30,muzzy_decay_ms:0,tcache_nslots_small_min:64,lg_tcache_nslots_mul:3,tcache_nslots_small_max:512,tcache_gc_incr_bytes:1048576"
            .as_ptr()
    });

/// Hands what this thread's jemalloc cache holds, and every arena's unused dirty pages, back to
/// the kernel now. jemalloc purges pages only as a side effect of later allocations in the same
/// arena (there is no background thread: its wake-ups cost ~2 % CPU per request under load), and
/// a thread's cache gives its objects back only as that thread allocates on, so what a thread
/// frees before it goes idle stays resident: the start-up config work (bootstrap parsing on the
/// main thread, the initial xDS on the control thread), a dropped descriptor pool. Called after
/// such one-off releases, never on the data path.
fn purge_allocator() {
    mallctl_run(c"thread.tcache.flush");
    // `MALLCTL_ARENAS_ALL`: the purge applies to every arena.
    mallctl_run(c"arena.4096.purge");
}

/// Gives what this thread's jemalloc cache holds back to its arena, and lets the arenas purge the
/// pages unused for `dirty_decay_ms`. Each worker runs it once a second. A thread's cache is
/// trimmed only as that thread allocates, and purging happens only as arenas are used, so a
/// worker kept what a burst left behind for as long as it stayed quiet: after 4 s of h2c c64
/// (640 streams) the plain proxy stayed at 45-49 MiB when idle, and is at 29-30 MiB 3 s later
/// with this. Once a second costs a busy worker a few hundred cache refills against tens of
/// thousands of requests.
fn trim_thread_cache() {
    mallctl_run(c"thread.tcache.flush");
    // `MALLCTL_ARENAS_ALL`, as in `purge_allocator`.
    mallctl_run(c"arena.4096.decay");
}

/// Runs a jemalloc control that reads and writes nothing.
fn mallctl_run(name: &std::ffi::CStr) {
    #[allow(unsafe_code)]
    // SAFETY: the name is a NUL-terminated string; the controls passed here read and write
    // nothing, so every other argument is null/0 as jemalloc requires.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        tracing::debug!("jemalloc {name:?}: error {rc}");
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match cli::parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("proxy: {e}");
            return ExitCode::from(1);
        }
    };
    let logging = waypoint_shared::logging::init_reloadable(
        &cli::tracing_filter(&options.log_level, &options.component_log_level),
        false,
    )
    .map(Arc::new);
    for flag in &options.ignored {
        tracing::warn!("accepted without effect: {flag}");
    }
    let loaded = match bootstrap::load(
        options.config_path.as_deref(),
        options.config_yaml.as_deref(),
    ) {
        Ok(b) => b,
        Err(e) => {
            eprintln!(
                "proxy: bootstrap {}: {e}",
                options
                    .config_path
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            );
            return ExitCode::from(1);
        }
    };
    if options.mode == cli::Mode::Validate {
        // The bootstrap under the same allowlist and compile rules as xDS resources: every
        // problem on its own line with its JSON path (`static_resources.listeners[1]…`).
        let shown = options
            .config_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let problems = proxy::config::bootstrap::validate(&loaded.bootstrap);
        if problems.is_empty() {
            println!("configuration '{shown}' OK");
            return ExitCode::SUCCESS;
        }
        for p in &problems {
            println!("{p}");
        }
        eprintln!(
            "proxy: configuration '{shown}' has {} problem(s)",
            problems.len()
        );
        return ExitCode::from(1);
    }
    let threads = if options.concurrency > 0 {
        options.concurrency
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    };
    // Envoy's threading: `--concurrency` workers own the connections; the main runtime (one
    // thread) runs xDS, SDS, the admin API and config compilation.
    proxy::workers::on_tick(trim_thread_cache);
    if let Err(e) = proxy::workers::start(threads) {
        eprintln!("proxy: {e}");
        return ExitCode::from(1);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("main")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("proxy: runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(run(Server::new(options, loaded), logging))
}

/// How often the server gauges are refreshed (Envoy's default stats flush interval).
const STATS_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);
/// How long the JSON descriptor pool stays cached without use.
const POOL_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

async fn run(server: Arc<Server>, logging: Option<Arc<LogControl>>) -> ExitCode {
    // Set once, before anything can go LIVE.
    let _ = server.give_back_memory.set(purge_allocator);
    let secrets = Arc::new(SecretStore::default());
    // The data plane: LDS socket listeners are bound (or NACKed) as they arrive.
    let _dataplane = {
        let dp = proxy::dataplane::DataPlane::new(server.clone(), secrets.clone());
        server
            .config
            .set_listener_hooks(Arc::new(proxy::listener::manager::Hooks(Arc::downgrade(
                &dp,
            ))));
        dp
    };
    let admin = admin::Admin::new(server.clone(), secrets.clone(), logging);
    admin::stats::refresh(&admin);
    if let Some(addr) = server.bootstrap.admin {
        match admin::serve(admin.clone(), addr).await {
            Ok(bound) => tracing::info!(target: "admin", %bound, "admin listening"),
            Err(e) => {
                tracing::error!(target: "admin", %addr, "cannot bind admin: {e}");
                return ExitCode::from(1);
            }
        }
    }
    // The bootstrap's static listeners and clusters (15021 readiness → agent, 15090 Prometheus →
    // admin) join the snapshot and are served by the data path; like Envoy, a static listener
    // that cannot be bound is fatal at start.
    match proxy::config::bootstrap::compile(&server.bootstrap.bootstrap) {
        Ok(compiled) => {
            let problems = server
                .config
                .seed_static(compiled.listeners, compiled.clusters);
            if !problems.is_empty() {
                for p in &problems {
                    tracing::error!(target: "listener", "{p}");
                }
                return ExitCode::from(1);
            }
        }
        Err(errors) => {
            for e in &errors {
                tracing::error!(target: "listener", "bootstrap: {e}");
            }
            return ExitCode::from(1);
        }
    }
    // SDS: `default` and `ROOTCA` from `sds-grpc` at once, plus what transport sockets name.
    if !server.bootstrap.grpc_clusters.is_empty() {
        tokio::spawn(xds::sds::run(server.clone(), secrets.clone()));
    }
    match server.bootstrap.ads.clone() {
        Some(ads) => {
            let workloads = server.bootstrap.node.id.starts_with("waypoint~")
                || has_workload_discovery(&server);
            tokio::spawn(xds::ads::run(server.clone(), ads, workloads));
        }
        None => server.initial_fetch_done(),
    }
    tokio::spawn({
        let admin = admin.clone();
        async move {
            let mut ticker = tokio::time::interval(STATS_FLUSH);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                admin::stats::refresh(&admin);
                // After start-up the JSON descriptor pool is needed only by config dumps and
                // TypedStruct configs: ~5 MB of idle RSS given back while nothing uses it.
                if waypoint_proto::json::release_idle_pool(POOL_IDLE) {
                    purge_allocator();
                }
            }
        }
    });
    // This thread parsed and compiled the bootstrap and now only waits for signals: what its
    // cache kept of that work goes back now (the control thread's goes back at LIVE).
    purge_allocator();
    let mut shutdown = server.shutdown.subscribe();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("signals: {e}");
            return ExitCode::from(1);
        }
    };
    tokio::select! {
        _ = shutdown.wait_for(|s| *s) => tracing::info!("quitquitquit: exiting"),
        _ = term.recv() => tracing::info!("SIGTERM: exiting"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: exiting"),
    }
    ExitCode::SUCCESS
}

/// Whether the bootstrap carries Istio's workload-discovery extension (WDS subscription).
fn has_workload_discovery(server: &Server) -> bool {
    server
        .bootstrap
        .bootstrap
        .bootstrap_extensions
        .iter()
        .any(|e| {
            e.typed_config.as_ref().is_some_and(|t| {
                t.type_url.ends_with("istio.workload.BootstrapExtension")
                    || (t.type_url.ends_with("TypedStruct")
                        && String::from_utf8_lossy(&t.value)
                            .contains("istio.workload.BootstrapExtension"))
            })
        })
}
