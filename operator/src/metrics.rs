//! Prometheus metrics and the `/healthz`, `/readyz`, `/metrics` HTTP server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::error::Error;

type Labels = Vec<(String, String)>;

/// All metrics of the operator.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    errors: Family<Labels, Counter>,
    duration: Histogram,
    api_requests: Family<Labels, Counter>,
    budget: Family<Labels, Gauge>,
    limit: Family<Labels, Gauge>,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sluice_operator");
        let reconciles = Counter::default();
        let errors = Family::<Labels, Counter>::default();
        let duration = Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
        let api_requests = Family::<Labels, Counter>::default();
        let budget = Family::<Labels, Gauge>::default();
        let limit = Family::<Labels, Gauge>::default();
        registry.register("reconciles", "Reconciles started", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by error",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            duration.clone(),
        );
        registry.register(
            "api_requests",
            "Kubernetes API requests issued by the reconciler, by verb and resource",
            api_requests.clone(),
        );
        registry.register(
            "pool_budget_connections",
            "Server connections a pool may hold in total",
            budget.clone(),
        );
        registry.register(
            "pool_connection_limit",
            "connection_limit of each replica of a pool",
            limit.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            api_requests,
            budget,
            limit,
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// Counts a reconcile and returns a guard that records its duration when dropped.
    pub fn reconcile_started(&self) -> DurationGuard<'_> {
        self.reconciles.inc();
        DurationGuard {
            hist: &self.duration,
            start: std::time::Instant::now(),
        }
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, e: &Error) {
        self.errors
            .get_or_create(&vec![("error".into(), e.metric_label().into())])
            .inc();
    }

    /// Counts one Kubernetes API request.
    pub fn api_request(&self, verb: &str, resource: &str) {
        self.api_requests
            .get_or_create(&vec![
                ("verb".into(), verb.into()),
                ("resource".into(), resource.into()),
            ])
            .inc();
    }

    /// Total API requests with `verb` (for tests and benchmarks).
    pub fn api_requests_with_verb(&self, verb: &str) -> u64 {
        let mut total = 0;
        for res in [
            "configmaps",
            "deployments",
            "services",
            "poddisruptionbudgets",
            "serviceaccounts",
            "pods",
            "secrets",
            "connectionpools",
            "events",
        ] {
            let key = vec![
                ("verb".to_string(), verb.to_string()),
                ("resource".to_string(), res.to_string()),
            ];
            total += self.api_requests.get(&key).map_or(0, |c| c.get());
        }
        total
    }

    /// Sets the budget gauges of a pool.
    pub fn set_budget(&self, namespace: &str, name: &str, available: i64, limit: i64) {
        let l = vec![
            ("namespace".to_string(), namespace.to_string()),
            ("pool".to_string(), name.to_string()),
        ];
        self.budget.get_or_create(&l).set(available);
        self.limit.get_or_create(&l).set(limit);
    }

    /// Removes the gauges of a deleted pool.
    pub fn forget_pool(&self, namespace: &str, name: &str) {
        let l = vec![
            ("namespace".to_string(), namespace.to_string()),
            ("pool".to_string(), name.to_string()),
        ];
        self.budget.remove(&l);
        self.limit.remove(&l);
    }

    /// Marks the operator ready (`/readyz` answers 200).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Records a reconcile's duration when dropped.
#[derive(Debug)]
pub struct DurationGuard<'a> {
    hist: &'a Histogram,
    start: std::time::Instant,
}

impl Drop for DurationGuard<'_> {
    fn drop(&mut self) {
        self.hist.observe(self.start.elapsed().as_secs_f64());
    }
}

/// The HTTP routes: `/healthz`, `/readyz`, `/metrics`.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render))
        .with_state(metrics)
}

pub(crate) async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

pub(crate) async fn render(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
}

/// Serves [`router`] on `addr` until the process ends.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, router(metrics)).await
}

/// Requeue delay after an error: grows with consecutive failures, capped.
pub fn backoff(failures: u32) -> Duration {
    let secs = 2u64.saturating_pow(failures.min(8)).min(300);
    Duration::from_secs(secs.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_registered_metrics() {
        let m = Metrics::default();
        drop(m.reconcile_started());
        m.api_request("patch", "configmaps");
        m.set_budget("default", "app", 51, 17);
        let text = m.render();
        assert!(
            text.contains("sluice_operator_reconciles_total 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "sluice_operator_pool_connection_limit{namespace=\"default\",pool=\"app\"} 17"
            ),
            "{text}"
        );
        assert_eq!(m.api_requests_with_verb("patch"), 1);
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(30), Duration::from_secs(256));
    }
}
