//! The crate's one error type, and the single path by which errors reach clients.

use std::io;

/// Everything that can go wrong inside the pooler.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket read or write failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The peer violated the wire protocol (bad length, unknown message, ...).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A startup packet length below 8 or above 10 000 bytes: the connection is closed
    /// without a word, as PostgreSQL does.
    #[error("invalid length of startup packet ({0} bytes)")]
    BadStartupLength(usize),
    /// A message was longer than the configured bound.
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The startup packet asked for a parameter the pooler cannot carry between server
    /// connections (see `params.rs`; `ignore_startup_parameters` drops it instead).
    #[error("unsupported startup parameter: {0}")]
    UnsupportedStartupParameter(String),
    /// Client authentication failed.
    #[error("password authentication failed for user \"{0}\"")]
    AuthFailed(String),
    /// The client asked for an authentication feature we do not offer.
    #[error("unsupported authentication: {0}")]
    AuthUnsupported(String),
    /// Logging in to PostgreSQL failed; the message is PostgreSQL's own.
    #[error("server login failed: {0}")]
    ServerLogin(String),
    /// PostgreSQL sent an ErrorResponse we must pass on as is (raw frame).
    #[error("server error response")]
    ServerError(bytes::Bytes),
    /// No server connection became free within `pool_timeout`.
    #[error(
        "no server connection free within pool_timeout ({timeout_ms} ms, connection_limit {limit})"
    )]
    PoolTimeout { timeout_ms: u128, limit: usize },
    /// The process-wide bound on client-held memory (`max_client_memory`), or one
    /// client's share of it, is reached.
    #[error("out of memory: {what} would exceed the pooler's {bound} ({limit} bytes)")]
    OutOfMemory {
        what: &'static str,
        bound: &'static str,
        limit: usize,
    },
    /// `max_client_connections` reached.
    #[error("too many client connections (max_client_connections = {0})")]
    TooManyClients(usize),
    /// The pooler is draining.
    #[error("pooler shutting down")]
    ShuttingDown,
    /// Configuration could not be read or is invalid.
    #[error("config: {0}")]
    Config(String),
    /// A server connection broke or misbehaved.
    #[error("server connection: {0}")]
    Server(String),
    /// TLS to PostgreSQL failed or was refused where `sslmode` requires it; names the
    /// host and the reason (an unknown CA, a certificate for another name, ...).
    #[error("TLS to the database server {0}")]
    ServerTls(String),
    /// A client's TLS handshake failed (nothing can be said to it then).
    #[error("client TLS: {0}")]
    ClientTls(String),
    /// A plaintext login to a pool whose `client_tls` mode is `require`.
    #[error("this pooler requires TLS: connect with sslmode=require or stronger")]
    TlsRequired,
    /// Too many cleartext password checks are waiting (a flood of logins).
    #[error("too many logins in progress; retry")]
    LoginsBusy,
    /// An HTTP request the front door cannot run (missing header, bad JSON, ...).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// An HTTP request body beyond `max_request_bytes`, or a response's rows beyond
    /// `max_response_bytes`.
    #[error("the {what} exceeds {bound} ({max} bytes)")]
    HttpTooLarge {
        what: &'static str,
        bound: &'static str,
        max: usize,
    },
    /// The server closed the connection right after sending its own ErrorResponse
    /// (e.g. FATAL on `pg_terminate_backend`), which the client already has.
    #[error("server ended the session: {0}")]
    ServerEnded(String),
}

impl Error {
    /// The `kind` label of `sluice_pooler_errors_total` for a session ended by this error.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Io(_) => "io",
            Error::Protocol(_)
            | Error::TooLarge { .. }
            | Error::BadStartupLength(_)
            | Error::UnsupportedStartupParameter(_) => "protocol",
            Error::BadRequest(_) => "bad_request",
            Error::HttpTooLarge { .. } => "too_large",
            Error::AuthFailed(_) | Error::AuthUnsupported(_) | Error::TlsRequired => "auth",
            Error::ClientTls(_) => "tls",
            Error::PoolTimeout { .. } => "pool_timeout",
            Error::TooManyClients(_) | Error::LoginsBusy => "too_many_clients",
            Error::OutOfMemory { .. } => "memory",
            Error::ShuttingDown => "shutdown",
            Error::ServerError(_)
            | Error::ServerLogin(_)
            | Error::Server(_)
            | Error::ServerEnded(_)
            | Error::ServerTls(_) => "server",
            Error::Config(_) => "config",
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a client is told about an error: severity, SQLSTATE and message.
///
/// This is the only place that turns internal errors into client-visible text, so
/// internals (addresses, io details, server credentials) never leak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    pub severity: &'static str,
    pub code: &'static str,
    pub message: String,
}

impl ClientError {
    /// A FATAL error with the given SQLSTATE and message.
    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            severity: "FATAL",
            code,
            message: message.into(),
        }
    }

    /// An ERROR (the request fails; nothing ends) with the given SQLSTATE and message.
    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            severity: "ERROR",
            code,
            message: message.into(),
        }
    }
}

impl Error {
    /// The client-facing view of this error; `None` when the client should get the
    /// server's own ErrorResponse ([`Error::ServerError`]) or no message at all (i/o).
    pub fn to_client(&self) -> Option<ClientError> {
        let e = match self {
            Error::Io(_)
            | Error::ClientTls(_)
            | Error::ServerError(_)
            | Error::ServerEnded(_)
            | Error::BadStartupLength(_) => return None,
            Error::Protocol(m) => ClientError::fatal("08P01", format!("protocol violation: {m}")),
            Error::TooLarge { .. } | Error::UnsupportedStartupParameter(_) => {
                ClientError::fatal("08P01", self.to_string())
            }
            Error::AuthFailed(_) => ClientError::fatal("28P01", self.to_string()),
            Error::BadRequest(m) => ClientError::error("08P01", m.clone()),
            Error::HttpTooLarge { .. } => ClientError::error("54000", self.to_string()),
            Error::AuthUnsupported(m) => {
                ClientError::fatal("28000", format!("unsupported authentication: {m}"))
            }
            Error::PoolTimeout { .. } | Error::TooManyClients(_) | Error::LoginsBusy => {
                ClientError::fatal("53300", self.to_string())
            }
            Error::OutOfMemory { .. } => ClientError::fatal("53200", self.to_string()),
            Error::ShuttingDown => ClientError::fatal("57P01", "pooler shutting down"),
            Error::TlsRequired => ClientError::fatal("28000", self.to_string()),
            // The host and the verification failure are what the user must fix.
            Error::ServerTls(m) => ClientError::fatal(
                "08006",
                format!("the pooler could not reach the database server: TLS to {m}"),
            ),
            Error::ServerLogin(_) | Error::Server(_) | Error::Config(_) => {
                ClientError::fatal("08006", "the pooler could not reach the database server")
            }
        };
        Some(e)
    }
}
