//! Listener filters that read before a filter chain is chosen: `http_inspector` (HTTP/1.x or h2c
//! prior knowledge) and `tls_inspector` (TLS or not, SNI, ALPN). What they read is replayed to the
//! chain through [`Rewind`].

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};

use super::conn::BoxIo;

/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How much `http_inspector` reads at most before giving up (Envoy: 64 KiB max, first line).
const HTTP_INSPECT_MAX: usize = 8 * 1024;
/// How much `tls_inspector` reads at most (Envoy's default `max_client_hello_size`: 16 KiB).
const TLS_INSPECT_MAX: usize = 16 * 1024;

/// A stream with bytes already read in front of it.
pub struct Rewind {
    prefix: Bytes,
    inner: BoxIo,
}

impl Rewind {
    /// `inner`, with `prefix` replayed first.
    pub fn new(prefix: Bytes, inner: BoxIo) -> Self {
        Rewind { prefix, inner }
    }
}

impl crate::io::Stream for Rewind {
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<Bytes>>> {
        if !self.prefix.is_empty() {
            return Some(Poll::Ready(Ok(std::mem::take(&mut self.prefix))));
        }
        self.inner.poll_read_chunk(cx)
    }

    crate::io::pass_chunks!(writes: inner);
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The verdict of a sniffing step on the bytes seen so far.
enum Verdict<T> {
    Done(T),
    NeedMore,
}

/// Reads into `buf` until `judge` decides, EOF, `max` bytes or `timeout` (`None`: timed out or
/// undecided).
async fn sniff<T>(
    io: &mut BoxIo,
    buf: &mut BytesMut,
    max: usize,
    timeout: Option<Duration>,
    judge: impl Fn(&[u8], bool) -> Verdict<T>,
) -> Option<T> {
    let work = async {
        loop {
            if let Verdict::Done(v) = judge(buf, false) {
                return Some(v);
            }
            if buf.len() >= max {
                return match judge(buf, true) {
                    Verdict::Done(v) => Some(v),
                    Verdict::NeedMore => None,
                };
            }
            buf.reserve(4096);
            match io.read_buf(buf).await {
                // EOF or error: judge what we have.
                Ok(0) | Err(_) => {
                    return match judge(buf, true) {
                        Verdict::Done(v) => Some(v),
                        Verdict::NeedMore => None,
                    };
                }
                Ok(_) => {}
            }
        }
    };
    match timeout {
        Some(t) if !t.is_zero() => tokio::time::timeout(t, work).await.ok().flatten(),
        _ => work.await,
    }
}

/// Which HTTP the client speaks, by its first bytes: `h2c` (prior-knowledge preface) or
/// `http/1.1` / `http/1.0` (a request line); `None` for anything else.
pub fn judge_http(buf: &[u8], final_: bool) -> Option<Option<&'static str>> {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        if buf.len() >= H2_PREFACE.len() {
            return Some(Some("h2c"));
        }
        return if final_ { Some(None) } else { None };
    }
    // HTTP/1: METHOD SP target SP HTTP/1.x CRLF
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        // Method must be a token; anything else ends the search early.
        let method_end = buf.iter().position(|b| *b == b' ').unwrap_or(buf.len());
        if !buf[..method_end].iter().all(|b| b.is_ascii_uppercase()) {
            return Some(None);
        }
        return if final_ { Some(None) } else { None };
    };
    let line = &buf[..end];
    let mut parts = line.split(|b| *b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Some(None);
    };
    if method.is_empty() || !method.iter().all(|b| b.is_ascii_uppercase()) || target.is_empty() {
        return Some(None);
    }
    Some(match version {
        b"HTTP/1.1" => Some("http/1.1"),
        b"HTTP/1.0" => Some("http/1.0"),
        _ => None,
    })
}

/// `http_inspector`: the application protocol, and the stream with what was read put back.
pub async fn http_inspector(
    mut io: BoxIo,
    timeout: Option<Duration>,
) -> (Result<Option<&'static str>, ()>, BoxIo) {
    let mut buf = BytesMut::new();
    let got = sniff(
        &mut io,
        &mut buf,
        HTTP_INSPECT_MAX,
        timeout,
        |b, f| match judge_http(b, f) {
            Some(v) => Verdict::Done(v),
            None => Verdict::NeedMore,
        },
    )
    .await;
    let io: BoxIo = Box::new(Rewind::new(buf.freeze(), io));
    (got.ok_or(()), io)
}

/// What `tls_inspector` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// Whether the stream starts with a TLS handshake record.
    pub is_tls: bool,
    /// SNI.
    pub server_name: Option<String>,
    /// ALPN protocols offered.
    pub alpn: Vec<String>,
}

/// Parses a TLS ClientHello (`None`: need more bytes).
pub fn judge_tls(buf: &[u8], final_: bool) -> Option<ClientHello> {
    if buf.is_empty() {
        return if final_ {
            Some(ClientHello::default())
        } else {
            None
        };
    }
    if buf[0] != 0x16 {
        return Some(ClientHello::default());
    }
    if buf.len() < 5 {
        return if final_ {
            Some(ClientHello::default())
        } else {
            None
        };
    }
    let record_len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if buf.len() < 5 + record_len {
        return if final_ {
            Some(ClientHello {
                is_tls: true,
                ..Default::default()
            })
        } else {
            None
        };
    }
    Some(
        parse_client_hello(&buf[5..5 + record_len]).unwrap_or(ClientHello {
            is_tls: true,
            ..Default::default()
        }),
    )
}

