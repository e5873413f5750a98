//! What this operator process remembers about each pool between reconciles, in one place
//! keyed by the pool's UID. All of it can be rebuilt from the cluster: after a restart the
//! status, the pods' answers and the other pools' status take its place.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::api::ConnectionPoolStatus;
use crate::budget::DatabaseLimits;

/// Discovered database limits, for one generation of the spec and one credentials
/// Secret version.
#[derive(Clone, Debug)]
pub(super) struct CachedLimits {
    pub(super) key: (Option<i64>, String),
    /// The database they were read from (`host:port/db`).
    pub(super) target: String,
    pub(super) at: Instant,
    pub(super) limits: DatabaseLimits,
}

/// What the pods of one pool may hold, as last decided (see `resize::committed`).
#[derive(Clone, Debug)]
pub(super) struct Committed {
    pub(super) group: String,
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) connections: i64,
}

/// One pool's memory.
#[derive(Debug, Default)]
pub(super) struct PoolMemory {
    /// The status last written. Only this process writes status (leader election), and
    /// the pool cache can lag behind its own writes: a reconcile triggered by a child's
    /// event would otherwise rebuild status from a stale copy and write again.
    pub(super) written: Option<ConnectionPoolStatus>,
    /// Reconciles failed in a row (backoff).
    pub(super) failures: u32,
    pub(super) limits: Option<CachedLimits>,
    /// Kept after the pool is deleted while its pods drain (its budget group counts it).
    pub(super) committed: Option<Committed>,
    /// Per pod UID: the most it could hold by its last `/status` answer (its limit or
    /// what it held), counted when it does not answer.
    pub(super) last_seen: HashMap<String, i64>,
}

/// Every pool's memory, by pool UID.
#[derive(Debug, Default)]
pub(super) struct Memory(Mutex<HashMap<String, PoolMemory>>);

impl Memory {
    /// Runs `f` on the memory of pool `uid` (created empty).
    pub(super) fn with<R>(&self, uid: &str, f: impl FnOnce(&mut PoolMemory) -> R) -> R {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !m.contains_key(uid) {
            m.insert(uid.to_string(), PoolMemory::default());
        }
        f(m.get_mut(uid).expect("inserted above"))
    }

    /// Runs `f` on the memory of pool `uid`, if any (nothing is created).
    pub(super) fn peek<R>(&self, uid: &str, f: impl FnOnce(&PoolMemory) -> R) -> Option<R> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(uid)
            .map(f)
    }

    /// The pool was deleted: everything but what its pods may still hold goes.
    pub(super) fn forget(&self, uid: &str) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match m.get_mut(uid) {
            Some(p) if p.committed.is_some() => {
                *p = PoolMemory {
                    committed: p.committed.take(),
                    ..PoolMemory::default()
                }
            }
            _ => {
                m.remove(uid);
            }
        }
    }

    /// Runs `f` over every pool's committed connections; entries for which it returns
    /// false lose them (and go, when nothing else is remembered).
    pub(super) fn retain_committed(&self, mut f: impl FnMut(&str, &Committed) -> bool) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for (uid, p) in m.iter_mut() {
            if p.committed.as_ref().is_some_and(|c| !f(uid, c)) {
                p.committed = None;
            }
        }
        m.retain(|_, p| {
            p.committed.is_some()
                || p.written.is_some()
                || p.failures > 0
                || p.limits.is_some()
                || !p.last_seen.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deleted_pool_keeps_only_what_its_pods_may_hold() {
        let m = Memory::default();
        m.with("a", |p| {
            p.failures = 2;
            p.committed = Some(Committed {
                group: "g".into(),
                namespace: "ns".into(),
                name: "a".into(),
                connections: 9,
            });
        });
        m.with("b", |p| p.failures = 1);
        m.forget("a");
        m.forget("b");
        assert_eq!(m.with("a", |p| p.failures), 0);
        assert_eq!(
            m.with("a", |p| p.committed.as_ref().map(|c| c.connections)),
            Some(9)
        );
        let mut seen = Vec::new();
        m.retain_committed(|uid, _| {
            seen.push(uid.to_string());
            false
        });
        assert_eq!(seen, vec!["a".to_string()]);
        assert!(m.with("a", |p| p.committed.is_none()));
    }
}
