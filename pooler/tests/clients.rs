//! Real clients through the pooler: tokio-postgres, psql and pgbench, in both modes.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::*;
use futures::{SinkExt, TryStreamExt};
use sluice_testkit::{APP_DB, APP_USER};

const TX: &str = "connection_limit = 2\npool_mode = \"transaction\"";
const SESSION: &str = "connection_limit = 3\npool_mode = \"session\"";

fn rows(msgs: &[tokio_postgres::SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect()
}

/// Queries, named statements reused across transactions and server connections,
/// errors mid-transaction, COPY in and out.
async fn exercise_tokio_postgres(p: &Pooler, table: &str) -> Result<()> {
    let a = p.connect().await?;
    let b = p.connect().await?;
    a.batch_execute(&format!(
        "CREATE TABLE {table} (id int primary key, v text)"
    ))
    .await?;
    // Statement prepared once, executed in many transactions while other clients
    // take turns on the server connections.
    let ins = a
        .prepare(&format!("INSERT INTO {table} VALUES ($1, $2)"))
        .await?;
    let sel = b
        .prepare(&format!("SELECT v FROM {table} WHERE id = $1"))
        .await?;
    for i in 0..20i32 {
        a.execute(&ins, &[&i, &format!("v{i}")]).await?;
        let r = b.query_one(&sel, &[&i]).await?;
        assert_eq!(r.get::<_, String>(0), format!("v{i}"));
    }
    // The same text prepared by another client maps to the same server statement.
    let ins_b = b
        .prepare(&format!("INSERT INTO {table} VALUES ($1, $2)"))
        .await?;
    b.execute(&ins_b, &[&100i32, &"b"]).await?;
    // Error mid-transaction: the transaction fails, is rolled back, the client goes on.
    let mut a = a;
    {
        let tx = a.transaction().await?;
        tx.execute(&ins, &[&200i32, &"in-tx"]).await?;
        let err = tx
            .execute(&ins, &[&200i32, &"dup"])
            .await
            .expect_err("duplicate key");
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
        );
        let again = tx
            .query_one("SELECT 1", &[])
            .await
            .expect_err("aborted transaction");
        assert_eq!(
            again.code(),
            Some(&tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION)
        );
        tx.rollback().await?;
    }
    let n: i64 = a
        .query_one(&format!("SELECT count(*) FROM {table} WHERE id = 200"), &[])
        .await?
        .get(0);
    assert_eq!(n, 0, "failed transaction rolled back");
    // A committed transaction.
    {
        let tx = a.transaction().await?;
        tx.execute(&ins, &[&300i32, &"committed"]).await?;
        tx.commit().await?;
    }
    // COPY in.
    let sink = a
        .copy_in(&format!("COPY {table} (id, v) FROM STDIN"))
        .await?;
    let mut sink = Box::pin(sink);
    let mut data = String::new();
    for i in 1000..1500 {
        data.push_str(&format!("{i}\tcopied{i}\n"));
    }
    sink.send(bytes::Bytes::from(data)).await?;
    let copied = sink.as_mut().finish().await?;
    assert_eq!(copied, 500);
    // COPY in with bad data fails cleanly and the client goes on.
    let bad = a
        .copy_in(&format!("COPY {table} (id, v) FROM STDIN"))
        .await?;
    let mut bad = Box::pin(bad);
    let sent = bad
        .send(bytes::Bytes::from_static(b"not-an-int\tx\n"))
        .await;
    let finished = match sent {
        Ok(()) => bad.as_mut().finish().await.map(|_| ()),
        Err(e) => Err(e),
    };
    let e = finished.expect_err("bad COPY data is an error");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_TEXT_REPRESENTATION)
    );
    let one: i32 = a.query_one("SELECT 1::int4", &[]).await?.get(0);
    assert_eq!(one, 1);
    // COPY out.
    let stream = a
        .copy_out(&format!(
            "COPY (SELECT id FROM {table} WHERE id >= 1000 ORDER BY id) TO STDOUT"
        ))
        .await?;
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await?;
    let text: String = chunks
        .iter()
        .map(|c| String::from_utf8_lossy(c).to_string())
        .collect();
    assert_eq!(text.lines().count(), 500);
    assert_eq!(text.lines().next(), Some("1000"));
    let total: i64 = b
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await?
        .get(0);
    assert_eq!(total, 20 + 1 + 1 + 500);
    // Messages far longer than the client's idle read buffer, in both protocols, then
    // short ones again (the buffer grows for the first and shrinks back between).
    let long = "x".repeat(300_000);
    let r = b.query_one("SELECT length($1::text)", &[&long]).await?;
    assert_eq!(r.get::<_, i32>(0), 300_000);
    let m = b
        .simple_query(&format!("SELECT length('{}')", &long[..200_000]))
        .await?;
    assert_eq!(rows(&m), vec![vec![Some("200000".to_string())]]);
    let r = b.query_one(&sel, &[&2i32]).await?;
    assert_eq!(r.get::<_, String>(0), "v2");
    // Simple-query protocol with several statements.
    let m = a.simple_query("SELECT 1; SELECT 'two'").await?;
    assert_eq!(
        rows(&m),
        vec![vec![Some("1".to_string())], vec![Some("two".to_string())]]
    );
    // DEALLOCATE from the client, then the statement name is gone but others still work.
    a.batch_execute("DEALLOCATE ALL").await?;
    let r = b.query_one(&sel, &[&1i32]).await?;
    assert_eq!(r.get::<_, String>(0), "v1");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokio_postgres_transaction_mode() -> Result<()> {
    let pg = postgres(50).await?;
    let mut p = start(&pg, TX).await?;
    exercise_tokio_postgres(&p, "t_tx").await?;
    // Many clients with few server connections: statements re-prepared on demand.
    let mut tasks = Vec::new();
    for c in 0..10 {
        let cs = p.app_conn_str();
        tasks.push(tokio::spawn(async move {
            let client = sluice_testkit::connect(&cs).await?;
            let st = client.prepare("SELECT $1::int4 * 2").await?;
            for i in 0..30i32 {
                let v: i32 = client.query_one(&st, &[&(i + c)]).await?.get(0);
                ensure!(v == (i + c) * 2, "wrong answer");
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let st = p.status().await?;
    assert!(st["server_connections"]["open"].as_u64().unwrap() <= 2);
    p.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokio_postgres_session_mode() -> Result<()> {
    let pg = postgres(50).await?;
    let mut p = start(&pg, SESSION).await?;
    exercise_tokio_postgres(&p, "t_session").await?;
    // Session state lives for the session...
    let a = p.connect().await?;
    a.batch_execute("SET application_name = 'leaky'; CREATE TEMP TABLE tmp (x int)")
        .await?;
    let m = a.simple_query("SHOW application_name").await?;
    assert_eq!(rows(&m)[0][0].as_deref(), Some("leaky"));
    drop(a);
    // ...and is discarded before the next client gets the connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        let c = p.connect().await?;
        let m = c.simple_query("SHOW application_name").await?;
        assert_ne!(rows(&m)[0][0].as_deref(), Some("leaky"));
        let m = c
            .simple_query(
                "SELECT count(*) FROM pg_class WHERE relname = 'tmp' AND relpersistence = 't'",
            )
            .await?;
        assert_eq!(rows(&m)[0][0].as_deref(), Some("0"));
    }
    p.shutdown().await?;
    Ok(())
}

async fn killed_mid_transaction(mode: &str) -> Result<()> {
    let pg = postgres(50).await?;
    let mut p = start(
        &pg,
        &format!("connection_limit = 1\npool_mode = \"{mode}\""),
    )
    .await?;
    let setup = p.connect().await?;
    setup.batch_execute("CREATE TABLE k (x int)").await?;
    drop(setup);
    // 1: a client disappears while idle in a transaction.
    let a = p.connect().await?;
    a.batch_execute("BEGIN; INSERT INTO k VALUES (1); SET LOCAL work_mem = '1234kB'")
        .await?;
    drop(a);
    // 2: psql killed while a statement of its transaction runs.
    let mut child = tokio::process::Command::new("psql")
        .args([
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            &p.addr.port().to_string(),
            "-U",
            APP_USER.0,
            "-d",
            APP_DB,
        ])
        .args([
            "-c",
            "BEGIN; INSERT INTO k VALUES (2); SELECT pg_sleep(30);",
        ])
        .env("PGPASSWORD", APP_USER.1)
        .kill_on_drop(true)
        .spawn()?;
    let su = pg.connect_superuser().await?;
    let running = eventually(10, || async {
        su.query_one("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' AND pid <> pg_backend_pid()", &[])
            .await
            .map(|r| r.get::<_, i64>(0) == 1)
            .unwrap_or(false)
    })
    .await;
    assert!(running, "psql's statement started");
    child.kill().await?;
    // The next client (on the only server connection) sees nothing left over.
    let c = p.connect().await?;
    let m = c.simple_query("SELECT count(*), txid_current_if_assigned() IS NULL, current_setting('work_mem') FROM k").await?;
    let r = &rows(&m)[0];
    assert_eq!(r[0].as_deref(), Some("0"), "both transactions rolled back");
    assert_eq!(
        r[1].as_deref(),
        Some("t"),
        "not inside a leftover transaction"
    );
    assert_ne!(r[2].as_deref(), Some("1234kB"));
    let gone = eventually(10, || async {
        su.query_one("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' AND state = 'active' AND pid <> pg_backend_pid()", &[])
            .await
            .map(|r| r.get::<_, i64>(0) == 0)
            .unwrap_or(false)
    })
    .await;
    assert!(gone, "the killed client's statement was cancelled");
    p.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_killed_mid_transaction_transaction_mode() -> Result<()> {
    killed_mid_transaction("transaction").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_killed_mid_transaction_session_mode() -> Result<()> {
    killed_mid_transaction("session").await
}

async fn psql(p: &Pooler, sql: &str) -> Result<(bool, String, String)> {
    let args: Vec<String> = [
        "-X",
        "-q",
        "-At",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        "127.0.0.1",
        "-p",
        &p.addr.port().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(
        ["-U", APP_USER.0, "-d", APP_DB, "-c", sql]
            .iter()
            .map(|s| s.to_string()),
    )
    .collect();
    run_tool("psql", &args, APP_USER.1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn psql_both_modes() -> Result<()> {
    let pg = postgres(50).await?;
    for (i, mode) in [TX, SESSION].into_iter().enumerate() {
        let mut p = start(&pg, mode).await?;
        let t = format!("ps{i}");
        let (ok, out, err) = psql(&p, &format!("CREATE TABLE {t} (x int); INSERT INTO {t} SELECT generate_series(1,10); SELECT sum(x) FROM {t}")).await?;
        assert!(ok, "psql failed: {err}");
        assert_eq!(out.trim(), "55");
        let (ok, out, _) = psql(
            &p,
            &format!("\\copy (SELECT x FROM {t} ORDER BY x) TO STDOUT"),
        )
        .await?;
        assert!(ok);
        assert_eq!(out.lines().count(), 10);
        let (ok, _, err) = psql(&p, "SELECT 1/0").await?;
        assert!(!ok);
        assert!(err.contains("division by zero"), "{err}");
        let (ok, out, _) = psql(&p, "SELECT 'still fine'").await?;
        assert!(ok);
        assert_eq!(out.trim(), "still fine");
        p.shutdown().await?;
    }
    Ok(())
}

async fn pgbench(p: &Pooler, mode: &str, clients: u32, tx: u32) -> Result<String> {
    let args: Vec<String> = [
        // One thread per client: pgbench's synchronous PQprepare would otherwise block
        // the other clients of its thread while they hold server connections.
        "-n",
        "-M",
        mode,
        "-c",
        &clients.to_string(),
        "-j",
        &clients.to_string(),
        "-t",
        &tx.to_string(),
        "-h",
        "127.0.0.1",
        "-p",
        &p.addr.port().to_string(),
        "-U",
        APP_USER.0,
        APP_DB,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (ok, out, err) = run_tool("pgbench", &args, APP_USER.1).await?;
    ensure!(ok, "pgbench -M {mode} failed:\n{out}\n{err}");
    Ok(out)
}

fn processed(out: &str) -> Result<u64> {
    let line = out
        .lines()
        .find(|l| l.starts_with("number of transactions actually processed"))
        .context("no processed line")?;
    Ok(line
        .split(':')
        .nth(1)
        .context("no count")?
        .trim()
        .split('/')
        .next()
        .context("no n")?
        .parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pgbench_all_protocols_both_modes() -> Result<()> {
    let pg = postgres(50).await?;
    tokio::task::block_in_place(|| common::pgbench_init(&pg))?;
    for (cfg, clients) in [(TX, 8), (SESSION, 3)] {
        let mut p = start(&pg, cfg).await?;
        for mode in ["simple", "extended", "prepared"] {
            let out = pgbench(&p, mode, clients, 100).await?;
            assert_eq!(processed(&out)?, u64::from(clients) * 100, "{out}");
            assert!(
                !out.contains("failed transactions: 1") && !out.contains("aborted"),
                "{out}"
            );
        }
        let st = p.status().await?;
        assert!(st["server_connections"]["open"].as_u64().unwrap() <= 3);
        p.shutdown().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prepared_statement_lru_eviction_is_transparent() -> Result<()> {
    let pg = postgres(20).await?;
    let mut p = start(&pg, "connection_limit = 1\nmax_prepared_statements = 2").await?;
    let a = p.connect().await?;
    let b = p.connect().await?;
    let mut stmts = Vec::new();
    for k in 0..5i32 {
        stmts.push((k, a.prepare(&format!("SELECT $1::int4 + {k}")).await?));
    }
    // Round-robin over more statements than the server connection keeps, with another
    // client's statements mixed in on the same single server connection.
    let other = b.prepare("SELECT $1::text || '!'").await?;
    for round in 0..4i32 {
        for (k, st) in &stmts {
            let v: i32 = a.query_one(st, &[&round]).await?.get(0);
            assert_eq!(v, round + k);
        }
        let s: String = b.query_one(&other, &[&"hi"]).await?.get(0);
        assert_eq!(s, "hi!");
    }
    // The server connection never held more than the bound.
    let m = a
        .simple_query("SELECT count(*) FROM pg_prepared_statements")
        .await?;
    let held: i64 = rows(&m)[0][0].as_deref().unwrap_or("99").parse()?;
    assert!(
        (1..=2).contains(&held),
        "{held} statements on the server connection"
    );
    let su = sluice_testkit::connect(&pg.conn_str(
        sluice_testkit::SUPERUSER.0,
        sluice_testkit::SUPERUSER.1,
        APP_DB,
    ))
    .await?;
    let n: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(n, 1, "one server connection served everything");
    p.shutdown().await?;
    Ok(())
}
