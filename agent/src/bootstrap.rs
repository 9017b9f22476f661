//! The proxy's bootstrap: Envoy v3 JSON written to `<configPath>/envoy-rev.json`
//! (reference/istio-facts.md §1.5–1.6), shaped like pilot-agent's ambient golden bootstrap
//! (`tests/fixtures/istio/bootstrap_ambient_golden.json`).
//!
//! [`render`] is pure: it turns an [`AgentConfig`] plus the pod's downward-API labels and annotations
//! into the bootstrap JSON. [`write`] renders and writes it atomically; [`read_pod_info`] reads the
//! downward-API files (`./etc/istio/pod/labels`, `./etc/istio/pod/annotations`).

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{Map, Value as Json, json};

use crate::config::{AgentConfig, ProxyType};

/// The label pilot-agent drops from the pod labels (Deployment-controller noise).
const POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// Envoy's application log format (pilot-agent's template, text form).
const TEXT_LOG_FORMAT: &str = "%Y-%m-%dT%T.%fZ\t%l\tenvoy %n %g:%#\t%v\tthread=%t";

/// Content types the stats listener compresses (pilot-agent's template).
const STATS_CONTENT_TYPES: &[&str] = &[
    "text/plain",
    "application/vnd.google.protobuf",
    "application/openmetrics-text",
    "application/openmetrics-protobuf",
];

/// Istio's stats tag regexes, in the template's order, split around the `extraStatTags` slot.
const STATS_TAGS_HEAD: &[(&str, &str)] = &[
    ("cluster_name", r"^cluster(\.(.+);)"),
    (
        "http_conn_manager_prefix",
        r"^http\.(((?:[_.[:digit:]\w]*|[_\[\]aAbBcCdDeEfF[:digit:]\w\:]*));\.)",
    ),
    ("thread_name", r"^server(\.(.+))\.watchdog"),
    ("tcp_prefix", r"^tcp\.((.*?)\.)\w+?$"),
    ("response_code", r"_rq(_(\d{3}))$"),
    ("response_code_class", r"_rq(_(\dxx))$"),
    (
        "http_conn_manager_listener_prefix",
        r"^listener(?=\.).*?\.http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)",
    ),
    (
        "listener_address",
        r"^listener\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)",
    ),
    (
        "mongo_prefix",
        r"^mongo\.(.+?)\.(collection|cmd|cx_|op_|delays_|decoding_)(.*?)$",
    ),
];
const STATS_TAGS_TAIL: &[(&str, &str)] = &[
    ("cache", r"(cache\.(.+?)\.)"),
    ("component", r"(component\.(.+?)\.)"),
    ("tag", r"(tag\.(.+?);\.)"),
    ("wasm_filter", r"(wasm_filter\.(.+?)\.)"),
    ("authz_enforce_result", r"rbac(\.(allowed|denied))"),
    ("authz_dry_run_action", r"(\.istio_dry_run_(allow|deny)_)"),
    ("authz_dry_run_result", r"(\.shadow_(allowed|denied))"),
];

/// Stats pilot-agent always keeps (`requiredEnvoyStatsMatcherInclusion*`).
const REQUIRED_PREFIXES: &[&str] = &[
    "cluster_manager",
    "listener_manager",
    "server",
    "cluster.xds-grpc",
    "wasm",
];
const REQUIRED_SUFFIXES: &[&str] = &[
    "rbac.allowed",
    "rbac.denied",
    "shadow_allowed",
    "shadow_denied",
];
const REQUIRED_REGEXPS: &[&str] = &[r"vhost\..*\.route\..*"];

/// Pod annotations pilot-agent reads into the bootstrap.
mod annotation {
    pub const INCLUSION_PREFIXES: &str = "sidecar.istio.io/statsInclusionPrefixes";
    pub const INCLUSION_SUFFIXES: &str = "sidecar.istio.io/statsInclusionSuffixes";
    pub const INCLUSION_REGEXPS: &str = "sidecar.istio.io/statsInclusionRegexps";
    pub const EXTRA_STAT_TAGS: &str = "sidecar.istio.io/extraStatTags";
    pub const HISTOGRAM_BUCKETS: &str = "sidecar.istio.io/statsHistogramBuckets";
    pub const FLUSH_INTERVAL: &str = "sidecar.istio.io/statsFlushInterval";
}

/// An error writing the bootstrap file.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// A filesystem operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What we were doing (`creating directory`, `writing`, `renaming to`).
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The bootstrap could not be serialised.
    #[error("serialising bootstrap: {0}")]
    Serialize(#[from] serde_json::Error),
}

