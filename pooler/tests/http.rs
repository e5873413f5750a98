//! The HTTP front door (`POST /sql`) against a real PostgreSQL: answers compared with
//! what PostgreSQL gives directly, batches, errors, bounds, and the connection limit
//! under 200 concurrent requests. (`neon.rs` runs the real driver against it.)

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use anyhow::Result;
use common::*;
use serde_json::{Value, json};
use sluice_testkit::{APP_DB, APP_USER, SUPERUSER};
use tokio_postgres::SimpleQueryMessage;

fn conn_string(user: &str, password: &str) -> String {
    format!("postgresql://{user}:{password}@db.example:5432/{APP_DB}")
}

/// `POST /sql` as the app user with only the connection string and `headers`, given up
/// after `timeout`; (status, body).
async fn post_raw(
    p: &Pooler,
    headers: &[(&str, &str)],
    body: &Value,
    timeout: Duration,
) -> Result<(u16, String)> {
    let conn = conn_string(APP_USER.0, APP_USER.1);
    let mut h = vec![("Neon-Connection-String", conn.as_str())];
    h.extend_from_slice(headers);
    let addr = p.http.expect("http on").to_string();
    sluice_testkit::http::request_with(&addr, "POST", "/sql", &h, &body.to_string(), timeout).await
}

/// `POST /sql` with `body`, as the driver sends it; (status, JSON).
async fn post(p: &Pooler, headers: &[(&str, &str)], body: &Value) -> Result<(u16, Value)> {
    let mut h = vec![
        ("Neon-Raw-Text-Output", "true"),
        ("Neon-Array-Mode", "true"),
    ];
    h.extend_from_slice(headers);
    let (code, text) = post_raw(p, &h, body, Duration::from_secs(60)).await?;
    Ok((code, serde_json::from_str(&text)?))
}

