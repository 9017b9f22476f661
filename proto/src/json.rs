//! proto3-JSON (and YAML) ⇄ protobuf messages for every type in the descriptor pool: the Envoy API
//! that `envoy-types` ships plus our own protos.
//!
//! Reading is our own walk over `serde_json::Value` guided by prost-reflect descriptors, so that every
//! error names the JSON path where it happened, including inside `google.protobuf.Any` payloads and
//! `TypedStruct` values (prost-reflect's serde reader buffers Any payloads and loses the path). Field
//! names are accepted in snake_case and camelCase, `@type` Anys are resolved recursively, and a
//! `TypedStruct` whose inner `type_url` is known is checked against that type. Writing uses
//! prost-reflect's serializer with proto field names (Envoy's `/config_dump` style).

use std::{
    collections::HashSet,
    fmt,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use base64::Engine as _;
use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DynamicMessage, EnumDescriptor, FieldDescriptor, Kind, MapKey,
    MessageDescriptor, ReflectMessage as _, SerializeOptions, Value,
};
use serde_json::Value as Json;

use crate::DESCRIPTOR_SET;

/// Type URL prefix used by every Any we write.
pub const TYPE_URL_PREFIX: &str = "type.googleapis.com/";

/// Istio configs that only ever arrive as a `TypedStruct` and are read field by field from the
/// Struct (reference/istio-facts.md §6): we accept them without a descriptor for the inner type.
pub const STRUCT_ONLY_TYPES: &[&str] = &[
    "io.istio.http.peer_metadata.Config",
    "io.istio.http.peer_metadata.UpstreamConfig",
    "envoy.tcp.metadataexchange.config.MetadataExchange",
    "envoy.extensions.network_filters.peer_metadata.Config",
    "envoy.extensions.network_filters.peer_metadata.UpstreamConfig",
];

const TYPED_STRUCT_TYPES: &[&str] = &["udpa.type.v1.TypedStruct", "xds.type.v3.TypedStruct"];

/// An error while reading or writing proto3-JSON, with the JSON path where it happened.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    /// The document is not valid YAML/JSON; `line` is 1-based when known.
    #[error("syntax error{}: {reason}", line.map(|l| format!(" at line {l}")).unwrap_or_default())]
    Syntax {
        /// 1-based line of the problem, when the parser reports one.
        line: Option<usize>,
        /// What the parser said.
        reason: String,
    },
    /// The document parsed but does not fit the message schema.
    #[error("{path}: {reason}")]
    Schema {
        /// JSON path from the message root, e.g. `filter_chains[0].filters[1].typed_config`.
        path: String,
        /// What is wrong there.
        reason: String,
    },
    /// A message type name not present in the descriptor pool.
    #[error("unknown message type '{0}'")]
    UnknownType(String),
    /// Protobuf bytes that do not decode as the expected type.
    #[error("protobuf decode of {type_name}: {reason}")]
    Decode {
        /// The message type being decoded.
        type_name: String,
        /// The decoder's reason.
        reason: String,
    },
    /// Serialising to JSON failed.
    #[error("JSON output: {0}")]
    Write(String),
}

impl JsonError {
    fn schema(path: &Path, reason: impl Into<String>) -> Self {
        JsonError::Schema {
            path: path.to_string(),
            reason: reason.into(),
        }
    }
}

/// The descriptor pool for every message this crate knows: built on first use and kept while
/// in use (see [`release_idle_pool`]). A clone shares the same pool (it is reference-counted).
pub fn pool() -> DescriptorPool {
    let mut cached = POOL.lock().unwrap_or_else(PoisonError::into_inner);
    let c = cached.get_or_insert_with(|| CachedPool {
        pool: decode_pool(),
        used: Instant::now(),
    });
    c.used = Instant::now();
    c.pool.clone()
}

/// Forgets the descriptor pool when nothing asked for it during the last `idle`; true if it was
/// dropped. Its ~5 MB (every Envoy and Istio message type) are freed once the descriptors handed
/// out are gone too, and the next JSON conversion (a config dump, a TypedStruct) builds it again.
/// A long-running process calls this now and then: after start-up its JSON needs are rare.
pub fn release_idle_pool(idle: Duration) -> bool {
    let mut cached = POOL.lock().unwrap_or_else(PoisonError::into_inner);
    if cached.as_ref().is_some_and(|c| c.used.elapsed() >= idle) {
        *cached = None;
        return true;
    }
    false
}

