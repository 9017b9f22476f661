//! The resources istiod-lite serves: read from YAML/JSON files (re-read when they change), plus
//! resources pushed or removed programmatically by tests. Every change publishes a new immutable
//! [`Snapshot`] on a watch channel; ADS streams diff snapshots to decide what to push.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use prost::Message as _;
use serde_json::Value as Json;
use tokio::sync::{Mutex, watch};
use waypoint_proto::{google::protobuf::Any, json, resource::ResourceKind};

/// One xDS resource, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// Its kind.
    pub kind: ResourceKind,
    /// Its name (`name`, `cluster_name` for endpoints, `uid` for workloads).
    pub name: String,
    /// Content hash: changes exactly when the content changes.
    pub version: String,
    /// The encoded resource.
    pub any: Any,
}

impl Resource {
    /// Builds a resource of `kind` from its proto3-JSON document.
    pub fn from_json(kind: ResourceKind, doc: &Json) -> Result<Resource, String> {
        let name = kind
            .name_in_json(doc)
            .ok_or_else(|| format!("missing '{}'", kind.name_field()))?
            .to_owned();
        let msg = json::dynamic_from_json(kind.message_name(), doc).map_err(|e| e.to_string())?;
        // serde_json maps are sorted, so the text (and the hash) is canonical for the content.
        let version = format!("{:016x}", fnv1a(doc.to_string().as_bytes()));
        Ok(Resource {
            kind,
            name,
            version,
            any: Any {
                type_url: kind.type_url().to_owned(),
                value: msg.encode_to_vec(),
            },
        })
    }
}

/// 64-bit FNV-1a: a stable, dependency-free content hash for resource versions.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// An immutable view of everything served.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Resources by kind and name.
    pub resources: BTreeMap<ResourceKind, BTreeMap<String, Arc<Resource>>>,
    /// Increases with every published change.
    pub generation: u64,
}

impl Snapshot {
    /// The resources of one kind.
    pub fn of(&self, kind: ResourceKind) -> impl Iterator<Item = &Arc<Resource>> {
        self.resources
            .get(&kind)
            .into_iter()
            .flat_map(|m| m.values())
    }

    /// One resource.
    pub fn get(&self, kind: ResourceKind, name: &str) -> Option<&Arc<Resource>> {
        self.resources.get(&kind).and_then(|m| m.get(name))
    }

    /// A version for the whole set of one kind (used as SotW `version_info`).
    pub fn kind_version(&self, kind: ResourceKind) -> String {
        let mut text = String::new();
        for r in self.of(kind) {
            text.push_str(&r.name);
            text.push('=');
            text.push_str(&r.version);
            text.push(';');
        }
        format!("{:016x}", fnv1a(text.as_bytes()))
    }
}

/// A problem loading resource files.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct LoadError(pub String);

type Key = (ResourceKind, String);

#[derive(Default)]
struct Layers {
    files: BTreeMap<Key, (Arc<Resource>, PathBuf)>,
    overrides: BTreeMap<Key, Option<Arc<Resource>>>,
    load_error: Option<String>,
    generation: u64,
}

/// The resource store.
pub struct Store {
    tx: watch::Sender<Arc<Snapshot>>,
    layers: Mutex<Layers>,
}

impl Default for Store {
    fn default() -> Self {
        Store::new()
    }
}

