//! Raw wire-protocol client for tests: frontend message builders, a SCRAM login to
//! PostgreSQL or the pooler, and message reading. Tests speak bytes with it where a
//! driver would hide what they check (pipelining, COPY, hostile input).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use bytes::{BufMut, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A startup packet (protocol 3.0) with `params`.
pub fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(0);
    b.put_u32(196_608);
    for (k, v) in params {
        b.put_slice(k.as_bytes());
        b.put_u8(0);
        b.put_slice(v.as_bytes());
        b.put_u8(0);
    }
    b.put_u8(0);
    let len = b.len() as u32;
    b[..4].copy_from_slice(&len.to_be_bytes());
    b.to_vec()
}

/// One tagged message.
pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn cstr(v: &mut Vec<u8>, s: &str) {
    v.extend_from_slice(s.as_bytes());
    v.push(0);
}

/// Query (`Q`).
pub fn query(sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, sql);
    msg(b'Q', &b)
}

/// Parse (`P`) without parameter types.
pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.extend_from_slice(&0u16.to_be_bytes());
    msg(b'P', &b)
}

/// Bind (`B`) of text parameters (`None` is NULL), text results.
pub fn bind(portal: &str, statement: &str, params: &[Option<&str>]) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    cstr(&mut b, statement);
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&(params.len() as u16).to_be_bytes());
    for p in params {
        match p {
            Some(v) => {
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v.as_bytes());
            }
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    b.extend_from_slice(&0u16.to_be_bytes());
    msg(b'B', &b)
}

/// Describe (`D`) of a statement (`b'S'`) or portal (`b'P'`).
pub fn describe(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    cstr(&mut b, name);
    msg(b'D', &b)
}

/// Close (`C`) of a statement (`b'S'`) or portal (`b'P'`).
pub fn close(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    cstr(&mut b, name);
    msg(b'C', &b)
}

/// Execute (`E`) of `portal`, all rows (`max_rows` 0) or at most `max_rows`.
pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    b.extend_from_slice(&max_rows.to_be_bytes());
    msg(b'E', &b)
}

pub fn sync() -> Vec<u8> {
    msg(b'S', b"")
}

pub fn flush() -> Vec<u8> {
    msg(b'H', b"")
}

pub fn copy_data(data: &[u8]) -> Vec<u8> {
    msg(b'd', data)
}

pub fn copy_done() -> Vec<u8> {
    msg(b'c', b"")
}

pub fn copy_fail(why: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, why);
    msg(b'f', &b)
}

pub fn terminate() -> Vec<u8> {
    msg(b'X', b"")
}

/// Reads one message: (tag, body).
pub async fn read_msg<R: AsyncRead + Unpin>(s: &mut R) -> Result<(u8, Vec<u8>)> {
    let tag = s.read_u8().await?;
    let len = s.read_u32().await? as usize;
    ensure!((4..1 << 26).contains(&len), "bad length {len}");
    let mut body = vec![0; len - 4];
    s.read_exact(&mut body).await?;
    Ok((tag, body))
}

/// (severity, code, message) of an ErrorResponse body.
pub fn fields(body: &[u8]) -> (String, String, String) {
    let (mut sev, mut code, mut m) = (String::new(), String::new(), String::new());
    for f in body.split(|&b| b == 0) {
        if f.is_empty() {
            continue;
        }
        let v = String::from_utf8_lossy(&f[1..]).to_string();
        match f[0] {
            b'V' => sev = v,
            b'C' => code = v,
            b'M' => m = v,
            _ => {}
        }
    }
    (sev, code, m)
}

/// Reads until an ErrorResponse and returns its fields; fails on anything else but auth.
pub async fn expect_error(s: &mut TcpStream) -> Result<(String, String, String)> {
    loop {
        let (tag, body) = tokio::time::timeout(Duration::from_secs(5), read_msg(s)).await??;
        match tag {
            b'E' => return Ok(fields(&body)),
            b'S' | b'K' | b'Z' | b'R' | b'N' => continue,
            t => bail!("unexpected message {}", t as char),
        }
    }
}

