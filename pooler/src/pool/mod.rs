//! Server connection pools: one per (database, user), all under one process-wide
//! `connection_limit` ([`Limiter`]), with waiting, health checks and reaping.

mod backend;
mod limit;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

pub use backend::{SERVER_BUF, ServerConn, send_cancel};
pub use limit::{Acquire, Grant, Limiter, PoolKey, Snapshot};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::protocol::ParameterStatus;

/// Bound on opening one server connection (TCP connect plus login).
pub const SERVER_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// All pools of the process.
#[derive(Debug)]
pub struct Pools {
    limiter: Limiter<ServerConn>,
    params: Mutex<HashMap<PoolKey, Arc<Vec<ParameterStatus>>>>,
}

/// Closes connections in the background.
pub fn close_all(conns: Vec<ServerConn>) {
    for c in conns {
        tokio::spawn(c.terminate());
    }
}

impl Pools {
    pub fn new(limit: usize) -> Self {
        Self {
            limiter: Limiter::new(limit),
            params: Mutex::new(HashMap::new()),
        }
    }

    pub fn limiter(&self) -> &Limiter<ServerConn> {
        &self.limiter
    }

    /// ParameterStatus values last seen from a server connection of `key`.
    pub fn params(&self, key: &PoolKey) -> Option<Arc<Vec<ParameterStatus>>> {
        self.params
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    async fn open(&self, key: &PoolKey, cfg: &Config) -> Result<ServerConn> {
        let db = cfg.server.database.as_deref().unwrap_or(&key.database);
        let connect =
            tokio::time::timeout(SERVER_CONNECT_TIMEOUT, ServerConn::connect(&cfg.server, db));
        let result = match connect.await {
            Ok(Err(Error::Io(e))) => Err(Error::Server(format!("connecting to the server: {e}"))),
            Ok(r) => r,
            Err(_) => Err(Error::Server("connecting to the server timed out".into())),
        };
        match result {
            Ok(c) => {
                self.params
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key.clone(), Arc::new(c.params.clone()));
                Ok(c)
            }
            Err(e) => {
                self.limiter.discard(key);
                Err(e)
            }
        }
    }

    /// Gets a server connection for `key`, waiting up to `pool_timeout`.
    ///
    /// # Errors
    /// [`Error::PoolTimeout`] when none frees up in time, [`Error::ShuttingDown`] when
    /// draining, or the login error of a new connection.
    pub async fn acquire(&self, key: &PoolKey, cfg: &Config) -> Result<ServerConn> {
        let deadline = Instant::now() + cfg.pool_timeout;
        loop {
            let grant = match self.limiter.acquire(key) {
                Acquire::Conn(c, idle) => Grant::Conn((c, idle)),
                Acquire::Open(evicted) => {
                    close_all(evicted.into_iter().collect());
                    Grant::Open
                }
                Acquire::Wait { id, mut rx } => {
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
                    match got {
                        Ok(Grant::Conn(c)) => Grant::Conn((c, Duration::ZERO)),
                        Ok(Grant::Open) => Grant::Open,
                        Err(_) => return Err(Error::ShuttingDown),
                    }
                }
            };
            match grant {
                Grant::Open => return self.open(key, cfg).await,
                Grant::Conn((mut c, idle)) => {
                    if c.is_broken() {
                        tracing::info!(
                            id = c.id,
                            "idle server connection was closed by the server; replacing"
                        );
                        self.limiter.discard(key);
                        continue;
                    }
                    if c.created.elapsed() >= cfg.server_lifetime {
                        self.limiter.discard(key);
                        close_all(vec![c]);
                        continue;
                    }
                    if idle >= cfg.server_check_delay && !c.check().await {
                        tracing::info!(id = c.id, "server connection failed its check; replacing");
                        self.limiter.discard(key);
                        continue;
                    }
                    return Ok(c);
                }
            }
        }
    }

    /// Returns a connection; `clean` says it is idle with no session state to worry about.
    pub fn release(&self, key: &PoolKey, conn: ServerConn, clean: bool, cfg: &Config) {
        let reusable = clean && conn.buf.is_empty() && conn.created.elapsed() < cfg.server_lifetime;
        let created = conn.created;
        close_all(self.limiter.release(key, conn, created, reusable));
    }

    /// A connection handed out is gone (broken); frees its slot.
    pub fn discard(&self, key: &PoolKey) {
        self.limiter.discard(key);
    }
}
