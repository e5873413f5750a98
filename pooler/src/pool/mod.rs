//! Server connection pools: one per (database, user), all under one process-wide
//! `connection_limit` ([`Limiter`]), with waiting, health checks and reaping.

mod backend;
mod checkout;
mod limit;
mod size;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

pub use backend::{
    PoolParams, SERVER_BUF, ServerConn, login_params, send_cancel, send_cancel_request,
};
pub use checkout::Checkout;
pub use limit::{Acquire, Closing, Grant, Limiter, PoolKey, Snapshot};
pub use size::DatabaseSize;
use size::Turn;

use crate::config::Config;
use crate::error::{Error, Result};

/// Bound on opening one server connection (TCP connect plus login).
pub const SERVER_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A server connection as pools hold and lend it: boxed, so that taking it from the
/// pool and giving it back moves a pointer, not the connection's state.
pub type Conn = Box<ServerConn>;

/// All pools of the process.
#[derive(Debug)]
pub struct Pools {
    limiter: Limiter<Conn>,
    params: Mutex<HashMap<PoolKey, Arc<PoolParams>>>,
    /// The database's size as last verified (see [`DatabaseSize`]).
    pub size: DatabaseSize,
}

/// Closes connections in the background.
pub fn close_all(conns: Vec<Closing<Conn>>) {
    for Closing { conn, slot } in conns {
        tokio::spawn(async move {
            conn.terminate().await;
            // The backend is gone: its slot may go to the next client.
            drop(slot);
        });
    }
}

impl Pools {
    pub fn new(limit: usize) -> Self {
        Self {
            limiter: Limiter::new(limit),
            params: Mutex::new(HashMap::new()),
            size: DatabaseSize::default(),
        }
    }

    pub fn limiter(&self) -> &Limiter<Conn> {
        &self.limiter
    }

    /// ParameterStatus values last seen from a server connection of `key`.
    pub fn params(&self, key: &PoolKey) -> Option<Arc<PoolParams>> {
        self.params
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// The limit `cfg` gives for the database's size as last verified.
    pub fn limit_for(&self, cfg: &Config) -> usize {
        limit_for_size(cfg, self.size.observed())
    }

    /// Opens a connection in a reserved slot; on failure frees the slot and says whether
    /// the failure is worth retrying (see [`OpenFailed`]). After a lost connection the
    /// first opener checks the database's size before any other opens (see
    /// [`DatabaseSize`]).
    async fn open(&self, key: &PoolKey, cfg: &Config) -> Result<Conn, OpenFailed> {
        let (turn, _) = self.size.turn().await;
        // The slot was granted under the limit of that moment; a scout may have lowered
        // it since (while this opener waited for it, or before this opener got here).
        if !self.limiter.keep_opening(key) {
            return Err(OpenFailed {
                error: Error::Server("the connection limit was lowered".into()),
                transient: true,
                again: true,
            });
        }
        let scout = turn == Turn::Scout;
        let db = cfg.server.database.as_deref().unwrap_or(&key.database);
        let connect = tokio::time::timeout(SERVER_CONNECT_TIMEOUT, async {
            let mut c = Box::new(ServerConn::connect(&cfg.server, db).await?);
            let max = if scout {
                c.max_connections().await?
            } else {
                None
            };
            Ok::<_, Error>((c, max))
        });
        let result = match connect.await {
            Ok(Err(Error::Io(e))) => Err(OpenFailed {
                error: Error::Server(format!("connecting to the server: {e}")),
                transient: true,
                again: false,
            }),
            Ok(Err(e)) => Err(OpenFailed {
                transient: refused_for_now(&e),
                error: e,
                again: false,
            }),
            Ok(Ok(c)) => Ok(c),
            Err(_) => Err(OpenFailed {
                error: Error::Server("connecting to the server timed out".into()),
                transient: true,
                again: false,
            }),
        };
        match result {
            Ok((c, max)) => {
                if scout {
                    // The limit is lowered before the waiting openers are let go: on a
                    // multi-threaded runtime they would otherwise check their slots
                    // against the old limit and open.
                    let limit = limit_for_size(cfg, max.or(self.size.observed()));
                    if limit < self.limiter.limit() {
                        tracing::warn!(
                            max_connections = max,
                            limit,
                            "the database allows fewer connections than the limit was computed for; lowering it until the operator catches up"
                        );
                        close_all(self.limiter.set_limit(limit));
                    }
                    self.size.scouted(max);
                }
                self.params
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key.clone(), Arc::new(PoolParams::new(c.params.clone())));
                Ok(c)
            }
            Err(e) => {
                if scout {
                    self.size.scout_failed();
                }
                self.discard(key);
                Err(e)
            }
        }
    }

