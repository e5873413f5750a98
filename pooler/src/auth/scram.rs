//! Server side of SCRAM-SHA-256 (RFC 5802 / RFC 7677) without channel binding, as
//! PostgreSQL does it: the user name in the SASL message is ignored.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::md5::constant_time_eq;
use crate::error::{Error, Result};

type HmacSha256 = Hmac<Sha256>;

const DEFAULT_ITERATIONS: u32 = 4096;

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("hmac accepts any key length");
    m.update(msg);
    m.finalize().into_bytes().into()
}

/// A stored SCRAM-SHA-256 verifier.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramVerifier(***)")
    }
}

impl ScramVerifier {
    /// Parses `SCRAM-SHA-256$<iter>:<salt>$<storedkey>:<serverkey>` (base64 parts).
    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iter, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let iterations: u32 = iter.parse().ok().filter(|&i| i > 0)?;
        Some(Self {
            iterations,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }

    /// Derives a verifier from a plain password with a random salt.
    pub fn from_password(password: &str) -> Self {
        let salt: [u8; 16] = rand::random();
        Self::derive(password, &salt, DEFAULT_ITERATIONS)
    }

    /// A verifier for a user that does not exist, so that the exchange looks the same as
    /// for one that does: the salt is derived from the user name and a per-process secret
    /// (stable per name, different between names, as real users' salts are), the keys are
    /// random. No key derivation runs, so unknown users cost what known ones do.
    pub fn for_unknown_user(user: &str) -> Self {
        static SECRET: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
        let secret = SECRET.get_or_init(rand::random);
        Self {
            iterations: DEFAULT_ITERATIONS,
            salt: hmac(secret, user.as_bytes())[..16].to_vec(),
            stored_key: rand::random(),
            server_key: rand::random(),
        }
    }

    /// Derives a verifier from a password, salt and iteration count.
    pub fn derive(password: &str, salt: &[u8], iterations: u32) -> Self {
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        Self {
            iterations,
            salt: salt.to_vec(),
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }
}

/// One in-progress server-side exchange; pure (no I/O).
#[derive(Debug)]
pub struct ScramServer {
    verifier: ScramVerifier,
    nonce: String,
    client_first_bare: String,
    server_first: String,
    cbind: &'static str,
}

fn attr(part: Option<&str>, name: char) -> Result<&str> {
    part.and_then(|p| p.strip_prefix(name))
        .and_then(|p| p.strip_prefix('='))
        .ok_or_else(|| Error::Protocol(format!("malformed SCRAM message (expected {name}=)")))
}

impl ScramServer {
    /// Handles client-first-message and returns the exchange and server-first-message.
    /// `server_nonce` must be fresh printable randomness (no commas).
    pub fn start(
        verifier: ScramVerifier,
        client_first: &[u8],
        server_nonce: &str,
    ) -> Result<(Self, String)> {
        let msg = std::str::from_utf8(client_first)
            .map_err(|_| Error::Protocol("SCRAM message is not UTF-8".into()))?;
        let cbind = if let Some(r) = msg.strip_prefix("n,") {
            (r, "biws")
        } else if let Some(r) = msg.strip_prefix("y,") {
            (r, "eSws")
        } else if msg.starts_with("p=") {
            return Err(Error::AuthUnsupported("SCRAM channel binding".into()));
        } else {
            return Err(Error::Protocol(
                "malformed SCRAM client-first-message".into(),
            ));
        };
        let (rest, cbind) = cbind;
        // authzid (a=...) must be empty.
        let bare = rest
            .strip_prefix(',')
            .ok_or_else(|| Error::Protocol("SCRAM authzid is not supported".into()))?;
        let mut parts = bare.split(',');
        let _user = attr(parts.next(), 'n')?;
        let cnonce = attr(parts.next(), 'r')?;
        if cnonce.is_empty()
            || !cnonce
                .bytes()
                .all(|c| (0x21..=0x7e).contains(&c) && c != b',')
        {
            return Err(Error::Protocol("bad SCRAM client nonce".into()));
        }
        let nonce = format!("{cnonce}{server_nonce}");
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        let s = Self {
            verifier,
            nonce,
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
            cbind,
        };
        Ok((s, server_first))
    }

    /// Handles client-final-message; returns server-final-message when the proof is right.
    ///
    /// `user` only names the user in the error.
    pub fn finish(self, client_final: &[u8], user: &str) -> Result<String> {
        let msg = std::str::from_utf8(client_final)
            .map_err(|_| Error::Protocol("SCRAM message is not UTF-8".into()))?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or_else(|| Error::Protocol("SCRAM client-final-message without proof".into()))?;
        let mut parts = without_proof.split(',');
        let cbind = attr(parts.next(), 'c')?;
        let nonce = attr(parts.next(), 'r')?;
        if cbind != self.cbind || nonce != self.nonce {
            return Err(Error::Protocol(
                "SCRAM nonce or channel binding mismatch".into(),
            ));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| Error::Protocol("SCRAM proof is not base64".into()))?;
        if proof.len() != 32 {
            return Err(Error::AuthFailed(user.to_string()));
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof.iter().zip(signature).map(|(p, s)| p ^ s).collect();
        let stored: [u8; 32] = Sha256::digest(&client_key).into();
        if !constant_time_eq(&stored, &self.verifier.stored_key) {
            return Err(Error::AuthFailed(user.to_string()));
        }
        let server_sig = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_sig)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_users_get_a_stable_salt_of_their_own() {
        let a = ScramVerifier::for_unknown_user("nobody");
        assert_eq!(a.salt, ScramVerifier::for_unknown_user("nobody").salt);
        assert_ne!(a.salt, ScramVerifier::for_unknown_user("someone").salt);
        assert_eq!((a.salt.len(), a.iterations), (16, DEFAULT_ITERATIONS));
    }
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    #[test]
    fn rfc7677_vector() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let v = ScramVerifier::derive("pencil", &salt, 4096);
        let (s, first) = ScramServer::start(
            v,
            b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        )
        .unwrap();
        assert_eq!(
            first,
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let fin = s
            .finish(
                b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
                "user",
            )
            .unwrap();
        assert_eq!(fin, "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
    }

    fn exchange(verifier: ScramVerifier, password: &str) -> Result<()> {
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let (server, first) = ScramServer::start(verifier, client.message(), "srvnonce123")?;
        client.update(first.as_bytes()).unwrap();
        let fin = server.finish(client.message(), "app")?;
        client
            .finish(fin.as_bytes())
            .expect("client accepts server signature");
        Ok(())
    }

    #[test]
    fn against_postgres_protocol_client() {
        exchange(ScramVerifier::from_password("s3cret"), "s3cret").unwrap();
        let stored = postgres_protocol::password::scram_sha_256(b"s3cret");
        exchange(ScramVerifier::parse(&stored).unwrap(), "s3cret").unwrap();
        assert!(matches!(
            exchange(ScramVerifier::from_password("s3cret"), "wrong"),
            Err(Error::AuthFailed(_))
        ));
    }

    #[test]
    fn malformed_messages() {
        let v = ScramVerifier::from_password("x");
        assert!(ScramServer::start(v.clone(), b"p=tls-server-end-point,,n=,r=abc", "s").is_err());
        assert!(ScramServer::start(v.clone(), b"garbage", "s").is_err());
        assert!(ScramServer::start(v.clone(), b"n,,n=,r=", "s").is_err());
        let (s, _) = ScramServer::start(v, b"n,,n=,r=abc", "s").unwrap();
        assert!(s.finish(b"c=biws,r=other,p=AAAA", "u").is_err());
        assert!(ScramVerifier::parse("SCRAM-SHA-256$x:abc$a:b").is_none());
    }
}
