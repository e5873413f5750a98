//! TLS with rustls: the connector towards PostgreSQL (libpq's `sslmode`, a CA bundle or
//! the system's roots, an optional client certificate, SNI) and the acceptor for
//! clients, whose certificate is re-read when its files change (a rotated Secret is
//! served to the next client without a restart).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sluice_contract::rustls_config;
use sluice_contract::{ClientTls, ClientTlsMode, ServerTls, SslMode};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::error::{Error, Result};

pub use sluice_contract::rustls_config::ALPN;

/// How often the client certificate's files are looked at for a change.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

fn provider() -> Arc<CryptoProvider> {
    rustls_config::provider()
}

fn read(path: &str, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Config(format!("reading {what} {path}: {e}")))
}

/// TLS towards PostgreSQL, built once per config.
#[derive(Clone)]
pub struct ServerTlsConfig {
    pub mode: SslMode,
    /// `None` with `sslmode = disable`.
    connector: Option<TlsConnector>,
    /// Verified (`verify-full`) and sent as SNI.
    name: ServerName<'static>,
    /// Where the trusted CAs come from, for error messages.
    roots: String,
}

impl std::fmt::Debug for ServerTlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTlsConfig")
            .field("mode", &self.mode)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ServerTlsConfig {
    /// Builds the connector for `t` (absent: `prefer`) to `host`.
    ///
    /// # Errors
    /// [`Error::Config`] for an unreadable or empty CA, certificate or key file, a
    /// certificate without its key, or a server name that is not a DNS name or an IP.
    pub fn new(t: Option<&ServerTls>, host: &str) -> Result<Self> {
        let t = t.cloned().unwrap_or_default();
        let name_text = t.server_name.clone().unwrap_or_else(|| host.to_string());
        let name = ServerName::try_from(name_text.clone())
            .map_err(|_| Error::Config(format!("server TLS name {name_text:?} is not valid")))?;
        let roots = t.ca_file.as_ref().map_or_else(
            || "the system's CA certificates".into(),
            |f| format!("ca_file {f}"),
        );
        if t.sslmode == SslMode::Disable {
            return Ok(Self {
                mode: t.sslmode,
                connector: None,
                name,
                roots,
            });
        }
        let ca = t
            .ca_file
            .as_deref()
            .map(|f| read(f, "server.tls.ca_file"))
            .transpose()?;
        let client = match (&t.cert_file, &t.key_file) {
            (Some(c), Some(k)) => Some((
                read(c, "server.tls.cert_file")?,
                read(k, "server.tls.key_file")?,
            )),
            (None, None) => None,
            _ => {
                return Err(Error::Config(
                    "server.tls.cert_file and key_file go together".into(),
                ));
            }
        };
        let material = rustls_config::Material {
            ca_pem: ca.as_deref(),
            client_cert: client.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
            verify_name: None,
        };
        let config = rustls_config::client_config(t.sslmode, &material)
            .map_err(|e| Error::Config(format!("server.tls: {e}")))?;
        Ok(Self {
            mode: t.sslmode,
            connector: Some(TlsConnector::from(Arc::new(config))),
            name,
            roots,
        })
    }

    /// Why a handshake failed, in words a user can act on.
    pub fn explain(&self, e: &std::io::Error) -> String {
        rustls_config::explain(e, &self.roots)
    }

    /// The connector and the name to present, unless TLS is off.
    pub fn connector(&self) -> Option<(&TlsConnector, ServerName<'static>)> {
        self.connector.as_ref().map(|c| (c, self.name.clone()))
    }
}

/// TLS towards clients, built once per config.
#[derive(Clone)]
pub struct ClientTlsConfig {
    pub mode: ClientTlsMode,
    /// `None` with `mode = disable`.
    acceptor: Option<TlsAcceptor>,
    /// The same certificate for the HTTP front door (ALPN `http/1.1`).
    http_acceptor: Option<TlsAcceptor>,
}

