//! TLS in tests: a throwaway CA and the server certificates it issues, a rustls client
//! config trusting it, and the certificate a PostgreSQL-speaking server serves.

use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A certificate authority made for one test.
pub struct TestCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A PEM certificate and its PEM private key.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    /// A new CA named `name`.
    ///
    /// # Errors
    /// When key generation or signing fails.
    pub fn new(name: &str) -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key)?.pem();
        Ok(Self { pem, issuer: Issuer::new(params, key) })
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A server certificate for `names` (DNS names or IP addresses), with a fresh key.
    ///
    /// # Errors
    /// When key generation or signing fails.
    pub fn issue(&self, names: &[&str]) -> Result<Issued> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("x"));
        params.key_usages =
            vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// A rustls client config (ring) trusting the PEM CAs in `ca_pem`, offering `alpn`.
///
/// # Errors
/// When `ca_pem` holds no usable certificate.
pub fn client_config(ca_pem: &str, alpn: Option<&[u8]>) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    if let Some(p) = alpn {
        c.alpn_protocols = vec![p.to_vec()];
    }
    Ok(c)
}

/// Opens TLS to the PostgreSQL-speaking server at `addr` after an SSLRequest, verifying
/// it as `name` with `ca_pem`, and returns the certificate it served (DER).
///
/// # Errors
/// When the server refuses TLS or the handshake fails.
pub async fn served_certificate(addr: (&str, u16), ca_pem: &str, name: &str) -> Result<Vec<u8>> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    ensure!(answer[0] == b'S', "SSLRequest answered {:?}", answer[0] as char);
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client_config(ca_pem, None)?))
        .connect(ServerName::try_from(name.to_string())?, tcp)
        .await?;
    Ok(tls.get_ref().1.peer_certificates().context("no certificate")?[0].to_vec())
}

/// The DER of the first certificate in `pem`.
///
/// # Errors
/// When `pem` holds none.
pub fn der(pem: &str) -> Result<Vec<u8>> {
    Ok(CertificateDer::from_pem_slice(pem.as_bytes())?.to_vec())
}
