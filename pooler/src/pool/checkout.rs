//! A server connection lent to one client, returned to its pool by a guard.

use std::ops::{Deref, DerefMut};

use super::{Conn, Pools, ServerConn};
use crate::config::Config;
use crate::pool::PoolKey;

/// A server connection checked out of [`Pools`] for one client.
///
/// # Guarantees
/// Its slot under `connection_limit` goes back exactly once: by [`Checkout::release`]
/// (reused when clean), [`Checkout::discard`] (the connection is gone), or, on any
/// other path (an early return, an error, a panic, a cancelled task), by dropping the
/// guard, which closes the connection politely: a connection whose state nobody
/// checked is never lent to another client.
#[derive(Debug)]
pub struct Checkout<'a> {
    /// `Some` until the guard is consumed.
    conn: Option<Conn>,
    pools: &'a Pools,
    key: PoolKey,
}

impl<'a> Checkout<'a> {
    pub(super) fn new(conn: Conn, pools: &'a Pools, key: &PoolKey) -> Self {
        Self {
            conn: Some(conn),
            pools,
            key: key.clone(),
        }
    }

    /// Returns the connection; `clean` says it is idle with no session state to worry
    /// about, so another client may have it.
    pub fn release(mut self, clean: bool, cfg: &Config) {
        if let Some(c) = self.conn.take() {
            self.pools.release(&self.key, c, clean, cfg);
        }
    }

    /// The connection is gone (the server closed it or a write failed): frees its slot.
    pub fn discard(mut self) {
        if self.conn.take().is_some() {
            self.pools.discard(&self.key);
        }
    }
}

impl Deref for Checkout<'_> {
    type Target = ServerConn;

    fn deref(&self) -> &ServerConn {
        self.conn.as_ref().expect("held until consumed")
    }
}

impl DerefMut for Checkout<'_> {
    fn deref_mut(&mut self) -> &mut ServerConn {
        self.conn.as_mut().expect("held until consumed")
    }
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            self.pools.close(&self.key, c);
        }
    }
}
