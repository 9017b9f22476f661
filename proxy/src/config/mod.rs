//! The config compiler: xDS resources are validated and translated once into our own immutable
//! types, then published as one [`Snapshot`] swapped atomically; a connection keeps the snapshot it
//! started with. A resource we cannot honour is rejected with an error naming the resource, the field
//! path and the reason, and the last good version of that resource stays.
//!
//! Every resource goes through two passes:
//! 1. [`allowlist`]: a walk over the decoded message (prost-reflect) that rejects every set field,
//!    extension type or enum value that [`supported`] does not list as implemented or harmless;
//! 2. the compile step of its kind ([`listener`], [`cluster`], [`endpoint`], [`route`],
//!    [`workload`]): semantic checks (missing clusters, bad regexes, IP ranges that do not parse …)
//!    and the translation, one proto field to one setting, into the types the data path reads.

pub mod access_log;
pub mod allowlist;
pub mod bootstrap;
pub mod cluster;
pub mod endpoint;
pub mod filters;
pub mod format;
pub mod headers;
pub mod listener;
pub mod matcher;
pub mod matchers;
pub mod protocol;
pub mod route;
pub mod source;
pub mod supported;
pub mod tls;
pub mod typed;
pub mod uri_template;
pub mod workload;

use std::{collections::BTreeMap, fmt, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use waypoint_proto::{
    envoy::config::{
        cluster::v3::Cluster as RawCluster, endpoint::v3::ClusterLoadAssignment,
        listener::v3::Listener as RawListener, route::v3::RouteConfiguration,
    },
    google::protobuf::{Any, Duration as PbDuration},
    istio::workload::Workload as RawWorkload,
    json,
    resource::ResourceKind,
};

pub use cluster::Cluster;
pub use endpoint::LoadAssignment;
pub use listener::Listener;
pub use route::RouteConfig;
pub use workload::Workload;

/// A resource update from xDS.
#[derive(Debug, Clone)]
pub struct Update {
    /// Resource name.
    pub name: String,
    /// Resource version.
    pub version: String,
    /// The encoded resource.
    pub resource: Any,
}

/// Why one resource was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceError {
    /// Resource name.
    pub name: String,
    /// `field.path: reason`, several problems joined by `; `.
    pub message: String,
}

/// One problem in a resource: the JSON path of the offending field (from the resource root, e.g.
/// `filter_chains[0].filters[1].typed_config.http_filters[2].typed_config`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// JSON path from the resource root; empty for the resource as a whole.
    pub path: String,
    /// What is wrong there.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

impl ConfigError {
    /// An error at `path`.
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// The same error with `prefix` put in front of its path (a resource inside a bootstrap).
    pub fn under(mut self, prefix: &str) -> Self {
        self.path = match (prefix.is_empty(), self.path.is_empty()) {
            (true, _) => self.path,
            (false, true) => prefix.to_owned(),
            (false, false) if self.path.starts_with('[') => format!("{prefix}{}", self.path),
            (false, false) => format!("{prefix}.{}", self.path),
        };
        self
    }
}

/// Result of a compile step.
pub type CompileResult<T> = Result<T, ConfigError>;

/// `base.name` (or `name` at the root).
pub(crate) fn field(base: &str, name: &str) -> String {
    if base.is_empty() {
        name.to_owned()
    } else {
        format!("{base}.{name}")
    }
}

/// `base.name[i]`.
pub(crate) fn index(base: &str, name: &str, i: usize) -> String {
    format!("{}[{i}]", field(base, name))
}

/// `base.name["key"]`.
pub(crate) fn key(base: &str, name: &str, k: &str) -> String {
    format!("{}[{k:?}]", field(base, name))
}

/// A protobuf duration as a std one; negative durations are errors.
pub(crate) fn duration(d: &PbDuration, path: &str) -> CompileResult<Duration> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(ConfigError::new(
            path,
            format!("invalid duration {}s {}ns", d.seconds, d.nanos),
        ));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// An optional protobuf duration.
pub(crate) fn opt_duration(d: Option<&PbDuration>, path: &str) -> CompileResult<Option<Duration>> {
    d.map(|d| duration(d, path)).transpose()
}

/// The text of an inline `DataSource` (`inline_string`, or UTF-8 `inline_bytes`).
pub(crate) fn inline_text(
    d: &waypoint_proto::envoy::config::core::v3::DataSource,
    path: &str,
) -> CompileResult<String> {
    use waypoint_proto::envoy::config::core::v3::data_source::Specifier;
    match &d.specifier {
        Some(Specifier::InlineString(s)) => Ok(s.clone()),
        Some(Specifier::InlineBytes(b)) => String::from_utf8(b.clone())
            .map_err(|_| ConfigError::new(field(path, "inline_bytes"), "not UTF-8")),
        Some(_) => Err(ConfigError::new(
            path,
            "only inline_string and inline_bytes are supported",
        )),
        None => Err(ConfigError::new(path, "a data source is required")),
    }
}

