//! Writes gathered over one scheduler turn, so that an HTTP/2 connection carrying many tunnels
//! sends what they all produced in one TLS record run and one system call.
//!
//! The `h2` codec keeps at most one DATA frame of more than a few hundred bytes queued for its
//! I/O: every further one makes it write (and flush) first. A waypoint answering many requests at
//! once over one HBONE connection would thus pay one `writev` and one TLS record per answer. Here
//! writes are copied into a buffer (up to [`LIMIT`]); the first flush of a round wakes the task
//! and reports done, the codec gathers whatever the other tunnels handed over meanwhile, and the
//! next flush writes it all. Envoy gets the same from its event loop, which writes a connection's
//! buffer once the loop's current events are handled.
//!
//! With nothing else runnable the task runs again at once: an idle connection's latency grows by
//! one task poll, not by a timer. A shutdown writes what is buffered first.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes gathered before a write goes out whatever the round.
pub const LIMIT: usize = 64 * 1024;
/// A buffer grown past this is freed once written out: an idle connection keeps at most this
/// much (thousands of quiet gRPC clients must not each hold a full [`LIMIT`]).
const KEEP: usize = 16 * 1024;

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Preface bytes that tell HTTP/2 from every HTTP/1 request line.
const PREFACE_SEEN: usize = 4;

/// Whether writes are gathered.
enum Mode {
    On,
    /// Off until the first bytes read are HTTP/2's preface (this many matched so far).
    Sniffing(usize),
    Off,
}

/// An I/O stream whose writes are gathered over one scheduler turn (see the module
/// documentation).
pub struct Coalesce<IO> {
    io: IO,
    buf: BytesMut,
    /// A flush of this round reported done without writing; the next one writes.
    deferred: bool,
    mode: Mode,
}

impl<IO> Coalesce<IO> {
    /// Wraps `io`, which carries HTTP/2.
    pub fn new(io: IO) -> Self {
        Coalesce {
            io,
            buf: BytesMut::new(),
            deferred: false,
            mode: Mode::On,
        }
    }

    /// Wraps the server side of `io`, which may carry HTTP/1 or HTTP/2: writes are gathered once
    /// the client's first bytes are HTTP/2's preface. (HTTP/1 writes one answer at a time per
    /// connection, which nothing could be gathered with.)
    pub fn for_http2(io: IO) -> Self {
        Coalesce {
            mode: Mode::Sniffing(0),
            ..Coalesce::new(io)
        }
    }

    fn on(&self) -> bool {
        matches!(self.mode, Mode::On)
    }
}

impl<IO: AsyncWrite + Unpin> Coalesce<IO> {
    /// Writes out everything gathered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.buf.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.buf.advance(n);
        }
        if self.buf.capacity() > KEEP {
            self.buf = BytesMut::new();
        }
        self.deferred = false;
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Coalesce<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Mode::Sniffing(matched) = self.mode else {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        };
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.io).poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        let want = &PREFACE[matched..];
        let n = new.len().min(want.len());
        self.mode = if new[..n] != want[..n] {
            Mode::Off
        } else if matched + n >= PREFACE_SEEN {
            Mode::On
        } else if new.is_empty() {
            Mode::Off
        } else {
            Mode::Sniffing(matched + n)
        };
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Coalesce<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if !self.on() {
            return Pin::new(&mut self.io).poll_write(cx, buf);
        }
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if !this.on() {
            return Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        }
        if this.buf.len() >= LIMIT {
            ready!(this.poll_drain(cx))?;
        }
        let room = LIMIT - this.buf.len();
        let mut taken = 0;
        for b in bufs {
            let take = b.len().min(room - taken);
            this.buf.extend_from_slice(&b[..take]);
            taken += take;
            if taken == room {
                break;
            }
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        // Gathering takes any slices; until then, as the stream itself. (A caller that asked
        // before gathering began and writes one slice at a time is gathered all the same.)
        self.on() || self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.buf.is_empty() {
            if !this.deferred {
                // Come back once the tasks queued now have handed over their frames.
                this.deferred = true;
                cx.waker().wake_by_ref();
                return Poll::Ready(Ok(()));
            }
            ready!(this.poll_drain(cx))?;
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        task::Wake,
    };

    use super::*;

    /// Counts wake-ups.
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn writes_of_a_round_go_out_together_on_the_second_flush() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesce::new(Vec::<u8>::new());
        let mut pin = Pin::new(&mut io);
        assert!(matches!(
            pin.as_mut().poll_write(&mut cx, b"ab"),
            Poll::Ready(Ok(2))
        ));
        // The first flush writes nothing and has the task come back.
        assert!(matches!(
            pin.as_mut().poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        assert!(pin.io.is_empty());
        let slices = [io::IoSlice::new(b"cd"), io::IoSlice::new(b"e")];
        assert!(matches!(
            pin.as_mut().poll_write_vectored(&mut cx, &slices),
            Poll::Ready(Ok(3))
        ));
        // The second writes both rounds' bytes, without another wake-up.
        assert!(matches!(
            pin.as_mut().poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        assert_eq!(pin.io, b"abcde");
        // A flush with nothing gathered passes straight through.
        assert!(matches!(
            pin.as_mut().poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
    }

    /// What `for_http2` decides after the client's first reads.
    fn sniffed(reads: &[&[u8]]) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut io = Coalesce::for_http2(std::io::Cursor::new(reads.concat()));
        for r in reads {
            let mut space = vec![0u8; r.len()];
            let mut buf = ReadBuf::new(&mut space);
            assert!(matches!(
                Pin::new(&mut io).poll_read(&mut cx, &mut buf),
                Poll::Ready(Ok(()))
            ));
            assert_eq!(buf.filled(), *r);
        }
        io.on()
    }

    #[test]
    fn server_side_streams_gather_only_http2() {
        assert!(sniffed(&[PREFACE]));
        assert!(sniffed(&[b"PR", b"I * HTTP/2.0\r\n"]));
        assert!(!sniffed(&[b"GET / HTTP/1.1\r\n\r\n"]));
        assert!(!sniffed(&[b"PRO", b"PFIND / HTTP/1.1\r\n"]));
        assert!(!sniffed(&[b"PUT / HTTP/1.1\r\n"]));
        // Undecided after a 3-byte prefix, off at the end of the stream.
        assert!(!sniffed(&[b"PRI"]));
        assert!(!sniffed(&[b"PRI", b""]));
        // Writes before gathering starts go straight through.
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut io = Coalesce::for_http2(Vec::<u8>::new());
        assert!(matches!(
            Pin::new(&mut io).poll_write(&mut cx, b"x"),
            Poll::Ready(Ok(1))
        ));
        assert_eq!(io.io, b"x");
    }

    #[test]
    fn a_full_buffer_and_a_shutdown_write_out_what_is_gathered() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut io = Coalesce::new(Vec::<u8>::new());
        let mut pin = Pin::new(&mut io);
        let big = vec![7u8; LIMIT + 10];
        // Takes up to the limit, then writes that out before taking more.
        assert!(matches!(
            pin.as_mut().poll_write(&mut cx, &big),
            Poll::Ready(Ok(LIMIT))
        ));
        assert!(pin.io.is_empty());
        assert!(matches!(
            pin.as_mut().poll_write(&mut cx, &big[LIMIT..]),
            Poll::Ready(Ok(10))
        ));
        assert_eq!(pin.io.len(), LIMIT);
        assert!(matches!(
            pin.as_mut().poll_shutdown(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(pin.io, big);
        // Written out, the large buffer is not kept.
        assert!(pin.buf.capacity() <= KEEP);
    }
}
