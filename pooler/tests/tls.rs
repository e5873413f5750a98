//! TLS on both sides, with real PostgreSQL and real clients.
//!
//! Towards the database: a PostgreSQL serving TLS whose `pg_hba.conf` refuses plaintext
//! (as Amazon RDS with `rds.force_ssl`), with certificates made here: `verify-full`
//! succeeds, a wrong host name or an unknown CA fails with a message naming the host and
//! the reason, `require` works without a CA, `verify-ca` ignores the name.
//!
//! Towards clients: tokio-postgres with rustls and psql with `sslmode=verify-full` log
//! in through the pooler; a plaintext login to a `require` pooler is refused; a rotated
//! certificate is served to the next client without a restart; direct TLS (PostgreSQL
//! 17's `sslnegotiation=direct`, ALPN `postgresql`) works; the HTTP front door serves
//! HTTPS with the same certificate.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{config_text, start_with_text};
use rustls::pki_types::ServerName;
use sluice_testkit::tls::{TestCa, client_config, der, served_certificate};
use sluice_testkit::{APP_DB, APP_USER, TempPostgres};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Logs in with tokio-postgres; `Err` carries the server's (or pooler's) error.
async fn connect_tls(
    conn: &str,
    ca_pem: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(client_config(ca_pem, None).unwrap());
    let (client, connection) = tokio_postgres::connect(conn, tls).await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn connect_plain(conn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

fn db_error(e: &tokio_postgres::Error) -> (String, String) {
    match e.as_db_error() {
        Some(d) => (d.code().code().to_string(), d.message().to_string()),
        None => ("-".into(), e.to_string()),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> Result<String> {
    let p = dir.join(name);
    std::fs::write(&p, text)?;
    Ok(p.display().to_string())
}

#[tokio::test]
async fn server_tls_verifies_as_sslmode_says_and_names_host_and_reason() -> Result<()> {
    let ca = TestCa::new("database CA")?;
    let other_ca = TestCa::new("some other CA")?;
    let leaf = ca.issue(&["db.internal", "127.0.0.1"])?;
    let pg = TempPostgres::builder()
        .tls_only(&leaf.cert_pem, &leaf.key_pem)
        .start()?;
    let dir = tempfile::tempdir()?;
    let ca_file = write(dir.path(), "ca.crt", ca.pem())?;
    let other_file = write(dir.path(), "other.crt", other_ca.pem())?;

    let pooler_with = |tls: String| {
        let text = format!(
            "{}[server.tls]\n{tls}\n",
            config_text(&pg, "connection_limit = 4")
        );
        async move { start_with_text(&text).await }
    };
    let login = |p: &common::Pooler| {
        let conn = p.app_conn_str();
        async move {
            let c = connect_plain(&conn).await?;
            let row = c
                .query_one(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await?;
            Ok::<bool, tokio_postgres::Error>(row.get(0))
        }
    };

    // verify-full: the certificate is for 127.0.0.1 (the host) and db.internal.
    for tls in [
        format!("sslmode = \"verify-full\"\nca_file = \"{ca_file}\""),
        format!(
            "sslmode = \"verify-full\"\nca_file = \"{ca_file}\"\nserver_name = \"db.internal\""
        ),
        // require: encrypted, nothing verified, no CA needed.
        "sslmode = \"require\"".to_string(),
        // prefer (the default): the server offers TLS, so it is used.
        String::new(),
        // verify-ca: the chain is checked, the name is not.
        format!(
            "sslmode = \"verify-ca\"\nca_file = \"{ca_file}\"\nserver_name = \"elsewhere.example\""
        ),
    ] {
        let mut p = pooler_with(tls.clone()).await?;
        let ssl = login(&p)
            .await
            .map_err(|e| anyhow::anyhow!("{tls}: {e:?}"))?;
        ensure!(ssl, "{tls}: the server connection is not encrypted");
        p.shutdown().await?;
    }

    // Failures reach the client as 08006 naming the host and the reason.
    let host = format!("127.0.0.1:{}", pg.port());
    for (tls, reason) in [
        (
            format!(
                "sslmode = \"verify-full\"\nca_file = \"{ca_file}\"\nserver_name = \"wrong.example\""
            ),
            "wrong.example",
        ),
        (
            format!("sslmode = \"verify-full\"\nca_file = \"{other_file}\""),
            "not signed by a CA in ca_file",
        ),
    ] {
        let mut p = pooler_with(tls.clone()).await?;
        let e = login(&p).await.err().context("verification should fail")?;
        let (code, message) = db_error(&e);
        eprintln!("{tls}\n  -> {code} {message}");
        ensure!(code == "08006", "{tls}: {code} {message}");
        ensure!(
            message.contains(&host) && message.contains(reason) && message.contains("verify-full"),
            "{tls}: the message should name {host} and {reason}: {message}"
        );
        p.shutdown().await?;
    }

    // sslmode=disable: PostgreSQL's own refusal reaches the client as it is.
    let mut p = pooler_with("sslmode = \"disable\"".into()).await?;
    let e = login(&p)
        .await
        .err()
        .context("plaintext should be refused")?;
    let (code, message) = db_error(&e);
    ensure!(
        code == "28000" && message.contains("no encryption"),
        "{code} {message}"
    );
    p.shutdown().await?;

    // A server without TLS, and sslmode=require: refused by the pooler, clearly.
    let plain = TempPostgres::start_default()?;
    let text = format!(
        "{}[server.tls]\nsslmode = \"require\"\n",
        config_text(&plain, "connection_limit = 2")
    );
    let mut p = start_with_text(&text).await?;
    let e = login(&p)
        .await
        .err()
        .context("require without server TLS")?;
    let (code, message) = db_error(&e);
    ensure!(
        code == "08006" && message.contains("does not accept TLS"),
        "{code} {message}"
    );
    p.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn clients_log_in_over_tls_and_plaintext_is_refused_when_required() -> Result<()> {
    let pg = TempPostgres::start_default()?;
    let ca = TestCa::new("pooler CA")?;
    let first = ca.issue(&["localhost", "127.0.0.1"])?;
    let dir = tempfile::tempdir()?;
    let cert = write(dir.path(), "tls.crt", &first.cert_pem)?;
    let key = write(dir.path(), "tls.key", &first.key_pem)?;
    let ca_file = write(dir.path(), "ca.crt", ca.pem())?;
    let text = format!(
        "{}[client_tls]\nmode = \"require\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n",
        config_text(&pg, "connection_limit = 4")
    );
    let mut p = start_with_text(&text).await?;
    let port = p.addr.port();
    let (user, password) = APP_USER;

    // tokio-postgres with rustls, verifying the name.
    let conn = format!(
        "host=localhost port={port} user={user} password={password} dbname={APP_DB} sslmode=require"
    );
    let c = connect_tls(&conn, ca.pem())
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let n: i32 = c.query_one("SELECT 41 + 1", &[]).await?.get(0);
    ensure!(n == 42);
    drop(c);

    // psql, sslmode=verify-full.
    let out = tokio::process::Command::new("psql")
        .arg(format!(
            "host=localhost port={port} user={user} dbname={APP_DB} sslmode=verify-full sslrootcert={ca_file}"
        ))
        .args(["-X", "-At", "-c", "SELECT 'over tls'"])
        .env("PGPASSWORD", password)
        .output()
        .await?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "over tls",
        "psql: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Plaintext is refused with a clear error, from tokio-postgres and psql.
    let e = connect_plain(&p.app_conn_str())
        .await
        .err()
        .context("plaintext login accepted")?;
    let (code, message) = db_error(&e);
    ensure!(
        code == "28000" && message.contains("requires TLS"),
        "{code} {message}"
    );
    let out = tokio::process::Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={port} user={user} dbname={APP_DB} sslmode=disable"
        ))
        .args(["-X", "-At", "-c", "SELECT 1"])
        .env("PGPASSWORD", password)
        .output()
        .await?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("requires TLS"),
        "psql: {err}"
    );

    // A rotated certificate (a Secret volume swaps the files) is served to the next
    // client, without a restart.
    ensure!(
        served_certificate(("127.0.0.1", port), ca.pem(), "localhost").await?
            == der(&first.cert_pem)?
    );
    let second = ca.issue(&["localhost", "127.0.0.1"])?;
    write(dir.path(), "tls.key.new", &second.key_pem)?;
    write(dir.path(), "tls.crt.new", &second.cert_pem)?;
    std::fs::rename(dir.path().join("tls.key.new"), &key)?;
    std::fs::rename(dir.path().join("tls.crt.new"), &cert)?;
    let want = der(&second.cert_pem)?;
    let mut served = Vec::new();
    for _ in 0..40 {
        served = served_certificate(("127.0.0.1", port), ca.pem(), "localhost").await?;
        if served == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(served == want, "the rotated certificate was not served");
    let c = connect_tls(&conn, ca.pem())
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    c.simple_query("SELECT 1").await?;
    drop(c);

    // Direct TLS, as PostgreSQL 17 clients send it: the handshake first, ALPN
    // `postgresql`, then the startup message inside TLS.
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(client_config(ca.pem(), Some(b"postgresql"))?));
    let mut tls = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    ensure!(tls.get_ref().1.alpn_protocol() == Some(&b"postgresql"[..]));
    tls.write_all(&common::wire::startup(&[
        ("user", user),
        ("database", APP_DB),
    ]))
    .await?;
    let mut tag = [0u8; 1];
    tls.read_exact(&mut tag).await?;
    ensure!(
        tag[0] == b'R',
        "direct TLS login got {:?} instead of an authentication request",
        tag[0] as char
    );

    // Direct TLS without the ALPN protocol is refused.
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(ca.pem(), None)?));
    let mut tls = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let _ = tls
        .write_all(&common::wire::startup(&[
            ("user", user),
            ("database", APP_DB),
        ]))
        .await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await?;
    ensure!(
        read.is_err() || rest.is_empty(),
        "direct TLS without ALPN was served: {rest:?}"
    );
    p.shutdown().await?;

    // mode = "allow": both plaintext and TLS.
    let text = text.replace("mode = \"require\"", "mode = \"allow\"");
    let mut p = start_with_text(&text).await?;
    connect_plain(&p.app_conn_str())
        .await?
        .simple_query("SELECT 1")
        .await?;
    let conn = conn.replace(&format!("port={port}"), &format!("port={}", p.addr.port()));
    connect_tls(&conn, ca.pem())
        .await?
        .simple_query("SELECT 1")
        .await?;
    p.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn the_http_front_door_serves_https_with_the_client_certificate() -> Result<()> {
    let pg = tokio::task::spawn_blocking(|| TempPostgres::builder().start()).await??;
    let ca = TestCa::new("pooler CA")?;
    let cert = ca.issue(&["localhost", "127.0.0.1"])?;
    let dir = tempfile::tempdir()?;
    let (c, k) = (
        write(dir.path(), "tls.crt", &cert.cert_pem)?,
        write(dir.path(), "tls.key", &cert.key_pem)?,
    );
    let text = format!(
        "{}[client_tls]\nmode = \"allow\"\ncert_file = \"{c}\"\nkey_file = \"{k}\"\n\
         [http]\nlisten_addr = \"127.0.0.1:0\"\n",
        config_text(&pg, "connection_limit = 2")
    );
    let mut p = start_with_text(&text).await?;
    let http = p.http.context("http on")?;
    let body = r#"{"query":"select 41 + 1 as n","params":[]}"#;
    let request = format!(
        "POST /sql HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Neon-Connection-String: postgresql://{}:{}@localhost/{APP_DB}\r\n\
         Neon-Array-Mode: true\r\nContent-Length: {}\r\n\r\n{body}",
        APP_USER.0,
        APP_USER.1,
        body.len()
    );
    // HTTPS, verified against the CA, with ALPN http/1.1 as fetch() offers it.
    let tcp = TcpStream::connect(http).await?;
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(client_config(ca.pem(), Some(b"http/1.1"))?));
    let mut tls = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    tls.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer);
    ensure!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    ensure!(answer.contains(r#""rows":[["42"]]"#), "{answer}");
    // Plain HTTP to the TLS port gets no answer.
    let mut tcp = TcpStream::connect(http).await?;
    tcp.write_all(request.as_bytes()).await?;
    let mut plain = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut plain)).await;
    ensure!(
        !String::from_utf8_lossy(&plain).contains("200 OK"),
        "plain HTTP was served"
    );
    p.shutdown().await
}
