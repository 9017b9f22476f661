//! Header mutations (`HeaderValueOption` lists and `*_headers_to_remove`), with values compiled into
//! substitution formats (`%REQ(x)%`, `%DOWNSTREAM_REMOTE_ADDRESS%` …).

use waypoint_proto::envoy::config::core::v3::{
    HeaderValueOption, header_value_option::HeaderAppendAction,
};

use super::{
    CompileResult, ConfigError, field,
    format::{Format, FormatContext},
    index,
    matchers::header_name,
};

/// What to do when the header exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendAction {
    /// Add another value (or add the header).
    AppendIfExistsOrAdd,
    /// Add only if absent.
    AddIfAbsent,
    /// Replace all values (or add).
    OverwriteIfExistsOrAdd,
    /// Replace only if present.
    OverwriteIfExists,
}

/// One header to set.
#[derive(Debug, Clone)]
pub struct HeaderOp {
    /// Lower-case name.
    pub name: String,
    /// The value, possibly with command operators.
    pub value: Format,
    /// Append / overwrite behaviour.
    pub action: AppendAction,
    /// Set the header even when the value formats to the empty string.
    pub keep_empty_value: bool,
}

impl HeaderOp {
    /// Compiles one `HeaderValueOption`.
    // Deprecated forms are honoured: Istio and older control planes still send them.
    #[allow(deprecated)]
    pub fn compile(o: &HeaderValueOption, path: &str) -> CompileResult<Self> {
        let h = o
            .header
            .as_ref()
            .ok_or_else(|| ConfigError::new(field(path, "header"), "header is required"))?;
        let hpath = field(path, "header");
        let raw;
        let value: &str = if !h.raw_value.is_empty() {
            raw = String::from_utf8(h.raw_value.clone()).map_err(|_| {
                ConfigError::new(field(&hpath, "raw_value"), "raw_value is not UTF-8")
            })?;
            &raw
        } else {
            &h.value
        };
        // The deprecated `append` wins when set, as in Envoy.
        let action = match o.append.as_ref().map(|b| b.value) {
            Some(true) => AppendAction::AppendIfExistsOrAdd,
            Some(false) => AppendAction::OverwriteIfExistsOrAdd,
            None => match HeaderAppendAction::try_from(o.append_action) {
                Ok(HeaderAppendAction::AddIfAbsent) => AppendAction::AddIfAbsent,
                Ok(HeaderAppendAction::OverwriteIfExistsOrAdd) => {
                    AppendAction::OverwriteIfExistsOrAdd
                }
                Ok(HeaderAppendAction::OverwriteIfExists) => AppendAction::OverwriteIfExists,
                _ => AppendAction::AppendIfExistsOrAdd,
            },
        };
        let name = header_name(&h.key, &field(&hpath, "key"))?;
        if name.starts_with(':') || name == "host" {
            return Err(ConfigError::new(
                field(&hpath, "key"),
                format!("'{name}' cannot be modified through header lists"),
            ));
        }
        Ok(HeaderOp {
            name,
            value: Format::parse(value, FormatContext::Header, &field(&hpath, "value"))?,
            action,
            keep_empty_value: o.keep_empty_value,
        })
    }
}

/// Headers to add and to remove, in one direction.
#[derive(Debug, Clone, Default)]
pub struct HeaderMutations {
    /// Added/overwritten, in order.
    pub add: Vec<HeaderOp>,
    /// Removed (lower-case names).
    pub remove: Vec<String>,
}

impl HeaderMutations {
    /// Compiles `path.<add_name>` and `path.<remove_name>`.
    pub fn compile(
        add: &[HeaderValueOption],
        remove: &[String],
        path: &str,
        add_name: &str,
        remove_name: &str,
    ) -> CompileResult<Self> {
        Ok(HeaderMutations {
            add: add
                .iter()
                .enumerate()
                .map(|(i, o)| HeaderOp::compile(o, &index(path, add_name, i)))
                .collect::<CompileResult<_>>()?,
            remove: remove
                .iter()
                .enumerate()
                .map(|(i, n)| header_name(n, &index(path, remove_name, i)))
                .collect::<CompileResult<_>>()?,
        })
    }

    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

/// Request and response mutations of a route, virtual host or route configuration.
#[derive(Debug, Clone, Default)]
pub struct HeaderPolicy {
    /// Applied to the request before it goes upstream.
    pub request: HeaderMutations,
    /// Applied to the response before it goes downstream.
    pub response: HeaderMutations,
}

impl HeaderPolicy {
    /// Compiles the four standard fields of Route/VirtualHost/RouteConfiguration/ClusterWeight.
    pub fn compile(
        request_add: &[HeaderValueOption],
        request_remove: &[String],
        response_add: &[HeaderValueOption],
        response_remove: &[String],
        path: &str,
    ) -> CompileResult<Self> {
        Ok(HeaderPolicy {
            request: HeaderMutations::compile(
                request_add,
                request_remove,
                path,
                "request_headers_to_add",
                "request_headers_to_remove",
            )?,
            response: HeaderMutations::compile(
                response_add,
                response_remove,
                path,
                "response_headers_to_add",
                "response_headers_to_remove",
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use waypoint_proto::envoy::config::core::v3::HeaderValue;

    #[test]
    fn append_action_and_value_format() {
        let op = HeaderOp::compile(
            &HeaderValueOption {
                header: Some(HeaderValue {
                    key: "Baggage".into(),
                    value: "%FILTER_STATE(io.istio.baggage:PLAIN)%".into(),
                    ..Default::default()
                }),
                append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                ..Default::default()
            },
            "headers_to_add[0]",
        )
        .expect("compiles");
        assert_eq!(op.name, "baggage");
        assert_eq!(op.action, AppendAction::OverwriteIfExistsOrAdd);
        assert!(!op.value.is_literal());
    }
}
