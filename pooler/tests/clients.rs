//! Real clients through the pooler: tokio-postgres, psql and pgbench, in both modes.

mod common;

use anyhow::Result;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokio_postgres_transaction_mode_basics() -> Result<()> {
    let pg = postgres(50).await?;
    let mut p = start(&pg, "connection_limit = 2\npool_mode = \"transaction\"").await?;
    let c = p.connect().await?;
    let row = c.query_one("SELECT 1::int4 + $1::int4", &[&41i32]).await?;
    assert_eq!(row.get::<_, i32>(0), 42);
    let rows = c.simple_query("SELECT 'x'").await?;
    assert_eq!(rows.len(), 2);
    p.shutdown().await?;
    Ok(())
}
