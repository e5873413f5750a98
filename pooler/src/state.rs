//! Process-wide shared state: the applied config, pools, cancel keys, metrics, drain flag.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::watch;

use crate::config::{Config, PoolMode};
use crate::memory::MemoryBudget;
use crate::metrics::Metrics;
use crate::pool::{Pools, close_all, send_cancel};
use crate::protocol::{BackendKeyData, CancelRequest};

/// Which server backend a client is currently using, for CancelRequest.
pub type CancelSlot = Arc<Mutex<Option<(SocketAddr, BackendKeyData)>>>;

/// See the module docs.
#[derive(Debug)]
pub struct Shared {
    config: RwLock<Arc<Config>>,
    pub pools: Pools,
    pub metrics: Metrics,
    pub clients: AtomicUsize,
    draining: AtomicBool,
    drain_tx: watch::Sender<bool>,
    cancels: Mutex<HashMap<(i32, i32), CancelSlot>>,
    /// Bound on one client message.
    pub max_message: usize,
    /// Fixed at startup (changing it needs a restart).
    pub mode: PoolMode,
    /// Bumped when a schema change may have changed a shared statement's result type:
    /// statements prepared on server connections before it are prepared again.
    schema_epoch: AtomicU64,
    /// Bound on what clients make the pooler hold (`max_client_memory`).
    pub memory: MemoryBudget,
}

impl Shared {
    pub fn new(config: Config, max_message: usize) -> Self {
        let (drain_tx, _) = watch::channel(false);
        let memory = MemoryBudget::new(config.max_client_memory);
        Self {
            pools: Pools::new(config.connection_limit),
            mode: config.pool_mode,
            config: RwLock::new(Arc::new(config)),
            metrics: Metrics::new(),
            clients: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            drain_tx,
            cancels: Mutex::new(HashMap::new()),
            max_message,
            schema_epoch: AtomicU64::new(0),
            memory,
        }
    }

    /// The current schema epoch (see [`Shared::schema_changed`]).
    pub fn schema_epoch(&self) -> u64 {
        self.schema_epoch.load(Ordering::Relaxed)
    }

    /// A server reported DDL (or a statement whose result type changed under it):
    /// statements already prepared on server connections are not trusted by new Parses.
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
        let limit = new.connection_limit;
        let hash = new.hash.clone();
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        if limit != old.connection_limit {
            close_all(self.pools.limiter().set_limit(limit));
        }
        tracing::info!(config_hash = %hash, connection_limit = limit, "config applied");
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

    /// Registers a client's pooler-issued cancel key; returns the key and its slot.
    pub fn register_cancel(&self) -> (BackendKeyData, CancelSlot) {
        let slot: CancelSlot = Arc::new(Mutex::new(None));
        let mut map = self.cancels.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let key = BackendKeyData {
                pid: rand::random::<i32>().abs().max(1),
                secret: rand::random(),
            };
            if let std::collections::hash_map::Entry::Vacant(e) = map.entry((key.pid, key.secret)) {
                e.insert(slot.clone());
                return (key, slot);
            }
        }
    }

    pub fn unregister_cancel(&self, key: BackendKeyData) {
        self.cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(key.pid, key.secret));
    }

    /// Forwards a client's CancelRequest to the backend serving it, if any.
    pub async fn cancel(&self, req: CancelRequest) {
        let target = {
            let map = self.cancels.lock().unwrap_or_else(|e| e.into_inner());
            map.get(&(req.pid, req.secret))
                .and_then(|s| *s.lock().unwrap_or_else(|e| e.into_inner()))
        };
        if let Some((addr, key)) = target {
            send_cancel(addr, key).await;
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
