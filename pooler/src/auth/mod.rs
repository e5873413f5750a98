//! Client authentication (server side of SCRAM-SHA-256 and md5) against stored secrets.
//!
//! Secrets are never logged: [`Secret`]'s `Debug` is redacted.

mod md5;
mod password;
mod scram;

pub use md5::{md5_client_response, verify_md5};
pub use password::PasswordCheck;
pub use scram::{ScramServer, ScramVerifier};

/// A user's stored secret: a plain password, a SCRAM verifier or an md5 hash.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    /// The plain password when known (needed for md5 auth).
    pub plain: Option<String>,
    /// `md5<hex>` when given in that form.
    pub md5: Option<String>,
    /// Verifier for SCRAM (derived from the plain password once, at config load).
    pub scram: Option<ScramVerifier>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Secret {
    /// Interprets a users-file entry: a SCRAM verifier, an `md5...` hash or a plain password.
    pub fn from_stored(s: &str) -> Self {
        let s = s.trim_end_matches(['\n', '\r']);
        if let Some(v) = ScramVerifier::parse(s) {
            return Self {
                plain: None,
                md5: None,
                scram: Some(v),
            };
        }
        if s.len() == 35 && s.starts_with("md5") && s[3..].bytes().all(|c| c.is_ascii_hexdigit()) {
            return Self {
                plain: None,
                md5: Some(s.to_string()),
                scram: None,
            };
        }
        Self {
            plain: Some(s.to_string()),
            md5: None,
            scram: Some(ScramVerifier::from_password(s)),
        }
    }
}