impl Store {
    /// An empty store.
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Arc::new(Snapshot::default()));
        Store {
            tx,
            layers: Mutex::new(Layers::default()),
        }
    }

    /// Follows every published snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// The error of the last file load, if it failed (the previous resources stay served).
    pub async fn load_error(&self) -> Option<String> {
        self.layers.lock().await.load_error.clone()
    }

    /// Replaces the file layer with what `path` (a file or a folder of `*.yaml|*.yml|*.json`) holds.
    /// On error nothing changes and the error is remembered for `/debug/xds`.
    pub async fn load_files(&self, path: &Path) -> Result<(), LoadError> {
        let loaded = load_path(path);
        let mut layers = self.layers.lock().await;
        match loaded {
            Ok(files) => {
                layers.files = files;
                layers.load_error = None;
                self.publish(&mut layers);
                Ok(())
            }
            Err(err) => {
                layers.load_error = Some(err.0.clone());
                Err(err)
            }
        }
    }

    /// Adds or replaces a resource (overrides the files until [`Store::clear_override`]).
    pub async fn push(&self, resource: Resource) {
        let mut layers = self.layers.lock().await;
        layers.overrides.insert(
            (resource.kind, resource.name.clone()),
            Some(Arc::new(resource)),
        );
        self.publish(&mut layers);
    }

    /// Removes a resource (even one that comes from a file) until [`Store::clear_override`].
    pub async fn remove(&self, kind: ResourceKind, name: &str) {
        let mut layers = self.layers.lock().await;
        layers.overrides.insert((kind, name.to_owned()), None);
        self.publish(&mut layers);
    }

    /// Drops a programmatic push/removal so the file version (if any) applies again.
    pub async fn clear_override(&self, kind: ResourceKind, name: &str) {
        let mut layers = self.layers.lock().await;
        if layers.overrides.remove(&(kind, name.to_owned())).is_some() {
            self.publish(&mut layers);
        }
    }

    fn publish(&self, layers: &mut Layers) {
        let mut merged: BTreeMap<Key, Arc<Resource>> = layers
            .files
            .iter()
            .map(|(k, (r, _))| (k.clone(), r.clone()))
            .collect();
        for (key, value) in &layers.overrides {
            match value {
                Some(r) => merged.insert(key.clone(), r.clone()),
                None => merged.remove(key),
            };
        }
        let mut resources: BTreeMap<ResourceKind, BTreeMap<String, Arc<Resource>>> =
            BTreeMap::new();
        for ((kind, name), r) in merged {
            resources.entry(kind).or_default().insert(name, r);
        }
        let current = self.tx.borrow().clone();
        if current.resources == resources {
            return;
        }
        layers.generation += 1;
        let generation = layers.generation;
        self.tx.send_replace(Arc::new(Snapshot {
            resources,
            generation,
        }));
    }
}

/// The resource files under `path`, sorted.
fn resource_files(path: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let meta =
        std::fs::metadata(path).map_err(|e| LoadError(format!("{}: {e}", path.display())))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    let entries =
        std::fs::read_dir(path).map_err(|e| LoadError(format!("{}: {e}", path.display())))?;
    for entry in entries {
        let p = entry
            .map_err(|e| LoadError(format!("{}: {e}", path.display())))?
            .path();
        if p.extension()
            .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads and validates every resource under `path`.
fn load_path(path: &Path) -> Result<BTreeMap<Key, (Arc<Resource>, PathBuf)>, LoadError> {
    let mut out: BTreeMap<Key, (Arc<Resource>, PathBuf)> = BTreeMap::new();
    for file in resource_files(path)? {
        let shown = file.display().to_string();
        let text =
            std::fs::read_to_string(&file).map_err(|e| LoadError(format!("{shown}: {e}")))?;
        let doc = json::yaml_to_json(&text).map_err(|e| match e {
            json::JsonError::Syntax {
                line: Some(line),
                reason,
            } => LoadError(format!("{shown}:{line}: {reason}")),
            other => LoadError(format!("{shown}: {other}")),
        })?;
        let map = match doc {
            Json::Null => continue,
            Json::Object(map) => map,
            _ => {
                return Err(LoadError(format!(
                    "{shown}: top level must be a map of resource lists"
                )));
            }
        };
        for (key, list) in map {
            let kind = ResourceKind::from_file_key(&key).ok_or_else(|| {
                LoadError(format!(
                    "{shown}: unknown top-level key '{key}' (want listeners, clusters, endpoints, routes, secrets or workloads)"
                ))
            })?;
            let items = match list {
                Json::Null => continue,
                Json::Array(items) => items,
                _ => return Err(LoadError(format!("{shown}: '{key}' must be a list"))),
            };
            for (i, item) in items.iter().enumerate() {
                let label = match kind.name_in_json(item) {
                    Some(name) => format!("{key}[{i}] '{name}'"),
                    None => format!("{key}[{i}]"),
                };
                let resource = Resource::from_json(kind, item)
                    .map_err(|e| LoadError(format!("{shown}: {label}: {e}")))?;
                let k = (kind, resource.name.clone());
                if let Some((_, other)) = out.get(&k) {
                    return Err(LoadError(format!(
                        "{shown}: {label}: duplicate {} name, also defined in {}",
                        kind.short_name(),
                        other.display()
                    )));
                }
                out.insert(k, (Arc::new(resource), file.clone()));
            }
        }
    }
    Ok(out)
}

/// What identifies the current content of the resource files, cheaply.
fn fingerprint(path: &Path) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    resource_files(path)
        .unwrap_or_default()
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let mtime = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.map(|m| m.len()).unwrap_or(0);
            (f, mtime, len)
        })
        .collect()
}

