//! Frontend (client to server) messages the pooler must understand; one type each.

use std::collections::HashMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::frame::{Frame, cstr, expect, expect_tag, finish, read_cstr};
use crate::error::{Error, Result};

const PROTOCOL_V3: u32 = 196_608;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
/// A CancelRequest one pooler passes to the peer that issued the key (`1234.5690`, a
/// code PostgreSQL does not use: a real server refuses it, and a pooler never passes it
/// on again).
const PEER_CANCEL_REQUEST: u32 = 80_877_114;

/// A startup-phase packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    /// SSLRequest: answered `N`.
    Ssl,
    /// GSSENCRequest: answered `N`.
    GssEnc,
    /// CancelRequest with the pooler's own keys.
    Cancel(CancelRequest),
    /// StartupMessage (protocol 3.x; the pooler speaks 3.0).
    Message(StartupMessage),
}

/// The parameters of a StartupMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub params: HashMap<String, String>,
    /// The minor protocol version asked for (3.x).
    pub minor: u16,
    /// Protocol options (`_pq_.*` keys), none of which the pooler knows.
    pub protocol_options: Vec<String>,
}

impl StartupMessage {
    /// NegotiateProtocolVersion (`v`), as PostgreSQL sends it when the client asked for
    /// a newer minor version or for protocol options: the pooler speaks 3.0 and knows
    /// none of the options. `None` when there is nothing to negotiate.
    pub fn negotiation(&self) -> Option<Bytes> {
        if self.minor == 0 && self.protocol_options.is_empty() {
            return None;
        }
        let mut body = BytesMut::new();
        body.put_u32(0);
        body.put_u32(self.protocol_options.len() as u32);
        for o in &self.protocol_options {
            put_cstr(&mut body, o);
        }
        Some(finish(b'v', &body))
    }
}

/// CancelRequest: process id and secret key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelRequest {
    pub pid: i32,
    pub secret: i32,
    /// Passed on by a peer pooler (see `Shared::cancel`).
    pub from_peer: bool,
}

impl CancelRequest {
    /// The 16-byte packet.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(16);
        b.put_u32(16);
        b.put_u32(if self.from_peer {
            PEER_CANCEL_REQUEST
        } else {
            CANCEL_REQUEST
        });
        b.put_i32(self.pid);
        b.put_i32(self.secret);
        b.freeze()
    }
}

impl Startup {
    /// Parses a startup packet body (after the length word).
    pub fn parse(mut body: Bytes) -> Result<Self> {
        if body.len() < 4 {
            return Err(Error::Protocol("startup packet too short".into()));
        }
        let code = body.get_u32();
        match code {
            SSL_REQUEST if body.is_empty() => Ok(Startup::Ssl),
            GSSENC_REQUEST if body.is_empty() => Ok(Startup::GssEnc),
            CANCEL_REQUEST | PEER_CANCEL_REQUEST if body.len() == 8 => {
                Ok(Startup::Cancel(CancelRequest {
                    pid: body.get_i32(),
                    secret: body.get_i32(),
                    from_peer: code == PEER_CANCEL_REQUEST,
                }))
            }
            version if version >> 16 == PROTOCOL_V3 >> 16 => {
                let mut params = HashMap::new();
                let mut protocol_options = Vec::new();
                loop {
                    let k = read_cstr(&mut body)?;
                    if k.is_empty() {
                        break;
                    }
                    let v = read_cstr(&mut body)?;
                    if k.starts_with("_pq_.") {
                        protocol_options.push(k);
                    } else {
                        params.insert(k, v);
                    }
                }
                if !body.is_empty() {
                    return Err(Error::Protocol("trailing bytes in startup packet".into()));
                }
                if !params.contains_key("user") {
                    return Err(Error::Protocol("no user name in startup packet".into()));
                }
                Ok(Startup::Message(StartupMessage {
                    params,
                    minor: (version & 0xffff) as u16,
                    protocol_options,
                }))
            }
            other => Err(Error::Protocol(format!(
                "unsupported frontend protocol {}.{}",
                other >> 16,
                other & 0xffff
            ))),
        }
    }
}

/// Encodes a StartupMessage (protocol 3.0) with the given parameters.
pub fn startup_message(params: &[(&str, &str)]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u32(0);
    b.put_u32(PROTOCOL_V3);
    for (k, v) in params {
        put_cstr(&mut b, k);
        put_cstr(&mut b, v);
    }
    b.put_u8(0);
    let len = b.len() as u32;
    b[..4].copy_from_slice(&len.to_be_bytes());
    b.freeze()
}

