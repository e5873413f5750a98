//! `sluice-contract`: everything `sluice-operator` and `sluice-pooler` exchange, defined
//! once and used by both: the pooler's config file ([`PoolerConfig`], rendered by the
//! operator into a ConfigMap and read by the pooler), the `/status` document ([`Status`],
//! served by the pooler and read by the operator during a resize), the duration syntax
//! both accept ([`ConfigDuration`]), the config hash, and the ports and paths of a pooler
//! pod. `docs/interfaces.md` describes the same in prose.

mod config;
mod duration;
#[cfg(feature = "rustls")]
pub mod rustls_config;
mod status;
mod tls;

pub use config::{
    AuthMethod, AuthSection, BudgetBasis, HttpSection, PoolMode, PoolerConfig, ServerSection,
    defaults,
};
pub use duration::{ConfigDuration, DurationError, MAX_DURATION};
pub use status::{Clients, PoolStatus, ServerConnections, Status};
pub use tls::{ClientTls, ClientTlsMode, ServerTls, SslMode};

use sha2::{Digest, Sha256};

/// Port clients connect to (named `postgres` in the pod and the Service).
pub const POSTGRES_PORT: u16 = 6432;
/// Port of the admin API: `/healthz`, `/readyz`, `/status`, `/metrics` (named `admin`).
pub const ADMIN_PORT: u16 = 9930;
/// The pooler's HTTP and WebSocket port (container port and Service port `http`).
pub const HTTP_PORT: u16 = 8080;
/// ConfigMap key holding `pooler.toml`.
pub const CONFIG_KEY: &str = "pooler.toml";
/// Mount point of the pod's config volume: [`CONFIG_KEY`] and the server credentials.
pub const CONFIG_DIR: &str = "/etc/sluice";
/// Where `pooler.toml` is mounted in a pooler pod.
pub const CONFIG_PATH: &str = "/etc/sluice/pooler.toml";
/// [`SERVER_USER_FILE`] relative to [`CONFIG_DIR`] (from the Secret's key `username`).
pub const SERVER_USER_ITEM: &str = "server/username";
/// [`SERVER_PASSWORD_FILE`] relative to [`CONFIG_DIR`] (from the Secret's key `password`).
pub const SERVER_PASSWORD_ITEM: &str = "server/password";
/// File with the user the pooler logs in to PostgreSQL as.
pub const SERVER_USER_FILE: &str = "/etc/sluice/server/username";
/// File with that user's password.
pub const SERVER_PASSWORD_FILE: &str = "/etc/sluice/server/password";
/// Directory of the client users Secret: one file per user.
pub const USERS_DIR: &str = "/etc/sluice/users";
/// Directory of what the pooler verifies PostgreSQL with, and its client certificate.
pub const SERVER_TLS_DIR: &str = "/etc/sluice/server-tls";
/// The CA bundle PostgreSQL's certificate is verified with.
pub const SERVER_CA_FILE: &str = "/etc/sluice/server-tls/ca.crt";
/// The pooler's client certificate towards PostgreSQL, and its key.
pub const SERVER_CERT_FILE: &str = "/etc/sluice/server-tls/tls.crt";
/// See [`SERVER_CERT_FILE`].
pub const SERVER_KEY_FILE: &str = "/etc/sluice/server-tls/tls.key";
/// Directory of the certificate served to clients (a `kubernetes.io/tls` Secret).
pub const CLIENT_TLS_DIR: &str = "/etc/sluice/tls";
/// The certificate served to clients, and its key.
pub const CLIENT_CERT_FILE: &str = "/etc/sluice/tls/tls.crt";
/// See [`CLIENT_CERT_FILE`].
pub const CLIENT_KEY_FILE: &str = "/etc/sluice/tls/tls.key";

/// The hash the pooler reports in `/status` for the config file bytes it applied, and
/// the operator computes over what it writes: lowercase hex SHA-256 of the exact bytes.
pub fn config_hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The token that admits one pooler process (see `require_admission` in
/// [`PoolerConfig`]): lowercase hex HMAC-SHA-256, keyed with the server password both
/// sides read from the credentials Secret, of `sluice-admit:` and the process's
/// `admission_nonce` (random per process, on `/status`), so a token seen once admits
/// nothing else.
pub fn admission_token(server_password: &str, nonce: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<Sha256>::new_from_slice(server_password.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(b"sluice-admit:");
    mac.update(nonce.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Admin path where the operator admits a pooler process (`POST`, body: the token).
pub const ADMIT_PATH: &str = "/admit";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_agree() {
        assert_eq!(format!("{CONFIG_DIR}/{CONFIG_KEY}"), CONFIG_PATH);
        assert_eq!(format!("{CONFIG_DIR}/{SERVER_USER_ITEM}"), SERVER_USER_FILE);
        assert_eq!(
            format!("{CONFIG_DIR}/{SERVER_PASSWORD_ITEM}"),
            SERVER_PASSWORD_FILE
        );
        assert!(USERS_DIR.starts_with(CONFIG_DIR));
    }

    #[test]
    fn config_hash_is_sha256_hex() {
        assert_eq!(
            config_hash(b"test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }

    #[test]
    fn admission_tokens_depend_on_the_password_and_the_nonce() {
        let t = admission_token("pw", "n1");
        assert_eq!(t.len(), 64);
        assert_eq!(t, admission_token("pw", "n1"));
        assert_ne!(t, admission_token("pw", "n2"));
        assert_ne!(t, admission_token("other", "n1"));
    }
}
