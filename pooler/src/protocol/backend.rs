//! Backend (server to client) messages the pooler must understand; one type each.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::frame::{Frame, expect, finish, read_cstr};
use crate::error::{ClientError, Error, Result};

/// Authentication request (`R`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    Ok,
    CleartextPassword,
    Md5Password { salt: [u8; 4] },
    Sasl { mechanisms: Vec<String> },
    SaslContinue(Bytes),
    SaslFinal(Bytes),
}

impl Authentication {
    pub fn decode(f: &Frame) -> Result<Self> {
        let mut b = expect(f, b'R')?;
        if b.len() < 4 {
            return Err(Error::Protocol("short Authentication".into()));
        }
        Ok(match b.get_i32() {
            0 => Authentication::Ok,
            3 => Authentication::CleartextPassword,
            5 if b.len() == 4 => Authentication::Md5Password {
                salt: [b[0], b[1], b[2], b[3]],
            },
            10 => {
                let mut mechanisms = Vec::new();
                loop {
                    let m = read_cstr(&mut b)?;
                    if m.is_empty() {
                        break;
                    }
                    mechanisms.push(m);
                }
                Authentication::Sasl { mechanisms }
            }
            11 => Authentication::SaslContinue(b),
            12 => Authentication::SaslFinal(b),
            n => {
                return Err(Error::AuthUnsupported(format!(
                    "server requested method {n}"
                )));
            }
        })
    }

    pub fn encode(&self) -> Bytes {
        let mut body = BytesMut::new();
        match self {
            Authentication::Ok => body.put_i32(0),
            Authentication::CleartextPassword => body.put_i32(3),
            Authentication::Md5Password { salt } => {
                body.put_i32(5);
                body.put_slice(salt);
            }
            Authentication::Sasl { mechanisms } => {
                body.put_i32(10);
                for m in mechanisms {
                    body.put_slice(m.as_bytes());
                    body.put_u8(0);
                }
                body.put_u8(0);
            }
            Authentication::SaslContinue(d) => {
                body.put_i32(11);
                body.put_slice(d);
            }
            Authentication::SaslFinal(d) => {
                body.put_i32(12);
                body.put_slice(d);
            }
        }
        finish(b'R', &body)
    }
}

/// Transaction status carried by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TxStatus {
    /// The status of a ReadyForQuery status byte (`I`, `T`, `E`); anything else reads
    /// as idle.
    pub fn from_byte(b: u8) -> Self {
        match b {
            b'T' => TxStatus::InTransaction,
            b'E' => TxStatus::Failed,
            _ => TxStatus::Idle,
        }
    }
}

/// ReadyForQuery (`Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadyForQuery(pub TxStatus);

impl ReadyForQuery {
    pub fn decode(f: &Frame) -> Result<Self> {
        Self::from_body(&expect(f, b'Z')?)
    }
    pub fn from_body(b: &[u8]) -> Result<Self> {
        match b {
            [b'I'] => Ok(Self(TxStatus::Idle)),
            [b'T'] => Ok(Self(TxStatus::InTransaction)),
            [b'E'] => Ok(Self(TxStatus::Failed)),
            _ => Err(Error::Protocol("bad ReadyForQuery".into())),
        }
    }
    pub fn encode(&self) -> Bytes {
        let s = match self.0 {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        };
        finish(b'Z', &[s])
    }
}

/// ParameterStatus (`S`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParameterStatus {
    pub name: String,
    pub value: String,
}

impl ParameterStatus {
    pub fn decode(f: &Frame) -> Result<Self> {
        let mut b = expect(f, b'S')?;
        Ok(Self {
            name: read_cstr(&mut b)?,
            value: read_cstr(&mut b)?,
        })
    }
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        Self::encode_into(&self.name, &self.value, &mut out);
        out.freeze()
    }

    /// Appends the message for `name` = `value` to `out`, copying nothing else.
    pub fn encode_into(name: &str, value: &str, out: &mut BytesMut) {
        let len = 4 + name.len() + 1 + value.len() + 1;
        out.reserve(1 + len);
        out.put_u8(b'S');
        out.put_u32(len as u32);
        out.put_slice(name.as_bytes());
        out.put_u8(0);
        out.put_slice(value.as_bytes());
        out.put_u8(0);
    }
}

/// BackendKeyData (`K`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendKeyData {
    pub pid: i32,
    pub secret: i32,
}

