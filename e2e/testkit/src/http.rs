//! The one small HTTP client of the tests: HTTP/1.0 requests to the admin endpoints of the
//! pooler (`/status`, `/metrics`, `/readyz`, `/admit`) and the operator, and to the
//! pooler's HTTP front door (`POST /sql` with its headers).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bound on one request, connect to last byte.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `method path` with `body` to `addr` (`host:port`); returns the status code and
/// the body of the answer.
///
/// # Errors
/// When the connection fails, the answer is not HTTP, or it takes over 5 s.
pub async fn request(addr: &str, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
    request_with(addr, method, path, &[], body, TIMEOUT).await
}

/// As [`request`], with extra `headers` and a bound of `timeout`.
///
/// # Errors
/// As [`request`].
pub async fn request_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    timeout: Duration,
) -> Result<(u16, String)> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
        s.write_all(
            format!(
                "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        status_and_body(&buf)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .with_context(|| format!("{method} {addr}{path} timed out"))?
}

/// `GET path`: the status code and body.
///
/// # Errors
/// As [`request`].
pub async fn get(addr: &str, path: &str) -> Result<(u16, String)> {
    request(addr, "GET", path, "").await
}

/// `GET path`: the body of a 200 answer.
///
/// # Errors
/// As [`request`], and when the answer is not 200.
pub async fn get_ok(addr: &str, path: &str) -> Result<String> {
    let (code, body) = get(addr, path).await?;
    if code != 200 {
        bail!("GET {addr}{path}: status {code}");
    }
    Ok(body)
}

/// `GET path` over HTTPS to `addr` (`host:port`), verifying the server as `name` with
/// the PEM CAs `ca_pem`, with extra `headers`: the status code and body.
///
/// # Errors
/// When the handshake or the exchange fails, or it takes over 5 s.
pub async fn https_get(
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    ca_pem: &str,
    name: &str,
) -> Result<(u16, String)> {
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let cfg = std::sync::Arc::new(crate::tls::client_config(ca_pem, None)?);
        let server = rustls::pki_types::ServerName::try_from(name.to_string())?;
        let mut s = tokio_rustls::TlsConnector::from(cfg).connect(server, tcp).await?;
        let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {name}\r\n{extra}\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        // A server may end TLS without close_notify after the answer.
        let _ = s.read_to_end(&mut buf).await;
        status_and_body(&buf)
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .with_context(|| format!("GET https://{addr}{path} timed out"))?
}

/// The status code and body of a whole HTTP/1 answer.
fn status_and_body(answer: &[u8]) -> Result<(u16, String)> {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text.split_once("\r\n\r\n").context("malformed HTTP answer")?;
    let code: u16 = head.split_whitespace().nth(1).context("no status code")?.parse()?;
    Ok((code, body.to_string()))
}
