//! Logging set-up for our binaries: `tracing` with an env-filter style level string.

use tracing_subscriber::{EnvFilter, fmt};

/// Installs a global subscriber writing to stderr. `level` is an env-filter directive such as
/// `info` or `info,waypoint_testbed=debug`; `RUST_LOG` overrides it when set. `json` selects JSON lines.
pub fn init(level: &str, json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true);
    // A second initialisation (tests starting several components) keeps the first subscriber.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