/// Renders the Envoy v3 bootstrap for the proxy as proto3-JSON (proto field names), shaped like
/// pilot-agent's ambient golden bootstrap. `pod_labels` and `pod_annotations` are the downward-API
/// files' contents (see [`read_pod_info`]); either may be empty.
pub fn render(
    cfg: &AgentConfig,
    pod_labels: &BTreeMap<String, String>,
    pod_annotations: &BTreeMap<String, String>,
) -> Json {
    let metadata_discovery = metadata_discovery(cfg);
    let labels = merged_labels(cfg, pod_labels);
    let ipv6 = !cfg.instance_ips.is_empty() && cfg.instance_ips.iter().all(IpAddr::is_ipv6);
    let localhost = if ipv6 { "::1" } else { "127.0.0.1" };
    let wildcard = if ipv6 { "::" } else { "0.0.0.0" };

    let mut root = Map::new();
    root.insert(
        "application_log_config".into(),
        application_log_config(cfg.log_as_json),
    );
    root.insert(
        "node".into(),
        json!({
            "id": cfg.node_id(),
            "cluster": service_cluster(cfg, &labels),
            "locality": {},
            "metadata": Json::Object(node_metadata(cfg, &labels, pod_annotations, metadata_discovery)),
        }),
    );
    root.insert("layered_runtime".into(), layered_runtime(cfg));
    root.insert(
        "bootstrap_extensions".into(),
        bootstrap_extensions(metadata_discovery),
    );
    root.insert(
        "stats_config".into(),
        stats_config(cfg, pod_annotations, metadata_discovery),
    );
    if let Some(interval) = pod_annotations
        .get(annotation::FLUSH_INTERVAL)
        .and_then(|v| crate::config::parse_duration(v).ok())
    {
        root.insert(
            "stats_flush_interval".into(),
            Json::String(proto_duration(interval)),
        );
    }
    root.insert(
        "admin".into(),
        json!({
            "access_log": [{
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": "/dev/null",
                },
            }],
            // Kept as pilot-agent writes it: Envoy only uses it when profiling is started from the
            // admin API, and our proxy accepts and ignores it.
            "profile_path": "/var/lib/istio/data/envoy.prof",
            "address": {
                "socket_address": {
                    "address": localhost,
                    "port_value": cfg.proxy_config.proxy_admin_port,
                },
            },
        }),
    );
    root.insert("dynamic_resources".into(), dynamic_resources());
    root.insert(
        "static_resources".into(),
        json!({
            "clusters": static_clusters(cfg, localhost),
            "listeners": static_listeners(cfg, wildcard, localhost),
        }),
    );
    root.insert("overload_manager".into(), overload_manager(cfg));
    // pilot-agent adds `outlier_detection.event_log_path` here only with `--outlierLogPath`, which
    // a waypoint Deployment does not pass.
    root.insert(
        "cluster_manager".into(),
        json!({ "enable_deferred_cluster_creation": true }),
    );
    root.insert(
        "deferred_stat_options".into(),
        json!({ "enable_deferred_creation_stats": true }),
    );
    Json::Object(root)
}

/// Renders the bootstrap and writes it as pretty JSON to `cfg.bootstrap_path()`, atomically (a
/// temporary file in the same directory, then a rename), creating the parent directories.
/// Returns the path written.
pub fn write(
    cfg: &AgentConfig,
    pod_labels: &BTreeMap<String, String>,
    pod_annotations: &BTreeMap<String, String>,
) -> Result<PathBuf, BootstrapError> {
    let path = cfg.bootstrap_path();
    let mut bytes = serde_json::to_vec_pretty(&render(cfg, pod_labels, pod_annotations))?;
    bytes.push(b'\n');
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|source| BootstrapError::Io {
        action: "creating directory",
        path: dir.clone(),
        source,
    })?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = write_file(&tmp, &bytes).and_then(|()| {
        std::fs::rename(&tmp, &path).map_err(|source| BootstrapError::Io {
            action: "renaming into place",
            path: path.clone(),
            source,
        })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| path)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), BootstrapError> {
    let io = |source| BootstrapError::Io {
        action: "writing",
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::create(path).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Reads a Kubernetes downward-API file (`key="value"` per line, the value a Go-quoted string) into
/// a map. A missing or unreadable file gives an empty map; malformed lines are skipped with a
/// warning, the rest kept.
pub fn read_pod_info(path: impl AsRef<Path>) -> BTreeMap<String, String> {
    let path = path.as_ref();
    match std::fs::read_to_string(path) {
        Ok(text) => parse_pod_info(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read pod info file; ignoring it");
            BTreeMap::new()
        }
    }
}

/// Parses downward-API file text (see [`read_pod_info`]).
pub fn parse_pod_info(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let parsed = line
            .split_once('=')
            .and_then(|(k, v)| go_unquote(v.trim()).map(|v| (k.trim().to_owned(), v)));
        match parsed {
            Some((k, v)) if !k.is_empty() => {
                out.insert(k, v);
            }
            _ => tracing::warn!(
                line = n + 1,
                text = line,
                "malformed downward-API line; skipped"
            ),
        }
    }
    out
}

/// Go's `strconv.Unquote` for double-quoted and back-quoted strings.
fn go_unquote(s: &str) -> Option<String> {
    if let Some(raw) = s.strip_prefix('`').and_then(|r| r.strip_suffix('`')) {
        return (!raw.contains('`')).then(|| raw.to_owned());
    }
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    let mut out: Vec<u8> = Vec::with_capacity(inner.len());
    let mut chars = inner.chars();
    let mut utf8 = [0u8; 4];
    let hex = |chars: &mut std::str::Chars<'_>, n: usize| -> Option<u32> {
        let mut v = 0u32;
        for _ in 0..n {
            v = v * 16 + chars.next()?.to_digit(16)?;
        }
        Some(v)
    };
    while let Some(c) = chars.next() {
        match c {
            '"' | '\n' => return None,
            '\\' => {
                let byte = match chars.next()? {
                    'a' => 0x07,
                    'b' => 0x08,
                    'f' => 0x0c,
                    'n' => b'\n',
                    'r' => b'\r',
                    't' => b'\t',
                    'v' => 0x0b,
                    '\\' => b'\\',
                    '"' => b'"',
                    'x' => u8::try_from(hex(&mut chars, 2)?).ok()?,
                    d @ '0'..='7' => {
                        let mut v = d.to_digit(8)?;
                        for _ in 0..2 {
                            v = v * 8 + chars.next()?.to_digit(8)?;
                        }
                        u8::try_from(v).ok()?
                    }
                    u @ ('u' | 'U') => {
                        let ch = char::from_u32(hex(&mut chars, if u == 'u' { 4 } else { 8 })?)?;
                        out.extend_from_slice(ch.encode_utf8(&mut utf8).as_bytes());
                        continue;
                    }
                    _ => return None,
                };
                out.push(byte);
            }
            c => out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes()),
        }
    }
    // `\x` escapes may spell bytes that are not UTF-8 (Go allows that); keep what we can.
    Some(
        String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
    )
}

/// Whether the `metadata_discovery` bootstrap extension is on: forced for waypoints (pilot-agent's
/// `waypoint~` special case), else from node metadata `METADATA_DISCOVERY`/`ENABLE_HBONE`.
fn metadata_discovery(cfg: &AgentConfig) -> bool {
    let meta_true = |k: &str| cfg.meta.get(k).and_then(Json::as_str) == Some("true");
    cfg.proxy_type == ProxyType::Waypoint
        || meta_true("METADATA_DISCOVERY")
        || meta_true("ENABLE_HBONE")
}

