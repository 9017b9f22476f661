//! Envoy's command line, the subset the proxy honours plus the flags pilot-agent passes.

use std::path::PathBuf;

/// `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Load the bootstrap and serve.
    Serve,
    /// Load and compile the bootstrap, report problems, exit 0/1.
    Validate,
}

/// Parsed command line.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// `-c` / `--config-path`.
    pub config_path: Option<PathBuf>,
    /// `--config-yaml` (merged over the file, as Envoy does).
    pub config_yaml: Option<String>,
    /// `--mode`.
    pub mode: Mode,
    /// `--drain-time-s`.
    pub drain_time_s: u64,
    /// `--drain-strategy gradual|immediate`.
    pub drain_strategy_immediate: bool,
    /// `--concurrency` (0: number of CPUs).
    pub concurrency: usize,
    /// `-l` / `--log-level`.
    pub log_level: String,
    /// `--component-log-level a:b,c:d`.
    pub component_log_level: String,
    /// `--local-address-ip-version v4|v6`.
    pub ipv6: bool,
    /// Accepted flags we do not act on, and unknown flags (warned about at start).
    pub ignored: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            config_path: None,
            config_yaml: None,
            mode: Mode::Serve,
            drain_time_s: 600,
            drain_strategy_immediate: false,
            concurrency: 0,
            log_level: "info".to_owned(),
            component_log_level: String::new(),
            ipv6: false,
            ignored: Vec::new(),
        }
    }
}

/// Flags pilot-agent passes (or Envoy users commonly pass) that take a value and have no effect here.
const IGNORED_WITH_VALUE: &[&str] = &[
    "--file-flush-interval-msec",
    "--file-flush-min-size-kb",
    "--base-id",
    "--parent-shutdown-time-s",
    "--service-cluster",
    "--service-node",
    "--service-zone",
    "--log-format",
    "--log-path",
];
/// Value-less flags accepted without effect.
const IGNORED_SWITCHES: &[&str] = &[
    "--disable-hot-restart",
    "--allow-unknown-static-fields",
    "--skip-deprecated-logs",
    "--enable-core-dump",
    "--log-format-escaped",
    "--reject-unknown-dynamic-fields",
    "--ignore-unknown-dynamic-fields",
];

/// Parses Envoy-style arguments (after the program name).
pub fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || -> Result<String, String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("{flag} needs a value")),
            }
        };
        match flag.as_str() {
            "-c" | "--config-path" => o.config_path = Some(PathBuf::from(value()?)),
            "--config-yaml" => o.config_yaml = Some(value()?),
            "--mode" => {
                o.mode = match value()?.as_str() {
                    "serve" => Mode::Serve,
                    "validate" => Mode::Validate,
                    other => return Err(format!("--mode {other:?}: want serve or validate")),
                }
            }
            "--drain-time-s" => {
                o.drain_time_s = value()?
                    .parse()
                    .map_err(|_| "--drain-time-s wants seconds".to_owned())?
            }
            "--drain-strategy" => {
                o.drain_strategy_immediate = match value()?.as_str() {
                    "immediate" => true,
                    "gradual" => false,
                    other => {
                        return Err(format!(
                            "--drain-strategy {other:?}: want immediate or gradual"
                        ));
                    }
                }
            }
            "--concurrency" => {
                o.concurrency = value()?
                    .parse()
                    .map_err(|_| "--concurrency wants a number".to_owned())?
            }
            "-l" | "--log-level" => o.log_level = value()?,
            "--component-log-level" => o.component_log_level = value()?,
            "--local-address-ip-version" => {
                o.ipv6 = match value()?.as_str() {
                    "v4" => false,
                    "v6" => true,
                    other => {
                        return Err(format!(
                            "--local-address-ip-version {other:?}: want v4 or v6"
                        ));
                    }
                }
            }
            f if IGNORED_WITH_VALUE.contains(&f) => {
                let v = value()?;
                o.ignored.push(format!("{f} {v}"));
            }
            f if IGNORED_SWITCHES.contains(&f) => o.ignored.push(f.to_owned()),
            f if f.starts_with('-') => o.ignored.push(format!("{f} (unknown)")),
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    if o.config_path.is_none() && o.config_yaml.is_none() {
        return Err("no bootstrap: pass -c FILE (or --config-yaml)".to_owned());
    }
    Ok(o)
}

/// Envoy log level names → tracing env-filter levels (`warning`→`warn`, `critical`→`error`).
pub fn tracing_filter(level: &str, components: &str) -> String {
    let map = |l: &str| {
        match l {
            "warning" => "warn",
            "critical" => "error",
            "off" => "off",
            other => other,
        }
        .to_owned()
    };
    let mut out = map(level);
    for part in components.split(',').filter(|p| !p.is_empty()) {
        if let Some((c, l)) = part.split_once(':') {
            out.push_str(&format!(",{c}={}", map(l)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn pilot_agent_argument_list() {
        let o = parse(&args("-c ./etc/istio/proxy/envoy-rev.json --drain-time-s 45 --drain-strategy immediate --local-address-ip-version v4 --file-flush-interval-msec 1000 --disable-hot-restart --allow-unknown-static-fields -l warning --component-log-level misc:error --skip-deprecated-logs --concurrency 2"))
            .expect("parses");
        assert_eq!(
            o.config_path,
            Some(PathBuf::from("./etc/istio/proxy/envoy-rev.json"))
        );
        assert_eq!(
            (
                o.drain_time_s,
                o.drain_strategy_immediate,
                o.concurrency,
                o.ipv6
            ),
            (45, true, 2, false)
        );
        assert_eq!(
            tracing_filter(&o.log_level, &o.component_log_level),
            "warn,misc=error"
        );
        assert_eq!(o.ignored.len(), 4);
        assert_eq!(o.mode, Mode::Serve);
    }

    #[test]
    fn errors_are_clear() {
        assert!(
            parse(&args("--mode check -c x"))
                .expect_err("bad mode")
                .contains("--mode")
        );
        assert!(
            parse(&args("--drain-time-s"))
                .expect_err("missing value")
                .contains("needs a value")
        );
        assert!(
            parse(&args("-l info"))
                .expect_err("no config")
                .contains("-c FILE")
        );
        let o =
            parse(&args("-c x --mode validate --brand-new-flag")).expect("unknown flag accepted");
        assert_eq!(o.ignored, ["--brand-new-flag (unknown)"]);
    }
}