fn parse_client_hello(b: &[u8]) -> Option<ClientHello> {
    let mut out = ClientHello {
        is_tls: true,
        ..Default::default()
    };
    // Handshake header: type(1)=1, len(3).
    if *b.first()? != 1 {
        return Some(out);
    }
    let mut p = 4;
    p += 2 + 32; // version, random
    let sid = usize::from(*b.get(p)?);
    p += 1 + sid;
    let suites = usize::from(u16::from_be_bytes([*b.get(p)?, *b.get(p + 1)?]));
    p += 2 + suites;
    let comp = usize::from(*b.get(p)?);
    p += 1 + comp;
    let ext_len = usize::from(u16::from_be_bytes([*b.get(p)?, *b.get(p + 1)?]));
    p += 2;
    let end = (p + ext_len).min(b.len());
    while p + 4 <= end {
        let ty = u16::from_be_bytes([b[p], b[p + 1]]);
        let len = usize::from(u16::from_be_bytes([b[p + 2], b[p + 3]]));
        let data = b.get(p + 4..p + 4 + len)?;
        match ty {
            // server_name: list len(2), type(1)=0, name len(2), name
            0 if data.len() > 5 && data[2] == 0 => {
                let n = usize::from(u16::from_be_bytes([data[3], data[4]]));
                if let Some(name) = data.get(5..5 + n) {
                    out.server_name = std::str::from_utf8(name).ok().map(str::to_owned);
                }
            }
            16 => {
                // ALPN: list len(2), then len(1)+proto repeated
                let mut q = 2;
                while q < data.len() {
                    let n = usize::from(data[q]);
                    if let Some(proto) = data.get(q + 1..q + 1 + n) {
                        out.alpn.push(String::from_utf8_lossy(proto).into_owned());
                    }
                    q += 1 + n;
                }
            }
            _ => {}
        }
        p += 4 + len;
    }
    Some(out)
}

/// `tls_inspector`: TLS or not, SNI and ALPN; the stream with what was read put back.
pub async fn tls_inspector(
    mut io: BoxIo,
    timeout: Option<Duration>,
    max: Option<u32>,
) -> (Result<ClientHello, ()>, BoxIo) {
    let mut buf = BytesMut::new();
    let max = max.map(|m| m as usize).unwrap_or(TLS_INSPECT_MAX);
    let got = sniff(&mut io, &mut buf, max, timeout, |b, f| {
        match judge_tls(b, f) {
            Some(v) => Verdict::Done(v),
            None => Verdict::NeedMore,
        }
    })
    .await;
    let io: BoxIo = Box::new(Rewind::new(buf.freeze(), io));
    (got.ok_or(()), io)
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    #[test]
    fn http_versions_are_told_apart() {
        assert_eq!(judge_http(H2_PREFACE, false), Some(Some("h2c")));
        assert_eq!(judge_http(b"PRI * HTTP/2", false), None);
        assert_eq!(
            judge_http(b"GET / HTTP/1.1\r\nHost: a\r\n", false),
            Some(Some("http/1.1"))
        );
        assert_eq!(
            judge_http(b"POST /x HTTP/1.0\r\n", false),
            Some(Some("http/1.0"))
        );
        assert_eq!(judge_http(b"GET / HT", false), None);
        assert_eq!(judge_http(b"\x16\x03\x01", false), Some(None));
        assert_eq!(judge_http(b"SSH-2.0-OpenSSH\r\n", false), Some(None));
        assert_eq!(judge_http(b"GET / HT", true), Some(None));
    }

    #[tokio::test]
    async fn inspected_bytes_are_replayed() {
        let (mut a, b) = tokio::io::duplex(1024);
        let request = b"GET /path HTTP/1.1\r\nHost: x\r\n\r\n";
        a.write_all(request).await.expect("write");
        let (proto, mut io) = http_inspector(Box::new(b), Some(Duration::from_secs(5))).await;
        assert_eq!(proto, Ok(Some("http/1.1")));
        let mut got = vec![0u8; request.len()];
        io.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, request);
    }

    #[tokio::test]
    async fn silent_clients_time_out() {
        let (_a, b) = tokio::io::duplex(1024);
        let (proto, _) = http_inspector(Box::new(b), Some(Duration::from_millis(50))).await;
        assert_eq!(proto, Err(()));
    }

    #[test]
    fn client_hello_sni_and_alpn() {
        // A minimal ClientHello record with SNI "a.example" and ALPN ["h2", "http/1.1"].
        let sni_name = b"a.example";
        let mut sni = vec![];
        sni.extend_from_slice(&((sni_name.len() + 3) as u16).to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&(sni_name.len() as u16).to_be_bytes());
        sni.extend_from_slice(sni_name);
        let mut alpn_list = vec![];
        for p in [&b"h2"[..], &b"http/1.1"[..]] {
            alpn_list.push(p.len() as u8);
            alpn_list.extend_from_slice(p);
        }
        let mut alpn = (alpn_list.len() as u16).to_be_bytes().to_vec();
        alpn.extend_from_slice(&alpn_list);
        let mut exts = vec![];
        for (ty, data) in [(0u16, sni), (16u16, alpn)] {
            exts.extend_from_slice(&ty.to_be_bytes());
            exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
            exts.extend_from_slice(&data);
        }
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[0u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1u8];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        assert_eq!(judge_tls(&rec[..10], false), None);
        let hello = judge_tls(&rec, false).expect("complete");
        assert!(hello.is_tls);
        assert_eq!(hello.server_name.as_deref(), Some("a.example"));
        assert_eq!(hello.alpn, vec!["h2".to_owned(), "http/1.1".to_owned()]);
        assert_eq!(judge_tls(b"GET /", false), Some(ClientHello::default()));
    }
}
