//! The real `@neondatabase/serverless` driver and Prisma Client (`@prisma/adapter-neon`)
//! against the pooler's HTTP/WebSocket front door and a real PostgreSQL, in transaction
//! mode as serverless clients use it: the Node tests of `compat/neon/` (see
//! [`sluice_testkit::neon`]).

mod common;

use anyhow::Result;
use common::*;
use sluice_testkit::{APP_DB, APP_USER};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neon_serverless_driver_and_prisma_through_the_front_door() -> Result<()> {
    let pg = postgres(30).await?;
    let p = start(
        &pg,
        "connection_limit = 5\npool_timeout = \"10s\"\n[http]\nlisten_addr = \"127.0.0.1:0\"\n",
    )
    .await?;
    p.connect()
        .await?
        .batch_execute(sluice_testkit::neon::PRISMA_TABLE)
        .await?;
    // The host is the client's: the pooler serves its own pools whatever it says.
    let url = format!(
        "postgresql://{}:{}@db.example.com:5432/{APP_DB}",
        APP_USER.0, APP_USER.1
    );
    let out = sluice_testkit::neon::run_all(&p.http.expect("http on").to_string(), &url).await?;
    println!("{out}");
    Ok(())
}
