//! The HTTP connection manager's data path: route selection, request/response mutation, the router.

pub mod conn_manager;
pub mod cors;
pub mod fault;
pub mod jwt;
pub mod local_ratelimit;
pub mod mirror;
pub mod request;
pub mod retry;
pub mod route_select;
pub mod router;
pub mod stream_info;
pub mod timeout;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};

/// Errors inside bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request and response on the data path.
pub type Body = BoxBody<Bytes, BoxError>;

/// A body from bytes.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// An empty body.
pub fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}
