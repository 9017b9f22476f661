//! An HTTP/2 stream as a byte stream (`AsyncRead + AsyncWrite`), honouring HTTP/2 flow control:
//! received bytes release window only as they are consumed, and writes wait for send capacity, so a
//! slow side pushes back on the other instead of buffering (bounded memory per tunnel).

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest chunk handed to h2 per write (bounds per-stream buffering).
const MAX_WRITE: usize = 64 * 1024;

/// One CONNECT tunnel over an HTTP/2 stream.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    pending: Bytes,
    read_eof: bool,
}

impl H2Stream {
    /// Wraps the two halves of a stream.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            read_eof: false,
        }
    }
}

fn h2_io(err: h2::Error) -> io::Error {
    if err.is_io() {
        err.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, err)
    }
}

impl H2Stream {
    /// Waits for send capacity for up to `want` bytes; how much was granted.
    fn poll_granted(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        self.send.reserve_capacity(want);
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => return Poll::Ready(Ok(n.min(want))),
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "HTTP/2 stream closed",
                    )));
                }
            }
        }
    }
}

impl crate::io::Stream for H2Stream {
    /// A DATA frame's bytes as h2 holds them (what a partial `poll_read` left first); the peer
    /// gets the window back as the chunk is handed on.
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<Bytes>>> {
        loop {
            if !self.pending.is_empty() {
                let chunk = std::mem::take(&mut self.pending);
                let _ = self.recv.flow_control().release_capacity(chunk.len());
                return Some(Poll::Ready(Ok(chunk)));
            }
            if self.read_eof {
                return Some(Poll::Ready(Ok(Bytes::new())));
            }
            match self.recv.poll_data(cx) {
                Poll::Pending => return Some(Poll::Pending),
                Poll::Ready(Some(Ok(data))) => self.pending = data,
                Poll::Ready(Some(Err(e))) => {
                    if e.reason() == Some(h2::Reason::NO_ERROR) {
                        self.read_eof = true;
                        continue;
                    }
                    return Some(Poll::Ready(Err(h2_io(e))));
                }
                Poll::Ready(None) => self.read_eof = true,
            }
        }
    }

    fn takes_chunks(&self) -> bool {
        true
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        if chunk.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_granted(cx, chunk.len().min(MAX_WRITE)))?;
        self.send
            .send_data(chunk.split_to(n), false)
            .map_err(h2_io)?;
        Poll::Ready(Ok(n))
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                // Give the peer its window back only for what the reader took.
                let _ = this.recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            if this.read_eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => this.pending = data,
                Some(Err(e)) => {
                    // A clean end by the peer (RST NO_ERROR / stream closed) reads as EOF.
                    if e.reason() == Some(h2::Reason::NO_ERROR) {
                        this.read_eof = true;
                        continue;
                    }
                    return Poll::Ready(Err(h2_io(e)));
                }
                None => this.read_eof = true,
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        let n = ready!(this.poll_granted(cx, buf.len().min(MAX_WRITE)))?;
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // END_STREAM: half-close our direction; the peer can still send.
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}
