//! Retries with Envoy's semantics: which responses and failures are retriable (`retry_on`), the
//! fully jittered exponential back-off, and a bounded replay buffer for request bodies (a request
//! whose body outgrew the buffer, or was still streaming when its attempt failed, is not retried).

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::{Body, BoxError, route_select::RequestView, timeout::Expired};
use crate::{config::route::RetryPolicy, flags::ProxyError, upstream::pool::REFUSED_STREAM};

/// How much of a request body is kept for replay (Envoy's default buffer limit is 1 MiB per
/// connection; we keep at most this much per request).
pub const REPLAY_LIMIT: usize = 1024 * 1024;

fn has(policy: &RetryPolicy, cond: &str) -> bool {
    policy.retry_on.iter().any(|c| c == cond)
}

/// Whether a response asks for a retry under `policy`.
pub fn retriable_response(policy: &RetryPolicy, status: StatusCode, headers: &HeaderMap) -> bool {
    let code = status.as_u16();
    if has(policy, "5xx") && code >= 500 {
        return true;
    }
    if has(policy, "gateway-error") && matches!(code, 502..=504) {
        return true;
    }
    if has(policy, "retriable-4xx") && code == 409 {
        return true;
    }
    if has(policy, "retriable-status-codes")
        && policy.retriable_status_codes.contains(&u32::from(code))
    {
        return true;
    }
    if has(policy, "envoy-ratelimited") && headers.contains_key("x-envoy-ratelimited") {
        return true;
    }
    if has(policy, "retriable-headers")
        && policy
            .retriable_headers
            .iter()
            .any(|m| header_matches(m, headers))
    {
        return true;
    }
    // gRPC trailers-only responses carry grpc-status in the headers.
    if let Some(g) = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
    {
        let cond = match g {
            1 => "cancelled",
            4 => "deadline-exceeded",
            8 => "resource-exhausted",
            13 => "internal",
            14 => "unavailable",
            _ => return false,
        };
        return has(policy, cond);
    }
    false
}

/// Whether a failure before a response asks for a retry; `unsent` when the request never left.
pub fn retriable_error(policy: &RetryPolicy, e: &ProxyError, unsent: bool) -> bool {
    let any_reset = has(policy, "5xx") || has(policy, "gateway-error") || has(policy, "reset");
    match e {
        ProxyError::ConnectFailure(_) => {
            any_reset || has(policy, "connect-failure") || has(policy, "reset-before-request")
        }
        ProxyError::UpstreamReset(reason) => {
            any_reset
                || (unsent && has(policy, "reset-before-request"))
                || (reason.starts_with(REFUSED_STREAM) && has(policy, "refused-stream"))
        }
        // A per-try (or per-try idle) timeout is a local reset that Envoy retries under these
        // three only. The route timeout ends the request before this is asked.
        ProxyError::Timeout
        | ProxyError::StreamTimeout {
            kind: Expired::PerTry | Expired::PerTryIdle,
            ..
        } => any_reset,
        // The cluster's `max_stream_duration` resets the upstream stream: retried as a reset.
        ProxyError::StreamTimeout {
            kind: Expired::UpstreamDuration,
            ..
        } => any_reset,
        _ => false,
    }
}

/// Whether the request may be retried at all (`retriable_request_headers`).
pub fn request_retriable(policy: &RetryPolicy, req: &RequestView<'_>) -> bool {
    policy.retriable_request_headers.is_empty()
        || policy
            .retriable_request_headers
            .iter()
            .any(|m| header_matches(m, req.headers))
}

/// A header matcher over a header map (several values joined with `,`, as Envoy does).
fn header_matches(m: &crate::config::matchers::HeaderMatch, headers: &HeaderMap) -> bool {
    let mut values = headers
        .get_all(m.name.as_str())
        .iter()
        .filter_map(|v| v.to_str().ok());
    let joined = match (values.next(), values.next()) {
        (None, _) => None,
        (Some(one), None) => Some(std::borrow::Cow::Borrowed(one)),
        (Some(a), Some(b)) => {
            let mut s = format!("{a},{b}");
            for v in values {
                s.push(',');
                s.push_str(v);
            }
            Some(std::borrow::Cow::Owned(s))
        }
    };
    m.matches(joined.as_deref())
}

