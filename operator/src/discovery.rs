//! Reads the database's connection limits with `SHOW`, and probes pooler pods' `/status`.
//!
//! Both are behind small traits ([`Discover`], [`ProbePods`]) so the reconciler can be
//! tested without a database or pods.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::error::SqlState;

use crate::api::BudgetSource;
use crate::budget::DatabaseLimits;
use crate::desired::ADMIN_PORT;
use crate::error::{Error, Result};
use crate::resize::PodReport;

/// A boxed future, for object-safe async traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How to reach the database.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Database to connect to.
    pub database: String,
    /// Login role.
    pub user: String,
    /// Its password.
    pub password: String,
    /// TLS to it.
    pub tls: TargetTls,
}

/// TLS to the database, with the material read from the pool's Secrets.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TargetTls {
    /// libpq's `sslmode`.
    pub mode: sluice_contract::SslMode,
    /// PEM CA bundle; `None`: the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate and key.
    pub client_cert: Option<(Vec<u8>, Vec<u8>)>,
    /// The name verified instead of the host.
    pub server_name: Option<String>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}@{}:{}/{}",
            self.user, self.host, self.port, self.database
        )
    }
}

/// Reads `max_connections` and the reservations from a database.
pub trait Discover: Send + Sync {
    /// # Errors
    /// [`Error::Discovery`] when the server cannot be reached or queried.
    fn discover<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<DatabaseLimits>>;
}

/// [`Discover`] over tokio-postgres (no TLS).
#[derive(Clone, Debug)]
pub struct PostgresDiscovery {
    /// Connect and query timeout.
    pub timeout: Duration,
}

impl Default for PostgresDiscovery {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
        }
    }
}

impl Discover for PostgresDiscovery {
    fn discover<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<DatabaseLimits>> {
        Box::pin(discover(target, self.timeout))
    }
}

fn where_(t: &Target) -> String {
    format!("{}:{}/{}", t.host, t.port, t.database)
}

/// Connects to `target` and reads `max_connections`, `superuser_reserved_connections` and
/// `reserved_connections` (0 on servers before PostgreSQL 16, which do not know it).
///
/// # Errors
/// [`Error::Discovery`] when the server cannot be reached, refuses the login or a query
/// fails; [`Error::BadSetting`] when a value is not a number.
pub async fn discover(target: &Target, timeout: Duration) -> Result<DatabaseLimits> {
    let run = async {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&target.host)
            .port(target.port)
            .dbname(&target.database)
            .user(&target.user)
            .password(&target.password)
            .application_name("sluice-operator")
            .connect_timeout(timeout);
        let failed = |source| Error::Discovery {
            target: where_(target),
            source,
        };
        let (client, conn) = match tls_connector(&target.tls)? {
            None => {
                let (client, conn) = cfg
                    .ssl_mode(tokio_postgres::config::SslMode::Disable)
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(failed)?;
                (client, tokio::spawn(conn))
            }
            Some(tls) => {
                // Verification is the rustls config's; tokio-postgres only needs to
                // know whether plaintext is acceptable.
                let mode = if target.tls.mode.requires_tls() {
                    tokio_postgres::config::SslMode::Require
                } else {
                    tokio_postgres::config::SslMode::Prefer
                };
                let (client, conn) = cfg.ssl_mode(mode).connect(tls).await.map_err(failed)?;
                (client, tokio::spawn(conn))
            }
        };
        let max_connections = show(&client, target, "max_connections").await?.unwrap_or(0);
        let superuser_reserved = show(&client, target, "superuser_reserved_connections")
            .await?
            .unwrap_or(0);
        let reserved_connections = show(&client, target, "reserved_connections")
            .await?
            .unwrap_or(0);
        drop(client);
        conn.abort();
        Ok(DatabaseLimits {
            max_connections,
            superuser_reserved,
            reserved_connections,
            source: BudgetSource::Discovered,
        })
    };
    match tokio::time::timeout(timeout * 2, run).await {
        Ok(r) => r,
        Err(_) => Err(Error::DiscoveryTimeout {
            target: where_(target),
        }),
    }
}