/// `ISTIO_METAJSON_LABELS` overlaid with the pod's labels, without `pod-template-hash`.
fn merged_labels(
    cfg: &AgentConfig,
    pod_labels: &BTreeMap<String, String>,
) -> BTreeMap<String, Json> {
    let mut labels: BTreeMap<String, Json> = match cfg.meta.get("LABELS") {
        Some(Json::Object(m)) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        _ => BTreeMap::new(),
    };
    for (k, v) in pod_labels {
        labels.insert(k.clone(), Json::String(v.clone()));
    }
    labels.remove(POD_TEMPLATE_HASH);
    labels
}

/// `node.cluster` as pilot-agent computes it, from the metadata after the pod labels are merged.
fn service_cluster(cfg: &AgentConfig, labels: &BTreeMap<String, Json>) -> String {
    if labels.is_empty() {
        return cfg.service_cluster();
    }
    let mut with_labels = cfg.clone();
    with_labels.meta.insert(
        "LABELS".to_owned(),
        Json::Object(labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
    );
    with_labels.service_cluster()
}

/// The node metadata (reference/istio-facts.md §1.5), keys sorted.
fn node_metadata(
    cfg: &AgentConfig,
    labels: &BTreeMap<String, Json>,
    pod_annotations: &BTreeMap<String, String>,
    metadata_discovery: bool,
) -> Map<String, Json> {
    let mut meta: BTreeMap<String, Json> = cfg.meta.clone();
    let s = |v: &str| Json::String(v.to_owned());
    meta.insert("NAME".into(), s(&cfg.pod_name));
    meta.insert("NAMESPACE".into(), s(&cfg.pod_namespace));
    meta.insert("SERVICE_ACCOUNT".into(), s(&cfg.service_account));
    let ips: Vec<String> = cfg.instance_ips.iter().map(IpAddr::to_string).collect();
    meta.insert("INSTANCE_IPS".into(), Json::String(ips.join(",")));
    meta.insert("CLUSTER_ID".into(), s(&cfg.cluster_id));
    meta.insert("ISTIO_VERSION".into(), s(&cfg.istio_version));
    if labels.is_empty() {
        meta.remove("LABELS");
    } else {
        meta.insert(
            "LABELS".into(),
            Json::Object(labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
        );
    }
    if !pod_annotations.is_empty() {
        let annotations = pod_annotations
            .iter()
            .map(|(k, v)| (k.clone(), s(v)))
            .collect();
        meta.insert("ANNOTATIONS".into(), Json::Object(annotations));
    }
    meta.insert("PROXY_CONFIG".into(), proxy_config_meta(cfg));
    meta.insert("ENVOY_STATUS_PORT".into(), json!(cfg.envoy_status_port));
    meta.insert(
        "ENVOY_PROMETHEUS_PORT".into(),
        json!(cfg.envoy_prometheus_port),
    );
    let discovery = &cfg.proxy_config.discovery_address;
    meta.insert("PILOT_SAN".into(), json!([cfg.server_name(discovery)]));
    meta.insert(
        "WORKLOAD_IDENTITY_SOCKET_FILE".into(),
        s(&cfg.workload_identity_socket_file),
    );
    // An explicit ISTIO_META_METADATA_DISCOVERY / ISTIO_META_ENABLE_HBONE wins over these defaults.
    if metadata_discovery {
        meta.entry("METADATA_DISCOVERY".into())
            .or_insert_with(|| s("true"));
    }
    if cfg.proxy_type == ProxyType::Waypoint {
        meta.entry("ENABLE_HBONE".into())
            .or_insert_with(|| s("true"));
    }
    if cfg.exit_on_zero_active_connections {
        meta.insert("EXIT_ON_ZERO_ACTIVE_CONNECTIONS".into(), s("true"));
    }
    meta.into_iter().collect()
}

/// `PROXY_CONFIG`: the effective defaults overlaid with what `PROXY_CONFIG` set.
fn proxy_config_meta(cfg: &AgentConfig) -> Json {
    let pc = &cfg.proxy_config;
    let mut out = Map::new();
    if let Some(binary) = effective_binary_path(cfg) {
        out.insert("binaryPath".into(), Json::String(binary));
    }
    out.insert("configPath".into(), json!(pc.config_path));
    out.insert("discoveryAddress".into(), json!(pc.discovery_address));
    out.insert(
        "drainDuration".into(),
        json!(proto_duration(pc.drain_duration)),
    );
    out.insert(
        "terminationDrainDuration".into(),
        json!(proto_duration(pc.termination_drain_duration)),
    );
    out.insert("proxyAdminPort".into(), json!(pc.proxy_admin_port));
    out.insert("statusPort".into(), json!(pc.status_port));
    out.insert("serviceCluster".into(), json!(pc.service_cluster));
    if let Json::Object(raw) = &pc.raw {
        for (k, v) in raw {
            out.insert(k.clone(), v.clone());
        }
    }
    Json::Object(
        out.into_iter()
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect(),
    )
}

/// `ProxyConfig.binaryPath`, or (when unset) the `proxy` binary beside the running agent; `None`
/// when neither is known.
fn effective_binary_path(cfg: &AgentConfig) -> Option<String> {
    if !cfg.proxy_config.binary_path.is_empty() {
        return Some(cfg.proxy_config.binary_path.clone());
    }
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.join("proxy").to_string_lossy().into_owned())
}

/// A `google.protobuf.Duration` in proto3-JSON (`45s`, `0.250s`).
fn proto_duration(d: Duration) -> String {
    let nanos = d.subsec_nanos();
    if nanos == 0 {
        return format!("{}s", d.as_secs());
    }
    let frac = format!("{nanos:09}");
    format!("{}.{}s", d.as_secs(), frac.trim_end_matches('0'))
}

fn application_log_config(log_as_json: bool) -> Json {
    let log_format = if log_as_json {
        json!({ "json_format": {
            "level": "%l",
            "time": "%Y-%m-%dT%T.%fZ",
            "scope": "envoy %n",
            "msg": "%j",
            "caller": "%g:%#",
            "thread": "%t",
        }})
    } else {
        json!({ "text_format": TEXT_LOG_FORMAT })
    };
    json!({ "log_format": log_format })
}

/// The runtime layers: pilot-agent's fixed flags plus `ProxyConfig.runtimeValues`.
fn layered_runtime(cfg: &AgentConfig) -> Json {
    let mut flags = Map::new();
    flags.insert(
        "envoy.deprecated_features:envoy.config.listener.v3.Listener.hidden_envoy_deprecated_use_original_dst".into(),
        json!(true),
    );
    flags.insert(
        "envoy.reloadable_features.coalesce_lb_rebuilds_on_batch_update".into(),
        json!(false),
    );
    flags.insert(
        "envoy.reloadable_features.fixed_heap_use_allocated".into(),
        json!(true),
    );
    flags.insert(
        "envoy.reloadable_features.http_reject_path_with_fragment".into(),
        json!(false),
    );
    flags.insert("re2.max_program_size.error_level".into(), json!("32768"));
    if let Some(Json::Object(values)) = cfg.proxy_config.raw.get("runtimeValues") {
        for (k, v) in values {
            let value = match v.as_str() {
                Some("") | None => continue,
                Some("true") => json!(true),
                Some("false") => json!(false),
                Some(other) => json!(other),
            };
            flags.insert(k.clone(), value);
        }
    }
    json!({ "layers": [
        { "name": "global config", "static_layer": Json::Object(flags) },
        { "name": "admin", "admin_layer": {} },
    ]})
}

fn bootstrap_extensions(metadata_discovery: bool) -> Json {
    let mut exts = Vec::new();
    if metadata_discovery {
        exts.push(json!({
            "name": "metadata_discovery",
            "typed_config": {
                "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                "type_url": "type.googleapis.com/istio.workload.BootstrapExtension",
                "value": { "config_source": { "ads": {} } },
            },
        }));
    }
    exts.push(json!({
        "name": "envoy.bootstrap.internal_listener",
        "typed_config": {
            "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
            "type_url": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
            "value": { "buffer_size_kb": 64 },
        },
    }));
    Json::Array(exts)
}

/// A comma-separated list from a pod annotation, else from `ProxyConfig.proxyStatsMatcher.<key>`.
fn stats_option(
    cfg: &AgentConfig,
    annotations: &BTreeMap<String, String>,
    anno: &str,
    pc_key: &str,
) -> Vec<String> {
    if let Some(v) = annotations.get(anno) {
        return v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
    }
    string_list(
        cfg.proxy_config
            .raw
            .get("proxyStatsMatcher")
            .and_then(|m| m.get(pc_key)),
    )
}

fn string_list(v: Option<&Json>) -> Vec<String> {
    match v {
        Some(Json::Array(items)) => items
            .iter()
            .filter_map(Json::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

fn stats_config(
    cfg: &AgentConfig,
    annotations: &BTreeMap<String, String>,
    metadata_discovery: bool,
) -> Json {
    let tag = |name: &str, regex: &str| json!({ "tag_name": name, "regex": regex });
    let mut tags: Vec<Json> = STATS_TAGS_HEAD.iter().map(|(n, r)| tag(n, r)).collect();
    let extra_tags = match annotations.get(annotation::EXTRA_STAT_TAGS) {
        Some(v) => v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        None => string_list(cfg.proxy_config.raw.get("extraStatTags")),
    };
    for t in &extra_tags {
        tags.push(tag(t, &format!(r"({t}=\.=(.*?);\.;)")));
    }
    tags.extend(STATS_TAGS_TAIL.iter().map(|(n, r)| tag(n, r)));

    let mut patterns = vec![json!({ "prefix": "reporter=" })];
    if metadata_discovery {
        patterns.push(json!({ "prefix": "workload_discovery" }));
    }
    let owned = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let mut prefixes = owned(REQUIRED_PREFIXES);
    prefixes.extend(stats_option(
        cfg,
        annotations,
        annotation::INCLUSION_PREFIXES,
        "inclusionPrefixes",
    ));
    let mut suffixes = owned(REQUIRED_SUFFIXES);
    if cfg.exit_on_zero_active_connections {
        // The supervisor's drain watches `downstream_cx_active`.
        suffixes.push("downstream_cx_active".to_owned());
    }
    suffixes.extend(stats_option(
        cfg,
        annotations,
        annotation::INCLUSION_SUFFIXES,
        "inclusionSuffixes",
    ));
    let mut regexps = owned(REQUIRED_REGEXPS);
    regexps.extend(stats_option(
        cfg,
        annotations,
        annotation::INCLUSION_REGEXPS,
        "inclusionRegexps",
    ));
    patterns.extend(prefixes.iter().map(|p| json!({ "prefix": p })));
    patterns.extend(suffixes.iter().map(|s| json!({ "suffix": s })));
    patterns.extend(
        regexps
            .iter()
            .map(|r| json!({ "safe_regex": { "regex": r } })),
    );
    patterns.push(json!({ "prefix": "component" }));
    patterns.push(json!({ "prefix": "istio" }));

    let mut out = Map::new();
    out.insert("use_all_default_tags".into(), json!(false));
    out.insert("stats_tags".into(), Json::Array(tags));
    if let Some(buckets) = annotations.get(annotation::HISTOGRAM_BUCKETS) {
        match serde_json::from_str::<BTreeMap<String, Vec<f64>>>(buckets) {
            Ok(map) => {
                let settings: Vec<Json> = map
                    .iter()
                    .map(|(prefix, b)| json!({ "match": { "prefix": prefix }, "buckets": b }))
                    .collect();
                out.insert("histogram_bucket_settings".into(), Json::Array(settings));
            }
            Err(e) => {
                tracing::warn!(annotation = annotation::HISTOGRAM_BUCKETS, error = %e, "ignoring malformed annotation")
            }
        }
    }
    out.insert(
        "stats_matcher".into(),
        json!({ "inclusion_list": { "patterns": patterns } }),
    );
    Json::Object(out)
}

fn dynamic_resources() -> Json {
    let ads_source =
        json!({ "ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3" });
    json!({
        "lds_config": ads_source.clone(),
        "cds_config": ads_source,
        "ads_config": {
            // pilot-agent forces DELTA_GRPC for `waypoint~` nodes; for others it follows
            // ISTIO_DELTA_XDS, whose default is also delta.
            "api_type": "DELTA_GRPC",
            "set_node_on_first_message_only": true,
            "transport_api_version": "V3",
            "grpc_services": [{ "envoy_grpc": { "cluster_name": "xds-grpc" } }],
        },
    })
}

fn http2_protocol_options() -> Json {
    json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": { "http2_protocol_options": {} },
        },
    })
}

/// A STATIC, round-robin cluster with one endpoint at `address` (an Envoy `Address`).
fn static_cluster(name: &str, connect_timeout: &str, address: Json) -> Map<String, Json> {
    let cluster = json!({
        "name": name,
        "alt_stat_name": format!("{name};"),
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": address } }] }],
        },
    });
    match cluster {
        Json::Object(m) => m,
        _ => Map::new(),
    }
}

