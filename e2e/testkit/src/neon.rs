//! Runs the `@neondatabase/serverless` and Prisma tests of `compat/neon/` (installed by
//! `compat/neon/setup.sh`, which `make node-deps` runs) against a pooler's HTTP front
//! door: in-process in the pooler's tests, through a pool's Service end to end.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

/// Where `compat/neon/setup.sh` installed the packages and copied the tests.
pub fn dir() -> PathBuf {
    let cache = std::env::var_os("SLUICE_CACHE").map_or_else(
        || PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/sluice"),
        PathBuf::from,
    );
    cache.join("compat/neon")
}

/// Runs `node args` in the package directory with `SLUICE_HTTP` and `DATABASE_URL`;
/// returns its output.
///
/// # Errors
/// When it fails, reports a failed test or runs none, or takes over 3 minutes.
async fn node(args: &[&str], http: &str, url: &str) -> Result<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::process::Command::new("node")
            .args(args)
            .current_dir(dir())
            .env("SLUICE_HTTP", http)
            .env("DATABASE_URL", url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("node tests timed out")??;
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "node {args:?} failed:\n{text}");
    ensure!(text.contains("# fail 0"), "a test failed:\n{text}");
    ensure!(!text.contains("# pass 0"), "no test ran:\n{text}");
    Ok(text)
}

/// The driver's tests (`neon.test.mjs`: `neon()` over HTTP, `Pool` and `Client` over
/// WebSocket), then Prisma's (`prisma.test.ts`, which needs the `"Item"` table), against
/// the front door at `http` (`host:port`) as `url` (`postgresql://user:password@…/db`).
///
/// # Errors
/// When the packages are not installed, or a test fails.
pub async fn run_all(http: &str, url: &str) -> Result<String> {
    ensure!(
        dir().join("node_modules").is_dir() && dir().join("generated").is_dir(),
        "the Node packages are missing: run `make node-deps`"
    );
    let neon = node(&["--test", "neon.test.mjs"], http, url).await?;
    let prisma = node(&["node_modules/.bin/tsx", "--test", "prisma.test.ts"], http, url).await?;
    Ok(format!("{neon}\n{prisma}"))
}

/// The table Prisma's test uses.
pub const PRISMA_TABLE: &str =
    r#"CREATE TABLE IF NOT EXISTS "Item" (id serial PRIMARY KEY, name text NOT NULL)"#;
