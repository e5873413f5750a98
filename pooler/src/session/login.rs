//! Startup and authentication: SSL/GSS probes answered, CancelRequests passed on, the
//! startup packet read, the client authenticated (SCRAM-SHA-256 or md5) and greeted with
//! the server's parameters and its own cancel key. WebSocket clients send their password
//! in the clear (see [`authenticate`]).

use std::sync::Arc;
use std::time::Duration;

use crate::stream::Stream;
use base64::Engine;
use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;

use crate::auth::{ScramServer, ScramVerifier, verify_md5};
use crate::config::{AuthMethod, Config, PoolMode};
use crate::error::{Error, Result};
use crate::params::{self, Params};
use crate::pool::PoolParams;
use crate::pool::{Checkout, PoolKey};
use crate::protocol::{
    Authentication, BackendKeyData, Frame, ParameterStatus, PasswordMessage, ReadyForQuery,
    SaslInitialResponse, SaslResponse, Startup, StartupMessage, TxStatus, split_startup,
};
use crate::state::{CancelSlot, Shared, is_backend_pid};

/// Initial read buffer for startup and authentication (grown to fit a longer message).
/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

pub(super) const LOGIN_BUF: usize = 1024;
/// Bound on authentication-phase messages.
const MAX_AUTH_MESSAGE: usize = 8 * 1024;
/// Time allowed from connect to logged in.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(15);

async fn read_frame(stream: &mut Stream, buf: &mut BytesMut, max: usize) -> Result<Frame> {
    stream
        .read_frame(buf, max)
        .await?
        .ok_or_else(|| Error::Io(std::io::ErrorKind::UnexpectedEof.into()))
}

pub(super) struct Login<'a> {
    pub(super) key: PoolKey,
    pub(super) cancel_key: BackendKeyData,
    pub(super) cancel: CancelSlot,
    pub(super) server: Option<Checkout<'a>>,
    pub(super) params: Params,
}

