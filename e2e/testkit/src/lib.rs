//! Test-only helpers shared by the pooler, operator and end-to-end tests: a
//! throwaway PostgreSQL ([`TempPostgres`]) and, in `cluster`, a real Kubernetes
//! control plane on loopback.

mod postgres;

pub use postgres::{
    APP_DB, APP_USER, PostgresBuilder, SUPERUSER, TempPostgres, connect, free_port, pg_bin_dir,
};
