//! Logging set-up for our binaries: `tracing` with an env-filter style level string.

use tracing_subscriber::{EnvFilter, fmt};

/// Colour only for a terminal (log files and pipes get plain text), and never with `NO_COLOR`.
fn colour() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Installs a global subscriber writing to stderr. `level` is an env-filter directive such as
/// `info` or `info,waypoint_testbed=debug`; `RUST_LOG` overrides it when set. `json` selects JSON lines.
pub fn init(level: &str, json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour())
        .with_target(true);
    // A second initialisation (tests starting several components) keeps the first subscriber.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Why a runtime log-level change was refused.
#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    /// The level name is not one of trace, debug, info, warning/warn, error, critical, off.
    #[error("unknown log level '{0}'")]
    UnknownLevel(String),
    /// A component name that cannot be used as a filter target.
    #[error("invalid component name '{0}'")]
    BadComponent(String),
    /// The subscriber is gone or the new filter does not parse.
    #[error("cannot apply the log filter: {0}")]
    Apply(String),
}

/// Levels set at runtime: one default and per-component (tracing target prefix) overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLevels {
    /// The level of everything without an override.
    pub default: String,
    /// Component → level.
    pub components: std::collections::BTreeMap<String, String>,
}

impl LogLevels {
    /// Reads an env-filter style directive (`warn,xds=debug`); parts it cannot read are dropped.
    pub fn from_directive(directive: &str) -> LogLevels {
        let mut levels = LogLevels {
            default: "info".to_owned(),
            components: Default::default(),
        };
        for part in directive
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            match part.split_once('=') {
                Some((target, level)) => {
                    if let Ok(level) = normalize_level(level) {
                        levels.components.insert(target.to_owned(), level);
                    }
                }
                None => {
                    if let Ok(level) = normalize_level(part) {
                        levels.default = level;
                    }
                }
            }
        }
        levels
    }

    /// The env-filter directive for these levels.
    pub fn directive(&self) -> String {
        let mut out = self.default.clone();
        for (component, level) in &self.components {
            out.push_str(&format!(",{component}={level}"));
        }
        out
    }

    /// The effective level of `component`.
    pub fn level_of(&self, component: &str) -> &str {
        self.components
            .get(component)
            .map(String::as_str)
            .unwrap_or(&self.default)
    }
}

/// Envoy/Istio level names → tracing names (`warning`→`warn`, `critical`/`fatal`→`error`).
pub fn normalize_level(level: &str) -> Result<String, LogLevelError> {
    let l = level.trim().to_ascii_lowercase();
    Ok(match l.as_str() {
        "trace" | "debug" | "info" | "warn" | "error" | "off" => l,
        "warning" => "warn".to_owned(),
        "critical" | "fatal" => "error".to_owned(),
        "none" => "off".to_owned(),
        _ => return Err(LogLevelError::UnknownLevel(level.to_owned())),
    })
}

type ReloadHandle = tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// Changes the global log filter at runtime (the proxy's `POST /logging`).
pub struct LogControl {
    handle: ReloadHandle,
    levels: std::sync::Mutex<LogLevels>,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("levels", &self.levels())
            .finish()
    }
}

impl LogControl {
    /// The current levels.
    pub fn levels(&self) -> LogLevels {
        match self.levels.lock() {
            Ok(l) => l.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Applies `f` to the levels and installs the resulting filter; nothing changes on error.
    pub fn update(
        &self,
        f: impl FnOnce(&mut LogLevels) -> Result<(), LogLevelError>,
    ) -> Result<LogLevels, LogLevelError> {
        let mut guard = match self.levels.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        let mut next = guard.clone();
        f(&mut next)?;
        for component in next.components.keys() {
            if component.is_empty()
                || !component
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.'))
            {
                return Err(LogLevelError::BadComponent(component.clone()));
            }
        }
        let filter = EnvFilter::try_new(next.directive())
            .map_err(|e| LogLevelError::Apply(e.to_string()))?;
        self.handle
            .reload(filter)
            .map_err(|e| LogLevelError::Apply(e.to_string()))?;
        *guard = next.clone();
        Ok(next)
    }

    /// Sets every component (and the default) to `level`, as Envoy's `/logging?level=`.
    pub fn set_all(&self, level: &str) -> Result<LogLevels, LogLevelError> {
        let level = normalize_level(level)?;
        self.update(|l| {
            l.default = level;
            l.components.clear();
            Ok(())
        })
    }

    /// Sets one component's level, as Envoy's `/logging?<component>=<level>`.
    pub fn set_component(&self, component: &str, level: &str) -> Result<LogLevels, LogLevelError> {
        let level = normalize_level(level)?;
        let component = component.to_owned();
        self.update(|l| {
            l.components.insert(component, level);
            Ok(())
        })
    }
}

/// Like [`init`], but the filter can be changed later through the returned [`LogControl`].
/// Returns `None` when a global subscriber was already installed (the first one stays).
pub fn init_reloadable(level: &str, json: bool) -> Option<LogControl> {
    use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};
    let directive = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| EnvFilter::try_new(v).is_ok())
        .unwrap_or_else(|| level.to_owned());
    let filter = EnvFilter::try_new(&directive).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = if json {
        registry
            .with(
                fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_target(true),
            )
            .try_init()
    } else {
        registry
            .with(
                fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(colour())
                    .with_target(true),
            )
            .try_init()
    };
    installed.ok().map(|()| LogControl {
        handle,
        levels: std::sync::Mutex::new(LogLevels::from_directive(&directive)),
    })
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
    fn log_levels_round_trip() {
        let l = LogLevels::from_directive("warning,xds=debug,bogus=loud");
        assert_eq!(l.default, "warn");
        assert_eq!(l.level_of("xds"), "debug");
        assert_eq!(l.level_of("admin"), "warn");
        assert_eq!(l.directive(), "warn,xds=debug");
        assert!(normalize_level("loud").is_err());
        assert_eq!(normalize_level("critical").expect("level"), "error");
    }

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
