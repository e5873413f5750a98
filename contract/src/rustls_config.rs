//! The rustls client config for an `sslmode`, used by the pooler towards PostgreSQL and
//! by the operator's discovery: one definition of what each mode verifies.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::SslMode;

/// The ALPN protocol of PostgreSQL (required for direct TLS, PostgreSQL 17's
/// `sslnegotiation=direct`).
pub const ALPN: &[u8] = b"postgresql";

/// Why a TLS config could not be built.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsConfigError(String);

/// The crypto provider Sluice uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The PEM certificates in `pem` (`what` names them in errors).
///
/// # Errors
/// Malformed PEM, or no certificate at all.
pub fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsConfigError(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(TlsConfigError(format!("{what} holds no PEM certificate")));
    }
    Ok(certs)
}

/// The PEM private key in `pem`.
///
/// # Errors
/// Malformed PEM, or no key.
pub fn key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsConfigError(format!("{what}: {e}")))
}

/// What to verify the server with.
#[derive(Debug, Default)]
pub struct Material<'a> {
    /// PEM CAs to trust; `None`: the system's roots.
    pub ca_pem: Option<&'a [u8]>,
    /// PEM client certificate and key.
    pub client_cert: Option<(&'a [u8], &'a [u8])>,
    /// The name `verify-full` checks instead of the one the connection is opened with
    /// (for clients that cannot set SNI apart from the host).
    pub verify_name: Option<ServerName<'static>>,
}

/// The client config for `mode` (not `disable`): `prefer`/`require` encrypt without
/// verifying, `verify-ca` checks the chain, `verify-full` the chain and the name.
///
/// # Errors
/// Unusable CA, certificate or key material, or no system roots when they are needed.
pub fn client_config(
    mode: SslMode,
    m: &Material<'_>,
) -> Result<rustls::ClientConfig, TlsConfigError> {
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = if mode.verifies() {
        let mut roots = RootCertStore::empty();
        match m.ca_pem {
            Some(pem) => {
                for c in certs(pem, "the CA bundle")? {
                    roots
                        .add(c)
                        .map_err(|e| TlsConfigError(format!("the CA bundle: {e}")))?;
                }
            }
            None => {
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                if roots.is_empty() {
                    return Err(TlsConfigError(format!(
                        "sslmode {} without a CA bundle needs the system's CA certificates, and none were found",
                        mode.as_str()
                    )));
                }
            }
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| TlsConfigError(format!("TLS roots: {e}")))?;
        match (mode, &m.verify_name) {
            (SslMode::VerifyCa, _) => Arc::new(Chain(webpki, NameCheck::None)),
            (_, Some(name)) => Arc::new(Chain(webpki, NameCheck::Fixed(name.clone()))),
            _ => webpki,
        }
    } else {
        Arc::new(Unverified(provider.signature_verification_algorithms))
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsConfigError(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match m.client_cert {
        Some((c, k)) => builder
            .with_client_auth_cert(
                certs(c, "the client certificate")?,
                key(k, "the client key")?,
            )
            .map_err(|e| TlsConfigError(format!("the client certificate: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// Why a handshake failed, in words a user can act on; `roots` says where the trusted
/// CAs came from.
pub fn explain(e: &std::io::Error, roots: &str) -> String {
    let cert = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .and_then(|r| match r {
            rustls::Error::InvalidCertificate(c) => Some(c),
            _ => None,
        });
    match cert {
        Some(CertificateError::UnknownIssuer) => {
            format!("the server's certificate is not signed by a CA in {roots} (unknown issuer)")
        }
        Some(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            "the server's certificate has expired".into()
        }
        Some(c) => format!("the server's certificate was refused: {c}"),
        None => e.to_string(),
    }
}

/// How [`Chain`] checks the certificate's name.
#[derive(Debug)]
enum NameCheck {
    /// `verify-ca`: not at all.
    None,
    /// `verify-full` against a configured name rather than the connection's.
    Fixed(ServerName<'static>),
}

/// The certificate chain verified by webpki, the name as [`NameCheck`] says.
#[derive(Debug)]
struct Chain(Arc<WebPkiServerVerifier>, NameCheck);

impl ServerCertVerifier for Chain {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.1 {
            NameCheck::Fixed(name) => {
                self.0
                    .verify_server_cert(end_entity, intermediates, name, ocsp, now)
            }
            // The chain is checked before the name: a name error means the chain was good.
            NameCheck::None => {
                match self
                    .0
                    .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
                {
                    Err(rustls::Error::InvalidCertificate(
                        CertificateError::NotValidForName
                        | CertificateError::NotValidForNameContext { .. },
                    )) => Ok(ServerCertVerified::assertion()),
                    other => other,
                }
            }
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
