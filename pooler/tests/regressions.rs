//! Regression tests for the client-isolation bugs of issue 15, each a message sequence
//! whose answer through Sluice once differed from PostgreSQL's.

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use common::wire::*;
use common::*;
use sluice_testkit::{APP_DB, APP_USER};
use tokio::io::AsyncWriteExt;

async fn raw(p: &Pooler) -> Result<tokio::net::TcpStream> {
    login(p.addr, APP_USER.0, APP_USER.1, APP_DB).await
}

/// Values of the DataRows in `msgs` (first column, text).
fn first_values(msgs: &[(u8, Vec<u8>)]) -> Vec<String> {
    msgs.iter()
        .filter(|(t, _)| *t == b'D')
        .map(|(_, b)| {
            let len = i32::from_be_bytes([b[2], b[3], b[4], b[5]]);
            String::from_utf8_lossy(&b[6..6 + len.max(0) as usize]).to_string()
        })
        .collect()
}

/// Item 1: a Sync after CopyDone is answered; counting its ReadyForQuery as the end of
/// the transaction handed the connection, and the attacker's pending result, to the
/// next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copy_then_sync_does_not_leak_results_to_the_next_client() -> Result<()> {
    let pg = postgres(20).await?;
    let mut p = start(&pg, "connection_limit = 1\npool_mode = \"transaction\"").await?;
    p.connect()
        .await?
        .batch_execute("create table leak (x int)")
        .await?;
    let mut attacker = raw(&p).await?;
    let mut victim = raw(&p).await?;
    let mut w = query("COPY leak FROM STDIN");
    w.extend_from_slice(&copy_data(b"1\n"));
    w.extend_from_slice(&copy_done());
    w.extend_from_slice(&sync());
    w.extend_from_slice(&query("select 'attacker' from pg_sleep(0.3)"));
    attacker.write_all(&w).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    victim.write_all(&query("select 'victim'")).await?;
    let (got, done) = read_until(&mut victim, Duration::from_secs(10), |t, _| t == b'Z').await;
    ensure!(done, "victim got no answer");
    assert_eq!(
        first_values(&got),
        ["victim"],
        "the victim gets its own row"
    );
    let mut z = 0;
    let (got, done) = read_until(&mut attacker, Duration::from_secs(10), |t, _| {
        z += usize::from(t == b'Z');
        z == 3
    })
    .await;
    ensure!(done, "attacker got {got:?}");
    assert_eq!(first_values(&got), ["attacker"]);
    p.shutdown().await?;
    Ok(())
}

/// Item 2: Terminate pipelined after a write; PostgreSQL runs the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_terminate_keeps_the_write_in_both_modes() -> Result<()> {
    let pg = postgres(20).await?;
    let su = sluice_testkit::connect(&pg.app_conn_str()).await?;
    su.batch_execute("create table kept (x int)").await?;
    for (i, mode) in ["transaction", "session"].iter().enumerate() {
        let mut p = start(
            &pg,
            &format!("connection_limit = 2\npool_mode = \"{mode}\""),
        )
        .await?;
        let mut c = raw(&p).await?;
        let mut w = query(&format!("insert into kept values ({i})"));
        w.extend_from_slice(&terminate());
        c.write_all(&w).await?;
        drop(c);
        let kept = eventually(10, || async {
            su.query_one("select count(*) from kept where x = $1", &[&(i as i32)])
                .await
                .map(|r| r.get::<_, i64>(0) == 1)
                .unwrap_or(false)
        })
        .await;
        assert!(kept, "{mode} mode: the insert before Terminate ran");
        p.shutdown().await?;
    }
    Ok(())
}

/// Item 3: DEALLOCATE ALL / DISCARD ALL in forms the pooler does not parse (several
/// statements, a comment first, the extended protocol) drop the server's statements; the
/// pooler notices from the server's answer, and other clients' statements keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deallocate_in_any_form_does_not_poison_shared_statements() -> Result<()> {
    let pg = postgres(20).await?;
    let mut p = start(&pg, "connection_limit = 1\npool_mode = \"transaction\"").await?;
    let a = p.connect().await?;
    let st = a.prepare("select $1::int + 1").await?;
    assert_eq!(a.query_one(&st, &[&1i32]).await?.get::<_, i32>(0), 2);
    let b = p.connect().await?;
    for sql in [
        "select 1; deallocate all",
        "/* pooled */ deallocate all",
        "-- pooled\ndiscard all",
    ] {
        b.batch_execute(sql).await?;
        let v: i32 = a.query_one(&st, &[&41i32]).await?.get(0);
        assert_eq!(v, 42, "after {sql:?}");
    }
    // The extended protocol, as psycopg 3 sends it.
    b.execute("deallocate all", &[]).await?;
    assert_eq!(a.query_one(&st, &[&9i32]).await?.get::<_, i32>(0), 10);
    // The client's own statements go as on PostgreSQL.
    b.batch_execute("discard all").await?;
    let own = b.prepare("select 5").await?;
    b.batch_execute("deallocate all").await?;
    let e = b.query_one(&own, &[]).await.expect_err("deallocated");
    assert_eq!(
        e.as_db_error().map(|d| d.code().clone()),
        Some(tokio_postgres::error::SqlState::INVALID_SQL_STATEMENT_NAME),
        "{e}"
    );
    assert!(
        !e.to_string().contains("sluice_"),
        "the error names the client's statement: {e}"
    );
    p.shutdown().await?;
    Ok(())
}

/// Item 6: after PostgreSQL's own FATAL the client gets nothing more from the pooler.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_fatal_is_the_last_word() -> Result<()> {
    let pg = postgres(20).await?;
    let su = pg.connect_superuser().await?;
    let mut p = start(&pg, "connection_limit = 2\npool_mode = \"session\"").await?;
    let mut c = raw(&p).await?;
    c.write_all(&query("select pg_backend_pid()::text")).await?;
    let (got, _) = read_until(&mut c, Duration::from_secs(5), |t, _| t == b'Z').await;
    let pid: i32 = first_values(&got)[0].parse()?;
    su.execute("select pg_terminate_backend($1)", &[&pid])
        .await?;
    let (got, _) = read_until(&mut c, Duration::from_secs(10), |_, _| false).await;
    let errors: Vec<_> = got
        .iter()
        .filter(|(t, _)| *t == b'E')
        .map(|(_, b)| fields(b))
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].1, "57P01", "{errors:?}");
    p.shutdown().await?;
    Ok(())
}
