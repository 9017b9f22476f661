//! The HTTP connection manager's data path: route selection, request/response mutation, the router.

pub mod conn_manager;
pub mod cors;
pub mod fault;
pub mod jwks_fetch;
pub mod jwt;
pub mod local_ratelimit;
pub mod mirror;
pub mod request;
pub mod retry;
pub mod route_select;
pub mod router;
pub mod stream_info;
pub mod timeout;

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::{Body as HttpBody, Frame, SizeHint};

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

/// What watches a request body as the upstream side reads it (the HCM's stream timers, the
/// stream's byte and message counters).
pub(crate) trait RequestObserver: Send + Sync + Unpin + 'static {
    /// A data frame went by.
    fn data(&mut self, _data: &Bytes) {}
    /// A frame went by that was not the body's last.
    fn progress(&mut self) {}
    /// The body ended (may be called twice: at its last frame and at the end of the stream).
    fn end(&mut self);
}

/// Wraps a request `body` so `observer` sees its frames and its end; an already finished body
/// is ended at once and left unwrapped.
pub(crate) fn observe_request_body<O: RequestObserver>(body: Body, mut observer: O) -> Body {
    if body.is_end_stream() {
        observer.end();
        return body;
    }
    BoxBody::new(ObservedRequest {
        inner: body,
        observer,
    })
}

/// A request body passing its frames to a [`RequestObserver`].
struct ObservedRequest<O> {
    inner: Body,
    observer: O,
}

impl<O: RequestObserver> HttpBody for ObservedRequest<O> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // Both fields are Unpin (a boxed body and a plain observer).
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.observer.data(d);
                }
                if this.inner.is_end_stream() {
                    this.observer.end();
                } else {
                    this.observer.progress();
                }
            }
            Poll::Ready(None) => this.observer.end(),
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
