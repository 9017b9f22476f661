//! `set_filter_state` (network `on_new_connection`, HTTP `on_request_headers`): filter state
//! objects formatted from the connection/request, optionally shared with the upstream connection
//! (how `connect_authority` hands `:authority` and the peer identity to the internal listener).

use waypoint_proto::envoy::{
    config::core::v3::substitution_format_string::Format as RawFormat,
    extensions::filters::common::set_filter_state::v3::{
        FilterStateValue,
        filter_state_value::{Key, SharedWithUpstream, Value},
    },
};

use crate::config::{
    CompileResult, ConfigError, field,
    format::{Format, FormatContext},
    index, inline_text,
};

/// Object factories we can build (the value's type in filter state).
pub const FACTORIES: &[&str] = &[
    // A plain string (Envoy's default when no factory is named).
    "envoy.string",
    // Istio's hashable string (used by matchers and RBAC).
    "istio.hashable_string",
    // Address objects read by original_dst.
    "envoy.filters.listener.original_dst.local_ip",
    "envoy.filters.listener.original_dst.remote_ip",
    "envoy.network.transport_socket.original_dst_address",
    "envoy.network.upstream_server_name",
    "envoy.network.application_protocols",
    "envoy.tcp_proxy.cluster",
    "envoy.network.upstream_subject_alt_names",
];

/// How far a value travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// This connection/stream only.
    None,
    /// Also the upstream connection (one hop).
    Once,
    /// Every following hop.
    Transitive,
}

/// One value to set.
#[derive(Debug, Clone)]
pub struct StateValue {
    /// The filter state key.
    pub key: String,
    /// The object factory (`None`: the key names its own factory, or a plain string).
    pub factory: Option<String>,
    /// The value.
    pub format: Format,
    /// `read_only`.
    pub read_only: bool,
    /// `shared_with_upstream`.
    pub sharing: Sharing,
    /// `skip_if_empty`.
    pub skip_if_empty: bool,
}

/// A compiled set_filter_state config.
#[derive(Debug, Clone)]
pub struct SetFilterState {
    /// Values, in order.
    pub values: Vec<StateValue>,
}

impl SetFilterState {
    /// Compiles `path.<list_name>`.
    // Deprecated forms are honoured: Istio and older control planes still send them.
    #[allow(deprecated)]
    pub fn compile(list: &[FilterStateValue], path: &str, list_name: &str) -> CompileResult<Self> {
        let mut values = Vec::with_capacity(list.len());
        for (i, v) in list.iter().enumerate() {
            let vpath = index(path, list_name, i);
            let key = match &v.key {
                Some(Key::ObjectKey(k)) if !k.is_empty() => k.clone(),
                _ => {
                    return Err(ConfigError::new(
                        field(&vpath, "object_key"),
                        "object_key is required",
                    ));
                }
            };
            let factory = (!v.factory_key.is_empty()).then(|| v.factory_key.clone());
            let factory_name = factory.as_deref().unwrap_or(&key);
            if factory.is_some() && !FACTORIES.contains(&factory_name) {
                return Err(ConfigError::new(
                    field(&vpath, "factory_key"),
                    format!("object factory '{factory_name}' is not supported"),
                ));
            }
            let fpath = field(&vpath, "format_string");
            let format = match &v.value {
                Some(Value::FormatString(f)) => match &f.format {
                    Some(RawFormat::TextFormat(t)) => {
                        Format::parse(t, FormatContext::FilterState, &field(&fpath, "text_format"))?
                    }
                    Some(RawFormat::TextFormatSource(src)) => {
                        let p = field(&fpath, "text_format_source");
                        Format::parse(&inline_text(src, &p)?, FormatContext::FilterState, &p)?
                    }
                    _ => {
                        return Err(ConfigError::new(
                            fpath,
                            "a text format is required (json_format is not supported here)",
                        ));
                    }
                },
                None => return Err(ConfigError::new(fpath, "format_string is required")),
            };
            let sharing = match SharedWithUpstream::try_from(v.shared_with_upstream) {
                Ok(SharedWithUpstream::Once) => Sharing::Once,
                Ok(SharedWithUpstream::Transitive) => Sharing::Transitive,
                _ => Sharing::None,
            };
            #[allow(deprecated)]
            let read_only = v.read_only;
            values.push(StateValue {
                key,
                factory,
                format,
                read_only,
                sharing,
                skip_if_empty: v.skip_if_empty,
            });
        }
        Ok(SetFilterState { values })
    }
}
