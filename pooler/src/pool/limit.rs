//! Pure bookkeeping of the process-wide server connection limit: idle connections per
//! pool, a FIFO wait queue, and per-pool counters. No I/O; callers close what it hands
//! back. The lock is never held across an await.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustc_hash::FxBuildHasher;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// One pool: a (database, user) pair.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    pub database: Arc<str>,
    pub user: Arc<str>,
}

impl PoolKey {
    pub fn new(database: &str, user: &str) -> Self {
        Self {
            database: database.into(),
            user: user.into(),
        }
    }
}

/// What a waiting client is handed.
#[derive(Debug)]
pub enum Grant<C> {
    /// An idle connection of its pool.
    Conn(C),
    /// A reserved slot: open a new connection.
    Open,
}

/// The immediate answer to an acquire.
#[derive(Debug)]
pub enum Acquire<C> {
    /// An idle connection and how long it sat idle.
    Conn(C, Duration),
    /// A reserved slot (plus an idle connection of another pool to close, if one had
    /// to make room).
    Open(Option<C>),
    /// Wait on this receiver; `id` identifies the waiter for [`Limiter::cancel_wait`].
    Wait {
        id: u64,
        rx: oneshot::Receiver<Grant<C>>,
    },
}

/// Per-pool counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolCounts {
    /// Server connections open or opening.
    pub open: usize,
    /// Server connections handed to clients (including ones being opened).
    pub in_use: usize,
    /// Client connections logged in to this pool.
    pub clients: usize,
    /// Clients waiting for a server connection.
    pub waiting: usize,
}

/// A snapshot for `/status` and metrics.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub limit: usize,
    pub open: usize,
    pub in_use: usize,
    pub idle: usize,
    pub waiting: usize,
    pub pools: Vec<(PoolKey, PoolCounts)>,
}

struct Idle<C> {
    conn: C,
    since: Instant,
    created: Instant,
}

struct Waiter<C> {
    id: u64,
    key: PoolKey,
    tx: oneshot::Sender<Grant<C>>,
}

struct State<C> {
    limit: usize,
    open: usize,
    draining: bool,
    next_id: u64,
    waiters: VecDeque<Waiter<C>>,
    /// Looked up on every acquire and release: one map, hashed with Fx (the keys come
    /// from logged-in clients, not from unauthenticated input).
    pools: HashMap<PoolKey, Pool<C>, FxBuildHasher>,
}

/// One pool's counters and idle connections (most recently used last).
struct Pool<C> {
    counts: PoolCounts,
    idle: Vec<Idle<C>>,
}

impl<C> Default for Pool<C> {
    fn default() -> Self {
        Self {
            counts: PoolCounts::default(),
            idle: Vec::new(),
        }
    }
}

/// The limiter; see the module docs. `C` is the connection type.
pub struct Limiter<C> {
    state: Mutex<State<C>>,
}

impl<C> std::fmt::Debug for Limiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Limiter")
    }
}

impl<C> State<C> {
    fn pool(&mut self, key: &PoolKey) -> &mut Pool<C> {
        // `entry` would clone the key on every call; pools are created once.
        if !self.pools.contains_key(key) {
            self.pools.insert(key.clone(), Pool::default());
        }
        self.pools.get_mut(key).expect("inserted above")
    }

    fn counts(&mut self, key: &PoolKey) -> &mut PoolCounts {
        &mut self.pool(key).counts
    }

    /// Drops `key`'s entry once nothing refers to it (no connection, client or waiter),
    /// so that names clients merely asked for (a database that does not exist) do not
    /// stay in the map, in `/status` and in `/metrics`.
    fn forget_if_unused(&mut self, key: &PoolKey) {
        let unused = self.pools.get(key).is_some_and(|p| {
            p.idle.is_empty() && p.counts.open == 0 && p.counts.in_use == 0 && p.counts.clients == 0
        });
        if unused && !self.waiters.iter().any(|w| &w.key == key) {
            self.pools.remove(key);
        }
    }

    fn idle_total(&self) -> usize {
        self.pools.values().map(|p| p.idle.len()).sum()
    }

    /// Removes the idle connection that has been idle longest, across pools.
    fn pop_oldest_idle(&mut self) -> Option<(PoolKey, C)> {
        let key = self
            .pools
            .iter()
            .filter_map(|(k, p)| p.idle.first().map(|i| (k, i.since)))
            .min_by_key(|(_, s)| *s)
            .map(|(k, _)| k.clone())?;
        let pool = self.pool(&key);
        let i = pool.idle.remove(0);
        pool.counts.open -= 1;
        self.open -= 1;
        Some((key, i.conn))
    }