fn tcp_address(address: &str, port: u16) -> Json {
    json!({ "socket_address": { "protocol": "TCP", "address": address, "port_value": port } })
}

fn pipe_address(path: &Path) -> Json {
    json!({ "pipe": { "path": path.to_string_lossy() } })
}

fn static_clusters(cfg: &AgentConfig, localhost: &str) -> Json {
    let prometheus = static_cluster(
        "prometheus_stats",
        "0.250s",
        tcp_address(localhost, cfg.proxy_config.proxy_admin_port),
    );
    let agent = static_cluster(
        "agent",
        "0.250s",
        tcp_address(localhost, cfg.proxy_config.status_port),
    );
    let mut sds = static_cluster("sds-grpc", "1s", pipe_address(&cfg.sds_socket()));
    sds.insert(
        "typed_extension_protocol_options".into(),
        http2_protocol_options(),
    );
    let mut xds = static_cluster("xds-grpc", "1s", pipe_address(&cfg.xds_socket()));
    let threshold = |priority: &str| {
        json!({
            "priority": priority,
            "max_connections": 100000,
            "max_pending_requests": 100000,
            "max_requests": 100000,
        })
    };
    xds.insert(
        "circuit_breakers".into(),
        json!({ "thresholds": [threshold("DEFAULT"), threshold("HIGH")] }),
    );
    xds.insert(
        "upstream_connection_options".into(),
        json!({ "tcp_keepalive": { "keepalive_time": 300 } }),
    );
    // Deprecated in favour of HttpProtocolOptions.common_http_protocol_options, but it is what the
    // golden spells, and Envoy still honours it.
    xds.insert("max_requests_per_connection".into(), json!(1));
    xds.insert(
        "typed_extension_protocol_options".into(),
        http2_protocol_options(),
    );
    Json::Array(vec![
        prometheus.into(),
        agent.into(),
        sds.into(),
        xds.into(),
    ])
}

