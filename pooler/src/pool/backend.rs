//! One server connection to PostgreSQL: login, reset, health check.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::stream::Stream;
use tokio::time::Instant;

use crate::auth::md5_client_response;
use crate::config::ServerConfig;
use crate::error::{Error, Result};
use crate::params::Params;
use crate::protocol::{
    Authentication, BackendKeyData, ErrorFields, Frame, ParameterStatus, PasswordMessage,
    ReadyForQuery, ResponseScanner, SaslInitialResponse, SaslResponse, TxStatus, startup_message,
};

/// Bound on single server messages read during login/reset (the hot path does not buffer
/// whole messages).
const MAX_SERVER_CONTROL_MESSAGE: usize = 1 << 20;
/// Read buffer size for server connections.
pub const SERVER_BUF: usize = 64 * 1024;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// How long a closing connection may take to be let go by the server before its slot
/// is freed anyway.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// The tracked parameters of a login's ParameterStatus list.
pub fn login_params(list: &[ParameterStatus]) -> Params {
    Params::from_reported(list.iter().map(|p| (p.name.as_str(), p.value.as_str())))
}

/// What a pool's server connections report at login: every ParameterStatus (a client's
/// greeting repeats them), and the tracked ones among them, worked out once per pool
/// rather than per client login.
#[derive(Debug)]
pub struct PoolParams {
    pub list: Vec<ParameterStatus>,
    pub tracked: Params,
}

impl PoolParams {
    pub fn new(list: Vec<ParameterStatus>) -> Self {
        let tracked = login_params(&list);
        Self { list, tracked }
    }
}

/// A logged-in server connection.
#[derive(Debug)]
pub struct ServerConn {
    pub(super) id: u64,
    pub stream: Stream,
    pub buf: BytesMut,
    pub scanner: ResponseScanner,
    pub addr: SocketAddr,
    pub key: BackendKeyData,
    pub params: Vec<ParameterStatus>,
    /// The tracked session parameters in force on this connection now.
    pub session_params: Params,
    pub(super) created: Instant,
    pub prepared: crate::prepared::PreparedLru,
}

async fn read_frame(stream: &mut Stream, buf: &mut BytesMut) -> Result<Frame> {
    stream
        .read_frame(buf, MAX_SERVER_CONTROL_MESSAGE)
        .await?
        .ok_or_else(|| Error::Server("server closed the connection".into()))
}

/// SSLRequest: the magic number PostgreSQL answers with `S` (TLS follows) or `N`.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Asks for TLS as `sslmode` says and, when the server agrees, shakes hands.
///
/// # Errors
/// [`Error::ServerTls`] naming the server and the reason: it refused TLS that
/// `sslmode` requires, or the handshake failed (verification among the causes).
async fn negotiate_tls(stream: &mut Stream, cfg: &ServerConfig) -> Result<()> {
    let Some((connector, name)) = cfg.tls.connector() else {
        return Ok(());
    };
    let mode = cfg.tls.mode.as_str();
    let at = || format!("{}:{} (sslmode={mode})", cfg.host, cfg.port);
    stream.send(&SSL_REQUEST).await?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => stream
            .connect(connector, name)
            .await
            .map_err(|e| Error::ServerTls(format!("{}: {}", at(), cfg.tls.explain(&e)))),
        b'N' if cfg.tls.mode.requires_tls() => Err(Error::ServerTls(format!(
            "{}: the server does not accept TLS",
            at()
        ))),
        b'N' => Ok(()),
        other => Err(Error::ServerTls(format!(
            "{}: unexpected answer {other:#04x} to the TLS request",
            at()
        ))),
    }
}

