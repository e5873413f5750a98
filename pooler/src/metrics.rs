//! Prometheus metrics (text format via prometheus-client).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::pool::{PoolKey, Snapshot};

/// Labels of per-pool series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub database: String,
    pub user: String,
}

impl From<&PoolKey> for PoolLabels {
    fn from(k: &PoolKey) -> Self {
        Self {
            database: k.database.to_string(),
            user: k.user.to_string(),
        }
    }
}

/// Labels of the error counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
}

/// Labels of the HTTP front door's series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `ok`, `sql_error` (PostgreSQL's error), or the error kind (`auth`,
    /// `pool_timeout`, `bad_request`, `too_large`, ...).
    pub outcome: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every metric the pooler exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub clients: Family<PoolLabels, Gauge>,
    pub clients_waiting: Family<PoolLabels, Gauge>,
    pub server_open: Family<PoolLabels, Gauge>,
    pub server_in_use: Family<PoolLabels, Gauge>,
    pub connection_limit: Gauge,
    /// Bytes held under `max_client_memory` (see `crate::memory`).
    pub client_memory: Gauge,
    pub wait_seconds: Histogram,
    pub queries: Family<PoolLabels, Counter>,
    pub transactions: Family<PoolLabels, Counter>,
    pub pool_timeouts: Counter,
    pub errors: Family<ErrorLabels, Counter>,
    pub http_requests: Family<OutcomeLabels, Counter>,
    pub http_request_seconds: Family<OutcomeLabels, Histogram, fn() -> Histogram>,
    pub websocket_sessions: Gauge,
    pub websocket_sessions_total: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice_pooler");
        let m = Self {
            clients: Family::default(),
            clients_waiting: Family::default(),
            server_open: Family::default(),
            server_in_use: Family::default(),
            connection_limit: Gauge::default(),
            client_memory: Gauge::default(),
            wait_seconds: Histogram::new(exponential_buckets(0.0001, 4.0, 10)),
            queries: Family::default(),
            transactions: Family::default(),
            pool_timeouts: Counter::default(),
            errors: Family::default(),
            http_requests: Family::default(),
            http_request_seconds: Family::new_with_constructor(latency_histogram),
            websocket_sessions: Gauge::default(),
            websocket_sessions_total: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("clients", "Client connections per pool", m.clients.clone());
        registry.register(
            "clients_waiting",
            "Clients waiting for a server connection",
            m.clients_waiting.clone(),
        );
        registry.register(
            "server_connections_open",
            "Server connections open per pool",
            m.server_open.clone(),
        );
        registry.register(
            "server_connections_in_use",
            "Server connections in use per pool",
            m.server_in_use.clone(),
        );
        registry.register(
            "connection_limit",
            "Process-wide server connection limit",
            m.connection_limit.clone(),
        );
        registry.register(
            "client_memory_bytes",
            "Bytes clients make the pooler hold (long messages, prepared statements), bounded by max_client_memory",
            m.client_memory.clone(),
        );
        registry.register(
            "wait_seconds",
            "Time clients waited for a server connection",
            m.wait_seconds.clone(),
        );
        registry.register(
            "queries",
            "Queries (simple Query and Execute messages)",
            m.queries.clone(),
        );
        registry.register(
            "transactions",
            "Transactions (server connection releases at idle)",
            m.transactions.clone(),
        );
        registry.register(
            "pool_timeouts",
            "Clients that gave up after pool_timeout",
            m.pool_timeouts.clone(),
        );
        registry.register(
            "errors",
            "Client sessions ended by an error, by kind",
            m.errors.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP /sql requests, by outcome",
            m.http_requests.clone(),
        );
        registry.register(
            "http_request_seconds",
            "HTTP /sql request latency, by outcome",
            m.http_request_seconds.clone(),
        );
        registry.register(
            "websocket_sessions",
            "WebSocket sessions open",
            m.websocket_sessions.clone(),
        );
        registry.register(
            "websocket_sessions_opened",
            "WebSocket sessions opened",
            m.websocket_sessions_total.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts an HTTP request and its latency.
    pub fn http_request(&self, outcome: &str, took: std::time::Duration) {
        let l = OutcomeLabels {
            outcome: outcome.to_string(),
        };
        self.http_requests.get_or_create(&l).inc();
        self.http_request_seconds
            .get_or_create(&l)
            .observe(took.as_secs_f64());
    }

    /// A WebSocket session starts.
    pub fn websocket_opened(&self) {
        self.websocket_sessions.inc();
        self.websocket_sessions_total.inc();
    }

    /// A WebSocket session ended.
    pub fn websocket_closed(&self) {
        self.websocket_sessions.dec();
    }

    /// Counts a session-ending error.
    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                kind: kind.to_string(),
            })
            .inc();
    }

    /// Prometheus text, with gauges refreshed from `snap`.
    pub fn encode(&self, snap: &Snapshot) -> String {
        self.connection_limit.set(snap.limit as i64);
        // Only pools that exist now have gauge series: a pool forgotten (for example
        // one a client asked for under a database name that does not exist) leaves none.
        for g in [
            &self.clients,
            &self.clients_waiting,
            &self.server_open,
            &self.server_in_use,
        ] {
            g.clear();
        }
        for (k, c) in &snap.pools {
            let l = PoolLabels::from(k);
            self.clients.get_or_create(&l).set(c.clients as i64);
            self.clients_waiting.get_or_create(&l).set(c.waiting as i64);
            self.server_open.get_or_create(&l).set(c.open as i64);
            self.server_in_use.get_or_create(&l).set(c.in_use as i64);
        }
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
