//! The HTTP and WebSocket front door, compatible with what `@neondatabase/serverless`
//! speaks (see `docs/http.md`):
//!
//! - `POST /sql`: one statement, or a batch in one transaction, run on the pool's own
//!   bounded server connections ([`sql`] shapes the request and the JSON, [`exec`]
//!   runs it); the user and password come from the `Neon-Connection-String` header.
//! - a WebSocket upgrade on any path: the PostgreSQL wire protocol in binary messages,
//!   served by the same session code as TCP clients ([`WsIo`]).
//!
//! TLS with the client certificate when `[client_tls]` has one; plain HTTP otherwise.

mod exec;
mod sql;
mod wsio;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::task::TaskTracker;

pub use wsio::WsIo;

use crate::error::{Error, Result};
use crate::params::Params;
use crate::pool::{PoolKey, login_params};
use crate::session::serve_client;
use crate::state::{ClientCount, Shared};
use crate::stream::Stream;

/// Time allowed for a TLS handshake on the HTTP port, and for a request's headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves HTTP on `listener` until `shutdown` resolves, then lets requests and WebSocket
/// sessions in flight finish within `drain_timeout` (sessions close at their next idle
/// point, as TCP clients do).
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: impl Future<Output = ()>) {
    let tasks = TaskTracker::new();
    // Open HTTP connections, idle ones included, are bounded as clients are.
    let connections = Arc::new(Semaphore::new(shared.config().max_client_connections));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    let Ok(permit) = connections.clone().try_acquire_owned() else {
                        tracing::warn!("http: max_client_connections connections open; refusing one");
                        continue;
                    };
                    tasks.spawn(connection(tcp, peer, shared.clone(), tasks.clone(), permit));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    tasks.close();
    let timeout = shared.config().drain_timeout;
    if tokio::time::timeout(timeout, tasks.wait()).await.is_err() {
        tracing::warn!("http: drain_timeout reached with requests or sessions still running");
    }
}

/// What a request knows of its connection.
#[derive(Clone)]
struct Conn {
    shared: Arc<Shared>,
    local: SocketAddr,
    peer: SocketAddr,
    secure: bool,
    tasks: TaskTracker,
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    tasks: TaskTracker,
    _permit: OwnedSemaphorePermit,
) {
    let _ = tcp.set_nodelay(true);
    let Ok(local) = tcp.local_addr() else { return };
    let acceptor = shared.config().client_tls.http_acceptor().cloned();
    let drain = shared.drain_signal();
    let conn = Conn {
        shared,
        local,
        peer,
        secure: acceptor.is_some(),
        tasks,
    };
    match acceptor {
        Some(acceptor) => {
            if let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                serve_http(TokioIo::new(tls), conn, drain).await;
            }
        }
        None => serve_http(TokioIo::new(tcp), conn, drain).await,
    }
}

/// HTTP/1.1 on one connection until it ends; on drain, ends after the request in flight.
async fn serve_http<I>(io: TokioIo<I>, conn: Conn, mut drain: tokio::sync::watch::Receiver<bool>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| handle(req, conn.clone()));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT);
    let served = http.serve_connection(io, service).with_upgrades();
    tokio::pin!(served);
    let res = tokio::select! {
        r = served.as_mut() => r,
        _ = async { drain.wait_for(|d| *d).await.map(|_| ()) } => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(e) = res {
        tracing::debug!(error = %e, "http connection ended");
    }
}

async fn handle(req: Request<Incoming>, conn: Conn) -> Result<Response<Body>, Infallible> {
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    Ok(if upgrade {
        websocket(req, conn)
    } else if req.method() == Method::POST && req.uri().path() == "/sql" {
        sql_request(req, &conn.shared).await
    } else {
        let e = Error::BadRequest("not found: POST /sql, or a WebSocket upgrade".into());
        json_response(StatusCode::NOT_FOUND, &error_body(&e))
    })
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error_body(e: &Error) -> Value {
    if let Error::ServerError(raw) = e {
        // PostgreSQL's own answer (an unknown database, ...), with all its fields.
        return sql::error_json(&crate::protocol::error_fields(raw));
    }
    let ce = e.to_client().unwrap_or_else(|| {
        crate::error::ClientError::error("58000", "the request failed in the pooler")
    });
    sql::client_error_json(&ce)
}

/// Cancels the statement running on a server connection unless disarmed: a request
/// whose client left (its future dropped) must not leave a backend running beyond
/// the slot it gave back.
struct CancelOnDrop(Option<(SocketAddr, crate::protocol::BackendKeyData)>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some((addr, key)) = self.0.take() {
            tokio::spawn(crate::pool::send_cancel(addr, key));
        }
    }
}

/// Counts the request as a client, of the process and of its pool, while it runs.
struct ClientSlot<'a> {
    count: ClientCount<'a>,
    key: PoolKey,
}

impl<'a> ClientSlot<'a> {
    fn take(shared: &'a Shared, key: &PoolKey) -> Result<Self> {
        let slot = Self {
            count: shared.count_client(),
            key: key.clone(),
        };
        shared.pools.limiter().client_delta(key, 1);
        let max = shared.config().max_client_connections;
        if slot.count.n > max {
            return Err(Error::TooManyClients(max));
        }
        if shared.is_draining() {
            return Err(Error::ShuttingDown);
        }
        Ok(slot)
    }
}

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        self.count
            .shared()
            .pools
            .limiter()
            .client_delta(&self.key, -1);
    }
}

