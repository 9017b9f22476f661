//! `/stats` (text, JSON) and `/stats/prometheus`, with Envoy's tag extraction (the bootstrap's
//! `stats_config.stats_tags`, then Envoy's default extractors unless `use_all_default_tags: false`),
//! and the server gauges Envoy refreshes on every stats flush (`server.uptime`, `server.live`,
//! `server.memory_allocated`, `cluster_manager.active_clusters`, ...). Stats the bootstrap's
//! `stats_config.stats_matcher` rejects are absent from every format: the registry's snapshot
//! leaves them out (see [`crate::stats_matcher`]), so `usedonly`, `filter=` and `type=` narrow
//! what remains.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

use http::{Response, StatusCode};
use serde_json::Value as Json;
use waypoint_proto::{
    envoy::config::bootstrap::v3::Bootstrap, envoy::config::metrics::v3::tag_specifier,
    resource::ResourceKind,
};

use super::{Admin, Body, json, text};
use crate::{
    server::{Server, ServerState},
    stats::Kind,
};

/// One tag extractor: a regex whose first group is removed from the name and whose second group
/// (or first, if there is one group) is the tag value; or a fixed value added to every stat.
#[derive(Debug)]
struct Extractor {
    name: String,
    regex: Option<regex::Regex>,
    fixed_value: Option<String>,
}

/// The tag extractors in effect.
#[derive(Debug, Default)]
pub struct TagExtractors {
    extractors: Vec<Extractor>,
}

/// Envoy's default tag extractors that apply to the stats this proxy produces
/// (`source/common/config/well_known_names.cc`).
const DEFAULT_TAGS: &[(&str, &str)] = &[
    ("cluster_name", r"^cluster\.((.*?)\.)"),
    ("http_conn_manager_prefix", r"^http\.((.*?)\.)"),
    (
        "listener_address",
        r"^listener\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)",
    ),
    ("tcp_prefix", r"^tcp\.((.*?)\.)\w+?$"),
    ("response_code", r"_rq(_(\d{3}))$"),
    ("response_code_class", r"_rq(_(\dxx))$"),
    ("virtual_host", r"^vhost\.((.*?)\.)"),
];

impl TagExtractors {
    /// The extractors a bootstrap asks for.
    pub fn from_bootstrap(bootstrap: &Bootstrap) -> TagExtractors {
        let mut extractors = Vec::new();
        let config = bootstrap.stats_config.as_ref();
        for spec in config.map(|c| c.stats_tags.as_slice()).unwrap_or_default() {
            match &spec.tag_value {
                Some(tag_specifier::TagValue::Regex(re)) => match regex::Regex::new(re) {
                    Ok(regex) => extractors.push(Extractor {
                        name: spec.tag_name.clone(),
                        regex: Some(regex),
                        fixed_value: None,
                    }),
                    Err(err) => {
                        // e.g. look-ahead, which Envoy's std::regex has and Rust's regex lacks.
                        tracing::warn!(target: "admin", tag = %spec.tag_name, %err, "stats tag regex not supported; tag not extracted")
                    }
                },
                Some(tag_specifier::TagValue::FixedValue(v)) => extractors.push(Extractor {
                    name: spec.tag_name.clone(),
                    regex: None,
                    fixed_value: Some(v.clone()),
                }),
                // A name alone selects Envoy's default extractor of that name.
                None => match DEFAULT_TAGS.iter().find(|(n, _)| *n == spec.tag_name) {
                    Some((_, re)) => {
                        if let Ok(regex) = regex::Regex::new(re) {
                            extractors.push(Extractor {
                                name: spec.tag_name.clone(),
                                regex: Some(regex),
                                fixed_value: None,
                            });
                        }
                    }
                    None => {
                        tracing::warn!(target: "admin", tag = %spec.tag_name, "stats tag without a regex names no default extractor we produce; tag not extracted")
                    }
                },
            }
        }
        let use_defaults = config
            .and_then(|c| c.use_all_default_tags)
            .is_none_or(|b| b.value);
        if use_defaults {
            for (name, re) in DEFAULT_TAGS {
                if extractors.iter().any(|e| e.name == *name) {
                    continue;
                }
                if let Ok(regex) = regex::Regex::new(re) {
                    extractors.push(Extractor {
                        name: (*name).to_owned(),
                        regex: Some(regex),
                        fixed_value: None,
                    });
                }
            }
        }
        TagExtractors { extractors }
    }