    /// Hands free slots to waiters in FIFO order.
    fn grant_slots(&mut self) {
        while self.open < self.limit && !self.draining {
            let Some(w) = self.waiters.pop_front() else {
                break;
            };
            if w.tx.send(Grant::Open).is_ok() {
                self.open += 1;
                let c = self.counts(&w.key);
                c.open += 1;
                c.in_use += 1;
            }
        }
    }
}

impl<C> Limiter<C> {
    /// A limiter allowing `limit` server connections.
    pub fn new(limit: usize) -> Self {
        Self {
            state: Mutex::new(State {
                limit,
                open: 0,
                draining: false,
                next_id: 0,
                waiters: VecDeque::new(),
                pools: HashMap::default(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<C>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes an idle connection of `key`, reserves a slot, or queues the caller.
    pub fn acquire(&self, key: &PoolKey) -> Acquire<C> {
        self.acquire_at(key, Instant::now())
    }

    /// [`Self::acquire`] with the caller's clock reading (one per transaction is enough).
    pub fn acquire_at(&self, key: &PoolKey, now: Instant) -> Acquire<C> {
        let mut s = self.lock();
        let pool = s.pool(key);
        if let Some(i) = pool.idle.pop() {
            pool.counts.in_use += 1;
            return Acquire::Conn(i.conn, now - i.since);
        }
        if s.waiters.is_empty() && !s.draining {
            if s.open < s.limit {
                s.open += 1;
                let c = s.counts(key);
                c.open += 1;
                c.in_use += 1;
                return Acquire::Open(None);
            }
            if let Some((_, evicted)) = s.pop_oldest_idle() {
                s.open += 1;
                let c = s.counts(key);
                c.open += 1;
                c.in_use += 1;
                return Acquire::Open(Some(evicted));
            }
        }
        let (tx, rx) = oneshot::channel();
        s.next_id += 1;
        let id = s.next_id;
        s.waiters.push_back(Waiter {
            id,
            key: key.clone(),
            tx,
        });
        Acquire::Wait { id, rx }
    }

    /// Removes a waiter that gave up. Returns false when it was already granted
    /// something (the caller must then take the grant from its receiver).
    pub fn cancel_wait(&self, id: u64) -> bool {
        let mut s = self.lock();
        let before = s.waiters.len();
        s.waiters.retain(|w| w.id != id);
        s.waiters.len() != before
    }

    /// Returns a connection. `reusable` is false when it is broken, dirty or too old.
    /// Returns connections the caller must close.
    pub fn release(&self, key: &PoolKey, conn: C, created: Instant, reusable: bool) -> Vec<C> {
        self.release_at(key, conn, created, reusable, Instant::now())
    }

    /// [`Self::release`] with the caller's clock reading.
    pub fn release_at(
        &self,
        key: &PoolKey,
        conn: C,
        created: Instant,
        reusable: bool,
        now: Instant,
    ) -> Vec<C> {
        let mut s = self.lock();
        s.pool(key).counts.in_use -= 1;
        let mut close = Vec::new();
        if !reusable || s.draining || s.open > s.limit {
            s.open -= 1;
            s.counts(key).open -= 1;
            close.push(conn);
            s.grant_slots();
            s.forget_if_unused(key);
            return close;
        }
        let mut conn = conn;
        while let Some(w) = s.waiters.pop_front() {
            if w.key == *key {
                match w.tx.send(Grant::Conn(conn)) {
                    Ok(()) => {
                        s.counts(key).in_use += 1;
                        return close;
                    }
                    Err(Grant::Conn(c)) => conn = c,
                    Err(Grant::Open) => unreachable!("sent a connection"),
                }
            } else if w.tx.send(Grant::Open).is_ok() {
                // Hand the slot over to another pool's waiter.
                s.counts(key).open -= 1;
                let c = s.counts(&w.key);
                c.open += 1;
                c.in_use += 1;
                close.push(conn);
                s.forget_if_unused(key);
                return close;
            }
        }
        s.pool(key).idle.push(Idle {
            conn,
            since: now,
            created,
        });
        close
    }

    /// A connection in use (or being opened) is gone.
    pub fn discard(&self, key: &PoolKey) {
        let mut s = self.lock();
        s.open -= 1;
        let c = s.counts(key);
        c.open -= 1;
        c.in_use -= 1;
        s.grant_slots();
        s.forget_if_unused(key);
    }

    /// Changes the limit: idle connections above it are handed back for closing at
    /// once; busy ones close on release; raising it serves waiters.
    pub fn set_limit(&self, limit: usize) -> Vec<C> {
        let mut s = self.lock();
        s.limit = limit;
        let mut close = Vec::new();
        while s.open > s.limit {
            match s.pop_oldest_idle() {
                Some((_, c)) => close.push(c),
                None => break,
            }
        }
        s.grant_slots();
        close
    }

    /// Idle connections idle longer than `idle_timeout`, older than `lifetime`, or for
    /// which `dead` says so.
    pub fn reap(
        &self,
        idle_timeout: Duration,
        lifetime: Duration,
        mut dead: impl FnMut(&mut C) -> bool,
    ) -> Vec<C> {
        let mut s = self.lock();
        let now = Instant::now();
        let mut close = Vec::new();
        let mut removed: Vec<PoolKey> = Vec::new();
        for (k, pool) in s.pools.iter_mut() {
            let list = &mut pool.idle;
            let mut i = 0;
            while i < list.len() {
                if now - list[i].since >= idle_timeout
                    || now - list[i].created >= lifetime
                    || dead(&mut list[i].conn)
                {
                    close.push(list.remove(i).conn);
                    removed.push(k.clone());
                } else {
                    i += 1;
                }
            }
        }
        for k in removed {
            s.open -= 1;
            s.counts(&k).open -= 1;
            s.forget_if_unused(&k);
        }
        s.grant_slots();
        close
    }

    /// Starts draining: no new connections; idle ones are handed back for closing.
    pub fn start_drain(&self) -> Vec<C> {
        let mut s = self.lock();
        s.draining = true;
        s.waiters.clear();
        let mut close = Vec::new();
        while let Some((_, c)) = s.pop_oldest_idle() {
            close.push(c);
        }
        close
    }

    /// Counts a client logged in to (`+1`) or leaving (`-1`) a pool.
    pub fn client_delta(&self, key: &PoolKey, delta: isize) {
        let mut s = self.lock();
        let c = s.counts(key);
        c.clients = c.clients.saturating_add_signed(delta);
        s.forget_if_unused(key);
    }

    /// Current numbers.
    pub fn snapshot(&self) -> Snapshot {
        let s = self.lock();
        let mut pools: Vec<(PoolKey, PoolCounts)> =
            s.pools.iter().map(|(k, p)| (k.clone(), p.counts)).collect();
        for (k, c) in pools.iter_mut() {
            c.waiting = s
                .waiters
                .iter()
                .filter(|w| &w.key == k && !w.tx.is_closed())
                .count();
        }
        pools.sort_by(|a, b| a.0.cmp(&b.0));
        Snapshot {
            limit: s.limit,
            open: s.open,
            in_use: pools.iter().map(|(_, c)| c.in_use).sum(),
            idle: s.idle_total(),
            waiting: pools.iter().map(|(_, c)| c.waiting).sum(),
            pools,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(u: &str) -> PoolKey {
        PoolKey::new("db", u)
    }

    fn open_n(l: &Limiter<u32>, k: &PoolKey, n: usize) {
        for _ in 0..n {
            assert!(matches!(l.acquire(k), Acquire::Open(None)));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_limit_and_fifo() {
        let l = Limiter::<u32>::new(2);
        let k = key("a");
        open_n(&l, &k, 2);
        let Acquire::Wait { rx: rx1, .. } = l.acquire(&k) else {
            panic!()
        };
        let Acquire::Wait { rx: rx2, .. } = l.acquire(&k) else {
            panic!()
        };
        assert_eq!(l.snapshot().open, 2);
        assert_eq!(l.snapshot().waiting, 2);
        assert!(l.release(&k, 10, Instant::now(), true).is_empty());
        assert!(matches!(rx1.await.unwrap(), Grant::Conn(10)));
        assert!(l.release(&k, 11, Instant::now(), true).is_empty());
        assert!(matches!(rx2.await.unwrap(), Grant::Conn(11)));
        let s = l.snapshot();
        assert_eq!((s.open, s.in_use, s.idle, s.waiting), (2, 2, 0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_waiter_is_skipped() {
        let l = Limiter::<u32>::new(1);
        let k = key("a");
        open_n(&l, &k, 1);
        let Acquire::Wait { id, rx } = l.acquire(&k) else {
            panic!()
        };
        assert!(l.cancel_wait(id));
        drop(rx);
        let Acquire::Wait { rx: rx2, .. } = l.acquire(&k) else {
            panic!()
        };
        l.release(&k, 1, Instant::now(), true);
        assert!(matches!(rx2.await.unwrap(), Grant::Conn(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn other_pool_waiter_gets_the_slot() {
        let l = Limiter::<u32>::new(1);
        let (a, b) = (key("a"), key("b"));
        open_n(&l, &a, 1);
        let Acquire::Wait { rx, .. } = l.acquire(&b) else {
            panic!()
        };
        assert_eq!(l.release(&a, 7, Instant::now(), true), vec![7]);
        assert!(matches!(rx.await.unwrap(), Grant::Open));
        let s = l.snapshot();
        assert_eq!(s.open, 1);
        assert_eq!(s.pools.iter().find(|p| p.0 == b).unwrap().1.open, 1);
        assert!(s.pools.iter().all(|p| p.0 != a), "a has nothing left");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_of_other_pool_is_evicted_to_make_room() {
        let l = Limiter::<u32>::new(1);
        let (a, b) = (key("a"), key("b"));
        open_n(&l, &a, 1);
        l.release(&a, 3, Instant::now(), true);
        assert!(matches!(l.acquire(&b), Acquire::Open(Some(3))));
        assert_eq!(l.snapshot().open, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn lowering_limit_closes_idle_now_and_busy_on_release() {
        let l = Limiter::<u32>::new(4);
        let k = key("a");
        open_n(&l, &k, 4);
        l.release(&k, 1, Instant::now(), true);
        l.release(&k, 2, Instant::now(), true);
        let mut closed = l.set_limit(1);
        closed.sort();
        assert_eq!(closed, vec![1, 2]);
        assert_eq!(l.snapshot().open, 2);
        assert!(
            matches!(l.acquire(&k), Acquire::Wait { .. }),
            "no new opens above the limit"
        );
        assert_eq!(l.release(&k, 3, Instant::now(), true), vec![3]);
        assert_eq!(l.snapshot().open, 1);
        // Now at the limit, the last one is reused by the waiter.
        assert!(l.release(&k, 4, Instant::now(), true).is_empty());
        assert_eq!(l.snapshot().open, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn raising_limit_serves_waiters() {
        let l = Limiter::<u32>::new(1);
        let k = key("a");
        open_n(&l, &k, 1);
        let Acquire::Wait { rx, .. } = l.acquire(&k) else {
            panic!()
        };
        l.set_limit(2);
        assert!(matches!(rx.await.unwrap(), Grant::Open));
        assert_eq!(l.snapshot().open, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn reap_idle_and_old() {
        let l = Limiter::<u32>::new(3);
        let k = key("a");
        open_n(&l, &k, 3);
        let t0 = Instant::now();
        l.release(&k, 1, t0, true);
        tokio::time::advance(Duration::from_secs(5)).await;
        l.release(&k, 2, Instant::now(), true);
        l.release(&k, 3, t0, true);
        let mut closed = l.reap(Duration::from_secs(4), Duration::from_secs(100), |_| false);
        closed.sort();
        assert_eq!(closed, vec![1]);
        let closed = l.reap(Duration::from_secs(100), Duration::from_secs(5), |_| false);
        assert_eq!(closed, vec![3]);
        assert_eq!(l.snapshot().open, 1);
        assert!(
            l.reap(Duration::from_secs(100), Duration::from_secs(100), |_| {
                false
            })
            .is_empty()
        );
        assert!(matches!(l.acquire(&k), Acquire::Conn(2, _)));
        l.release(&k, 2, Instant::now(), true);
        assert_eq!(
            l.reap(Duration::from_secs(100), Duration::from_secs(100), |c| *c
                == 2),
            vec![2]
        );
        assert_eq!(l.snapshot().open, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn unused_pools_are_forgotten() {
        let l = Limiter::<u32>::new(2);
        for i in 0..100 {
            let k = key(&format!("bogus{i}"));
            assert!(matches!(l.acquire(&k), Acquire::Open(_)));
            // The database does not exist: the login fails.
            l.discard(&k);
        }
        assert!(l.snapshot().pools.is_empty(), "no entry per name asked for");
        let k = key("app");
        l.client_delta(&k, 1);
        open_n(&l, &k, 1);
        assert!(l.release(&k, 7, Instant::now(), true).is_empty());
        l.client_delta(&k, -1);
        assert_eq!(l.snapshot().pools.len(), 1, "an idle connection keeps it");
        assert_eq!(l.reap(Duration::ZERO, Duration::MAX, |_| false).len(), 1);
        assert!(
            l.snapshot().pools.is_empty(),
            "gone with its last connection"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn broken_and_draining() {
        let l = Limiter::<u32>::new(2);
        let k = key("a");
        open_n(&l, &k, 2);
        assert_eq!(l.release(&k, 1, Instant::now(), false), vec![1]);
        l.discard(&k);
        assert_eq!(l.snapshot().open, 0);
        open_n(&l, &k, 1);
        l.release(&k, 5, Instant::now(), true);
        assert_eq!(l.start_drain(), vec![5]);
        assert!(matches!(l.acquire(&k), Acquire::Wait { .. }));
        assert_eq!(l.snapshot().open, 0);
    }
}