async fn sql_request(req: Request<Incoming>, shared: &Shared) -> Response<Body> {
    let start = Instant::now();
    let (status, body, outcome) = match run_sql(req, shared).await {
        Ok(Ok(v)) => (StatusCode::OK, v, "ok"),
        Ok(Err(fields)) => (
            StatusCode::BAD_REQUEST,
            sql::error_json(&fields),
            "sql_error",
        ),
        Err(e) => {
            if !matches!(e, Error::BadRequest(_) | Error::HttpTooLarge { .. }) {
                tracing::info!(error = %e.to_string().escape_debug(), "http request failed");
            }
            (StatusCode::BAD_REQUEST, error_body(&e), e.kind())
        }
    };
    shared.metrics.http_request(outcome, start.elapsed());
    json_response(status, &body)
}

/// Runs one `/sql` request: `Ok(Err(fields))` is PostgreSQL's error for it.
async fn run_sql(
    req: Request<Incoming>,
    shared: &Shared,
) -> Result<std::result::Result<Value, Vec<(u8, String)>>> {
    let cfg = shared.config();
    let http = cfg.http.clone().unwrap_or_default();
    let (parts, body) = req.into_parts();
    // Who it is first: bodies are read only for authenticated clients within
    // max_client_connections.
    let head = sql::parse_head(&parts.headers)?;
    let login = &head.login;
    let secret = cfg.users.get(&login.user);
    if !shared
        .passwords
        .verify(&login.user, secret, &login.password)
        .await?
    {
        return Err(Error::AuthFailed(login.user.clone()));
    }
    let key = PoolKey::new(&login.database, &login.user);
    let _client = ClientSlot::take(shared, &key)?;
    let max_request = http.max_request_bytes();
    let body = axum::body::to_bytes(Body::new(body), max_request)
        .await
        .map_err(|_| Error::HttpTooLarge {
            what: "request body",
            bound: "max_request_bytes",
            max: max_request,
        })?;
    let mut lease = shared.memory.lease();
    lease.resize(body.len(), "an HTTP request")?;
    let req = sql::parse_body(head, &body)?;
    drop(body);
    let (mut conn, waited) = match shared.pools.acquire(&key, &cfg).await {
        Ok(c) => c,
        Err(e) => {
            if matches!(e, Error::PoolTimeout { .. }) {
                shared.metrics.pool_timeouts.inc();
            }
            return Err(e);
        }
    };
    shared.metrics.wait_seconds.observe(waited.as_secs_f64());
    // The database's own parameters: what a client that set none at startup has.
    let defaults = shared
        .pools
        .params(&key)
        .map_or_else(|| login_params(&conn.params), |p| p.tracked.clone());
    // Closed (politely, by the guard) when not known to be clean.
    reset_params(&mut conn, &defaults).await?;
    let labels = crate::metrics::PoolLabels::from(&key);
    shared
        .metrics
        .queries
        .get_or_create(&labels)
        .inc_by(req.statements.len() as u64);
    let mut cancel = CancelOnDrop(Some((conn.addr, conn.key)));
    let ran = exec::run(&mut conn, &req, http.max_response_bytes(), &mut lease).await;
    match ran {
        Ok((outcome, effects)) => {
            cancel.0 = None;
            if effects.dropped_statements {
                conn.prepared.clear();
            }
            if effects.schema_changed {
                shared.schema_changed();
            }
            conn.release(true, &cfg);
            Ok(match outcome {
                exec::Outcome::Failed(fields) => Err(fields),
                exec::Outcome::Done(results) => {
                    let mut json: Vec<Value> =
                        results.iter().map(|r| r.to_json(req.array_mode)).collect();
                    Ok(if req.batch.is_some() {
                        serde_json::json!({ "results": json })
                    } else {
                        json.pop().unwrap_or(Value::Null)
                    })
                }
            })
        }
        // Output may still be coming: the statement is cancelled (the guard) and the
        // connection closed (its guard).
        Err(e) => Err(e),
    }
}

/// Gives the connection the parameters in `want` (another client may have set others).
async fn reset_params(conn: &mut crate::pool::ServerConn, want: &Params) -> Result<()> {
    if want.same_as(&conn.session_params) {
        return Ok(());
    }
    if let Some(sql) = want.sql_to_apply_over(&conn.session_params)
        && !conn.run_quiet(&sql).await?
    {
        return Err(Error::Server("could not reset session parameters".into()));
    }
    conn.session_params = want.clone();
    Ok(())
}

/// Accepts a WebSocket upgrade and hands the upgraded connection to the session code.
fn websocket(mut req: Request<Incoming>, conn: Conn) -> Response<Body> {
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let version_ok = req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    let (Some(key), true) = (key, version_ok) else {
        let e =
            Error::BadRequest("a WebSocket upgrade needs Sec-WebSocket-Key and version 13".into());
        return json_response(StatusCode::BAD_REQUEST, &error_body(&e));
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let shared = conn.shared.clone();
    conn.tasks.spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let max = shared.max_message + 1024;
        // Small buffers: an idle WebSocket costs about what an idle TCP client does.
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0)
            .max_write_buffer_size(max)
            .max_message_size(Some(max))
            .max_frame_size(Some(max));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        // Cancel keys name the PostgreSQL port: a CancelRequest for this session that
        // lands on another replica is forwarded there.
        let pg_port = shared
            .config()
            .listen_addr
            .parse::<SocketAddr>()
            .map_or(conn.local.port(), |a| a.port());
        let local = SocketAddr::new(conn.local.ip(), pg_port);
        let io = WsIo::new(ws, local, conn.peer, conn.secure);
        shared.metrics.websocket_opened();
        serve_client(Stream::WebSocket(Box::new(io)), shared.clone()).await;
        shared.metrics.websocket_closed();
    });
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}
