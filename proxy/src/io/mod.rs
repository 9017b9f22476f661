//! Joining two byte streams: each direction is copied on its own, so when one direction fails or
//! ends (a peer that stops reading, a half-close) the other still delivers what it has — a local
//! reply written just before a close reaches the client. Backpressure is per direction: at most
//! one buffer of data is in flight each way.
//!
//! Reads go through one buffer per thread, shared by every join on it; a direction owns a buffer
//! only once its writer took less than a read gave (the rest waits there). A waypoint keeps a
//! join open per upstream connection (hundreds under HTTP/2 load, most of them idle between
//! requests): per-join buffers cost 32 KiB each and spread every request's bytes over cold
//! memory, while the shared one stays in cache.
//!
//! [`coalesce`] gathers an HTTP/2 connection's writes over one scheduler turn (HBONE both ends,
//! downstream h2).

pub mod coalesce;
pub mod pipe;

use std::{
    cell::RefCell,
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A byte stream the data path boxes, hands around and joins (a socket, a TLS session, an HBONE
/// tunnel, an internal connection, and wrappers around them).
///
/// Streams that hold their bytes as [`Bytes`] (an HTTP/2 stream, an in-process [`pipe`]) can
/// also pass them by chunk, and [`join`] then moves bytes between two such streams without
/// copying them; wrappers that only observe bytes pass the chunk calls on.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// The next received chunk, without copying; an empty chunk at EOF. `None` when the stream
    /// does not hold its bytes as chunks (read with `poll_read` then).
    fn poll_read_chunk(&mut self, _cx: &mut Context<'_>) -> Option<Poll<io::Result<Bytes>>> {
        None
    }

    /// Whether [`Stream::poll_write_chunk`] keeps chunks instead of copying them.
    fn takes_chunks(&self) -> bool {
        false
    }

    /// Writes from the front of `chunk` and takes what was written off it; returns how much.
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut *self).poll_write(cx, chunk);
        if let Poll::Ready(Ok(n)) = polled {
            chunk.advance(n);
        }
        polled
    }
}

/// The [`Stream`] chunk methods of a wrapper that passes them on to the stream it wraps
/// (`self.$inner`) unchanged: `reads` for `poll_read_chunk`, `writes` for `takes_chunks` and
/// `poll_write_chunk`, or `all`.
macro_rules! pass_chunks {
    (all: $($inner:tt).+) => {
        $crate::io::pass_chunks!(reads: $($inner).+);
        $crate::io::pass_chunks!(writes: $($inner).+);
    };
    (reads: $($inner:tt).+) => {
        fn poll_read_chunk(
            &mut self,
            cx: &mut std::task::Context<'_>,
        ) -> Option<std::task::Poll<std::io::Result<bytes::Bytes>>> {
            self.$($inner).+.poll_read_chunk(cx)
        }
    };
    (writes: $($inner:tt).+) => {
        fn takes_chunks(&self) -> bool {
            self.$($inner).+.takes_chunks()
        }

        fn poll_write_chunk(
            &mut self,
            cx: &mut std::task::Context<'_>,
            chunk: &mut bytes::Bytes,
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.$($inner).+.poll_write_chunk(cx, chunk)
        }
    };
}
pub(crate) use pass_chunks;

impl Stream for Box<dyn Stream> {
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<Bytes>>> {
        (**self).poll_read_chunk(cx)
    }

    fn takes_chunks(&self) -> bool {
        (**self).takes_chunks()
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        (**self).poll_write_chunk(cx, chunk)
    }
}

impl Stream for tokio::net::TcpStream {}
impl Stream for tokio::net::UnixStream {}
impl Stream for tokio::io::DuplexStream {}
impl Stream for hyper_util::rt::TokioIo<hyper::upgrade::Upgraded> {}
impl<IO: Stream> Stream for tokio_rustls::client::TlsStream<IO> {}
impl<IO: Stream> Stream for tokio_rustls::server::TlsStream<IO> {}

impl Stream for pipe::PipeEnd {
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<Bytes>>> {
        Some(self.poll_chunk(cx))
    }

    fn takes_chunks(&self) -> bool {
        true
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        self.poll_put(cx, chunk)
    }
}

