//! End to end: TLS on both sides, as a team with a managed database runs Sluice.
//!
//! PostgreSQL serves TLS and its `pg_hba.conf` refuses plaintext (as Amazon RDS with
//! `rds.force_ssl`); the pool verifies it (`sslMode: verify-full` with a CA Secret) and
//! serves clients a certificate from a `kubernetes.io/tls` Secret (`clientTLS: require`).
//! psql logs in through the pool's Service by its DNS name with `sslmode=verify-full`,
//! a plaintext login is refused, and a renewed certificate Secret is served to the
//! next client without a restart.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use sluice_e2e::agent::BRIDGE_IP;
use sluice_e2e::fixture::{CLIENT_PASSWORD, Fixture, Options};
use sluice_testkit::tls::{Issued, TestCa, der, served_certificate};
use sluice_testkit::{APP_DB, APP_USER};

const POOL: &str = "orders";

fn tls_secret(name: &str, issued: &Issued) -> Result<Secret> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": issued.cert_pem, "tls.key": issued.key_pem},
    }))?)
}

/// psql through the Service: `host` is its DNS name (verified), `hostaddr` its IP.
async fn psql(ip: &str, dns: &str, extra: &str, sql: &str) -> Result<(bool, String)> {
    let out = tokio::process::Command::new("psql")
        .arg(format!(
            "host={dns} hostaddr={ip} port=6432 user={} dbname={APP_DB} connect_timeout=5 {extra}",
            APP_USER.0
        ))
        .args(["-X", "-At", "-c", sql])
        .env("PGPASSWORD", CLIENT_PASSWORD)
        .output()
        .await?;
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text.trim().to_string()))
}

#[tokio::test]
async fn tls_on_both_sides_through_the_service() -> Result<()> {
    let db_ca = TestCa::new("database CA")?;
    let db_cert = db_ca.issue(&[&BRIDGE_IP.to_string(), "db.internal"])?;
    let mut fx = Fixture::start_with(Options {
        pg_tls: Some((db_cert.cert_pem.clone(), db_cert.key_pem.clone())),
        ..Options::default()
    })
    .await?;
    fx.wait_crd_established().await?;
    fx.create_secrets().await?;
    fx.pool = POOL.into();
    let ns = fx.ns.clone();
    let dns = format!("{POOL}.{ns}.svc");
    let names =
        [POOL.to_string(), format!("{POOL}.{ns}"), dns.clone(), format!("{dns}.cluster.local")];
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let pooler_ca = TestCa::new("pooler CA")?;
    let first = pooler_ca.issue(&names)?;
    let secrets: Api<Secret> = Api::namespaced(fx.client.clone(), &ns);
    let ca_secret = serde_json::from_value(json!({
        "metadata": {"name": "db-ca"}, "stringData": {"ca.crt": db_ca.pem()}
    }))?;
    secrets.create(&PostParams::default(), &ca_secret).await?;
    secrets.create(&PostParams::default(), &tls_secret("pooler-tls", &first)?).await?;

    // The certificate is for the bridge address, which is the pool's database.host.
    fx.create_pool(POOL, 2, json!({"tls": {"sslMode": "verify-full", "caSecret": "db-ca"}}))
        .await?;
    fx.patch_pool(json!({"spec": {"clientTLS": {"mode": "require", "secretName": "pooler-tls"}}}))
        .await?;
    let c = fx.wait_converged(2, Duration::from_secs(120)).await?;
    println!("tls pool converged: limit {} of budget {} in {:.1} s", c.limit, c.available, c.secs);

    let ip = fx.service_host().await?;
    let dir = tempfile::tempdir()?;
    let ca_file = dir.path().join("pooler-ca.crt");
    std::fs::write(&ca_file, pooler_ca.pem())?;
    let verify = format!("sslmode=verify-full sslrootcert={}", ca_file.display());

    // Both hops encrypted: psql verifies the pool by its DNS name, and the server
    // connection the query runs on is TLS (PostgreSQL refuses anything else anyway).
    let (ok, out) =
        psql(&ip, &dns, &verify, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .await?;
    ensure!(ok && out == "t", "psql over TLS: {out}");

    // The wrong name fails verification at the client; plaintext is refused.
    let (ok, out) = psql(&ip, "elsewhere.example", &verify, "SELECT 1").await?;
    ensure!(!ok && out.contains("elsewhere.example"), "{out}");
    let (ok, out) = psql(&ip, &dns, "sslmode=disable", "SELECT 1").await?;
    ensure!(!ok && out.contains("requires TLS"), "{out}");

    // A renewed certificate (cert-manager rewrites the Secret) is served to the next
    // client without a restart.
    let pods_before = fx.pooler_pods().await?;
    ensure!(served_certificate((&ip, 6432), pooler_ca.pem(), &dns).await? == der(&first.cert_pem)?);
    let second = pooler_ca.issue(&names)?;
    secrets
        .patch(
            "pooler-tls",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"stringData": {"tls.crt": second.cert_pem, "tls.key": second.key_pem}}),
            ),
        )
        .await?;
    let want = der(&second.cert_pem)?;
    let start = Instant::now();
    // Each pod renews on its own: ask until both served it (the Service spreads).
    let mut renewed = 0;
    while start.elapsed() < Duration::from_secs(60) && renewed < 6 {
        renewed = if served_certificate((&ip, 6432), pooler_ca.pem(), &dns).await? == want {
            renewed + 1
        } else {
            0
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(renewed >= 6, "the renewed certificate was not served within 60 s");
    println!("renewed certificate served after {:.1} s", start.elapsed().as_secs_f64());
    let (ok, out) = psql(&ip, &dns, &verify, "SELECT 1").await?;
    ensure!(ok && out == "1", "{out}");
    ensure!(fx.pooler_pods().await? == pods_before, "the pods were replaced");
    fx.shutdown().await
}
