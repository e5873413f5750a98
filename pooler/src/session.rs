//! The client state machine: startup, authentication, then forwarding between the
//! client and a server connection borrowed from the pool (per transaction or per
//! session), with prepared-statement mapping in transaction mode.
//!
//! Errors reach the client only through [`report`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::auth::{ScramServer, ScramVerifier, verify_md5};
use crate::config::{AuthMethod, Config, PoolMode};
use crate::error::{Error, Result};
use crate::metrics::PoolLabels;
use crate::pool::{PoolKey, ServerConn, send_cancel};
use crate::prepared::{
    ClientStatements, DROPS_ALL_LENGTHS, SpecialQuery, Statement, drops_all_statements,
    rename_in_error, special_query,
};
use crate::protocol::{
    Authentication, BackendKeyData, Bind, Close, Describe, Frame, Parse, PasswordMessage,
    ReadyForQuery, Response, SaslInitialResponse, SaslResponse, Startup, StartupMessage, Target,
    TxStatus, command_complete, split_frame, split_startup,
};
use crate::state::{CancelSlot, Shared};
use crate::tracker::{Pending, Tracker, Verdict};

/// Growth step of the client read buffer for messages longer than [`IDLE_BUF`].
const CLIENT_BUF: usize = 64 * 1024;
/// Reads continuing a message with less free space than this grow the buffer first.
const MIN_READ: usize = 4 * 1024;
/// Read buffer a client keeps between transactions: a typical query fits, so the hot
/// path reuses it without allocating; a buffer grown for a long message is given back
/// at the next idle point.
const IDLE_BUF: usize = 1024;
/// Initial read buffer for startup and authentication (grown to fit a longer message).
const LOGIN_BUF: usize = 1024;
/// Bound on authentication-phase messages.
const MAX_AUTH_MESSAGE: usize = 8 * 1024;
/// Time allowed from connect to logged in.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Time allowed for a reset query (ROLLBACK / DISCARD ALL) when a client leaves, and
/// for a resynchronisation barrier to come back.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves one client connection to its end.
pub async fn serve_client(mut stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let n = shared.clients.fetch_add(1, Ordering::SeqCst) + 1;
    let drain = shared.drain_signal();
    let mut buf = BytesMut::with_capacity(LOGIN_BUF);
    let res = match login(&mut stream, &mut buf, &shared, n).await {
        Ok(Some(login)) => run_session(stream, buf, &shared, login, drain).await,
        Ok(None) => Ok(()),
        Err(e) => {
            report(&mut stream, &e).await;
            Err(e)
        }
    };
    if let Err(e) = res {
        let kind = e.kind();
        if kind != "shutdown" {
            shared.metrics.error(kind);
            tracing::info!(error = %e, "client session ended");
        }
    }
    shared.clients.fetch_sub(1, Ordering::SeqCst);
}

/// The one user-facing error path: writes the client-facing form of `e`, if any.
pub async fn report(stream: &mut TcpStream, e: &Error) {
    let bytes = match e {
        Error::ServerError(raw) => raw.clone(),
        _ => match e.to_client() {
            Some(ce) => crate::protocol::error_response(&ce),
            None => return,
        },
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&bytes)).await;
}

/// Reads what the client sent into `buf`. A new message starts in the buffer's own
/// allocation ([`IDLE_BUF`], reclaimed once earlier frames are dropped), so waiting
/// for a client costs no allocation; only the rest of a longer message grows it.
/// Cancel-safe, as `read_buf` is. (`read_buf`, unlike `try_read_buf`, marks the socket
/// drained after a short read, which saves an `EAGAIN` round per message.)
async fn read_client(stream: &mut TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    let spare = buf.capacity() - buf.len();
    if buf.is_empty() {
        if spare < IDLE_BUF {
            buf.reserve(IDLE_BUF);
        }
    } else if spare < MIN_READ {
        buf.reserve(CLIENT_BUF);
    }
    stream.read_buf(buf).await
}

