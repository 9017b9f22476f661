//! The upstream HTTP/1.1 client codec: one request at a time on a connection, driven by the task
//! of the request that uses it. (hyper's client runs each connection as a task of its own and
//! passes the request, the response and every body chunk between the two tasks: an exchange then
//! costs several task wake-ups. Here the request's own task writes the request and reads the
//! response, and the response body reads straight from the socket.)
//!
//! What goes out and what is accepted, as Envoy's HTTP/1 codec does upstream:
//! - the request is sent as `HTTP/1.1` with its headers in order, framed by its `content-length`
//!   (the header, or the body's exact size) or else chunked; request trailers are dropped (Envoy's
//!   default, `enable_trailers` off).
//! - the response head is parsed by httparse, within 100 headers and 60 KiB (Envoy's
//!   `max_headers_count` and `max_response_headers_kb` defaults); informational responses other
//!   than 101 are skipped. Framing as RFC 9112 §6.3 has it: none after `HEAD` or for 204/304;
//!   chunked when `transfer-encoding` ends in `chunked` (trailers are delivered); else
//!   `content-length` (conflicting values are an error); else until the connection closes.
//! - the request body keeps going while the response streams (a server may answer before it has
//!   read the request). A write failure after the response started only stops the request; once
//!   the response ended, whatever of the request is left is not sent and the connection closes.
//! - the connection is reusable when both messages ended cleanly, the response did not ask to
//!   close (`connection: close`, or HTTP/1.0 without `keep-alive`) and nothing followed it.

use std::{
    fmt::Write as _,
    io,
    mem::MaybeUninit,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version, header,
    response,
};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::AsyncWrite;

use crate::{
    http::{Body, BoxError},
    listener::conn::BoxIo,
};

/// Most headers a response (or its trailers) may carry (Envoy's `max_headers_count` default).
pub const MAX_HEADERS: usize = 100;
/// Largest response head (Envoy's `max_response_headers_kb` default, 60 KiB).
pub const MAX_HEAD: usize = 60 * 1024;
/// The first read's buffer; later reads grow up to [`MAX_READ`] while they fill it.
const READ_CHUNK: usize = 8 * 1024;
const MAX_READ: usize = 64 * 1024;
/// Largest buffer an idle connection keeps.
const KEEP_BUFFER: usize = 16 * 1024;
/// Longest chunk-size line (size and extensions).
const MAX_CHUNK_LINE: usize = 4096;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the connection failed.
    #[error("connection termination: {0}")]
    Io(#[from] io::Error),
    /// The server closed the connection before the response was complete.
    #[error("connection termination: closed {0}")]
    Closed(&'static str),
    /// The response is not valid HTTP/1.1.
    #[error("malformed HTTP/1.1 response: {0}")]
    Parse(String),
    /// The request cannot be sent as it is.
    #[error("request: {0}")]
    Request(String),
    /// The request body failed (the downstream went away).
    #[error("request body: {0}")]
    RequestBody(BoxError),
}

impl Error {
    /// The server spoke badly (else the connection or the request failed).
    pub fn is_protocol(&self) -> bool {
        matches!(self, Error::Parse(_))
    }
}

/// An open HTTP/1.1 connection and what the pool keeps with it (its `state`). Boxed once per
/// connection: an exchange, moved through the request's futures, is then a pointer and a few
/// words, and its request head (kept for a resend) lives in the box too.
pub struct Conn<S> {
    inner: Box<Inner<S>>,
}

struct Inner<S> {
    io: BoxIo,
    rbuf: BytesMut,
    wbuf: BytesMut,
    read_chunk: usize,
    /// The request of the exchange under way, while it could be sent again unchanged.
    resend: Option<http::request::Parts>,
    state: S,
}

impl<S> Conn<S> {
    /// A connection over `io`.
    pub fn new(io: BoxIo, state: S) -> Self {
        Conn {
            inner: Box::new(Inner {
                io,
                rbuf: BytesMut::new(),
                wbuf: BytesMut::new(),
                read_chunk: READ_CHUNK,
                resend: None,
                state,
            }),
        }
    }

    /// The pool's bookkeeping.
    pub fn state(&self) -> &S {
        &self.inner.state
    }

    /// The pool's bookkeeping, to change.
    pub fn state_mut(&mut self) -> &mut S {
        &mut self.inner.state
    }

    /// The transport, for a connection handed to another codec (upgrades). `None` when bytes
    /// were read that the other codec would miss.
    pub fn into_io(self) -> Option<(BoxIo, S)> {
        let inner = *self.inner;
        inner.rbuf.is_empty().then_some((inner.io, inner.state))
    }

    /// Whether an idle connection can take a request: the server has neither closed it nor sent
    /// anything. Reads with `cx`, whose waker is woken if either happens later.
    pub fn poll_usable(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.inner.rbuf.is_empty() {
            return false;
        }
        matches!(self.poll_fill(cx), Poll::Pending)
    }

    /// Reads what the socket has into `rbuf`; `Ok(0)` at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let spare = self.inner.rbuf.capacity() - self.inner.rbuf.len();
        if spare < 1024 {
            self.inner.rbuf.reserve(self.inner.read_chunk);
        }
        let spare = self.inner.rbuf.capacity() - self.inner.rbuf.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.inner.io),
            cx,
            &mut self.inner.rbuf
        ))?;
        // A read that filled the buffer asks for a larger one next time (large bodies).
        if n == spare && self.inner.read_chunk < MAX_READ {
            self.inner.read_chunk *= 2;
        }
        Poll::Ready(Ok(n))
    }
}