/// Writes `s` NUL-terminated. A NUL inside `s` (which no decoded message holds) ends it
/// there: it must never start another field, as in a startup packet's next parameter.
fn put_cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.split('\0').next().unwrap_or_default().as_bytes());
    b.put_u8(0);
}

/// Terminate (`X`).
pub fn terminate() -> Bytes {
    finish(b'X', &[])
}

/// PasswordMessage (`p`) holding a cleartext or md5 password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordMessage {
    pub password: Vec<u8>,
}

impl PasswordMessage {
    pub fn decode(f: &Frame) -> Result<Self> {
        let b = expect(f, b'p')?;
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        Ok(Self {
            password: b[..end].to_vec(),
        })
    }
    pub fn encode(&self) -> Bytes {
        let mut body = self.password.clone();
        body.push(0);
        finish(b'p', &body)
    }
}

/// SASLInitialResponse (`p` during SASL): mechanism and initial data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaslInitialResponse {
    pub mechanism: String,
    pub data: Bytes,
}

impl SaslInitialResponse {
    pub fn decode(f: &Frame) -> Result<Self> {
        let mut b = expect(f, b'p')?;
        let mechanism = read_cstr(&mut b)?;
        if b.len() < 4 {
            return Err(Error::Protocol("short SASLInitialResponse".into()));
        }
        let len = b.get_i32();
        if len < 0 || len as usize != b.len() {
            return Err(Error::Protocol("bad SASLInitialResponse length".into()));
        }
        Ok(Self { mechanism, data: b })
    }
    pub fn encode(&self) -> Bytes {
        let mut body = BytesMut::new();
        put_cstr(&mut body, &self.mechanism);
        body.put_i32(self.data.len() as i32);
        body.put_slice(&self.data);
        finish(b'p', &body)
    }
}

/// SASLResponse (`p` after the initial response): raw SASL data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaslResponse {
    pub data: Bytes,
}

impl SaslResponse {
    pub fn decode(f: &Frame) -> Result<Self> {
        Ok(Self {
            data: expect(f, b'p')?,
        })
    }
    pub fn encode(&self) -> Bytes {
        finish(b'p', &self.data)
    }
}

/// Query (`Q`): simple query text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub sql: String,
}

impl Query {
    pub fn decode(f: &Frame) -> Result<Self> {
        let mut b = expect(f, b'Q')?;
        Ok(Self {
            sql: read_cstr(&mut b)?,
        })
    }
    pub fn encode(&self) -> Bytes {
        let mut body = BytesMut::new();
        put_cstr(&mut body, &self.sql);
        finish(b'Q', &body)
    }
}

/// Parse (`P`): statement name, query text and parameter types (kept raw).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse {
    pub name: String,
    pub query: String,
    /// Parameter count and type OIDs, unparsed.
    pub param_types: Bytes,
}

impl Parse {
    /// Full decode (the rewrite uses [`Parse::check`], then [`Parse::from_checked`]).
    #[cfg(test)]
    pub fn decode(f: &Frame) -> Result<Self> {
        Ok(Self::from_checked(f, Self::check(f)?))
    }

    /// The owned message from what [`Parse::check`] returned for `f`.
    pub fn from_checked(f: &Frame, (name, query, types): (&str, &str, &[u8])) -> Self {
        Self {
            name: name.to_string(),
            query: query.to_string(),
            param_types: f.raw.slice_ref(types),
        }
    }

    /// Checks `f` as [`Parse::decode`] does, copying nothing: its statement name, query
    /// and raw parameter types (count included), borrowed from `f`.
    ///
    /// # Errors
    /// A protocol error for a message that is not a whole, well-formed Parse.
    pub fn check(f: &Frame) -> Result<(&str, &str, &[u8])> {
        expect_tag(f, b'P')?;
        let mut b = &f.raw[5..];
        let name = cstr(&mut b)?;
        let query = cstr(&mut b)?;
        if b.len() < 2 {
            return Err(Error::Protocol("short Parse".into()));
        }
        let n = u16::from_be_bytes([b[0], b[1]]) as usize;
        if b.len() != 2 + 4 * n {
            return Err(Error::Protocol("bad Parse parameter types".into()));
        }
        Ok((name, query, b))
    }
    pub fn encode(&self) -> Bytes {
        let mut body = BytesMut::with_capacity(self.query.len() + self.name.len() + 8);
        put_cstr(&mut body, &self.name);
        put_cstr(&mut body, &self.query);
        body.put_slice(&self.param_types);
        finish(b'P', &body)
    }
}

