//! `pooler.toml`: the file the operator renders into the pool's ConfigMap and the pooler
//! reads (docs/interfaces.md §1). Keys with a default are optional in the file: the
//! operator leaves out what it does not set, and the accessors give the effective value.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::ConfigDuration;
use crate::tls::{ClientTls, ServerTls};

/// How the pooler hands out server connections.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A server connection per transaction.
    #[default]
    Transaction,
    /// A server connection per client session.
    Session,
}

impl PoolMode {
    /// The value as the config file spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Transaction => "transaction",
            PoolMode::Session => "session",
        }
    }
}

/// Client authentication method.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AuthMethod {
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
}

/// Defaults of the optional keys, as the pooler applies them.
pub mod defaults {
    use std::time::Duration;

    pub const LISTEN_ADDR: &str = "0.0.0.0:6432";
    pub const ADMIN_ADDR: &str = "0.0.0.0:9930";
    pub const MAX_CLIENT_CONNECTIONS: usize = 10_000;
    pub const POOL_TIMEOUT: Duration = Duration::from_secs(30);
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
    pub const SERVER_LIFETIME: Duration = Duration::from_secs(3600);
    pub const SERVER_CHECK_DELAY: Duration = Duration::from_secs(30);
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
    pub const MAX_PREPARED_STATEMENTS: usize = 100;
    pub const MAX_CLIENT_MEMORY: usize = 128 * 1024 * 1024;
    pub const SERVER_PORT: u16 = 5432;
    pub const HTTP_LISTEN_ADDR: &str = "0.0.0.0:8080";
    pub const HTTP_MAX_REQUEST_BYTES: usize = 10 * 1024 * 1024;
    pub const HTTP_MAX_RESPONSE_BYTES: usize = 10 * 1024 * 1024;
}

/// The whole file. Unknown keys are an error: a typo must not silently change behaviour.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolerConfig {
    /// Where clients connect (`ip:port`).
    #[serde(default = "listen_addr")]
    pub listen_addr: String,
    /// Where the admin API listens (`ip:port`).
    #[serde(default = "admin_addr")]
    pub admin_addr: String,
    #[serde(default)]
    pub pool_mode: PoolMode,
    /// Hard cap on server connections, whole process.
    pub connection_limit: usize,
    /// Further clients are refused at startup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_client_connections: Option<usize>,
    /// How long a client waits for a server connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_timeout: Option<ConfigDuration>,
    /// Idle server connections are closed after this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<ConfigDuration>,
    /// Server connections are replaced after this age.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_lifetime: Option<ConfigDuration>,
    /// A connection idle for this long is checked before reuse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_check_delay: Option<ConfigDuration>,
    /// On SIGTERM, what still runs after this is cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout: Option<ConfigDuration>,
    /// Prepared statements per server connection (LRU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_prepared_statements: Option<usize>,
    /// Bytes all clients together may make the pooler hold beyond their fixed read
    /// buffers: messages longer than 64 KiB while they arrive, and transaction mode's
    /// prepared statements (each client's at most `--max-message-size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_client_memory: Option<usize>,
    /// The process opens no server connection (and `/readyz` fails) until the operator
    /// admits it (`POST /admit`, see [`crate::admission_token`]): a pod that appears
    /// outside the operator's ordering (deleted or evicted pods' replacements) waits
    /// until the pool's budget has room for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_admission: Option<bool>,
    /// Startup parameters clients may send that the pooler drops instead of refusing
    /// (as PgBouncer's `ignore_startup_parameters`), e.g. `["search_path"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_startup_parameters: Option<Vec<String>>,
    /// The database size `connection_limit` was computed for. A server found to allow
    /// fewer connections (restarted with a smaller `max_connections`) lowers the limit in
    /// proportion at once, before the operator has seen the change (see
    /// [`BudgetBasis::limit_for`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_basis: Option<BudgetBasis>,
    /// Opaque to the pooler; the operator changes it when a referenced Secret changes,
    /// so the file, and with it the hash, changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// TLS towards clients; absent: plaintext only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_tls: Option<ClientTls>,
    /// The HTTP and WebSocket front door (`@neondatabase/serverless`'s protocol); absent:
    /// off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSection>,
    pub server: ServerSection,
    #[serde(default)]
    pub auth: AuthSection,
}

/// `[server]`: where and as whom the pooler logs in to PostgreSQL.
#[derive(Serialize, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub host: String,
    #[serde(default = "server_port")]
    pub port: u16,
    /// When absent, the database each client asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// File with the user name (a mounted Secret key); or `user` inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// TLS towards PostgreSQL; absent: `sslmode = "prefer"`, as libpq.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTls>,
}