/// The TLS connector for `tls`, as the pooler's (one rustls config per `sslmode`);
/// `None` with `disable`.
///
/// # Errors
/// [`Error::InvalidSpec`] when the CA or client certificate cannot be used.
fn tls_connector(tls: &TargetTls) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>> {
    use sluice_contract::rustls_config::{Material, client_config};
    if tls.mode == sluice_contract::SslMode::Disable {
        return Ok(None);
    }
    let verify_name = match &tls.server_name {
        Some(n) => Some(
            rustls::pki_types::ServerName::try_from(n.clone())
                .map_err(|_| Error::InvalidSpec(format!("database.tls.serverName {n:?}")))?,
        ),
        None => None,
    };
    let material = Material {
        ca_pem: tls.ca_pem.as_deref(),
        client_cert: tls
            .client_cert
            .as_ref()
            .map(|(c, k)| (c.as_slice(), k.as_slice())),
        verify_name,
    };
    let config = client_config(tls.mode, &material)
        .map_err(|e| Error::InvalidSpec(format!("database.tls: {e}")))?;
    Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(config)))
}

/// `SHOW name` as an integer; `None` when the server does not know the parameter.
async fn show(client: &tokio_postgres::Client, target: &Target, name: &str) -> Result<Option<i64>> {
    match client.query_one(&format!("SHOW {name}"), &[]).await {
        Ok(row) => {
            let value: String = row.get(0);
            value
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| Error::BadSetting {
                    name: name.into(),
                    value,
                })
        }
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => Ok(None),
        Err(source) => Err(Error::Discovery {
            target: where_(target),
            source,
        }),
    }
}

/// Asks pooler pods what config they run.
pub trait ProbePods: Send + Sync {
    /// `GET http://<ip>:9930/status`; `None` when the pod does not answer or the answer
    /// does not parse.
    fn status<'a>(&'a self, ip: &'a str) -> BoxFuture<'a, Option<PodReport>>;
    /// `POST http://<ip>:9930/admit` with `token`; whether the pod accepted it.
    fn admit<'a>(&'a self, ip: &'a str, token: &'a str) -> BoxFuture<'a, bool>;
}

/// [`ProbePods`] over plain HTTP/1.0 with a timeout and a bounded response.
#[derive(Clone, Debug)]
pub struct HttpProbe {
    /// Connect + read timeout.
    pub timeout: Duration,
    /// Port of the admin API.
    pub port: u16,
}

impl Default for HttpProbe {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
            port: ADMIN_PORT as u16,
        }
    }
}

/// Largest `/status` answer read.
const MAX_STATUS_BYTES: u64 = 256 * 1024;

impl ProbePods for HttpProbe {
    fn status<'a>(&'a self, ip: &'a str) -> BoxFuture<'a, Option<PodReport>> {
        Box::pin(async move {
            tokio::time::timeout(self.timeout, http_status(ip, self.port))
                .await
                .ok()
                .flatten()
        })
    }

    fn admit<'a>(&'a self, ip: &'a str, token: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            tokio::time::timeout(self.timeout, http_admit(ip, self.port, token))
                .await
                .unwrap_or(false)
        })
    }
}

fn host_of(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    }
}

async fn http_admit(ip: &str, port: u16, token: &str) -> bool {
    let host = host_of(ip);
    let Ok(mut stream) = tokio::net::TcpStream::connect(format!("{host}:{port}")).await else {
        return false;
    };
    let req = format!(
        "POST {} HTTP/1.0\r\nHost: {host}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{token}",
        sluice_contract::ADMIT_PATH,
        token.len()
    );
    if stream.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = stream.take(4096).read_to_end(&mut buf).await;
    buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200")
}

