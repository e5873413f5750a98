//! A throwaway PostgreSQL server for tests: private data directory, free port,
//! `scram-sha-256` password auth, a superuser and an application user.
//!
//! The server runs from the installed Debian binaries (`/usr/lib/postgresql/<v>/bin`,
//! or `$PG_BIN`). `initdb` refuses to run as root, so when the tests run as root the
//! server runs as the unprivileged `nobody` user, with the data directory chowned to it.
//!
//! # Guarantees
//! - Dropping a [`TempPostgres`] stops the server (fast shutdown, then SIGKILL) and
//!   deletes its data directory.
//! - Every role authenticates with a password over TCP (`scram-sha-256`); there is no
//!   `trust` entry in `pg_hba.conf`.

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Name and password of the superuser every [`TempPostgres`] creates.
pub const SUPERUSER: (&str, &str) = ("postgres", "postgres-secret");
/// Name and password of the ordinary login role every [`TempPostgres`] creates.
pub const APP_USER: (&str, &str) = ("app", "app-secret");
/// The database owned by [`APP_USER`].
pub const APP_DB: &str = "app";

/// Settings for a [`TempPostgres`]; build with [`TempPostgres::builder`].
#[derive(Debug, Clone)]
pub struct PostgresBuilder {
    max_connections: u32,
    superuser_reserved: u32,
    listen_addresses: String,
    extra: Vec<(String, String)>,
    /// PEM certificate and key: TLS on, and `pg_hba.conf` refuses plaintext.
    tls: Option<(String, String)>,
}

impl Default for PostgresBuilder {
    fn default() -> Self {
        Self {
            max_connections: 100,
            superuser_reserved: 3,
            listen_addresses: "127.0.0.1".into(),
            extra: Vec::new(),
            tls: None,
        }
    }
}

impl PostgresBuilder {
    /// `max_connections` of the server (default 100).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    /// `superuser_reserved_connections` (default 3, PostgreSQL's default).
    pub fn superuser_reserved(mut self, n: u32) -> Self {
        self.superuser_reserved = n;
        self
    }

    /// `listen_addresses`, comma separated (default `127.0.0.1`). Use `*` when pods
    /// in network namespaces must reach the server through a bridge address.
    pub fn listen_addresses(mut self, addrs: impl Into<String>) -> Self {
        self.listen_addresses = addrs.into();
        self
    }

    /// Serves TLS with this PEM certificate and key, and refuses every connection over
    /// TCP without it (`hostssl` entries only in `pg_hba.conf`, as Amazon RDS with
    /// `rds.force_ssl`).
    pub fn tls_only(mut self, cert_pem: impl Into<String>, key_pem: impl Into<String>) -> Self {
        self.tls = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Any other `postgresql.conf` setting, passed as `-c name=value`.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra.push((name.into(), value.into()));
        self
    }

    /// Creates the cluster, starts the server and waits until it accepts connections.
    ///
    /// # Errors
    /// When the PostgreSQL binaries are missing, `initdb` fails, or the server does not
    /// become ready within 30 s; the error carries the tail of the server log.
    pub fn start(self) -> Result<TempPostgres> {
        TempPostgres::start(self)
    }
}

/// A running private PostgreSQL; see the module docs.
#[derive(Debug)]
pub struct TempPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    settings: PostgresBuilder,
    run_as: Option<(u32, u32)>,
    child: Option<Child>,
}

impl TempPostgres {
    /// Starts building a server with default settings.
    pub fn builder() -> PostgresBuilder {
        PostgresBuilder::default()
    }

    /// Starts a server with default settings (`max_connections = 100`).
    ///
    /// # Errors
    /// See [`PostgresBuilder::start`].
    pub fn start_default() -> Result<Self> {
        Self::builder().start()
    }

    fn start(settings: PostgresBuilder) -> Result<Self> {
        let bin = pg_bin_dir()?;
        let dir = tempfile::Builder::new().prefix("sluice-pg-").tempdir()?;
        let run_as = unprivileged_ids()?;
        let mut pg = Self { dir, bin, port: free_port()?, settings, run_as, child: None };
        pg.initdb()?;
        pg.spawn()?;
        let (user, password) = APP_USER;
        pg.psql_super("postgres", &format!("CREATE ROLE {user} LOGIN PASSWORD '{password}'"))?;
        pg.psql_super("postgres", &format!("CREATE DATABASE {APP_DB} OWNER {user}"))?;
        Ok(pg)
    }

