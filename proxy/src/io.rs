//! Joining two byte streams: each direction is copied on its own, so when one direction fails or
//! ends (a peer that stops reading, a half-close) the other still delivers what it has — a local
//! reply written just before a close reaches the client. Backpressure is per direction: at most
//! one buffer of data is in flight each way.

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes buffered per direction.
const BUF: usize = 16 * 1024;

struct Half {
    buf: Box<[u8]>,
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
            buf: vec![0u8; BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            read_done: false,
            done: false,
            copied: 0,
            error: None,
        }
    }

    /// Moves bytes from `r` to `w` until EOF (then shuts `w` down), an error, or pending.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<()>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(());
            }
            if self.start == self.end && !self.read_done {
                let mut rb = ReadBuf::new(&mut self.buf);
                match r.as_mut().poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.read_done = true;
                        } else {
                            self.start = 0;
                            self.end = n;
                        }
                    }
                    Poll::Ready(Err(e)) => {
                        self.error = Some(e);
                        self.read_done = true;
                    }
                    Poll::Pending => {
                        // Flush what was written before waiting for more.
                        if let Poll::Ready(Err(e)) = w.as_mut().poll_flush(cx) {
                            self.error = Some(e);
                            self.done = true;
                            return Poll::Ready(());
                        }
                        return Poll::Pending;
                    }
                }
            }
            if self.start < self.end {
                match ready!(w.as_mut().poll_write(cx, &self.buf[self.start..self.end])) {
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
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
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