fn router_filter() -> Json {
    json!({
        "name": "envoy.filters.http.router",
        "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" },
    })
}

fn compressor_filter(library: &str, type_name: &str) -> Json {
    json!({
        "name": format!("envoy.filters.http.compressor.{library}"),
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor",
            "compressor_library": {
                "name": format!("stats_{library}"),
                "typed_config": {
                    "@type": format!("type.googleapis.com/envoy.extensions.compression.{library}.compressor.v3.{type_name}"),
                },
            },
            "response_direction_config": { "common_config": { "content_type": STATS_CONTENT_TYPES } },
        },
    })
}

/// A static listener with one HCM routing `prefix` to `cluster`.
fn hcm_listener(
    port: u16,
    bind: &str,
    stat_prefix: &str,
    prefix: &str,
    cluster: &str,
    http_filters: Vec<Json>,
) -> Json {
    json!({
        "name": format!("0.0.0.0_{port}"),
        "address": tcp_address(bind, port),
        "ignore_global_conn_limit": true,
        "bypass_overload_manager": true,
        "filter_chains": [{
            "filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "codec_type": "AUTO",
                    "stat_prefix": stat_prefix,
                    "route_config": {
                        "virtual_hosts": [{
                            "name": "backend",
                            "domains": ["*"],
                            "routes": [{ "match": { "prefix": prefix }, "route": { "cluster": cluster } }],
                        }],
                    },
                    "http_filters": http_filters,
                },
            }],
        }],
    })
}

fn static_listeners(cfg: &AgentConfig, wildcard: &str, localhost: &str) -> Json {
    let localhost_only = cfg
        .proxy_config
        .proxy_metadata
        .get("METRICS_LOCALHOST_ACCESS_ONLY")
        .map(String::as_str)
        == Some("true");
    let prometheus_bind = if localhost_only { localhost } else { wildcard };
    let prometheus_filters = vec![
        compressor_filter("brotli", "Brotli"),
        compressor_filter("zstd", "Zstd"),
        compressor_filter("gzip", "Gzip"),
        router_filter(),
    ];
    json!([
        hcm_listener(
            cfg.envoy_prometheus_port,
            prometheus_bind,
            "stats",
            "/stats/prometheus",
            "prometheus_stats",
            prometheus_filters,
        ),
        hcm_listener(
            cfg.envoy_status_port,
            wildcard,
            "agent",
            "/healthz/ready",
            "agent",
            vec![router_filter()]
        ),
    ])
}

