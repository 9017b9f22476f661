//! Typed configs (`google.protobuf.Any`): which extension an Any carries, looking through Istio's
//! `TypedStruct` wrappers, whether it may appear where it is, and decoding it into a prost type
//! from either form (raw Any bytes or a `TypedStruct` Struct).

use prost::Message;
use serde_json::Value as Json;
use waypoint_proto::{google::protobuf::Any, json, udpa::TypedStruct};

use super::{
    CompileResult, ConfigError,
    supported::{self, ExtensionKind},
};

const TYPED_STRUCTS: &[&str] = &["udpa.type.v1.TypedStruct", "xds.type.v3.TypedStruct"];

/// An Any with its effective type resolved.
#[derive(Debug, Clone)]
pub struct Typed<'a> {
    /// The effective message name (the inner `type_url` of a `TypedStruct`).
    pub type_name: String,
    /// Where the payload is.
    payload: Payload<'a>,
}

#[derive(Debug, Clone)]
enum Payload<'a> {
    Bytes(&'a [u8]),
    Struct(Json),
}

impl<'a> Typed<'a> {
    /// Resolves `any` (at `path`).
    pub fn new(any: &'a Any, path: &str) -> CompileResult<Self> {
        let outer = json::type_name_of_url(&any.type_url);
        if !TYPED_STRUCTS.contains(&outer) {
            return Ok(Typed {
                type_name: outer.to_owned(),
                payload: Payload::Bytes(&any.value),
            });
        }
        let ts = TypedStruct::decode(any.value.as_slice())
            .map_err(|e| ConfigError::new(path, format!("TypedStruct does not decode: {e}")))?;
        let value = match ts.value {
            Some(s) => struct_to_json(&s, path)?,
            None => Json::Object(Default::default()),
        };
        Ok(Typed {
            type_name: json::type_name_of_url(&ts.type_url).to_owned(),
            payload: Payload::Struct(value),
        })
    }

    /// Checks that this extension may appear in a position of one of `kinds`; returns its name.
    pub fn check_kind(
        &self,
        kinds: &[ExtensionKind],
        what: &str,
        path: &str,
    ) -> CompileResult<&str> {
        match supported::extension(&self.type_name) {
            Some(rule) if kinds.contains(&rule.kind) => Ok(&self.type_name),
            // stats.PluginConfig is both a network and an HTTP filter.
            Some(rule)
                if rule.type_name == "stats.PluginConfig"
                    && kinds.contains(&ExtensionKind::HttpFilter) =>
            {
                Ok(&self.type_name)
            }
            Some(_) => Err(ConfigError::new(
                path,
                format!("{} is not {what}", self.type_name),
            )),
            None => Err(ConfigError::new(
                path,
                format!(
                    "extension type.googleapis.com/{} is not supported",
                    self.type_name
                ),
            )),
        }
    }

    /// Decodes the payload as message `M` (whose full name is `name`).
    pub fn decode<M: Message + Default>(&self, name: &str, path: &str) -> CompileResult<M> {
        if self.type_name != name {
            return Err(ConfigError::new(
                path,
                format!("expected {name}, got {}", self.type_name),
            ));
        }
        match &self.payload {
            Payload::Bytes(b) => M::decode(*b)
                .map_err(|e| ConfigError::new(path, format!("{name} does not decode: {e}"))),
            Payload::Struct(value) => {
                let dynamic = json::dynamic_from_json(name, value)
                    .map_err(|e| ConfigError::new(field_value(path), e.to_string()))?;
                M::decode(dynamic.encode_to_vec().as_slice())
                    .map_err(|e| ConfigError::new(path, format!("{name} does not decode: {e}")))
            }
        }
    }

    /// The Struct of a struct-only Istio config, as JSON.
    pub fn struct_value(&self, path: &str) -> CompileResult<&Json> {
        match &self.payload {
            Payload::Struct(v) => Ok(v),
            Payload::Bytes(_) => Err(ConfigError::new(
                path,
                format!(
                    "{} is only understood inside a udpa.type.v1.TypedStruct",
                    self.type_name
                ),
            )),
        }
    }

    /// The path of a field inside the payload (`typed_config.value.x` for a TypedStruct).
    pub fn inner_path(&self, path: &str) -> String {
        match self.payload {
            Payload::Bytes(_) => path.to_owned(),
            Payload::Struct(_) => field_value(path),
        }
    }
}

fn field_value(path: &str) -> String {
    super::field(path, "value")
}

/// A `google.protobuf.Struct` as JSON.
pub fn struct_to_json(
    s: &waypoint_proto::google::protobuf::Struct,
    path: &str,
) -> CompileResult<Json> {
    let dynamic = json::decode_dynamic("google.protobuf.Struct", &s.encode_to_vec())
        .map_err(|e| ConfigError::new(path, e.to_string()))?;
    json::dynamic_to_json(&dynamic).map_err(|e| ConfigError::new(path, e.to_string()))
}

/// The required Any at `path`.
pub fn required<'a>(any: Option<&'a Any>, path: &str) -> CompileResult<Typed<'a>> {
    match any {
        Some(a) => Typed::new(a, path),
        None => Err(ConfigError::new(path, "typed_config is required")),
    }
}