const HTTP: &str = "[http]\nlisten_addr = \"127.0.0.1:0\"\nmax_request_bytes = 100000\nmax_response_bytes = 100000\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_over_http_answers_as_postgresql_does() -> Result<()> {
    let pg = postgres(20).await?;
    let p = start(&pg, &format!("connection_limit = 3\n{HTTP}")).await?;
    let direct = sluice_testkit::connect(&pg.app_conn_str()).await?;

    // Values are PostgreSQL's own text output, with its type OIDs.
    let q = "select 1::int8 as a, '{1,2}'::int[] as b, 'a\"b'::text as c, true as d, \
             1.50::numeric as e, '\\x0102'::bytea as f, null::text as g, \
             '2024-01-02 03:04:05+00'::timestamptz as h, '{\"k\": 1}'::jsonb as i";
    let (code, got) = post(&p, &[], &json!({"query": q, "params": []})).await?;
    assert_eq!(code, 200, "{got}");
    let mut want_row = Vec::new();
    for m in direct.simple_query(q).await? {
        if let SimpleQueryMessage::Row(r) = m {
            want_row = (0..r.len()).map(|i| json!(r.get(i))).collect();
        }
    }
    assert_eq!(got["rows"], json!([want_row]));
    let stmt = direct.prepare(q).await?;
    let oids: Vec<Value> = stmt
        .columns()
        .iter()
        .map(|c| json!(c.type_().oid()))
        .collect();
    let got_oids: Vec<Value> = got["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["dataTypeID"].clone())
        .collect();
    assert_eq!(got_oids, oids);
    assert_eq!(
        (got["command"].clone(), got["rowCount"].clone()),
        (json!("SELECT"), json!(1))
    );

    // Parameters as text, NULL as null; object rows without array mode.
    let body = json!({"query": "select $1::int + 1 as n, $2::text as t", "params": ["41", null]});
    let (code, got) = post_raw(&p, &[], &body, Duration::from_secs(10)).await?;
    assert_eq!(code, 200, "{got}");
    let got: Value = serde_json::from_str(&got)?;
    assert_eq!(got["rows"], json!([{"n": "42", "t": null}]));

    // An error: PostgreSQL's fields, as direct.
    let (code, got) = post(&p, &[], &json!({"query": "select 1/0"})).await?;
    let e = direct.simple_query("select 1/0").await.unwrap_err();
    let db = e.as_db_error().unwrap();
    assert_eq!(code, 400);
    assert_eq!(got["code"], json!(db.code().code()));
    assert_eq!(got["message"], json!(db.message()));
    assert_eq!(got["severity"], json!("ERROR"));

    // A batch: one transaction, with the isolation asked for; an error rolls it back.
    post(&p, &[], &json!({"query": "create table b (x int)"})).await?;
    let batch = json!({"queries": [
        {"query": "insert into b values ($1), ($2)", "params": ["1", "2"]},
        {"query": "select current_setting('transaction_isolation') as i, count(*) from b"},
    ]});
    let (code, got) = post(
        &p,
        &[("Neon-Batch-Isolation-Level", "Serializable")],
        &batch,
    )
    .await?;
    assert_eq!(code, 200, "{got}");
    assert_eq!(got["results"][0]["command"], json!("INSERT"));
    assert_eq!(got["results"][0]["rowCount"], json!(2));
    assert_eq!(got["results"][1]["rows"], json!([["serializable", "2"]]));
    let failing = json!({"queries": [
        {"query": "insert into b values (3)"},
        {"query": "select missing_column from b"},
    ]});
    let (code, got) = post(&p, &[], &failing).await?;
    assert_eq!((code, got["code"].clone()), (400, json!("42703")));
    let (_, got) = post(&p, &[], &json!({"query": "select count(*) from b"})).await?;
    assert_eq!(
        got["rows"],
        json!([["2"]]),
        "the failed batch was rolled back"
    );

    // A statement left open does not leak: the connection is idle for the next one.
    // (Requests run one after another here, so on the one connection.)
    post(
        &p,
        &[],
        &json!({"query": "begin isolation level serializable"}),
    )
    .await?;
    let (_, got) = post(
        &p,
        &[],
        &json!({"query": "select current_setting('transaction_isolation')"}),
    )
    .await?;
    assert_eq!(
        got["rows"],
        json!([["read committed"]]),
        "a transaction stayed open: {got}"
    );

    // A TCP client's SET does not reach HTTP requests on the same connection.
    let c = p.connect().await?;
    c.batch_execute("set datestyle = 'German'").await?;
    drop(c);
    let (_, got) = post(
        &p,
        &[],
        &json!({"query": "select '2024-01-02'::date::text as d"}),
    )
    .await?;
    assert_eq!(got["rows"], json!([["2024-01-02"]]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_clear_error_and_lose_nothing() -> Result<()> {
    let pg = postgres(20).await?;
    let p = start(&pg, &format!("connection_limit = 2\n{HTTP}")).await?;
    let addr = p.http.unwrap().to_string();
    let ask = |headers: Vec<(&'static str, String)>, body: String| {
        let addr = addr.clone();
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let (code, text) = sluice_testkit::http::request_with(
                &addr,
                "POST",
                "/sql",
                &h,
                &body,
                Duration::from_secs(10),
            )
            .await?;
            anyhow::Ok((code, serde_json::from_str::<Value>(&text)?))
        }
    };
    let conn = |u: &str, pw: &str| vec![("Neon-Connection-String", conn_string(u, pw))];
    let q = json!({"query": "select 1"}).to_string();
    // Wrong password, unknown user: 28P01, the same message.
    let (code, got) = ask(conn(APP_USER.0, "wrong"), q.clone()).await?;
    assert_eq!((code, got["code"].clone()), (400, json!("28P01")));
    let (_, ghost) = ask(conn("ghost", "x"), q.clone()).await?;
    assert_eq!(ghost["code"], json!("28P01"));
    // No connection string, bad JSON.
    let (code, got) = ask(vec![], q.clone()).await?;
    assert_eq!((code, got["code"].clone()), (400, json!("08P01")), "{got}");
    let (_, got) = ask(conn(APP_USER.0, APP_USER.1), "{".into()).await?;
    assert_eq!(got["code"], json!("08P01"));
    // Over the request and response bounds: 54000, and the pool still serves.
    let big = json!({"query": format!("select '{}'", "x".repeat(200_000))}).to_string();
    let (_, got) = ask(conn(APP_USER.0, APP_USER.1), big).await?;
    assert_eq!(got["code"], json!("54000"), "{got}");
    let huge = json!({"query": "select repeat('x', 1000) from generate_series(1, 1000)"});
    let (_, got) = ask(conn(APP_USER.0, APP_USER.1), huge.to_string()).await?;
    assert_eq!(got["code"], json!("54000"), "{got}");
    assert!(
        got["message"]
            .as_str()
            .unwrap()
            .contains("max_response_bytes"),
        "{got}"
    );
    let (code, got) = ask(conn(APP_USER.0, APP_USER.1), q.clone()).await?;
    assert_eq!(
        (code, got["rows"].clone()),
        (200, json!([{"?column?": "1"}]))
    );
    // Neither a bad request nor an oversized answer left a connection beyond the limit.
    let su = sluice_testkit::connect(&pg.conn_str(SUPERUSER.0, SUPERUSER.1, "postgres")).await?;
    assert!(backends(&su).await? <= 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_http_clients_never_exceed_the_connection_limit() -> Result<()> {
    let pg = postgres(40).await?;
    let p = start(
        &pg,
        &format!("connection_limit = 10\npool_timeout = \"2s\"\n{HTTP}"),
    )
    .await?;
    let su = sluice_testkit::connect(&pg.conn_str(SUPERUSER.0, SUPERUSER.1, "postgres")).await?;
    let peak = Arc::new(AtomicI64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = tokio::spawn({
        let (peak, stop) = (peak.clone(), stop.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = backends(&su).await {
                    peak.fetch_max(n, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let p = Arc::new(p);
    let requests: Vec<_> = (0..200)
        .map(|_| {
            let p = p.clone();
            tokio::spawn(
                async move { post(&p, &[], &json!({"query": "select pg_sleep(0.2)"})).await },
            )
        })
        .collect();
    let (mut ok, mut timed_out) = (0, 0);
    for r in requests {
        let (code, body) = r.await??;
        match (code, body["code"].as_str()) {
            (200, _) => ok += 1,
            (400, Some("53300")) => timed_out += 1,
            other => panic!("neither success nor the pool timeout: {other:?} {body}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    sampler.await?;
    let peak = peak.load(Ordering::Relaxed);
    println!(
        "200 HTTP clients, limit 10: {ok} answered, {timed_out} timed out, peak backends {peak}"
    );
    assert!(
        peak <= 10,
        "PostgreSQL saw {peak} connections with a limit of 10"
    );
    assert!(ok >= 10, "only {ok} requests were answered");
    assert_eq!(ok + timed_out, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_leave_no_session_state_behind() -> Result<()> {
    let pg = postgres(20).await?;
    // One server connection: every request and client below shares it.
    let p = start(&pg, &format!("connection_limit = 1\n{HTTP}")).await?;
    let q = |sql: &str| json!({ "query": sql });
    post(
        &p,
        &[],
        &q("select set_config('search_path', 'nowhere', false)"),
    )
    .await?;
    post(&p, &[], &q("select pg_advisory_lock(42)")).await?;
    post(&p, &[], &q("create temp table scratch (x int)")).await?;
    post(&p, &[], &q("prepare mine as select 1")).await?;
    let (_, got) = post(&p, &[], &q("show search_path")).await?;
    assert_eq!(got["rows"], json!([["\"$user\", public"]]));
    let (_, got) = post(&p, &[], &q("select count(*) from pg_prepared_statements")).await?;
    assert_eq!(got["rows"], json!([["0"]]), "{got}");
    let (_, got) = post(&p, &[], &q("select to_regclass('scratch') is null")).await?;
    assert_eq!(got["rows"], json!([["t"]]));
    let direct = sluice_testkit::connect(&pg.app_conn_str()).await?;
    let free: bool = direct
        .query_one("select pg_try_advisory_lock(42)", &[])
        .await?
        .get(0);
    assert!(free, "the advisory lock was released");

    // A TCP client's shared statement survives an HTTP DEALLOCATE ALL on its connection.
    let c = p.connect().await?;
    let st = c.prepare("select $1::int + 1").await?;
    assert_eq!(c.query_one(&st, &[&1i32]).await?.get::<_, i32>(0), 2);
    let (code, _) = post(&p, &[], &q("deallocate all")).await?;
    assert_eq!(code, 200);
    assert_eq!(c.query_one(&st, &[&2i32]).await?.get::<_, i32>(0), 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_query_leaves_no_backend_running() -> Result<()> {
    let pg = postgres(20).await?;
    let p = start(&pg, &format!("connection_limit = 2\n{HTTP}")).await?;
    let su = sluice_testkit::connect(&pg.conn_str(SUPERUSER.0, SUPERUSER.1, "postgres")).await?;
    for _ in 0..3 {
        let body = json!({"query": "select pg_sleep(60)"});
        let r = post_raw(&p, &[], &body, Duration::from_millis(500)).await;
        assert!(r.is_err(), "the client gave up");
    }
    let sleeping = || async {
        su.query_one(
            "select count(*) from pg_stat_activity where query like 'select pg_sleep(60)%' and state = 'active'",
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(-1)
    };
    assert!(
        eventually(10, || async { sleeping().await == 0 }).await,
        "statements of clients that left still run"
    );
    assert!(backends(&su).await? <= 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_backend_answers_with_the_servers_own_error() -> Result<()> {
    let pg = postgres(20).await?;
    let p = start(&pg, &format!("connection_limit = 2\n{HTTP}")).await?;
    let su = sluice_testkit::connect(&pg.conn_str(SUPERUSER.0, SUPERUSER.1, "postgres")).await?;
    let p = Arc::new(p);
    let request = tokio::spawn({
        let p = p.clone();
        async move { post(&p, &[], &json!({"query": "select pg_sleep(30)"})).await }
    });
    let terminated = eventually(10, || async {
        su.query_one(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity where query = 'select pg_sleep(30)'",
            &[],
        )
        .await
        .is_ok_and(|r| r.get::<_, i64>(0) == 1)
    })
    .await;
    assert!(terminated);
    let (code, got) = request.await??;
    assert_eq!((code, got["code"].clone()), (400, json!("57P01")), "{got}");
    assert_eq!(got["severity"], json!("FATAL"));
    // The pool goes on with a new connection.
    let (code, _) = post(&p, &[], &json!({"query": "select 1"})).await?;
    assert_eq!(code, 200);
    Ok(())
}