/// The compiled configuration the data path runs on.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Listeners by name.
    pub listeners: BTreeMap<String, Arc<Listener>>,
    /// Clusters by name.
    pub clusters: BTreeMap<String, Arc<Cluster>>,
    /// Endpoints by cluster (service) name.
    pub endpoints: BTreeMap<String, Arc<LoadAssignment>>,
    /// Route configurations by name (RDS; waypoints inline theirs).
    pub routes: BTreeMap<String, Arc<RouteConfig>>,
    /// Istio workloads by uid.
    pub workloads: BTreeMap<String, Arc<Workload>>,
    /// Istio workloads by address (Envoy's WDS lookup keys by raw address bytes, network aside).
    pub workloads_by_ip: std::collections::HashMap<std::net::IpAddr, Arc<Workload>>,
}

impl Snapshot {
    /// The workload at `ip`, if WDS knows one.
    pub fn workload_at(&self, ip: std::net::IpAddr) -> Option<&Arc<Workload>> {
        self.workloads_by_ip.get(&ip)
    }

    fn index_workloads(&mut self) {
        self.workloads_by_ip.clear();
        for w in self.workloads.values() {
            for a in &w.addresses {
                self.workloads_by_ip.insert(*a, w.clone());
            }
        }
    }
}

/// What the listener manager does around LDS updates: a socket listener whose address cannot be
/// bound is rejected (NACK) like any invalid field; after a snapshot is published the accept loops
/// follow it.
pub trait ListenerHooks: Send + Sync {
    /// Whether `listener` can be served (its socket bound); the error names the reason.
    fn check(&self, listener: &Listener) -> Result<(), String>;
    /// A new snapshot was published; returns the listeners that cannot serve (`name on addr:
    /// reason`).
    fn published(&self, snapshot: &Arc<Snapshot>) -> Vec<String>;
    /// A snapshot with new clusters or endpoints was published (the data plane applies it to
    /// the clusters in use at once, as Envoy applies CDS/EDS updates when they arrive).
    fn upstreams_published(&self, _snapshot: &Arc<Snapshot>) {}
}

/// Holds the current snapshot.
#[derive(Default)]
pub struct ConfigStore {
    current: ArcSwap<Snapshot>,
    hooks: std::sync::OnceLock<Arc<dyn ListenerHooks>>,
}

impl fmt::Debug for ConfigStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigStore")
            .field("current", &self.current)
            .field("hooks", &self.hooks.get().is_some())
            .finish()
    }
}

impl ConfigStore {
    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Publishes the bootstrap's static listeners and clusters (before any xDS). A static listener
    /// that cannot be bound is an error, as in Envoy (the process does not start).
    pub fn seed_static(&self, listeners: Vec<Listener>, clusters: Vec<Cluster>) -> Vec<String> {
        let mut next = (*self.current.load_full()).clone();
        let hooks = self.hooks.get().map(|h| h.as_ref());
        let mut problems = Vec::new();
        for l in listeners {
            if let Some(h) = hooks
                && let Err(reason) = h.check(&l)
            {
                problems.push(format!("static listener '{}': {reason}", l.name));
                continue;
            }
            next.listeners.insert(l.name.clone(), Arc::new(l));
        }
        for c in clusters {
            next.clusters.insert(c.name.clone(), Arc::new(c));
        }
        let next = Arc::new(next);
        self.current.store(next.clone());
        if let Some(h) = hooks {
            // Static clusters that resolve DNS start resolving now, as the dynamic ones do.
            h.upstreams_published(&next);
            // Like Envoy, a static listener that cannot listen is fatal at start.
            problems.extend(
                h.published(&next)
                    .into_iter()
                    .map(|p| format!("static listener {p}")),
            );
        }
        problems
    }

    /// Installs the listener manager's hooks (once).
    pub fn set_listener_hooks(&self, hooks: Arc<dyn ListenerHooks>) {
        if self.hooks.set(hooks).is_err() {
            tracing::warn!("listener hooks installed twice; keeping the first");
        }
    }

    /// Validates and applies updates of one kind; returns the rejected resources. Each resource is
    /// judged alone: a rejected one keeps its last good version, the others apply. Accepted updates
    /// and removals are published in one new snapshot.
    pub fn apply(
        &self,
        kind: ResourceKind,
        updates: &[Update],
        removed: &[String],
    ) -> Vec<ResourceError> {
        let mut next = (*self.current.load_full()).clone();
        let mut errors = Vec::new();
        let hooks = self.hooks.get().map(|h| h.as_ref());
        for u in updates {
            if let Err(problems) = compile(kind, u, &mut next, hooks) {
                errors.push(ResourceError {
                    name: u.name.clone(),
                    message: join_problems(&problems),
                });
            }
        }
        for name in removed {
            let existed = match kind {
                ResourceKind::Listener => next.listeners.remove(name).is_some(),
                ResourceKind::Cluster => next.clusters.remove(name).is_some(),
                ResourceKind::Endpoint => next.endpoints.remove(name).is_some(),
                ResourceKind::Route => next.routes.remove(name).is_some(),
                ResourceKind::Workload => next.workloads.remove(name).is_some(),
                ResourceKind::Secret => false,
            };
            if !existed {
                tracing::debug!(kind = kind.short_name(), %name, "removal of a resource we did not have");
            }
        }
        if kind == ResourceKind::Workload {
            next.index_workloads();
        }
        let next = Arc::new(next);
        self.current.store(next.clone());
        match (kind, hooks) {
            (ResourceKind::Listener, Some(h)) => {
                // Logged and counted (`listener_manager.listener_create_failure`); retried at
                // the next update.
                let _ = h.published(&next);
            }
            (ResourceKind::Cluster | ResourceKind::Endpoint, Some(h)) => {
                h.upstreams_published(&next);
            }
            _ => {}
        }
        errors
    }
}

