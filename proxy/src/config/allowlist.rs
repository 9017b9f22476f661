//! The allowlist walk: every set field of a decoded resource (prost-reflect `DynamicMessage`),
//! recursively through messages, repeated fields, map values, `Any` payloads and `TypedStruct`
//! values, is looked up in [`super::supported`]. A field, extension type or enum value that is set
//! but not listed is an error naming its JSON path:
//!
//! * `enable_reuse_port: field 'enable_reuse_port' of envoy.config.listener.v3.Listener is not supported`
//! * `filter_chains[0].filters[0].typed_config.http_filters[2].typed_config: extension
//!   type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua is not supported`
//! * `lb_policy: value LOAD_BALANCING_POLICY_CONFIG of envoy.config.cluster.v3.Cluster.lb_policy is not supported`
//!
//! Harmless fields are not walked: their content does not matter to us.

use prost_reflect::{DynamicMessage, Kind, MapKey, ReflectMessage, Value};
use serde_json::Value as Json;
use waypoint_proto::json;

use super::{
    ConfigError,
    supported::{self, Support},
};

/// Full names of the HTTP filter message (whose `is_optional` relaxes the extension check).
const HTTP_FILTER: &str = "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter";
const ROUTE_FILTER_CONFIG: &str = "envoy.config.route.v3.FilterConfig";

/// Every unsupported set field in `msg`, with paths from its root.
pub fn check(msg: &DynamicMessage) -> Vec<ConfigError> {
    let mut walker = Walker::default();
    walker.message(msg);
    walker.errors
}

/// Whether an Any of this type URL is an extension we accept (implemented or harmless), looking
/// through a `TypedStruct` wrapper.
pub fn extension_supported(any_type_url: &str, any_value: &[u8]) -> bool {
    let name = json::type_name_of_url(any_type_url);
    match supported::extension(name) {
        None => false,
        Some(rule) if rule.kind == supported::ExtensionKind::Wrapper => {
            typed_struct_inner_url(any_value)
                .and_then(|inner| supported::extension(json::type_name_of_url(&inner)))
                .is_some()
        }
        Some(_) => true,
    }
}

fn typed_struct_inner_url(bytes: &[u8]) -> Option<String> {
    let ts = json::decode_dynamic("udpa.type.v1.TypedStruct", bytes).ok()?;
    ts.get_field_by_name("type_url")
        .and_then(|v| v.as_str().map(str::to_owned))
}

#[derive(Default)]
struct Walker {
    path: Vec<Segment>,
    errors: Vec<ConfigError>,
}

enum Segment {
    Field(String),
    Index(usize),
    Key(String),
}

impl Walker {
    fn path(&self) -> String {
        let mut out = String::new();
        for seg in &self.path {
            match seg {
                Segment::Field(name) if out.is_empty() => out.push_str(name),
                Segment::Field(name) => {
                    out.push('.');
                    out.push_str(name);
                }
                Segment::Index(i) => out.push_str(&format!("[{i}]")),
                Segment::Key(k) => out.push_str(&format!("[{k:?}]")),
            }
        }
        out
    }

    fn error(&mut self, reason: String) {
        let path = self.path();
        self.errors.push(ConfigError::new(path, reason));
    }

    fn message(&mut self, msg: &DynamicMessage) {
        let desc = msg.descriptor();
        let name = desc.full_name();
        if name == "google.protobuf.Any" {
            self.any(msg);
            return;
        }
        // Well-known types (Duration, wrappers, Struct, Empty …) are values, not configuration.
        if name.starts_with("google.protobuf.") {
            return;
        }
        let rule = supported::message(name);
        let lenient = rule.is_some_and(|r| r.ignore_unknown_numbers);
        if !lenient {
            for unknown in msg.unknown_fields() {
                self.error(format!(
                    "field number {} of {name} is not in this proxy's schema",
                    unknown.number()
                ));
            }
        }
        let optional_filter = (name == HTTP_FILTER || name == ROUTE_FILTER_CONFIG)
            && msg
                .get_field_by_name("is_optional")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
        for (field, value) in msg.fields() {
            let fname = field.name();
            self.path.push(Segment::Field(fname.to_owned()));
            match rule.and_then(|r| r.field(fname)) {
                None => self.error(format!("field '{fname}' of {name} is not supported")),
                Some(Support::Harmless(_)) => {}
                Some(Support::Implemented) => {
                    let skip = optional_filter
                        && matches!(fname, "typed_config" | "config")
                        && value.as_message().is_some_and(|any| !any_supported(any));
                    if !skip {
                        self.value(name, &field, value, lenient);
                    }
                }
            }
            self.path.pop();
        }
    }

