//! Check-then-parse framing over `BytesMut`: a frame is split off only once it is
//! complete, and every length is checked against a bound before anything is buffered.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{Error, Result};

/// Largest startup packet accepted (PostgreSQL itself allows 10 000 bytes).
pub const MAX_STARTUP_LEN: usize = 10_000;

/// One tagged protocol message: `raw` is the whole frame (tag, length, body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub raw: Bytes,
}

impl Frame {
    /// The message body (after tag and length).
    pub fn body(&self) -> Bytes {
        self.raw.slice(5..)
    }
}

/// Splits one complete tagged message off the front of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed. A length below 4 or above `max`
/// (body plus length field) is an error, detected from the header alone.
pub fn split_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 {
        return Err(Error::Protocol(format!("invalid message length {len}")));
    }
    if len > max {
        return Err(Error::TooLarge { len, max });
    }
    if buf.len() < len + 1 {
        buf.reserve(len + 1 - buf.len());
        return Ok(None);
    }
    let tag = buf[0];
    let raw = buf.split_to(len + 1).freeze();
    Ok(Some(Frame { tag, raw }))
}

/// Splits one complete untagged startup-phase packet (length, then body) off `buf`.
/// Returns the body without the length word.
pub fn split_startup(buf: &mut BytesMut) -> Result<Option<Bytes>> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !(8..=MAX_STARTUP_LEN).contains(&len) {
        return Err(Error::BadStartupLength(len));
    }
    if buf.len() < len {
        return Ok(None);
    }
    let mut p = buf.split_to(len);
    p.advance(4);
    Ok(Some(p.freeze()))
}

/// Reads a NUL-terminated UTF-8 string off the front of `b`.
pub fn read_cstr(b: &mut Bytes) -> Result<String> {
    let mut rest = &b[..];
    let s = cstr(&mut rest)?.to_string();
    b.advance(b.len() - rest.len());
    Ok(s)
}

/// [`read_cstr`] without copying: the string borrowed from `b`, which moves past it.
pub fn cstr<'a>(b: &mut &'a [u8]) -> Result<&'a str> {
    // `CStr` finds the NUL with the standard library's word-at-a-time search.
    let c = std::ffi::CStr::from_bytes_until_nul(b)
        .map_err(|_| Error::Protocol("unterminated string".into()))?;
    let s = c
        .to_str()
        .map_err(|_| Error::Protocol("invalid UTF-8 in string".into()))?;
    *b = &b[s.len() + 1..];
    Ok(s)
}

/// One whole message: tag, length (body + 4), body.
pub(super) fn finish(tag: u8, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(body.len() + 5);
    b.put_u8(tag);
    b.put_u32(body.len() as u32 + 4);
    b.put_slice(body);
    b.freeze()
}

/// The body of `f` when it carries `tag`; a protocol error otherwise.
pub(super) fn expect(f: &Frame, tag: u8) -> Result<Bytes> {
    expect_tag(f, tag)?;
    Ok(f.body())
}

/// A protocol error unless `f` carries `tag`.
pub(super) fn expect_tag(f: &Frame, tag: u8) -> Result<()> {
    if f.tag != tag {
        return Err(Error::Protocol(format!(
            "expected '{}', got '{}'",
            tag as char, f.tag as char
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_complete_frame_then_splits() {
        let mut buf = BytesMut::from(&b"Q\0\0\0\x09SEL"[..]);
        assert_eq!(split_frame(&mut buf, 100).unwrap(), None);
        buf.extend_from_slice(b"1\0X");
        let f = split_frame(&mut buf, 100).unwrap().unwrap();
        assert_eq!(f.tag, b'Q');
        assert_eq!(&f.body()[..], b"SEL1\0");
        assert_eq!(&buf[..], b"X");
    }

    #[test]
    fn rejects_short_and_oversize_lengths_from_header() {
        let mut buf = BytesMut::from(&b"Q\0\0\0\x02"[..]);
        assert!(matches!(
            split_frame(&mut buf, 100),
            Err(Error::Protocol(_))
        ));
        let mut buf = BytesMut::from(&b"Q\x7f\0\0\0"[..]);
        assert!(matches!(
            split_frame(&mut buf, 1 << 20),
            Err(Error::TooLarge { .. })
        ));
    }

    #[test]
    fn startup_bounds() {
        let mut buf = BytesMut::from(&b"\0\0\0\x04"[..]);
        assert!(split_startup(&mut buf).is_err());
        let mut buf = BytesMut::from(&b"\0\x01\0\0"[..]);
        assert!(matches!(
            split_startup(&mut buf),
            Err(Error::BadStartupLength(65536))
        ));
        let mut buf = BytesMut::from(&b"\0\0\0\x08\x04\xd2\x16\x2f"[..]);
        assert_eq!(
            &split_startup(&mut buf).unwrap().unwrap()[..],
            b"\x04\xd2\x16\x2f"
        );
    }

    #[test]
    fn cstr() {
        let mut b = Bytes::from_static(b"abc\0def");
        assert_eq!(read_cstr(&mut b).unwrap(), "abc");
        assert!(read_cstr(&mut b).is_err());
    }
}