    /// Splits a stat name into its tag-extracted name and tags, as Envoy's `TagProducerImpl`:
    /// every extractor runs on the original name; the removed spans are cut out at the end.
    /// `known_clusters` lets `cluster.<name>.<stat>` be tagged even when the cluster name contains
    /// dots and no configured extractor matched it.
    pub fn extract(
        &self,
        name: &str,
        known_clusters: &BTreeSet<String>,
    ) -> (String, Vec<(String, String)>) {
        let mut tags: Vec<(String, String)> = Vec::new();
        let mut removed: Vec<(usize, usize)> = Vec::new();
        for e in &self.extractors {
            if tags.iter().any(|(n, _)| *n == e.name) {
                continue;
            }
            if let Some(v) = &e.fixed_value {
                tags.push((e.name.clone(), v.clone()));
                continue;
            }
            let Some(re) = &e.regex else { continue };
            let Some(caps) = re.captures(name) else {
                continue;
            };
            let Some(remove) = caps.get(1) else { continue };
            let value = caps.get(2).unwrap_or(remove);
            tags.push((e.name.clone(), value.as_str().to_owned()));
            removed.push((remove.start(), remove.end()));
        }
        if !tags.iter().any(|(n, _)| n == "cluster_name")
            && let Some(rest) = name.strip_prefix("cluster.")
            && let Some(cluster) = known_clusters
                .iter()
                .filter(|c| {
                    rest.len() > c.len() + 1
                        && rest.starts_with(c.as_str())
                        && rest.as_bytes()[c.len()] == b'.'
                })
                .max_by_key(|c| c.len())
        {
            // Remove ".<cluster>" (the leading dot belongs to the span, as Envoy's regexes do).
            removed.push((7, 8 + cluster.len()));
            tags.push(("cluster_name".to_owned(), cluster.clone()));
        }
        if removed.is_empty() {
            return (name.to_owned(), tags);
        }
        let mut keep = vec![true; name.len()];
        for (start, end) in removed {
            for k in keep.iter_mut().take(end).skip(start) {
                *k = false;
            }
        }
        let bytes: Vec<u8> = name
            .bytes()
            .zip(keep)
            .filter_map(|(b, k)| k.then_some(b))
            .collect();
        (String::from_utf8_lossy(&bytes).into_owned(), tags)
    }
}

/// Resident set size from `/proc/self/status` (`VmRSS`): we report RSS as `memory_allocated`
/// because there is no allocator introspection (Envoy reports tcmalloc's numbers).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Worker threads (`--concurrency`, else the CPU count, as the runtime is built in main).
pub fn concurrency(server: &Server) -> usize {
    if server.options.concurrency > 0 {
        server.options.concurrency
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }
}

