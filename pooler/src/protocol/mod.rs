//! PostgreSQL v3 wire protocol: bounded framing and the messages the pooler understands.
//!
//! Spec: <https://www.postgresql.org/docs/current/protocol-message-formats.html>.
//! Everything else is forwarded as raw frames without re-encoding.

mod backend;
mod frame;
mod frontend;
mod scan;

#[cfg(test)]
mod fuzz;

pub use backend::{
    Authentication, BackendKeyData, ErrorFields, ParameterStatus, ReadyForQuery, TxStatus,
    close_complete, error_fields, error_response, parse_complete,
};
pub use frame::{Frame, split_frame, split_startup};
pub use frontend::{
    Bind, CancelRequest, Close, Describe, Parse, PasswordMessage, Query, SaslInitialResponse,
    SaslResponse, Startup, StartupMessage, Target, startup_message, terminate,
};
pub use scan::{Response, ResponseScanner};