/// The cached pool and when it was last handed out.
struct CachedPool {
    pool: DescriptorPool,
    used: Instant,
}

// A plain mutex: JSON conversion is synchronous config work, never on the data path.
static POOL: Mutex<Option<CachedPool>> = Mutex::new(None);

fn decode_pool() -> DescriptorPool {
    match DescriptorPool::decode(DESCRIPTOR_SET) {
        Ok(pool) => pool,
        // The descriptor set is produced by our build script from protox output; failing to decode
        // it is a build defect, not an input error.
        #[allow(clippy::panic)]
        Err(err) => panic!("embedded descriptor set is invalid: {err}"),
    }
}

/// Looks up a message descriptor by full name (`envoy.config.listener.v3.Listener`) or type URL.
pub fn message_descriptor(name_or_url: &str) -> Result<MessageDescriptor, JsonError> {
    let name = type_name_of_url(name_or_url);
    pool()
        .get_message_by_name(name)
        .ok_or_else(|| JsonError::UnknownType(name.to_owned()))
}

/// The message name part of a type URL (`type.googleapis.com/a.b.C` → `a.b.C`).
pub fn type_name_of_url(url: &str) -> &str {
    url.rsplit_once('/').map(|(_, n)| n).unwrap_or(url)
}

/// Parses YAML (a superset of JSON) into a JSON value. Map keys that YAML reads as numbers or
/// booleans (`8000:`) become strings, as they would be in JSON.
pub fn yaml_to_json(text: &str) -> Result<Json, JsonError> {
    let yaml: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| JsonError::Syntax {
        line: e.location().map(|l| l.line()),
        reason: e.to_string(),
    })?;
    yaml_value_to_json(yaml)
}

fn yaml_value_to_json(v: serde_yaml::Value) -> Result<Json, JsonError> {
    use serde_yaml::Value as Y;
    Ok(match v {
        Y::Null => Json::Null,
        Y::Bool(b) => Json::Bool(b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Json::from(i)
            } else if let Some(u) = n.as_u64() {
                Json::from(u)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                serde_json::Number::from_f64(f)
                    .map(Json::Number)
                    .unwrap_or_else(|| Json::String(f.to_string()))
            }
        }
        Y::String(s) => Json::String(s),
        Y::Sequence(seq) => Json::Array(
            seq.into_iter()
                .map(yaml_value_to_json)
                .collect::<Result<_, _>>()?,
        ),
        Y::Mapping(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                let key = match k {
                    Y::String(s) => s,
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    other => {
                        return Err(JsonError::Syntax {
                            line: None,
                            reason: format!("unsupported map key {other:?}"),
                        });
                    }
                };
                out.insert(key, yaml_value_to_json(v)?);
            }
            Json::Object(out)
        }
        Y::Tagged(t) => yaml_value_to_json(t.value)?,
    })
}

/// Reads a JSON value as a message of type `name` (full name or type URL).
pub fn dynamic_from_json(name: &str, value: &Json) -> Result<DynamicMessage, JsonError> {
    let desc = message_descriptor(name)?;
    let mut path = Path::default();
    read_message(&desc, value, &mut path)
}

/// Reads a JSON value into the generated Rust type `M`.
pub fn from_json<M: prost::Message + prost::Name + Default>(value: &Json) -> Result<M, JsonError> {
    let dynamic = dynamic_from_json(&M::full_name(), value)?;
    M::decode(dynamic.encode_to_vec().as_slice()).map_err(|e| JsonError::Decode {
        type_name: M::full_name(),
        reason: e.to_string(),
    })
}

/// Reads YAML or JSON text into the generated Rust type `M`.
pub fn from_yaml<M: prost::Message + prost::Name + Default>(text: &str) -> Result<M, JsonError> {
    from_json(&yaml_to_json(text)?)
}

/// Reads a JSON value as an `Any` of type `name` (full name or type URL).
pub fn any_from_json(name: &str, value: &Json) -> Result<crate::google::protobuf::Any, JsonError> {
    let dynamic = dynamic_from_json(name, value)?;
    Ok(crate::google::protobuf::Any {
        type_url: format!("{TYPE_URL_PREFIX}{}", dynamic.descriptor().full_name()),
        value: dynamic.encode_to_vec(),
    })
}