/// Whether the peer closes the connection within 5 s.
pub async fn expect_closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// Logs in as `user` to `db` at `addr` (PostgreSQL or the pooler) with SCRAM over a
/// raw socket; returns the socket after the first ReadyForQuery.
pub async fn login(addr: SocketAddr, user: &str, password: &str, db: &str) -> Result<TcpStream> {
    Ok(login_with(addr, user, password, db, &[]).await?.0)
}

/// [`login`] with `extra` startup parameters; also returns the ParameterStatus pairs of
/// the greeting.
pub async fn login_with(
    addr: SocketAddr,
    user: &str,
    password: &str,
    db: &str,
    extra: &[(&str, &str)],
) -> Result<(TcpStream, Vec<(String, String)>)> {
    let (s, status, _) = login_full(addr, user, password, db, extra).await?;
    Ok((s, status))
}

/// [`login`]; also returns the BackendKeyData (process id, secret) of the greeting.
pub async fn login_keyed(
    addr: SocketAddr,
    user: &str,
    password: &str,
    db: &str,
) -> Result<(TcpStream, (i32, i32))> {
    let (s, _, key) = login_full(addr, user, password, db, &[]).await?;
    Ok((s, key))
}

async fn login_full(
    addr: SocketAddr,
    user: &str,
    password: &str,
    db: &str,
    extra: &[(&str, &str)],
) -> Result<(TcpStream, Vec<(String, String)>, (i32, i32))> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut params = vec![("user", user), ("database", db)];
    params.extend_from_slice(extra);
    s.write_all(&startup(&params)).await?;
    let (tag, body) = read_msg(&mut s).await?;
    if tag == b'E' {
        bail!("login refused: {:?}", fields(&body));
    }
    ensure!(tag == b'R', "expected authentication, got {}", tag as char);
    ensure!(body[..4] == 10i32.to_be_bytes(), "expected SASL");
    let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
    let mut body = b"SCRAM-SHA-256\0".to_vec();
    body.extend_from_slice(&(scram.message().len() as i32).to_be_bytes());
    body.extend_from_slice(scram.message());
    s.write_all(&msg(b'p', &body)).await?;
    let (tag, body) = read_msg(&mut s).await?;
    ensure!(
        tag == b'R' && body[..4] == 11i32.to_be_bytes(),
        "SASL continue"
    );
    scram.update(&body[4..])?;
    s.write_all(&msg(b'p', scram.message())).await?;
    let mut status = Vec::new();
    let mut key = (0, 0);
    loop {
        let (tag, body) = read_msg(&mut s).await?;
        match tag {
            b'E' => bail!("login failed: {:?}", fields(&body)),
            b'S' => {
                let mut parts = body.split(|&b| b == 0).map(|p| String::from_utf8_lossy(p));
                let name = parts.next().unwrap_or_default().to_string();
                let value = parts.next().unwrap_or_default().to_string();
                status.push((name, value));
            }
            b'K' if body.len() == 8 => {
                key = (
                    i32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                    i32::from_be_bytes([body[4], body[5], body[6], body[7]]),
                );
            }
            b'Z' => return Ok((s, status, key)),
            _ => {}
        }
    }
}

/// Reads messages until one satisfies `last` (included) or the peer closes; gives up
/// after `timeout`, returning what came so far and `false`.
pub async fn read_until<R: AsyncRead + Unpin>(
    s: &mut R,
    timeout: Duration,
    mut last: impl FnMut(u8, &[u8]) -> bool,
) -> (Vec<(u8, Vec<u8>)>, bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, read_msg(s)).await {
            Ok(Ok((tag, body))) => {
                let done = last(tag, &body);
                out.push((tag, body));
                if done {
                    return (out, true);
                }
            }
            // Closed by the peer: complete as far as it goes.
            Ok(Err(_)) => return (out, true),
            Err(_) => return (out, false),
        }
    }
}