/// Bytes buffered per direction.
const BUF: usize = 16 * 1024;

thread_local! {
    /// The read buffer of every join polled on this thread (see the module documentation).
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; BUF].into_boxed_slice());
}

/// What one read through the shared buffer came to.
enum Step {
    /// Bytes moved (or kept in the direction's own buffer): go on.
    Again,
    /// Nothing to read yet.
    Pending,
}

struct Half {
    /// A chunk read without copying (see [`Stream::poll_read_chunk`]) and not yet all written.
    chunk: Bytes,
    /// Bytes read but not yet written, in `buf[start..end]`; allocated the first time a writer
    /// takes less than a read gave.
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    read_done: bool,
    done: bool,
    copied: u64,
    error: Option<io::Error>,
}

impl Half {
    fn new() -> Self {
        Half {
            chunk: Bytes::new(),
            buf: None,
            start: 0,
            end: 0,
            read_done: false,
            done: false,
            copied: 0,
            error: None,
        }
    }

    /// Reads into `into` and records what came: `Some(n)` bytes (0 at EOF or on an error),
    /// `None` when nothing is ready.
    fn read<R>(&mut self, cx: &mut Context<'_>, r: Pin<&mut R>, into: &mut [u8]) -> Option<usize>
    where
        R: AsyncRead + ?Sized,
    {
        let mut rb = ReadBuf::new(into);
        match r.poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    self.read_done = true;
                }
                Some(n)
            }
            Poll::Ready(Err(e)) => {
                self.error = Some(e);
                self.read_done = true;
                Some(0)
            }
            Poll::Pending => None,
        }
    }

    /// Writes `data` to `w` as far as it goes; what the writer does not take now is kept in the
    /// direction's own buffer.
    fn write_through<W>(&mut self, cx: &mut Context<'_>, mut w: Pin<&mut W>, data: &[u8])
    where
        W: AsyncWrite + ?Sized,
    {
        let mut off = 0;
        while off < data.len() {
            match w.as_mut().poll_write(cx, &data[off..]) {
                Poll::Ready(Ok(0)) => {
                    self.error = Some(io::ErrorKind::WriteZero.into());
                    self.done = true;
                    return;
                }
                Poll::Ready(Ok(n)) => {
                    off += n;
                    self.copied += n as u64;
                }
                Poll::Ready(Err(e)) => {
                    self.error = Some(e);
                    self.done = true;
                    return;
                }
                Poll::Pending => {
                    let rest = &data[off..];
                    let own = self
                        .buf
                        .get_or_insert_with(|| vec![0u8; BUF].into_boxed_slice());
                    own[..rest.len()].copy_from_slice(rest);
                    self.start = 0;
                    self.end = rest.len();
                    return;
                }
            }
        }
    }

    /// One read through the thread's shared buffer, written on at once.
    fn read_shared<R, W>(&mut self, cx: &mut Context<'_>, r: Pin<&mut R>, w: Pin<&mut W>) -> Step
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        SCRATCH.with(|scratch| {
            let Ok(mut scratch) = scratch.try_borrow_mut() else {
                // Only if a reader or writer polled a join on this thread from inside its own
                // poll: fall back to a buffer of our own.
                self.buf = Some(vec![0u8; BUF].into_boxed_slice());
                return Step::Again;
            };
            match self.read(cx, r, &mut scratch) {
                None => Step::Pending,
                Some(0) => Step::Again,
                Some(n) => {
                    self.write_through(cx, w, &scratch[..n]);
                    Step::Again
                }
            }
        })
    }

    /// Flushes `w` before waiting for more to read; false when that failed (the half is done).
    fn flush_before_waiting<W>(&mut self, cx: &mut Context<'_>, w: Pin<&mut W>) -> bool
    where
        W: AsyncWrite + ?Sized,
    {
        if let Poll::Ready(Err(e)) = w.poll_flush(cx) {
            self.error = Some(e);
            self.done = true;
            return false;
        }
        true
    }

    /// Moves bytes from `r` to `w` until EOF (then shuts `w` down), an error, or pending. Chunks
    /// pass without a copy when `r` reads by chunk (a writer that does not take chunks copies
    /// from them, as from any buffer).
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<()>
    where
        R: Stream + ?Sized,
        W: Stream + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(());
            }
            if !self.chunk.is_empty() {
                match ready!(w.as_mut().get_mut().poll_write_chunk(cx, &mut self.chunk)) {
                    Ok(0) => {
                        self.error = Some(io::ErrorKind::WriteZero.into());
                        self.done = true;
                    }
                    Ok(n) => self.copied += n as u64,
                    Err(e) => {
                        self.error = Some(e);
                        self.done = true;
                    }
                }
                continue;
            }
            if self.start == self.end
                && !self.read_done
                && self.buf.is_none()
                && let Some(polled) = r.as_mut().get_mut().poll_read_chunk(cx)
            {
                match polled {
                    Poll::Pending => {
                        if !self.flush_before_waiting(cx, w.as_mut()) {
                            return Poll::Ready(());
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok(chunk)) if chunk.is_empty() => self.read_done = true,
                    Poll::Ready(Ok(chunk)) => self.chunk = chunk,
                    Poll::Ready(Err(e)) => {
                        self.error = Some(e);
                        self.read_done = true;
                    }
                }
                continue;
            }
            if self.start == self.end && !self.read_done {
                let step = match self.buf.take() {
                    Some(mut own) => {
                        let got = self.read(cx, r.as_mut(), &mut own);
                        self.buf = Some(own);
                        match got {
                            None => Step::Pending,
                            Some(n) => {
                                self.start = 0;
                                self.end = n;
                                Step::Again
                            }
                        }
                    }
                    None => self.read_shared(cx, r.as_mut(), w.as_mut()),
                };
                if let Step::Pending = step {
                    if !self.flush_before_waiting(cx, w.as_mut()) {
                        return Poll::Ready(());
                    }
                    return Poll::Pending;
                }
                continue;
            }
            if self.start < self.end {
                let Some(own) = self.buf.as_deref() else {
                    // Unreachable: pending bytes always live in the own buffer.
                    self.start = self.end;
                    continue;
                };
                match ready!(w.as_mut().poll_write(cx, &own[self.start..self.end])) {
                    Ok(0) => {
                        self.error = Some(io::ErrorKind::WriteZero.into());
                        self.done = true;
                    }
                    Ok(n) => {
                        self.start += n;
                        self.copied += n as u64;
                    }
                    Err(e) => {
                        self.error = Some(e);
                        self.done = true;
                    }
                }
                continue;
            }
            if self.read_done {
                // EOF (or a read error): pass the half-close on.
                let _ = ready!(w.as_mut().poll_shutdown(cx));
                self.done = true;
            }
        }
    }
}