/// Decodes protobuf bytes of type `name` into a dynamic message.
pub fn decode_dynamic(name: &str, bytes: &[u8]) -> Result<DynamicMessage, JsonError> {
    let desc = message_descriptor(name)?;
    DynamicMessage::decode(desc, bytes).map_err(|e| JsonError::Decode {
        type_name: name.to_owned(),
        reason: e.to_string(),
    })
}

/// Writes a generated Rust message as proto3-JSON with proto field names (Envoy's `/config_dump`
/// style): defaults omitted, 64-bit integers as strings, enums by name, Anys with `@type`.
pub fn to_json<M: prost::Message + prost::Name>(msg: &M) -> Result<Json, JsonError> {
    let dynamic = decode_dynamic(&M::full_name(), &msg.encode_to_vec())?;
    dynamic_to_json(&dynamic)
}

/// Writes an `Any` as proto3-JSON (`{"@type": ..., fields...}`).
pub fn any_to_json(any: &crate::google::protobuf::Any) -> Result<Json, JsonError> {
    let dynamic = decode_dynamic("google.protobuf.Any", &any.encode_to_vec())?;
    dynamic_to_json(&dynamic)
}

/// Writes a dynamic message as proto3-JSON (see [`to_json`]).
pub fn dynamic_to_json(msg: &DynamicMessage) -> Result<Json, JsonError> {
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(true);
    msg.serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| JsonError::Write(e.to_string()))
}

/// Calls `visit` for every `Any` inside `msg` (recursively, including the payloads of Anys and
/// `TypedStruct` values of known types) with its JSON path and decoded payload. Returns an error
/// naming the path of the first Any whose type is unknown or whose bytes do not decode.
pub fn visit_anys(
    msg: &DynamicMessage,
    visit: &mut dyn FnMut(&str, &DynamicMessage),
) -> Result<(), JsonError> {
    let mut path = Path::default();
    walk_anys(msg, &mut path, visit)
}

fn walk_anys(
    msg: &DynamicMessage,
    path: &mut Path,
    visit: &mut dyn FnMut(&str, &DynamicMessage),
) -> Result<(), JsonError> {
    let desc = msg.descriptor();
    if desc.full_name() == "google.protobuf.Any" {
        let (type_url, bytes) = any_parts(msg);
        let inner_name = type_name_of_url(&type_url).to_owned();
        let inner_desc = pool()
            .get_message_by_name(&inner_name)
            .ok_or_else(|| JsonError::schema(path, format!("unknown @type '{type_url}'")))?;
        let inner = DynamicMessage::decode(inner_desc, bytes.as_slice()).map_err(|e| {
            JsonError::schema(
                path,
                format!("payload of {inner_name} does not decode: {e}"),
            )
        })?;
        visit(&path.to_string(), &inner);
        if TYPED_STRUCT_TYPES.contains(&inner_name.as_str()) {
            check_typed_struct(&inner, path, visit)?;
        }
        return walk_anys(&inner, path, visit);
    }
    for (field, value) in msg.fields() {
        path.push_field(field.name());
        match value {
            Value::Message(m) => walk_anys(m, path, visit)?,
            Value::List(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let Value::Message(m) = item {
                        path.push_index(i);
                        walk_anys(m, path, visit)?;
                        path.pop();
                    }
                }
            }
            Value::Map(entries) => {
                for (key, item) in entries {
                    if let Value::Message(m) = item {
                        path.push_key(&map_key_string(key));
                        walk_anys(m, path, visit)?;
                        path.pop();
                    }
                }
            }
            _ => {}
        }
        path.pop();
    }
    Ok(())
}

fn map_key_string(key: &MapKey) -> String {
    match key {
        MapKey::Bool(b) => b.to_string(),
        MapKey::I32(i) => i.to_string(),
        MapKey::I64(i) => i.to_string(),
        MapKey::U32(i) => i.to_string(),
        MapKey::U64(i) => i.to_string(),
        MapKey::String(s) => s.clone(),
    }
}

/// `type_url` and `value` of a dynamic `google.protobuf.Any`.
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

