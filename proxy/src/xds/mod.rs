//! xDS clients (ADS over delta or state-of-the-world framing, SDS), the record of what was
//! received, for `/config_dump` (per resource its version, when it was last updated, and the last
//! error), and the listeners warming on SDS secrets.

pub mod ads;
pub(crate) mod delta;
pub mod sds;
pub(crate) mod sotw;
pub mod warming;

use std::{collections::BTreeMap, sync::RwLock, time::SystemTime};

use waypoint_proto::{google::protobuf::Any, resource::ResourceKind};

/// One resource as the control plane sent it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Resource version.
    pub version: String,
    /// The resource (`None` when only a rejected version was ever received).
    pub resource: Option<Any>,
    /// When it was last accepted.
    pub last_updated: SystemTime,
    /// The last rejected update: (details, version, when).
    pub error: Option<(String, String, SystemTime)>,
}

/// Per-type bookkeeping.
#[derive(Debug, Clone, Default)]
pub struct TypeRecord {
    /// The response version last accepted (ACKed).
    pub version_info: String,
    /// Resources by name.
    pub resources: BTreeMap<String, Entry>,
    /// When the type was last updated.
    pub last_updated: Option<SystemTime>,
}

/// Everything received over xDS. std `RwLock`: held briefly, never across an await.
#[derive(Debug, Default)]
pub struct XdsStore {
    types: RwLock<BTreeMap<ResourceKind, TypeRecord>>,
}

impl XdsStore {
    /// A copy of one type's record.
    pub fn record(&self, kind: ResourceKind) -> TypeRecord {
        let types = match self.types.read() {
            Ok(t) => t,
            Err(p) => p.into_inner(),
        };
        types.get(&kind).cloned().unwrap_or_default()
    }

    /// Applies `f` to one type's record.
    pub fn update(&self, kind: ResourceKind, f: impl FnOnce(&mut TypeRecord)) {
        let mut types = match self.types.write() {
            Ok(t) => t,
            Err(p) => p.into_inner(),
        };
        f(types.entry(kind).or_default());
    }
}
