//! What the data path knows about one downstream connection: addresses (as restored by
//! `original_dst`), TLS peer, sniffed protocol, filter state and dynamic metadata. Internal
//! listeners receive a [`Seed`] from the upstream side that opened them (shared filter state,
//! passthrough metadata), which is how istiod's waypoint config carries the CONNECT authority and
//! the peer principal from `connect_terminate` to `main_internal`.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use serde_json::Value as Json;

use crate::config::{
    Snapshot,
    filters::set_filter_state::{SetFilterState, Sharing},
    format::{FormatValues, Operator},
};

/// A byte stream the data path can read and write (the same trait HBONE tunnels use).
pub use crate::hbone::server::Tunnel as Io;

/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

/// A connection address: an IP socket, or an internal listener (`envoy://name/id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// IP and port.
    Socket(SocketAddr),
    /// An internal address.
    Internal(String),
}

impl Addr {
    /// The socket address, if this is one.
    pub fn socket(&self) -> Option<SocketAddr> {
        match self {
            Addr::Socket(s) => Some(*s),
            Addr::Internal(_) => None,
        }
    }

    /// Without the port (`%..._WITHOUT_PORT%`).
    pub fn ip_text(&self) -> String {
        match self {
            Addr::Socket(s) => s.ip().to_string(),
            Addr::Internal(n) => n.clone(),
        }
    }

    /// The port (0 for internal addresses).
    pub fn port(&self) -> u16 {
        self.socket().map(|s| s.port()).unwrap_or(0)
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Socket(s) => write!(f, "{s}"),
            Addr::Internal(n) => write!(f, "envoy://{n}"),
        }
    }
}

/// One filter state object (string form; Istio's objects are all strings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateObject {
    /// The value.
    pub value: String,
    /// How far it travels upstream.
    pub sharing: Sharing,
    /// `read_only`: later writes are refused.
    pub read_only: bool,
    /// A peer's telemetry labels, for the objects the `peer_metadata` filters store
    /// (`downstream_peer`); the value then holds the workload uid or the baggage it came from.
    pub peer: Option<Arc<crate::telemetry::istio::PeerLabels>>,
}

/// Filter state: objects by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterState {
    objects: BTreeMap<String, StateObject>,
}

impl FilterState {
    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.objects.get(key).map(|o| o.value.as_str())
    }

    /// The peer labels stored under `key` (by a `peer_metadata` filter).
    pub fn peer(&self, key: &str) -> Option<Arc<crate::telemetry::istio::PeerLabels>> {
        self.objects.get(key).and_then(|o| o.peer.clone())
    }

    /// Sets `key` unless a read-only object holds it; returns whether it was set.
    pub fn set(&mut self, key: &str, object: StateObject) -> bool {
        if self.objects.get(key).is_some_and(|o| o.read_only) {
            return false;
        }
        self.objects.insert(key.to_owned(), object);
        true
    }

    /// The objects shared with an upstream connection, as the upstream side sees them: `Once`
    /// objects arrive unshared, `Transitive` ones stay transitive.
    pub fn shared_with_upstream(&self) -> FilterState {
        let objects = self
            .objects
            .iter()
            .filter(|(_, o)| o.sharing != Sharing::None)
            .map(|(k, o)| {
                let mut o = o.clone();
                if o.sharing == Sharing::Once {
                    o.sharing = Sharing::None;
                }
                (k.clone(), o)
            })
            .collect();
        FilterState { objects }
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// A hash of the shared objects (upstream connection pools are keyed by it, as Envoy keys
    /// pools by hashable shared filter state).
    pub fn sharing_hash(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (k, o) in &self.objects {
            if o.sharing != Sharing::None {
                k.hash(&mut h);
                o.value.hash(&mut h);
            }
        }
        h.finish()
    }

    /// Iterates over the objects.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &StateObject)> {
        self.objects.iter()
    }
}

/// What an upstream side hands to an internal listener's new connection.
#[derive(Debug, Clone, Default)]
pub struct Seed {
    /// Filter state shared by the upstream side.
    pub filter_state: FilterState,
    /// Dynamic metadata from `passthrough_metadata`, by namespace.
    pub metadata: BTreeMap<String, Json>,
    /// The endpoint id of the internal address (`envoy_internal_address.endpoint_id`).
    pub endpoint_id: Option<String>,
    /// Who opened it (for `%DOWNSTREAM_REMOTE_ADDRESS%` before original_dst restores it).
    pub source: Option<Addr>,
}

