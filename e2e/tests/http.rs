//! End to end: the serverless front door through a pool's Service. A pool with
//! `http: {enabled: true}` and two replicas; the real `@neondatabase/serverless` driver
//! (HTTP and WebSocket) and Prisma Client with `@prisma/adapter-neon` reach it at the
//! Service's `http` port, as an edge function in the cluster's network would.

use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use sluice_e2e::fixture::{CLIENT_PASSWORD, Fixture};
use sluice_testkit::{APP_DB, APP_USER};

#[tokio::test]
async fn neon_driver_and_prisma_through_the_pool_service() -> Result<()> {
    let mut fx = Fixture::start(100).await?;
    fx.wait_crd_established().await?;
    fx.create_secrets().await?;
    fx.pool = "edge".into();
    fx.create_pool_with("edge", 2, json!({"http": {"enabled": true}})).await?;
    let c = fx.wait_converged(2, Duration::from_secs(120)).await?;
    println!("http pool converged: limit {} of budget {} in {:.1} s", c.limit, c.available, c.secs);
    let ip = fx.service_host().await?;
    let client = sluice_testkit::connect(&fx.service_conn_str().await?).await?;
    client.batch_execute(sluice_testkit::neon::PRISMA_TABLE).await?;
    drop(client);
    let url =
        format!("postgresql://{}:{CLIENT_PASSWORD}@edge.{}.svc:5432/{APP_DB}", APP_USER.0, fx.ns);
    let out = sluice_testkit::neon::run_all(&format!("{ip}:8080"), &url).await?;
    println!("{out}");
    fx.shutdown().await
}