/// Back-off before retry `n` (1-based): uniform in `[0, min(base·2^(n-1), max))`, Envoy's fully
/// jittered exponential back-off (`random % interval`).
pub fn backoff(policy: &RetryPolicy, n: u32, random: u64) -> Duration {
    let (base, max) = policy.back_off;
    let cap = base
        .checked_mul(
            1u32.checked_shl(n.saturating_sub(1).min(20))
                .unwrap_or(u32::MAX),
        )
        .unwrap_or(max)
        .min(max);
    let nanos = cap.as_nanos().min(u128::from(u64::MAX)) as u64;
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(random % nanos)
}

#[derive(Default)]
struct ReplayState {
    frames: Vec<Bytes>,
    size: usize,
    overflow: bool,
    complete: bool,
}

/// A request body that keeps a copy (up to [`REPLAY_LIMIT`]) while it streams.
pub struct ReplayBody {
    inner: Body,
    state: Arc<Mutex<ReplayState>>,
}

/// The handle that rebuilds the body for another attempt.
#[derive(Clone)]
pub struct Replay {
    state: Arc<Mutex<ReplayState>>,
}

impl ReplayBody {
    /// Wraps `inner`.
    pub fn wrap(inner: Body) -> (Body, Replay) {
        let state = Arc::new(Mutex::new(ReplayState {
            complete: inner.is_end_stream(),
            ..ReplayState::default()
        }));
        let body = ReplayBody {
            inner,
            state: state.clone(),
        };
        (http_body_util::BodyExt::boxed(body), Replay { state })
    }
}

