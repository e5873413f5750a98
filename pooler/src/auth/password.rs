//! Checking a password the client sent in the clear (HTTP requests' connection strings,
//! WebSocket clients that pipeline their password) against a stored secret.
//!
//! A SCRAM verifier needs the PBKDF2 derivation (thousands of HMAC rounds) to check a
//! password: it runs off the async runtime, at most a few at a time, and a password that
//! passed is remembered (by digest, per user and verifier) so that the next request with
//! it costs a hash, not a derivation. Unknown users go through the same derivation, so a
//! response's timing does not say whether a user exists.

use std::collections::HashMap;
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::md5::constant_time_eq;
use super::{ScramVerifier, Secret};

/// Passwords remembered as checked; beyond this the memory starts over.
const REMEMBERED: usize = 4096;

/// Checks cleartext passwords; one per process.
#[derive(Debug)]
pub struct PasswordCheck {
    /// digest(user, password) → the stored key it was checked against.
    passed: Mutex<HashMap<[u8; 32], [u8; 32]>>,
    /// Derivations running at once.
    derivations: Semaphore,
}

impl Default for PasswordCheck {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            passed: Mutex::new(HashMap::new()),
            derivations: Semaphore::new(cpus),
        }
    }
}

fn digest(user: &str, password: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(user.as_bytes());
    h.update([0]);
    h.update(password.as_bytes());
    h.finalize().into()
}

impl PasswordCheck {
    /// Whether `password` is `user`'s (`secret`: the stored one, `None` for a user that
    /// does not exist, which never passes).
    pub async fn verify(&self, user: &str, secret: Option<&Secret>, password: &str) -> bool {
        if let Some(s) = secret {
            if let Some(plain) = &s.plain {
                return constant_time_eq(plain.as_bytes(), password.as_bytes());
            }
            if let Some(md5) = &s.md5 {
                let mine = postgres_protocol::password::md5(password.as_bytes(), user);
                return constant_time_eq(md5.as_bytes(), mine.as_bytes());
            }
        }
        let verifier = secret
            .and_then(|s| s.scram.clone())
            .unwrap_or_else(|| ScramVerifier::for_unknown_user(user));
        let key = digest(user, password);
        let remembered = self.lock().get(&key).copied();
        if remembered.is_some_and(|k| constant_time_eq(&k, &verifier.stored_key)) {
            return secret.is_some();
        }
        let Ok(_turn) = self.derivations.acquire().await else {
            return false;
        };
        let password = password.to_string();
        let v = verifier.clone();
        let derived = tokio::task::spawn_blocking(move || {
            ScramVerifier::derive(&password, &v.salt, v.iterations).stored_key
        })
        .await;
        let ok = derived.is_ok_and(|k| constant_time_eq(&k, &verifier.stored_key));
        if ok && secret.is_some() {
            let mut passed = self.lock();
            if passed.len() >= REMEMBERED {
                passed.clear();
            }
            passed.insert(key, verifier.stored_key);
        }
        ok && secret.is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], [u8; 32]>> {
        self.passed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn checks_each_kind_of_secret() {
        let check = PasswordCheck::default();
        let plain = Secret::from_stored("pw");
        assert!(check.verify("app", Some(&plain), "pw").await);
        assert!(!check.verify("app", Some(&plain), "nope").await);
        let md5 = Secret::from_stored(&postgres_protocol::password::md5(b"pw", "app"));
        assert!(check.verify("app", Some(&md5), "pw").await);
        assert!(!check.verify("app", Some(&md5), "nope").await);
        let scram = Secret::from_stored(&postgres_protocol::password::scram_sha_256(b"pw"));
        assert!(check.verify("app", Some(&scram), "pw").await);
        // Remembered: the same answer, and a wrong password still fails.
        assert!(check.verify("app", Some(&scram), "pw").await);
        assert!(!check.verify("app", Some(&scram), "nope").await);
        // A changed verifier is checked again.
        let other = Secret::from_stored(&postgres_protocol::password::scram_sha_256(b"new"));
        assert!(!check.verify("app", Some(&other), "pw").await);
        assert!(!check.verify("ghost", None, "pw").await);
    }
}
