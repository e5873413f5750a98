//! Admin HTTP API (see `docs/interfaces.md`): `/healthz`, `/readyz`, `/status`, `/metrics`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use serde::Serialize;

use crate::state::Shared;

/// The `/status` document.
#[derive(Debug, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub config_hash: String,
    pub connection_limit: usize,
    pub pool_mode: &'static str,
    pub server_connections: ServerConnections,
    pub clients: Clients,
    pub draining: bool,
    pub pools: Vec<PoolStatus>,
}

#[derive(Debug, Serialize)]
pub struct ServerConnections {
    pub open: usize,
    pub in_use: usize,
    pub idle: usize,
}

#[derive(Debug, Serialize)]
pub struct Clients {
    pub active: usize,
    pub waiting: usize,
}

#[derive(Debug, Serialize)]
pub struct PoolStatus {
    pub database: String,
    pub user: String,
    pub server_open: usize,
    pub server_in_use: usize,
    pub clients: usize,
    pub waiting: usize,
}

/// Builds the status document.
pub fn status(shared: &Shared) -> Status {
    let cfg = shared.config();
    let snap = shared.pools.limiter().snapshot();
    Status {
        version: env!("CARGO_PKG_VERSION"),
        config_hash: cfg.hash.clone(),
        connection_limit: cfg.connection_limit,
        pool_mode: shared.mode.as_str(),
        server_connections: ServerConnections {
            open: snap.open,
            in_use: snap.in_use,
            idle: snap.idle,
        },
        clients: Clients {
            active: snap.pools.iter().map(|(_, c)| c.clients).sum(),
            waiting: snap.waiting,
        },
        draining: shared.is_draining(),
        pools: snap
            .pools
            .iter()
            .map(|(k, c)| PoolStatus {
                database: k.database.to_string(),
                user: k.user.to_string(),
                server_open: c.open,
                server_in_use: c.in_use,
                clients: c.clients,
                waiting: c.waiting,
            })
            .collect(),
    }
}

/// The admin router.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route(
            "/status",
            get(|State(s): State<Arc<Shared>>| async move { Json(status(&s)) }),
        )
        .route("/metrics", get(metrics))
        .with_state(shared)
}

async fn readyz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    if s.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else {
        (StatusCode::OK, "ready")
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let body = s.metrics.encode(&s.pools.limiter().snapshot());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}