impl ServerConn {
    /// Connects and logs in to `database` with the configured server credentials.
    ///
    /// # Errors
    /// [`Error::ServerError`] carrying PostgreSQL's ErrorResponse when it refuses the
    /// login (so the client sees PostgreSQL's message), else [`Error::Server`]/[`Error::Io`].
    pub async fn connect(cfg: &ServerConfig, database: &str) -> Result<Self> {
        let tcp = TcpStream::connect((cfg.host.as_str(), cfg.port)).await?;
        tcp.set_nodelay(true)?;
        let addr = tcp.peer_addr()?;
        let mut stream = Stream::Plain(tcp);
        negotiate_tls(&mut stream, cfg).await?;
        stream
            .send(&startup_message(&[
                ("user", &cfg.user),
                ("database", database),
            ]))
            .await?;
        let mut buf = BytesMut::with_capacity(SERVER_BUF);
        let password = cfg.password.clone().unwrap_or_default();
        let mut scram: Option<ScramSha256> = None;
        let mut params = Vec::new();
        let mut key = BackendKeyData { pid: 0, secret: 0 };
        loop {
            let f = read_frame(&mut stream, &mut buf).await?;
            match f.tag {
                b'R' => match Authentication::decode(&f)? {
                    Authentication::Ok => {}
                    Authentication::CleartextPassword => {
                        let m = PasswordMessage {
                            password: password.clone().into_bytes(),
                        };
                        stream.send(&m.encode()).await?;
                    }
                    Authentication::Md5Password { salt } => {
                        let r = md5_client_response(&cfg.user, &password, salt);
                        stream
                            .send(
                                &PasswordMessage {
                                    password: r.into_bytes(),
                                }
                                .encode(),
                            )
                            .await?;
                    }
                    Authentication::Sasl { mechanisms } => {
                        if !mechanisms.iter().any(|m| m == "SCRAM-SHA-256") {
                            return Err(Error::Server(format!(
                                "no supported SASL mechanism in {mechanisms:?}"
                            )));
                        }
                        let s =
                            ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                        let m = SaslInitialResponse {
                            mechanism: "SCRAM-SHA-256".into(),
                            data: Bytes::copy_from_slice(s.message()),
                        };
                        stream.send(&m.encode()).await?;
                        scram = Some(s);
                    }
                    Authentication::SaslContinue(data) => {
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| Error::Server("unexpected SASL continue".into()))?;
                        s.update(&data)
                            .map_err(|e| Error::Server(format!("SCRAM: {e}")))?;
                        let m = SaslResponse {
                            data: Bytes::copy_from_slice(s.message()),
                        };
                        stream.send(&m.encode()).await?;
                    }
                    Authentication::SaslFinal(data) => {
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| Error::Server("unexpected SASL final".into()))?;
                        s.finish(&data)
                            .map_err(|e| Error::Server(format!("SCRAM: {e}")))?;
                    }
                },
                b'S' => params.push(ParameterStatus::decode(&f)?),
                b'K' => key = BackendKeyData::decode(&f)?,
                b'Z' => break,
                b'E' => {
                    let e = ErrorFields::decode(&f)?;
                    tracing::warn!(code = %e.code, message = %e.message.escape_debug(), "server login refused");
                    return Err(Error::ServerError(f.raw));
                }
                _ => {}
            }
        }
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(id, pid = key.pid, "server connection opened");
        Ok(Self {
            id,
            stream,
            buf,
            scanner: ResponseScanner::default(),
            addr,
            key,
            session_params: login_params(&params),
            params,
            created: Instant::now(),
            prepared: crate::prepared::PreparedLru::default(),
        })
    }

    /// `DISCARD ALL` (or `RESET ALL`) ran: the session parameters are the login's again.
    pub fn params_reset(&mut self) {
        self.session_params = login_params(&self.params);
    }

    /// Runs one simple query, discarding its output; true when the connection ends idle.
    pub async fn run_quiet(&mut self, sql: &str) -> Result<bool> {
        let q = crate::protocol::Query { sql: sql.into() }.encode();
        self.stream.send(&q).await?;
        let mut ok = true;
        loop {
            let f = read_frame(&mut self.stream, &mut self.buf).await?;
            match f.tag {
                b'E' => ok = false,
                b'Z' => {
                    let z = ReadyForQuery::decode(&f)?;
                    return Ok(ok && z.0 == TxStatus::Idle && self.buf.is_empty());
                }
                _ => {}
            }
        }
    }

    /// `SHOW max_connections` on this (idle) connection; `None` when the server does
    /// not answer it with a number.
    ///
    /// # Errors
    /// When the connection fails.
    pub async fn max_connections(&mut self) -> Result<Option<u32>> {
        let q = crate::protocol::Query {
            sql: "SHOW max_connections".into(),
        }
        .encode();
        self.stream.send(&q).await?;
        let mut value = None;
        loop {
            let f = read_frame(&mut self.stream, &mut self.buf).await?;
            match f.tag {
                b'D' => value = first_column(&f.raw[5..]).and_then(|v| v.trim().parse().ok()),
                b'Z' => return Ok(value),
                _ => {}
            }
        }
    }

    /// Cheap, non-blocking: whether an idle connection was closed by the server or has
    /// unexpected bytes waiting (e.g. the FATAL PostgreSQL sends when it shuts down).
    pub fn is_broken(&mut self) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        self.stream.readable_now()
    }

    /// Checks an idle connection with an empty query; false when it is unusable.
    pub async fn check(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.run_quiet("")).await,
            Ok(Ok(true))
        )
    }

    /// Says goodbye and waits (up to [`CLOSE_TIMEOUT`]) until the server closes its end,
    /// which it does when the backend exits: until then the backend still counts
    /// against `max_connections`. A backend still running a (cancelled) statement
    /// reads the Terminate once that statement ends.
    pub async fn terminate(mut self) {
        let bye = async {
            self.stream.send(&crate::protocol::terminate()).await?;
            let mut sink = [0u8; 4096];
            while self.stream.read(&mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        };
        if tokio::time::timeout(CLOSE_TIMEOUT, bye).await.is_err() {
            tracing::warn!(
                id = self.id,
                "server connection did not close within {CLOSE_TIMEOUT:?}; dropping it"
            );
        }
        tracing::debug!(id = self.id, "server connection closed");
    }
}

/// Sends a CancelRequest for backend `key` at `addr` (best effort).
pub async fn send_cancel(addr: SocketAddr, key: BackendKeyData) {
    let req = crate::protocol::CancelRequest {
        pid: key.pid,
        secret: key.secret,
        from_peer: false,
    };
    send_cancel_request(addr, req).await;
}

/// Sends `req` to `addr` and waits (bounded) for the peer to close.
pub async fn send_cancel_request(
    addr: impl tokio::net::ToSocketAddrs,
    req: crate::protocol::CancelRequest,
) {
    if let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await
    {
        let _ = s.write_all(&req.encode()).await;
        let mut b = [0u8; 1];
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await;
    }
}

/// The first column of a DataRow body as text, if present and not NULL.
fn first_column(body: &[u8]) -> Option<&str> {
    let count = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    if count < 1 {
        return None;
    }
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    let len = usize::try_from(len).ok()?;
    std::str::from_utf8(body.get(6..6 + len)?).ok()
}