async fn http_status(ip: &str, port: u16) -> Option<PodReport> {
    let host = host_of(ip);
    let mut stream = tokio::net::TcpStream::connect(format!("{host}:{port}"))
        .await
        .ok()?;
    let req = format!("GET /status HTTP/1.0\r\nHost: {host}\r\nAccept: application/json\r\n\r\n");
    stream.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    stream
        .take(MAX_STATUS_BYTES)
        .read_to_end(&mut buf)
        .await
        .ok()?;
    parse_status_response(&buf)
}

/// Parses a raw HTTP response carrying the pooler's `/status` JSON.
pub fn parse_status_response(raw: &[u8]) -> Option<PodReport> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let status_line = head.lines().next()?;
    if status_line.split_whitespace().nth(1) != Some("200") {
        return None;
    }
    parse_status_json(&raw[split + 4..])
}

/// Parses the pooler's `/status` JSON body ([`sluice_contract::Status`]).
pub fn parse_status_json(body: &[u8]) -> Option<PodReport> {
    let s: sluice_contract::Status = serde_json::from_slice(body).ok()?;
    Some(PodReport {
        config_hash: s.config_hash,
        connection_limit: i64::try_from(s.connection_limit).ok()?,
        held: i64::try_from(s.server_connections.open).ok()?,
        admitted: s.admitted,
        nonce: s.admission_nonce,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_testkit::{SUPERUSER, TempPostgres};

    fn target(pg: &TempPostgres) -> Target {
        Target {
            host: pg.host().into(),
            port: pg.port(),
            database: "postgres".into(),
            user: SUPERUSER.0.into(),
            password: SUPERUSER.1.into(),
            tls: TargetTls::default(),
        }
    }

    /// Discovery speaks TLS as the pooler does: against a server that refuses
    /// plaintext, `verify-full` with the CA works, and a wrong name, an unknown CA or
    /// `disable` fail with an error naming the server and the reason.
    #[tokio::test]
    async fn discovery_uses_the_pools_tls_settings() {
        use sluice_contract::SslMode;
        use sluice_testkit::tls::TestCa;
        let ca = TestCa::new("db CA").unwrap();
        let leaf = ca.issue(&["db.internal", "127.0.0.1"]).unwrap();
        let pg = TempPostgres::builder()
            .max_connections(33)
            .tls_only(&leaf.cert_pem, &leaf.key_pem)
            .start()
            .unwrap();
        let with = |mode, ca_pem: &str, name: Option<&str>| Target {
            tls: TargetTls {
                mode,
                ca_pem: Some(ca_pem.as_bytes().to_vec()),
                client_cert: None,
                server_name: name.map(str::to_string),
            },
            ..target(&pg)
        };
        for t in [
            with(SslMode::VerifyFull, ca.pem(), None),
            with(SslMode::VerifyFull, ca.pem(), Some("db.internal")),
            with(SslMode::VerifyCa, ca.pem(), Some("elsewhere")),
            with(SslMode::Require, "", None),
            with(SslMode::Prefer, "", None),
        ] {
            let limits = discover(&t, Duration::from_secs(5)).await;
            assert_eq!(limits.unwrap().max_connections, 33);
        }
        let other = TestCa::new("other").unwrap();
        for (t, reason) in [
            (
                with(SslMode::VerifyFull, ca.pem(), Some("wrong.example")),
                "wrong.example",
            ),
            (
                with(SslMode::VerifyFull, other.pem(), None),
                "UnknownIssuer",
            ),
            (with(SslMode::Disable, "", None), "no encryption"),
        ] {
            let e = discover(&t, Duration::from_secs(5)).await.unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains(&format!("127.0.0.1:{}", pg.port())) && text.contains(reason),
                "{text}"
            );
            assert_eq!(e.degraded_reason(), Some("DatabaseUnreachable"));
        }
    }

    #[tokio::test]
    async fn discovers_limits_and_follows_a_restart() {
        let mut pg = TempPostgres::builder()
            .max_connections(37)
            .superuser_reserved(4)
            .start()
            .unwrap();
        let limits = discover(&target(&pg), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(limits.max_connections, 37);
        assert_eq!(limits.superuser_reserved, 4);
        // PostgreSQL 16+ reports its default of 0; older servers do not know the setting.
        assert_eq!(limits.reserved_connections, 0);
        pg.restart_with_max_connections(52).unwrap();
        let limits = discover(&target(&pg), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(limits.max_connections, 52);
    }

    #[tokio::test]
    async fn reserved_connections_is_read_when_known() {
        let pg = TempPostgres::builder().max_connections(40).start().unwrap();
        let client = pg.connect_superuser().await.unwrap();
        let version: i32 = client
            .query_one("SHOW server_version_num", &[])
            .await
            .unwrap()
            .get::<_, String>(0)
            .parse()
            .unwrap();
        if version < 160000 {
            // The server does not know the setting, and discovery counts it as 0.
            let e = client
                .query_one("SHOW reserved_connections", &[])
                .await
                .unwrap_err();
            assert_eq!(
                e.code(),
                Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT),
                "{e}"
            );
            let limits = discover(&target(&pg), Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(
                (limits.max_connections, limits.reserved_connections),
                (40, 0)
            );
            return;
        }
        drop(client);
        drop(pg);
        let pg = TempPostgres::builder()
            .max_connections(40)
            .setting("reserved_connections", "2")
            .start()
            .unwrap();
        let limits = discover(&target(&pg), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            (limits.max_connections, limits.reserved_connections),
            (40, 2)
        );
    }

    #[tokio::test]
    async fn wrong_password_and_unreachable_are_discovery_errors() {
        let pg = TempPostgres::start_default().unwrap();
        let mut t = target(&pg);
        t.password = "wrong".into();
        let err = discover(&t, Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(err.metric_label(), "discovery");
        let port = sluice_testkit::free_port().unwrap();
        let t = Target {
            port,
            ..target(&pg)
        };
        let err = discover(&t, Duration::from_secs(2)).await.unwrap_err();
        assert!(err.to_string().contains(&port.to_string()), "{err}");
        // The cause is part of the message (it ends up in the Degraded condition).
        assert!(err.to_string().to_lowercase().contains("refused"), "{err}");
    }

    /// A `/status` body as the pooler serializes it (the contract's own type).
    fn status_json(hash: &str, limit: usize) -> String {
        serde_json::to_string(&sluice_contract::Status {
            version: "0.1.0".into(),
            config_hash: hash.into(),
            connection_limit: limit,
            pool_mode: sluice_contract::PoolMode::Transaction,
            server_connections: sluice_contract::ServerConnections {
                open: 1,
                in_use: 0,
                idle: 1,
                closing: 0,
            },
            clients: sluice_contract::Clients {
                active: 2,
                waiting: 0,
            },
            draining: false,
            admitted: true,
            admission_nonce: String::new(),
            pools: vec![],
        })
        .unwrap()
    }

    #[test]
    fn parses_status_responses() {
        let mut raw = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n".to_vec();
        raw.extend_from_slice(status_json("abc", 18).as_bytes());
        assert_eq!(
            parse_status_response(&raw),
            Some(PodReport {
                config_hash: "abc".into(),
                connection_limit: 18,
                held: 1,
                admitted: true,
                nonce: String::new(),
            })
        );
        assert_eq!(parse_status_response(b"HTTP/1.1 503 x\r\n\r\n{}"), None);
        assert_eq!(parse_status_response(b"garbage"), None);
    }

    #[tokio::test]
    async fn http_probe_reads_a_real_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let body = status_json("h", 3);
            let resp = format!(
                "HTTP/1.0 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(resp.as_bytes()).await.unwrap();
        });
        let probe = HttpProbe {
            timeout: Duration::from_secs(2),
            port,
        };
        let r = probe.status("127.0.0.1").await.unwrap();
        assert_eq!(r.connection_limit, 3);
    }
}
