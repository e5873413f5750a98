//! `sluice-e2e-echo`: the tiny HTTP program the platform smoke tests run as pods.
//!
//! Listens on `0.0.0.0:$PORT` (default 8080) and answers:
//! - `/` → the pod name (`$POD_NAME`, else `$HOSTNAME`), newline-terminated;
//! - `/healthz` → `ok`;
//! - `/pid` → its process id (tests check that the process exits);
//! - `/env/<NAME>` → the value of an environment variable (404 when unset);
//! - `/file/<absolute path>` → the contents of a file (404 when unreadable).
//!
//! Exits 0 on SIGTERM (after `$TERM_DELAY_MS` milliseconds, default 0).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let port: u16 = std::env::var("PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(8080);
    let listener = TcpListener::bind(("0.0.0.0", port)).await?;
    eprintln!("echo listening on 0.0.0.0:{port}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            conn = listener.accept() => {
                if let Ok((s, _)) = conn {
                    tokio::spawn(handle(s));
                }
            }
            _ = term.recv() => {
                let delay = std::env::var("TERM_DELAY_MS").ok().and_then(|d| d.parse().ok()).unwrap_or(0);
                eprintln!("SIGTERM: exiting in {delay} ms");
                tokio::time::sleep(Duration::from_millis(delay)).await;
                return Ok(());
            }
        }
    }
}

async fn handle(mut s: TcpStream) {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    while n < buf.len() {
        match s.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(r) => n += r,
        }
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let req = String::from_utf8_lossy(&buf[..n]);
    let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (code, body) = respond(&path);
    let reason = if code == 200 { "OK" } else { "Not Found" };
    let resp = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes()).await;
    let _ = s.shutdown().await;
}

fn respond(path: &str) -> (u16, String) {
    match path {
        "/" => {
            let name = std::env::var("POD_NAME")
                .or_else(|_| std::env::var("HOSTNAME"))
                .unwrap_or_default();
            (200, format!("{name}\n"))
        }
        "/healthz" => (200, "ok\n".into()),
        "/pid" => (200, format!("{}\n", std::process::id())),
        p => {
            if let Some(name) = p.strip_prefix("/env/") {
                return match std::env::var(name) {
                    Ok(v) => (200, v),
                    Err(_) => (404, String::new()),
                };
            }
            if let Some(file) = p.strip_prefix("/file") {
                return match std::fs::read_to_string(file) {
                    Ok(v) => (200, v),
                    Err(_) => (404, String::new()),
                };
            }
            (404, String::new())
        }
    }
}
