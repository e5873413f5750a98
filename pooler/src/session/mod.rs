//! The client state machine: startup and authentication (`login.rs`), then forwarding
//! between the client and a server connection borrowed from the pool, per transaction
//! or per session: client messages, with the prepared-statement rewrite of transaction
//! mode (`client.rs`), and server responses, with the response tracker's verdicts and
//! connection release (`server.rs`).
//!
//! Errors reach the client only through [`report`].

mod client;
mod login;
mod server;
use std::sync::Arc;
use std::time::Duration;

use crate::stream::Stream;
use bytes::{Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use crate::config::{Config, PoolMode};
use crate::error::{Error, Result};
use crate::memory::Lease;
use crate::metrics::PoolLabels;
use crate::params::Params;
use crate::pool::{Checkout, PoolKey, ServerConn, send_cancel};
use crate::prepared::ClientStatements;
use crate::protocol::{TxStatus, split_frame};
use crate::state::{CancelSlot, ConfigCache, Shared};
use crate::tracker::{Pending, Tracker};

/// Growth step of the client read buffer for messages longer than [`IDLE_BUF`].
const CLIENT_BUF: usize = 64 * 1024;
/// Reads continuing a message with less free space than this grow the buffer first.
const MIN_READ: usize = 4 * 1024;
/// Read buffer a client keeps between transactions: a typical query fits, so the hot
/// path reuses it without allocating; a buffer grown for a long message is given back
/// at the next idle point.
const IDLE_BUF: usize = 1024;
/// Time allowed for a reset query (ROLLBACK / DISCARD ALL) when a client leaves, and
/// for a resynchronisation barrier to come back.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves one client connection (TCP, or a WebSocket of the HTTP front door) to its end.
pub async fn serve_client(mut stream: Stream, shared: Arc<Shared>) {
    let count = shared.count_client();
    let drain = shared.drain_signal();
    let mut buf = BytesMut::with_capacity(login::LOGIN_BUF);
    // Boxed: the login's state is large and short-lived; the session's task would
    // otherwise carry it for the client's whole life.
    let res = match Box::pin(login::login(&mut stream, &mut buf, &shared, count.n)).await {
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
            // Client-chosen names are in some errors: escaped, so a plain log line
            // stays one line with no control characters.
            tracing::info!(error = %e.to_string().escape_debug(), "client session ended");
        }
    }
}

/// The one user-facing error path: writes the client-facing form of `e`, if any.
pub async fn report(stream: &mut Stream, e: &Error) {
    let bytes = match e {
        Error::ServerError(raw) => raw.clone(),
        _ => match e.to_client() {
            Some(ce) => crate::protocol::error_response(&ce),
            None => return,
        },
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.send(&bytes)).await;
}

/// Reads what the client sent into `buf`. A new message starts in the buffer's own
/// allocation ([`IDLE_BUF`], reclaimed once earlier frames are dropped), so waiting
/// for a client costs no allocation; only the rest of a longer message grows it.
/// Cancel-safe, as `read_buf` is. (`read_buf`, unlike `try_read_buf`, marks the socket
/// drained after a short read, which saves an `EAGAIN` round per message.)
async fn read_client(stream: &mut Stream, buf: &mut BytesMut) -> std::io::Result<usize> {
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

struct Session<'a> {
    shared: &'a Shared,
    /// The config in force, for the per-transaction path.
    cfg: ConfigCache,
    key: PoolKey,
    client: Stream,
    cbuf: BytesMut,
    /// `cbuf` may hold more than [`IDLE_BUF`]: shrink it at the next idle point.
    cbuf_grown: bool,
    server: Option<Checkout<'a>>,
    tracker: Tracker,
    stmts: ClientStatements,
    /// The session parameters this client has (startup, then its SETs as reported).
    params: Params,
    /// `DEALLOCATE`s of client statements sent (names their stand-in statements).
    deallocations: u64,
    /// A client message waiting for earlier answers before it can be rewritten (a
    /// `DEALLOCATE` of a statement whose Parse is not answered yet); nothing more is
    /// read from the client meanwhile.
    held: Option<crate::protocol::Frame>,
    /// Server statements whose injected Parse a failed transaction refused, with that
    /// error (until everything sent is answered).
    refused: Vec<(Arc<str>, Bytes)>,
    /// Share of `max_client_memory` for a message longer than [`CLIENT_BUF`] arriving.
    buf_lease: Lease<'a>,
    /// Share of `max_client_memory` for the client's prepared statements.
    stmt_lease: Lease<'a>,
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
    /// After Terminate: how long the server's last answers are waited for.
    close_deadline: Option<tokio::time::Instant>,
    /// The server sent a FATAL (or PANIC) ErrorResponse: it is about to close.
    server_fatal: bool,
    queries: Counter,
    transactions: Counter,
}

