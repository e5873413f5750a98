//! `make demo`: runs Sluice locally with real parts — a private PostgreSQL, the
//! real Kubernetes control plane, the process-backed node agent, the operator —
//! applies the sample ConnectionPool, prints what runs and a psql line that
//! works through the pooler, and stops everything on Ctrl-C.

use std::time::Duration;

use anyhow::Result;
use sluice_e2e::fixture::{CLIENT_PASSWORD, Fixture, Options};
use sluice_testkit::{APP_DB, APP_USER};

const MAX_CONNECTIONS: u32 = 60;

#[tokio::main]
async fn main() -> Result<()> {
    // kube's client logs each refused connection while the API server starts: not news here.
    let filter = std::env::var("RUST_LOG")
        .unwrap_or_else(|_| "warn,kube_client::client::builder=off".into());
    tracing_subscriber::fmt().with_env_filter(filter).init();
    step("starting PostgreSQL 15 (max_connections = 60)");
    step(
        "starting etcd, kube-apiserver, kube-controller-manager, the node agent and sluice-operator",
    );
    let mut fx = Fixture::start_with(Options {
        max_connections: MAX_CONNECTIONS,
        namespace: "sluice-demo".into(),
        ..Options::default()
    })
    .await?;
    step("applying config/samples/sluice_v1alpha1_connectionpool_minimal.yaml (2 replicas)");
    fx.apply_sample(2).await?;
    let c = fx.wait_converged(2, Duration::from_secs(180)).await?;
    step(&format!("pool Ready in {:.1}s", c.secs));

    println!();
    println!("$ kubectl get cpool,deploy,pods -n {}", fx.ns);
    println!("{}", fx.kubectl(&["get", "cpool,deploy,pods", "-o", "wide"])?);
    let pool = fx.pool_json().await?;
    let b = &pool["status"]["budget"];
    println!(
        "Budget: max_connections {} - superuser_reserved {} - reserved {} = {} available; \
         {} replicas (+1 for rollouts) x {} per replica = {} worst case",
        b["databaseMaxConnections"],
        b["superuserReserved"],
        b["reserved"],
        b["available"],
        pool["spec"]["replicas"],
        b["perReplicaLimit"],
        b["worstCaseTotal"]
    );
    let svc = fx.service_host().await?;
    println!();
    println!("Connect through the pooler (Service {}/{} at {svc}:6432):", fx.ns, fx.pool);
    println!(
        "  PGPASSWORD={CLIENT_PASSWORD} psql \"host={svc} port=6432 user={} dbname={APP_DB}\" -c 'select 1'",
        APP_USER.0
    );
    println!("Use the cluster:");
    println!("  kubectl --kubeconfig {} get cpool,pods -A", fx.cp.kubeconfig_path().display());
    println!(
        "  kubectl --kubeconfig {} -n {} scale cpool/{} --replicas=4",
        fx.cp.kubeconfig_path().display(),
        fx.ns,
        fx.pool
    );
    println!();
    println!("Running. Press Ctrl-C to stop everything.");
    tokio::signal::ctrl_c().await?;
    step("stopping the operator, pods, node agent, control plane and PostgreSQL");
    fx.shutdown().await?;
    step("stopped");
    Ok(())
}

fn step(msg: &str) {
    println!("==> {msg}");
}