/// Refreshes the gauges Envoy sets on every stats flush. Called before each `/stats` answer and
/// periodically from main.
pub fn refresh(admin: &Admin) {
    let server = &admin.server;
    let stats = &server.stats;
    stats
        .gauge("server.uptime")
        .set(server.started.elapsed().as_secs());
    let live = server.state() == ServerState::Live;
    stats.gauge("server.live").set(u64::from(live));
    if let Some(rss) = resident_bytes() {
        stats.gauge("server.memory_allocated").set(rss);
        stats.gauge("server.memory_heap_size").set(rss);
        stats.gauge("server.memory_physical_size").set(rss);
    }
    stats
        .gauge("server.concurrency")
        .set(concurrency(server) as u64);
    stats.gauge("server.hot_restart_epoch").set(0);
    // The snapshot holds the bootstrap's static clusters and listeners as well as the dynamic ones.
    let snapshot = server.config.snapshot();
    stats
        .gauge("cluster_manager.active_clusters")
        .set(snapshot.clusters.len() as u64);
    stats.gauge("cluster_manager.warming_clusters").set(0);
    // Warming listeners that replace nothing are not active yet (the gauge of warming ones is
    // kept by `server.warming`).
    let warming_new = server
        .warming
        .all()
        .values()
        .filter(|w| !w.replaces_active)
        .count() as u64;
    let listeners = (snapshot.listeners.len() as u64).saturating_sub(warming_new);
    if server.state() == ServerState::Draining {
        stats
            .gauge("listener_manager.total_listeners_active")
            .set(0);
        stats
            .gauge("listener_manager.total_listeners_draining")
            .set(listeners);
    } else {
        stats
            .gauge("listener_manager.total_listeners_active")
            .set(listeners);
        stats
            .gauge("listener_manager.total_listeners_draining")
            .set(0);
    }
    for (name, total, healthy, degraded) in super::clusters::membership(admin) {
        stats
            .gauge(&format!("cluster.{name}.membership_total"))
            .set(total);
        stats
            .gauge(&format!("cluster.{name}.membership_healthy"))
            .set(healthy);
        stats
            .gauge(&format!("cluster.{name}.membership_degraded"))
            .set(degraded);
    }
    if let Some(days) = super::certs::days_until_first_expiring(&admin.secrets) {
        stats
            .gauge("server.days_until_first_cert_expiring")
            .set(days);
    }
}

/// Which stat types `/stats?type=` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TypeFilter {
    All,
    Counters,
    Gauges,
    None,
}

/// A `/stats` query that cannot be answered (400).
#[derive(Debug, thiserror::Error)]
pub enum StatsQueryError {
    /// `filter=` is not a valid regex.
    #[error("Invalid re2 regex: {0}")]
    BadFilter(String),
    /// `type=` is not a stat type.
    #[error("invalid type={0}: want All, Counters, Gauges, Histograms or TextReadouts")]
    BadType(String),
}

impl StatsQueryError {
    fn response(&self) -> Response<Body> {
        text(StatusCode::BAD_REQUEST, format!("{self}\n"))
    }
}

/// Selected stats: (name, kind, value), sorted by name.
fn select(
    admin: &Admin,
    params: &[(String, String)],
) -> Result<Vec<(String, Kind, u64)>, StatsQueryError> {
    let get = |k: &str| params.iter().find(|(p, _)| p == k).map(|(_, v)| v.as_str());
    let used_only = params.iter().any(|(p, _)| p == "usedonly");
    let filter = match get("filter")
        .filter(|f| !f.is_empty())
        .map(regex::Regex::new)
    {
        None => None,
        Some(Ok(re)) => Some(re),
        Some(Err(e)) => return Err(StatsQueryError::BadFilter(e.to_string())),
    };
    let types = match get("type") {
        None | Some("All") => TypeFilter::All,
        Some("Counters") => TypeFilter::Counters,
        Some("Gauges") => TypeFilter::Gauges,
        Some("Histograms") | Some("TextReadouts") => TypeFilter::None,
        Some(other) => return Err(StatsQueryError::BadType(other.to_owned())),
    };
    refresh(admin);
    Ok(admin
        .server
        .stats
        .snapshot()
        .into_iter()
        .filter(|(_, _, _, used)| !used_only || *used)
        .filter(|(name, _, _, _)| filter.as_ref().is_none_or(|re| re.is_match(name)))
        .filter(|(_, kind, _, _)| match types {
            TypeFilter::All => true,
            TypeFilter::Counters => *kind == Kind::Counter,
            TypeFilter::Gauges => *kind == Kind::Gauge,
            TypeFilter::None => false,
        })
        .map(|(name, kind, value, _)| (name, kind, value))
        .collect())
}