impl std::fmt::Debug for ClientTlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTlsConfig")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl ClientTlsConfig {
    /// Builds the acceptor for `t` (absent: plaintext only).
    ///
    /// # Errors
    /// [`Error::Config`] when TLS is on without a certificate and key, or they cannot be
    /// read or do not match.
    pub fn new(t: Option<&ClientTls>) -> Result<Self> {
        let t = t.cloned().unwrap_or_default();
        if t.mode == ClientTlsMode::Disable {
            return Ok(Self {
                mode: t.mode,
                acceptor: None,
                http_acceptor: None,
            });
        }
        let (Some(cert), Some(key)) = (&t.cert_file, &t.key_file) else {
            return Err(Error::Config(
                "client_tls needs cert_file and key_file unless its mode is disable".into(),
            ));
        };
        let provider = provider();
        let resolver = Arc::new(Reloading::new(cert.into(), key.into(), provider.clone())?);
        let acceptor = |alpn: &[u8]| {
            let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| Error::Config(format!("client TLS: {e}")))?
                .with_no_client_auth()
                .with_cert_resolver(resolver.clone());
            config.alpn_protocols = vec![alpn.to_vec()];
            Ok::<_, Error>(TlsAcceptor::from(Arc::new(config)))
        };
        Ok(Self {
            mode: t.mode,
            // Clients that offer ALPN must offer PostgreSQL's; direct TLS requires it.
            acceptor: Some(acceptor(ALPN)?),
            http_acceptor: Some(acceptor(b"http/1.1")?),
        })
    }

    /// The acceptor, unless TLS is off.
    pub fn acceptor(&self) -> Option<&TlsAcceptor> {
        self.acceptor.as_ref()
    }

    /// The HTTP front door's acceptor (same certificate), unless TLS is off.
    pub fn http_acceptor(&self) -> Option<&TlsAcceptor> {
        self.http_acceptor.as_ref()
    }
}

/// A certificate and key read from files, read again when they change.
#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    state: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    checked: Instant,
    stamp: Option<(SystemTime, SystemTime)>,
    key: Arc<CertifiedKey>,
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl Reloading {
    fn new(cert: PathBuf, key: PathBuf, provider: Arc<CryptoProvider>) -> Result<Self> {
        let stamp = Self::stamp_of(&cert, &key);
        let loaded = Self::load(&cert, &key, &provider)?;
        Ok(Self {
            state: Mutex::new(Loaded {
                checked: Instant::now(),
                stamp,
                key: loaded,
            }),
            cert,
            key,
            provider,
        })
    }

    fn stamp_of(cert: &Path, key: &Path) -> Option<(SystemTime, SystemTime)> {
        Some((modified(cert)?, modified(key)?))
    }

    fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>> {
        let (c, k) = (cert.to_string_lossy(), key.to_string_lossy());
        let certs = rustls_config::certs(&read(&c, "client_tls.cert_file")?, &c)
            .map_err(|e| Error::Config(format!("client_tls.cert_file {e}")))?;
        let key = rustls_config::key(&read(&k, "client_tls.key_file")?, &k)
            .map_err(|e| Error::Config(format!("client_tls.key_file {e}")))?;
        CertifiedKey::from_der(certs, key, provider)
            .map(Arc::new)
            .map_err(|e| Error::Config(format!("client_tls certificate {c} and key {k}: {e}")))
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.checked.elapsed() >= RELOAD_CHECK {
            s.checked = Instant::now();
            let stamp = Self::stamp_of(&self.cert, &self.key);
            if stamp.is_some() && stamp != s.stamp {
                // A Secret volume swaps both files at once; a half-written pair fails
                // to load and is tried again at the next check.
                match Self::load(&self.cert, &self.key, &self.provider) {
                    Ok(k) => {
                        tracing::info!(cert = %self.cert.display(), "client TLS certificate reloaded");
                        s.key = k;
                        s.stamp = stamp;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "client TLS certificate changed but cannot be loaded; serving the previous one");
                    }
                }
            }
        }
        Some(s.key.clone())
    }
}
