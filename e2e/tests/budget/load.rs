//! Load and measurement for the budget tests: a steady stream of short
//! transactions through the pool's Service, and a sampler of the server
//! connections PostgreSQL sees from the pooler pods.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::task::JoinSet;

/// Counters of a [`Load`] run.
#[derive(Debug, Default)]
pub struct Counters {
    /// Transactions that committed.
    pub ok: AtomicU64,
    /// Transactions that failed after they started on an established connection.
    pub failed: AtomicU64,
    /// Connections (re)opened after the first: a drained or killed pooler closed ours.
    pub reconnects: AtomicU64,
    /// Connection attempts that failed (refused, or closed during startup).
    pub connect_errors: AtomicU64,
    /// Transactions whose connection closed under them without an error from
    /// the server (a SIGKILLed pod, or a drain racing the next query): retried.
    pub interrupted: AtomicU64,
    /// The pooler's own `53300` (no server connection within `pool_timeout`), at
    /// login (session mode) or in a transaction: expected at saturation.
    pub pool_timeouts: AtomicU64,
    /// PostgreSQL's own refusal (`53300 too many clients`, which the pooler reports as
    /// `08006`): the budget was exceeded at the database.
    pub refused_by_database: AtomicU64,
}

/// What a finished run counted.
#[derive(Debug, Clone, Copy)]
pub struct Totals {
    pub ok: u64,
    pub failed: u64,
    pub reconnects: u64,
    pub connect_errors: u64,
    pub interrupted: u64,
    pub pool_timeouts: u64,
    pub refused_by_database: u64,
}

/// What each client does.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Pause between transactions.
    pub think: Duration,
    /// Each transaction holds its server connection this long (`pg_sleep`), spread
    /// evenly over the range by client; zero: a short transaction.
    pub hold: (Duration, Duration),
    /// Transactions per connection before the client disconnects and reconnects
    /// (session-mode turnover); `None`: stay connected.
    pub per_connection: Option<u64>,
}

impl Shape {
    /// Every transaction holds its connection 100–500 ms, no pause: more clients
    /// than server connections keep every pod at its limit.
    pub fn saturating(per_connection: Option<u64>) -> Self {
        Self {
            think: Duration::ZERO,
            hold: (Duration::from_millis(100), Duration::from_millis(500)),
            per_connection,
        }
    }
}

/// Clients looping `BEGIN; SELECT ...; COMMIT` through the pooler.
///
/// A transaction counts as `failed` when the server answers it with an error
/// other than the pooler's orderly shutdown (SQLSTATE 57P01, which a draining
/// pod sends between transactions). A connection found closed before a
/// transaction is a reconnect; one that closes under a transaction with no error
/// is `interrupted`. Either way the client reconnects and goes on.
pub struct Load {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    tasks: JoinSet<()>,
}

impl Load {
    /// Starts `clients` clients against `conn_str`, each doing `shape`.
    pub fn start_shaped(conn_str: String, clients: usize, shape: Shape) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let mut tasks = JoinSet::new();
        for id in 0..clients {
            let (stop, counters, conn_str) = (stop.clone(), counters.clone(), conn_str.clone());
            let (lo, hi) = shape.hold;
            let hold = lo + (hi.saturating_sub(lo)).mul_f64(id as f64 / clients.max(1) as f64);
            let shape = Shape { hold: (hold, hold), ..shape };
            tasks.spawn(async move { client_loop(id, &conn_str, shape, &stop, &counters).await });
        }
        Self { stop, counters, tasks }
    }

    /// Counters so far.
    pub fn totals(&self) -> Totals {
        let c = &self.counters;
        Totals {
            ok: c.ok.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            reconnects: c.reconnects.load(Ordering::Relaxed),
            connect_errors: c.connect_errors.load(Ordering::Relaxed),
            interrupted: c.interrupted.load(Ordering::Relaxed),
            pool_timeouts: c.pool_timeouts.load(Ordering::Relaxed),
            refused_by_database: c.refused_by_database.load(Ordering::Relaxed),
        }
    }

    /// Stops every client after its current transaction and returns the totals.
    pub async fn stop(mut self) -> Totals {
        self.stop.store(true, Ordering::Relaxed);
        while self.tasks.join_next().await.is_some() {}
        self.totals()
    }
}

