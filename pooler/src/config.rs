//! The config file ([`sluice_contract::PoolerConfig`], see `docs/interfaces.md`):
//! validation, resolution of the referenced credential files, and change detection for
//! live reload.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
pub use sluice_contract::{AuthMethod, PoolMode};
use sluice_contract::{PoolerConfig, config_hash};

use crate::auth::Secret;
use crate::error::{Error, Result};
use crate::tls::{ClientTlsConfig, ServerTlsConfig};

/// Where and as whom the pooler logs in to PostgreSQL.
#[derive(Clone)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    pub database: Option<String>,
    pub user: String,
    pub password: Option<String>,
    /// `sslmode` and what it verifies with.
    pub tls: ServerTlsConfig,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// A validated config with every referenced file read.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen_addr: String,
    pub admin_addr: String,
    pub pool_mode: PoolMode,
    pub connection_limit: usize,
    pub max_client_connections: usize,
    pub pool_timeout: Duration,
    pub idle_timeout: Duration,
    pub server_lifetime: Duration,
    pub server_check_delay: Duration,
    pub drain_timeout: Duration,
    pub max_prepared_statements: usize,
    /// See [`crate::memory`].
    pub max_client_memory: usize,
    /// No server connection until the operator admits the process (`POST /admit`).
    pub require_admission: bool,
    /// What `connection_limit` was computed from (see [`crate::pool::DatabaseSize`]).
    pub budget_basis: Option<sluice_contract::BudgetBasis>,
    /// Startup parameters dropped instead of refused.
    pub ignore_startup_parameters: Vec<String>,
    pub server: ServerConfig,
    pub auth_method: AuthMethod,
    pub users: HashMap<String, Secret>,
    /// TLS towards clients.
    pub client_tls: ClientTlsConfig,
    /// The HTTP and WebSocket front door, when on.
    pub http: Option<sluice_contract::HttpSection>,
    /// Lowercase hex SHA-256 of the config file bytes.
    pub hash: String,
}

fn read_trimmed(p: &Path, what: &str) -> Result<String> {
    let s = std::fs::read_to_string(p)
        .map_err(|e| Error::Config(format!("reading {what} {}: {e}", p.display())))?;
    Ok(s.trim_end_matches(['\n', '\r']).to_string())
}

/// Regular, non-hidden files of a mounted-Secret-style directory, sorted by name.
fn dir_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| Error::Config(format!("reading users_dir {}: {e}", dir.display())))?;
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with('.') {
            continue;
        }
        let p = e.path();
        if std::fs::metadata(&p).map(|m| m.is_file()).unwrap_or(false) {
            out.push((name, p));
        }
    }
    out.sort();
    Ok(out)
}

impl Config {
    /// Reads, parses and validates the config at `path`, with the files it references.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .map_err(|e| Error::Config(format!("reading {}: {e}", path.display())))?;
        Self::from_bytes(&bytes)
    }

    /// Parses and validates config file contents; referenced files are read from disk.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let text = std::str::from_utf8(bytes).map_err(|_| Error::Config("not UTF-8".into()))?;
        let raw = PoolerConfig::parse(text).map_err(|e| Error::Config(e.to_string()))?;
        if raw.connection_limit == 0 {
            return Err(Error::Config("connection_limit must be at least 1".into()));
        }
        if raw.max_client_connections() == 0 {
            return Err(Error::Config(
                "max_client_connections must be at least 1".into(),
            ));
        }
        if raw.max_prepared_statements() == 0 {
            return Err(Error::Config(
                "max_prepared_statements must be at least 1".into(),
            ));
        }
        let user = match (&raw.server.user, &raw.server.user_file) {
            (Some(u), None) => u.clone(),
            (None, Some(f)) => read_trimmed(Path::new(f), "server.user_file")?,
            _ => {
                return Err(Error::Config(
                    "set exactly one of server.user and server.user_file".into(),
                ));
            }
        };
        if user.is_empty() {
            return Err(Error::Config("server user is empty".into()));
        }
        let password = match (&raw.server.password, &raw.server.password_file) {
            (Some(p), None) => Some(p.clone()),
            (None, Some(f)) => Some(read_trimmed(Path::new(f), "server.password_file")?),
            (None, None) => None,
            _ => {
                return Err(Error::Config(
                    "set at most one of server.password and server.password_file".into(),
                ));
            }
        };
        let mut users = HashMap::new();
        match (&raw.auth.users_dir, &raw.auth.users) {
            (Some(dir), None) => {
                for (name, p) in dir_files(Path::new(dir))? {
                    users.insert(name, Secret::from_stored(&read_trimmed(&p, "user file")?));
                }
            }
            (None, Some(inline)) => {
                for (name, pw) in inline {
                    users.insert(name.clone(), Secret::from_stored(pw));
                }
            }
            (None, None) => {}
            (Some(_), Some(_)) => {
                return Err(Error::Config(
                    "set at most one of auth.users_dir and auth.users".into(),
                ));
            }
        }
        let http_addr = raw.http.as_ref().map(|h| h.listen_addr().to_string());
        for addr in [&raw.listen_addr, &raw.admin_addr]
            .into_iter()
            .chain(&http_addr)
        {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(Error::Config(format!(
                    "invalid address {addr:?} (want ip:port)"
                )));
            }
        }
        Ok(Config {
            pool_mode: raw.pool_mode,
            connection_limit: raw.connection_limit,
            max_client_connections: raw.max_client_connections(),
            pool_timeout: raw.pool_timeout(),
            idle_timeout: raw.idle_timeout(),
            server_lifetime: raw.server_lifetime(),
            server_check_delay: raw.server_check_delay(),
            drain_timeout: raw.drain_timeout(),
            max_prepared_statements: raw.max_prepared_statements(),
            max_client_memory: raw.max_client_memory(),
            require_admission: raw.require_admission.unwrap_or(false),
            budget_basis: raw.budget_basis,
            ignore_startup_parameters: raw.ignore_startup_parameters.clone().unwrap_or_default(),
            listen_addr: raw.listen_addr,
            admin_addr: raw.admin_addr,
            server: ServerConfig {
                tls: ServerTlsConfig::new(raw.server.tls.as_ref(), &raw.server.host)?,
                host: raw.server.host,
                port: raw.server.port,
                database: raw.server.database,
                user,
                password,
            },
            auth_method: raw.auth.method,
            users,
            client_tls: ClientTlsConfig::new(raw.client_tls.as_ref())?,
            http: raw.http,
            hash: config_hash(bytes),
        })
    }
}