/// How the request body is framed.
#[derive(Debug, Clone, Copy)]
enum Sending {
    /// `content-length`: bytes still to send.
    Length(u64),
    Chunked,
}

/// How the response body is framed, and where its reading is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    Head,
    /// Bytes still to read.
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    Trailers,
    /// Until the server closes.
    Eof,
    Done,
}

/// A request on a connection and its response, from the first byte written to the last read.
pub struct Exchange<S> {
    conn: Conn<S>,
    /// The request body still to send (`None` once it ended, or was abandoned).
    body: Option<Body>,
    sending: Sending,
    /// Everything is written and flushed.
    sent: bool,
    /// Writing failed: nothing more is sent and the connection is not reused.
    write_failed: Option<io::Error>,
    unflushed: bool,
    reading: Reading,
    head_request: bool,
    keep_alive: bool,
}

/// A failed exchange, and the request when it can be sent again as it was.
pub struct Failure {
    /// Why.
    pub error: Error,
    /// The request, when the server closed the reused connection before reading it.
    pub request: Option<Request<Body>>,
}

impl<S> Exchange<S> {
    /// Starts sending `req` on `conn`. With `resend`, a request without a body and with an
    /// idempotent method (RFC 9110 §9.2.2) is kept, and given back in the [`Failure`] if the
    /// server closes the connection without a byte of response: a reused connection that the
    /// server closed as the request went out (the keep-alive race), so the request can go out
    /// again on another connection.
    #[allow(clippy::result_large_err)]
    pub fn start(mut conn: Conn<S>, req: Request<Body>, resend: bool) -> Result<Self, Failure> {
        let (parts, body) = req.into_parts();
        conn.inner.read_chunk = READ_CHUNK;
        let end = body.is_end_stream();
        let head_request = parts.method == Method::HEAD;
        let declared = match parts.headers.get(header::CONTENT_LENGTH) {
            Some(v) => match v.to_str().ok().and_then(|s| digits(s.trim())) {
                Some(n) => Some(n),
                None => {
                    return Err(Failure {
                        error: Error::Request("content-length is not a number".into()),
                        request: None,
                    });
                }
            },
            None => None,
        };
        let out = &mut conn.inner.wbuf;
        out.clear();
        out.reserve(256);
        out.put_slice(parts.method.as_str().as_bytes());
        out.put_u8(b' ');
        match (parts.uri.authority(), parts.uri.path_and_query()) {
            (Some(a), None) => out.put_slice(a.as_str().as_bytes()),
            (_, Some(pq)) => out.put_slice(pq.as_str().as_bytes()),
            (None, None) => out.put_u8(b'/'),
        }
        out.put_slice(b" HTTP/1.1\r\n");
        for (name, value) in &parts.headers {
            out.put_slice(name.as_str().as_bytes());
            out.put_slice(b": ");
            out.put_slice(value.as_bytes());
            out.put_slice(b"\r\n");
        }
        let sending = match (declared, body.size_hint().exact()) {
            (Some(n), _) => Sending::Length(n),
            (None, Some(n)) => {
                if n > 0 || expects_body(&parts.method) {
                    // Writing into a BytesMut does not fail.
                    let _ = write!(out, "content-length: {n}\r\n");
                }
                Sending::Length(n)
            }
            (None, None) => {
                out.put_slice(b"transfer-encoding: chunked\r\n");
                Sending::Chunked
            }
        };
        out.put_slice(b"\r\n");
        let idempotent = matches!(
            parts.method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
        let mut ex = Exchange {
            conn,
            body: Some(body),
            sending,
            sent: false,
            write_failed: None,
            unflushed: false,
            reading: Reading::Head,
            head_request,
            keep_alive: true,
        };
        ex.conn.inner.resend = (resend && end && idempotent).then_some(parts);
        if end && let Err(error) = ex.end_body() {
            return Err(ex.fail(error));
        }
        Ok(ex)
    }

    fn fail(&mut self, error: Error) -> Failure {
        let retriable = matches!(error, Error::Io(_) | Error::Closed(_));
        Failure {
            request: self
                .conn
                .inner
                .resend
                .take()
                .filter(|_| retriable)
                .map(|p| Request::from_parts(p, crate::http::empty())),
            error,
        }
    }

    /// Frames one chunk of the request body.
    fn encode(&mut self, data: Bytes) -> Result<(), Error> {
        let out = &mut self.conn.inner.wbuf;
        match &mut self.sending {
            Sending::Length(left) => {
                let n = data.len() as u64;
                if n > *left {
                    return Err(Error::Request(
                        "the body is longer than its content-length".into(),
                    ));
                }
                *left -= n;
                out.put_slice(&data);
            }
            Sending::Chunked if data.is_empty() => {}
            Sending::Chunked => {
                // Writing into a BytesMut does not fail.
                let _ = write!(out, "{:x}\r\n", data.len());
                out.put_slice(&data);
                out.put_slice(b"\r\n");
            }
        }
        Ok(())
    }

    /// The request body ended.
    fn end_body(&mut self) -> Result<(), Error> {
        self.body = None;
        match self.sending {
            Sending::Length(0) => Ok(()),
            Sending::Length(_) => Err(Error::Request(
                "the body is shorter than its content-length".into(),
            )),
            Sending::Chunked => {
                self.conn.inner.wbuf.put_slice(b"0\r\n\r\n");
                Ok(())
            }
        }
    }

    /// Sends what there is of the request: `Ready(Ok)` once all of it is written and flushed.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            while !self.conn.inner.wbuf.is_empty() {
                match Pin::new(&mut self.conn.inner.io).poll_write(cx, &self.conn.inner.wbuf) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(Error::Io(io::ErrorKind::WriteZero.into())));
                    }
                    Poll::Ready(Ok(n)) => {
                        self.conn.inner.wbuf.advance(n);
                        self.unflushed = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Error::Io(e))),
                    Poll::Pending => return Poll::Pending,
                }
            }
            let Some(body) = self.body.as_mut() else {
                if self.unflushed {
                    ready!(Pin::new(&mut self.conn.inner.io).poll_flush(cx))?;
                    self.unflushed = false;
                }
                return Poll::Ready(Ok(()));
            };
            match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let end = body.is_end_stream();
                    // Trailers are dropped, as Envoy's codec does without `enable_trailers`.
                    if let Ok(data) = frame.into_data() {
                        self.encode(data)?;
                    }
                    if end {
                        self.end_body()?;
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(Error::RequestBody(e))),
                Poll::Ready(None) => self.end_body()?,
                Poll::Pending => {
                    // Waiting for the body: what was written must reach the server meanwhile.
                    if self.unflushed
                        && let Poll::Ready(r) = Pin::new(&mut self.conn.inner.io).poll_flush(cx)
                    {
                        r?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Moves the request along unless it is done; a connection failure only stops it (the
    /// response may still come), a failed request body fails the exchange.
    fn poll_request(&mut self, cx: &mut Context<'_>) -> Result<(), Error> {
        if self.sent || self.write_failed.is_some() {
            return Ok(());
        }
        match self.poll_send(cx) {
            Poll::Ready(Ok(())) => self.sent = true,
            Poll::Ready(Err(Error::Io(e))) => {
                self.write_failed = Some(e);
                self.keep_alive = false;
                self.body = None;
            }
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => {}
        }
        Ok(())
    }

    /// The response head.
    pub fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<response::Parts, Failure>> {
        loop {
            if let Err(e) = self.poll_request(cx) {
                return Poll::Ready(Err(self.fail(e)));
            }
            if !self.conn.inner.rbuf.is_empty() {
                match self.parse_head() {
                    Ok(Some(head)) => return Poll::Ready(Ok(head)),
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Err(self.fail(e))),
                }
            }
            match self.conn.poll_fill(cx) {
                Poll::Ready(Ok(0)) => {
                    let e = match self.write_failed.take() {
                        Some(e) => Error::Io(e),
                        None => Error::Closed("before the response started"),
                    };
                    return Poll::Ready(Err(self.fail(e)));
                }
                Poll::Ready(Ok(_)) => {
                    // A byte of response: the request was read, it is not sent again.
                    self.conn.inner.resend = None;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(self.fail(Error::Io(e)))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Parses the response head from the buffer: `None` while it is incomplete.
    fn parse_head(&mut self) -> Result<Option<response::Parts>, Error> {
        loop {
            // Uninitialised slots: a hundred empty headers would be written on every response.
            let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut []);
            let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut parsed,
                &self.conn.inner.rbuf,
                &mut slots,
            ) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) if self.conn.inner.rbuf.len() > MAX_HEAD => {
                    return Err(Error::Parse(format!("head over {MAX_HEAD} bytes")));
                }
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(e) => return Err(Error::Parse(e.to_string())),
            };
            if len > MAX_HEAD {
                return Err(Error::Parse(format!("head over {MAX_HEAD} bytes")));
            }
            let status = parsed
                .code
                .and_then(|c| StatusCode::from_u16(c).ok())
                .ok_or_else(|| Error::Parse("bad status code".into()))?;
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(Error::Parse("101 to a request that did not upgrade".into()));
            }
            if status.is_informational() {
                // 100 Continue, 102, 103: the final response follows.
                self.conn.inner.rbuf.advance(len);
                continue;
            }
            let version = match parsed.version {
                Some(0) => Version::HTTP_10,
                _ => Version::HTTP_11,
            };
            // Header values are slices of the head's bytes, not copies.
            let base = self.conn.inner.rbuf.as_ptr() as usize;
            let mut found = Vec::with_capacity(parsed.headers.len());
            for h in parsed.headers.iter() {
                let name = HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| Error::Parse(format!("bad header name {:?}", h.name)))?;
                let start = h.value.as_ptr() as usize - base;
                found.push((name, start, start + h.value.len()));
            }
            let head = self.conn.inner.rbuf.split_to(len).freeze();
            // Room for what the router adds on the way down (`server`,
            // `x-envoy-upstream-service-time`, ...): growing the map reallocates it.
            let mut headers = HeaderMap::with_capacity(found.len() + 8);
            for (name, start, end) in found {
                let value = HeaderValue::from_maybe_shared(head.slice(start..end))
                    .map_err(|_| Error::Parse(format!("bad value of header {name}")))?;
                headers.append(name, value);
            }
            self.frame_response(status, version, &headers)?;
            self.conn.inner.resend = None;
            let mut resp = Response::new(());
            *resp.status_mut() = status;
            *resp.version_mut() = version;
            *resp.headers_mut() = headers;
            return Ok(Some(resp.into_parts().0));
        }
    }

    /// Decides how the response body is framed and whether the connection stays open.
    fn frame_response(
        &mut self,
        status: StatusCode,
        version: Version,
        headers: &HeaderMap,
    ) -> Result<(), Error> {
        let (mut close, mut keep) = (false, false);
        for v in headers.get_all(header::CONNECTION) {
            for t in v.to_str().unwrap_or("").split(',') {
                let t = t.trim();
                close |= t.eq_ignore_ascii_case("close");
                keep |= t.eq_ignore_ascii_case("keep-alive");
            }
        }
        self.keep_alive &= !close && (version == Version::HTTP_11 || keep);
        let content_length = || -> Result<Option<u64>, Error> {
            let mut length = None;
            for v in headers.get_all(header::CONTENT_LENGTH) {
                for t in v.to_str().unwrap_or("").split(',') {
                    let n = digits(t.trim())
                        .ok_or_else(|| Error::Parse(format!("content-length {t:?}")))?;
                    if length.is_some_and(|l| l != n) {
                        return Err(Error::Parse("conflicting content-length values".into()));
                    }
                    length = Some(n);
                }
            }
            Ok(length)
        };
        self.reading = if self.head_request
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Reading::Length(0)
        } else if let Some(te) = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
        {
            // Both framings, or a transfer coding in HTTP/1.0: the body's end is in doubt. Envoy
            // refuses such a response (`allow_chunked_length` off).
            if headers.contains_key(header::CONTENT_LENGTH) {
                return Err(Error::Parse(
                    "both transfer-encoding and content-length".into(),
                ));
            }
            if version == Version::HTTP_10 {
                return Err(Error::Parse("transfer-encoding in HTTP/1.0".into()));
            }
            let last = te.to_str().unwrap_or("").rsplit(',').next().unwrap_or("");
            if last.trim().eq_ignore_ascii_case("chunked") {
                Reading::ChunkSize
            } else {
                self.keep_alive = false;
                Reading::Eof
            }
        } else if let Some(n) = content_length()? {
            Reading::Length(n)
        } else {
            self.keep_alive = false;
            Reading::Eof
        };
        if self.reading == Reading::Length(0) {
            self.reading = Reading::Done;
        }
        Ok(())
    }

    /// The next frame of the response body.
    pub fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        loop {
            if let Err(e) = self.poll_request(cx) {
                self.keep_alive = false;
                return Poll::Ready(Some(Err(e)));
            }
            let rbuf = &mut self.conn.inner.rbuf;
            match self.reading {
                Reading::Done | Reading::Head => return Poll::Ready(None),
                Reading::Length(left) | Reading::ChunkData(left) if !rbuf.is_empty() => {
                    let n = left.min(rbuf.len() as u64);
                    let data = rbuf.split_to(n as usize).freeze();
                    self.reading = match (self.reading, left - n) {
                        (Reading::Length(_), 0) => Reading::Done,
                        (Reading::Length(_), l) => Reading::Length(l),
                        (_, 0) => Reading::ChunkEnd,
                        (_, l) => Reading::ChunkData(l),
                    };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Reading::Eof if !rbuf.is_empty() => {
                    return Poll::Ready(Some(Ok(Frame::data(rbuf.split().freeze()))));
                }
                Reading::ChunkSize => match chunk_size(rbuf) {
                    Ok(Some(0)) => {
                        self.reading = Reading::Trailers;
                        continue;
                    }
                    Ok(Some(n)) => {
                        self.reading = Reading::ChunkData(n);
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Some(Err(self.broken(e)))),
                },
                Reading::ChunkEnd if rbuf.len() >= 2 => {
                    if &rbuf[..2] != b"\r\n" {
                        let e = Error::Parse("chunk data not followed by CRLF".into());
                        return Poll::Ready(Some(Err(self.broken(e))));
                    }
                    rbuf.advance(2);
                    self.reading = Reading::ChunkSize;
                    continue;
                }
                Reading::Trailers => match trailers(rbuf) {
                    Ok(Some(t)) => {
                        self.reading = Reading::Done;
                        match t {
                            Some(t) => return Poll::Ready(Some(Ok(Frame::trailers(t)))),
                            None => return Poll::Ready(None),
                        }
                    }
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Some(Err(self.broken(e)))),
                },
                _ => {}
            }
            match ready!(self.conn.poll_fill(cx)) {
                Ok(0) if self.reading == Reading::Eof => {
                    self.reading = Reading::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    let e = Error::Closed("before the response ended");
                    return Poll::Ready(Some(Err(self.broken(e))));
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(self.broken(Error::Io(e))))),
            }
        }
    }

    fn broken(&mut self, e: Error) -> Error {
        self.keep_alive = false;
        self.reading = Reading::Done;
        e
    }

    /// Whether the response body has ended.
    pub fn is_end_stream(&self) -> bool {
        self.reading == Reading::Done
    }

    /// What is left of the response body.
    pub fn size_hint(&self) -> SizeHint {
        match self.reading {
            Reading::Done => SizeHint::with_exact(0),
            Reading::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }

    /// The connection, if it can take another request: both messages ended, neither side
    /// asked to close, and nothing followed the response.
    pub fn into_reusable(mut self) -> Option<Conn<S>> {
        if !(self.reading == Reading::Done
            && self.sent
            && self.keep_alive
            && self.conn.inner.rbuf.is_empty())
        {
            return None;
        }
        // An idle connection does not keep what a large body made its buffers grow to.
        let inner = &mut self.conn.inner;
        if inner.wbuf.capacity() > KEEP_BUFFER {
            inner.wbuf = BytesMut::new();
        }
        if inner.rbuf.capacity() > KEEP_BUFFER {
            inner.rbuf = BytesMut::new();
        }
        Some(self.conn)
    }
}