/// Counts an error as the pooler's pool timeout or the database's refusal; whether it
/// was one of them.
fn classify(e: &tokio_postgres::Error, c: &Counters) -> bool {
    let Some(db) = e.as_db_error() else { return false };
    match db.code().code() {
        "53300" if db.message().contains("pool_timeout") => {
            c.pool_timeouts.fetch_add(1, Ordering::Relaxed);
            true
        }
        "53300" | "08006" => {
            c.refused_by_database.fetch_add(1, Ordering::Relaxed);
            eprintln!("refused: {} {}", db.code().code(), db.message());
            true
        }
        _ => false,
    }
}

async fn client_loop(id: usize, conn_str: &str, shape: Shape, stop: &AtomicBool, c: &Counters) {
    let mut first = true;
    let sql = if shape.hold.0.is_zero() {
        format!("BEGIN; SELECT {id}, pg_backend_pid(); COMMIT")
    } else {
        format!("BEGIN; SELECT {id}, pg_sleep({}); COMMIT", shape.hold.0.as_secs_f64())
    };
    while !stop.load(Ordering::Relaxed) {
        let client = match tokio_postgres::connect(conn_str, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                client
            }
            Err(e) => {
                if !classify(&e, c) {
                    c.connect_errors.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !first {
            c.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        let mut done = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if client.is_closed() || shape.per_connection.is_some_and(|n| done >= n) {
                break;
            }
            done += 1;
            match client.batch_execute(&sql).await {
                Ok(()) => {
                    c.ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.code().map(|s| s.code()) == Some("57P01") => break,
                Err(e) if classify(&e, c) => {}
                Err(e) if e.as_db_error().is_none() => {
                    c.interrupted.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    c.failed.fetch_add(1, Ordering::Relaxed);
                    match e.as_db_error() {
                        Some(db) => eprintln!(
                            "client {id}: transaction failed: {} {}",
                            db.code().code(),
                            db.message()
                        ),
                        None => eprintln!("client {id}: transaction failed: {e}"),
                    }
                }
            }
            if !shape.think.is_zero() {
                tokio::time::sleep(shape.think).await;
            }
        }
    }
}

/// Samples, every `interval`, how many server connections PostgreSQL has from
/// the pooler pods (role `user`, client address not `exclude_addr`, which is
/// where the operator's own discovery connections come from).
pub struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<Samples>>,
}

/// What a [`Sampler`] saw: every sample with the time it was taken.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    pub timeline: Vec<(Instant, i64)>,
    pub errors: usize,
}

impl Samples {
    pub fn count(&self) -> usize {
        self.timeline.len()
    }

    /// Largest sample overall.
    pub fn max(&self) -> i64 {
        self.timeline.iter().map(|s| s.1).max().unwrap_or(0)
    }

    /// Largest sample taken at or after `from`.
    pub fn max_since(&self, from: Instant) -> i64 {
        self.timeline.iter().filter(|s| s.0 >= from).map(|s| s.1).max().unwrap_or(0)
    }

    /// Largest sample taken before `until`.
    pub fn max_before(&self, until: Instant) -> i64 {
        self.timeline.iter().filter(|s| s.0 < until).map(|s| s.1).max().unwrap_or(0)
    }
}

impl Sampler {
    /// Starts sampling through a superuser connection string.
    pub async fn start(
        superuser_conn_str: &str,
        user: &str,
        exclude_addr: &str,
        interval: Duration,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (conn_str, user, exclude) =
            (superuser_conn_str.to_string(), user.to_string(), exclude_addr.to_string());
        let stop2 = stop.clone();
        let task = tokio::spawn(async move {
            let mut samples = Samples::default();
            let mut client = sluice_testkit::connect(&conn_str).await?;
            let sql = "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 \
                       AND backend_type = 'client backend' \
                       AND (client_addr IS NULL OR host(client_addr) <> $2)";
            let mut next = Instant::now();
            while !stop2.load(Ordering::Relaxed) {
                match client.query_one(sql, &[&user, &exclude]).await {
                    Ok(row) => {
                        let n: i64 = row.get(0);
                        samples.timeline.push((Instant::now(), n));
                    }
                    Err(_) => {
                        // The database restarts in the budget-change test.
                        samples.errors += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        if let Ok(c) = sluice_testkit::connect(&conn_str).await {
                            client = c;
                        }
                    }
                }
                next += interval;
                tokio::time::sleep_until(next.max(Instant::now()).into()).await;
            }
            Ok(samples)
        });
        Ok(Self { stop, task })
    }

    /// Stops sampling and returns what was seen.
    pub async fn stop(self) -> Result<Samples> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?
    }
}
