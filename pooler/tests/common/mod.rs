//! Shared helpers: a pooler running in-process on 127.0.0.1:0 in front of a TempPostgres.
#![allow(dead_code)]

pub mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use sluice_pooler::{Options, Shared};
use sluice_testkit::{APP_DB, APP_USER, TempPostgres};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running in-process pooler.
pub struct Pooler {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The HTTP front door, when the config has `[http]`.
    pub http: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    pub config_path: PathBuf,
    pub dir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<()>>,
}

/// Config text for `pg` with `top` (top-level keys) prepended.
pub fn config_text(pg: &TempPostgres, top: &str) -> String {
    format!(
        "listen_addr = \"127.0.0.1:0\"\nadmin_addr = \"127.0.0.1:0\"\n{top}\n\
         [server]\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"{u}\"\npassword = \"{p}\"\n\
         [auth.users]\n{u} = \"{p}\"\n",
        port = pg.port(),
        u = APP_USER.0,
        p = APP_USER.1,
    )
}

/// Starts a pooler with `top` keys (must include `connection_limit`).
pub async fn start(pg: &TempPostgres, top: &str) -> Result<Pooler> {
    start_with_text(&config_text(pg, top)).await
}

/// Logs to the test output when RUST_LOG is set.
pub fn init_logs() {
    if std::env::var("RUST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

pub async fn start_with_text(text: &str) -> Result<Pooler> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("pooler.toml");
    std::fs::write(&config_path, text)?;
    let bound = sluice_pooler::bind(Options::new(&config_path))
        .await
        .context("binding pooler")?;
    let (tx, rx) = oneshot::channel::<()>();
    let (addr, admin, shared) = (bound.addr(), bound.admin_addr(), bound.shared());
    let http = bound.http_addr();
    let task = tokio::spawn(bound.serve(async move {
        let _ = rx.await;
    }));
    Ok(Pooler {
        addr,
        admin,
        http,
        shared,
        config_path,
        dir,
        shutdown: Some(tx),
        task: Some(task),
    })
}

impl Pooler {
    pub fn conn_str(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname={db}",
            self.addr.port()
        )
    }

    pub fn app_conn_str(&self) -> String {
        self.conn_str(APP_USER.0, APP_USER.1, APP_DB)
    }

    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        sluice_testkit::connect(&self.app_conn_str()).await
    }

    /// Triggers the drain and waits for serve() to return.
    pub async fn shutdown(&mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), t).await??;
        }
        Ok(())
    }

    /// GET on the admin API; returns (status code, body).
    pub async fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        http_get(self.admin, path).await
    }

    pub async fn status(&self) -> Result<serde_json::Value> {
        let (_, body) = self.admin_get("/status").await?;
        Ok(serde_json::from_str(&body)?)
    }
}

/// `GET path`: status code and body (see [`sluice_testkit::http`]).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    sluice_testkit::http::get(&addr.to_string(), path).await
}

/// One request: status code and body.
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
    sluice_testkit::http::request(&addr.to_string(), method, path, body).await
}

/// Server connections the pooler holds (backends of the app user), as seen by PostgreSQL.
pub async fn backends(su: &tokio_postgres::Client) -> Result<i64> {
    let row = su
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend'",
            &[&APP_USER.0],
        )
        .await?;
    Ok(row.get(0))
}

/// Waits until `f` holds, up to `secs` seconds.
pub async fn eventually<F, Fut>(secs: u64, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A PostgreSQL for one test (blocking start, off the async threads).
pub async fn postgres(max_connections: u32) -> Result<TempPostgres> {
    tokio::task::spawn_blocking(move || {
        TempPostgres::builder()
            .max_connections(max_connections)
            .start()
    })
    .await?
}

/// Runs a client binary (psql, pgbench) with PGPASSWORD set; returns (success, stdout, stderr).
pub async fn run_tool(
    program: &str,
    args: &[String],
    password: &str,
) -> Result<(bool, String, String)> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .await?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    ))
}

/// `pgbench -i -s 1` on the app database (synchronous; wrap in `block_in_place`).
pub fn pgbench_init(pg: &TempPostgres) -> Result<()> {
    let out = std::process::Command::new("pgbench")
        .args([
            "-i",
            "-s",
            "1",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port().to_string(),
            "-U",
            APP_USER.0,
            APP_DB,
        ])
        .env("PGPASSWORD", APP_USER.1)
        .output()?;
    ensure!(
        out.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