impl std::fmt::Debug for ServerSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSection")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("user_file", &self.user_file)
            .field("password_file", &self.password_file)
            .field("user", &self.user)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// `[budget_basis]`: what the operator computed `connection_limit` from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BudgetBasis {
    /// `max_connections` of the database (discovered, or given in the spec).
    pub max_connections: u32,
    /// Server connections every pooler pod of the database together may hold; the pods'
    /// limits add up to no more than this.
    pub budget: u32,
}

impl BudgetBasis {
    /// The limit to apply instead of `limit` when the server reports `observed`
    /// `max_connections`: unchanged unless the database shrank, else lowered in
    /// proportion to the budget left, `⌊limit × (budget − shrink) ÷ budget⌋`, and 0
    /// when nothing is left.
    ///
    /// # Guarantees
    /// When every pod of the database applies it with the same `observed`, their limits
    /// add up to no more than the budget minus the shrink: the connections kept free
    /// (reserved, superuser) stay free in number.
    pub fn limit_for(&self, limit: usize, observed: u32) -> usize {
        let shrink = self.max_connections.saturating_sub(observed);
        if shrink == 0 || self.budget == 0 {
            return limit;
        }
        let left = u64::from(self.budget.saturating_sub(shrink));
        let scaled = limit as u64 * left / u64::from(self.budget);
        usize::try_from(scaled).unwrap_or(usize::MAX).min(limit)
    }
}

/// `[http]`: PostgreSQL over HTTP (`POST /sql`) and WebSocket, served with the client TLS
/// certificate when `[client_tls]` has one.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// Where it listens (`ip:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_addr: Option<String>,
    /// Bound on one request body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_bytes: Option<usize>,
    /// Bound on one response's rows (the query fails with 54000 beyond it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_response_bytes: Option<usize>,
}

impl HttpSection {
    pub fn listen_addr(&self) -> &str {
        self.listen_addr
            .as_deref()
            .unwrap_or(defaults::HTTP_LISTEN_ADDR)
    }
    pub fn max_request_bytes(&self) -> usize {
        self.max_request_bytes
            .unwrap_or(defaults::HTTP_MAX_REQUEST_BYTES)
    }
    pub fn max_response_bytes(&self) -> usize {
        self.max_response_bytes
            .unwrap_or(defaults::HTTP_MAX_RESPONSE_BYTES)
    }
}

/// `[auth]`: client authentication.
#[derive(Serialize, Deserialize, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    #[serde(default)]
    pub method: AuthMethod,
    /// One file per user: name = user, content = password or SCRAM verifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users_dir: Option<String>,
    /// Inline users (tests, local runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<BTreeMap<String, String>>,
}

impl std::fmt::Debug for AuthSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSection")
            .field("method", &self.method)
            .field("users_dir", &self.users_dir)
            .field(
                "users",
                &self.users.as_ref().map(|u| u.keys().collect::<Vec<_>>()),
            )
            .finish()
    }
}

fn listen_addr() -> String {
    defaults::LISTEN_ADDR.into()
}
fn admin_addr() -> String {
    defaults::ADMIN_ADDR.into()
}
fn server_port() -> u16 {
    defaults::SERVER_PORT
}

fn or(d: &Option<ConfigDuration>, default: Duration) -> Duration {
    d.as_ref().map_or(default, ConfigDuration::get)
}

impl PoolerConfig {
    /// Parses the file's text.
    ///
    /// # Errors
    /// The TOML error (syntax, unknown key, bad duration), as the pooler logs it.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The file's text: `header` as a comment line, then the keys in a fixed order.
    pub fn render(&self, header: &str) -> String {
        let body = toml::to_string(self).expect("a PoolerConfig always serializes");
        format!("# {header}\n{body}")
    }