/// Startup packets, auth, and the greeting. `None` when the connection was only an
/// SSL probe or a CancelRequest.
pub(super) async fn login<'a>(
    stream: &mut Stream,
    buf: &mut BytesMut,
    shared: &'a Shared,
    n: usize,
) -> Result<Option<Login<'a>>> {
    // Startup and authentication are bounded in time; waiting for a server is not.
    let phase = async {
        let tls = shared.config().client_tls.clone();
        if let Some(acceptor) = tls.acceptor()
            && stream.peek_byte().await? == Some(TLS_HANDSHAKE)
        {
            // Direct TLS (PostgreSQL 17's `sslnegotiation=direct`): the handshake comes
            // first, and must name PostgreSQL's ALPN protocol.
            stream
                .accept(acceptor)
                .await
                .map_err(|e| Error::ClientTls(e.to_string()))?;
            if stream.alpn() != Some(crate::tls::ALPN) {
                return Err(Error::ClientTls(
                    "direct TLS without the postgresql ALPN protocol".into(),
                ));
            }
        }
        let msg = loop {
            let body = loop {
                if let Some(b) = split_startup(buf)? {
                    break b;
                }
                if stream.read_buf(buf).await? == 0 {
                    return Ok(None);
                }
            };
            match Startup::parse(body)? {
                request @ (Startup::Ssl | Startup::GssEnc) => {
                    if !buf.is_empty() {
                        // Bytes sent before the handshake must not count as encrypted.
                        return Err(Error::Protocol("data after encryption request".into()));
                    }
                    match tls.acceptor() {
                        Some(acceptor)
                            if matches!(request, Startup::Ssl) && stream.can_start_tls() =>
                        {
                            stream.send(b"S").await?;
                            stream
                                .accept(acceptor)
                                .await
                                .map_err(|e| Error::ClientTls(e.to_string()))?;
                        }
                        _ => stream.send(b"N").await?,
                    }
                }
                Startup::Cancel(c) => {
                    shared.cancel(c, stream.local_addr().ok()).await;
                    return Ok(None);
                }
                Startup::Message(m) => break m,
            }
        };
        if tls.mode == sluice_contract::ClientTlsMode::Require && !stream.is_tls() {
            return Err(Error::TlsRequired);
        }
        if shared.is_draining() {
            return Err(Error::ShuttingDown);
        }
        let cfg = shared.config();
        if n > cfg.max_client_connections {
            return Err(Error::TooManyClients(cfg.max_client_connections));
        }
        if let Some(v) = msg.negotiation() {
            stream.send(&v).await?;
        }
        let StartupMessage { params, .. } = msg;
        let user = params.get("user").cloned().unwrap_or_default();
        let database = params
            .get("database")
            .filter(|d| !d.is_empty())
            .cloned()
            .unwrap_or_else(|| user.clone());
        let wanted = params::from_startup(&params, &cfg.ignore_startup_parameters)
            .map_err(|u| Error::UnsupportedStartupParameter(u.0))?;
        let sasl_final = authenticate(stream, buf, shared, &cfg, &user).await?;
        Ok::<_, Error>(Some((cfg, user, database, wanted, sasl_final)))
    };
    let (cfg, user, database, wanted, sasl_final) =
        match tokio::time::timeout(LOGIN_TIMEOUT, phase).await {
            Ok(r) => match r? {
                Some(v) => v,
                None => return Ok(None),
            },
            Err(_) => return Err(Error::Protocol("login timed out".into())),
        };
    let key = shared
        .pools
        .limiter()
        .intern(PoolKey::new(&database, &user));
    let session = shared.mode == PoolMode::Session;
    // Session mode: the client's own backend from now to its end (its key is the
    // client's, see below), as a direct connection would be.
    let server = if session {
        Some(acquire_while_connected(stream, buf, shared, &key, &cfg).await?)
    } else {
        None
    };
    let server_params = match shared.pools.params(&key) {
        Some(p) => p,
        // First client of this pool: a server connection tells us the parameters (and
        // that the database exists); session mode holds one already.
        None => match &server {
            Some(conn) => Arc::new(PoolParams::new(conn.params.clone())),
            None => {
                let conn = super::acquire(shared, &key, &cfg).await?;
                let p = Arc::new(PoolParams::new(conn.params.clone()));
                conn.release(true, &cfg);
                p
            }
        },
    };
    // The client's parameters: the database's, with what it asked for at startup; it is
    // told its own values, as PostgreSQL would tell it.
    let mut client_params = server_params.tracked.clone();
    for (name, value) in &wanted {
        client_params.set(name, &params::canonical(name, value));
    }
    // Session mode gives the backend's own key: `pg_backend_pid()`, `pg_terminate_backend`
    // and notifications then agree with it, and a CancelRequest reaching any pod goes to
    // the database. The backend serves no other client after this one (see `finish`).
    // (An upstream pooler or proxy may hand out process ids that are not a backend's:
    // then the key is the pooler's own, as in transaction mode.)
    let (cancel_key, cancel) = match &server {
        Some(c) if session && is_backend_pid(c.key.pid) => {
            (c.key, shared.register_backend_cancel(c.key))
        }
        _ => shared.register_cancel(stream.local_addr().ok()),
    };
    // One write for the whole greeting, SCRAM's final message first.
    let mut out = BytesMut::with_capacity(512);
    if let Some(f) = sasl_final {
        out.extend_from_slice(&f);
    }
    out.extend_from_slice(&Authentication::Ok.encode());
    for p in &server_params.list {
        let value = client_params.get(&p.name).unwrap_or(&p.value);
        ParameterStatus::encode_into(&p.name, value, &mut out);
    }
    out.extend_from_slice(&cancel_key.encode());
    out.extend_from_slice(&ReadyForQuery(TxStatus::Idle).encode());
    if let Err(e) = stream.send(&out).await {
        shared.unregister_cancel(cancel_key);
        if let Some(c) = server {
            // Session mode: its key may have reached the client.
            c.release(!session, &cfg);
        }
        return Err(e.into());
    }
    Ok(Some(Login {
        key,
        cancel_key,
        cancel,
        server,
        params: client_params,
    }))
}

