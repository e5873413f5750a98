//! Regression tests for the client-isolation bugs of issue 15, each a message sequence
//! whose answer through Sluice once differed from PostgreSQL's.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
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

/// The salt a SCRAM exchange offers `user` (the `s=` of server-first-message).
async fn scram_salt(addr: std::net::SocketAddr, user: &str) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(&startup(&[("user", user), ("database", APP_DB)]))
        .await?;
    let (tag, _) = read_msg(&mut s).await?;
    ensure!(tag == b'R', "expected SASL");
    let first = b"n,,n=,r=abcdefghijklmnopqrstuvwx";
    let mut body = b"SCRAM-SHA-256\0".to_vec();
    body.extend_from_slice(&(first.len() as i32).to_be_bytes());
    body.extend_from_slice(first);
    s.write_all(&msg(b'p', &body)).await?;
    let (tag, body) = read_msg(&mut s).await?;
    ensure!(
        tag == b'R' && body[..4] == 11i32.to_be_bytes(),
        "SASL continue"
    );
    let text = String::from_utf8_lossy(&body[4..]).to_string();
    let salt = text
        .split(',')
        .find_map(|p| p.strip_prefix("s="))
        .ok_or_else(|| anyhow::anyhow!("no salt in {text}"))?;
    Ok(salt.to_string())
}

/// Item 8: unknown users got one fixed salt (so a name's existence showed) and a full
/// key derivation per attempt on the runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_users_are_not_told_apart_by_their_salt() -> Result<()> {
    let pg = postgres(20).await?;
    let mut p = start(&pg, "connection_limit = 2").await?;
    let a = scram_salt(p.addr, "nobody_a").await?;
    assert_eq!(a, scram_salt(p.addr, "nobody_a").await?, "stable per name");
    assert_ne!(
        a,
        scram_salt(p.addr, "nobody_b").await?,
        "different per name"
    );
    let real = scram_salt(p.addr, APP_USER.0).await?;
    assert_eq!(real, scram_salt(p.addr, APP_USER.0).await?);
    assert_eq!(a.len(), real.len(), "same salt length as a real user's");
    p.shutdown().await?;
    Ok(())
}

/// First column of every row a simple query returns, on a raw connection.
async fn values(s: &mut tokio::net::TcpStream, sql: &str) -> Result<Vec<String>> {
    s.write_all(&query(sql)).await?;
    let (got, done) = read_until(s, Duration::from_secs(10), |t, _| t == b'Z').await;
    ensure!(done, "no answer to {sql}");
    if let Some((_, b)) = got.iter().find(|(t, _)| *t == b'E') {
        anyhow::bail!("{sql}: {:?}", fields(b));
    }
    Ok(first_values(&got))
}

/// Item 5: startup parameters are honoured and follow their client from server
/// connection to server connection; one client's SET never reaches another.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn startup_parameters_follow_their_client() -> Result<()> {
    let pg = postgres(20).await?;
    for mode in ["transaction", "session"] {
        let limit = if mode == "transaction" { 1 } else { 3 };
        let mut p = start(
            &pg,
            &format!("connection_limit = {limit}\npool_mode = \"{mode}\""),
        )
        .await?;
        let (mut a, greeting) = login_with(
            p.addr,
            APP_USER.0,
            APP_USER.1,
            APP_DB,
            &[
                ("application_name", "alpha"),
                ("options", "-c DateStyle=SQL,\\ DMY"),
                ("client_min_messages", "warning"),
                ("extra_float_digits", "0"),
            ],
        )
        .await?;
        let told = |n: &str| {
            greeting
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(told("application_name").as_deref(), Some("alpha"), "{mode}");
        assert_eq!(told("DateStyle").as_deref(), Some("SQL, DMY"), "{mode}");
        let (mut b, _) = login_with(p.addr, APP_USER.0, APP_USER.1, APP_DB, &[]).await?;
        assert_eq!(values(&mut a, "show application_name").await?, ["alpha"]);
        assert_eq!(values(&mut a, "show datestyle").await?, ["SQL, DMY"]);
        assert_eq!(
            values(&mut b, "show application_name").await?,
            [""],
            "{mode}"
        );
        assert_eq!(
            values(&mut b, "show datestyle").await?,
            ["ISO, MDY"],
            "{mode}"
        );
        // Parameters PostgreSQL does not report follow their client too: set for A,
        // back to the defaults for B on the same server connection.
        for _ in 0..2 {
            assert_eq!(
                values(&mut a, "show client_min_messages").await?,
                ["warning"],
                "{mode}"
            );
            assert_eq!(values(&mut a, "select 0.1::float8::text").await?, ["0.1"]);
            assert_eq!(
                values(&mut b, "show client_min_messages").await?,
                ["notice"],
                "{mode}"
            );
            assert_eq!(
                values(&mut b, "show extra_float_digits").await?,
                ["1"],
                "{mode}"
            );
        }
        // A's SET stays A's.
        values(&mut a, "set client_encoding = 'LATIN1'").await?;
        assert_eq!(
            values(&mut b, "show client_encoding").await?,
            ["UTF8"],
            "{mode}"
        );
        assert_eq!(
            values(&mut a, "show client_encoding").await?,
            ["LATIN1"],
            "{mode}"
        );
        // Parameters the pooler cannot carry are refused, clearly.
        let e = login_with(p.addr, APP_USER.0, APP_USER.1, APP_DB, &[("geqo", "off")])
            .await
            .expect_err("refused");
        assert!(
            e.to_string()
                .contains("unsupported startup parameter: geqo"),
            "{e}"
        );
        p.shutdown().await?;
    }
    Ok(())
}