    fn value(
        &mut self,
        message: &str,
        field: &prost_reflect::FieldDescriptor,
        value: &Value,
        lenient: bool,
    ) {
        match value {
            Value::Message(m) => self.message(m),
            // A lenient (subset) schema also tolerates enum values newer than our copy.
            Value::EnumNumber(_) if lenient => {}
            Value::EnumNumber(n) => self.enum_value(message, field, *n),
            Value::List(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.path.push(Segment::Index(i));
                    match item {
                        Value::Message(m) => self.message(m),
                        Value::EnumNumber(n) if !lenient => self.enum_value(message, field, *n),
                        _ => {}
                    }
                    self.path.pop();
                }
            }
            Value::Map(entries) => {
                let mut sorted: Vec<(String, &Value)> =
                    entries.iter().map(|(k, v)| (map_key(k), v)).collect();
                sorted.sort_by(|a, b| a.0.cmp(&b.0));
                for (k, item) in sorted {
                    if let Value::Message(m) = item {
                        self.path.push(Segment::Key(k));
                        self.message(m);
                        self.path.pop();
                    }
                }
            }
            _ => {}
        }
    }

    fn enum_value(&mut self, message: &str, field: &prost_reflect::FieldDescriptor, n: i32) {
        let Kind::Enum(en) = field.kind() else {
            return;
        };
        let Some(v) = en.get_value(n) else {
            self.error(format!(
                "value {n} of {message}.{} is not a known {} value",
                field.name(),
                en.full_name()
            ));
            return;
        };
        if let Some(allowed) = supported::enum_values(message, field.name())
            && !allowed.contains(&v.name())
        {
            self.error(format!(
                "value {} of {message}.{} is not supported (supported: {})",
                v.name(),
                field.name(),
                allowed.join(", ")
            ));
        }
    }

    fn any(&mut self, any: &DynamicMessage) {
        let (type_url, bytes) = any_parts(any);
        let name = json::type_name_of_url(&type_url).to_owned();
        let Some(rule) = supported::extension(&name) else {
            self.error(format!("extension {type_url} is not supported"));
            return;
        };
        if let Support::Harmless(_) = rule.support {
            return;
        }
        let inner = match json::decode_dynamic(&name, &bytes) {
            Ok(m) => m,
            Err(e) => {
                self.error(format!("payload of {type_url} does not decode: {e}"));
                return;
            }
        };
        if rule.kind == supported::ExtensionKind::Wrapper {
            self.typed_struct(&inner);
        } else {
            self.message(&inner);
        }
    }

    /// A `TypedStruct`: its inner type must be supported; a type we have a descriptor for is read
    /// from the Struct and walked like any message, a struct-only Istio type has its keys checked.
    fn typed_struct(&mut self, ts: &DynamicMessage) {
        let inner_url = ts
            .get_field_by_name("type_url")
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let inner_name = json::type_name_of_url(&inner_url).to_owned();
        let Some(rule) = supported::extension(&inner_name) else {
            self.error(format!(
                "extension {inner_url} (in a TypedStruct) is not supported"
            ));
            return;
        };
        if let Support::Harmless(_) = rule.support {
            return;
        }
        let value = match ts
            .get_field_by_name("value")
            .and_then(|v| match v.as_ref() {
                Value::Message(m) => Some(m.clone()),
                _ => None,
            }) {
            Some(m) => match json::dynamic_to_json(&m) {
                Ok(j) => j,
                Err(e) => {
                    self.error(format!("TypedStruct value: {e}"));
                    return;
                }
            },
            None => Json::Object(Default::default()),
        };
        self.path.push(Segment::Field("value".to_owned()));
        if rule.struct_only {
            self.struct_keys(&inner_name, &value);
        } else {
            match json::dynamic_from_json(&inner_name, &value) {
                Ok(inner) => self.message(&inner),
                Err(e) => self.error(format!("does not read as {inner_name}: {e}")),
            }
        }
        self.path.pop();
    }

    fn struct_keys(&mut self, type_name: &str, value: &Json) {
        let Json::Object(map) = value else {
            self.error(format!("{type_name} must be an object"));
            return;
        };
        let rule = supported::message(type_name);
        for (k, _) in map {
            match rule.and_then(|r| r.field(k)) {
                Some(_) => {}
                None => {
                    self.path.push(Segment::Field(k.clone()));
                    self.error(format!("field '{k}' of {type_name} is not supported"));
                    self.path.pop();
                }
            }
        }
    }
}

/// Whether an Any message (dynamic) carries a supported extension.
fn any_supported(any: &DynamicMessage) -> bool {
    let (type_url, bytes) = any_parts(any);
    extension_supported(&type_url, &bytes)
}

fn any_parts(msg: &DynamicMessage) -> (String, Vec<u8>) {
    let type_url = msg
        .get_field_by_name("type_url")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let bytes = msg
        .get_field_by_name("value")
        .and_then(|v| v.as_bytes().map(|b| b.to_vec()))
        .unwrap_or_default();
    (type_url, bytes)
}

fn map_key(key: &MapKey) -> String {
    match key {
        MapKey::Bool(b) => b.to_string(),
        MapKey::I32(i) => i.to_string(),
        MapKey::I64(i) => i.to_string(),
        MapKey::U32(i) => i.to_string(),
        MapKey::U64(i) => i.to_string(),
        MapKey::String(s) => s.clone(),
    }
}