/// Whether a request with this method carries a body, so that an empty one is announced with
/// `content-length: 0` (a server would otherwise wait for it).
fn expects_body(m: &Method) -> bool {
    !matches!(
        *m,
        Method::GET
            | Method::HEAD
            | Method::DELETE
            | Method::OPTIONS
            | Method::TRACE
            | Method::CONNECT
    )
}

/// A decimal number of digits only (`u64::from_str` also takes a `+`).
fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses a chunk-size line (`1a;ext=1\r\n`) off the front of `buf`: `None` while incomplete.
fn chunk_size(buf: &mut BytesMut) -> Result<Option<u64>, Error> {
    let Some(lf) = buf.iter().take(MAX_CHUNK_LINE).position(|&b| b == b'\n') else {
        if buf.len() >= MAX_CHUNK_LINE {
            return Err(Error::Parse("chunk size line too long".into()));
        }
        return Ok(None);
    };
    let line = buf
        .get(..lf)
        .and_then(|l| l.strip_suffix(b"\r"))
        .ok_or_else(|| Error::Parse("chunk size line not ended by CRLF".into()))?;
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    // After the size: nothing, or extensions (`;`), after optional whitespace.
    let rest = line.get(digits..).unwrap_or_default();
    let rest = rest.trim_ascii_start();
    if digits == 0 || digits > 16 || !(rest.is_empty() || rest.first() == Some(&b';')) {
        return Err(Error::Parse(format!(
            "bad chunk size {:?}",
            String::from_utf8_lossy(line)
        )));
    }
    let size = line
        .get(..digits)
        .and_then(|d| std::str::from_utf8(d).ok())
        .and_then(|d| u64::from_str_radix(d, 16).ok())
        .ok_or_else(|| Error::Parse("bad chunk size".into()))?;
    buf.advance(lf + 1);
    Ok(Some(size))
}

