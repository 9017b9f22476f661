//! An in-process connection (an internal listener's): two ends, each reading what the other
//! writes. Bytes travel as the chunks they were written in, so a join that moves chunks
//! ([`Stream::poll_read_chunk`](super::Stream::poll_read_chunk) on one side,
//! [`Stream::poll_write_chunk`](super::Stream::poll_write_chunk) on the other) passes an HTTP/2
//! DATA frame's bytes through without copying them; a plain `poll_write` copies once into a chunk
//! and a plain `poll_read` once out of it, as a socket would.
//!
//! A reader taking chunks gets what is queued gathered into one (up to [`GATHER`] bytes, copied
//! only then): one tunnel's answers written in several rounds before its join ran leave as one
//! HTTP/2 DATA frame, as they did when the pipe was a byte buffer. (The h2 codec writes out each
//! large DATA frame before queueing the next, so a frame per chunk costs a `writev` each.)
//!
//! Each direction holds at most `capacity` bytes (a chunk may overshoot by its own size, which
//! its writer bounds): a writer that finds the direction full waits for the reader.

use std::{
    collections::VecDeque,
    io,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, Waker},
};

use bytes::{Buf as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes [`PipeEnd::poll_chunk`] gathers from queued chunks.
pub const GATHER: usize = 16 * 1024;

/// One direction of the pipe.
#[derive(Default)]
struct Dir {
    chunks: VecDeque<Bytes>,
    /// Bytes in `chunks`.
    len: usize,
    /// The writer shut down or went away: the reader gets EOF once `chunks` is empty.
    closed: bool,
    /// The reader went away: writes fail.
    reader_gone: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

impl Dir {
    fn wake_reader(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }

    fn wake_writer(&mut self) {
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }

    /// Room for a write, or `None` after registering the writer when there is none.
    fn room(&mut self, capacity: usize, cx: &mut Context<'_>) -> Option<io::Result<usize>> {
        if self.reader_gone || self.closed {
            return Some(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if self.len >= capacity {
            self.writer = Some(cx.waker().clone());
            return None;
        }
        Some(Ok(capacity - self.len))
    }

    fn push(&mut self, chunk: Bytes) {
        self.len += chunk.len();
        self.chunks.push_back(chunk);
        self.wake_reader();
    }

    /// After the reader took bytes: the writer may go on.
    fn took(&mut self, n: usize) {
        self.len -= n;
        self.wake_writer();
    }
}

struct Shared {
    /// `dirs[0]`: written by end 0, read by end 1; `dirs[1]` the other way.
    dirs: Mutex<[Dir; 2]>,
    capacity: usize,
}

/// One end of a [`pipe`].
pub struct PipeEnd {
    shared: Arc<Shared>,
    side: usize,
}

/// A connected pair of ends, each direction holding at most `capacity` bytes.
pub fn pipe(capacity: usize) -> (PipeEnd, PipeEnd) {
    let shared = Arc::new(Shared {
        dirs: Mutex::new([Dir::default(), Dir::default()]),
        capacity: capacity.max(1),
    });
    (
        PipeEnd {
            shared: shared.clone(),
            side: 0,
        },
        PipeEnd { shared, side: 1 },
    )
}

impl PipeEnd {
    fn dirs(&self) -> MutexGuard<'_, [Dir; 2]> {
        // A panic while the lock was held left nothing half-done that matters here: the queues
        // are only pushed to and popped from whole.
        self.shared
            .dirs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// This end's (outgoing, incoming) directions.
    fn split(dirs: &mut [Dir; 2], side: usize) -> (&mut Dir, &mut Dir) {
        let [a, b] = dirs;
        if side == 0 { (a, b) } else { (b, a) }
    }

    /// What the other end wrote, as a chunk: the next one, or the queued ones gathered up to
    /// [`GATHER`] bytes; empty at EOF.
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        let side = self.side;
        let mut dirs = self.dirs();
        let (_, incoming) = Self::split(&mut dirs, side);
        match incoming.chunks.pop_front() {
            Some(first) => {
                let fits =
                    |c: Option<&Bytes>, len: usize| c.is_some_and(|c| len + c.len() <= GATHER);
                let chunk = if fits(incoming.chunks.front(), first.len()) {
                    let mut gathered = BytesMut::with_capacity(GATHER.min(incoming.len));
                    gathered.extend_from_slice(&first);
                    while fits(incoming.chunks.front(), gathered.len()) {
                        if let Some(next) = incoming.chunks.pop_front() {
                            gathered.extend_from_slice(&next);
                        }
                    }
                    gathered.freeze()
                } else {
                    first
                };
                incoming.took(chunk.len());
                Poll::Ready(Ok(chunk))
            }
            None if incoming.closed => Poll::Ready(Ok(Bytes::new())),
            None => {
                incoming.reader = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// Hands `chunk` (all of it, without copying) to the other end; returns its length.
    pub fn poll_put(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<usize>> {
        let (side, capacity) = (self.side, self.shared.capacity);
        let mut dirs = self.dirs();
        let (outgoing, _) = Self::split(&mut dirs, side);
        match outgoing.room(capacity, cx) {
            None => Poll::Pending,
            Some(Err(e)) => Poll::Ready(Err(e)),
            Some(Ok(_)) => {
                let n = chunk.len();
                if n > 0 {
                    outgoing.push(std::mem::take(chunk));
                }
                Poll::Ready(Ok(n))
            }
        }
    }

    fn poll_write_slices(
        &mut self,
        cx: &mut Context<'_>,
        slices: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let (side, capacity) = (self.side, self.shared.capacity);
        let mut dirs = self.dirs();
        let (outgoing, _) = Self::split(&mut dirs, side);
        let room = match outgoing.room(capacity, cx) {
            None => return Poll::Pending,
            Some(Err(e)) => return Poll::Ready(Err(e)),
            Some(Ok(room)) => room,
        };
        let total: usize = slices.iter().map(|s| s.len()).sum();
        let n = total.min(room);
        if n == 0 {
            return Poll::Ready(Ok(0));
        }
        let mut chunk = BytesMut::with_capacity(n);
        for s in slices {
            let want = (n - chunk.len()).min(s.len());
            chunk.extend_from_slice(&s[..want]);
            if chunk.len() == n {
                break;
            }
        }
        outgoing.push(chunk.freeze());
        Poll::Ready(Ok(n))
    }
}

impl Drop for PipeEnd {
    fn drop(&mut self) {
        let side = self.side;
        let mut dirs = self.dirs();
        let (outgoing, incoming) = Self::split(&mut dirs, side);
        outgoing.closed = true;
        outgoing.wake_reader();
        incoming.reader_gone = true;
        incoming.chunks.clear();
        incoming.len = 0;
        incoming.wake_writer();
    }
}

impl AsyncRead for PipeEnd {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let side = self.side;
        let mut dirs = self.dirs();
        let (_, incoming) = Self::split(&mut dirs, side);
        if incoming.chunks.is_empty() {
            if incoming.closed {
                return Poll::Ready(Ok(()));
            }
            incoming.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let mut taken = 0;
        while buf.remaining() > 0 {
            let Some(front) = incoming.chunks.front_mut() else {
                break;
            };
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front[..n]);
            front.advance(n);
            taken += n;
            if front.is_empty() {
                incoming.chunks.pop_front();
            }
        }
        incoming.took(taken);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for PipeEnd {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_slices(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_slices(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let side = self.side;
        let mut dirs = self.dirs();
        let (outgoing, _) = Self::split(&mut dirs, side);
        outgoing.closed = true;
        outgoing.wake_reader();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn bytes_written_at_one_end_are_read_at_the_other_in_order() {
        let (mut a, mut b) = pipe(1024);
        a.write_all(b"hello ").await.expect("write");
        let mut chunk = Bytes::from_static(b"world");
        let n = poll_fn(|cx| a.poll_put(cx, &mut chunk)).await.expect("put");
        assert_eq!((n, chunk.len()), (5, 0), "the whole chunk is taken");
        a.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"hello world");
        // And the other way, chunk by chunk.
        b.write_all(b"back").await.expect("write");
        drop(b);
        let first = poll_fn(|cx| a.poll_chunk(cx)).await.expect("chunk");
        assert_eq!(&first[..], b"back");
        let eof = poll_fn(|cx| a.poll_chunk(cx)).await.expect("eof");
        assert!(eof.is_empty());
    }

    #[tokio::test]
    async fn queued_chunks_are_taken_gathered_up_to_the_limit() {
        let (mut a, mut b) = pipe(4 * GATHER);
        for piece in [&b"one "[..], b"two ", b"three"] {
            a.write_all(piece).await.expect("write");
        }
        let big = Bytes::from(vec![1u8; GATHER]);
        let mut chunk = big.clone();
        poll_fn(|cx| a.poll_put(cx, &mut chunk)).await.expect("put");
        a.write_all(b"tail").await.expect("write");
        let first = poll_fn(|cx| b.poll_chunk(cx)).await.expect("chunk");
        assert_eq!(&first[..], b"one two three", "small chunks leave together");
        let second = poll_fn(|cx| b.poll_chunk(cx)).await.expect("chunk");
        assert_eq!(
            second.as_ptr(),
            big.as_ptr(),
            "a full-size chunk leaves as it came"
        );
        let third = poll_fn(|cx| b.poll_chunk(cx)).await.expect("chunk");
        assert_eq!(&third[..], b"tail");
    }

    #[tokio::test]
    async fn a_full_direction_holds_the_writer_until_the_reader_takes() {
        let (mut a, mut b) = pipe(8);
        assert_eq!(a.write(b"0123456789").await.expect("write"), 8);
        let mut one = [0u8; 1];
        let blocked = poll_fn(|cx| Poll::Ready(Pin::new(&mut a).poll_write(cx, b"x"))).await;
        assert!(blocked.is_pending(), "full: the writer waits");
        b.read_exact(&mut one).await.expect("read");
        assert_eq!(&one, b"0");
        assert_eq!(a.write(b"89").await.expect("write"), 1, "one byte of room");
        let mut rest = [0u8; 8];
        b.read_exact(&mut rest).await.expect("read");
        assert_eq!(&rest, b"12345678");
    }

    #[tokio::test]
    async fn writes_to_a_dropped_end_fail_and_reads_from_it_end() {
        let (mut a, b) = pipe(64);
        drop(b);
        let err = a.write_all(b"x").await.expect_err("broken pipe");
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        let mut got = Vec::new();
        assert_eq!(a.read_to_end(&mut got).await.expect("eof"), 0);
    }

    #[tokio::test]
    async fn bytes_written_before_the_writer_went_away_are_still_read() {
        let (mut a, mut b) = pipe(64);
        a.write_all(b"last words").await.expect("write");
        drop(a);
        let mut got = String::new();
        b.read_to_string(&mut got).await.expect("read");
        assert_eq!(got, "last words");
    }
}
