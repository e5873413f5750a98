//! Message-boundary scanner for the server-to-client byte stream.
//!
//! The hot path forwards server bytes in bulk; this scanner only finds where each
//! message starts so the caller can look at its tag (and ReadyForQuery's status) and
//! pass the rest through untouched, even when a message spans many reads.

/// What the next bytes of the stream are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    /// The first `n` bytes continue a message already accepted: pass them on.
    Pass(usize),
    /// A new message starts here: `tag`, its total length in bytes (tag included),
    /// and for ReadyForQuery its status byte.
    Message { tag: u8, len: usize, status: u8 },
    /// Not enough bytes to see the next header.
    NeedMore,
}

/// Tracks how much of the current message is still to come; see the module docs.
#[derive(Debug, Default)]
pub struct ResponseScanner {
    remaining: usize,
}

impl ResponseScanner {
    /// Looks at the front of `buf` (the bytes not yet consumed).
    pub fn next(&self, buf: &[u8]) -> Response {
        if self.remaining > 0 {
            return if buf.is_empty() {
                Response::NeedMore
            } else {
                Response::Pass(self.remaining.min(buf.len()))
            };
        }
        if buf.len() < 5 {
            return Response::NeedMore;
        }
        let tag = buf[0];
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize + 1;
        let mut status = 0;
        if tag == b'Z' {
            if buf.len() < 6 {
                return Response::NeedMore;
            }
            status = buf[5];
        }
        Response::Message { tag, len, status }
    }

    /// Whether the next byte starts a new message.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// The caller accepted a message of `len` bytes: it will be passed through.
    pub fn accept(&mut self, len: usize) {
        self.remaining = len;
    }

    /// The caller consumed `n` bytes reported by [`Response::Pass`].
    pub fn consumed(&mut self, n: usize) {
        self.remaining -= n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_boundaries_across_partial_reads() {
        let mut s = ResponseScanner::default();
        let stream = b"D\0\0\0\x08abcdZ\0\0\0\x05I";
        assert_eq!(s.next(&stream[..3]), Response::NeedMore);
        assert_eq!(
            s.next(stream),
            Response::Message {
                tag: b'D',
                len: 9,
                status: 0
            }
        );
        s.accept(9);
        assert_eq!(s.next(&stream[..7]), Response::Pass(7));
        s.consumed(7);
        assert_eq!(s.next(&stream[7..]), Response::Pass(2));
        s.consumed(2);
        assert_eq!(s.next(&stream[9..14]), Response::NeedMore);
        assert_eq!(
            s.next(&stream[9..]),
            Response::Message {
                tag: b'Z',
                len: 6,
                status: b'I'
            }
        );
    }
}