/// A TypedStruct's inner value, checked against its `type_url` when that type is known.
fn check_typed_struct(
    typed_struct: &DynamicMessage,
    path: &mut Path,
    visit: &mut dyn FnMut(&str, &DynamicMessage),
) -> Result<(), JsonError> {
    let inner_url = typed_struct
        .get_field_by_name("type_url")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let inner_name = type_name_of_url(&inner_url);
    if STRUCT_ONLY_TYPES.contains(&inner_name) {
        return Ok(());
    }
    let desc = pool().get_message_by_name(inner_name).ok_or_else(|| {
        JsonError::schema(
            path,
            format!("TypedStruct names unknown type_url '{inner_url}'"),
        )
    })?;
    let value = match typed_struct.get_field_by_name("value") {
        Some(v) => match v.as_message() {
            Some(m) => dynamic_to_json(m)?,
            None => Json::Object(Default::default()),
        },
        None => Json::Object(Default::default()),
    };
    path.push_field("value");
    let inner = read_message(&desc, &value, path)?;
    visit(&path.to_string(), &inner);
    walk_anys(&inner, path, visit)?;
    path.pop();
    Ok(())
}

/// A JSON path under construction: `a.b[3].c["key"]`.
#[derive(Default, Clone)]
struct Path(Vec<Segment>);

#[derive(Clone)]
enum Segment {
    Field(String),
    Index(usize),
    Key(String),
}

impl Path {
    fn push_field(&mut self, name: &str) {
        self.0.push(Segment::Field(name.to_owned()));
    }
    fn push_index(&mut self, i: usize) {
        self.0.push(Segment::Index(i));
    }
    fn push_key(&mut self, k: &str) {
        self.0.push(Segment::Key(k.to_owned()));
    }
    fn pop(&mut self) {
        self.0.pop();
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(root)");
        }
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Segment::Field(name) if i == 0 => f.write_str(name)?,
                Segment::Field(name) => write!(f, ".{name}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
                Segment::Key(k) => write!(f, "[{k:?}]")?,
            }
        }
        Ok(())
    }
}

fn read_message(
    desc: &MessageDescriptor,
    value: &Json,
    path: &mut Path,
) -> Result<DynamicMessage, JsonError> {
    if let Some(msg) = read_well_known(desc, value, path)? {
        return Ok(msg);
    }
    let Json::Object(map) = value else {
        return Err(JsonError::schema(
            path,
            format!(
                "expected an object for {}, got {}",
                desc.full_name(),
                kind_of(value)
            ),
        ));
    };
    let mut msg = DynamicMessage::new(desc.clone());
    let mut oneofs_set: HashSet<String> = HashSet::new();
    for (key, item) in map {
        let field = desc
            .get_field_by_name(key)
            .or_else(|| desc.get_field_by_json_name(key))
            .ok_or_else(|| {
                let mut p = path.clone();
                p.push_field(key);
                JsonError::schema(&p, format!("unknown field '{key}' in {}", desc.full_name()))
            })?;
        path.push_field(field.name());
        if item.is_null() && !is_null_value_field(&field) {
            path.pop();
            continue;
        }
        if let Some(oneof) = field.containing_oneof()
            && !oneof.is_synthetic()
            && !oneofs_set.insert(oneof.name().to_owned())
        {
            return Err(JsonError::schema(
                path,
                format!("more than one field of oneof '{}' is set", oneof.name()),
            ));
        }
        let v = read_field(&field, item, path)?;
        msg.set_field(&field, v);
        path.pop();
    }
    Ok(msg)
}

fn is_null_value_field(field: &FieldDescriptor) -> bool {
    match field.kind() {
        Kind::Message(m) => m.full_name() == "google.protobuf.Value",
        Kind::Enum(e) => e.full_name() == "google.protobuf.NullValue",
        _ => false,
    }
}

fn read_field(field: &FieldDescriptor, value: &Json, path: &mut Path) -> Result<Value, JsonError> {
    if field.is_map() {
        let Json::Object(map) = value else {
            return Err(JsonError::schema(
                path,
                format!("expected an object (map), got {}", kind_of(value)),
            ));
        };
        let Kind::Message(entry) = field.kind() else {
            return Err(JsonError::schema(path, "map field without entry type"));
        };
        let key_field = entry.map_entry_key_field();
        let value_field = entry.map_entry_value_field();
        let mut out = std::collections::HashMap::new();
        for (k, v) in map {
            path.push_key(k);
            let key = read_map_key(&key_field.kind(), k, path)?;
            let val = read_single(&value_field.kind(), v, path)?;
            out.insert(key, val);
            path.pop();
        }
        return Ok(Value::Map(out));
    }
    if field.is_list() {
        let Json::Array(items) = value else {
            return Err(JsonError::schema(
                path,
                format!("expected an array, got {}", kind_of(value)),
            ));
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            path.push_index(i);
            out.push(read_single(&field.kind(), item, path)?);
            path.pop();
        }
        return Ok(Value::List(out));
    }
    read_single(&field.kind(), value, path)
}