/// `/stats[?format=json|prometheus|text][&usedonly][&filter=re][&type=...]`.
pub fn handle_stats(admin: &Admin, params: &[(String, String)]) -> Response<Body> {
    let format = params
        .iter()
        .find(|(p, _)| p == "format")
        .map(|(_, v)| v.as_str())
        .unwrap_or("text");
    if format == "prometheus" {
        return prometheus_response(admin, params);
    }
    let stats = match select(admin, params) {
        Ok(s) => s,
        Err(e) => return e.response(),
    };
    match format {
        "text" => {
            let mut body = String::with_capacity(stats.len() * 48);
            for (name, _, value) in stats {
                body.push_str(&name);
                body.push_str(": ");
                body.push_str(&value.to_string());
                body.push('\n');
            }
            text(StatusCode::OK, body)
        }
        "json" => {
            let items: Vec<Json> = stats
                .into_iter()
                .map(|(name, _, value)| serde_json::json!({ "name": name, "value": value }))
                .collect();
            json(&serde_json::json!({ "stats": items }))
        }
        other => text(
            StatusCode::BAD_REQUEST,
            format!("usage: /stats?format=(json|prometheus|text); unknown format '{other}'\n"),
        ),
    }
}

/// The cluster names stats can carry: bootstrap and dynamic clusters (name and `alt_stat_name`)
/// and EDS service names.
fn known_clusters(admin: &Admin) -> BTreeSet<String> {
    let server = &admin.server;
    let mut out: BTreeSet<String> = server.config.snapshot().clusters.keys().cloned().collect();
    if let Some(statics) = &server.bootstrap.bootstrap.static_resources {
        for c in &statics.clusters {
            out.insert(c.name.clone());
            if !c.alt_stat_name.is_empty() {
                out.insert(c.alt_stat_name.clone());
            }
        }
    }
    out.extend(
        server
            .xds
            .record(ResourceKind::Endpoint)
            .resources
            .into_keys(),
    );
    out
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The Prometheus text exposition (format 0.0.4) of the selected stats: `envoy_` names after tag
/// extraction, one `# HELP` and `# TYPE` line per family, counters then gauges, families and series
/// sorted. Names are Envoy's, so counters keep Envoy's names without a `_total` suffix.
pub fn prometheus_text(
    admin: &Admin,
    params: &[(String, String)],
) -> Result<String, StatsQueryError> {
    let stats = select(admin, params)?;
    let clusters = known_clusters(admin);
    // (kind order, family) -> (Envoy's tag-extracted name, labels text -> value)
    let mut families: BTreeMap<(u8, String), (String, BTreeMap<String, u64>)> = BTreeMap::new();
    let mut kinds: BTreeMap<String, Kind> = BTreeMap::new();
    for (name, kind, value) in stats {
        let (base, tags) = admin.tags.extract(&name, &clusters);
        let family = format!("envoy_{}", sanitize(&base));
        match kinds.get(&family) {
            Some(k) if *k != kind => {
                tracing::debug!(target: "admin", %name, %family, "stat is a {kind:?} but its family is a {k:?}; left out of the Prometheus output");
                continue;
            }
            _ => {
                kinds.insert(family.clone(), kind);
            }
        }
        let mut sorted = tags;
        sorted.sort();
        // `k="v",...` built in one string (the key of the family's series map).
        let mut labels = String::new();
        for (i, (k, v)) in sorted.iter().enumerate() {
            if i > 0 {
                labels.push(',');
            }
            labels.push_str(&sanitize(k));
            labels.push_str("=\"");
            labels.push_str(&escape_label(v));
            labels.push('"');
        }
        let order = match kind {
            Kind::Counter => 0,
            Kind::Gauge => 1,
        };
        families
            .entry((order, family))
            .or_insert_with(|| (base, BTreeMap::new()))
            .1
            .entry(labels)
            .or_insert(value);
    }
    // The text is written into one buffer sized up front (values are at most 20 digits).
    let size: usize = families
        .iter()
        .map(|((_, family), (base, series))| {
            let lines: usize = series
                .keys()
                .map(|labels| family.len() + labels.len() + 25)
                .sum();
            2 * family.len() + base.len() + 24 + lines
        })
        .sum();
    let mut body = String::with_capacity(size);
    for ((order, family), (base, series)) in families {
        let t = if order == 0 { "counter" } else { "gauge" };
        // Envoy writes no HELP; ours names the Envoy stat, which keeps `promtool` quiet about it.
        let _ = write!(body, "# HELP {family} {base}\n# TYPE {family} {t}\n");
        for (labels, value) in series {
            body.push_str(&family);
            body.push('{');
            body.push_str(&labels);
            body.push_str("} ");
            let _ = write!(body, "{value}");
            body.push('\n');
        }
    }
    // Istio's standard metrics (Envoy's `istiocustom` namespace, which Prometheus output shows
    // without a prefix); a `filter` narrows Envoy's stats only.
    if !params.iter().any(|(k, _)| k == "filter") {
        admin.server.stats.istio.render_prometheus(&mut body);
    }
    Ok(body)
}

/// `/stats/prometheus[?usedonly][&filter=re]`.
pub fn prometheus_response(admin: &Admin, params: &[(String, String)]) -> Response<Body> {
    match prometheus_text(admin, params) {
        Ok(body) => Response::builder()
            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
            .header("cache-control", "no-cache, max-age=0")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap_or_default(),
        Err(e) => e.response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn istio_extractors() -> TagExtractors {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/istio/bootstrap_ambient_golden.json"
        ))
        .expect("fixture");
        let doc: Json = serde_json::from_str(&text).expect("json");
        let b: Bootstrap = waypoint_proto::json::from_json(&doc).expect("bootstrap");
        TagExtractors::from_bootstrap(&b)
    }

    #[test]
    fn istio_cluster_tags() {
        let tags = istio_extractors();
        let none = BTreeSet::new();
        assert_eq!(
            tags.extract("cluster.xds-grpc;.upstream_cx_total", &none),
            (
                "cluster.upstream_cx_total".to_owned(),
                vec![("cluster_name".to_owned(), "xds-grpc".to_owned())]
            )
        );
        // Without the `;` terminator Istio's regex does not match; known names still tag it.
        let known: BTreeSet<String> =
            ["inbound-vip|8000|http|httpbin.default.svc.cluster.local".to_owned()].into();
        assert_eq!(
            tags.extract(
                "cluster.inbound-vip|8000|http|httpbin.default.svc.cluster.local.update_success",
                &known
            ),
            (
                "cluster.update_success".to_owned(),
                vec![(
                    "cluster_name".to_owned(),
                    "inbound-vip|8000|http|httpbin.default.svc.cluster.local".to_owned()
                )]
            )
        );
        assert_eq!(
            tags.extract("cluster_manager.cds.update_success", &known),
            ("cluster_manager.cds.update_success".to_owned(), vec![])
        );
    }

    #[test]
    fn envoy_default_tags() {
        let tags = TagExtractors::from_bootstrap(&Bootstrap::default());
        let none = BTreeSet::new();
        assert_eq!(
            tags.extract("cluster.foo.upstream_rq_503", &none),
            (
                "cluster.upstream_rq".to_owned(),
                vec![
                    ("cluster_name".to_owned(), "foo".to_owned()),
                    ("response_code".to_owned(), "503".to_owned())
                ]
            )
        );
        assert_eq!(sanitize("cluster.a-b|c"), "cluster_a_b_c");
        // A specifier with a name only selects Envoy's default extractor of that name.
        let named: Bootstrap = waypoint_proto::json::from_json(&serde_json::json!({
            "stats_config": {
                "use_all_default_tags": false,
                "stats_tags": [{"tag_name": "cluster_name"}]
            }
        }))
        .expect("bootstrap");
        assert_eq!(
            TagExtractors::from_bootstrap(&named).extract("cluster.foo.upstream_rq_503", &none),
            (
                "cluster.upstream_rq_503".to_owned(),
                vec![("cluster_name".to_owned(), "foo".to_owned())]
            )
        );
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
