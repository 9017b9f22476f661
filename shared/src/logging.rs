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

/// Turns an Istio scope list (`default:info,ca:debug`, or a bare level) into an env-filter directive
/// (`info,ca=debug`). Istio's level names map as `warning`→`warn`, `none`→`off`, `fatal`→`error`.
pub fn istio_scopes_to_filter(scopes: &str) -> String {
    let level = |l: &str| match l.trim() {
        "warning" => "warn".to_owned(),
        "none" => "off".to_owned(),
        "fatal" | "critical" => "error".to_owned(),
        other => other.to_owned(),
    };
    let mut default = "info".to_owned();
    let mut parts = Vec::new();
    for item in scopes.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.split_once(':') {
            Some(("default" | "all", l)) => default = level(l),
            Some((scope, l)) => parts.push(format!("{scope}={}", level(l))),
            None => default = level(item),
        }
    }
    let mut out = default;
    for p in parts {
        out.push(',');
        out.push_str(&p);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_scopes() {
        assert_eq!(
            istio_scopes_to_filter("default:info,ca:debug"),
            "info,ca=debug"
        );
        assert_eq!(istio_scopes_to_filter("warning"), "warn");
        assert_eq!(istio_scopes_to_filter(""), "info");
        assert_eq!(
            istio_scopes_to_filter("xdsproxy:none,default:error"),
            "error,xdsproxy=off"
        );
    }
}