/// A digest of the config file and every file it references, to detect changes by content.
///
/// Never fails: unreadable or unparsable inputs are folded into the digest as such,
/// so a broken file is reported once, when it changes.
pub fn fingerprint(path: &Path) -> [u8; 32] {
    let mut h = Sha256::new();
    let Ok(bytes) = std::fs::read(path) else {
        h.update(b"unreadable");
        return h.finalize().into();
    };
    h.update(&bytes);
    let raw = std::str::from_utf8(&bytes)
        .ok()
        .and_then(|t| PoolerConfig::parse(t).ok());
    let Some(raw) = raw else {
        return h.finalize().into();
    };
    // The server CA and client certificate are read once per config: a change reloads
    // it. The certificate served to clients reloads itself (see `tls.rs`).
    let tls = raw.server.tls.unwrap_or_default();
    let mut files: Vec<PathBuf> = [
        raw.server.user_file,
        raw.server.password_file,
        tls.ca_file,
        tls.cert_file,
        tls.key_file,
    ]
    .into_iter()
    .flatten()
    .map(PathBuf::from)
    .collect();
    if let Some(dir) = raw.auth.users_dir {
        match dir_files(Path::new(&dir)) {
            Ok(list) => files.extend(list.into_iter().map(|(_, p)| p)),
            Err(_) => h.update(b"users_dir unreadable"),
        }
    }
    for f in files {
        h.update(f.to_string_lossy().as_bytes());
        h.update([0]);
        match std::fs::read(&f) {
            Ok(b) => {
                h.update((b.len() as u64).to_be_bytes());
                h.update(&b);
            }
            Err(_) => h.update(b"missing"),
        }
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "connection_limit = 5\n[server]\nhost = \"127.0.0.1\"\nuser = \"app\"\npassword = \"pw\"\n[auth.users]\napp = \"secret\"\n";

    #[test]
    fn minimal_with_defaults_and_hash() {
        let c = Config::from_bytes(MIN.as_bytes()).unwrap();
        assert_eq!(c.connection_limit, 5);
        assert_eq!(c.pool_mode, PoolMode::Transaction);
        assert_eq!(c.pool_timeout, Duration::from_secs(30));
        assert_eq!(c.server.port, 5432);
        assert!(c.users.contains_key("app"));
        assert_eq!(c.hash, config_hash(MIN.as_bytes()));
        assert_eq!(c.hash.len(), 64);
    }

    #[test]
    fn the_documented_example_parses() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("username"), "app\n").unwrap();
        std::fs::write(dir.path().join("password"), "pw\n").unwrap();
        let users = dir.path().join("users");
        std::fs::create_dir(&users).unwrap();
        std::fs::write(users.join("app"), "secret").unwrap();
        std::fs::write(users.join(".hidden"), "x").unwrap();
        let text = format!(
            r#"
listen_addr = "0.0.0.0:6432"
admin_addr = "0.0.0.0:9930"
pool_mode = "session"
connection_limit = 18
max_client_connections = 10000
pool_timeout = "30s"
idle_timeout = "10m"
server_lifetime = "1h"
server_check_delay = "30s"
drain_timeout = "1m30s"
max_prepared_statements = 100
revision = "3f2a"
[server]
host = "db.example.svc"
port = 5432
user_file = "{d}/username"
password_file = "{d}/password"
[auth]
method = "md5"
users_dir = "{u}"
"#,
            d = dir.path().display(),
            u = users.display()
        );
        let c = Config::from_bytes(text.as_bytes()).unwrap();
        assert_eq!(c.pool_mode, PoolMode::Session);
        assert_eq!(c.drain_timeout, Duration::from_secs(90));
        assert_eq!(c.server.user, "app");
        assert_eq!(c.server.password.as_deref(), Some("pw"));
        assert_eq!(c.auth_method, AuthMethod::Md5);
        assert_eq!(c.users.len(), 1);
        let p = dir.path().join("pooler.toml");
        std::fs::write(&p, &text).unwrap();
        let f1 = fingerprint(&p);
        std::fs::write(users.join("app"), "changed").unwrap();
        assert_ne!(f1, fingerprint(&p), "a users file change is a change");
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        assert!(Config::from_bytes(format!("conection_limit = 3\n{MIN}").as_bytes()).is_err());
        assert!(Config::from_bytes(MIN.replace("= 5", "= 0").as_bytes()).is_err());
        assert!(Config::from_bytes(format!("pool_timeout = \"30\"\n{MIN}").as_bytes()).is_err());
        assert!(
            Config::from_bytes(format!("pool_mode = \"statement\"\n{MIN}").as_bytes()).is_err()
        );
        assert!(Config::from_bytes(MIN.replace("user = \"app\"\n", "").as_bytes()).is_err());
    }
}