async fn read_frame(stream: &mut TcpStream, buf: &mut BytesMut, max: usize) -> Result<Frame> {
    loop {
        if let Some(f) = split_frame(buf, max)? {
            return Ok(f);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

struct Login {
    key: PoolKey,
    cancel_key: BackendKeyData,
    cancel: CancelSlot,
    server: Option<ServerConn>,
}

/// Startup packets, auth, and the greeting. `None` when the connection was only an
/// SSL probe or a CancelRequest.
async fn login(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    shared: &Shared,
    n: usize,
) -> Result<Option<Login>> {
    // Startup and authentication are bounded in time; waiting for a server is not.
    let phase = async {
        let msg = loop {
            let body = loop {
                if let Some(b) = split_startup(buf)? {
                    break b;
                }
                if stream.read_buf(buf).await? == 0 {
                    return Ok(None);
                }
            };
            match Startup::parse(body)? {
                Startup::Ssl | Startup::GssEnc => {
                    if !buf.is_empty() {
                        return Err(Error::Protocol("data after encryption request".into()));
                    }
                    stream.write_all(b"N").await?;
                }
                Startup::Cancel(c) => {
                    shared.cancel(c).await;
                    return Ok(None);
                }
                Startup::Message(m) => break m,
            }
        };
        if shared.is_draining() {
            return Err(Error::ShuttingDown);
        }
        let cfg = shared.config();
        if n > cfg.max_client_connections {
            return Err(Error::TooManyClients(cfg.max_client_connections));
        }
        let StartupMessage { params } = msg;
        let user = params.get("user").cloned().unwrap_or_default();
        let database = params
            .get("database")
            .filter(|d| !d.is_empty())
            .cloned()
            .unwrap_or_else(|| user.clone());
        authenticate(stream, buf, &cfg, &user).await?;
        Ok::<_, Error>(Some((cfg, user, database)))
    };
    let (cfg, user, database) = match tokio::time::timeout(LOGIN_TIMEOUT, phase).await {
        Ok(r) => match r? {
            Some(v) => v,
            None => return Ok(None),
        },
        Err(_) => return Err(Error::Protocol("login timed out".into())),
    };
    let key = PoolKey::new(&database, &user);
    let mut server = None;
    let server_params = match shared.pools.params(&key) {
        Some(p) => p,
        None => {
            // First client of this pool: a server connection tells us the parameters
            // (and that the database exists).
            let (conn, _) = shared.pools.acquire(&key, &cfg).await?;
            let p = Arc::new(conn.params.clone());
            if shared.mode == PoolMode::Session {
                server = Some(conn);
            } else {
                shared.pools.release(&key, conn, true, &cfg);
            }
            p
        }
    };
    let (cancel_key, cancel) = shared.register_cancel();
    let mut out = BytesMut::new();
    out.extend_from_slice(&Authentication::Ok.encode());
    for p in server_params.iter() {
        out.extend_from_slice(&p.encode());
    }
    out.extend_from_slice(&cancel_key.encode());
    out.extend_from_slice(&ReadyForQuery(TxStatus::Idle).encode());
    if let Err(e) = stream.write_all(&out).await {
        shared.unregister_cancel(cancel_key);
        if let Some(c) = server {
            shared.pools.release(&key, c, true, &cfg);
        }
        return Err(e.into());
    }
    Ok(Some(Login {
        key,
        cancel_key,
        cancel,
        server,
    }))
}

async fn authenticate(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    cfg: &Config,
    user: &str,
) -> Result<()> {
    let secret = cfg.users.get(user);
    match cfg.auth_method {
        AuthMethod::ScramSha256 => {
            let sasl = Authentication::Sasl {
                mechanisms: vec!["SCRAM-SHA-256".into()],
            };
            stream.write_all(&sasl.encode()).await?;
            let f = read_frame(stream, buf, MAX_AUTH_MESSAGE).await?;
            let init = SaslInitialResponse::decode(&f)?;
            if init.mechanism != "SCRAM-SHA-256" {
                return Err(Error::AuthUnsupported(format!(
                    "SASL mechanism {}",
                    init.mechanism
                )));
            }
            // Unknown users go through the same exchange against a random verifier.
            let verifier = secret.and_then(|s| s.scram.clone()).unwrap_or_else(|| {
                ScramVerifier::derive(
                    &format!("{:x}", rand::random::<u128>()),
                    b"sluice-unknown",
                    4096,
                )
            });
            let nonce =
                base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 18]>());
            let (server, first) = ScramServer::start(verifier, &init.data, &nonce)?;
            stream
                .write_all(&Authentication::SaslContinue(Bytes::from(first)).encode())
                .await?;
            let f = read_frame(stream, buf, MAX_AUTH_MESSAGE).await?;
            let resp = SaslResponse::decode(&f)?;
            let fin = server.finish(&resp.data, user)?;
            if secret.is_none() {
                return Err(Error::AuthFailed(user.to_string()));
            }
            stream
                .write_all(&Authentication::SaslFinal(Bytes::from(fin)).encode())
                .await?;
        }
        AuthMethod::Md5 => {
            let salt: [u8; 4] = rand::random();
            stream
                .write_all(&Authentication::Md5Password { salt }.encode())
                .await?;
            let f = read_frame(stream, buf, MAX_AUTH_MESSAGE).await?;
            let pw = PasswordMessage::decode(&f)?;
            let ok = secret.is_some_and(|s| {
                verify_md5(
                    user,
                    s.plain.as_deref(),
                    s.md5.as_deref(),
                    salt,
                    &pw.password,
                )
            });
            if !ok {
                return Err(Error::AuthFailed(user.to_string()));
            }
        }
    }
    Ok(())
}

struct Session<'a> {
    shared: &'a Shared,
    key: PoolKey,
    client: TcpStream,
    cbuf: BytesMut,
    /// `cbuf` may hold more than [`IDLE_BUF`]: shrink it at the next idle point.
    cbuf_grown: bool,
    server: Option<ServerConn>,
    tracker: Tracker,
    stmts: ClientStatements,
    /// Bytes to send to the server, batched.
    to_server: BytesMut,
    /// Bytes to send to the client that are not a plain slice of the server buffer.
    to_client: Vec<u8>,
    cancel: CancelSlot,
    mode: PoolMode,
    draining: bool,
    /// The client sent Terminate: what it sent before still runs to its end, as it
    /// would on PostgreSQL, but nothing more is read from it.
    closing: bool,
    /// A resynchronisation barrier is in flight until then (see [`Tracker`]).
    resync_deadline: Option<tokio::time::Instant>,
    /// The server sent a FATAL (or PANIC) ErrorResponse: it is about to close.
    server_fatal: bool,
    queries: Counter,
    transactions: Counter,
}

