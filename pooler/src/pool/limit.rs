//! Pure bookkeeping of the process-wide server connection limit: idle connections per
//! pool, a FIFO wait queue, and per-pool counters. No I/O; callers close what it hands
//! back. The lock is never held across an await.
//!
//! # Guarantees
//! A connection handed back for closing keeps its slot until its [`SlotGuard`] is
//! dropped, which the caller does once the server has closed its end (the backend is
//! gone): connections open, opening and closing together never exceed the limit, so
//! PostgreSQL never sees more backends from this process than the limit, even when a
//! busy connection is cancelled or a pool's slot goes to another pool.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustc_hash::FxBuildHasher;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// One pool: a (database, user) pair.
///
/// Pools are looked up on every transaction: the key's hash is worked out once, keyed
/// per process (names are client-chosen, so they cannot steer it), and keys sharing
/// their names' allocations compare without reading them.
#[derive(Debug, Clone)]
pub struct PoolKey {
    pub database: Arc<str>,
    pub user: Arc<str>,
    hash: u64,
}

impl PoolKey {
    pub fn new(database: &str, user: &str) -> Self {
        static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> =
            std::sync::OnceLock::new();
        let hash = KEY
            .get_or_init(std::collections::hash_map::RandomState::new)
            .hash_one((database, user));
        Self {
            database: database.into(),
            user: user.into(),
            hash,
        }
    }
}

impl PartialEq for PoolKey {
    fn eq(&self, other: &Self) -> bool {
        let same = |a: &Arc<str>, b: &Arc<str>| Arc::ptr_eq(a, b) || a == b;
        self.hash == other.hash
            && same(&self.database, &other.database)
            && same(&self.user, &other.user)
    }
}

impl Eq for PoolKey {}

impl std::hash::Hash for PoolKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialOrd for PoolKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for PoolKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (&self.database, &self.user).cmp(&(&other.database, &other.user))
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
    /// A reserved slot: open a new connection.
    Open,
    /// Wait on this receiver; `id` identifies the waiter for [`Limiter::cancel_wait`].
    /// `evicted` is an idle connection of another pool to close to make room: the
    /// waiter gets its slot once that one is gone.
    Wait {
        id: u64,
        rx: oneshot::Receiver<Grant<C>>,
        evicted: Option<Closing<C>>,
    },
}

/// A connection to close; its slot stays taken until `slot` is dropped.
#[derive(Debug)]
pub struct Closing<C> {
    pub conn: C,
    pub slot: SlotGuard<C>,
}

impl<C: PartialEq> PartialEq<C> for Closing<C> {
    fn eq(&self, other: &C) -> bool {
        self.conn == *other
    }
}

/// Holds one slot of a connection being closed; dropping it frees the slot (and may
/// serve a waiter).
pub struct SlotGuard<C> {
    state: Arc<Mutex<State<C>>>,
}

impl<C> std::fmt::Debug for SlotGuard<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SlotGuard")
    }
}

impl<C> Drop for SlotGuard<C> {
    fn drop(&mut self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.closing -= 1;
        s.grant_slots();
    }
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
    /// Server connections that may exist: open, opening and closing.
    pub open: usize,
    /// Of those, being closed (the server has not closed its end yet).
    pub closing: usize,
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
    /// Connections open or opening (in use or idle).
    open: usize,
    /// Connections handed back for closing whose [`SlotGuard`] is alive.
    closing: usize,
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

impl<C> Pool<C> {
    /// Lends the most recently used idle connection, with how long it was idle at `now`.
    fn lend_idle(&mut self, now: Instant) -> Option<(C, Duration)> {
        let i = self.idle.pop()?;
        self.counts.in_use += 1;
        Some((i.conn, now - i.since))
    }

