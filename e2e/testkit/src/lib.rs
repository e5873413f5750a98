//! Test-only helpers shared by the pooler, operator and end-to-end tests: a
//! throwaway PostgreSQL ([`TempPostgres`]) and, in `cluster`, a real Kubernetes
//! control plane on loopback.

pub mod cluster;
pub mod http;
pub mod neon;
mod postgres;
pub mod tls;

pub use cluster::{ControlPlane, ControlPlaneOptions, client_from_kubeconfig, k8s_bin_dir};
pub use postgres::{
    APP_DB, APP_USER, PostgresBuilder, SUPERUSER, TempPostgres, connect, free_port, pg_bin_dir,
};