/// TLS facts of a downstream connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsInfo {
    /// The peer's first URI SAN.
    pub peer_uri_san: Option<String>,
    /// Our own first URI SAN.
    pub local_uri_san: Option<String>,
    /// Negotiated ALPN.
    pub alpn: Option<String>,
    /// SNI.
    pub server_name: Option<String>,
}

static CONNECTION_IDS: AtomicU64 = AtomicU64::new(1);

/// A downstream connection.
#[derive(Debug, Clone)]
pub struct ConnContext {
    /// Envoy's `%CONNECTION_ID%`.
    pub id: u64,
    /// The listener it arrived on.
    pub listener: String,
    /// The filter chain selected.
    pub chain: String,
    /// Local address (after `original_dst`).
    pub local: Addr,
    /// Remote address (after `original_dst`).
    pub remote: Addr,
    /// The directly connected peer.
    pub direct_remote: Addr,
    /// TLS, when the chain terminates it.
    pub tls: Option<TlsInfo>,
    /// Application protocols from `http_inspector` or ALPN.
    pub application_protocols: Vec<String>,
    /// Connection-level filter state.
    pub filter_state: FilterState,
    /// Dynamic metadata by namespace.
    pub metadata: BTreeMap<String, Json>,
    /// The configuration the connection runs on, fixed when it was accepted.
    pub snapshot: Arc<Snapshot>,
    /// Local rate limit buckets of this connection
    /// (`local_rate_limit_per_downstream_connection`).
    pub rate_limits: crate::http::local_ratelimit::ConnBuckets,
    /// The drain of the filter chain that took the connection (an LDS update that changes or
    /// removes the chain drains it, then closes it after `--drain-time-s`).
    pub drain: super::drain::ChainWatch,
}

impl ConnContext {
    /// A context for a new connection.
    pub fn new(listener: &str, local: Addr, remote: Addr, snapshot: Arc<Snapshot>) -> Self {
        ConnContext {
            id: CONNECTION_IDS.fetch_add(1, Ordering::Relaxed),
            listener: listener.to_owned(),
            chain: String::new(),
            direct_remote: remote.clone(),
            local,
            remote,
            tls: None,
            application_protocols: Vec::new(),
            filter_state: FilterState::default(),
            metadata: BTreeMap::new(),
            snapshot,
            rate_limits: Default::default(),
            drain: super::drain::ChainWatch::never(),
        }
    }

    /// A dynamic metadata value: `namespace` then a path of keys.
    pub fn metadata_value(&self, namespace: &str, path: &[String]) -> Option<&Json> {
        let mut v = self.metadata.get(namespace)?;
        for k in path {
            v = v.get(k)?;
        }
        Some(v)
    }
}

/// Format values available at connection level (network filters, tunnel hostnames).
pub struct ConnValues<'a> {
    /// The connection.
    pub conn: &'a ConnContext,
    /// Stream-level filter state consulted first, if any.
    pub stream_state: Option<&'a FilterState>,
    /// Request headers, if any.
    pub request: Option<&'a http::request::Parts>,
}

impl ConnValues<'_> {
    fn filter_state(&self, key: &str) -> Option<&str> {
        self.stream_state
            .and_then(|s| s.get(key))
            .or_else(|| self.conn.filter_state.get(key))
    }
}

fn header_value(parts: &http::request::Parts, name: &str) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    match lower.as_str() {
        ":authority" | "host" => parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            }),
        ":path" => parts.uri.path_and_query().map(|p| p.as_str().to_owned()),
        ":method" => Some(parts.method.as_str().to_owned()),
        ":scheme" => parts.uri.scheme_str().map(str::to_owned),
        _ => parts
            .headers
            .get(lower.as_str())
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    }
}

/// Envoy's `%PROTOCOL%` text for an HTTP version (`HTTP/1.1`, `HTTP/2`, `HTTP/3`).
pub fn protocol_text(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// The machine's host name (`%HOSTNAME%`: what gethostname returns), read once.
fn hostname() -> Option<&'static str> {
    static NAME: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
    })
    .as_deref()
}