/// Item 4: after a schema change, a client preparing a statement gets a plan of the new
/// schema (the server connection may hold the same text prepared before it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schema_changes_do_not_break_statements_prepared_after_them() -> Result<()> {
    let pg = postgres(20).await?;
    let mut p = start(&pg, "connection_limit = 1\npool_mode = \"transaction\"").await?;
    let sql = "select * from shape";
    let first = p.connect().await?;
    first
        .batch_execute("create table shape (a int); insert into shape values (1)")
        .await?;
    assert_eq!(first.query(sql, &[]).await?[0].len(), 1);
    // Through the pooler: the server's tag says so, nobody sees an error.
    first
        .batch_execute("alter table shape add column b int default 2")
        .await?;
    let second = p.connect().await?;
    let rows = second.query(sql, &[]).await?;
    assert_eq!(rows[0].len(), 2, "a new client sees the new column");
    assert_eq!(rows[0].get::<_, i32>(1), 2);
    // Elsewhere: PostgreSQL's error tells the pooler; one try fails at most (PostgreSQL
    // direct would not fail), and every later one works.
    let direct = sluice_testkit::connect(&pg.app_conn_str()).await?;
    direct
        .batch_execute("alter table shape alter column b type text")
        .await?;
    let third = p.connect().await?;
    let mut failures = 0;
    for _ in 0..3 {
        match third.query(sql, &[]).await {
            Ok(rows) => assert_eq!(rows[0].get::<_, String>(1), "2"),
            Err(e) => {
                let code = e.code().map(|c| c.code().to_string());
                assert_eq!(code.as_deref(), Some("0A000"), "{e}");
                failures += 1;
            }
        }
    }
    assert!(failures <= 1, "{failures} of 3 tries failed");
    p.shutdown().await?;
    Ok(())
}

/// Terminate after extended messages with no Sync (asyncpg's `prepare()` sends Parse,
/// Describe, Flush): PostgreSQL answers them and ends the session; the pooler must end
/// it too (it waited for a ReadyForQuery that never comes). Both modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminate_after_unsynced_messages_ends_the_session() -> Result<()> {
    let pg = postgres(20).await?;
    for mode in ["transaction", "session"] {
        let mut p = start(
            &pg,
            &format!("connection_limit = 2\npool_mode = \"{mode}\""),
        )
        .await?;
        let mut s = raw(&p).await?;
        let mut w = parse("s1", "select 1");
        w.extend_from_slice(&describe(b'S', "s1"));
        w.extend_from_slice(&flush());
        s.write_all(&w).await?;
        let (got, done) = read_until(&mut s, Duration::from_secs(5), |t, _| t == b'T').await;
        ensure!(done, "{mode}: no description: {got:?}");
        s.write_all(&terminate()).await?;
        assert!(expect_closed(&mut s).await, "{mode}: the session ends");
        let c = p.connect().await?;
        let v: i32 = c.query_one("select 3", &[]).await?.get(0);
        assert_eq!(v, 3, "{mode}: the pool serves the next client");
        p.shutdown().await?;
    }
    Ok(())
}