    /// Keeps `conn` idle from `now`.
    fn put_idle(&mut self, conn: C, created: Instant, now: Instant) {
        self.idle.push(Idle {
            conn,
            since: now,
            created,
        });
    }
}

/// The limiter; see the module docs. `C` is the connection type.
pub struct Limiter<C> {
    state: Arc<Mutex<State<C>>>,
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

    /// Slots taken: connections open, opening or closing.
    fn used(&self) -> usize {
        self.open + self.closing
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
        while self.used() < self.limit && !self.draining {
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
            state: Arc::new(Mutex::new(State {
                limit,
                open: 0,
                closing: 0,
                draining: false,
                next_id: 0,
                waiters: VecDeque::new(),
                pools: HashMap::default(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<C>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `conn`, whose slot `s` already moved from `open` to `closing`, with its guard.
    fn closing(&self, conn: C) -> Closing<C> {
        Closing {
            conn,
            slot: SlotGuard {
                state: self.state.clone(),
            },
        }
    }

    /// `key`, sharing the names of its pool's own key when the pool exists: the
    /// comparisons of every lookup then skip reading them.
    pub fn intern(&self, key: PoolKey) -> PoolKey {
        self.lock()
            .pools
            .get_key_value(&key)
            .map_or(key, |(k, _)| k.clone())
    }

    /// Takes `key`'s most recently used idle connection, if it has one, with how long it
    /// was idle at `now`.
    pub fn take_one_idle(&self, key: &PoolKey, now: Instant) -> Option<(C, Duration)> {
        self.lock().pools.get_mut(key)?.lend_idle(now)
    }

    /// Takes an idle connection of `key`, reserves a slot, or queues the caller.
    pub fn acquire(&self, key: &PoolKey) -> Acquire<C> {
        self.acquire_at(key, Instant::now())
    }

    /// [`Self::acquire`] with the caller's clock reading (one per transaction is enough).
    pub fn acquire_at(&self, key: &PoolKey, now: Instant) -> Acquire<C> {
        let mut s = self.lock();
        if let Some((conn, idle)) = s.pool(key).lend_idle(now) {
            return Acquire::Conn(conn, idle);
        }
        let mut evicted = None;
        if s.waiters.is_empty() && !s.draining {
            if s.used() < s.limit {
                s.open += 1;
                let c = s.counts(key);
                c.open += 1;
                c.in_use += 1;
                return Acquire::Open;
            }
            // Make room by closing another pool's idle connection; the slot is this
            // caller's (first in the queue) once that one is gone.
            if let Some((_, conn)) = s.pop_oldest_idle() {
                s.closing += 1;
                evicted = Some(conn);
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
        drop(s);
        Acquire::Wait {
            id,
            rx,
            evicted: evicted.map(|c| self.closing(c)),
        }
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
    /// Returns connections the caller must close (see [`Closing`]).
    pub fn release(
        &self,
        key: &PoolKey,
        conn: C,
        created: Instant,
        reusable: bool,
    ) -> Vec<Closing<C>> {
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
    ) -> Vec<Closing<C>> {
        let mut s = self.lock();
        if reusable && s.waiters.is_empty() && !s.draining && s.used() <= s.limit {
            // The common case, with one lookup: back to the pool's idle list.
            let pool = s.pool(key);
            pool.counts.in_use -= 1;
            pool.put_idle(conn, created, now);
            return Vec::new();
        }
        s.pool(key).counts.in_use -= 1;
        let mut conn = conn;
        loop {
            let front = s.waiters.front().map(|w| (w.key == *key, w.tx.is_closed()));
            match front {
                Some((_, true)) => {
                    s.waiters.pop_front();
                }
                Some((true, false)) if reusable && !s.draining && s.used() <= s.limit => {
                    let w = s.waiters.pop_front().expect("front exists");
                    match w.tx.send(Grant::Conn(conn)) {
                        Ok(()) => {
                            s.counts(key).in_use += 1;
                            return Vec::new();
                        }
                        Err(Grant::Conn(c)) => conn = c,
                        Err(Grant::Open) => unreachable!("sent a connection"),
                    }
                }
                None if reusable && !s.draining && s.used() <= s.limit => {
                    s.pool(key).put_idle(conn, created, now);
                    return Vec::new();
                }
                // Closed: broken, draining, above the limit, or another pool's client
                // waits first (its slot is this one, once the server has let it go).
                _ => {
                    s.open -= 1;
                    s.closing += 1;
                    s.counts(key).open -= 1;
                    s.forget_if_unused(key);
                    drop(s);
                    return vec![self.closing(conn)];
                }
            }
        }
    }

    /// The limit in force.
    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    /// Whether a slot reserved for opening is still within the limit (it may have been
    /// lowered since it was reserved); if not, the slot goes back and the caller must
    /// acquire again.
    pub fn keep_opening(&self, key: &PoolKey) -> bool {
        let mut s = self.lock();
        if s.used() <= s.limit {
            return true;
        }
        s.open -= 1;
        let c = s.counts(key);
        c.open -= 1;
        c.in_use -= 1;
        s.forget_if_unused(key);
        false
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
    pub fn set_limit(&self, limit: usize) -> Vec<Closing<C>> {
        let mut s = self.lock();
        s.limit = limit;
        let mut close = Vec::new();
        for _ in 0..s.used().saturating_sub(s.limit) {
            match s.pop_oldest_idle() {
                Some((_, c)) => {
                    s.closing += 1;
                    close.push(c);
                }
                None => break,
            }
        }
        s.grant_slots();
        drop(s);
        close.into_iter().map(|c| self.closing(c)).collect()
    }

    /// Idle connections idle longer than `idle_timeout`, older than `lifetime`, or for
    /// which `dead` says so.
    pub fn reap(
        &self,
        idle_timeout: Duration,
        lifetime: Duration,
        mut dead: impl FnMut(&mut C) -> bool,
    ) -> Vec<Closing<C>> {
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
            s.closing += 1;
            s.counts(&k).open -= 1;
            s.forget_if_unused(&k);
        }
        drop(s);
        close.into_iter().map(|c| self.closing(c)).collect()
    }

    /// Idle connections of the pools `which` selects, handed back for closing.
    pub fn take_idle(&self, which: impl Fn(&PoolKey) -> bool) -> Vec<Closing<C>> {
        let mut s = self.lock();
        let mut close = Vec::new();
        let keys: Vec<PoolKey> = s.pools.keys().filter(|k| which(k)).cloned().collect();
        for key in keys {
            let pool = s.pool(&key);
            let idle = std::mem::take(&mut pool.idle);
            pool.counts.open -= idle.len();
            s.open -= idle.len();
            s.closing += idle.len();
            close.extend(idle.into_iter().map(|i| i.conn));
            s.forget_if_unused(&key);
        }
        drop(s);
        close.into_iter().map(|c| self.closing(c)).collect()
    }

    /// Starts draining: no new connections; idle ones are handed back for closing.
    pub fn start_drain(&self) -> Vec<Closing<C>> {
        let mut s = self.lock();
        s.draining = true;
        s.waiters.clear();
        let mut close = Vec::new();
        while let Some((_, c)) = s.pop_oldest_idle() {
            s.closing += 1;
            close.push(c);
        }
        drop(s);
        close.into_iter().map(|c| self.closing(c)).collect()
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
            open: s.used(),
            closing: s.closing,
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
            assert!(matches!(l.acquire(k), Acquire::Open));
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

    #[test]
    fn keys_are_equal_by_names_whatever_their_allocations() {
        let (a, b) = (PoolKey::new("db", "u"), PoolKey::new("db", "u"));
        assert!(!Arc::ptr_eq(&a.database, &b.database));
        assert_eq!(a, b);
        let mut map = HashMap::with_hasher(FxBuildHasher);
        map.insert(a.clone(), 1);
        assert_eq!(map.get(&b), Some(&1));
        assert_ne!(a, PoolKey::new("db", "v"));
        assert_ne!(PoolKey::new("dbu", ""), PoolKey::new("db", "u"));
        assert!(
            PoolKey::new("a", "z") < PoolKey::new("b", "a"),
            "ordered by names"
        );
        // Interning hands out the pool's own names.
        let l = Limiter::<u32>::new(1);
        assert!(
            !Arc::ptr_eq(&l.intern(b.clone()).user, &a.user),
            "no pool yet"
        );
        open_n(&l, &a, 1);
        assert!(Arc::ptr_eq(&l.intern(b).user, &a.user));
    }

    #[tokio::test(start_paused = true)]
    async fn take_one_idle_lends_the_last_returned_of_its_own_pool() {
        let l = Limiter::<u32>::new(3);
        let (a, b) = (key("a"), key("b"));
        assert!(l.take_one_idle(&a, Instant::now()).is_none(), "no pool yet");
        open_n(&l, &a, 2);
        l.release(&a, 1, Instant::now(), true);
        tokio::time::advance(Duration::from_secs(2)).await;
        l.release(&a, 2, Instant::now(), true);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(l.take_one_idle(&b, Instant::now()).is_none(), "not b's");
        let (c, idle) = l.take_one_idle(&a, Instant::now()).expect("idle");
        assert_eq!((c, idle), (2, Duration::from_secs(1)));
        let s = l.snapshot();
        assert_eq!((s.open, s.in_use, s.idle), (2, 1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_waiter_is_skipped() {
        let l = Limiter::<u32>::new(1);
        let k = key("a");
        open_n(&l, &k, 1);
        let Acquire::Wait { id, rx, .. } = l.acquire(&k) else {
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
        let mut rx = rx;
        let closing = l.release(&a, 7, Instant::now(), true);
        assert_eq!(closing, vec![7], "closed to make room for b");
        let s = l.snapshot();
        assert_eq!(
            (s.open, s.closing),
            (1, 1),
            "its slot is taken until it is gone"
        );
        assert!(rx.try_recv().is_err(), "b waits for it");
        drop(closing);
        assert!(matches!(rx.await.unwrap(), Grant::Open));
        let s = l.snapshot();
        assert_eq!((s.open, s.closing), (1, 0));
        assert_eq!(s.pools.iter().find(|p| p.0 == b).unwrap().1.open, 1);
        assert!(s.pools.iter().all(|p| p.0 != a), "a has nothing left");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_of_other_pool_is_evicted_to_make_room() {
        let l = Limiter::<u32>::new(1);
        let (a, b) = (key("a"), key("b"));
        open_n(&l, &a, 1);
        l.release(&a, 3, Instant::now(), true);
        let Acquire::Wait {
            mut rx,
            evicted: Some(evicted),
            ..
        } = l.acquire(&b)
        else {
            panic!("a's idle connection is closed for b")
        };
        assert_eq!(evicted, 3);
        assert_eq!(l.snapshot().open, 1);
        assert!(rx.try_recv().is_err(), "b's slot is free once 3 is gone");
        drop(evicted);
        assert!(matches!(rx.await.unwrap(), Grant::Open));
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
        closed.sort_by_key(|c| c.conn);
        assert_eq!(closed, vec![1, 2]);
        assert_eq!(
            l.snapshot().open,
            4,
            "closing ones count until they are gone"
        );
        drop(closed);
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
        let closed = l.reap(Duration::from_secs(4), Duration::from_secs(100), |_| false);
        assert_eq!(closed, vec![1]);
        drop(closed);
        let closed = l.reap(Duration::from_secs(100), Duration::from_secs(5), |_| false);
        assert_eq!(closed, vec![3]);
        drop(closed);
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
            assert!(matches!(l.acquire(&k), Acquire::Open));
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