    pub fn max_client_connections(&self) -> usize {
        self.max_client_connections
            .unwrap_or(defaults::MAX_CLIENT_CONNECTIONS)
    }
    pub fn pool_timeout(&self) -> Duration {
        or(&self.pool_timeout, defaults::POOL_TIMEOUT)
    }
    pub fn idle_timeout(&self) -> Duration {
        or(&self.idle_timeout, defaults::IDLE_TIMEOUT)
    }
    pub fn server_lifetime(&self) -> Duration {
        or(&self.server_lifetime, defaults::SERVER_LIFETIME)
    }
    pub fn server_check_delay(&self) -> Duration {
        or(&self.server_check_delay, defaults::SERVER_CHECK_DELAY)
    }
    pub fn drain_timeout(&self) -> Duration {
        or(&self.drain_timeout, defaults::DRAIN_TIMEOUT)
    }
    pub fn max_prepared_statements(&self) -> usize {
        self.max_prepared_statements
            .unwrap_or(defaults::MAX_PREPARED_STATEMENTS)
    }
    pub fn max_client_memory(&self) -> usize {
        self.max_client_memory
            .unwrap_or(defaults::MAX_CLIENT_MEMORY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_smaller_database_lowers_the_limit_in_proportion() {
        let b = BudgetBasis {
            max_connections: 90,
            budget: 78,
        };
        assert_eq!(b.limit_for(26, 90), 26);
        assert_eq!(
            b.limit_for(26, 200),
            26,
            "a larger database changes nothing"
        );
        // 90 -> 60: 48 of 78 left; two pods at 26 (52) become two at 16 (32).
        assert_eq!(b.limit_for(26, 60), 16);
        assert_eq!(b.limit_for(26, 12), 0);
        assert_eq!(b.limit_for(26, 0), 0);
        for observed in 0..=100u32 {
            let left = 78u32.saturating_sub(90u32.saturating_sub(observed)) as usize;
            // Pods whose limits add up to the budget.
            let sum: usize = [26usize, 26, 13, 13]
                .iter()
                .map(|&l| b.limit_for(l, observed))
                .sum();
            assert!(sum <= left, "max_connections {observed}: {sum} > {left}");
        }
    }

    fn sample() -> PoolerConfig {
        PoolerConfig {
            listen_addr: listen_addr(),
            admin_addr: admin_addr(),
            pool_mode: PoolMode::Session,
            connection_limit: 17,
            max_client_connections: Some(500),
            pool_timeout: Some("1m30s".parse().unwrap()),
            idle_timeout: None,
            server_lifetime: None,
            server_check_delay: None,
            drain_timeout: Some("45s".parse().unwrap()),
            max_prepared_statements: None,
            max_client_memory: None,
            require_admission: None,
            budget_basis: Some(BudgetBasis {
                max_connections: 100,
                budget: 87,
            }),
            ignore_startup_parameters: Some(vec!["search_path".into()]),
            revision: Some("ab\"c\\d".into()),
            client_tls: Some(crate::ClientTls {
                mode: crate::ClientTlsMode::Require,
                cert_file: Some("/etc/sluice/tls/tls.crt".into()),
                key_file: Some("/etc/sluice/tls/tls.key".into()),
            }),
            http: Some(HttpSection {
                listen_addr: Some("0.0.0.0:8080".into()),
                max_response_bytes: Some(1 << 20),
                ..Default::default()
            }),
            server: ServerSection {
                host: "db.example.svc".into(),
                port: 5433,
                database: Some("app".into()),
                user_file: Some(crate::SERVER_USER_FILE.into()),
                password_file: Some(crate::SERVER_PASSWORD_FILE.into()),
                user: None,
                password: None,
                tls: Some(crate::ServerTls {
                    sslmode: crate::SslMode::VerifyFull,
                    ca_file: Some("/etc/sluice/server-ca/ca.crt".into()),
                    ..Default::default()
                }),
            },
            auth: AuthSection {
                method: AuthMethod::ScramSha256,
                users_dir: Some(crate::USERS_DIR.into()),
                users: None,
            },
        }
    }

    #[test]
    fn what_the_operator_renders_the_pooler_reads_back() {
        let c = sample();
        let text = c.render("rendered for a test");
        assert!(text.starts_with("# rendered for a test\n"), "{text}");
        assert_eq!(PoolerConfig::parse(&text).unwrap(), c);
        assert_eq!(
            PoolerConfig::parse(&text)
                .unwrap()
                .render("rendered for a test"),
            text
        );
    }

    #[test]
    fn optional_keys_take_their_defaults() {
        let c = PoolerConfig::parse("connection_limit = 3\n[server]\nhost = \"h\"\n").unwrap();
        assert_eq!(c.pool_mode, PoolMode::Transaction);
        assert_eq!(c.listen_addr, defaults::LISTEN_ADDR);
        assert_eq!(c.server.port, 5432);
        assert_eq!(c.pool_timeout(), defaults::POOL_TIMEOUT);
        assert_eq!(c.max_prepared_statements(), 100);
        assert_eq!(c.auth.method, AuthMethod::ScramSha256);
        let c = sample();
        assert_eq!(c.pool_timeout(), Duration::from_secs(90));
        assert_eq!(c.max_client_connections(), 500);
    }

    #[test]
    fn unknown_keys_and_bad_durations_are_errors() {
        let e = PoolerConfig::parse(
            "connection_limit = 3\nconection_limit = 4\n[server]\nhost = \"h\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e = PoolerConfig::parse(
            "connection_limit = 3\npool_timeout = \"soon\"\n[server]\nhost = \"h\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("not a duration"), "{e}");
    }

    #[test]
    fn debug_never_shows_passwords() {
        let mut c = sample();
        c.server.password = Some("hunter2".into());
        c.auth.users = Some([("app".to_string(), "s3cret".to_string())].into());
        let d = format!("{c:?}");
        assert!(!d.contains("hunter2") && !d.contains("s3cret"), "{d}");
    }
}