fn read_map_key(kind: &Kind, key: &str, path: &Path) -> Result<MapKey, JsonError> {
    let bad = || JsonError::schema(path, format!("invalid map key '{key}'"));
    Ok(match kind {
        Kind::String => MapKey::String(key.to_owned()),
        Kind::Bool => MapKey::Bool(key.parse().map_err(|_| bad())?),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => MapKey::I32(key.parse().map_err(|_| bad())?),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => MapKey::I64(key.parse().map_err(|_| bad())?),
        Kind::Uint32 | Kind::Fixed32 => MapKey::U32(key.parse().map_err(|_| bad())?),
        Kind::Uint64 | Kind::Fixed64 => MapKey::U64(key.parse().map_err(|_| bad())?),
        _ => return Err(bad()),
    })
}

fn read_single(kind: &Kind, value: &Json, path: &mut Path) -> Result<Value, JsonError> {
    let wrong =
        |want: &str| JsonError::schema(path, format!("expected {want}, got {}", kind_of(value)));
    Ok(match kind {
        Kind::Message(desc) => Value::Message(read_message(desc, value, path)?),
        Kind::Enum(desc) => Value::EnumNumber(read_enum(desc, value, path)?),
        Kind::String => match value {
            Json::String(s) => Value::String(s.clone()),
            // YAML turns `name: 8000` into a number; a string field takes its text.
            Json::Number(n) => Value::String(n.to_string()),
            Json::Bool(b) => Value::String(b.to_string()),
            _ => return Err(wrong("a string")),
        },
        Kind::Bytes => match value {
            Json::String(s) => Value::Bytes(
                decode_base64(s)
                    .ok_or_else(|| wrong("base64 bytes"))?
                    .into(),
            ),
            _ => return Err(wrong("a base64 string")),
        },
        Kind::Bool => match value {
            Json::Bool(b) => Value::Bool(*b),
            Json::String(s) if s == "true" || s == "false" => Value::Bool(s == "true"),
            _ => return Err(wrong("a boolean")),
        },
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(
            read_integer(value)
                .and_then(|i| i32::try_from(i).ok())
                .ok_or_else(|| wrong("a 32-bit integer"))?,
        ),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(
            read_integer(value)
                .and_then(|i| i64::try_from(i).ok())
                .ok_or_else(|| wrong("a 64-bit integer"))?,
        ),
        Kind::Uint32 | Kind::Fixed32 => Value::U32(
            read_integer(value)
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| wrong("an unsigned 32-bit integer"))?,
        ),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(
            read_integer(value)
                .and_then(|i| u64::try_from(i).ok())
                .ok_or_else(|| wrong("an unsigned 64-bit integer"))?,
        ),
        Kind::Double => Value::F64(read_float(value).ok_or_else(|| wrong("a number"))?),
        Kind::Float => Value::F32(read_float(value).ok_or_else(|| wrong("a number"))? as f32),
    })
}

fn read_enum(desc: &EnumDescriptor, value: &Json, path: &Path) -> Result<i32, JsonError> {
    match value {
        Json::String(name) => desc
            .get_value_by_name(name)
            .map(|v| v.number())
            .ok_or_else(|| {
                JsonError::schema(
                    path,
                    format!("unknown value '{name}' for enum {}", desc.full_name()),
                )
            }),
        Json::Number(_) => read_integer(value)
            .and_then(|i| i32::try_from(i).ok())
            .ok_or_else(|| JsonError::schema(path, "enum number out of range")),
        Json::Null if desc.full_name() == "google.protobuf.NullValue" => Ok(0),
        other => Err(JsonError::schema(
            path,
            format!("expected an enum name, got {}", kind_of(other)),
        )),
    }
}

