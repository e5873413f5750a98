//! TLS with rustls: the connector towards PostgreSQL (libpq's `sslmode`, a CA bundle or
//! the system's roots, an optional client certificate, SNI) and the acceptor for
//! clients, whose certificate is re-read when its files change (a rotated Secret is
//! served to the next client without a restart).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sluice_contract::{ClientTls, ClientTlsMode, ServerTls, SslMode};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::error::{Error, Result};

/// The ALPN protocol of PostgreSQL (required for direct TLS, PostgreSQL 17's
/// `sslnegotiation=direct`).
pub const ALPN: &[u8] = b"postgresql";

/// How often the client certificate's files are looked at for a change.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &str, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| Error::Config(format!("reading {what} {path}: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Config(format!(
            "{what} {path} holds no PEM certificate"
        )));
    }
    Ok(certs)
}

fn read_key(path: &str, what: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| Error::Config(format!("reading {what} {path}: {e}")))
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
        if t.sslmode == SslMode::Disable {
            return Ok(Self {
                mode: t.sslmode,
                connector: None,
                name,
                roots: String::new(),
            });
        }
        let roots_text = t.ca_file.as_ref().map_or_else(
            || "the system's CA certificates".into(),
            |f| format!("ca_file {f}"),
        );
        let provider = provider();
        let verifier: Arc<dyn ServerCertVerifier> = if t.sslmode.verifies() {
            let mut roots = RootCertStore::empty();
            match &t.ca_file {
                Some(f) => {
                    for c in read_certs(f, "server.tls.ca_file")? {
                        roots
                            .add(c)
                            .map_err(|e| Error::Config(format!("server.tls.ca_file {f}: {e}")))?;
                    }
                }
                None => {
                    let found = rustls_native_certs::load_native_certs();
                    roots.add_parsable_certificates(found.certs);
                    if roots.is_empty() {
                        return Err(Error::Config(format!(
                            "sslmode {} without ca_file needs the system's CA certificates, and none were found",
                            t.sslmode.as_str()
                        )));
                    }
                }
            }
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| Error::Config(format!("server TLS roots: {e}")))?;
            if t.sslmode == SslMode::VerifyCa {
                Arc::new(AnyName(webpki))
            } else {
                webpki
            }
        } else {
            Arc::new(Unverified(provider.signature_verification_algorithms))
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("server TLS: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match (&t.cert_file, &t.key_file) {
            (Some(c), Some(k)) => builder
                .with_client_auth_cert(
                    read_certs(c, "server.tls.cert_file")?,
                    read_key(k, "server.tls.key_file")?,
                )
                .map_err(|e| Error::Config(format!("server TLS client certificate: {e}")))?,
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(Error::Config(
                    "server.tls.cert_file and key_file go together".into(),
                ));
            }
        };
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Self {
            mode: t.sslmode,
            connector: Some(TlsConnector::from(Arc::new(config))),
            name,
            roots: roots_text,
        })
    }

    /// Why a handshake failed, in words a user can act on.
    pub fn explain(&self, e: &std::io::Error) -> String {
        let cert = e
            .get_ref()
            .and_then(|i| i.downcast_ref::<rustls::Error>())
            .and_then(|r| match r {
                rustls::Error::InvalidCertificate(c) => Some(c),
                _ => None,
            });
        match cert {
            Some(CertificateError::UnknownIssuer) => format!(
                "the server's certificate is not signed by a CA in {} (unknown issuer)",
                self.roots
            ),
            Some(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
                "the server's certificate has expired".into()
            }
            Some(c) => format!("the server's certificate was refused: {c}"),
            None => e.to_string(),
        }
    }

    /// The connector and the name to present, unless TLS is off.
    pub fn connector(&self) -> Option<(&TlsConnector, ServerName<'static>)> {
        self.connector.as_ref().map(|c| (c, self.name.clone()))
    }
}

/// `verify-ca`: the chain is verified, the host name is not.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The chain is checked before the name: a name error means the chain was good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `require` and `prefer`: encryption without verifying who answers, as libpq does.
#[derive(Debug)]
struct Unverified(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// TLS towards clients, built once per config.
#[derive(Clone)]
pub struct ClientTlsConfig {
    pub mode: ClientTlsMode,
    /// `None` with `mode = disable`.
    acceptor: Option<TlsAcceptor>,
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
            });
        }
        let (Some(cert), Some(key)) = (&t.cert_file, &t.key_file) else {
            return Err(Error::Config(
                "client_tls needs cert_file and key_file unless its mode is disable".into(),
            ));
        };
        let provider = provider();
        let resolver = Reloading::new(cert.into(), key.into(), provider.clone())?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("client TLS: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        // Clients that offer ALPN must offer PostgreSQL's; direct TLS requires it.
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Self {
            mode: t.mode,
            acceptor: Some(TlsAcceptor::from(Arc::new(config))),
        })
    }

    /// The acceptor, unless TLS is off.
    pub fn acceptor(&self) -> Option<&TlsAcceptor> {
        self.acceptor.as_ref()
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
        let certs = read_certs(&c, "client_tls.cert_file")?;
        let key = read_key(&k, "client_tls.key_file")?;
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
