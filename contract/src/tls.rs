//! TLS settings in `pooler.toml`: towards PostgreSQL (`[server.tls]`, libpq's `sslmode`)
//! and towards clients (`[client_tls]`).

use serde::{Deserialize, Serialize};

/// How the pooler (and the operator's discovery) protects its connections to PostgreSQL,
/// as libpq's `sslmode` spells it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// TLS when the server offers it, without verifying the certificate; plaintext
    /// otherwise.
    #[default]
    Prefer,
    /// TLS or nothing, without verifying the certificate.
    Require,
    /// TLS, with the certificate chain verified against the CA (any host name).
    VerifyCa,
    /// TLS, with the chain verified and the certificate valid for the host name.
    VerifyFull,
}

impl SslMode {
    /// The value as libpq spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a server that refuses TLS is refused.
    pub fn requires_tls(self) -> bool {
        !matches!(self, SslMode::Disable | SslMode::Prefer)
    }

    /// Whether the server's certificate chain is verified.
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// `[server.tls]`: TLS from the pooler to PostgreSQL.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    #[serde(default)]
    pub sslmode: SslMode,
    /// PEM file of the CAs to trust (`sslrootcert`); absent: the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// PEM client certificate (`sslcert`), with `key_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    /// PEM private key of `cert_file` (`sslkey`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    /// The name verified (`verify-full`) and sent as SNI; absent: the server's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

/// Whether clients may, or must, use TLS to the pooler.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum ClientTlsMode {
    /// Every SSLRequest is answered `N`.
    #[default]
    Disable,
    /// TLS for clients that ask, plaintext for the others.
    Allow,
    /// Plaintext logins are refused.
    Require,
}

/// `[client_tls]`: TLS from clients to the pooler.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    #[serde(default)]
    pub mode: ClientTlsMode,
    /// PEM certificate chain served to clients (`tls.crt` of a `kubernetes.io/tls`
    /// Secret); re-read when the file changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    /// PEM private key of `cert_file` (`tls.key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
}