/// An integer from a JSON number (integral) or a decimal string, widened to i128.
fn read_integer(value: &Json) -> Option<i128> {
    match value {
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                Some(i128::from(i))
            } else if let Some(u) = n.as_u64() {
                Some(i128::from(u))
            } else {
                let f = n.as_f64()?;
                (f.fract() == 0.0 && f.abs() < 1e19).then_some(f as i128)
            }
        }
        Json::String(s) => s.trim().parse::<i128>().ok(),
        _ => None,
    }
}

fn read_float(value: &Json) -> Option<f64> {
    match value {
        Json::Number(n) => n.as_f64(),
        Json::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            other => other.parse().ok(),
        },
        _ => None,
    }
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(s).ok())
}

fn kind_of(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// The proto3-JSON special forms of the well-known types; `None` for ordinary messages.
fn read_well_known(
    desc: &MessageDescriptor,
    value: &Json,
    path: &mut Path,
) -> Result<Option<DynamicMessage>, JsonError> {
    let name = desc.full_name();
    if !name.starts_with("google.protobuf.") {
        return Ok(None);
    }
    let mut msg = DynamicMessage::new(desc.clone());
    let wrong = |want: &str| {
        JsonError::schema(
            path,
            format!("expected {want} for {name}, got {}", kind_of(value)),
        )
    };
    match name {
        "google.protobuf.Any" => return read_any(desc, value, path).map(Some),
        "google.protobuf.Duration" => {
            let Json::String(s) = value else {
                return Err(wrong("a duration string like \"1.5s\""));
            };
            let d: prost_types::Duration = s.parse().map_err(|_| {
                JsonError::schema(
                    path,
                    format!("invalid duration '{s}' (want e.g. \"0.250s\")"),
                )
            })?;
            set_by_name(&mut msg, "seconds", Value::I64(d.seconds));
            set_by_name(&mut msg, "nanos", Value::I32(d.nanos));
        }
        "google.protobuf.Timestamp" => {
            let Json::String(s) = value else {
                return Err(wrong("an RFC 3339 timestamp"));
            };
            let t: prost_types::Timestamp = s
                .parse()
                .map_err(|_| JsonError::schema(path, format!("invalid timestamp '{s}'")))?;
            set_by_name(&mut msg, "seconds", Value::I64(t.seconds));
            set_by_name(&mut msg, "nanos", Value::I32(t.nanos));
        }
        "google.protobuf.DoubleValue"
        | "google.protobuf.FloatValue"
        | "google.protobuf.Int64Value"
        | "google.protobuf.UInt64Value"
        | "google.protobuf.Int32Value"
        | "google.protobuf.UInt32Value"
        | "google.protobuf.BoolValue"
        | "google.protobuf.StringValue"
        | "google.protobuf.BytesValue" => {
            let field = desc
                .get_field_by_name("value")
                .ok_or_else(|| wrong("a wrapper"))?;
            let v = read_single(&field.kind(), value, path)?;
            msg.set_field(&field, v);
        }
        "google.protobuf.Struct" => {
            let Json::Object(map) = value else {
                return Err(wrong("an object"));
            };
            let field = desc
                .get_field_by_name("fields")
                .ok_or_else(|| wrong("a struct"))?;
            let Kind::Message(entry) = field.kind() else {
                return Err(wrong("a struct"));
            };
            let value_desc = match entry.map_entry_value_field().kind() {
                Kind::Message(m) => m,
                _ => return Err(wrong("a struct")),
            };
            let mut out = std::collections::HashMap::new();
            for (k, v) in map {
                path.push_key(k);
                out.insert(
                    MapKey::String(k.clone()),
                    Value::Message(read_struct_value(&value_desc, v, path)?),
                );
                path.pop();
            }
            msg.set_field(&field, Value::Map(out));
        }
        "google.protobuf.Value" => return read_struct_value(desc, value, path).map(Some),
        "google.protobuf.ListValue" => {
            let Json::Array(items) = value else {
                return Err(wrong("an array"));
            };
            let field = desc
                .get_field_by_name("values")
                .ok_or_else(|| wrong("a list"))?;
            let Kind::Message(value_desc) = field.kind() else {
                return Err(wrong("a list"));
            };
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                path.push_index(i);
                out.push(Value::Message(read_struct_value(&value_desc, item, path)?));
                path.pop();
            }
            msg.set_field(&field, Value::List(out));
        }
        "google.protobuf.FieldMask" => {
            let Json::String(s) = value else {
                return Err(wrong("a comma-separated string"));
            };
            let paths = s
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|p| Value::String(camel_to_snake(p)))
                .collect();
            set_by_name(&mut msg, "paths", Value::List(paths));
        }
        "google.protobuf.Empty" => {
            if !matches!(value, Json::Object(m) if m.is_empty()) {
                return Err(wrong("{}"));
            }
        }
        _ => return Ok(None),
    }
    Ok(Some(msg))
}