impl Replay {
    /// A fresh copy of the whole body, if it was fully seen and fit the buffer.
    pub fn body(&self) -> Option<Body> {
        let s = match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        if s.overflow || !s.complete {
            return None;
        }
        let frames = s.frames.clone();
        let stream = futures::stream::iter(
            frames
                .into_iter()
                .map(|b| Ok::<_, BoxError>(Frame::data(b))),
        );
        Some(http_body_util::BodyExt::boxed(
            http_body_util::StreamBody::new(stream),
        ))
    }
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let mut s = match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !s.overflow {
                        if s.size + data.len() > REPLAY_LIMIT {
                            s.overflow = true;
                            s.frames.clear();
                        } else {
                            s.size += data.len();
                            s.frames.push(data.clone());
                        }
                    }
                } else {
                    // Trailers are not replayed.
                    s.overflow = true;
                }
                if self.inner.is_end_stream() {
                    s.complete = true;
                }
            }
            Poll::Ready(None) => s.complete = true,
            Poll::Ready(Some(Err(_))) => s.overflow = true,
            Poll::Pending => {}
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

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::*;

    fn policy(on: &[&str]) -> RetryPolicy {
        RetryPolicy {
            retry_on: on.iter().map(|s| (*s).to_owned()).collect(),
            num_retries: 2,
            per_try_timeout: None,
            per_try_idle_timeout: None,
            avoid_previous_hosts: false,
            host_selection_retry_max_attempts: 1,
            retry_priority: None,
            retriable_status_codes: vec![418],
            back_off: (Duration::from_millis(25), Duration::from_millis(250)),
            retriable_headers: vec![],
            retriable_request_headers: vec![],
        }
    }

    #[test]
    fn istio_default_policy_retries_connect_failures_and_refused_streams_only() {
        // istiod's waypoint route: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
        let p = policy(&[
            "connect-failure",
            "refused-stream",
            "unavailable",
            "cancelled",
            "retriable-status-codes",
        ]);
        let none = HeaderMap::new();
        assert!(retriable_error(
            &p,
            &ProxyError::ConnectFailure("x".into()),
            true
        ));
        assert!(retriable_error(
            &p,
            &ProxyError::UpstreamReset(format!("{REFUSED_STREAM}: x")),
            false
        ));
        assert!(!retriable_error(
            &p,
            &ProxyError::UpstreamReset("reset".into()),
            false
        ));
        assert!(!retriable_response(
            &p,
            StatusCode::SERVICE_UNAVAILABLE,
            &none
        ));
        assert!(retriable_response(&p, StatusCode::IM_A_TEAPOT, &none));
        let mut grpc = HeaderMap::new();
        grpc.insert("grpc-status", "14".parse().expect("v"));
        assert!(retriable_response(&p, StatusCode::OK, &grpc));
        grpc.insert("grpc-status", "13".parse().expect("v"));
        assert!(!retriable_response(&p, StatusCode::OK, &grpc));
    }

    #[test]
    fn five_xx_covers_responses_resets_and_timeouts() {
        let p = policy(&["5xx"]);
        assert!(retriable_response(
            &p,
            StatusCode::INTERNAL_SERVER_ERROR,
            &HeaderMap::new()
        ));
        assert!(!retriable_response(
            &p,
            StatusCode::NOT_FOUND,
            &HeaderMap::new()
        ));
        assert!(retriable_error(
            &p,
            &ProxyError::UpstreamReset("r".into()),
            false
        ));
        assert!(retriable_error(&p, &ProxyError::Timeout, false));
        // The per-try timers are retried under the same conditions; connect-failure alone does
        // not cover them.
        for kind in [Expired::PerTry, Expired::PerTryIdle] {
            let e = ProxyError::StreamTimeout {
                kind,
                request_complete: true,
            };
            assert!(retriable_error(&p, &e, false), "{kind:?}");
            assert!(retriable_error(&policy(&["reset"]), &e, false), "{kind:?}");
            assert!(
                !retriable_error(&policy(&["connect-failure"]), &e, false),
                "{kind:?}"
            );
        }
        let g = policy(&["gateway-error"]);
        assert!(!retriable_response(
            &g,
            StatusCode::INTERNAL_SERVER_ERROR,
            &HeaderMap::new()
        ));
        assert!(retriable_response(
            &g,
            StatusCode::BAD_GATEWAY,
            &HeaderMap::new()
        ));
        let r = policy(&["reset-before-request"]);
        assert!(retriable_error(
            &r,
            &ProxyError::UpstreamReset("r".into()),
            true
        ));
        assert!(!retriable_error(
            &r,
            &ProxyError::UpstreamReset("r".into()),
            false
        ));
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let p = policy(&["5xx"]);
        for n in 1..10 {
            for r in [0u64, 1, u64::MAX / 3, u64::MAX] {
                assert!(backoff(&p, n, r) <= Duration::from_millis(250));
            }
        }
        assert!(backoff(&p, 1, u64::MAX) < Duration::from_millis(25));
        // Envoy's `random % interval`: the interval doubles per retry up to the cap.
        let ms = 1_000_000u64;
        assert_eq!(backoff(&p, 1, 24 * ms), Duration::from_millis(24));
        assert_eq!(backoff(&p, 1, 25 * ms), Duration::ZERO);
        assert_eq!(backoff(&p, 2, 49 * ms), Duration::from_millis(49));
        assert_eq!(backoff(&p, 5, 249 * ms), Duration::from_millis(249));
        assert_eq!(backoff(&p, 5, 250 * ms), Duration::ZERO);
    }

    #[tokio::test]
    async fn bodies_are_replayed_when_complete_and_small() {
        let (body, replay) = ReplayBody::wrap(super::super::full("hello"));
        assert!(replay.body().is_none(), "not yet streamed");
        let first = body.collect().await.expect("body").to_bytes();
        assert_eq!(&first[..], b"hello");
        let again = replay
            .body()
            .expect("replay")
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(&again[..], b"hello");
        let big = vec![7u8; REPLAY_LIMIT + 1];
        let (body, replay) = ReplayBody::wrap(super::super::full(big));
        let _ = body.collect().await.expect("body");
        assert!(replay.body().is_none(), "over the limit");
    }
}
