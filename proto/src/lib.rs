//! Protocol types: Envoy v3 (re-exported from `envoy-types`), the Istio CA and workload APIs, the
//! small xDS protos `envoy-types` lacks, and the proto3-JSON reader/writer for Envoy messages.

pub use envoy_types::pb::envoy;
pub use envoy_types::pb::google;

/// Istio APIs written for this project.
pub mod istio {
    /// `istio.v1.auth`: the certificate authority service.
    pub mod ca {
        #![allow(clippy::all)]
        include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
    }
    /// `istio.workload`: workload discovery (WDS).
    pub mod workload {
        #![allow(clippy::all)]
        include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));
    }
    /// `stats`: Istio's stats filter configuration.
    pub mod stats {
        #![allow(clippy::all)]
        include!(concat!(env!("OUT_DIR"), "/stats.rs"));
    }
}

/// `udpa.type.v1`.
pub mod udpa {
    #![allow(clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/udpa.r#type.v1.rs"));
}

/// `xds.type.v3` and `xds.type.matcher.v3` additions.
pub mod xds {
    /// `xds.type.v3.TypedStruct`.
    pub mod typed_struct {
        #![allow(clippy::all)]
        include!(concat!(env!("OUT_DIR"), "/xds.r#type.v3.rs"));
    }
    /// `xds.type.matcher.v3.IPMatcher` (generated).
    pub mod matcher {
        #![allow(clippy::all)]
        include!(concat!(env!("OUT_DIR"), "/xds.r#type.matcher.v3.rs"));
    }
}

pub mod json;
pub mod resource;

/// The serialized descriptor set behind [`json`].
pub const DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

/// Envoy-types' `xds.type.matcher.v3` (a path prost's extern mapping can name without `r#`).
#[doc(hidden)]
pub mod xds_matcher_v3 {
    pub use envoy_types::pb::xds::r#type::matcher::v3::*;
}