    /// Gets a server connection for `key` and how long the caller waited for a slot
    /// (zero when one was free), waiting up to `pool_timeout`, also for a server
    /// that cannot be reached or is starting up or shutting down (retried every
    /// [`OPEN_RETRY`], as PgBouncer's `server_login_retry`).
    ///
    /// # Errors
    /// [`Error::PoolTimeout`] when none frees up in time, [`Error::ShuttingDown`] when
    /// draining, the login error of a new connection (at once when retrying cannot help:
    /// a wrong password, a missing database), or the last connection error when the
    /// server stays unavailable for `pool_timeout`.
    pub async fn acquire(&self, key: &PoolKey, cfg: &Config) -> Result<(Checkout<'_>, Duration)> {
        // The fast path, one clock reading and no await: an idle connection that needs
        // no check.
        let start = Instant::now();
        let mut idle = self.limiter.take_one_idle(key, start);
        if let Some((c, for_how_long)) = &mut idle {
            if self.broken(key, c) {
                idle = None;
            } else if *for_how_long < cfg.server_check_delay
                && start.saturating_duration_since(c.created) < cfg.server_lifetime
            {
                let (c, _) = idle.take().expect("matched above");
                return Ok((Checkout::new(c, self, key), Duration::ZERO));
            }
        }
        // Boxed: waiting, opening and checking are rare, and their state is large; the
        // task of every idle client would otherwise carry it.
        let (c, waited) = Box::pin(self.acquire_conn(key, cfg, start, idle)).await?;
        Ok((Checkout::new(c, self, key), waited))
    }

    /// The slow path of [`Self::acquire`], from `start`; `idle` is a connection the
    /// fast path took but could not lend as it was.
    async fn acquire_conn(
        &self,
        key: &PoolKey,
        cfg: &Config,
        start: Instant,
        mut idle: Option<(Conn, Duration)>,
    ) -> Result<(Conn, Duration)> {
        let deadline = start + cfg.pool_timeout;
        let mut first = true;
        loop {
            // The clock is read again after every wait and retry.
            let mut now = if std::mem::take(&mut first) {
                start
            } else {
                Instant::now()
            };
            let acquired = match idle.take() {
                Some((c, for_how_long)) => Acquire::Conn(c, for_how_long),
                None => self.limiter.acquire_at(key, now),
            };
            let grant = match acquired {
                Acquire::Conn(c, idle) => Grant::Conn((c, idle)),
                Acquire::Open => Grant::Open,
                Acquire::Wait {
                    id,
                    mut rx,
                    evicted,
                } => {
                    close_all(evicted.into_iter().collect());
                    let got = match tokio::time::timeout_at(deadline, &mut rx).await {
                        Ok(r) => r,
                        Err(_) if self.limiter.cancel_wait(id) => {
                            return Err(Error::PoolTimeout {
                                timeout_ms: cfg.pool_timeout.as_millis(),
                                limit: self.limiter.snapshot().limit,
                            });
                        }
                        // Granted at the last moment: take it.
                        Err(_) => rx.await,
                    };
                    now = Instant::now();
                    match got {
                        Ok(Grant::Conn(c)) => Grant::Conn((c, Duration::ZERO)),
                        Ok(Grant::Open) => Grant::Open,
                        Err(_) => return Err(Error::ShuttingDown),
                    }
                }
            };
            match grant {
                Grant::Open => match Box::pin(self.open(key, cfg)).await {
                    Ok(c) => return Ok((c, start.elapsed())),
                    Err(f) if f.again => continue,
                    Err(f) if f.transient && Instant::now() < deadline => {
                        tracing::info!(error = %f.error, "server unavailable; retrying within pool_timeout");
                        tokio::time::sleep_until(deadline.min(Instant::now() + OPEN_RETRY)).await;
                        continue;
                    }
                    Err(f) => return Err(f.error),
                },
                Grant::Conn((mut c, idle)) => {
                    if self.broken(key, &mut c) {
                        continue;
                    }
                    if now.saturating_duration_since(c.created) >= cfg.server_lifetime {
                        self.close(key, c);
                        continue;
                    }
                    if idle >= cfg.server_check_delay && !Box::pin(c.check()).await {
                        tracing::info!(id = c.id, "server connection failed its check; replacing");
                        // The server may have restarted: the next opener checks its size.
                        self.size.unverify();
                        self.close(key, c);
                        continue;
                    }
                    return Ok((c, now - start));
                }
            }
        }
    }