/// At most this many problems are spelled out in one NACK; the rest are counted.
const MAX_PROBLEMS_PER_NACK: usize = 8;

fn join_problems(problems: &[ConfigError]) -> String {
    let mut text = problems
        .iter()
        .take(MAX_PROBLEMS_PER_NACK)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if problems.len() > MAX_PROBLEMS_PER_NACK {
        text.push_str(&format!(
            "; and {} more",
            problems.len() - MAX_PROBLEMS_PER_NACK
        ));
    }
    text
}

/// Both passes over one encoded resource of type `message` (full name): the allowlist walk (all
/// problems), then, if that is clean, `compile` on the decoded prost message (first problem).
pub(crate) fn check_and_compile<M, T>(
    message: &str,
    bytes: &[u8],
    compile: impl FnOnce(M) -> CompileResult<T>,
) -> Result<T, Vec<ConfigError>>
where
    M: prost::Message + Default,
{
    let dynamic = json::decode_dynamic(message, bytes)
        .map_err(|e| vec![ConfigError::new("", format!("does not decode: {e}"))])?;
    let problems = allowlist::check(&dynamic);
    if !problems.is_empty() {
        return Err(problems);
    }
    let typed = M::decode(bytes)
        .map_err(|e| vec![ConfigError::new("", format!("does not decode: {e}"))])?;
    compile(typed).map_err(|e| vec![e])
}

/// The resource's own name must be the name it was delivered under (when it has one).
fn check_name(delivered: &str, own: &str, field_name: &str) -> CompileResult<()> {
    if own.is_empty() || own == delivered {
        Ok(())
    } else {
        Err(ConfigError::new(
            field_name,
            format!("'{own}' differs from the xDS resource name '{delivered}'"),
        ))
    }
}

/// Checks one resource and places it in `next`.
fn compile(
    kind: ResourceKind,
    u: &Update,
    next: &mut Snapshot,
    hooks: Option<&dyn ListenerHooks>,
) -> Result<(), Vec<ConfigError>> {
    if u.resource.type_url != kind.type_url() {
        return Err(vec![ConfigError::new(
            "",
            format!(
                "type_url {} inside a {} response",
                u.resource.type_url,
                kind.type_url()
            ),
        )]);
    }
    let bytes = u.resource.value.as_slice();
    let name = u.name.as_str();
    match kind {
        ResourceKind::Listener => {
            let l = check_and_compile(kind.message_name(), bytes, |raw: RawListener| {
                check_name(name, &raw.name, "name")?;
                Listener::compile(raw, "")
            })?;
            if let Some(h) = hooks {
                h.check(&l)
                    .map_err(|reason| vec![ConfigError::new("address", reason)])?;
            }
            next.listeners.insert(u.name.clone(), Arc::new(l));
        }
        ResourceKind::Cluster => {
            let c = check_and_compile(kind.message_name(), bytes, |raw: RawCluster| {
                check_name(name, &raw.name, "name")?;
                Cluster::compile(raw, "")
            })?;
            next.clusters.insert(u.name.clone(), Arc::new(c));
        }
        ResourceKind::Endpoint => {
            let e = check_and_compile(kind.message_name(), bytes, |raw: ClusterLoadAssignment| {
                check_name(name, &raw.cluster_name, "cluster_name")?;
                LoadAssignment::compile(&raw, "")
            })?;
            next.endpoints.insert(u.name.clone(), Arc::new(e));
        }
        ResourceKind::Route => {
            let r = check_and_compile(kind.message_name(), bytes, |raw: RouteConfiguration| {
                check_name(name, &raw.name, "name")?;
                RouteConfig::compile(&raw, "")
            })?;
            next.routes.insert(u.name.clone(), Arc::new(r));
        }
        ResourceKind::Workload => {
            let w = check_and_compile(kind.message_name(), bytes, |raw: RawWorkload| {
                check_name(name, &raw.uid, "uid")?;
                Workload::compile(&raw, "")
            })?;
            next.workloads.insert(u.name.clone(), Arc::new(w));
        }
        ResourceKind::Secret => {
            return Err(vec![ConfigError::new("", "secrets come from SDS, not ADS")]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
