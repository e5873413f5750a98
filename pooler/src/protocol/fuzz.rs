//! Property tests on arbitrary bytes: framing, every decoder and the response scanner
//! never panic, never hand out a frame longer than the bound, and never reserve more
//! than one bounded message ahead.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::*;

const MAX: usize = 4096;

fn frames_of(tag: u8, body: &[u8]) -> Frame {
    let mut raw = vec![tag];
    raw.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    raw.extend_from_slice(body);
    Frame {
        tag,
        raw: Bytes::from(raw),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn split_frame_is_bounded(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..32)) {
        let mut buf = BytesMut::new();
        for c in chunks {
            buf.extend_from_slice(&c);
            loop {
                match split_frame(&mut buf, MAX) {
                    Ok(Some(f)) => prop_assert!(f.raw.len() <= MAX + 1),
                    Ok(None) => break,
                    Err(_) => return Ok(()),
                }
            }
            prop_assert!(buf.capacity() <= 2 * (MAX + 1) + 64 * 32, "capacity {}", buf.capacity());
        }
    }

    #[test]
    fn startup_packets_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut buf = BytesMut::from(&bytes[..]);
        if let Ok(Some(body)) = split_startup(&mut buf) {
            let _ = Startup::parse(body);
        }
        let _ = Startup::parse(Bytes::from(bytes));
    }

    #[test]
    fn decoders_never_panic(body in prop::collection::vec(any::<u8>(), 0..128)) {
        let _ = Query::decode(&frames_of(b'Q', &body));
        let _ = Parse::decode(&frames_of(b'P', &body));
        let _ = Describe::decode(&frames_of(b'D', &body));
        let _ = Close::decode(&frames_of(b'C', &body));
        let _ = PasswordMessage::decode(&frames_of(b'p', &body));
        let _ = SaslInitialResponse::decode(&frames_of(b'p', &body));
        let _ = SaslResponse::decode(&frames_of(b'p', &body));
        let raw = frames_of(b'B', &body).raw;
        if let Ok((_, range)) = Bind::peek_statement(&raw) {
            prop_assert!(range.end <= raw.len());
            let mut out = BytesMut::new();
            Bind::write_renamed(&raw, range, "sluice_x", &mut out);
        }
        let _ = ReadyForQuery::decode(&frames_of(b'Z', &body));
        let _ = ParameterStatus::decode(&frames_of(b'S', &body));
        let _ = ErrorFields::decode(&frames_of(b'E', &body));
        let _ = BackendKeyData::decode(&frames_of(b'K', &body));
        let _ = Authentication::decode(&frames_of(b'R', &body));
    }

    #[test]
    fn scanner_never_overruns(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..32)) {
        let mut s = ResponseScanner::default();
        let mut buf: Vec<u8> = Vec::new();
        for c in chunks {
            buf.extend_from_slice(&c);
            loop {
                match s.next(&buf) {
                    Response::NeedMore => break,
                    Response::Pass(n) => {
                        prop_assert!(n <= buf.len() && n > 0);
                        s.consumed(n);
                        buf.drain(..n);
                    }
                    Response::Message { len, .. } => s.accept(len),
                }
            }
        }
    }
}