    /// TCP port on which the server listens.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Host address for clients on this machine (`127.0.0.1`).
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// The `max_connections` the server currently runs with.
    pub fn max_connections(&self) -> u32 {
        self.settings.max_connections
    }

    /// A libpq key/value connection string (usable by tokio-postgres and psql).
    pub fn conn_str(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "host={} port={} user={user} password={password} dbname={db}",
            self.host(),
            self.port
        )
    }

    /// Connection string of the superuser to the `postgres` database.
    pub fn superuser_conn_str(&self) -> String {
        self.conn_str(SUPERUSER.0, SUPERUSER.1, "postgres")
    }

    /// Connection string of [`APP_USER`] to [`APP_DB`].
    pub fn app_conn_str(&self) -> String {
        self.conn_str(APP_USER.0, APP_USER.1, APP_DB)
    }

    /// Connects as the superuser with tokio-postgres; the connection task is spawned.
    ///
    /// # Errors
    /// When the server refuses the connection.
    pub async fn connect_superuser(&self) -> Result<tokio_postgres::Client> {
        connect(&self.superuser_conn_str()).await
    }

    /// Directory holding the data directory and `server.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs SQL as the superuser through `psql` (synchronous; handy in setup code).
    ///
    /// # Errors
    /// When psql exits non-zero; the error carries its stderr.
    pub fn psql_super(&self, db: &str, sql: &str) -> Result<String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", self.host()])
            .args(["-p", &self.port.to_string(), "-U", SUPERUSER.0, "-d", db, "-c", sql])
            .env("PGPASSWORD", SUPERUSER.1)
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Stops the server and starts it again with a new `max_connections`, on the same
    /// port and data directory (what an operator does when it resizes a database).
    ///
    /// # Errors
    /// When the server does not come back.
    pub fn restart_with_max_connections(&mut self, max_connections: u32) -> Result<()> {
        self.stop();
        self.settings.max_connections = max_connections;
        self.spawn()
    }

    /// Starts a [`stop`](Self::stop)ped server again, same port and data directory.
    ///
    /// # Errors
    /// When the server does not come back.
    pub fn resume(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        self.spawn()
    }

    /// Fast shutdown: SIGINT, wait up to 10 s, then SIGKILL. Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let _ = Command::new("kill").arg("-INT").arg(child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd.env_remove("PGDATA").current_dir(self.dir.path());
        cmd
    }

    fn initdb(&self) -> Result<()> {
        let pwfile = self.dir.path().join("pwfile");
        fs::File::create(&pwfile)?.write_all(SUPERUSER.1.as_bytes())?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(self.dir.path(), Some(uid), Some(gid))?;
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid))?;
        }
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-U", SUPERUSER.0, "--auth=scram-sha-256", "--no-sync", "-E", "UTF8"])
            .arg("--locale=C")
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let host = match &self.settings.tls {
            None => "host",
            Some((cert, key)) => {
                for (name, pem) in [("server.crt", cert), ("server.key", key)] {
                    let path = self.data_dir().join(name);
                    fs::write(&path, pem)?;
                    fs::set_permissions(
                        &path,
                        std::os::unix::fs::PermissionsExt::from_mode(0o600),
                    )?;
                    if let Some((uid, gid)) = self.run_as {
                        std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
                    }
                }
                "hostssl"
            }
        };
        fs::write(
            self.data_dir().join("pg_hba.conf"),
            format!(
                "local all all scram-sha-256\n\
                 {host} all all 0.0.0.0/0 scram-sha-256\n\
                 {host} all all ::/0 scram-sha-256\n"
            ),
        )?;
        Ok(())
    }

    fn spawn(&mut self) -> Result<()> {
        let log_path = self.dir.path().join("server.log");
        let log = fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let s = &self.settings;
        let mut cmd = self.command("postgres");
        cmd.arg("-D").arg(self.data_dir()).args(["-p", &self.port.to_string()]);
        let mut settings = vec![
            ("listen_addresses".to_string(), s.listen_addresses.clone()),
            ("max_connections".into(), s.max_connections.to_string()),
            ("superuser_reserved_connections".into(), s.superuser_reserved.to_string()),
            ("unix_socket_directories".into(), self.dir.path().display().to_string()),
            ("shared_buffers".into(), "32MB".into()),
            ("fsync".into(), "off".into()),
            ("synchronous_commit".into(), "off".into()),
            ("full_page_writes".into(), "off".into()),
        ];
        if s.tls.is_some() {
            settings.push(("ssl".into(), "on".into()));
            settings.push(("ssl_cert_file".into(), "server.crt".into()));
            settings.push(("ssl_key_file".into(), "server.key".into()));
        }
        settings.extend(s.extra.iter().cloned());
        for (k, v) in settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning postgres")?;
        self.child = Some(child);
        self.wait_ready(&log_path)
    }

    fn wait_ready(&mut self, log_path: &Path) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", self.host(), "-p", &self.port.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let log = crate::cluster::tail(log_path, 20);
                bail!("postgres did not become ready ({exited:?}):\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Connects with tokio-postgres and spawns the connection driver.
///
/// # Errors
/// When the connection or authentication fails.
pub async fn connect(conn_str: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(conn_str, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {}", redact(conn_str)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn redact(conn_str: &str) -> String {
    conn_str
        .split_whitespace()
        .map(|kv| if kv.starts_with("password=") { "password=***" } else { kv })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The directory of the PostgreSQL server binaries: `$PG_BIN`, else the newest
/// `/usr/lib/postgresql/<version>/bin`.
///
/// # Errors
/// When no installation is found.
pub fn pg_bin_dir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL not found under /usr/lib/postgresql (set PG_BIN)")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p).context("no PostgreSQL server binaries found (set PG_BIN)")
}

/// A TCP port that was free on 127.0.0.1 a moment ago.
///
/// # Errors
/// When binding an ephemeral port fails.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `Some((uid, gid))` of `nobody` when running as root, since initdb refuses root.
fn unprivileged_ids() -> Result<Option<(u32, u32)>> {
    let uid = String::from_utf8(Command::new("id").arg("-u").output()?.stdout)?;
    if uid.trim() != "0" {
        return Ok(None);
    }
    let passwd = fs::read_to_string("/etc/passwd")?;
    let line = passwd
        .lines()
        .find(|l| l.starts_with("nobody:"))
        .context("running as root and no `nobody` user to run postgres as")?;
    let fields: Vec<&str> = line.split(':').collect();
    Ok(Some((fields[2].parse()?, fields[3].parse()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn starts_with_scram_and_chosen_max_connections() -> Result<()> {
        let pg = TempPostgres::builder().max_connections(37).start()?;
        let client = pg.connect_superuser().await?;
        let row = client.query_one("SHOW max_connections", &[]).await?;
        assert_eq!(row.get::<_, String>(0), "37");
        let row = client.query_one("SHOW password_encryption", &[]).await?;
        assert_eq!(row.get::<_, String>(0), "scram-sha-256");
        let app = connect(&pg.app_conn_str()).await?;
        let row = app.query_one("SELECT current_user, current_database()", &[]).await?;
        assert_eq!(row.get::<_, String>(0), APP_USER.0);
        assert_eq!(row.get::<_, String>(1), APP_DB);
        Ok(())
    }

    #[tokio::test]
    async fn rejects_wrong_password() -> Result<()> {
        let pg = TempPostgres::start_default()?;
        let err = connect(&pg.conn_str(APP_USER.0, "wrong", APP_DB)).await.unwrap_err();
        assert!(format!("{err:#}").contains("password authentication failed"), "{err:#}");
        Ok(())
    }

    #[tokio::test]
    async fn restart_changes_max_connections_and_drop_cleans_up() -> Result<()> {
        let mut pg = TempPostgres::builder().max_connections(20).start()?;
        pg.restart_with_max_connections(45)?;
        let client = pg.connect_superuser().await?;
        let row = client.query_one("SHOW max_connections", &[]).await?;
        assert_eq!(row.get::<_, String>(0), "45");
        drop(client);
        let dir = pg.dir().to_path_buf();
        let port = pg.port();
        drop(pg);
        assert!(!dir.exists(), "data directory removed on drop");
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "server stopped");
        Ok(())
    }
}