/// Well-known types whose JSON form is not an object of fields (inside an Any they sit under "value").
fn has_special_json(name: &str) -> bool {
    matches!(
        name,
        "google.protobuf.Any"
            | "google.protobuf.Duration"
            | "google.protobuf.Timestamp"
            | "google.protobuf.DoubleValue"
            | "google.protobuf.FloatValue"
            | "google.protobuf.Int64Value"
            | "google.protobuf.UInt64Value"
            | "google.protobuf.Int32Value"
            | "google.protobuf.UInt32Value"
            | "google.protobuf.BoolValue"
            | "google.protobuf.StringValue"
            | "google.protobuf.BytesValue"
            | "google.protobuf.Struct"
            | "google.protobuf.Value"
            | "google.protobuf.ListValue"
            | "google.protobuf.FieldMask"
    )
}

fn set_by_name(msg: &mut DynamicMessage, name: &str, value: Value) {
    if let Some(field) = msg.descriptor().get_field_by_name(name) {
        msg.set_field(&field, value);
    }
}

fn camel_to_snake(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn read_struct_value(
    desc: &MessageDescriptor,
    value: &Json,
    path: &mut Path,
) -> Result<DynamicMessage, JsonError> {
    let mut msg = DynamicMessage::new(desc.clone());
    let pool = desc.parent_pool();
    let (field, v) = match value {
        Json::Null => ("null_value", Value::EnumNumber(0)),
        Json::Bool(b) => ("bool_value", Value::Bool(*b)),
        Json::Number(n) => ("number_value", Value::F64(n.as_f64().unwrap_or(f64::NAN))),
        Json::String(s) => ("string_value", Value::String(s.clone())),
        Json::Object(_) => {
            let d = pool
                .get_message_by_name("google.protobuf.Struct")
                .ok_or_else(|| JsonError::UnknownType("google.protobuf.Struct".into()))?;
            (
                "struct_value",
                Value::Message(read_message(&d, value, path)?),
            )
        }
        Json::Array(_) => {
            let d = pool
                .get_message_by_name("google.protobuf.ListValue")
                .ok_or_else(|| JsonError::UnknownType("google.protobuf.ListValue".into()))?;
            ("list_value", Value::Message(read_message(&d, value, path)?))
        }
    };
    set_by_name(&mut msg, field, v);
    Ok(msg)
}

fn read_any(
    desc: &MessageDescriptor,
    value: &Json,
    path: &mut Path,
) -> Result<DynamicMessage, JsonError> {
    let Json::Object(map) = value else {
        return Err(JsonError::schema(
            path,
            format!(
                "expected an object with \"@type\" for an Any, got {}",
                kind_of(value)
            ),
        ));
    };
    let Some(Json::String(type_url)) = map.get("@type") else {
        return Err(JsonError::schema(path, "Any without a string \"@type\""));
    };
    let inner_name = type_name_of_url(type_url);
    let inner_desc = pool()
        .get_message_by_name(inner_name)
        .ok_or_else(|| JsonError::schema(path, format!("unknown @type '{type_url}'")))?;
    let mut rest = map.clone();
    rest.remove("@type");
    let inner = if has_special_json(inner_name) {
        // Well-known types carry their JSON form under "value".
        let payload = rest.remove("value").unwrap_or(Json::Null);
        if let Some(key) = rest.keys().next() {
            return Err(JsonError::schema(
                path,
                format!("unknown field '{key}' next to \"value\" in an Any of {inner_name}"),
            ));
        }
        read_message(&inner_desc, &payload, path)?
    } else {
        read_message(&inner_desc, &Json::Object(rest), path)?
    };
    if TYPED_STRUCT_TYPES.contains(&inner_name) {
        check_typed_struct(&inner, path, &mut |_, _| {})?;
    }
    let mut any = DynamicMessage::new(desc.clone());
    set_by_name(&mut any, "type_url", Value::String(type_url.clone()));
    set_by_name(
        &mut any,
        "value",
        Value::Bytes(inner.encode_to_vec().into()),
    );
    Ok(any)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_pool_is_released_and_built_again_on_use() {
        let held = message_descriptor("envoy.config.listener.v3.Listener").expect("known");
        assert!(!release_idle_pool(Duration::from_secs(3600)), "just used");
        assert!(release_idle_pool(Duration::ZERO), "idle for zero");
        // Descriptors handed out before stay usable; the next lookup builds a new pool.
        assert_eq!(held.full_name(), "envoy.config.listener.v3.Listener");
        let again = message_descriptor("envoy.config.cluster.v3.Cluster").expect("rebuilt");
        assert_eq!(again.full_name(), "envoy.config.cluster.v3.Cluster");
    }
    use crate::envoy::config::cluster::v3::Cluster;
    use crate::envoy::config::listener::v3::Listener;
    use serde_json::json;

    #[test]
    fn duration_and_wrappers() {
        let c: Cluster = from_json(&json!({
            "name": "c", "connectTimeout": "0.250s", "per_connection_buffer_limit_bytes": 32768,
            "type": "STATIC"
        }))
        .expect("cluster parses");
        let d = c.connect_timeout.expect("connect_timeout set");
        assert_eq!((d.seconds, d.nanos), (0, 250_000_000));
        assert_eq!(
            c.per_connection_buffer_limit_bytes.map(|v| v.value),
            Some(32768)
        );
    }

    #[test]
    fn unknown_field_names_its_path() {
        let err = from_json::<Listener>(&json!({
            "name": "l",
            "filter_chains": [{"filters": [{"name": "x", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": "s", "clutser": "typo"}}]}]
        }))
        .expect_err("typo must fail");
        let text = err.to_string();
        assert!(
            text.starts_with("filter_chains[0].filters[0].typed_config.clutser:"),
            "{text}"
        );
    }

    #[test]
    fn unknown_any_type_names_its_path() {
        let err = from_json::<Listener>(&json!({
            "name": "l",
            "listener_filters": [{"name": "x", "typed_config": {"@type": "type.googleapis.com/no.such.Type"}}]
        }))
        .expect_err("unknown type must fail");
        assert_eq!(
            err.to_string(),
            "listener_filters[0].typed_config: unknown @type 'type.googleapis.com/no.such.Type'"
        );
    }

    #[test]
    fn typed_struct_of_known_type_is_checked() {
        let good = json!({
            "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
            "type_url": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
            "value": {"buffer_size_kb": 64}
        });
        any_from_json("google.protobuf.Any", &good).expect("known TypedStruct parses");
        let bad = json!({
            "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
            "type_url": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
            "value": {"buffer_size": 64}
        });
        let err = any_from_json("google.protobuf.Any", &bad).expect_err("bad inner field");
        assert!(err.to_string().contains("value.buffer_size"), "{err}");
    }

    #[test]
    fn oneof_conflict_is_an_error() {
        let err = from_json::<Cluster>(
            &json!({"name": "c", "type": "STATIC", "cluster_type": {"name": "x"}}),
        )
        .expect_err("two oneof members");
        assert!(err.to_string().contains("oneof"), "{err}");
    }

    #[test]
    fn round_trip_keeps_anys() {
        let v = json!({
            "name": "l",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15008}},
            "filter_chains": [{"filters": [{"name": "tcp", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": "s", "cluster": "c", "idle_timeout": "3600s"}}]}]
        });
        let l: Listener = from_json(&v).expect("parses");
        let out = to_json(&l).expect("writes");
        assert_eq!(
            out["filter_chains"][0]["filters"][0]["typed_config"]["cluster"],
            "c"
        );
        assert_eq!(
            out["filter_chains"][0]["filters"][0]["typed_config"]["idle_timeout"],
            "3600s"
        );
        let again: Listener = from_json(&out).expect("re-parses");
        assert_eq!(l, again);
    }

    #[test]
    fn yaml_numeric_keys_become_strings() {
        let v = yaml_to_json("map:\n  8000: a\n").expect("yaml");
        assert_eq!(v["map"]["8000"], "a");
        let err = yaml_to_json("a: [1,\n  b: c").expect_err("broken yaml");
        assert!(
            matches!(err, JsonError::Syntax { line: Some(_), .. }),
            "{err}"
        );
    }
}