async fn run_session(
    client: Stream,
    cbuf: BytesMut,
    shared: &Shared,
    login: login::Login<'_>,
    mut drain: watch::Receiver<bool>,
) -> Result<()> {
    let labels = PoolLabels::from(&login.key);
    shared.pools.limiter().client_delta(&login.key, 1);
    let mut s = Session {
        shared,
        cfg: ConfigCache::new(shared),
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
        params: login.params,
        deallocations: 0,
        held: None,
        buf_lease: shared.memory.lease(),
        stmt_lease: shared.memory.lease(),
        refused: Vec::new(),
        to_server: BytesMut::new(),
        to_client: Vec::new(),
        cancel: login.cancel,
        mode: shared.mode,
        draining: false,
        closing: false,
        resync_deadline: None,
        close_deadline: None,
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
async fn write_client(client: &mut Stream, closing: bool, bytes: &[u8]) -> Result<()> {
    if closing {
        let _ = tokio::time::timeout(Duration::from_secs(1), client.send(bytes)).await;
    } else {
        client.send(bytes).await?;
    }
    Ok(())
}

/// A server connection for pool `key`, with the wait observed in the metrics.
///
/// # Errors
/// [`Error::PoolTimeout`] after `pool_timeout`, and connection or login failures.
async fn acquire<'a>(shared: &'a Shared, key: &PoolKey, cfg: &Config) -> Result<Checkout<'a>> {
    match shared.pools.acquire(key, cfg).await {
        Ok((c, waited)) => {
            shared.metrics.wait_seconds.observe(waited.as_secs_f64());
            Ok(c)
        }
        Err(e) => {
            if matches!(e, Error::PoolTimeout { .. }) {
                shared.metrics.pool_timeouts.inc();
                // It waited the whole timeout.
                shared
                    .metrics
                    .wait_seconds
                    .observe(cfg.pool_timeout.as_secs_f64());
            }
            Err(e)
        }
    }
}

impl<'a> Session<'a> {
    fn transaction_mode(&self) -> bool {
        self.mode == PoolMode::Transaction
    }

    /// Takes `c` for this client: its session parameters are made the client's first
    /// (a `SET` ahead of the client's messages, answered silently).
    fn attach(&mut self, mut c: Checkout<'a>) {
        *self.cancel.lock().unwrap_or_else(|e| e.into_inner()) = Some((c.addr, c.key));
        if !self.params.same_as(&c.session_params) {
            if let Some(sql) = self.params.sql_to_apply_over(&c.session_params) {
                self.to_server
                    .extend_from_slice(&crate::protocol::Query { sql }.encode());
                self.tracker.push(Pending::Injected);
            }
            c.session_params = self.params.clone();
        }
        self.server = Some(c);
    }