impl BackendKeyData {
    pub fn decode(f: &Frame) -> Result<Self> {
        let mut b = expect(f, b'K')?;
        if b.len() != 8 {
            return Err(Error::Protocol("bad BackendKeyData".into()));
        }
        Ok(Self {
            pid: b.get_i32(),
            secret: b.get_i32(),
        })
    }
    pub fn encode(&self) -> Bytes {
        let mut body = BytesMut::new();
        body.put_i32(self.pid);
        body.put_i32(self.secret);
        finish(b'K', &body)
    }
}

/// The fields of an ErrorResponse (`E`) or NoticeResponse that the pooler reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl ErrorFields {
    pub fn decode(f: &Frame) -> Result<Self> {
        let mut b = expect(f, b'E')?;
        let mut e = ErrorFields::default();
        while b.has_remaining() {
            let t = b.get_u8();
            if t == 0 {
                break;
            }
            let v = read_cstr(&mut b)?;
            match t {
                b'V' => e.severity = v,
                b'S' if e.severity.is_empty() => e.severity = v,
                b'C' => e.code = v,
                b'M' => e.message = v,
                _ => {}
            }
        }
        Ok(e)
    }
}

/// Every field of a whole ErrorResponse message (`raw`: tag, length, body) as (type,
/// value); what does not parse is left out.
pub fn error_fields(raw: &[u8]) -> Vec<(u8, String)> {
    let mut out = Vec::new();
    let mut body = raw.get(5..).unwrap_or_default();
    while let Some((&t, rest)) = body.split_first() {
        if t == 0 {
            break;
        }
        let Some(end) = rest.iter().position(|&c| c == 0) else {
            break;
        };
        out.push((t, String::from_utf8_lossy(&rest[..end]).into_owned()));
        body = &rest[end + 1..];
    }
    out
}

/// ErrorResponse (`E`) for a pooler-generated error.
pub fn error_response(e: &ClientError) -> Bytes {
    let mut body = BytesMut::new();
    for (t, v) in [(b'S', e.severity), (b'V', e.severity), (b'C', e.code)] {
        body.put_u8(t);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(b'M');
    body.put_slice(e.message.replace('\0', " ").as_bytes());
    body.put_u8(0);
    body.put_u8(0);
    finish(b'E', &body)
}

/// ParseComplete (`1`).
pub fn parse_complete() -> Bytes {
    finish(b'1', &[])
}

/// CloseComplete (`3`).
pub fn close_complete() -> Bytes {
    finish(b'3', &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::split_frame;

    fn frame(b: Bytes) -> Frame {
        let mut buf = BytesMut::from(&b[..]);
        split_frame(&mut buf, 1 << 20).unwrap().unwrap()
    }

    #[test]
    fn authentication_roundtrip() {
        for a in [
            Authentication::Ok,
            Authentication::CleartextPassword,
            Authentication::Md5Password { salt: [1, 2, 3, 4] },
            Authentication::Sasl {
                mechanisms: vec!["SCRAM-SHA-256".into()],
            },
            Authentication::SaslContinue(Bytes::from_static(b"r=abc")),
            Authentication::SaslFinal(Bytes::from_static(b"v=xyz")),
        ] {
            assert_eq!(Authentication::decode(&frame(a.encode())).unwrap(), a);
        }
        assert!(Authentication::decode(&frame(finish(b'R', &[0, 0, 0, 7]))).is_err());
    }

    #[test]
    fn ready_for_query_status() {
        let z = ReadyForQuery(TxStatus::Failed);
        assert_eq!(ReadyForQuery::decode(&frame(z.encode())).unwrap(), z);
        assert!(ReadyForQuery::decode(&frame(finish(b'Z', b"Q"))).is_err());
    }

    #[test]
    fn error_response_fields() {
        let e = ClientError::fatal("53300", "too many");
        let f = ErrorFields::decode(&frame(error_response(&e))).unwrap();
        let all = error_fields(&error_response(&e));
        assert!(all.contains(&(b'C', e.code.to_string())), "{all:?}");
        assert!(all.contains(&(b'M', e.message.clone())), "{all:?}");
        assert_eq!(
            (f.severity.as_str(), f.code.as_str(), f.message.as_str()),
            ("FATAL", "53300", "too many")
        );
    }

    #[test]
    fn param_status_and_key_data() {
        let p = ParameterStatus {
            name: "TimeZone".into(),
            value: "UTC".into(),
        };
        assert_eq!(ParameterStatus::decode(&frame(p.encode())).unwrap(), p);
        let k = BackendKeyData {
            pid: 42,
            secret: -1,
        };
        assert_eq!(BackendKeyData::decode(&frame(k.encode())).unwrap(), k);
        assert!(BackendKeyData::decode(&frame(finish(b'K', &[0; 4]))).is_err());
    }
}