/// Authenticates the client; returns SCRAM's final message, which goes out with the
/// greeting (one write less per login).
async fn authenticate(
    stream: &mut Stream,
    buf: &mut BytesMut,
    shared: &Shared,
    cfg: &Config,
    user: &str,
) -> Result<Option<Bytes>> {
    let secret = cfg.users.get(user);
    if stream.is_websocket() {
        // As Neon's proxy does: `@neondatabase/serverless` sends its password right
        // after the startup message, before any request for it, and so can only
        // answer a request for the password in the clear (the WebSocket is the
        // channel to protect: wss, or inside the cluster).
        stream
            .send(&Authentication::CleartextPassword.encode())
            .await?;
        let f = read_frame(stream, buf, MAX_AUTH_MESSAGE).await?;
        let pw = PasswordMessage::decode(&f)?;
        let pw = String::from_utf8(pw.password).map_err(|_| Error::AuthFailed(user.to_string()))?;
        if !shared.passwords.verify(user, secret, &pw).await? {
            return Err(Error::AuthFailed(user.to_string()));
        }
        return Ok(None);
    }
    match cfg.auth_method {
        AuthMethod::ScramSha256 => {
            let sasl = Authentication::Sasl {
                mechanisms: vec!["SCRAM-SHA-256".into()],
            };
            stream.send(&sasl.encode()).await?;
            let f = read_frame(stream, buf, MAX_AUTH_MESSAGE).await?;
            let init = SaslInitialResponse::decode(&f)?;
            if init.mechanism != "SCRAM-SHA-256" {
                return Err(Error::AuthUnsupported(format!(
                    "SASL mechanism {}",
                    init.mechanism
                )));
            }
            // Unknown users go through the same exchange, at the same cost.
            let verifier = secret
                .and_then(|s| s.scram.clone())
                .unwrap_or_else(|| ScramVerifier::for_unknown_user(user));
            let nonce =
                base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 18]>());
            let (server, first) = ScramServer::start(verifier, &init.data, &nonce)?;
            stream
                .send(&Authentication::SaslContinue(Bytes::from(first)).encode())
                .await?;
            let f = read_frame(stream, buf, MAX_AUTH_MESSAGE).await?;
            let resp = SaslResponse::decode(&f)?;
            let fin = server.finish(&resp.data, user)?;
            if secret.is_none() {
                return Err(Error::AuthFailed(user.to_string()));
            }
            return Ok(Some(Authentication::SaslFinal(Bytes::from(fin)).encode()));
        }
        AuthMethod::Md5 => {
            let salt: [u8; 4] = rand::random();
            stream
                .send(&Authentication::Md5Password { salt }.encode())
                .await?;
            let f = read_frame(stream, buf, MAX_AUTH_MESSAGE).await?;
            let pw = PasswordMessage::decode(&f)?;
            let ok = secret.is_some_and(|s| {
                verify_md5(
                    user,
                    s.plain.as_deref(),
                    s.md5.as_deref(),
                    salt,
                    &pw.password,
                )
            });
            if !ok {
                return Err(Error::AuthFailed(user.to_string()));
            }
        }
    }
    Ok(None)
}

/// Session mode's server connection at login, given up if the client leaves while it
/// waits (a client that timed out must not get a backend opened for it). What the
/// client sends meanwhile stays in `buf` for the session (up to [`LOGIN_BUF`]).
///
/// # Errors
/// As [`super::acquire`]; [`Error::ShuttingDown`] once draining; I/O errors of the
/// client, and its end of file.
async fn acquire_while_connected<'a>(
    stream: &mut Stream,
    buf: &mut BytesMut,
    shared: &'a Shared,
    key: &PoolKey,
    cfg: &Config,
) -> Result<Checkout<'a>> {
    // Authentication may have taken a while: a drain begun since would leave this
    // waiter unserved until `pool_timeout`.
    if shared.is_draining() {
        return Err(Error::ShuttingDown);
    }
    let acquire = super::acquire(shared, key, cfg);
    tokio::pin!(acquire);
    loop {
        let room = buf.len() < LOGIN_BUF;
        tokio::select! {
            r = &mut acquire => return r,
            n = stream.read_buf(buf), if room => {
                if n? == 0 {
                    return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
            }
        }
    }
}