async fn run_session(
    client: TcpStream,
    cbuf: BytesMut,
    shared: &Shared,
    login: Login,
    mut drain: watch::Receiver<bool>,
) -> Result<()> {
    let labels = PoolLabels::from(&login.key);
    shared.pools.limiter().client_delta(&login.key, 1);
    let mut s = Session {
        shared,
        queries: shared.metrics.queries.get_or_create(&labels).clone(),
        transactions: shared.metrics.transactions.get_or_create(&labels).clone(),
        key: login.key,
        client,
        cbuf,
        // The login phase may have grown it.
        cbuf_grown: true,
        server: None,
        tracker: Tracker::default(),
        stmts: ClientStatements::default(),
        to_server: BytesMut::new(),
        to_client: Vec::new(),
        cancel: login.cancel,
        mode: shared.mode,
        draining: false,
        closing: false,
        resync_deadline: None,
        server_fatal: false,
    };
    if let Some(c) = login.server {
        s.attach(c);
    }
    let res = s.run(&mut drain).await;
    let res = match res {
        Err(e) => {
            report(&mut s.client, &e).await;
            Err(e)
        }
        ok => ok,
    };
    s.finish().await;
    shared.unregister_cancel(login.cancel_key);
    shared.pools.limiter().client_delta(&s.key, -1);
    res
}

enum Event {
    Client(std::io::Result<usize>),
    Server(std::io::Result<usize>),
    Drain,
    ResyncTimeout,
}

