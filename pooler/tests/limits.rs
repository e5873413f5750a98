//! Limits, overload, live reload, drain, admin API and hostile input, against a real
//! PostgreSQL.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::wire::*;
use common::*;
use sha2::Digest;
use sluice_testkit::{APP_DB, APP_USER, SUPERUSER, TempPostgres};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;

/// Samples the number of app backends every `every` (back to back when zero) until
/// stopped; returns (max, samples).
fn sampler_every(
    su: tokio_postgres::Client,
    stop: Arc<AtomicBool>,
    every: Duration,
) -> tokio::task::JoinHandle<(i64, usize)> {
    tokio::spawn(async move {
        let (mut max, mut n) = (0, 0);
        while !stop.load(Ordering::SeqCst) {
            if let Ok(c) = backends(&su).await {
                max = max.max(c);
                n += 1;
            }
            if !every.is_zero() {
                tokio::time::sleep(every).await;
            }
        }
        (max, n)
    })
}

/// [`sampler_every`] 10 ms.
fn sampler(
    su: tokio_postgres::Client,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(i64, usize)> {
    sampler_every(su, stop, Duration::from_millis(10))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_clients_never_exceed_limit_of_five() -> Result<()> {
    let pg = postgres(40).await?;
    let mut p = start(&pg, "connection_limit = 5").await?;
    let stop = Arc::new(AtomicBool::new(false));
    let sampling = sampler(pg.connect_superuser().await?, stop.clone());
    let barrier = Arc::new(tokio::sync::Barrier::new(200));
    let mut tasks = Vec::new();
    for i in 0..200i32 {
        let cs = p.app_conn_str();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let c = sluice_testkit::connect(&cs).await?;
            barrier.wait().await;
            for j in 0..3i32 {
                let r = c
                    .query_one(
                        "SELECT $1::int4 + $2::int4, pg_sleep(0.002)::text",
                        &[&i, &j],
                    )
                    .await?;
                ensure!(r.get::<_, i32>(0) == i + j, "wrong result");
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    let mut failures = Vec::new();
    for t in tasks {
        if let Err(e) = t.await? {
            failures.push(format!("{e:#}"));
        }
    }
    stop.store(true, Ordering::SeqCst);
    let (max, samples) = sampling.await?;
    assert!(
        failures.is_empty(),
        "{} clients failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert!(samples >= 10, "only {samples} samples");
    assert!(max <= 5, "saw {max} server connections");
    assert!(max >= 1);
    p.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overflow_clients_get_pool_timeout_error() -> Result<()> {
    let pg = postgres(40).await?;
    let mut p = start(&pg, "connection_limit = 2\npool_timeout = \"300ms\"").await?;
    let mut long = Vec::new();
    for _ in 0..2 {
        let c = p.connect().await?;
        long.push(tokio::spawn(async move {
            c.simple_query("SELECT pg_sleep(2)").await.map(|_| ())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut errors = Vec::new();
    for _ in 0..3 {
        let c = p.connect().await?;
        let t0 = Instant::now();
        let e = c
            .simple_query("SELECT 1")
            .await
            .expect_err("no server connection free");
        assert!(
            t0.elapsed() < Duration::from_millis(1500),
            "gave up after pool_timeout"
        );
        errors.push(e);
    }
    for e in &errors {
        let db = e.as_db_error().context("a server error")?;
        assert_eq!(db.code(), &SqlState::TOO_MANY_CONNECTIONS);
        assert!(
            db.message().contains("connection_limit 2"),
            "{}",
            db.message()
        );
        assert!(db.message().contains("pool_timeout"), "{}", db.message());
    }
    for t in long {
        t.await?.context("long queries are unaffected")?;
    }
    let c = p.connect().await?;
    c.simple_query("SELECT 1").await?;
    let (_, metrics) = p.admin_get("/metrics").await?;
    assert!(
        metrics.contains("sluice_pooler_pool_timeouts_total 3"),
        "{metrics}"
    );
    p.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_client_connections_rejects_at_startup() -> Result<()> {
    let pg = postgres(40).await?;
    let mut p = start(&pg, "connection_limit = 2\nmax_client_connections = 3").await?;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(p.connect().await?);
    }
    let e = p.connect().await.expect_err("fourth client refused");
    let e = e
        .downcast_ref::<tokio_postgres::Error>()
        .context("postgres error")?;
    let db = e.as_db_error().context("an ErrorResponse")?;
    assert_eq!(db.code(), &SqlState::TOO_MANY_CONNECTIONS);
    assert!(
        db.message().contains("max_client_connections = 3"),
        "{}",
        db.message()
    );
    held[0].simple_query("SELECT 1").await?;
    drop(held.pop());
    let ok = eventually(5, || async { p.connect().await.is_ok() }).await;
    assert!(ok, "a slot frees up when a client leaves");
    p.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_reload_lowers_limit_under_load() -> Result<()> {
    let pg = postgres(60).await?;
    let mut p = start(&pg, "connection_limit = 20").await?;
    let su = pg.connect_superuser().await?;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicI64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let (cs, stop, done) = (p.app_conn_str(), stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let c = sluice_testkit::connect(&cs).await?;
            while !stop.load(Ordering::SeqCst) {
                c.simple_query("SELECT pg_sleep(0.05)").await?;
                done.fetch_add(1, Ordering::SeqCst);
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    assert!(
        eventually(10, || async { backends(&su).await.unwrap_or(0) >= 15 }).await,
        "load reaches the old limit"
    );
    let old_hash = p.status().await?["config_hash"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let text = config_text(&pg, "connection_limit = 5");
    std::fs::write(&p.config_path, &text)?;
    let new_hash = format!("{:x}", sha2::Sha256::digest(text.as_bytes()));
    let t0 = Instant::now();
    assert!(
        eventually(5, || async {
            p.status()
                .await
                .map(|s| s["config_hash"] == new_hash.as_str() && s["connection_limit"] == 5)
                .unwrap_or(false)
        })
        .await,
        "new config applied"
    );
    assert_ne!(old_hash, new_hash);
    assert!(
        eventually(5, || async { backends(&su).await.unwrap_or(99) <= 5 }).await,
        "server connections drop to 5"
    );
    let settle = t0.elapsed();
    // Stays at or below the new limit while the load goes on.
    let stop_s = Arc::new(AtomicBool::new(false));
    let sampling = sampler(pg.connect_superuser().await?, stop_s.clone());
    let before = done.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_s.store(true, Ordering::SeqCst);
    let (max, _) = sampling.await?;
    assert!(max <= 5, "saw {max} after the reload");
    assert!(
        done.load(Ordering::SeqCst) > before,
        "clients keep being served"
    );
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await?.context("no client error during the reload")?;
    }
    assert!(settle < Duration::from_secs(5));
    p.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_config_is_rejected_and_the_old_one_kept() -> Result<()> {
    let pg = postgres(20).await?;
    let mut p = start(&pg, "connection_limit = 3").await?;
    let hash = p.status().await?["config_hash"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    std::fs::write(
        &p.config_path,
        config_text(&pg, "connection_limit = 3\nconection_limit = 4"),
    )?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let st = p.status().await?;
    assert_eq!(st["config_hash"].as_str(), Some(hash.as_str()));
    assert_eq!(st["connection_limit"], 3);
    p.connect().await?.simple_query("SELECT 1").await?;
    // A valid file afterwards is applied.
    std::fs::write(&p.config_path, config_text(&pg, "connection_limit = 4"))?;
    assert!(
        eventually(5, || async {
            p.status()
                .await
                .map(|s| s["connection_limit"] == 4)
                .unwrap_or(false)
        })
        .await
    );
    p.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_endpoints_and_in_process_drain() -> Result<()> {
    let pg = postgres(20).await?;
    let mut p = start(&pg, "connection_limit = 3\ndrain_timeout = \"10s\"").await?;
    assert_eq!(p.admin_get("/healthz").await?, (200, "ok".to_string()));
    assert_eq!(p.admin_get("/readyz").await?, (200, "ready".to_string()));
    let mut c = p.connect().await?;
    c.simple_query("SELECT 1").await?;
    let idle = p.connect().await?;
    let st = p.status().await?;
    let expected = format!("{:x}", sha2::Sha256::digest(std::fs::read(&p.config_path)?));
    assert_eq!(st["config_hash"].as_str(), Some(expected.as_str()));
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(st["pool_mode"], "transaction");
    assert_eq!(st["connection_limit"], 3);
    assert_eq!(st["draining"], false);
    assert_eq!(st["clients"]["active"], 2);
    assert_eq!(st["server_connections"]["open"], 1);
    assert_eq!(st["server_connections"]["idle"], 1);
    assert_eq!(st["pools"][0]["database"], APP_DB);
    assert_eq!(st["pools"][0]["user"], APP_USER.0);
    let (code, metrics) = p.admin_get("/metrics").await?;
    assert_eq!(code, 200);
    for name in [
        "sluice_pooler_clients{",
        "sluice_pooler_server_connections_open{",
        "sluice_pooler_wait_seconds_bucket",
        "sluice_pooler_queries_total{",
        "sluice_pooler_transactions_total{",
        "sluice_pooler_connection_limit 3",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }
    // Drain with a transaction in flight: it finishes; then the client is closed.
    let tx = c.transaction().await?;
    tx.simple_query("SELECT pg_sleep(0.5)").await?;
    let admin = p.admin;
    let shutdown = tokio::spawn(async move { p.shutdown().await.map(|_| p) });
    assert!(
        eventually(5, || async {
            http_get(admin, "/readyz")
                .await
                .map(|r| r.0 == 503)
                .unwrap_or(false)
        })
        .await,
        "not ready while draining"
    );
    assert!(
        http_get(admin, "/status")
            .await?
            .1
            .contains("\"draining\":true")
    );
    assert!(
        http_get(admin, "/healthz").await?.0 == 200,
        "still alive while draining"
    );
    // The transaction in flight goes on and commits.
    let r = tx.simple_query("SELECT 'still here'").await?;
    assert_eq!(r.len(), 3);
    tx.commit().await?;
    let _p = shutdown.await??;
    assert!(
        c.simple_query("SELECT 1").await.is_err(),
        "closed after the transaction"
    );
    assert!(
        idle.is_closed() || idle.simple_query("SELECT 1").await.is_err(),
        "idle client closed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_request_reaches_the_backend() -> Result<()> {
    let pg = postgres(20).await?;
    let mut p = start(&pg, "connection_limit = 2").await?;
    let c = p.connect().await?;
    let token = c.cancel_token();
    let t0 = Instant::now();
    let q = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(20)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token.cancel_query(tokio_postgres::NoTls).await?;
    let e = q.await?.expect_err("cancelled");
    assert_eq!(e.code(), Some(&SqlState::QUERY_CANCELED));
    assert!(t0.elapsed() < Duration::from_secs(10));
    p.shutdown().await?;
    Ok(())
}

/// Two poolers with config `top` on one port at 127.0.0.2 and 127.0.0.3, as pods behind
/// a Service are.
async fn two_replicas(pg: &TempPostgres, top: &str) -> Result<(Pooler, Pooler)> {
    let port = std::net::TcpListener::bind("127.0.0.2:0")?
        .local_addr()?
        .port();
    let replica = |ip: &str| {
        config_text(pg, top).replacen(
            "listen_addr = \"127.0.0.1:0\"",
            &format!("listen_addr = \"{ip}:{port}\""),
            1,
        )
    };
    let a = start_with_text(&replica("127.0.0.2")).await?;
    let b = start_with_text(&replica("127.0.0.3")).await?;
    Ok((a, b))
}

/// Sends a CancelRequest for key (`pid`, `secret`) to `addr` and waits for it to close.
async fn send_cancel(addr: std::net::SocketAddr, pid: i32, secret: i32) -> Result<()> {
    let mut c = TcpStream::connect(addr).await?;
    let mut req = vec![0, 0, 0, 16, 4, 210, 22, 46];
    req.extend_from_slice(&pid.to_be_bytes());
    req.extend_from_slice(&secret.to_be_bytes());
    c.write_all(&req).await?;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await??;
    Ok(())
}

/// Issue 15 item 9: behind a Service a CancelRequest lands on any replica; the one that
/// did not issue the key passes it on to the one that did (its address is in the key).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_request_reaches_the_replica_that_issued_the_key() -> Result<()> {
    let pg = postgres(20).await?;
    let (mut a, mut b) = two_replicas(&pg, "connection_limit = 2").await?;
    let (mut s, (pid, secret)) = login_keyed(a.addr, APP_USER.0, APP_USER.1, APP_DB).await?;
    assert_eq!(pid as u32, u32::from(std::net::Ipv4Addr::new(127, 0, 0, 2)));
    s.write_all(&query("select pg_sleep(20)")).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A wrong secret cancels nothing.
    send_cancel(b.addr, pid, secret.wrapping_add(1)).await?;
    let (got, done) = read_until(&mut s, Duration::from_secs(1), |t, _| t == b'Z').await;
    ensure!(!done, "cancelled by a wrong key: {got:?}");
    let t0 = Instant::now();
    send_cancel(b.addr, pid, secret).await?;
    let (got, done) = read_until(&mut s, Duration::from_secs(10), |t, _| t == b'E').await;
    ensure!(done, "not cancelled: {got:?}");
    let (_, code, _) = fields(&got.last().context("error")?.1);
    assert_eq!(code, "57014", "canceling statement due to user request");
    assert!(t0.elapsed() < Duration::from_secs(5));
    a.shutdown().await?;
    b.shutdown().await?;
    Ok(())
}

/// Session mode gets a client its server connection at login; a client that leaves
/// while it waits for one stops waiting (no backend is opened for it later).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn session_mode_login_waiter_that_leaves_stops_waiting() -> Result<()> {
    let pg = postgres(20).await?;
    let mut p = start(
        &pg,
        "connection_limit = 1\npool_mode = \"session\"\npool_timeout = \"30s\"",
    )
    .await?;
    let holder = p.connect().await?;
    holder.simple_query("select 1").await?;
    let addr = p.addr;
    let waiter = tokio::spawn(async move { login(addr, APP_USER.0, APP_USER.1, APP_DB).await });
    let waiting = |n: i64| {
        let p = &p;
        async move {
            eventually(10, || async {
                p.status()
                    .await
                    .is_ok_and(|s| s["clients"]["waiting"].as_i64() == Some(n))
            })
            .await
        }
    };
    assert!(waiting(1).await, "the second client waits at login");
    waiter.abort();
    assert!(waiting(0).await, "it stopped waiting when it left");
    drop(holder);
    p.shutdown().await?;
    Ok(())
}

/// Session mode is a direct connection with a budget: the client's key is its backend's
/// own, so `pg_backend_pid()` and notifications agree with it, a CancelRequest reaching
/// another replica goes to the database, and the backend serves no one after the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn session_mode_gives_the_client_its_backends_own_key() -> Result<()> {
    let pg = postgres(20).await?;
    let su = pg.connect_superuser().await?;
    let (mut a, mut b) = two_replicas(&pg, "connection_limit = 2\npool_mode = \"session\"").await?;
    let (mut s, (pid, secret)) = login_keyed(a.addr, APP_USER.0, APP_USER.1, APP_DB).await?;
    s.write_all(&query(
        "listen ch; notify ch, 'hi'; select pg_backend_pid()",
    ))
    .await?;
    let (got, done) = read_until(&mut s, Duration::from_secs(5), |t, _| t == b'Z').await;
    ensure!(done, "no answer: {got:?}");
    let row = got.iter().find(|(t, _)| *t == b'D').context("a row")?;
    let backend: i32 = std::str::from_utf8(&row.1[6..])?.parse()?;
    assert_eq!(pid, backend, "BackendKeyData carries pg_backend_pid()");
    let note = got
        .iter()
        .find(|(t, _)| *t == b'A')
        .context("a notification")?;
    assert_eq!(i32::from_be_bytes(note.1[..4].try_into()?), pid);

    s.write_all(&query("select pg_sleep(20)")).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    send_cancel(b.addr, pid, secret.wrapping_add(1)).await?;
    let (got, done) = read_until(&mut s, Duration::from_secs(1), |t, _| t == b'Z').await;
    ensure!(!done, "cancelled by a wrong key: {got:?}");
    send_cancel(b.addr, pid, secret).await?;
    let (got, done) = read_until(&mut s, Duration::from_secs(10), |t, _| t == b'E').await;
    ensure!(done, "not cancelled: {got:?}");
    let (_, code, _) = fields(&got.last().context("error")?.1);
    assert_eq!(code, "57014", "canceling statement due to user request");

    s.write_all(&terminate()).await?;
    drop(s);
    let gone = eventually(10, || async {
        let n: i64 = su
            .query_one(
                "select count(*) from pg_stat_activity where pid = $1",
                &[&pid],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(1);
        n == 0
    })
    .await;
    assert!(
        gone,
        "the backend whose key the client had serves no one else"
    );
    a.shutdown().await?;
    b.shutdown().await?;
    Ok(())
}

/// Logs in as the app user over a raw socket.
async fn raw_login(addr: std::net::SocketAddr, password: &str) -> Result<TcpStream> {
    login(addr, APP_USER.0, password, APP_DB).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_input_gets_clear_errors_and_others_are_unaffected() -> Result<()> {
    let pg = postgres(20).await?;
    let mut p = start(&pg, "connection_limit = 2").await?;
    let good = p.connect().await?;
    let st = good.prepare("SELECT $1::int4").await?;

    // Startup packet with an impossible length: closed without a word, as PostgreSQL
    // does (nothing at all is read back).
    for packet in [&[0, 0, 0, 3, 1, 2, 3][..], &[0, 0x10, 0, 0, 0, 3, 0, 0]] {
        for addr in [p.addr, format!("127.0.0.1:{}", pg.port()).parse()?] {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(packet).await?;
            let mut got = Vec::new();
            let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
            assert!(
                matches!(n, Ok(Ok(0)) | Ok(Err(_))),
                "{addr}: {packet:?} got {got:?}"
            );
        }
    }

    // Protocol 3.2 with a protocol option (PostgreSQL 18 clients with
    // max_protocol_version=latest): NegotiateProtocolVersion, then a normal login.
    let mut s = TcpStream::connect(p.addr).await?;
    let mut packet = startup(&[("user", APP_USER.0), ("_pq_.test_option", "1")]);
    packet[4..8].copy_from_slice(&0x0003_0002u32.to_be_bytes());
    s.write_all(&packet).await?;
    let (tag, body) = read_msg(&mut s).await?;
    assert_eq!(tag, b'v');
    assert_eq!(
        &body[..8],
        &[0, 0, 0, 0, 0, 0, 0, 1],
        "3.0, one unknown option"
    );
    assert_eq!(&body[8..], b"_pq_.test_option\0");
    assert_eq!(read_msg(&mut s).await?.0, b'R', "then authentication");

    // Unsupported protocol version.
    let mut s = TcpStream::connect(p.addr).await?;
    s.write_all(&[0, 0, 0, 8, 0, 2, 0, 0]).await?;
    let (_, code, m) = expect_error(&mut s).await?;
    assert_eq!(code, "08P01");
    assert!(m.contains("unsupported frontend protocol 2.0"), "{m}");

    // Garbage in the startup parameters.
    let mut s = TcpStream::connect(p.addr).await?;
    let mut bad = startup(&[("user", "app")]);
    bad.truncate(bad.len() - 2);
    let len = bad.len() as u32;
    bad[..4].copy_from_slice(&len.to_be_bytes());
    s.write_all(&bad).await?;
    let (_, code, _) = expect_error(&mut s).await?;
    assert_eq!(code, "08P01");

    // SSLRequest is answered 'N', then a normal login works.
    let mut s = TcpStream::connect(p.addr).await?;
    s.write_all(&[0, 0, 0, 8, 4, 210, 22, 47]).await?;
    assert_eq!(s.read_u8().await?, b'N');
    drop(s);

    // Oversize message after login.
    let mut s = raw_login(p.addr, APP_USER.1).await?;
    s.write_all(&[b'Q', 0x7f, 0xff, 0xff, 0xff]).await?;
    let (_, code, m) = expect_error(&mut s).await?;
    assert_eq!(code, "08P01");
    assert!(m.contains("exceeds the limit of 16777216 bytes"), "{m}");
    assert!(expect_closed(&mut s).await);

    // Bad length and unknown message type after login.
    let mut s = raw_login(p.addr, APP_USER.1).await?;
    s.write_all(&[b'Q', 0, 0, 0, 2]).await?;
    assert_eq!(expect_error(&mut s).await?.1, "08P01");
    let mut s = raw_login(p.addr, APP_USER.1).await?;
    s.write_all(&msg(b'!', b"")).await?;
    let (_, code, m) = expect_error(&mut s).await?;
    assert_eq!(code, "08P01");
    assert!(m.contains("unknown message type"), "{m}");
    // Malformed Parse body.
    let mut s = raw_login(p.addr, APP_USER.1).await?;
    s.write_all(&msg(b'P', b"s1\0select 1")).await?;
    assert_eq!(expect_error(&mut s).await?.1, "08P01");

    // Wrong password and unknown user.
    for (user, pw) in [(APP_USER.0, "wrong"), ("nobody", "x")] {
        let e = sluice_testkit::connect(&p.conn_str(user, pw, APP_DB))
            .await
            .expect_err("refused");
        let e = e
            .downcast_ref::<tokio_postgres::Error>()
            .context("pg error")?;
        let db = e.as_db_error().context("ErrorResponse")?;
        assert_eq!(db.code(), &SqlState::INVALID_PASSWORD);
        assert!(db.message().contains(&format!(
            "password authentication failed for user \"{user}\""
        )));
    }
    assert!(raw_login(p.addr, "wrong").await.is_err());

    // Nobody else noticed.
    let v: i32 = good.query_one(&st, &[&7i32]).await?.get(0);
    assert_eq!(v, 7);
    let (_, metrics) = p.admin_get("/metrics").await?;
    assert!(
        metrics.contains("sluice_pooler_errors_total{kind=\"protocol\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("sluice_pooler_errors_total{kind=\"auth\"}"));
    p.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_the_binary_under_pgbench_load() -> Result<()> {
    let pg = postgres(40).await?;
    tokio::task::block_in_place(|| common::pgbench_init(&pg))?;
    let (port, admin) = (sluice_testkit::free_port()?, sluice_testkit::free_port()?);
    let text = config_text(&pg, "connection_limit = 4\ndrain_timeout = \"5s\"")
        .replace(
            "127.0.0.1:0\"\nadmin",
            &format!("127.0.0.1:{port}\"\nadmin"),
        )
        .replace(
            "admin_addr = \"127.0.0.1:0\"",
            &format!("admin_addr = \"127.0.0.1:{admin}\""),
        );
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("pooler.toml");
    std::fs::write(&cfg, text)?;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice-pooler"))
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse()?;
    assert!(
        eventually(10, || async {
            http_get(admin_addr, "/healthz").await.is_ok()
        })
        .await,
        "pooler up"
    );
    let bench = tokio::process::Command::new("pgbench")
        .args([
            "-n",
            "-M",
            "extended",
            "-c",
            "6",
            "-j",
            "6",
            "-T",
            "20",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .args(["-U", APP_USER.0, APP_DB])
        .env("PGPASSWORD", APP_USER.1)
        .output();
    let bench = tokio::spawn(bench);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = child.id().context("pid")?;
    let t0 = Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    let status = tokio::time::timeout(Duration::from_secs(8), child.wait())
        .await
        .context("exited in time")??;
    let took = t0.elapsed();
    assert!(status.success(), "clean exit: {status:?}");
    assert!(
        took < Duration::from_millis(5500),
        "exited within drain_timeout ({took:?})"
    );
    let out = tokio::time::timeout(Duration::from_secs(30), bench).await???;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("number of failed transactions: 0"),
        "{stdout}\n{stderr}"
    );
    let processed: i64 = stdout
        .lines()
        .find(|l| l.starts_with("number of transactions actually processed"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse().ok())
        .context("processed count")?;
    assert!(processed > 0);
    // Errors only at transaction boundaries: the shutdown notice, never a failed statement.
    let failed: Vec<&str> = stderr.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(failed.is_empty(), "a statement failed: {failed:?}");
    let su = pg.connect_superuser().await?;
    // Every transaction pgbench saw complete is committed, and nothing else.
    let app_db = sluice_testkit::connect(&pg.conn_str(SUPERUSER.0, SUPERUSER.1, APP_DB)).await?;
    let history: i64 = app_db
        .query_one("SELECT count(*) FROM pgbench_history", &[])
        .await?
        .get(0);
    assert_eq!(
        history, processed,
        "committed transactions match what pgbench counted"
    );
    assert!(
        eventually(5, || async { backends(&su).await.unwrap_or(1) == 0 }).await,
        "no leftover server connections"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_idle_connections_are_checked_and_idle_ones_reaped() -> Result<()> {
    let pg = postgres(20).await?;
    let mut p = start(
        &pg,
        "connection_limit = 2\nserver_check_delay = \"0s\"\nidle_timeout = \"2s\"",
    )
    .await?;
    let su = pg.connect_superuser().await?;
    let c = p.connect().await?;
    c.simple_query("SELECT 1").await?;
    assert_eq!(backends(&su).await?, 1);
    // Kill the idle server connection behind the pooler's back.
    su.simple_query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'")
        .await?;
    assert!(eventually(5, || async { backends(&su).await.unwrap_or(1) == 0 }).await);
    // The check before reuse notices and the client never sees the dead connection.
    let r = c.simple_query("SELECT 2").await?;
    assert_eq!(r.len(), 3);
    assert_eq!(backends(&su).await?, 1);
    // idle_timeout closes it once unused.
    assert!(
        eventually(6, || async { backends(&su).await.unwrap_or(1) == 0 }).await,
        "reaped after idle_timeout"
    );
    assert_eq!(p.status().await?["server_connections"]["open"], 0);
    c.simple_query("SELECT 3").await?;
    p.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_dir_and_credential_files_reload_without_dropping_clients() -> Result<()> {
    let pg = postgres(20).await?;
    let dir = tempfile::tempdir()?;
    let users = dir.path().join("users");
    std::fs::create_dir(&users)?;
    std::fs::write(users.join(APP_USER.0), format!("{}\n", APP_USER.1))?;
    // A stored SCRAM verifier for a second user.
    std::fs::write(
        users.join("reader"),
        postgres_protocol::password::scram_sha_256(b"reader-pw"),
    )?;
    std::fs::write(dir.path().join("username"), APP_USER.0)?;
    std::fs::write(dir.path().join("password"), APP_USER.1)?;
    let text = format!(
        "listen_addr = \"127.0.0.1:0\"\nadmin_addr = \"127.0.0.1:0\"\nconnection_limit = 2\n\
         [server]\nhost = \"127.0.0.1\"\nport = {}\nuser_file = \"{d}/username\"\npassword_file = \"{d}/password\"\n\
         [auth]\nusers_dir = \"{u}\"\n",
        pg.port(),
        d = dir.path().display(),
        u = users.display()
    );
    let mut p = start_with_text(&text).await?;
    let hash = p.status().await?["config_hash"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let kept = p.connect().await?;
    kept.simple_query("SELECT 1").await?;
    let reader = sluice_testkit::connect(&p.conn_str("reader", "reader-pw", APP_DB)).await?;
    reader.simple_query("SELECT 1").await?;
    // Change the password in the mounted-Secret-style directory.
    std::fs::write(users.join(APP_USER.0), "rotated-pw")?;
    let new_ok = eventually(5, || async {
        sluice_testkit::connect(&p.conn_str(APP_USER.0, "rotated-pw", APP_DB))
            .await
            .is_ok()
    })
    .await;
    assert!(new_ok, "the new password works");
    assert!(
        p.connect().await.is_err(),
        "the old password no longer works"
    );
    kept.simple_query("SELECT 1")
        .await
        .context("existing clients stay connected")?;
    // The pooler.toml bytes did not change, so neither did the hash.
    assert_eq!(
        p.status().await?["config_hash"].as_str(),
        Some(hash.as_str())
    );
    p.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn md5_client_auth() -> Result<()> {
    let pg = postgres(20).await?;
    let text = config_text(&pg, "connection_limit = 1")
        .replace("[auth.users]", "[auth]\nmethod = \"md5\"\n[auth.users]");
    let mut p = start_with_text(&text).await?;
    let c = p.connect().await?;
    let v: i32 = c.query_one("SELECT 5::int4", &[]).await?.get(0);
    assert_eq!(v, 5);
    let e = sluice_testkit::connect(&p.conn_str(APP_USER.0, "nope", APP_DB))
        .await
        .expect_err("wrong md5 password");
    let e = e
        .downcast_ref::<tokio_postgres::Error>()
        .context("pg error")?;
    assert_eq!(e.code(), Some(&SqlState::INVALID_PASSWORD));
    p.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restart_is_invisible_to_the_next_transactions() -> Result<()> {
    let mut pg = postgres(20).await?;
    let mut p = start(&pg, "connection_limit = 3").await?;
    let clients = [p.connect().await?, p.connect().await?, p.connect().await?];
    // Three idle server connections.
    let mut running = Vec::new();
    for c in &clients {
        running.push(c.simple_query("SELECT pg_sleep(0.2)"));
    }
    for r in futures::future::join_all(running).await {
        r?;
    }
    let all_idle = eventually(5, || async {
        p.status()
            .await
            .map(|s| s["server_connections"]["idle"] == 3)
            .unwrap_or(false)
    })
    .await;
    assert!(all_idle, "three idle server connections");
    tokio::task::block_in_place(|| pg.restart_with_max_connections(20))?;
    // Every dead idle connection is noticed before use, none reaches a client.
    for c in &clients {
        let r = c
            .simple_query("SELECT 1")
            .await
            .context("query after the restart")?;
        assert_eq!(r.len(), 3);
    }
    p.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn session_mode_drain_closes_idle_sessions_with_57p01() -> Result<()> {
    let pg = postgres(20).await?;
    let mut p = start(
        &pg,
        "connection_limit = 3\npool_mode = \"session\"\ndrain_timeout = \"5s\"",
    )
    .await?;
    let su = pg.connect_superuser().await?;
    let mut s = raw_login(p.addr, APP_USER.1).await?;
    s.write_all(&msg(b'Q', b"SELECT 1\0")).await?;
    loop {
        if read_msg(&mut s).await?.0 == b'Z' {
            break;
        }
    }
    assert_eq!(
        backends(&su).await?,
        1,
        "session holds its server connection"
    );
    let t0 = Instant::now();
    p.shutdown().await?;
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "idle sessions do not wait for drain_timeout"
    );
    let (sev, code, m) = expect_error(&mut s).await?;
    assert_eq!(
        (sev.as_str(), code.as_str(), m.as_str()),
        ("FATAL", "57P01", "pooler shutting down")
    );
    assert!(expect_closed(&mut s).await);
    assert!(
        eventually(5, || async { backends(&su).await.unwrap_or(1) == 0 }).await,
        "no leftovers"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_waits_for_a_restarting_server_within_pool_timeout() -> Result<()> {
    let mut pg = postgres(20).await?;
    let mut p = start(&pg, "connection_limit = 2\npool_timeout = \"30s\"").await?;
    let c = p.connect().await?;
    c.simple_query("SELECT 1").await?;
    tokio::task::block_in_place(|| pg.stop());
    let t0 = Instant::now();
    let q = tokio::spawn(async move { c.query_one("SELECT 41 + 1", &[]).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!q.is_finished(), "the transaction waits instead of failing");
    tokio::task::block_in_place(|| pg.resume())?;
    let row = tokio::time::timeout(Duration::from_secs(25), q).await???;
    assert_eq!(row.get::<_, i32>(0), 42);
    assert!(t0.elapsed() >= Duration::from_secs(2));
    p.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_server_gives_a_clear_error_and_frees_the_slot() -> Result<()> {
    let pg = postgres(20).await?;
    let dead = sluice_testkit::free_port()?;
    let text = config_text(&pg, "connection_limit = 1\npool_timeout = \"1s\"")
        .replace(&format!("port = {}", pg.port()), &format!("port = {dead}"));
    let mut p = start_with_text(&text).await?;
    for _ in 0..3 {
        let t0 = Instant::now();
        let e = p.connect().await.expect_err("no server");
        // Retried for pool_timeout (the server might have been restarting), then reported.
        assert!(
            t0.elapsed() >= Duration::from_millis(900),
            "{:?}",
            t0.elapsed()
        );
        let e = e
            .downcast_ref::<tokio_postgres::Error>()
            .context("pg error")?;
        let db = e
            .as_db_error()
            .context("an ErrorResponse, not a bare close")?;
        assert_eq!(db.code(), &SqlState::CONNECTION_FAILURE);
        assert!(
            !db.message().contains("127.0.0.1"),
            "no internals leak: {}",
            db.message()
        );
    }
    assert_eq!(p.status().await?["server_connections"]["open"], 0);
    p.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_timeout_cancels_what_still_runs() -> Result<()> {
    let pg = postgres(20).await?;
    let mut p = start(&pg, "connection_limit = 2\ndrain_timeout = \"1s\"").await?;
    let su = pg.connect_superuser().await?;
    let c = p.connect().await?;
    let q = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30)").await });
    let started = eventually(5, || async {
        su.query_one("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' AND state = 'active' AND pid <> pg_backend_pid()", &[])
            .await
            .map(|r| r.get::<_, i64>(0) == 1)
            .unwrap_or(false)
    })
    .await;
    assert!(started);
    let t0 = Instant::now();
    p.shutdown().await?;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "drain took {took:?}"
    );
    assert!(q.await?.is_err(), "the long query did not complete");
    let gone = eventually(5, || async { backends(&su).await.unwrap_or(1) == 0 }).await;
    assert!(
        gone,
        "the running statement was cancelled and its connection closed"
    );
    Ok(())
}

/// Issue 15, item 7: a slot is free only once PostgreSQL has let its backend go. Busy
/// clients killed mid-statement (their statements cancelled) and new clients taking
/// their slots at once never make PostgreSQL hold more backends than the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_busy_clients_free_their_slots_only_when_the_backend_is_gone() -> Result<()> {
    let pg = postgres(40).await?;
    let mut p = start(&pg, "connection_limit = 3").await?;
    let su = pg.connect_superuser().await?;
    let stop = Arc::new(AtomicBool::new(false));
    // Back to back: the window in which a closed connection's backend lingers is short.
    let sampled = sampler_every(pg.connect_superuser().await?, stop.clone(), Duration::ZERO);
    for _ in 0..10 {
        let mut busy = Vec::new();
        for _ in 0..3 {
            let mut s = raw_login(p.addr, APP_USER.1).await?;
            s.write_all(&query("select pg_sleep(30)")).await?;
            busy.push(s);
        }
        let running = eventually(10, || async {
            su.query_one(
                "select count(*) from pg_stat_activity where query = 'select pg_sleep(30)' and state = 'active'",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) == 3)
            .unwrap_or(false)
        })
        .await;
        assert!(running, "three statements run");
        drop(busy);
        // New clients want the slots at once.
        let mut next = Vec::new();
        for _ in 0..3 {
            let c = p.connect().await?;
            next.push(tokio::spawn(async move {
                for _ in 0..20 {
                    c.simple_query("select 1").await?;
                }
                Ok::<_, tokio_postgres::Error>(())
            }));
        }
        for t in next {
            t.await??;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let (max, n) = sampled.await?;
    assert!(n > 10, "sampled {n} times");
    assert!(
        max <= 3,
        "PostgreSQL saw {max} backends of the pooler, limit 3"
    );
    p.shutdown().await?;
    Ok(())
}

/// The `sluice_pooler_client_memory_bytes` gauge.
async fn client_memory(p: &Pooler) -> Result<u64> {
    let (_, m) = p.admin_get("/metrics").await?;
    m.lines()
        .find_map(|l| l.strip_prefix("sluice_pooler_client_memory_bytes "))
        .context("client_memory_bytes gauge")?
        .trim()
        .parse()
        .context("gauge value")
}

/// Issue 15 item 7: what clients make the pooler hold, long messages arriving and
/// prepared statements, is bounded for the whole process; the client that would go over
/// gets 53200 and the others are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_memory_is_bounded_process_wide() -> Result<()> {
    const MIB: usize = 1024 * 1024;
    let pg = postgres(20).await?;
    let mut p = start(
        &pg,
        &format!(
            "connection_limit = 2\npool_mode = \"transaction\"\nmax_client_memory = {}",
            8 * MIB
        ),
    )
    .await?;
    let good = p.connect().await?;
    // Three clients each send most of a 3 MiB query: two fit, the third does not.
    let sql = format!("select 'long'{}", " ".repeat(3 * MIB));
    let whole = query(&sql);
    // The bound is taken when the header arrives: the rest waits in the socket.
    let (head, tail) = whole.split_at(64 * 1024);
    let mut senders = Vec::new();
    for _ in 0..3 {
        let mut s = raw_login(p.addr, APP_USER.1).await?;
        s.write_all(head).await?;
        senders.push(s);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, code, m) = expect_error(&mut senders[2]).await?;
    assert_eq!(code, "53200", "{m}");
    assert!(m.contains("max_client_memory (8388608 bytes)"), "{m}");
    assert!(expect_closed(&mut senders[2]).await);
    assert!(client_memory(&p).await? >= 6 * MIB as u64);
    let v: i32 = good.query_one("select 7", &[]).await?.get(0);
    assert_eq!(v, 7, "other clients are unaffected");
    for s in &mut senders[..2] {
        s.write_all(tail).await?;
        let (got, done) = read_until(s, Duration::from_secs(10), |t, _| t == b'Z').await;
        ensure!(done, "no answer: {got:?}");
        assert!(got.iter().any(|(t, _)| *t == b'D'), "{got:?}");
    }
    // Given back once the messages have passed.
    assert!(
        eventually(10, || async {
            client_memory(&p).await.is_ok_and(|m| m < 64 * 1024)
        })
        .await,
        "client memory is given back (short statements of the other client stay)"
    );

    // Prepared statements count too: 1 MiB statements, until the bound.
    let mut s = raw_login(p.addr, APP_USER.1).await?;
    let mut refused = None;
    for i in 0..12 {
        let sql = format!("select {i}{}", " ".repeat(MIB));
        s.write_all(&parse(&format!("s{i}"), &sql)).await?;
        s.write_all(&sync()).await?;
        let (got, done) = read_until(&mut s, Duration::from_secs(10), |t, _| {
            t == b'Z' || t == b'E'
        })
        .await;
        ensure!(done, "statement {i}: {got:?}");
        if let Some((_, body)) = got.iter().find(|(t, _)| *t == b'E') {
            refused = Some((i, fields(body)));
            break;
        }
    }
    let (i, (_, code, m)) = refused.context("a statement past the bound is refused")?;
    assert!((6..=8).contains(&i), "refused at statement {i}");
    assert_eq!(code, "53200");
    assert!(m.contains("prepared statements"), "{m}");
    assert!(
        eventually(10, || async {
            client_memory(&p).await.is_ok_and(|m| m < 64 * 1024)
        })
        .await,
        "the refused client's statements are given back"
    );
    let v: i32 = good.query_one("select 8", &[]).await?.get(0);
    assert_eq!(v, 8);
    p.shutdown().await?;
    Ok(())
}

/// Issue 15 item 7: database names that do not exist leave no pool and no metric series.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_databases_leave_no_pools_or_series() -> Result<()> {
    let pg = postgres(20).await?;
    let mut p = start(&pg, "connection_limit = 2").await?;
    let (_, before) = p.admin_get("/metrics").await?;
    for i in 0..30 {
        let e = sluice_testkit::connect(&p.conn_str(APP_USER.0, APP_USER.1, &format!("bogus{i}")))
            .await
            .expect_err("no such database");
        assert!(format!("{e:#}").contains("does not exist"), "{e:#}");
        // Scraped while the attempt may still hold its pool entry.
        p.admin_get("/metrics").await?;
    }
    let (_, after) = p.admin_get("/metrics").await?;
    assert!(!after.contains("bogus"), "{after}");
    assert!(after.len() < before.len() + 1024, "/metrics grew");
    let status = p.status().await?;
    assert!(!status.to_string().contains("bogus"), "{status}");
    p.shutdown().await?;
    Ok(())
}

/// Issue 16: a pooler that requires admission opens no server connection, and is not
/// ready, until the operator admits it with the token made from its nonce.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_process_that_requires_admission_waits_for_it() -> Result<()> {
    let pg = postgres(20).await?;
    let su = sluice_testkit::connect(&pg.superuser_conn_str()).await?;
    let mut p = start(
        &pg,
        "connection_limit = 3\npool_timeout = \"500ms\"\nrequire_admission = true",
    )
    .await?;
    assert_eq!(
        p.admin_get("/readyz").await?,
        (503, "not admitted".to_string())
    );
    let status = p.status().await?;
    assert_eq!(status["admitted"], false);
    let nonce = status["admission_nonce"]
        .as_str()
        .context("nonce")?
        .to_string();
    // Clients wait, and get the pooler's pool_timeout; PostgreSQL sees nothing.
    let code = match sluice_testkit::connect(&p.app_conn_str()).await {
        Err(e) => e
            .downcast_ref::<tokio_postgres::Error>()
            .and_then(|e| e.code().cloned()),
        Ok(c) => c
            .simple_query("select 1")
            .await
            .err()
            .and_then(|e| e.code().cloned()),
    };
    assert_eq!(code, Some(SqlState::TOO_MANY_CONNECTIONS));
    assert_eq!(backends(&su).await?, 0);
    // A wrong token (another nonce's) is refused.
    let wrong = sluice_contract::admission_token(APP_USER.1, "another");
    assert_eq!(http(p.admin, "POST", "/admit", &wrong).await?.0, 403);
    assert_eq!(p.admin_get("/readyz").await?.0, 503);
    let token = sluice_contract::admission_token(APP_USER.1, &nonce);
    assert_eq!(
        http(p.admin, "POST", "/admit", &token).await?,
        (200, "admitted".to_string())
    );
    assert_eq!(p.admin_get("/readyz").await?.0, 200);
    assert_eq!(p.status().await?["admitted"], true);
    let c = p.connect().await?;
    let v: i32 = c.query_one("select 5", &[]).await?.get(0);
    assert_eq!(v, 5);
    p.shutdown().await?;
    Ok(())
}

/// Clients looping `select pg_sleep(hold)` through `cs` until `stop`; errors (a server
/// restart) are ignored, the client reconnecting.
fn saturate(
    cs: String,
    clients: usize,
    hold: f64,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u64>> {
    (0..clients)
        .map(|_| {
            let (cs, stop) = (cs.clone(), stop.clone());
            tokio::spawn(async move {
                let mut ok = 0;
                while !stop.load(Ordering::SeqCst) {
                    let Ok(c) = sluice_testkit::connect(&cs).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    while !stop.load(Ordering::SeqCst) {
                        match c.simple_query(&format!("select pg_sleep({hold})")).await {
                            Ok(_) => ok += 1,
                            Err(_) if c.is_closed() => break,
                            Err(_) => {}
                        }
                    }
                }
                ok
            })
        })
        .collect()
}

/// Restarts `pg` with `max_connections` 60, then saturates `p` with 40 clients for 3 s
/// while sampling the backends: (most backends seen, samples, transactions done).
async fn restart_smaller_under_load(
    pg: &mut TempPostgres,
    p: &Pooler,
) -> Result<(i64, usize, u64)> {
    tokio::task::block_in_place(|| pg.restart_with_max_connections(60))?;
    let stop = Arc::new(AtomicBool::new(false));
    let sampling = sampler_every(pg.connect_superuser().await?, stop.clone(), Duration::ZERO);
    let load = saturate(p.app_conn_str(), 40, 0.1, stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    let mut ok = 0;
    for t in load {
        ok += t.await?;
    }
    let (after, samples) = sampling.await?;
    Ok((after, samples, ok))
}

/// Issue 16: PostgreSQL restarted with a smaller `max_connections` (90 → 60) while the
/// pods' limits were computed for 90. The first server connection after the restart
/// asks for `max_connections` before any other opens, and the limit drops in proportion
/// (26 × 48 / 78 = 16) before the operator has seen the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_restarted_smaller_lowers_the_limit_before_connections_open() -> Result<()> {
    let mut pg = postgres(90).await?;
    let mut p = start(
        &pg,
        "connection_limit = 26\nbudget_basis = { max_connections = 90, budget = 78 }",
    )
    .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let sampling = sampler(pg.connect_superuser().await?, stop.clone());
    let load = saturate(p.app_conn_str(), 40, 0.1, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    for t in load {
        ensure!(t.await? > 0, "a client got no transaction through");
    }
    let (before, _) = sampling.await?;
    ensure!(before == 26, "saturated at the limit before: {before}");

    let (after, samples, ok) = restart_smaller_under_load(&mut pg, &p).await?;
    println!(
        "limit 26 for max_connections 90; after a restart with 60: at most {after} backends ({samples} samples), {ok} transactions"
    );
    ensure!(samples > 20, "only {samples} samples");
    ensure!(ok > 0, "transactions go on after the restart");
    ensure!(
        after <= 16,
        "{after} backends after the database shrank (want at most 16)"
    );
    ensure!(
        after >= 12,
        "the pool still works near its lowered limit: {after}"
    );
    p.shutdown().await?;
    Ok(())
}

/// As above, but the restart happens while the pooler holds no server connection (all
/// closed by `idle_timeout`), so no lost connection tells it: every opener checks
/// `max_connections`, and the first one after the restart lowers the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_restarted_smaller_while_the_pool_was_empty_lowers_the_limit() -> Result<()> {
    let mut pg = postgres(90).await?;
    let mut p = start(
        &pg,
        "connection_limit = 26\nbudget_basis = { max_connections = 90, budget = 78 }\n\
         idle_timeout = \"1s\"",
    )
    .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let load = saturate(p.app_conn_str(), 40, 0.1, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    for t in load {
        ensure!(t.await? > 0, "a client got no transaction through");
    }
    let empty = eventually(15, || async {
        p.status()
            .await
            .is_ok_and(|s| s["server_connections"]["open"].as_i64() == Some(0))
    })
    .await;
    ensure!(empty, "idle_timeout closed every server connection");

    let (after, samples, ok) = restart_smaller_under_load(&mut pg, &p).await?;
    println!(
        "restart with 60 while the pool was empty: at most {after} backends ({samples} samples)"
    );
    ensure!(samples > 20, "only {samples} samples");
    ensure!(ok > 0, "transactions go on after the restart");
    ensure!(
        after <= 16,
        "{after} backends after the database shrank (want at most 16)"
    );
    p.shutdown().await?;
    Ok(())
}