impl FormatValues for ConnValues<'_> {
    fn value(&self, op: &Operator) -> Option<String> {
        let c = self.conn;
        let tls = c.tls.as_ref();
        match op.name.as_str() {
            "DOWNSTREAM_REMOTE_ADDRESS" => Some(c.remote.to_string()),
            "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Some(c.remote.ip_text()),
            "DOWNSTREAM_REMOTE_PORT" => Some(c.remote.port().to_string()),
            "DOWNSTREAM_DIRECT_REMOTE_ADDRESS" => Some(c.direct_remote.to_string()),
            "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT" => Some(c.direct_remote.ip_text()),
            "DOWNSTREAM_DIRECT_REMOTE_PORT" => Some(c.direct_remote.port().to_string()),
            "DOWNSTREAM_LOCAL_ADDRESS" => Some(c.local.to_string()),
            "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => Some(c.local.ip_text()),
            "DOWNSTREAM_LOCAL_PORT" => Some(c.local.port().to_string()),
            "DOWNSTREAM_PEER_URI_SAN" => tls.and_then(|t| t.peer_uri_san.clone()),
            "DOWNSTREAM_LOCAL_URI_SAN" => tls.and_then(|t| t.local_uri_san.clone()),
            "REQUESTED_SERVER_NAME" => tls.and_then(|t| t.server_name.clone()),
            "CONNECTION_ID" => Some(c.id.to_string()),
            "FILTER_CHAIN_NAME" => Some(c.chain.clone()),
            "HOSTNAME" => hostname().map(str::to_owned),
            "FILTER_STATE" => {
                // `key:PLAIN` / `key:TYPED` / `key`.
                let args = op.args.as_deref()?;
                let key = args
                    .strip_suffix(":PLAIN")
                    .or_else(|| args.strip_suffix(":TYPED"))
                    .unwrap_or(args);
                self.filter_state(key).map(str::to_owned)
            }
            "DYNAMIC_METADATA" => {
                // `namespace:key:key...`
                let args = op.args.as_deref()?;
                let mut parts = args.split(':');
                let ns = parts.next()?;
                let path: Vec<String> = parts.map(str::to_owned).collect();
                c.metadata_value(ns, &path).map(|v| match v {
                    Json::String(s) => s.clone(),
                    other => other.to_string(),
                })
            }
            "REQ" => {
                let req = self.request?;
                let args = op.args.as_deref()?;
                // `REQ(X?Y)`: X, falling back to Y.
                let mut alts = args.split('?');
                let first = alts.next()?;
                header_value(req, first).or_else(|| alts.next().and_then(|y| header_value(req, y)))
            }
            "PROTOCOL" => self.request.map(|r| protocol_text(r.version).to_owned()),
            "ENVIRONMENT" => op.args.as_deref().and_then(|k| std::env::var(k).ok()),
            _ => None,
        }
    }
}

/// Applies a `set_filter_state` config to `state`, rendering values with `values`.
pub fn apply_set_filter_state(
    config: &SetFilterState,
    values: &dyn FormatValues,
    state: &mut FilterState,
) {
    for v in &config.values {
        let value = v.format.render(values);
        if value.is_empty() && v.skip_if_empty {
            continue;
        }
        if !state.set(
            &v.key,
            StateObject {
                value,
                sharing: v.sharing,
                read_only: v.read_only,
                peer: None,
            },
        ) {
            tracing::debug!(target: "filter", key = %v.key, "filter state is read-only; not overwritten");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_objects_stop_after_one_hop_transitive_ones_travel() {
        let mut fs = FilterState::default();
        let obj = |v: &str, sharing| StateObject {
            value: v.into(),
            sharing,
            read_only: false,
            peer: None,
        };
        fs.set("a", obj("1", Sharing::Once));
        fs.set("b", obj("2", Sharing::Transitive));
        fs.set("c", obj("3", Sharing::None));
        let hop1 = fs.shared_with_upstream();
        assert_eq!(hop1.get("a"), Some("1"));
        assert_eq!(hop1.get("b"), Some("2"));
        assert_eq!(hop1.get("c"), None);
        let hop2 = hop1.shared_with_upstream();
        assert_eq!(hop2.get("a"), None);
        assert_eq!(hop2.get("b"), Some("2"));
        assert_ne!(fs.sharing_hash(), FilterState::default().sharing_hash());
    }

    #[test]
    fn read_only_objects_are_kept() {
        let mut fs = FilterState::default();
        assert!(fs.set(
            "k",
            StateObject {
                value: "x".into(),
                sharing: Sharing::None,
                read_only: true,
                peer: None,
            }
        ));
        assert!(!fs.set(
            "k",
            StateObject {
                value: "y".into(),
                sharing: Sharing::None,
                read_only: false,
                peer: None,
            }
        ));
        assert_eq!(fs.get("k"), Some("x"));
    }
}