/// Copies `a` → `b` and `b` → `a` until both directions are done; returns the bytes copied each
/// way and the first error, if any.
pub async fn join<A, B>(a: &mut A, b: &mut B) -> (u64, u64, Option<io::Error>)
where
    A: Stream + ?Sized,
    B: Stream + ?Sized,
{
    let mut ab = Half::new();
    let mut ba = Half::new();
    poll_fn(|cx| {
        let one = ab.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b));
        let two = ba.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a));
        // A direction whose writer failed means the peer is gone: stop reading towards it too.
        if one.is_ready() && two.is_ready() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    (ab.copied, ba.copied, ab.error.or(ba.error))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn a_reply_written_before_close_still_arrives() {
        // client <-> (c1, p1) join (p2, s1) <-> server
        let (mut client, mut p1) = tokio::io::duplex(64);
        let (mut p2, mut server) = tokio::io::duplex(64);
        let proxy = tokio::spawn(async move { join(&mut p1, &mut p2).await });
        // The client sends more than the server will read; the server answers and closes.
        let sent = tokio::spawn(async move {
            let _ = client.write_all(&[b'x'; 4096]).await;
            let mut got = Vec::new();
            let _ = client.read_to_end(&mut got).await;
            got
        });
        let mut head = [0u8; 16];
        server.read_exact(&mut head).await.expect("read");
        server
            .write_all(b"HTTP/1.1 431 \r\n\r\n")
            .await
            .expect("write");
        drop(server);
        let got = sent.await.expect("client");
        assert_eq!(got, b"HTTP/1.1 431 \r\n\r\n");
        let (_, back, _) = proxy.await.expect("proxy");
        assert_eq!(back, 17);
    }

    /// Sends `len` bytes (a pattern varied by `seed`) from `client` through a join of `p1` and
    /// `p2` to `server`, then checks what arrived and what the join counted.
    async fn send_through<C, P1, P2, S>(
        (mut client, p1): (C, P1),
        (p2, mut server): (P2, S),
        len: u32,
        seed: u8,
    ) where
        C: tokio::io::AsyncWrite + Unpin + Send + 'static,
        P1: Stream,
        P2: Stream,
        S: tokio::io::AsyncRead + Unpin,
    {
        let (mut p1, mut p2) = (p1, p2);
        let proxy = tokio::spawn(async move { join(&mut p1, &mut p2).await });
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ seed).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.expect("write");
            client.shutdown().await.expect("shutdown");
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read");
        drop(writer.await.expect("writer"));
        drop(server);
        let (up, _, err) = proxy.await.expect("proxy");
        assert_eq!(up, data.len() as u64, "seed {seed}");
        assert!(err.is_none(), "seed {seed}: {err:?}");
        assert!(got == data, "seed {seed}: the bytes differ");
    }

    #[tokio::test]
    async fn joins_sharing_a_thread_keep_their_bytes_apart() {
        // Two joins on one thread share its read buffer; small pipes make writers take less
        // than a read gives, so both also keep leftovers in their own buffers.
        let through =
            |seed| send_through(tokio::io::duplex(100), tokio::io::duplex(37), 100_000, seed);
        tokio::join!(through(0), through(0x5a));
    }

    #[tokio::test]
    async fn chunks_pass_between_chunk_streams_without_a_copy() {
        // client <-> (c, p1) join (p2, s) <-> server, both pipes.
        let (mut client, mut p1) = pipe::pipe(1024);
        let (mut p2, mut server) = pipe::pipe(1024);
        let proxy = tokio::spawn(async move { join(&mut p1, &mut p2).await });
        let sent = Bytes::from(vec![7u8; 600]);
        let mut chunk = sent.clone();
        poll_fn(|cx| client.poll_put(cx, &mut chunk))
            .await
            .expect("put");
        let got = poll_fn(|cx| server.poll_chunk(cx)).await.expect("chunk");
        assert_eq!(got, sent);
        assert_eq!(got.as_ptr(), sent.as_ptr(), "the same bytes, not a copy");
        // Plain writes and reads still work through the chunk path, and EOF passes both ways.
        server.write_all(b"pong").await.expect("write");
        server.shutdown().await.expect("shutdown");
        let mut back = [0u8; 4];
        client.read_exact(&mut back).await.expect("read");
        assert_eq!(&back, b"pong");
        client.shutdown().await.expect("shutdown");
        let eof = poll_fn(|cx| server.poll_chunk(cx)).await.expect("eof");
        assert!(eof.is_empty());
        drop((client, server));
        let (up, down, err) = proxy.await.expect("proxy");
        assert_eq!((up, down), (600, 4));
        assert!(err.is_none(), "{err:?}");
    }

    #[tokio::test]
    async fn chunks_reach_a_writer_that_takes_little_at_a_time() {
        // A chunk reader joined to a small plain pipe: each chunk is written in many pieces.
        send_through(pipe::pipe(100_000), tokio::io::duplex(37), 50_000, 0).await;
    }

    #[tokio::test]
    async fn half_close_is_passed_on() {
        let (mut client, mut p1) = tokio::io::duplex(1024);
        let (mut p2, mut server) = tokio::io::duplex(1024);
        let proxy = tokio::spawn(async move { join(&mut p1, &mut p2).await });
        client.write_all(b"ping").await.expect("write");
        client.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"ping");
        server.write_all(b"pong").await.expect("write");
        drop(server);
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("read");
        assert_eq!(back, b"pong");
        let (up, down, err) = proxy.await.expect("proxy");
        assert_eq!((up, down), (4, 4));
        assert!(err.is_none(), "{err:?}");
    }
}
