//! Counting gRPC messages in a body as it streams (Istio's `istio_request_messages_total` /
//! `istio_response_messages_total`, which Envoy's `grpc_stats` filter feeds): each message is a
//! 5-byte prefix (compressed flag, 32-bit big-endian length) and that many bytes, split across
//! HTTP/2 DATA frames any way the sender likes.

/// The message framing state of one direction of a gRPC stream.
#[derive(Debug, Default, Clone)]
pub struct GrpcFrames {
    /// Bytes of the current message still to come.
    remaining: u64,
    /// The prefix read so far.
    prefix: [u8; 5],
    prefix_len: usize,
    /// Messages whose prefix has been seen.
    count: u64,
}

impl GrpcFrames {
    /// Reads `data`; returns the messages counted so far.
    pub fn feed(&mut self, mut data: &[u8]) -> u64 {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = (self.remaining.min(data.len() as u64)) as usize;
                self.remaining -= n as u64;
                data = &data[n..];
                continue;
            }
            let take = (5 - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&data[..take]);
            self.prefix_len += take;
            data = &data[take..];
            if self.prefix_len == 5 {
                self.count += 1;
                self.prefix_len = 0;
                self.remaining = u64::from(u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]));
            }
        }
        self.count
    }

    /// Messages counted so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: u32) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len as usize));
        m
    }

    #[test]
    fn messages_split_anywhere_are_counted_once() {
        let mut stream = Vec::new();
        for len in [0, 3, 70_000, 1] {
            stream.extend(message(len));
        }
        for chunk in [1, 2, 5, 6, 1000, stream.len()] {
            let mut f = GrpcFrames::default();
            for piece in stream.chunks(chunk) {
                f.feed(piece);
            }
            assert_eq!(f.count(), 4, "chunks of {chunk}");
        }
        let mut f = GrpcFrames::default();
        assert_eq!(
            f.feed(&[0, 0, 0]),
            0,
            "a partial prefix is not a message yet"
        );
        assert_eq!(f.feed(&[0, 1]), 1);
        assert_eq!(f.feed(&[9]), 1, "its one byte of body");
        assert_eq!(f.feed(&[]), 1);
    }
}