    /// Whether idle connection `c` was closed by the server (or sent something unasked);
    /// if so its slot is freed, and the caller drops it.
    fn broken(&self, key: &PoolKey, c: &mut ServerConn) -> bool {
        let broken = c.is_broken();
        if broken {
            tracing::info!(
                id = c.id,
                "idle server connection was closed by the server; replacing"
            );
            self.discard(key);
        }
        broken
    }

    /// Returns a connection; `clean` says it is idle with no session state to worry about.
    fn release(&self, key: &PoolKey, conn: Conn, clean: bool, cfg: &Config) {
        let now = Instant::now();
        let reusable = clean
            && conn.buf.is_empty()
            && now.saturating_duration_since(conn.created) < cfg.server_lifetime;
        let created = conn.created;
        close_all(self.limiter.release_at(key, conn, created, reusable, now));
    }

    /// Closes a connection handed out whose state is unknown, freeing its slot.
    fn close(&self, key: &PoolKey, conn: Conn) {
        let created = conn.created;
        close_all(self.limiter.release(key, conn, created, false));
    }

    /// A connection handed out is gone (broken); frees its slot. The server may have
    /// restarted: the next connection opened checks its size.
    fn discard(&self, key: &PoolKey) {
        self.size.unverify();
        self.limiter.discard(key);
    }
}

/// The limit `cfg` gives for a database of `max_connections` (`None`: not known).
fn limit_for_size(cfg: &Config, max_connections: Option<u32>) -> usize {
    match (cfg.budget_basis, max_connections) {
        (Some(basis), Some(max)) => basis.limit_for(cfg.connection_limit, max),
        _ => cfg.connection_limit,
    }
}

/// Pause between attempts to open a server connection while the server is unavailable.
pub const OPEN_RETRY: Duration = Duration::from_millis(500);

/// Why a new server connection failed, and whether trying again soon may succeed.
struct OpenFailed {
    error: Error,
    /// The server could not be reached, or it refused logins for now.
    transient: bool,
    /// The slot went back before connecting (the limit was lowered meanwhile): acquire
    /// again at once.
    again: bool,
}

/// Whether PostgreSQL refused a login for a reason that passes: starting up, shutting
/// down, crash recovery (`57P0x`) or out of connection slots (`53300`).
fn refused_for_now(e: &Error) -> bool {
    let Error::ServerError(raw) = e else {
        return false;
    };
    let mut buf = bytes::BytesMut::from(&raw[..]);
    matches!(
        crate::protocol::split_frame(&mut buf, raw.len().max(5)),
        Ok(Some(f)) if crate::protocol::ErrorFields::decode(&f)
            .is_ok_and(|e| e.code.starts_with("57P0") || e.code == "53300")
    )
}
