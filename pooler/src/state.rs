//! Process-wide shared state: the applied config, pools, cancel keys, metrics, drain flag.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{Config, PoolMode};
use crate::memory::MemoryBudget;
use crate::metrics::Metrics;
use crate::pool::{Pools, close_all, send_cancel, send_cancel_request};
use crate::protocol::{BackendKeyData, CancelRequest};

/// One client (a TCP or WebSocket session, or an HTTP request) counted in
/// [`Shared::clients`], given back on drop on every path (a cancelled task included).
#[derive(Debug)]
pub struct ClientCount<'a> {
    shared: &'a Shared,
    /// Clients counted, this one included, when it was taken.
    pub n: usize,
}

impl<'a> ClientCount<'a> {
    /// The state it is counted in.
    pub fn shared(&self) -> &'a Shared {
        self.shared
    }
}

impl Drop for ClientCount<'_> {
    fn drop(&mut self) {
        self.shared.clients.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Which server backend a client is currently using, for CancelRequest.
pub type CancelSlot = Arc<Mutex<Option<(SocketAddr, BackendKeyData)>>>;

/// A session's copy of the config in force, for its hot path: reading it costs one
/// atomic load, where [`Shared::config`] takes a lock and counts a reference.
///
/// # Guarantees
/// [`ConfigCache::get`] returns the config applied last, or one applied later.
#[derive(Debug)]
pub struct ConfigCache {
    epoch: u64,
    config: Arc<Config>,
}

impl ConfigCache {
    pub fn new(shared: &Shared) -> Self {
        // The epoch first: a config applied in between is fetched again at the next get.
        let epoch = shared.config_epoch.load(Ordering::Acquire);
        Self {
            epoch,
            config: shared.config(),
        }
    }

    /// The config in force.
    pub fn get(&mut self, shared: &Shared) -> &Config {
        let epoch = shared.config_epoch.load(Ordering::Acquire);
        if epoch != self.epoch {
            *self = Self::new(shared);
        }
        &self.config
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct Shared {
    config: RwLock<Arc<Config>>,
    /// Bumped after each config applied (see [`ConfigCache`]).
    config_epoch: AtomicU64,
    pub pools: Pools,
    pub metrics: Metrics,
    pub clients: AtomicUsize,
    draining: AtomicBool,
    drain_tx: watch::Sender<bool>,
    // Keys are ours (random), so a fast hash cannot be steered by clients.
    cancels: Mutex<rustc_hash::FxHashMap<(i32, i32), CancelSlot>>,
    /// Turns for passing other pods' session-mode cancel keys to the database.
    backend_cancels: tokio::sync::Semaphore,
    /// Bound on one client message.
    pub max_message: usize,
    /// Fixed at startup (changing it needs a restart).
    pub mode: PoolMode,
    /// Bumped when a schema change may have changed a shared statement's result type:
    /// client Parses after it get server statements of their own epoch (fresh plans),
    /// while statements prepared before keep theirs.
    schema_epoch: AtomicU64,
    /// Bound on what clients make the pooler hold (`max_client_memory`).
    pub memory: MemoryBudget,
    /// The process may open server connections (admitted, or no admission required).
    admitted: AtomicBool,
    /// Random per process: admission tokens are made from it.
    pub admission_nonce: String,
    /// Cleartext passwords (HTTP, WebSocket) checked against the users' secrets.
    pub passwords: crate::auth::PasswordCheck,
}

impl Shared {
    pub fn new(config: Config, max_message: usize) -> Self {
        let (drain_tx, _) = watch::channel(false);
        let memory = MemoryBudget::new(config.max_client_memory);
        let admitted = !config.require_admission;
        Self {
            // Until admitted, the process may open no server connection.
            pools: Pools::new(if admitted { config.connection_limit } else { 0 }),
            admitted: AtomicBool::new(admitted),
            admission_nonce: format!("{:032x}", rand::random::<u128>()),
            mode: config.pool_mode,
            config: RwLock::new(Arc::new(config)),
            config_epoch: AtomicU64::new(0),
            metrics: Metrics::new(),
            clients: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            drain_tx,
            cancels: Mutex::new(rustc_hash::FxHashMap::default()),
            backend_cancels: tokio::sync::Semaphore::new(8),
            max_message,
            schema_epoch: AtomicU64::new(0),
            memory,
            passwords: crate::auth::PasswordCheck::default(),
        }
    }

    /// The current schema epoch (see [`Shared::schema_changed`]).
    pub fn schema_epoch(&self) -> u64 {
        self.schema_epoch.load(Ordering::Relaxed)
    }

    /// A server reported DDL (or a statement whose result type changed under it): new
    /// Parses do not share statements prepared before.
    pub fn schema_changed(&self) {
        self.schema_epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Applies a new config live; keys that need a restart keep their old values.
    pub fn apply(&self, mut new: Config) {
        let old = self.config();
        if new.listen_addr != old.listen_addr
            || new.admin_addr != old.admin_addr
            || new.pool_mode != old.pool_mode
        {
            tracing::warn!(
                "listen_addr, admin_addr and pool_mode need a restart; keeping the old values"
            );
            new.listen_addr = old.listen_addr.clone();
            new.admin_addr = old.admin_addr.clone();
            new.pool_mode = old.pool_mode;
        }
        self.memory.set_limit(new.max_client_memory);
        let limit = self.pools.limit_for(&new);
        let hash = new.hash.clone();
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        self.config_epoch.fetch_add(1, Ordering::Release);
        if limit != self.pools.limiter().limit() && self.is_admitted() {
            close_all(self.pools.limiter().set_limit(limit));
        }
        tracing::info!(config_hash = %hash, connection_limit = limit, "config applied");
    }

    pub fn is_admitted(&self) -> bool {
        self.admitted.load(Ordering::SeqCst)
    }

    /// Admits the process when `token` is [`sluice_contract::admission_token`] of the
    /// server password and this process's nonce: its `connection_limit` applies from
    /// now on. Returns whether the token was right (admitting twice is harmless).
    pub fn admit(&self, token: &str) -> bool {
        let cfg = self.config();
        let want = sluice_contract::admission_token(
            cfg.server.password.as_deref().unwrap_or(""),
            &self.admission_nonce,
        );
        let right = want.len() == token.len()
            && want
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if right && !self.admitted.swap(true, Ordering::SeqCst) {
            close_all(self.pools.limiter().set_limit(self.pools.limit_for(&cfg)));
            tracing::info!(
                connection_limit = cfg.connection_limit,
                "admitted by the operator"
            );
        }
        right
    }

    /// Closes the idle server connections to database `db` (a client drops it).
    pub fn close_idle_to(&self, db: &str) {
        let cfg = self.config();
        let conns = match cfg.server.database.as_deref() {
            // Every pool connects to the one configured database.
            Some(fixed) if fixed == db => self.pools.limiter().take_idle(|_| true),
            Some(_) => Vec::new(),
            None => self.pools.limiter().take_idle(|k| &*k.database == db),
        };
        if !conns.is_empty() {
            tracing::info!(
                database = %db.escape_debug(),
                closed = conns.len(),
                "DROP DATABASE: closing idle server connections to it"
            );
        }
        close_all(conns);
    }

    /// Counts one more client in [`Shared::clients`] until the guard drops.
    pub fn count_client(&self) -> ClientCount<'_> {
        let n = self.clients.fetch_add(1, Ordering::SeqCst) + 1;
        ClientCount { shared: self, n }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Notified once draining starts.
    pub fn drain_signal(&self) -> watch::Receiver<bool> {
        self.drain_tx.subscribe()
    }

    /// Marks not ready, tells every session, and closes idle server connections.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.drain_tx.send_replace(true);
        close_all(self.pools.limiter().start_drain());
    }

    /// Registers a client's pooler-issued cancel key; returns the key and its slot. The
    /// key's process id is this pod's IPv4 address (`local`, where the client reached
    /// it) so that any peer behind the same Service can pass a CancelRequest on to it
    /// (see [`Shared::cancel`]); the secret alone tells this pod's clients apart. It is
    /// never a backend's process id (see [`is_backend_pid`]).
    pub fn register_cancel(&self, local: Option<SocketAddr>) -> (BackendKeyData, CancelSlot) {
        let slot: CancelSlot = Arc::new(Mutex::new(None));
        let pid = local.and_then(ipv4_of).map(|ip| u32::from(ip) as i32);
        let mut map = self.cancels.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let key = BackendKeyData {
                // Without an IPv4 address: a process id in 127.0.0.0/8, which no peer
                // passes on (see `cancel_peer`) and which is no backend's.
                pid: pid.unwrap_or_else(|| rand::random_range(0x7F00_0000..=i32::MAX)),
                secret: rand::random(),
            };
            if let std::collections::hash_map::Entry::Vacant(e) = map.entry((key.pid, key.secret)) {
                e.insert(slot.clone());
                return (key, slot);
            }
        }
    }

    /// Registers a session-mode client's key, its own backend's (so that
    /// `pg_backend_pid()`, `pg_terminate_backend` and notifications agree with it), for
    /// [`Shared::cancel_all`]; other pods pass a CancelRequest with it to the database.
    pub fn register_backend_cancel(&self, key: BackendKeyData) -> CancelSlot {
        let slot: CancelSlot = Arc::new(Mutex::new(None));
        self.cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((key.pid, key.secret), slot.clone());
        slot
    }

    pub fn unregister_cancel(&self, key: BackendKeyData) {
        self.cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(key.pid, key.secret));
    }

    /// Handles a CancelRequest that reached this pooler at `local`: a key this process
    /// issued goes to the backend serving that client, if any; a key another pod issued
    /// (behind a Service the request lands on any pod) is passed on once to that pod.
    pub async fn cancel(&self, req: CancelRequest, local: Option<SocketAddr>) {
        let target = {
            let map = self.cancels.lock().unwrap_or_else(|e| e.into_inner());
            map.get(&(req.pid, req.secret))
                .map(|s| *s.lock().unwrap_or_else(|e| e.into_inner()))
        };
        match target {
            Some(Some((addr, key))) => send_cancel(addr, key).await,
            Some(None) => {}
            None if is_backend_pid(req.pid) => {
                // A session-mode client's backend key, issued by another pod: PostgreSQL
                // checks the secret. A few at a time (a request waits a second for its
                // turn), so that made-up keys cannot make this pod open connections
                // without bound; to every address of the server, whichever one the
                // backend is on.
                let turn = self.backend_cancels.acquire();
                let Ok(Ok(_turn)) = tokio::time::timeout(Duration::from_secs(1), turn).await else {
                    return;
                };
                let cfg = self.config();
                let req = CancelRequest {
                    from_peer: false,
                    ..req
                };
                let Ok(addrs) =
                    tokio::net::lookup_host((cfg.server.host.as_str(), cfg.server.port)).await
                else {
                    return;
                };
                futures::future::join_all(addrs.map(|a| send_cancel_request(a, req))).await;
            }
            None => {
                if let Some(peer) = local.and_then(|l| cancel_peer(req, l)) {
                    let req = CancelRequest {
                        from_peer: true,
                        ..req
                    };
                    send_cancel_request(peer, req).await;
                }
            }
        }
    }

    /// Cancels whatever every client is running (end of drain).
    pub async fn cancel_all(&self) {
        let targets: Vec<_> = {
            let map = self.cancels.lock().unwrap_or_else(|e| e.into_inner());
            map.values()
                .filter_map(|s| *s.lock().unwrap_or_else(|e| e.into_inner()))
                .collect()
        };
        let tasks: Vec<_> = targets
            .into_iter()
            .map(|(a, k)| tokio::spawn(send_cancel(a, k)))
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// Process ids below this are backends' (Linux's `pid_max` is at most 2^22); cancel keys
/// the pooler makes up are at or above it (an IPv4 address in `0.0.0.0/8` is no pod's).
const BACKEND_PIDS: i32 = 1 << 24;

/// Whether a cancel key's process id is a PostgreSQL backend's (a session-mode key).
pub fn is_backend_pid(pid: i32) -> bool {
    (1..BACKEND_PIDS).contains(&pid)
}

/// The IPv4 address of `addr` (an IPv4-mapped IPv6 address included).
fn ipv4_of(addr: SocketAddr) -> Option<Ipv4Addr> {
    match addr.ip().to_canonical() {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(_) => None,
    }
}

/// The peer pooler a CancelRequest that reached this one at `local` belongs to: the pod
/// whose IPv4 address its process id is, on the same port. `None` for a request a peer
/// passed on (never passed on twice), a key of this pod's own address (unknown here:
/// nothing to do), and addresses no pod has.
pub fn cancel_peer(req: CancelRequest, local: SocketAddr) -> Option<SocketAddr> {
    if req.from_peer {
        return None;
    }
    let own = ipv4_of(local)?;
    let ip = Ipv4Addr::from(req.pid as u32);
    let nowhere = ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast();
    if ip == own || nowhere || (ip.is_loopback() && !own.is_loopback()) {
        return None;
    }
    Some(SocketAddr::new(IpAddr::V4(ip), local.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_config_cache_sees_the_config_applied_after_it() {
        let cfg = |limit: usize| {
            let text = format!(
                "connection_limit = {limit}\nmax_prepared_statements = {limit}\n[server]\nhost = \"127.0.0.1\"\nuser = \"app\"\npassword = \"pw\"\n[auth.users]\napp = \"secret\"\n"
            );
            Config::from_bytes(text.as_bytes()).unwrap()
        };
        let shared = Shared::new(cfg(5), 1 << 20);
        let mut cache = ConfigCache::new(&shared);
        assert_eq!(cache.get(&shared).max_prepared_statements, 5);
        shared.apply(cfg(7));
        assert_eq!(cache.get(&shared).max_prepared_statements, 7);
        assert_eq!(cache.get(&shared).connection_limit, 7);
    }

    fn req(ip: [u8; 4], from_peer: bool) -> CancelRequest {
        CancelRequest {
            pid: u32::from(Ipv4Addr::from(ip)) as i32,
            secret: 7,
            from_peer,
        }
    }

    #[test]
    fn cancels_go_to_the_pod_that_issued_the_key_once() {
        let local: SocketAddr = "10.0.0.5:5432".parse().unwrap();
        assert_eq!(
            cancel_peer(req([10, 0, 1, 9], false), local),
            Some("10.0.1.9:5432".parse().unwrap())
        );
        assert_eq!(
            cancel_peer(req([10, 0, 1, 9], true), local),
            None,
            "not twice"
        );
        assert_eq!(
            cancel_peer(req([10, 0, 0, 5], false), local),
            None,
            "own key"
        );
        assert_eq!(cancel_peer(req([127, 0, 0, 1], false), local), None);
        assert_eq!(cancel_peer(req([0, 0, 0, 0], false), local), None);
        assert_eq!(cancel_peer(req([224, 0, 0, 1], false), local), None);
        let mapped: SocketAddr = "[::ffff:10.0.0.5]:6432".parse().unwrap();
        assert_eq!(
            cancel_peer(req([10, 0, 1, 9], false), mapped),
            Some("10.0.1.9:6432".parse().unwrap())
        );
        let v6: SocketAddr = "[fd00::5]:5432".parse().unwrap();
        assert_eq!(cancel_peer(req([10, 0, 1, 9], false), v6), None);
    }
}
