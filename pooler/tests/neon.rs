//! The real `@neondatabase/serverless` driver and Prisma Client (`@prisma/adapter-neon`)
//! against the pooler's HTTP/WebSocket front door and a real PostgreSQL: the Node tests
//! in `compat/neon/` (installed from its lockfile by `compat/neon/setup.sh`, which
//! `make unit` runs first), in transaction mode as serverless clients use it.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::*;
use sluice_testkit::{APP_DB, APP_USER};

/// Where `compat/neon/setup.sh` installed the packages and copied the tests.
fn dir() -> PathBuf {
    let cache = std::env::var_os("SLUICE_CACHE").map_or_else(
        || PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/sluice"),
        PathBuf::from,
    );
    cache.join("compat/neon")
}

/// Runs `program args` in the package directory with the front door's address;
/// returns its output, failing when the tests failed.
async fn node(program: &str, args: &[&str], http: &str, url: &str) -> Result<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::process::Command::new(program)
            .args(args)
            .current_dir(dir())
            .env("SLUICE_HTTP", http)
            .env("DATABASE_URL", url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("node tests timed out")??;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "{program} {args:?} failed:\n{text}");
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neon_serverless_driver_and_prisma_through_the_front_door() -> Result<()> {
    ensure!(
        dir().join("node_modules").is_dir() && dir().join("generated").is_dir(),
        "the Node packages are missing: run `bash compat/neon/setup.sh` (make unit does)"
    );
    let pg = postgres(30).await?;
    let p = start(
        &pg,
        "connection_limit = 5\npool_timeout = \"10s\"\n[http]\nlisten_addr = \"127.0.0.1:0\"\n",
    )
    .await?;
    let c = p.connect().await?;
    c.batch_execute(r#"CREATE TABLE "Item" (id serial PRIMARY KEY, name text NOT NULL)"#)
        .await?;
    drop(c);
    let http = p.http.expect("http on").to_string();
    // The host is the client's: the pooler serves its own pools whatever it says.
    let url = format!(
        "postgresql://{}:{}@db.example.com:5432/{APP_DB}",
        APP_USER.0, APP_USER.1
    );
    let neon = node("node", &["--test", "neon.test.mjs"], &http, &url).await?;
    println!("{neon}");
    let prisma = node(
        "node",
        &["node_modules/.bin/tsx", "--test", "prisma.test.ts"],
        &http,
        &url,
    )
    .await?;
    println!("{prisma}");
    for out in [&neon, &prisma] {
        ensure!(out.contains("# fail 0"), "a test failed:\n{out}");
        ensure!(!out.contains("# pass 0"), "no test ran:\n{out}");
    }
    Ok(())
}