/// Bind (`B`): portal and statement names; the rest is kept raw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub portal: String,
    pub statement: String,
    pub rest: Bytes,
}

impl Bind {
    /// Full decode (the hot path uses [`Bind::peek_statement`] instead).
    #[cfg(test)]
    pub fn decode(f: &Frame) -> Result<Self> {
        let mut b = expect(f, b'B')?;
        let portal = read_cstr(&mut b)?;
        let statement = read_cstr(&mut b)?;
        Ok(Self {
            portal,
            statement,
            rest: b,
        })
    }
    /// Zero-copy look at a raw Bind frame: the statement name and its byte range.
    pub fn peek_statement(raw: &[u8]) -> Result<(&str, std::ops::Range<usize>)> {
        let bad = || Error::Protocol("malformed Bind".into());
        if raw.len() < 5 || raw[0] != b'B' {
            return Err(bad());
        }
        let portal_end = 5 + raw[5..].iter().position(|&c| c == 0).ok_or_else(bad)?;
        let start = portal_end + 1;
        let end = start
            + raw
                .get(start..)
                .ok_or_else(bad)?
                .iter()
                .position(|&c| c == 0)
                .ok_or_else(bad)?;
        let name = std::str::from_utf8(&raw[start..end]).map_err(|_| bad())?;
        Ok((name, start..end))
    }

    /// Appends `raw` (a Bind frame) to `out` with the statement name in `range`
    /// replaced by `statement`, without intermediate allocations.
    pub fn write_renamed(
        raw: &[u8],
        range: std::ops::Range<usize>,
        statement: &str,
        out: &mut BytesMut,
    ) {
        let len = raw.len() - 1 - range.len() + statement.len();
        out.reserve(len + 1);
        out.put_u8(b'B');
        out.put_u32(len as u32);
        out.put_slice(&raw[5..range.start]);
        out.put_slice(statement.as_bytes());
        out.put_slice(&raw[range.end..]);
    }

    #[cfg(test)]
    pub fn encode(&self) -> Bytes {
        let mut body = BytesMut::with_capacity(self.rest.len() + 32);
        put_cstr(&mut body, &self.portal);
        put_cstr(&mut body, &self.statement);
        body.put_slice(&self.rest);
        finish(b'B', &body)
    }
}

/// Whether Describe/Close address a prepared statement or a portal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Statement,
    Portal,
}

fn target_name(mut b: Bytes) -> Result<(Target, String)> {
    if b.is_empty() {
        return Err(Error::Protocol("empty Describe/Close".into()));
    }
    let t = match b.get_u8() {
        b'S' => Target::Statement,
        b'P' => Target::Portal,
        _ => return Err(Error::Protocol("bad Describe/Close target".into())),
    };
    let name = read_cstr(&mut b)?;
    if !b.is_empty() {
        return Err(Error::Protocol("trailing bytes in Describe/Close".into()));
    }
    Ok((t, name))
}

fn encode_target(tag: u8, t: Target, name: &str) -> Bytes {
    let mut body = BytesMut::new();
    body.put_u8(if t == Target::Statement { b'S' } else { b'P' });
    put_cstr(&mut body, name);
    finish(tag, &body)
}

/// Describe (`D`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Describe {
    pub target: Target,
    pub name: String,
}

impl Describe {
    pub fn decode(f: &Frame) -> Result<Self> {
        let (target, name) = target_name(expect(f, b'D')?)?;
        Ok(Self { target, name })
    }
    pub fn encode(&self) -> Bytes {
        encode_target(b'D', self.target, &self.name)
    }
}

/// Close (`C`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub target: Target,
    pub name: String,
}

