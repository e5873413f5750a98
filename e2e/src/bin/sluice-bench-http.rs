//! `make bench-pooler`'s load generator for the HTTP front door: `clients` concurrent
//! clients run pgbench's `-S` query (`select abalance from pgbench_accounts where aid =
//! $1`, random aid) for `secs` seconds, either as `POST /sql` requests on keep-alive
//! HTTP/1.1 connections (what `neon()` sends) or over TCP through the pooler with a
//! prepared statement (tokio-postgres); prints `requests tps p50_ms p99_ms errors`.
//!
//! Usage: sluice-bench-http http HOST:PORT CONNSTRING CLIENTS SECS
//!        sluice-bench-http tcp  "host=… port=… user=… password=… dbname=…" CLIENTS SECS

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const QUERY: &str = "select abalance from pgbench_accounts where aid = $1";
/// pgbench -s 10.
const ACCOUNTS: u64 = 1_000_000;

/// A small xorshift, so the load generator costs next to nothing.
fn next_aid(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state % ACCOUNTS + 1
}

/// One keep-alive connection's requests until `end`: latencies in µs, and errors.
async fn http_client(
    addr: String,
    conn: String,
    end: Instant,
    seed: u64,
) -> Result<(Vec<u32>, u64)> {
    let mut s = BufReader::new(TcpStream::connect(&addr).await?);
    s.get_ref().set_nodelay(true)?;
    let (mut lat, mut errors, mut rng) = (Vec::new(), 0u64, seed | 1);
    let mut head = Vec::new();
    let mut body = Vec::new();
    while Instant::now() < end {
        let aid = next_aid(&mut rng);
        let json = format!(r#"{{"query":"{QUERY}","params":["{aid}"]}}"#);
        let req = format!(
            "POST /sql HTTP/1.1\r\nHost: {addr}\r\nNeon-Connection-String: {conn}\r\n\
             Neon-Raw-Text-Output: true\r\nNeon-Array-Mode: true\r\n\
             Content-Type: text/plain;charset=UTF-8\r\nContent-Length: {}\r\n\r\n{json}",
            json.len()
        );
        let t = Instant::now();
        s.get_mut().write_all(req.as_bytes()).await?;
        // Status line and headers, then Content-Length bytes.
        head.clear();
        while !head.ends_with(b"\r\n\r\n") {
            let b = s.read_u8().await?;
            head.push(b);
        }
        let text = String::from_utf8_lossy(&head);
        let len: usize = text
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
            })
            .context("no content-length")?
            .parse()?;
        body.resize(len, 0);
        s.read_exact(&mut body).await?;
        if !text.starts_with("HTTP/1.1 200") {
            errors += 1;
        }
        lat.push(t.elapsed().as_micros() as u32);
    }
    Ok((lat, errors))
}

/// One TCP client's queries until `end` (a prepared statement, as pgbench -M prepared).
async fn tcp_client(conn: String, end: Instant, seed: u64) -> Result<(Vec<u32>, u64)> {
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let st = client.prepare(QUERY).await?;
    let (mut lat, mut errors, mut rng) = (Vec::new(), 0u64, seed | 1);
    while Instant::now() < end {
        let aid = next_aid(&mut rng) as i32;
        let t = Instant::now();
        if client.query(&st, &[&aid]).await.is_err() {
            errors += 1;
        }
        lat.push(t.elapsed().as_micros() as u32);
    }
    Ok((lat, errors))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mode, addr, conn, clients, secs) = match args[..] {
        ["http", addr, conn, clients, secs] => ("http", addr, conn, clients, secs),
        ["tcp", conn, clients, secs] => ("tcp", "", conn, clients, secs),
        _ => bail!(
            "usage: sluice-bench-http http HOST:PORT CONNSTRING CLIENTS SECS | tcp CONNSTRING CLIENTS SECS"
        ),
    };
    let (clients, secs): (u64, u64) = (clients.parse()?, secs.parse()?);
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let (addr, conn) = (addr.to_string(), conn.to_string());
            let seed = 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(i + 1);
            tokio::spawn(async move {
                if mode == "http" {
                    http_client(addr, conn, end, seed).await
                } else {
                    tcp_client(conn, end, seed).await
                }
            })
        })
        .collect();
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await??;
        lat.extend(l);
        errors += e;
    }
    let took = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |&us| f64::from(us) / 1000.0)
    };
    println!(
        "{} {:.1} {:.3} {:.3} {errors}",
        lat.len(),
        lat.len() as f64 / took,
        pct(0.5),
        pct(0.99)
    );
    Ok(())
}