fn overload_manager(cfg: &AgentConfig) -> Json {
    let max = cfg
        .meta
        .get("GLOBAL_DOWNSTREAM_MAX_CONNECTIONS")
        .and_then(|v| {
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
        })
        .unwrap_or(2_147_483_647);
    json!({
        "resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                "max_active_downstream_connections": max,
            },
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load;
    use waypoint_proto::json::{dynamic_from_json, dynamic_to_json, visit_anys};

    const BOOTSTRAP: &str = "envoy.config.bootstrap.v3.Bootstrap";

    /// Paths where our waypoint bootstrap legitimately differs from Istio's ambient golden. A
    /// trailing `.*` covers the whole subtree.
    const GOLDEN_ALLOWED: &[(&str, &str)] = &[
        (
            "node.id",
            "the golden is a `sidecar~1.2.3.4~foo~bar` test node; ours is `waypoint~<pod IP>~<pod>.<ns>~<domain>`",
        ),
        (
            "node.cluster",
            "the golden test sets serviceCluster `istio-proxy`; ours resolves `<workload>.<ns>` as pilot-agent does",
        ),
        (
            "node.metadata.*",
            "metadata comes from the pod's environment and labels; the golden's from Istio's test fixture",
        ),
        (
            "static_resources.clusters[2].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.pipe.path",
            "the golden test sets WORKLOAD_IDENTITY_SOCKET_FILE=test.sock; ours is the default `socket`",
        ),
        (
            "static_resources.clusters[3].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.pipe.path",
            "the golden test renders the XDS pipe under /tmp; ours is under the default configPath ./etc/istio/proxy",
        ),
        (
            "cluster_manager.outlier_detection",
            "the golden test passes --outlierLogPath=/dev/stdout; a waypoint Deployment passes none",
        ),
    ];

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn waypoint_env() -> BTreeMap<String, String> {
        env(&[
            ("POD_NAME", "waypoint-5f8c7d9d8-abcde"),
            ("POD_NAMESPACE", "default"),
            ("INSTANCE_IP", "10.244.1.9"),
            ("SERVICE_ACCOUNT", "waypoint"),
            ("ISTIO_META_CLUSTER_ID", "Kubernetes"),
            ("ISTIO_META_WORKLOAD_NAME", "waypoint"),
            ("ISTIO_META_INTERCEPTION_MODE", "REDIRECT"),
            ("ISTIO_META_MESH_ID", "cluster.local"),
            (
                "ISTIO_META_OWNER",
                "kubernetes://apis/apps/v1/namespaces/default/deployments/waypoint",
            ),
            (
                "ISTIO_METAJSON_LABELS",
                r#"{"gateway.networking.k8s.io/gateway-name":"waypoint","version":"from-env"}"#,
            ),
            ("TRUST_DOMAIN", "cluster.local"),
            ("CA_ADDR", "istiod.istio-system.svc:15012"),
            ("PROXY_CONFIG", "{}\n"),
        ])
    }

    fn waypoint_cfg(extra: &[(&str, &str)]) -> AgentConfig {
        let mut e = waypoint_env();
        for (k, v) in extra {
            e.insert((*k).to_owned(), (*v).to_owned());
        }
        let args: Vec<String> = [
            "proxy",
            "waypoint",
            "--domain",
            "default.svc.cluster.local",
            "--serviceCluster",
            "waypoint.default",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        load(&args, &e).expect("waypoint config loads")
    }

    fn pod_labels() -> BTreeMap<String, String> {
        env(&[
            ("gateway.istio.io/managed", "istio.io-mesh-controller"),
            ("pod-template-hash", "5f8c7d9d8"),
            ("version", "v1"),
        ])
    }

    fn normalise(v: &Json) -> Json {
        let msg = dynamic_from_json(BOOTSTRAP, v).expect("parses as Bootstrap");
        dynamic_to_json(&msg).expect("writes back")
    }

    fn push_key(path: &str, key: &str) -> String {
        let plain = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        match (path.is_empty(), plain) {
            (true, true) => key.to_owned(),
            (false, true) => format!("{path}.{key}"),
            (_, false) => format!("{path}[{key:?}]"),
        }
    }

    /// Every path where `ours` and `golden` differ, with a description.
    fn diff(
        path: &str,
        ours: Option<&Json>,
        golden: Option<&Json>,
        out: &mut Vec<(String, String)>,
    ) {
        match (ours, golden) {
            (Some(Json::Object(a)), Some(Json::Object(b))) => {
                let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for k in keys {
                    diff(&push_key(path, k), a.get(k), b.get(k), out);
                }
            }
            (Some(Json::Array(a)), Some(Json::Array(b))) => {
                for i in 0..a.len().max(b.len()) {
                    diff(&format!("{path}[{i}]"), a.get(i), b.get(i), out);
                }
            }
            (a, b) if a == b => {}
            (a, b) => {
                let show =
                    |v: Option<&Json>| v.map_or_else(|| "<absent>".to_owned(), |v| v.to_string());
                out.push((
                    path.to_owned(),
                    format!("ours {} / golden {}", show(a), show(b)),
                ));
            }
        }
    }

    fn allowed_by(entry: &str, path: &str) -> bool {
        match entry.strip_suffix(".*") {
            Some(prefix) => {
                path == prefix
                    || path
                        .strip_prefix(prefix)
                        .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
            }
            None => path == entry,
        }
    }

    #[test]
    fn renders_a_bootstrap_that_parses_without_unknown_fields() {
        let cfg = waypoint_cfg(&[("EXIT_ON_ZERO_ACTIVE_CONNECTIONS", "true")]);
        let annotations = env(&[
            (
                "sidecar.istio.io/statsHistogramBuckets",
                r#"{"istio":[1,5,10]}"#,
            ),
            ("sidecar.istio.io/statsFlushInterval", "10s"),
            ("sidecar.istio.io/extraStatTags", "foo"),
        ]);
        for (c, a) in [(&cfg, &BTreeMap::new()), (&cfg, &annotations)] {
            let json = render(c, &pod_labels(), a);
            let msg = dynamic_from_json(BOOTSTRAP, &json)
                .unwrap_or_else(|e| panic!("bootstrap does not parse: {e}"));
            let mut anys = Vec::new();
            visit_anys(&msg, &mut |path, _inner| anys.push(path.to_owned()))
                .unwrap_or_else(|e| panic!("an Any does not decode: {e}"));
            assert!(
                anys.len() >= 10,
                "expected the typed configs to be visited: {anys:#?}"
            );
        }
        let mut json_log = cfg.clone();
        json_log.log_as_json = true;
        let json = render(&json_log, &BTreeMap::new(), &BTreeMap::new());
        dynamic_from_json(BOOTSTRAP, &json).expect("json log format parses");
        assert_eq!(
            json["application_log_config"]["log_format"]["json_format"]["level"],
            "%l"
        );
    }

    #[test]
    fn matches_the_istio_ambient_golden_except_allowed_paths() {
        let golden_path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/istio/bootstrap_ambient_golden.json");
        let text = std::fs::read_to_string(&golden_path).expect("golden readable");
        let golden: Json = serde_json::from_str(&text).expect("golden is JSON");
        let golden = normalise(&golden);
        let ours = normalise(&render(&waypoint_cfg(&[]), &pod_labels(), &BTreeMap::new()));

        let mut diffs = Vec::new();
        diff("", Some(&ours), Some(&golden), &mut diffs);
        let unexpected: Vec<&(String, String)> = diffs
            .iter()
            .filter(|(p, _)| !GOLDEN_ALLOWED.iter().any(|(e, _)| allowed_by(e, p)))
            .collect();
        let stale: Vec<&str> = GOLDEN_ALLOWED
            .iter()
            .filter(|(e, _)| !diffs.iter().any(|(p, _)| allowed_by(e, p)))
            .map(|(e, _)| *e)
            .collect();
        if !unexpected.is_empty() || !stale.is_empty() {
            for (p, d) in &diffs {
                eprintln!("diff {p}: {d}");
            }
        }
        assert!(
            unexpected.is_empty(),
            "differences from the golden not in GOLDEN_ALLOWED: {unexpected:#?}"
        );
        assert!(
            stale.is_empty(),
            "GOLDEN_ALLOWED entries that no longer differ (remove them): {stale:?}"
        );
    }

    #[test]
    fn waypoint_node_identity_and_metadata() {
        let cfg = waypoint_cfg(&[(
            "PROXY_CONFIG",
            r#"{"terminationDrainDuration":"7s","proxyMetadata":{"METRICS_LOCALHOST_ACCESS_ONLY":"true"}}"#,
        )]);
        let annotations = env(&[("kubernetes.io/config.source", "api")]);
        let json = render(&cfg, &pod_labels(), &annotations);
        let node = &json["node"];
        assert_eq!(
            node["id"],
            "waypoint~10.244.1.9~waypoint-5f8c7d9d8-abcde.default~default.svc.cluster.local"
        );
        assert_eq!(node["cluster"], "waypoint.default");
        let meta = &node["metadata"];
        assert_eq!(meta["NAME"], "waypoint-5f8c7d9d8-abcde");
        assert_eq!(meta["NAMESPACE"], "default");
        assert_eq!(meta["SERVICE_ACCOUNT"], "waypoint");
        assert_eq!(meta["INSTANCE_IPS"], "10.244.1.9");
        assert_eq!(meta["CLUSTER_ID"], "Kubernetes");
        assert_eq!(meta["ISTIO_VERSION"], crate::config::DEFAULT_ISTIO_VERSION);
        assert_eq!(meta["WORKLOAD_NAME"], "waypoint");
        assert_eq!(meta["MESH_ID"], "cluster.local");
        assert_eq!(meta["ENVOY_STATUS_PORT"], 15021);
        assert_eq!(meta["ENVOY_PROMETHEUS_PORT"], 15090);
        assert_eq!(meta["PILOT_SAN"], json!(["istiod.istio-system.svc"]));
        assert_eq!(meta["WORKLOAD_IDENTITY_SOCKET_FILE"], "socket");
        assert_eq!(meta["METADATA_DISCOVERY"], "true");
        assert_eq!(meta["ENABLE_HBONE"], "true");
        assert!(meta.get("EXIT_ON_ZERO_ACTIVE_CONNECTIONS").is_none());
        assert_eq!(
            meta["ANNOTATIONS"],
            json!({ "kubernetes.io/config.source": "api" })
        );
        // Labels: env JSON merged with the pod's, the pod winning, pod-template-hash dropped.
        assert_eq!(
            meta["LABELS"],
            json!({
                "gateway.networking.k8s.io/gateway-name": "waypoint",
                "gateway.istio.io/managed": "istio.io-mesh-controller",
                "version": "v1",
            })
        );
        let pc = &meta["PROXY_CONFIG"];
        assert_eq!(pc["drainDuration"], "45s");
        assert_eq!(pc["terminationDrainDuration"], "7s");
        assert_eq!(pc["discoveryAddress"], "istiod.istio-system.svc:15012");
        assert_eq!(pc["configPath"], "./etc/istio/proxy");
        assert_eq!(pc["proxyAdminPort"], 15000);
        assert_eq!(pc["statusPort"], 15020);
        assert_eq!(pc["serviceCluster"], "istio-proxy");
        assert_eq!(pc["proxyMetadata"]["METRICS_LOCALHOST_ACCESS_ONLY"], "true");
        assert!(pc["binaryPath"].is_string());
        // Keys are sorted.
        let keys: Vec<&String> = meta.as_object().expect("object").keys().collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);

        // METRICS_LOCALHOST_ACCESS_ONLY binds 15090 on localhost; 15021 stays on the wildcard.
        let listeners = &json["static_resources"]["listeners"];
        assert_eq!(listeners[0]["name"], "0.0.0.0_15090");
        assert_eq!(
            listeners[0]["address"]["socket_address"]["address"],
            "127.0.0.1"
        );
        assert_eq!(listeners[1]["name"], "0.0.0.0_15021");
        assert_eq!(
            listeners[1]["address"]["socket_address"]["address"],
            "0.0.0.0"
        );
        let default = render(&waypoint_cfg(&[]), &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(
            default["static_resources"]["listeners"][0]["address"]["socket_address"]["address"],
            "0.0.0.0"
        );

        assert_eq!(
            json["dynamic_resources"]["ads_config"]["api_type"],
            "DELTA_GRPC"
        );
        let clusters = &json["static_resources"]["clusters"];
        let pipe = |i: usize| {
            clusters[i]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                ["pipe"]["path"]
                .clone()
        };
        assert_eq!(clusters[2]["name"], "sds-grpc");
        assert_eq!(pipe(2), cfg.sds_socket().to_string_lossy().as_ref());
        assert_eq!(clusters[3]["name"], "xds-grpc");
        assert_eq!(pipe(3), cfg.xds_socket().to_string_lossy().as_ref());
        assert_eq!(
            json["bootstrap_extensions"][0]["name"],
            "metadata_discovery"
        );
    }

    #[test]
    fn exit_on_zero_active_connections_and_custom_ports() {
        let cfg = waypoint_cfg(&[
            ("EXIT_ON_ZERO_ACTIVE_CONNECTIONS", "true"),
            ("ENVOY_STATUS_PORT", "16021"),
            ("ENVOY_PROMETHEUS_PORT", "16090"),
            ("WORKLOAD_IDENTITY_SOCKET_FILE", "test.sock"),
            (
                "PROXY_CONFIG",
                r#"{"proxyAdminPort":16000,"statusPort":16020,"configPath":"/tmp/x"}"#,
            ),
        ]);
        let json = render(&cfg, &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(
            json["node"]["metadata"]["EXIT_ON_ZERO_ACTIVE_CONNECTIONS"],
            "true"
        );
        assert_eq!(json["node"]["metadata"]["ENVOY_STATUS_PORT"], 16021);
        let patterns = json["stats_config"]["stats_matcher"]["inclusion_list"]["patterns"]
            .as_array()
            .expect("patterns");
        assert!(patterns.contains(&json!({ "suffix": "downstream_cx_active" })));
        assert_eq!(
            json["admin"]["address"]["socket_address"]["port_value"],
            16000
        );
        let clusters = &json["static_resources"]["clusters"];
        let addr = |i: usize| {
            clusters[i]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                .clone()
        };
        assert_eq!(addr(0)["socket_address"]["port_value"], 16000);
        assert_eq!(addr(1)["socket_address"]["port_value"], 16020);
        assert_eq!(
            addr(2)["pipe"]["path"],
            "./var/run/secrets/workload-spiffe-uds/test.sock"
        );
        assert_eq!(addr(3)["pipe"]["path"], "/tmp/x/XDS");
        assert_eq!(
            json["static_resources"]["listeners"][0]["name"],
            "0.0.0.0_16090"
        );
        assert_eq!(
            json["static_resources"]["listeners"][1]["name"],
            "0.0.0.0_16021"
        );
        assert!(
            json["node"]["metadata"].get("LABELS").is_some(),
            "env labels kept without pod labels"
        );
    }

    #[test]
    fn reads_downward_api_files() {
        let text = concat!(
            "app=\"reviews\"\n",
            "quoted=\"say \\\"hi\\\"\\tnow\\n\"\n",
            "unicode=\"caf\\u00e9 \\U0001F600 \\xc3\\xa9 \\101\"\n",
            "\n",
            "raw=`back\\slash`\n",
            "kubernetes.io/config.seen=\"2024-01-01T00:00:00Z\"\n",
            "with=equals=\"a=b\"\n",
            "broken=\"unterminated\n",
            "noquotes=value\n",
        );
        let dir =
            std::env::temp_dir().join(format!("agent-bootstrap-podinfo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let file = dir.join("labels");
        std::fs::write(&file, text).expect("write");
        let map = read_pod_info(&file);
        assert_eq!(map["app"], "reviews");
        assert_eq!(map["quoted"], "say \"hi\"\tnow\n");
        assert_eq!(map["unicode"], "café 😀 é A");
        assert_eq!(map["raw"], "back\\slash");
        assert_eq!(map["kubernetes.io/config.seen"], "2024-01-01T00:00:00Z");
        assert!(
            !map.contains_key("with"),
            "a key with '=' is not valid: the value is not quoted"
        );
        assert!(!map.contains_key("broken"));
        assert!(!map.contains_key("noquotes"));
        assert_eq!(map.len(), 5);
        assert!(read_pod_info(dir.join("missing")).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn writes_atomically_and_creates_directories() {
        let dir =
            std::env::temp_dir().join(format!("agent-bootstrap-write-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config_path = dir.join("etc/istio/proxy");
        let pc = format!(
            r#"{{"configPath":{}}}"#,
            json!(config_path.to_string_lossy())
        );
        let cfg = waypoint_cfg(&[("PROXY_CONFIG", pc.as_str())]);
        let written = write(&cfg, &pod_labels(), &BTreeMap::new()).expect("writes");
        assert_eq!(written, config_path.join("envoy-rev.json"));
        let text = std::fs::read_to_string(&written).expect("readable");
        let back: Json = serde_json::from_str(&text).expect("JSON");
        assert_eq!(back, render(&cfg, &pod_labels(), &BTreeMap::new()));
        let leftovers: Vec<_> = std::fs::read_dir(&config_path)
            .expect("dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .filter(|n| n != "envoy-rev.json")
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
        // Rewriting replaces the file.
        write(&cfg, &BTreeMap::new(), &BTreeMap::new()).expect("rewrites");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn proto_durations() {
        assert_eq!(proto_duration(Duration::from_secs(45)), "45s");
        assert_eq!(proto_duration(Duration::from_millis(250)), "0.25s");
        assert_eq!(proto_duration(Duration::from_millis(1500)), "1.5s");
    }
}