/// asyncpg's `TestIntrospection` and `test_type_cache_invalidation_in_pool` (both modes):
/// `DROP DATABASE` of a database the pooler holds idle server connections to. PostgreSQL
/// refuses while others are connected (55006 after 5 s); the pooler closes its idle
/// connections to it first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drop_database_is_not_blocked_by_idle_server_connections() -> Result<()> {
    let pg = postgres(40).await?;
    let su = pg.connect_superuser().await?;
    su.batch_execute(&format!("CREATE DATABASE dropme OWNER {}", APP_USER.0))
        .await?;
    for mode in ["transaction", "session"] {
        let mut p = start(
            &pg,
            &format!("connection_limit = 5\npool_mode = \"{mode}\""),
        )
        .await?;
        {
            let c = sluice_testkit::connect(&p.conn_str(APP_USER.0, APP_USER.1, "dropme")).await?;
            c.simple_query("select 1").await?;
        }
        // Transaction mode: its server connection is idle in the pool now. Session mode:
        // the client's backend closed with it (its key was the client's).
        let want = if mode == "transaction" { 1 } else { 0 };
        let idle = eventually(5, || async {
            p.status()
                .await
                .is_ok_and(|s| s["server_connections"]["idle"].as_i64() == Some(want))
        })
        .await;
        ensure!(idle, "[{mode}] {want} idle server connection to dropme");
        let c = p.connect().await?;
        let started = std::time::Instant::now();
        c.batch_execute("DROP DATABASE dropme")
            .await
            .with_context(|| format!("[{mode}] DROP DATABASE through the pooler"))?;
        ensure!(
            started.elapsed() < Duration::from_secs(4),
            "[{mode}] it did not wait for the pooler's connections"
        );
        su.batch_execute(&format!("CREATE DATABASE dropme OWNER {}", APP_USER.0))
            .await?;
        p.shutdown().await?;
    }
    Ok(())
}

/// A statement prepared on demand inside a failed transaction (its Parse refused) is
/// prepared again for a use after the transaction ends, rather than counted on: the
/// later use once got the failed transaction's `25P02` (found by `make fuzz`, seed
/// 10615030186817565271). PostgreSQL, directly, is the expected answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_statement_refused_in_a_failed_transaction_is_prepared_again_after_it() -> Result<()> {
    let pg = postgres(20).await?;
    // One server connection whose statement list holds one statement: preparing `s1`
    // closes `s0` on it, so the next use of `s0` prepares it again, on demand.
    let mut p = start(
        &pg,
        "connection_limit = 1\npool_mode = \"transaction\"\nmax_prepared_statements = 1",
    )
    .await?;
    let direct: std::net::SocketAddr = format!("127.0.0.1:{}", pg.port()).parse()?;
    let mut answers = Vec::new();
    for addr in [direct, p.addr] {
        let mut s = login(addr, APP_USER.0, APP_USER.1, APP_DB).await?;
        for setup in [parse("s0", "select $1::int + 5"), parse("s1", "select 2")] {
            let mut w = setup;
            w.extend_from_slice(&sync());
            s.write_all(&w).await?;
            let (_, done) = read_until(&mut s, Duration::from_secs(10), |t, _| t == b'Z').await;
            ensure!(done, "no answer to the setup");
        }
        let mut w = query("begin");
        w.extend_from_slice(&query("select 1/0"));
        w.extend_from_slice(&bind("", "s0", &[Some("7")]));
        w.extend_from_slice(&execute("", 0));
        w.extend_from_slice(&sync());
        w.extend_from_slice(&query("rollback"));
        w.extend_from_slice(&bind("", "s0", &[Some("49")]));
        w.extend_from_slice(&execute("", 0));
        w.extend_from_slice(&sync());
        w.extend_from_slice(&query("select 'end'"));
        s.write_all(&w).await?;
        let mut z = 0;
        let (got, done) = read_until(&mut s, Duration::from_secs(10), |t, _| {
            z += usize::from(t == b'Z');
            z == 6
        })
        .await;
        ensure!(done, "{addr}: {got:?}");
        let shape: Vec<String> = got
            .iter()
            .map(|(t, b)| match t {
                b'E' => format!("E{}", fields(b).1),
                b'Z' => format!("Z{}", b[0] as char),
                t => (*t as char).to_string(),
            })
            .collect();
        answers.push((shape, first_values(&got)));
    }
    assert_eq!(answers[1], answers[0], "through the pooler, then directly");
    assert_eq!(answers[0].1, ["54", "end"]);
    p.shutdown().await?;
    Ok(())
}
