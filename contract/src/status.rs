//! The pooler's `/status` document (docs/interfaces.md §2): served by the pooler, read by
//! the operator to learn which config a pod applied and what it holds.

use serde::{Deserialize, Serialize};

use crate::config::PoolMode;

/// `GET /status`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// The pooler's version.
    pub version: String,
    /// [`crate::config_hash`] of the config file in force.
    pub config_hash: String,
    /// `connection_limit` of the config in force.
    pub connection_limit: usize,
    pub pool_mode: PoolMode,
    pub server_connections: ServerConnections,
    pub clients: Clients,
    /// SIGTERM arrived: the pod is draining.
    pub draining: bool,
    /// The process may open server connections: it was admitted, or needs no admission.
    #[serde(default = "yes")]
    pub admitted: bool,
    /// Random per process; the operator's admission token is made from it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub admission_nonce: String,
    /// Per (database, user) pool.
    pub pools: Vec<PoolStatus>,
}

/// Server connections of the whole process.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ServerConnections {
    /// Connections the server may have: open, opening and closing (a closing one
    /// counts until the server has closed its end).
    pub open: usize,
    pub in_use: usize,
    pub idle: usize,
    /// Of `open`, being closed.
    #[serde(default)]
    pub closing: usize,
}

/// Clients of the whole process.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Clients {
    pub active: usize,
    pub waiting: usize,
}

/// One (database, user) pool.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PoolStatus {
    pub database: String,
    pub user: String,
    pub server_open: usize,
    pub server_in_use: usize,
    pub clients: usize,
    pub waiting: usize,
}

fn yes() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_as_documented() {
        let doc = r#"{"version":"0.1.0","config_hash":"9f86","connection_limit":18,"pool_mode":"transaction","server_connections":{"open":4,"in_use":2,"idle":2,"closing":0},"clients":{"active":120,"waiting":0},"draining":false,"admitted":true,"pools":[{"database":"app","user":"app","server_open":4,"server_in_use":2,"clients":120,"waiting":0}]}"#;
        let s: Status = serde_json::from_str(doc).unwrap();
        assert_eq!(s.connection_limit, 18);
        assert_eq!(s.pool_mode, PoolMode::Transaction);
        assert_eq!(serde_json::to_string(&s).unwrap(), doc);
    }
}