/// Re-reads `path` whenever its files change (checked every `interval`), until the store is dropped.
pub fn spawn_file_watcher(
    store: std::sync::Weak<Store>,
    path: PathBuf,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = fingerprint(&path);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let Some(store) = store.upgrade() else { return };
            let now = fingerprint(&path);
            if now == last {
                continue;
            }
            last = now;
            match store.load_files(&path).await {
                Ok(()) => tracing::info!(path = %path.display(), "resource files reloaded"),
                Err(err) => {
                    tracing::error!(%err, "resource files refused; previous resources kept")
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str, timeout: &str) -> Json {
        serde_json::json!({"name": name, "type": "STATIC", "connect_timeout": timeout})
    }

    #[tokio::test]
    async fn push_remove_and_versions() {
        let store = Store::new();
        let mut rx = store.subscribe();
        store
            .push(Resource::from_json(ResourceKind::Cluster, &cluster("a", "1s")).expect("valid"))
            .await;
        assert!(rx.has_changed().expect("open"));
        let snap = rx.borrow_and_update().clone();
        let v1 = snap
            .get(ResourceKind::Cluster, "a")
            .expect("present")
            .version
            .clone();
        // Same content: no new snapshot.
        store
            .push(Resource::from_json(ResourceKind::Cluster, &cluster("a", "1s")).expect("valid"))
            .await;
        assert!(!rx.has_changed().expect("open"));
        store
            .push(Resource::from_json(ResourceKind::Cluster, &cluster("a", "2s")).expect("valid"))
            .await;
        let v2 = rx
            .borrow_and_update()
            .get(ResourceKind::Cluster, "a")
            .expect("present")
            .version
            .clone();
        assert_ne!(v1, v2);
        store.remove(ResourceKind::Cluster, "a").await;
        assert!(
            rx.borrow_and_update()
                .get(ResourceKind::Cluster, "a")
                .is_none()
        );
    }

    #[tokio::test]
    async fn bad_files_are_refused_with_file_and_line() {
        let dir = std::env::temp_dir().join(format!("istiod-lite-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let good = dir.join("a.yaml");
        std::fs::write(
            &good,
            "clusters:\n- {name: a, type: STATIC, connect_timeout: 1s}\n",
        )
        .expect("write");
        let store = Store::new();
        store.load_files(&dir).await.expect("loads");
        assert_eq!(store.snapshot().of(ResourceKind::Cluster).count(), 1);

        std::fs::write(dir.join("b.yaml"), "clusters:\n- {name: b, type: STATIC\n").expect("write");
        let err = store.load_files(&dir).await.expect_err("syntax error");
        assert!(err.0.contains("b.yaml:"), "{err}");
        assert_eq!(
            store.snapshot().of(ResourceKind::Cluster).count(),
            1,
            "previous resources kept"
        );

        std::fs::write(dir.join("b.yaml"), "clusters:\n- {name: a, type: STATIC}\n")
            .expect("write");
        let err = store.load_files(&dir).await.expect_err("duplicate");
        assert!(err.0.contains("duplicate CDS name"), "{err}");

        std::fs::write(dir.join("b.yaml"), "clusters:\n- {name: b, type: STATIK}\n")
            .expect("write");
        let err = store.load_files(&dir).await.expect_err("bad enum");
        assert!(
            err.0
                .contains("clusters[0] 'b': type: unknown value 'STATIK'"),
            "{err}"
        );
        assert_eq!(store.load_error().await.as_deref(), Some(err.0.as_str()));
        std::fs::remove_dir_all(&dir).ok();
    }
}