/// Parses the trailer section after the last chunk off the front of `buf`: `None` while
/// incomplete, `Some(None)` when it is empty.
#[allow(clippy::option_option)]
fn trailers(buf: &mut BytesMut) -> Result<Option<Option<HeaderMap>>, Error> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let (len, fields) = match httparse::parse_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(c)) => c,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(Error::Parse(format!("trailers over {MAX_HEAD} bytes")));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(Error::Parse(format!("trailers: {e}"))),
    };
    let mut map = HeaderMap::with_capacity(fields.len());
    for f in fields {
        let name = HeaderName::from_bytes(f.name.as_bytes())
            .map_err(|_| Error::Parse(format!("bad trailer name {:?}", f.name)))?;
        let value = HeaderValue::from_bytes(f.value)
            .map_err(|_| Error::Parse(format!("bad value of trailer {name}")))?;
        map.append(name, value);
    }
    buf.advance(len);
    Ok(Some((!map.is_empty()).then_some(map)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt as _;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// A client connection and the server's end of it, on loopback.
    async fn pair() -> (Conn<()>, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        let c = c.expect("connect");
        c.set_nodelay(true).expect("nodelay");
        (Conn::new(Box::new(c), ()), s.expect("accept").0)
    }

    /// Reads from the server's end until `end` has been seen (bounded in time).
    async fn read_until(s: &mut TcpStream, end: &[u8]) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        tokio::time::timeout(Duration::from_secs(10), async {
            while !got.windows(end.len()).any(|w| w == end) {
                let n = s.read(&mut buf).await.expect("read");
                assert!(n > 0, "closed before {end:?}: {got:?}");
                got.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .expect("request in time");
        String::from_utf8(got).expect("utf-8")
    }

    /// A connection whose server answers the first request with `resp`, then, with `close`,
    /// closes its side.
    async fn answering(
        resp: &'static [u8],
        close: bool,
    ) -> (Conn<()>, tokio::task::JoinHandle<TcpStream>) {
        let (conn, mut s) = pair().await;
        let server = tokio::spawn(async move {
            read_until(&mut s, b"\r\n\r\n").await;
            s.write_all(resp).await.expect("write");
            if close {
                s.shutdown().await.expect("shutdown");
            }
            s
        });
        (conn, server)
    }

    fn get(path: &str) -> Request<Body> {
        Request::get(path)
            .header("host", "h")
            .body(crate::http::empty())
            .expect("request")
    }

    async fn head(
        conn: Conn<()>,
        req: Request<Body>,
        resend: bool,
    ) -> Result<(response::Parts, Exchange<()>), Failure> {
        let mut ex = Exchange::start(conn, req, resend)?;
        let head = tokio::time::timeout(
            Duration::from_secs(10),
            std::future::poll_fn(|cx| ex.poll_head(cx)),
        )
        .await
        .expect("head in time")?;
        Ok((head, ex))
    }

    /// The body's bytes, its trailers, and the error that ended it.
    async fn body(ex: &mut Exchange<()>) -> (Vec<u8>, Option<HeaderMap>, Option<Error>) {
        let (mut data, mut trailers) = (Vec::new(), None);
        let read = async {
            loop {
                match std::future::poll_fn(|cx| ex.poll_data(cx)).await {
                    None => return None,
                    Some(Err(e)) => return Some(e),
                    Some(Ok(f)) => match f.into_data() {
                        Ok(d) => data.extend_from_slice(&d),
                        Err(f) => trailers = f.into_trailers().ok(),
                    },
                }
            }
        };
        let err = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("body in time");
        (data, trailers, err)
    }

    fn ok(r: Result<(response::Parts, Exchange<()>), Failure>) -> (response::Parts, Exchange<()>) {
        match r {
            Ok(r) => r,
            Err(f) => panic!("exchange failed: {}", f.error),
        }
    }

    #[tokio::test]
    async fn a_response_with_a_length_leaves_the_connection_reusable() {
        let (conn, mut s) = pair().await;
        let server = tokio::spawn(async move {
            let req = read_until(&mut s, b"\r\n\r\n").await;
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nX-Up: b\r\n\r\nhello")
                .await
                .expect("write");
            let second = read_until(&mut s, b"\r\n\r\n").await;
            s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                .await
                .expect("write");
            (req, second)
        });
        let (h, mut ex) = ok(head(conn, get("/p?q=1"), true).await);
        assert_eq!(h.status, StatusCode::OK);
        assert_eq!(h.headers["x-up"], "b");
        assert_eq!(ex.size_hint().exact(), Some(5));
        let (data, trailers, err) = body(&mut ex).await;
        assert_eq!(
            (data.as_slice(), trailers, err.is_none()),
            (&b"hello"[..], None, true)
        );
        let conn = ex.into_reusable().expect("reusable");
        let (h, ex) = ok(head(conn, get("/two"), true).await);
        assert_eq!(h.status, StatusCode::NOT_FOUND);
        assert!(ex.is_end_stream(), "content-length 0: no body");
        assert!(ex.into_reusable().is_some());
        let (req, second) = server.await.expect("server");
        assert_eq!(req, "GET /p?q=1 HTTP/1.1\r\nhost: h\r\n\r\n");
        assert!(second.starts_with("GET /two HTTP/1.1\r\n"), "{second}");
    }

    #[tokio::test]
    async fn chunked_responses_are_decoded_with_their_trailers_across_reads() {
        let (conn, mut s) = pair().await;
        let server = tokio::spawn(async move {
            read_until(&mut s, b"\r\n\r\n").await;
            let resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6 ;e=x\r\n world\r\n0\r\nx-trailer: t\r\n\r\n";
            // A byte at a time: every parser state resumes from a partial buffer.
            for b in resp {
                s.write_all(&[*b]).await.expect("write");
                s.flush().await.expect("flush");
            }
            s
        });
        let (h, mut ex) = ok(head(conn, get("/"), true).await);
        assert_eq!(h.status, StatusCode::OK);
        let (data, trailers, err) = body(&mut ex).await;
        assert!(err.is_none(), "{err:?}");
        assert_eq!(data, b"hello world");
        assert_eq!(trailers.expect("trailers")["x-trailer"], "t");
        assert!(ex.into_reusable().is_some());
        drop(server.await);
    }

    #[tokio::test]
    async fn responses_that_end_the_connection_are_not_reused() {
        let cases: [(&[u8], &[u8]); 4] = [
            // Delimited by the close.
            (b"HTTP/1.1 200 OK\r\n\r\nabc", b"abc"),
            (
                b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
                b"ok",
            ),
            (b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", b"ok"),
            // Not chunked: until the close.
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nok",
                b"ok",
            ),
        ];
        for (resp, want) in cases {
            let (conn, server) = answering(resp, true).await;
            let (_, mut ex) = ok(head(conn, get("/"), true).await);
            let (data, _, err) = body(&mut ex).await;
            assert!(err.is_none(), "{err:?}");
            assert_eq!(data, want);
            assert!(
                ex.into_reusable().is_none(),
                "{}",
                String::from_utf8_lossy(resp)
            );
            drop(server.await);
        }
    }

    #[tokio::test]
    async fn head_requests_204_and_informational_responses_have_no_body() {
        let (conn, mut s) = pair().await;
        let server = tokio::spawn(async move {
            read_until(&mut s, b"\r\n\r\n").await;
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n")
                .await
                .expect("write");
            read_until(&mut s, b"\r\n\r\n").await;
            s.write_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: <a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
                .await
                .expect("write");
            s
        });
        let req = Request::head("/")
            .body(crate::http::empty())
            .expect("request");
        let (h, ex) = ok(head(conn, req, true).await);
        assert_eq!(h.headers["content-length"], "10", "kept: the GET's length");
        assert!(ex.is_end_stream());
        let conn = ex.into_reusable().expect("reusable");
        let (h, ex) = ok(head(conn, get("/"), true).await);
        assert_eq!(h.status, StatusCode::NO_CONTENT);
        assert!(
            !h.headers.contains_key("link"),
            "the 103's headers are not the 204's"
        );
        assert!(ex.into_reusable().is_some());
        drop(server.await);
    }

    #[tokio::test]
    async fn malformed_responses_are_errors() {
        let heads: [&[u8]; 7] = [
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
        ];
        for resp in heads {
            let (conn, server) = answering(resp, false).await;
            match head(conn, get("/"), true).await {
                Ok(_) => panic!("accepted {}", String::from_utf8_lossy(resp)),
                Err(f) => {
                    assert!(f.error.is_protocol(), "{}", f.error);
                    assert!(f.request.is_none(), "the server answered: not sent again");
                }
            }
            drop(server.await);
        }
        // A head that never ends, past 60 KiB.
        let (conn, mut s) = pair().await;
        let server = tokio::spawn(async move {
            read_until(&mut s, b"\r\n\r\n").await;
            s.write_all(b"HTTP/1.1 200 OK\r\n").await.expect("write");
            let line = format!("x-big: {}\r\n", "a".repeat(1000));
            for _ in 0..70 {
                if s.write_all(line.as_bytes()).await.is_err() {
                    break;
                }
            }
            s
        });
        match head(conn, get("/"), true).await {
            Ok(_) => panic!("accepted a 70 KiB head"),
            Err(f) => assert!(f.error.to_string().contains("head over"), "{}", f.error),
        }
        drop(server.await);
        // Bodies: a bad chunk size, a body cut short.
        let bodies: [&[u8]; 4] = [
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2 junk\r\nok\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nokX\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
        ];
        for resp in bodies {
            let (conn, server) = answering(resp, true).await;
            let (_, mut ex) = ok(head(conn, get("/"), true).await);
            let (_, _, err) = body(&mut ex).await;
            assert!(err.is_some(), "accepted {}", String::from_utf8_lossy(resp));
            assert!(ex.into_reusable().is_none());
            drop(server.await);
        }
    }

    /// A request body that arrives in pieces, of unknown length.
    fn streamed(chunks: Vec<&'static [u8]>) -> (Body, tokio::sync::mpsc::Sender<Bytes>) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        for c in chunks {
            tx.try_send(Bytes::from_static(c)).expect("room");
        }
        let stream = futures::stream::poll_fn(move |cx| {
            rx.poll_recv(cx)
                .map(|o| o.map(|b| Ok::<_, BoxError>(Frame::data(b))))
        });
        (http_body_util::StreamBody::new(stream).boxed(), tx)
    }

    #[tokio::test]
    async fn request_bodies_are_framed_by_length_or_chunked() {
        let (conn, mut s) = pair().await;
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for end in [&b"\r\n\r\nabc"[..], b"0\r\n\r\n", b"\r\n\r\n", b"\r\n\r\n"] {
                seen.push(read_until(&mut s, end).await);
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await
                    .expect("write");
            }
            seen
        });
        // Known size: content-length.
        let req = Request::post("/a")
            .body(crate::http::full("abc"))
            .expect("request");
        let (_, ex) = ok(head(conn, req, true).await);
        let conn = ex.into_reusable().expect("reusable");
        // Unknown size: chunked, ended by the last chunk.
        let (b, tx) = streamed(vec![b"hello", b" world"]);
        drop(tx);
        let req = Request::post("/b").body(b).expect("request");
        let (_, ex) = ok(head(conn, req, true).await);
        let conn = ex.into_reusable().expect("reusable");
        // Empty: `content-length: 0` for a POST, nothing for a GET.
        let req = Request::post("/c")
            .body(crate::http::empty())
            .expect("request");
        let (_, ex) = ok(head(conn, req, true).await);
        let conn = ex.into_reusable().expect("reusable");
        let (_, ex) = ok(head(conn, get("/d"), true).await);
        assert!(ex.into_reusable().is_some());
        let seen = server.await.expect("server");
        assert_eq!(seen[0], "POST /a HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc");
        assert_eq!(
            seen[1],
            "POST /b HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        );
        assert_eq!(seen[2], "POST /c HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(seen[3], "GET /d HTTP/1.1\r\nhost: h\r\n\r\n");
    }

    #[tokio::test]
    async fn a_body_longer_than_its_length_is_refused() {
        let (conn, s) = pair().await;
        let (b, tx) = streamed(vec![b"toolong"]);
        drop(tx);
        let req = Request::post("/")
            .header("content-length", "3")
            .body(b)
            .expect("request");
        match head(conn, req, true).await {
            Ok(_) => panic!("sent a body past its content-length"),
            Err(f) => assert!(matches!(f.error, Error::Request(_)), "{}", f.error),
        }
        drop(s);
    }

    #[tokio::test]
    async fn a_request_the_server_closed_on_comes_back_when_it_can_be_sent_again() {
        for (req, resend, back) in [
            (get("/"), true, true),
            (get("/"), false, false),
            (
                Request::post("/")
                    .body(crate::http::empty())
                    .expect("request"),
                true,
                false,
            ),
        ] {
            let (conn, mut s) = pair().await;
            let server = tokio::spawn(async move {
                read_until(&mut s, b"\r\n\r\n").await;
                // Closed without a byte of response.
            });
            match head(conn, req, resend).await {
                Ok(_) => panic!("a response from nowhere"),
                Err(f) => {
                    assert!(
                        matches!(f.error, Error::Closed(_) | Error::Io(_)),
                        "{}",
                        f.error
                    );
                    assert_eq!(f.request.is_some(), back, "resend {resend}");
                    if let Some(r) = f.request {
                        assert_eq!(r.headers()["host"], "h");
                    }
                }
            }
            server.await.expect("server");
        }
    }

    #[tokio::test]
    async fn an_early_response_is_read_while_the_request_is_still_going_out() {
        let (conn, mut s) = pair().await;
        let (b, tx) = streamed(vec![b"first"]);
        let server = tokio::spawn(async move {
            read_until(&mut s, b"first").await;
            // Answered before the request ended; the server keeps reading.
            s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n")
                .await
                .expect("write");
            let rest = read_until(&mut s, b"0\r\n\r\n").await;
            s.write_all(b"0\r\n\r\n").await.expect("write");
            rest
        });
        let req = Request::put("/").body(b).expect("request");
        let (h, mut ex) = ok(head(conn, req, true).await);
        assert_eq!(h.status, StatusCode::OK);
        // The rest of the request goes out while the response body is read.
        tx.send(Bytes::from_static(b"second")).await.expect("send");
        drop(tx);
        let (data, _, err) = body(&mut ex).await;
        assert!(err.is_none(), "{err:?}");
        assert_eq!(data, b"ok");
        assert!(ex.into_reusable().is_some(), "both ended cleanly");
        let rest = server.await.expect("server");
        assert!(rest.contains("6\r\nsecond\r\n"), "{rest:?}");
    }

    #[tokio::test]
    async fn an_idle_connection_the_server_closed_is_not_usable() {
        let (mut conn, s) = pair().await;
        let mut noop = Context::from_waker(std::task::Waker::noop());
        assert!(conn.poll_usable(&mut noop), "open and quiet");
        drop(s);
        tokio::time::timeout(Duration::from_secs(10), async {
            while conn.poll_usable(&mut noop) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the close is seen");
    }
}