    fn detach(&mut self) -> Option<Checkout<'a>> {
        *self.cancel.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.server.take()
    }

    async fn run(&mut self, drain: &mut watch::Receiver<bool>) -> Result<()> {
        // One future for the whole session: re-creating it per turn would register and
        // unregister with the shared watch (a lock each) on every message.
        let drained = drain.changed();
        tokio::pin!(drained);
        loop {
            while !self.closing {
                let f = match self.held.take() {
                    Some(f) => f,
                    None => match self.split_client_frame()? {
                        Some(f) => f,
                        None => break,
                    },
                };
                if f.tag == b'X' {
                    self.closing = true;
                    self.cbuf.clear();
                    // What the server still owes comes within this, or never (messages
                    // it skips after an error, with no Sync to end the skipping).
                    self.close_deadline = Some(tokio::time::Instant::now() + RESET_TIMEOUT);
                    if self.server.is_some() && self.tracker.unsynced() {
                        // Extended messages with no Sync after them: PostgreSQL runs
                        // them and ends the session without committing. A Flush (which
                        // commits nothing) brings their answers; the connection, not at
                        // a Sync, is then closed, which rolls them back as on PostgreSQL.
                        self.to_server.extend_from_slice(&crate::prepared::FLUSH);
                    }
                    break;
                }
                self.on_client_message(f).await?;
                if self.held.is_some() {
                    break;
                }
            }
            self.flush_server().await?;
            self.flush_synth().await?;
            self.maybe_release();
            self.maybe_resync().await?;
            if self.closing && (self.server.is_none() || self.tracker.owes_nothing()) {
                // Everything sent before Terminate has been answered.
                return Ok(());
            }
            if self.draining && self.server.is_none() && self.cbuf.is_empty() {
                return Err(Error::ShuttingDown);
            }
            if self.cbuf.is_empty()
                && ((self.server.is_none() && self.cbuf_grown) || self.buf_lease.held() > 0)
            {
                // Idle between transactions, or a long message passed: back to the small
                // buffer (see `read_client`).
                self.cbuf = BytesMut::with_capacity(IDLE_BUF);
                self.cbuf_grown = false;
                self.buf_lease.resize(0, "")?;
            }
            // A partial message may grow the buffer (here or in `split_frame`).
            self.cbuf_grown |= !self.cbuf.is_empty();
            let ev = {
                let client = &mut self.client;
                let cbuf = &mut self.cbuf;
                let server = &mut self.server;
                // Between transactions (and in session mode, where the server
                // connection stays): a transaction under way ends before the drain is
                // acted on. Not polling it meanwhile saves a lock per turn; it stays
                // registered, so the drain still wakes the task.
                let watch_drain =
                    !self.draining && (server.is_none() || self.mode == PoolMode::Session);
                // While a message waits for earlier answers, reading goes on (bounded)
                // so that a client that leaves is noticed and its statement cancelled.
                let listen = !self.closing
                    && self.resync_deadline.is_none()
                    && (self.held.is_none() || cbuf.len() < CLIENT_BUF);
                let deadline = self.resync_deadline.or(self.close_deadline);
                // Biased, in this order: the server's answers first (and no random
                // number per turn).
                tokio::select! {
                    biased;
                    r = async {
                        match server.as_deref_mut() {
                            Some(s) => s.stream.read_buf(&mut s.buf).await,
                            None => std::future::pending().await,
                        }
                    } => Event::Server(r),
                    r = read_client(client, cbuf), if listen => Event::Client(r),
                    _ = &mut drained, if watch_drain => Event::Drain,
                    _ = async {
                        match deadline {
                            Some(d) => tokio::time::sleep_until(d).await,
                            None => std::future::pending().await,
                        }
                    } => Event::ResyncTimeout,
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
                Event::ResyncTimeout if self.resync_deadline.is_none() => {
                    // After Terminate: the rest will not come; the connection, not
                    // settled, is closed (see `finish`).
                    return Ok(());
                }
                Event::ResyncTimeout => {
                    return Err(self.server_lost("resynchronisation barrier timed out".into()));
                }
            }
        }
    }

    fn server_lost(&mut self, why: String) -> Error {
        if let Some(c) = self.detach() {
            c.discard();
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

    async fn ensure_server(&mut self) -> Result<&mut ServerConn> {
        if self.server.is_none() {
            if self.draining || self.shared.is_draining() {
                return Err(Error::ShuttingDown);
            }
            if self.mode == PoolMode::Session {
                // Its own backend is gone (drained): another would have another key.
                return Err(Error::ShuttingDown);
            }
            let cfg = self.cfg.get(self.shared);
            let c = acquire(self.shared, &self.key, cfg).await?;
            self.attach(c);
        }
        Ok(self.server.as_mut().expect("attached above"))
    }

    /// Splits the next whole client message off the read buffer. A message longer than
    /// [`CLIENT_BUF`] is buffered whole only with a share of `max_client_memory`.
    ///
    /// # Errors
    /// Bad or too long lengths ([`split_frame`]), and [`Error::OutOfMemory`].
    fn split_client_frame(&mut self) -> Result<Option<crate::protocol::Frame>> {
        if let Some(h) = self.cbuf.get(..5) {
            let need = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize + 1;
            if need > CLIENT_BUF && need <= self.shared.max_message && need > self.buf_lease.held()
            {
                self.buf_lease.resize(need, "a long message")?;
            }
        }
        split_frame(&mut self.cbuf, self.shared.max_message)
    }

    async fn flush_server(&mut self) -> Result<()> {
        if self.to_server.is_empty() {
            return Ok(());
        }
        let Some(sc) = self.server.as_mut() else {
            self.to_server.clear();
            return Ok(());
        };
        if let Err(e) = sc.stream.send(&self.to_server).await {
            return Err(self.server_lost(e.to_string()));
        }
        if self.to_server.capacity() > CLIENT_BUF {
            // It held a long message: give the memory back.
            self.to_server = BytesMut::new();
        } else {
            self.to_server.clear();
        }
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

    /// The client is gone: clean up a held server connection before it is reused.
    async fn finish(&mut self) {
        let Some(mut sc) = self.detach() else { return };
        let cfg = self.shared.config();
        let settled = self.tracker.is_settled() && sc.buf.is_empty();
        let clean = if !settled {
            // Something is still running: cancel it and drop the connection.
            tokio::spawn(send_cancel(sc.addr, sc.key));
            false
        } else if self.mode == PoolMode::Session {
            // The client had this backend's key: it serves no one else.
            false
        } else {
            let status = self.tracker.status;
            let reset = async {
                let mut ok = true;
                if status != TxStatus::Idle {
                    ok = sc.run_quiet("ROLLBACK").await?;
                }
                if ok && status != TxStatus::Idle {
                    ok = sc.run_quiet("DISCARD ALL").await?;
                    sc.params_reset();
                    sc.prepared.clear();
                }
                Ok::<bool, Error>(ok)
            };
            matches!(
                tokio::time::timeout(RESET_TIMEOUT, reset).await,
                Ok(Ok(true))
            )
        };
        sc.release(clean && !self.shared.is_draining(), &cfg);
    }
}
