//! `/logging`: lists the log levels and (POST) changes them at runtime through the reload handle set
//! up in main — `?level=<l>` sets every component, `?<component>=<l>` one, `?paths=a:l,b:l` several.
//! Components are `tracing` targets (`xds`, `sds`, `admin`, ...). Envoy lists on POST only; a GET
//! here lists too.

use http::{Method, Response, StatusCode};
use waypoint_shared::logging::{LogLevelError, LogLevels};

use super::{Admin, Body, text};

/// Components shown even without an override (the targets this proxy logs under).
const COMPONENTS: &[&str] = &[
    "admin",
    "config",
    "connection",
    "hbone",
    "http",
    "main",
    "pool",
    "router",
    "sds",
    "upstream",
    "xds",
];

const USAGE: &str = "usage: /logging?<name>=<level> (change single level)
usage: /logging?paths=name1:level1,name2:level2,... (change multiple levels)
usage: /logging?level=<level> (change all levels)
levels: trace debug info warning error critical off
";

/// Envoy's listing: `active loggers:` then `  <name>: <level>` sorted.
fn listing(levels: &LogLevels) -> String {
    let mut names: std::collections::BTreeSet<&str> = COMPONENTS.iter().copied().collect();
    names.extend(levels.components.keys().map(String::as_str));
    let mut out = String::from("active loggers:\n");
    out.push_str(&format!("  default: {}\n", envoy_name(&levels.default)));
    for name in names {
        out.push_str(&format!(
            "  {name}: {}\n",
            envoy_name(levels.level_of(name))
        ));
    }
    out
}

/// tracing level → Envoy's spelling.
fn envoy_name(level: &str) -> &str {
    match level {
        "warn" => "warning",
        other => other,
    }
}

/// Handles `/logging`.
pub fn handle(admin: &Admin, method: &Method, params: &[(String, String)]) -> Response<Body> {
    let Some(control) = &admin.logging else {
        return text(
            StatusCode::NOT_IMPLEMENTED,
            "runtime log levels are unavailable: another logger was installed first\n",
        );
    };
    if params.is_empty() {
        return text(StatusCode::OK, listing(&control.levels()));
    }
    if *method != Method::POST {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("Method {method} not allowed, POST required.\n"),
        );
    }
    let mut result: Result<LogLevels, LogLevelError> = Ok(control.levels());
    for (key, value) in params {
        result = match key.as_str() {
            "level" => control.set_all(value),
            "paths" => {
                let mut r = Ok(control.levels());
                for pair in value.split(',').filter(|p| !p.is_empty()) {
                    r = match pair.split_once(':') {
                        Some((name, level)) => control.set_component(name.trim(), level),
                        None => Err(LogLevelError::BadComponent(pair.to_owned())),
                    };
                    if r.is_err() {
                        break;
                    }
                }
                r
            }
            name => control.set_component(name, value),
        };
        if result.is_err() {
            break;
        }
    }
    match result {
        Ok(levels) => {
            tracing::info!(target: "admin", filter = %levels.directive(), "log levels changed");
            text(StatusCode::OK, listing(&levels))
        }
        Err(e) => text(StatusCode::BAD_REQUEST, format!("error: {e}\n{USAGE}")),
    }
}