/// Writes to the client. After Terminate the answers still go out, as PostgreSQL sends
/// them, but a client that stopped reading or closed its socket is not an error then.
async fn write_client(client: &mut TcpStream, closing: bool, bytes: &[u8]) -> Result<()> {
    if closing {
        let _ = tokio::time::timeout(Duration::from_secs(1), client.write_all(bytes)).await;
    } else {
        client.write_all(bytes).await?;
    }
    Ok(())
}

impl Session<'_> {
    fn transaction_mode(&self) -> bool {
        self.mode == PoolMode::Transaction
    }

    fn attach(&mut self, c: ServerConn) {
        *self.cancel.lock().unwrap_or_else(|e| e.into_inner()) = Some((c.addr, c.key));
        self.server = Some(c);
    }

    fn detach(&mut self) -> Option<ServerConn> {
        *self.cancel.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.server.take()
    }

    async fn run(&mut self, drain: &mut watch::Receiver<bool>) -> Result<()> {
        // One future for the whole session: re-creating it per turn would register and
        // unregister with the shared watch (a lock each) on every message.
        let drained = drain.changed();
        tokio::pin!(drained);
        loop {
            while !self.closing
                && let Some(f) = split_frame(&mut self.cbuf, self.shared.max_message)?
            {
                if f.tag == b'X' {
                    self.closing = true;
                    self.cbuf.clear();
                    break;
                }
                self.on_client_message(f).await?;
            }
            self.flush_server().await?;
            self.flush_synth().await?;
            self.maybe_release();
            self.maybe_resync().await?;
            if self.closing && (self.server.is_none() || self.tracker.answered()) {
                // Everything sent before Terminate has been answered.
                return Ok(());
            }
            if self.draining && self.server.is_none() && self.cbuf.is_empty() {
                return Err(Error::ShuttingDown);
            }
            if self.server.is_none() && self.cbuf.is_empty() && self.cbuf_grown {
                // Idle between transactions: back to the small buffer (see `read_client`).
                self.cbuf = BytesMut::with_capacity(IDLE_BUF);
                self.cbuf_grown = false;
            }
            // A partial message may grow the buffer (here or in `split_frame`).
            self.cbuf_grown |= !self.cbuf.is_empty();
            let ev = {
                let client = &mut self.client;
                let cbuf = &mut self.cbuf;
                let server = &mut self.server;
                let draining = self.draining;
                let listen = !self.closing && self.resync_deadline.is_none();
                let deadline = self.resync_deadline;
                tokio::select! {
                    r = read_client(client, cbuf), if listen => Event::Client(r),
                    _ = async {
                        match deadline {
                            Some(d) => tokio::time::sleep_until(d).await,
                            None => std::future::pending().await,
                        }
                    } => Event::ResyncTimeout,
                    r = async {
                        match server.as_mut() {
                            Some(s) => s.stream.read_buf(&mut s.buf).await,
                            None => std::future::pending().await,
                        }
                    } => Event::Server(r),
                    _ = &mut drained, if !draining => Event::Drain,
                }
            };
            match ev {
                Event::Client(r) => {
                    if r? == 0 {
                        return Ok(());
                    }
                }
                Event::Server(r) => {
                    let n = match r {
                        Ok(n) => n,
                        Err(e) => return Err(self.server_lost(e.to_string())),
                    };
                    if n == 0 {
                        // Forward what is left (often PostgreSQL's FATAL) first; the
                        // client then has the server's own last word and no other.
                        let _ = self.on_server_data().await;
                        return Err(self.server_lost("server closed the connection".into()));
                    }
                    self.on_server_data().await?;
                }
                Event::Drain => self.draining = true,
                Event::ResyncTimeout => {
                    return Err(self.server_lost("resynchronisation barrier timed out".into()));
                }
            }
        }
    }

    fn server_lost(&mut self, why: String) -> Error {
        if self.detach().is_some() {
            self.shared.pools.discard(&self.key);
        }
        self.tracker.reset();
        self.resync_deadline = None;
        if self.server_fatal {
            // The client has the server's own last word; a second one would mislead.
            Error::ServerEnded(why)
        } else {
            Error::Server(why)
        }
    }

    /// Transaction mode: a connection whose responses fell out of step (see
    /// [`Tracker`]) gets a barrier query once everything known has been answered; its
    /// answer marks the end of what the server owed, and the connection can be reused.
    async fn maybe_resync(&mut self) -> Result<()> {
        if !self.transaction_mode() || self.resync_deadline.is_some() {
            return Ok(());
        }
        let Some(sc) = self.server.as_mut() else {
            return Ok(());
        };
        if !self.tracker.ready_for_resync() || !sc.buf.is_empty() {
            return Ok(());
        }
        let marker = format!("sluice_resync_{:016x}", rand::random::<u64>());
        // Which Parses succeeded was lost with the order: drop the statements too, so
        // the connection's statement list is true again.
        let q = crate::protocol::Query {
            sql: format!("SELECT 1 AS \"{marker}\"; DEALLOCATE ALL"),
        };
        tracing::warn!("server connection out of step with its client; resynchronising");
        if let Err(e) = sc.stream.write_all(&q.encode()).await {
            return Err(self.server_lost(e.to_string()));
        }
        self.tracker.start_resync(&marker);
        self.resync_deadline = Some(tokio::time::Instant::now() + RESET_TIMEOUT);
        Ok(())
    }

    async fn ensure_server(&mut self) -> Result<&mut ServerConn> {
        if self.server.is_none() {
            if self.draining || self.shared.is_draining() {
                return Err(Error::ShuttingDown);
            }
            let cfg = self.shared.config();
            match self.shared.pools.acquire(&self.key, &cfg).await {
                Ok((c, waited)) => {
                    self.shared
                        .metrics
                        .wait_seconds
                        .observe(waited.as_secs_f64());
                    self.attach(c);
                }
                Err(e) => {
                    if matches!(e, Error::PoolTimeout { .. }) {
                        self.shared.metrics.pool_timeouts.inc();
                        // It waited the whole timeout.
                        self.shared
                            .metrics
                            .wait_seconds
                            .observe(cfg.pool_timeout.as_secs_f64());
                    }
                    return Err(e);
                }
            }
        }
        Ok(self.server.as_mut().expect("attached above"))
    }

    /// Makes sure `st` exists on the held server connection, queueing a Parse if not;
    /// `client` is the client's name when the client itself sent the Parse.
    fn prepare_on_server(&mut self, st: &Statement, client: Option<Arc<str>>) {
        let swallow = client.is_none();
        let sc = self.server.as_mut().expect("server held");
        if sc.prepared.touch(&st.server_name) {
            return;
        }
        let cap = self.shared.config().max_prepared_statements;
        if let Some(victim) = sc.prepared.insert(st.server_name.clone(), cap) {
            let c = Close {
                target: Target::Statement,
                name: victim.to_string(),
            };
            self.to_server.extend_from_slice(&c.encode());
            self.tracker.push(Pending::Close { swallow: true });
        }
        self.to_server.extend_from_slice(&st.parse);
        self.tracker.push(Pending::Parse {
            name: Some(st.server_name.clone()),
            client,
            swallow,
        });
    }

    async fn forward(&mut self, f: &Frame) -> Result<()> {
        self.ensure_server().await?;
        self.to_server.extend_from_slice(&f.raw);
        Ok(())
    }

    async fn on_client_message(&mut self, f: Frame) -> Result<()> {
        let rewrite = self.transaction_mode();
        tracing::trace!(tag = %(f.tag as char), "client message");
        match f.tag {
            b'Q' => {
                self.queries.inc();
                if rewrite && looks_special(&f.raw[5..]) {
                    let q = crate::protocol::Query::decode(&f)?;
                    match special_query(&q.sql) {
                        // The server does not know the client's name. (In a failed
                        // transaction the server's own error is the answer.)
                        Some(SpecialQuery::Deallocate(name))
                            if self.tracker.status != TxStatus::Failed
                                && self.stmts.remove(&name) =>
                        {
                            return self.answer_locally("DEALLOCATE");
                        }
                        // Forwarded: the server's CommandComplete confirms it (see
                        // `on_server_data`), and its error, if any, is the answer.
                        Some(SpecialQuery::DeallocateAll | SpecialQuery::DiscardAll) => {
                            self.stmts.cut();
                        }
                        _ => {}
                    }
                }
                self.forward(&f).await?;
                self.tracker.push(Pending::Query);
            }
            b'P' if rewrite => {
                let p = Parse::decode(&f)?;
                if p.name.is_empty() {
                    self.forward(&f).await?;
                    self.tracker.push(Pending::Parse {
                        name: None,
                        client: None,
                        swallow: false,
                    });
                    return Ok(());
                }
                let st = self.stmts.register(&p);
                let client: Arc<str> = p.name.into();
                let sc = self.ensure_server().await?;
                if !sc.prepared.touch(&st.server_name) {
                    self.prepare_on_server(&st, Some(client));
                } else if self.tracker.status == TxStatus::Failed {
                    // PostgreSQL refuses a Parse in a failed transaction: let it say so.
                    self.to_server.extend_from_slice(&st.parse);
                    self.tracker.push(Pending::Parse {
                        name: None,
                        client: Some(client),
                        swallow: false,
                    });
                } else {
                    self.tracker.push(Pending::SynthParse(client));
                }
            }
            b'B' if rewrite => {
                let (name, range) = Bind::peek_statement(&f.raw)?;
                let st = (!name.is_empty()).then(|| self.stmts.get(name)).flatten();
                self.ensure_server().await?;
                match st {
                    Some(st) => {
                        self.prepare_on_server(&st, None);
                        Bind::write_renamed(&f.raw, range, &st.server_name, &mut self.to_server);
                    }
                    None => self.to_server.extend_from_slice(&f.raw),
                }
                self.tracker.push(Pending::Bind);
            }
            b'D' if rewrite && f.raw.get(5) == Some(&b'P') => {
                // Portals are per connection and never renamed.
                self.forward(&f).await?;
                self.tracker.push(Pending::Describe);
            }
            b'D' if rewrite => {
                let d = Describe::decode(&f)?;
                let st = (d.target == Target::Statement && !d.name.is_empty())
                    .then(|| self.stmts.get(&d.name))
                    .flatten();
                self.ensure_server().await?;
                match st {
                    Some(st) => {
                        self.prepare_on_server(&st, None);
                        let nd = Describe {
                            target: Target::Statement,
                            name: st.server_name.to_string(),
                        };
                        self.to_server.extend_from_slice(&nd.encode());
                    }
                    None => self.to_server.extend_from_slice(&f.raw),
                }
                self.tracker.push(Pending::Describe);
            }
            b'C' if rewrite => {
                let c = Close::decode(&f)?;
                if c.target == Target::Statement && !c.name.is_empty() {
                    // Server statements are shared; only the client's mapping goes.
                    self.stmts.remove(&c.name);
                    self.tracker.push(Pending::SynthClose);
                } else {
                    self.forward(&f).await?;
                    self.tracker.push(Pending::Close { swallow: false });
                }
            }
            b'P' => {
                self.forward(&f).await?;
                self.tracker.push(Pending::Parse {
                    name: None,
                    client: None,
                    swallow: false,
                });
            }
            b'B' => {
                self.forward(&f).await?;
                self.tracker.push(Pending::Bind);
            }
            b'D' => {
                self.forward(&f).await?;
                self.tracker.push(Pending::Describe);
            }
            b'C' => {
                self.forward(&f).await?;
                self.tracker.push(Pending::Close { swallow: false });
            }
            b'E' => {
                self.queries.inc();
                self.forward(&f).await?;
                self.tracker.push(Pending::Execute);
            }
            b'S' => {
                self.forward(&f).await?;
                self.tracker.push(Pending::Sync);
            }
            b'H' => {
                self.forward(&f).await?;
                self.tracker.mark_unsynced();
            }
            b'F' => {
                self.forward(&f).await?;
                self.tracker.push(Pending::Query);
            }
            b'c' | b'f' => {
                // Without a server connection no COPY runs: the server would ignore it.
                if self.server.is_some() {
                    self.to_server.extend_from_slice(&f.raw);
                    self.tracker.push(Pending::CopyEnd);
                }
            }
            b'd' => {
                // COPY data only means something while a server connection is held.
                if self.server.is_some() {
                    self.to_server.extend_from_slice(&f.raw);
                }
            }
            b'p' => return Err(Error::Protocol("unexpected password message".into())),
            other => {
                return Err(Error::Protocol(format!(
                    "unknown message type '{}'",
                    other.escape_ascii()
                )));
            }
        }
        Ok(())
    }

    /// Answers a simple query the pooler handled itself, in order.
    fn answer_locally(&mut self, tag: &'static str) -> Result<()> {
        if self.server.is_some() {
            self.tracker.push(Pending::SynthQuery(tag));
        } else {
            self.to_client.extend_from_slice(&command_complete(tag));
            self.to_client
                .extend_from_slice(&ReadyForQuery(TxStatus::Idle).encode());
        }
        Ok(())
    }

    async fn flush_server(&mut self) -> Result<()> {
        if self.to_server.is_empty() {
            return Ok(());
        }
        let Some(sc) = self.server.as_mut() else {
            self.to_server.clear();
            return Ok(());
        };
        if let Err(e) = sc.stream.write_all(&self.to_server).await {
            return Err(self.server_lost(e.to_string()));
        }
        self.to_server.clear();
        Ok(())
    }

    async fn flush_synth(&mut self) -> Result<()> {
        if self.server.as_ref().is_none_or(|s| s.scanner.at_boundary()) {
            self.tracker.take_synth(&mut self.to_client);
        }
        if !self.to_client.is_empty() {
            write_client(&mut self.client, self.closing, &self.to_client).await?;
            self.to_client.clear();
        }
        Ok(())
    }

    /// Forwards buffered server bytes to the client: in bulk, inspecting only message
    /// headers, dropping responses to injected messages and inserting synthetic ones.
    async fn on_server_data(&mut self) -> Result<()> {
        let Some(sc) = self.server.as_mut() else {
            return Ok(());
        };
        let buf = &sc.buf[..];
        let mut pos = 0;
        let mut flushed = 0;
        let mut direct = true;
        self.to_client.clear();
        loop {
            if self.tracker.has_synth() && sc.scanner.at_boundary() {
                // Synthetic answers are due here: splice them in.
                self.to_client.extend_from_slice(&buf[flushed..pos]);
                flushed = pos;
                direct = false;
                self.tracker.take_synth(&mut self.to_client);
            }
            match sc.scanner.next(&buf[pos..]) {
                Response::NeedMore => break,
                Response::Pass(n) => {
                    sc.scanner.consumed(n);
                    pos += n;
                }
                Response::Message { tag, len, status } => {
                    tracing::trace!(tag = %(tag as char), len, "server message");
                    if tag == b'C'
                        && self.mode == PoolMode::Transaction
                        && DROPS_ALL_LENGTHS.contains(&len)
                        && !self.tracker.resyncing()
                    {
                        // Look at the tag: DEALLOCATE ALL / DISCARD ALL, in whatever
                        // form they were sent, dropped the shared statements.
                        if buf.len() - pos < len {
                            break;
                        }
                        if drops_all_statements(&buf[pos + 5..pos + len]) {
                            // Statements whose Parse was sent after it still come.
                            sc.prepared.clear();
                            let cap = self.shared.config().max_prepared_statements;
                            for name in self.tracker.pending_parses() {
                                sc.prepared.insert(name.clone(), cap);
                            }
                            self.stmts.deallocated_all();
                        }
                    }
                    if tag == b'E'
                        && self.mode == PoolMode::Transaction
                        && !self.tracker.resyncing()
                    {
                        // An error may name a server statement: it must name the
                        // client's. (Errors are the cold path: wait for the whole one.)
                        if buf.len() - pos < len {
                            break;
                        }
                        let stmts = &self.stmts;
                        if let Some(renamed) = rename_in_error(&buf[pos..pos + len], |s| {
                            stmts.client_name(s).map(str::to_string)
                        }) {
                            self.tracker.on_message(tag, status);
                            self.to_client.extend_from_slice(&buf[flushed..pos]);
                            self.to_client.extend_from_slice(&renamed);
                            pos += len;
                            flushed = pos;
                            direct = false;
                            continue;
                        }
                    }
                    if tag == b'E' {
                        let m = &buf[pos..buf.len().min(pos + len)];
                        self.server_fatal |=
                            m.windows(7).any(|w| w == b"SFATAL\0" || w == b"SPANIC\0");
                    }
                    let verdict = if self.tracker.resyncing() {
                        // The barrier is recognised by content: look at whole messages.
                        if buf.len() - pos < len {
                            break;
                        }
                        let v = self.tracker.on_resync_message(&buf[pos..pos + len]);
                        if !self.tracker.resyncing() {
                            self.resync_deadline = None;
                            sc.prepared.clear();
                        }
                        v
                    } else {
                        self.tracker.on_message(tag, status)
                    };
                    match verdict {
                        Verdict::Keep => sc.scanner.accept(len),
                        Verdict::Drop => {
                            if buf.len() - pos < len {
                                break;
                            }
                            self.to_client.extend_from_slice(&buf[flushed..pos]);
                            pos += len;
                            flushed = pos;
                            direct = false;
                        }
                    }
                }
            }
        }
        if direct {
            write_client(&mut self.client, self.closing, &buf[..pos]).await?;
        } else {
            self.to_client.extend_from_slice(&buf[flushed..pos]);
            write_client(&mut self.client, self.closing, &self.to_client).await?;
            self.to_client.clear();
        }
        sc.buf.advance(pos);
        if sc.buf.capacity() < crate::pool::SERVER_BUF / 2 {
            sc.buf.reserve(crate::pool::SERVER_BUF);
        }
        for name in self.tracker.failed.drain(..) {
            sc.prepared.remove(&name);
        }
        for name in self.tracker.failed_clients.drain(..) {
            // PostgreSQL did not create it.
            self.stmts.remove(&name);
        }
        self.flush_synth().await?;
        self.maybe_release();
        Ok(())
    }

    /// Transaction mode: returns the server connection once everything sent has been
    /// answered and the server is idle. Session mode: only when draining.
    fn maybe_release(&mut self) {
        let Some(sc) = self.server.as_ref() else {
            return;
        };
        let idle =
            self.tracker.is_settled() && self.tracker.status == TxStatus::Idle && sc.buf.is_empty();
        if !idle {
            return;
        }
        // Everything sent is answered: no deallocation is still to be confirmed.
        self.stmts.forget_cuts();
        if self.transaction_mode() {
            self.transactions.inc();
            let cfg = self.shared.config();
            let c = self.detach().expect("held");
            self.shared.pools.release(&self.key, c, true, &cfg);
        } else if self.draining {
            let cfg = self.shared.config();
            let c = self.detach().expect("held");
            self.shared.pools.release(&self.key, c, false, &cfg);
        }
    }

    /// The client is gone: clean up a held server connection before it is reused.
    async fn finish(&mut self) {
        let Some(mut sc) = self.detach() else { return };
        let cfg = self.shared.config();
        let settled = self.tracker.is_settled() && sc.buf.is_empty();
        let clean = if !settled {
            // Something is still running: cancel it and drop the connection.
            tokio::spawn(send_cancel(sc.addr, sc.key));
            false
        } else {
            let status = self.tracker.status;
            let session = self.mode == PoolMode::Session;
            let reset = async {
                let mut ok = true;
                if status != TxStatus::Idle {
                    ok = sc.run_quiet("ROLLBACK").await?;
                }
                if ok && (session || status != TxStatus::Idle) {
                    ok = sc.run_quiet("DISCARD ALL").await?;
                    sc.prepared.clear();
                }
                Ok::<bool, Error>(ok)
            };
            matches!(
                tokio::time::timeout(RESET_TIMEOUT, reset).await,
                Ok(Ok(true))
            )
        };
        self.shared
            .pools
            .release(&self.key, sc, clean && !self.shared.is_draining(), &cfg);
    }
}

/// Cheap pre-check before parsing a Query for DEALLOCATE / DISCARD.
fn looks_special(body: &[u8]) -> bool {
    body.iter()
        .find(|c| !c.is_ascii_whitespace())
        .is_some_and(|c| matches!(c, b'd' | b'D'))
}
