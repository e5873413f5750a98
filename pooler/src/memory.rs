//! The process-wide bound on memory clients make the pooler hold: messages longer than
//! a read buffer while they arrive, and transaction mode's prepared-statement maps.
//!
//! Each client holds a [`Lease`] per use; the lease grows by asking the shared
//! [`MemoryBudget`] and gives everything back when dropped, so a client that goes away,
//! however it goes, frees its share.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};

/// Bytes all clients together may hold beyond their fixed buffers.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: AtomicUsize,
    used: AtomicUsize,
}

impl MemoryBudget {
    pub fn new(limit: usize) -> Self {
        Self {
            limit: AtomicUsize::new(limit),
            used: AtomicUsize::new(0),
        }
    }

    /// Changes the bound (config reload); leases already held stay.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// A lease holding nothing yet.
    pub fn lease(&self) -> Lease<'_> {
        Lease {
            budget: self,
            held: 0,
        }
    }

    fn take(&self, n: usize) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|&t| t <= limit)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// One client's share of the [`MemoryBudget`] for one use, returned on drop.
#[derive(Debug)]
pub struct Lease<'a> {
    budget: &'a MemoryBudget,
    held: usize,
}

impl Lease<'_> {
    pub fn held(&self) -> usize {
        self.held
    }

    /// Makes the lease hold `bytes`: gives back what is over, asks for what is missing.
    ///
    /// # Errors
    /// [`Error::OutOfMemory`] when the budget cannot give the missing bytes; the lease
    /// then holds what it held before.
    pub fn resize(&mut self, bytes: usize, what: &'static str) -> Result<()> {
        if bytes <= self.held {
            self.budget.give(self.held - bytes);
        } else if !self.budget.take(bytes - self.held) {
            return Err(Error::OutOfMemory {
                what,
                bound: "max_client_memory",
                limit: self.budget.limit.load(Ordering::Relaxed),
            });
        }
        self.held = bytes;
        Ok(())
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.budget.give(self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_share_the_bound_and_give_back_on_drop() {
        let b = MemoryBudget::new(100);
        let mut a = b.lease();
        let mut c = b.lease();
        a.resize(60, "x").unwrap();
        assert!(matches!(
            c.resize(50, "x"),
            Err(Error::OutOfMemory { limit: 100, .. })
        ));
        assert_eq!(c.held(), 0, "a refused lease keeps what it had");
        c.resize(40, "x").unwrap();
        assert_eq!(b.used(), 100);
        a.resize(10, "x").unwrap();
        assert_eq!(b.used(), 50);
        drop(a);
        drop(c);
        assert_eq!(b.used(), 0);
    }
}