impl Close {
    pub fn decode(f: &Frame) -> Result<Self> {
        let (target, name) = target_name(expect(f, b'C')?)?;
        Ok(Self { target, name })
    }
    pub fn encode(&self) -> Bytes {
        encode_target(b'C', self.target, &self.name)
    }
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
    fn startup_roundtrip_and_special_codes() {
        let raw = startup_message(&[("user", "app"), ("database", "db")]);
        let Startup::Message(m) = Startup::parse(raw.slice(4..)).unwrap() else {
            panic!()
        };
        assert_eq!(m.params["user"], "app");
        assert_eq!(
            Startup::parse(Bytes::from_static(&[4, 210, 22, 47])).unwrap(),
            Startup::Ssl
        );
        assert_eq!(
            Startup::parse(Bytes::from_static(&[4, 210, 22, 48])).unwrap(),
            Startup::GssEnc
        );
        for from_peer in [false, true] {
            let c = CancelRequest {
                pid: 7,
                secret: -3,
                from_peer,
            };
            assert_eq!(
                Startup::parse(c.encode().slice(4..)).unwrap(),
                Startup::Cancel(c)
            );
        }
    }

    #[test]
    fn startup_rejects_garbage() {
        assert!(Startup::parse(Bytes::from_static(b"\x00\x02\x00\x00user\0")).is_err());
        assert!(Startup::parse(Bytes::from_static(b"\x00\x03\x00\x00db\0x\0\0")).is_err());
        assert!(Startup::parse(Bytes::from_static(b"\x00\x03\x00\x00user\0a\0\0junk")).is_err());
        assert!(Startup::parse(Bytes::from_static(b"\x12\x34\x56\x78")).is_err());
    }

    #[test]
    fn parse_bind_describe_close_roundtrip() {
        let p = Parse {
            name: "s1".into(),
            query: "select $1".into(),
            param_types: Bytes::from_static(&[0, 1, 0, 0, 0, 23]),
        };
        assert_eq!(Parse::decode(&frame(p.encode())).unwrap(), p);
        let b = Bind {
            portal: "".into(),
            statement: "s1".into(),
            rest: Bytes::from_static(&[0, 0]),
        };
        assert_eq!(Bind::decode(&frame(b.encode())).unwrap(), b);
        let raw = b.encode();
        let (name, range) = Bind::peek_statement(&raw).unwrap();
        assert_eq!(name, "s1");
        let mut out = BytesMut::new();
        Bind::write_renamed(&raw, range, "sluice_abc", &mut out);
        let renamed = Bind::decode(&frame(out.freeze())).unwrap();
        assert_eq!(
            renamed,
            Bind {
                statement: "sluice_abc".into(),
                ..b.clone()
            }
        );
        assert!(Bind::peek_statement(b"B\0\0\0\x06ab").is_err());
        let d = Describe {
            target: Target::Statement,
            name: "s1".into(),
        };
        assert_eq!(Describe::decode(&frame(d.encode())).unwrap(), d);
        let c = Close {
            target: Target::Portal,
            name: "".into(),
        };
        assert_eq!(Close::decode(&frame(c.encode())).unwrap(), c);
        let q = Query {
            sql: "select 1".into(),
        };
        assert_eq!(Query::decode(&frame(q.encode())).unwrap(), q);
    }

    #[test]
    fn malformed_bodies_are_errors() {
        let f = frame(finish(b'P', b"s1\0select"));
        assert!(Parse::decode(&f).is_err());
        let f = frame(finish(b'P', b"s1\0q\0\0\x02\0\0\0\x17"));
        assert!(Parse::decode(&f).is_err());
        let f = frame(finish(b'P', b"\0q\0\0\x02\0\0\0\x17"));
        assert!(Parse::check(&f).is_err(), "unnamed, but short of its types");
        let f = frame(finish(b'P', b"\0\xff\0\0\0"));
        assert!(Parse::check(&f).is_err(), "not UTF-8");
        let f = frame(finish(b'P', b"\0select 1\0\0\x01\0\0\0\x17"));
        let (name, query, types) = Parse::check(&f).unwrap();
        assert_eq!(
            (name, query, types),
            ("", "select 1", &b"\0\x01\0\0\0\x17"[..])
        );
        let f = frame(finish(b'D', b"Xname\0"));
        assert!(Describe::decode(&f).is_err());
        let f = frame(finish(b'p', b"SCRAM-SHA-256\0\0\0\0\x09abc"));
        assert!(SaslInitialResponse::decode(&f).is_err());
    }

    #[test]
    fn sasl_initial_roundtrip() {
        let s = SaslInitialResponse {
            mechanism: "SCRAM-SHA-256".into(),
            data: Bytes::from_static(b"n,,n=,r=x"),
        };
        assert_eq!(SaslInitialResponse::decode(&frame(s.encode())).unwrap(), s);
    }
}
