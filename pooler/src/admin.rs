//! Admin HTTP API (see `docs/interfaces.md`): `/healthz`, `/readyz`, `/status`, `/metrics`,
//! and `POST /admit` (the operator admits a process that requires it).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use sluice_contract::{Clients, PoolStatus, ServerConnections, Status};

use crate::state::Shared;

/// Builds the status document.
pub fn status(shared: &Shared) -> Status {
    let cfg = shared.config();
    let snap = shared.pools.limiter().snapshot();
    Status {
        version: env!("CARGO_PKG_VERSION").to_string(),
        config_hash: cfg.hash.clone(),
        connection_limit: cfg.connection_limit,
        pool_mode: shared.mode,
        server_connections: ServerConnections {
            open: snap.open,
            in_use: snap.in_use,
            idle: snap.idle,
            closing: snap.closing,
        },
        clients: Clients {
            active: snap.pools.iter().map(|(_, c)| c.clients).sum(),
            waiting: snap.waiting,
        },
        draining: shared.is_draining(),
        admitted: shared.is_admitted(),
        admission_nonce: shared.admission_nonce.clone(),
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
        .route(sluice_contract::ADMIT_PATH, axum::routing::post(admit))
        .with_state(shared)
}

async fn readyz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    if s.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if !s.is_admitted() {
        (StatusCode::SERVICE_UNAVAILABLE, "not admitted")
    } else {
        (StatusCode::OK, "ready")
    }
}

/// `POST /admit` with the admission token as the body.
async fn admit(State(s): State<Arc<Shared>>, body: String) -> impl IntoResponse {
    if s.admit(body.trim()) {
        (StatusCode::OK, "admitted")
    } else {
        (StatusCode::FORBIDDEN, "wrong admission token")
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    s.metrics.client_memory.set(s.memory.used() as i64);
    let body = s.metrics.encode(&s.pools.limiter().snapshot());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}
