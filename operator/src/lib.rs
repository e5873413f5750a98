//! sluice-operator: runs `sluice-pooler` replicas whose server connections together stay
//! within a PostgreSQL database's connection budget.

mod api;
mod budget;
mod cache;
mod cli;
mod desired;
mod discovery;
mod error;
mod metrics;
mod reconcile;
mod resize;
pub mod secure_metrics;
mod status;

pub use api::{
    BudgetSource, BudgetStatus, CRD_PATHS, ClientAuthSpec, ConnectionPool, ConnectionPoolSpec,
    ConnectionPoolStatus, DatabaseSpec, HttpSpec, PodTemplateOverrides, PoolMode, ResizeStatus,
    ServiceOverrides, crd_yaml,
};
pub use budget::{Budget, DatabaseLimits, Infeasible, ROLLOUT_EXTRA_PODS};
pub use cache::{CacheWriters, Caches, caches};
pub use cli::main;
pub use discovery::{Discover, HttpProbe, PostgresDiscovery, ProbePods, Target};
pub use error::{Error, Result};
pub use metrics::Metrics;
pub use reconcile::{Context, Settings, error_policy, reconcile, run_controller};
pub use resize::{Phase, Plan, PodReport};
