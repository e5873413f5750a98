//! Checking a password the client sent in the clear (HTTP requests' connection strings,
//! WebSocket clients that pipeline their password) against a stored secret.
//!
//! A SCRAM verifier needs the PBKDF2 derivation (thousands of HMAC rounds) to check a
//! password: it runs off the async runtime, at most a few at a time, and a password that
//! passed is remembered (by digest, per user and verifier) so that the next request with
//! it costs a keyed hash, not a derivation. Unknown users go through the same derivation,
//! so a response's timing does not say whether a user exists.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::Semaphore;

use super::md5::constant_time_eq;
use super::{ScramVerifier, Secret};
use crate::error::{Error, Result};

/// Passwords remembered as checked; beyond this the memory starts over.
const REMEMBERED: usize = 4096;
/// How long a check waits for a turn at the derivation before giving up (a flood of
/// unauthenticated requests must not queue without bound in front of real ones).
const TURN_WAIT: Duration = Duration::from_secs(2);

/// Checks cleartext passwords; one per process.
#[derive(Debug)]
pub struct PasswordCheck {
    /// HMAC(key, user, password) → the stored key it was checked against.
    passed: Mutex<HashMap<[u8; 32], [u8; 32]>>,
    /// Random per process: what is remembered says nothing outside it.
    key: [u8; 32],
    /// Derivations running at once.
    derivations: Arc<Semaphore>,
}

impl Default for PasswordCheck {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            passed: Mutex::new(HashMap::new()),
            key: rand::random(),
            derivations: Arc::new(Semaphore::new(cpus)),
        }
    }
}

impl PasswordCheck {
    fn digest(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
        h.update(user.as_bytes());
        h.update(&[0]);
        h.update(password.as_bytes());
        h.finalize().into_bytes().into()
    }

    /// Whether `password` is `user`'s (`secret`: the stored one, `None` for a user that
    /// does not exist, which never passes).
    ///
    /// # Errors
    /// [`Error::LoginsBusy`] when no derivation turn came within [`TURN_WAIT`].
    pub async fn verify(
        &self,
        user: &str,
        secret: Option<&Secret>,
        password: &str,
    ) -> Result<bool> {
        // Known users with a SCRAM verifier (plain passwords have one too) and unknown
        // users take the same path: timing does not say whether a user exists.
        let verifier = match secret {
            Some(Secret { scram: Some(v), .. }) => v.clone(),
            Some(Secret { md5: Some(md5), .. }) => {
                let mine = postgres_protocol::password::md5(password.as_bytes(), user);
                return Ok(constant_time_eq(md5.as_bytes(), mine.as_bytes()));
            }
            _ => ScramVerifier::for_unknown_user(user),
        };
        let key = self.digest(user, password);
        let remembered = self.lock().get(&key).copied();
        if remembered.is_some_and(|k| constant_time_eq(&k, &verifier.stored_key)) {
            return Ok(secret.is_some());
        }
        let turn = tokio::time::timeout(TURN_WAIT, self.derivations.clone().acquire_owned())
            .await
            .map_err(|_| Error::LoginsBusy)?
            .map_err(|_| Error::LoginsBusy)?;
        let password = password.to_string();
        let v = verifier.clone();
        // The turn goes with the derivation: a caller that gives up (a client that
        // left) does not free it while the derivation still runs.
        let derived = tokio::task::spawn_blocking(move || {
            let _turn = turn;
            ScramVerifier::derive(&password, &v.salt, v.iterations).stored_key
        })
        .await;
        let ok =
            secret.is_some() && derived.is_ok_and(|k| constant_time_eq(&k, &verifier.stored_key));
        if ok {
            let mut passed = self.lock();
            if passed.len() >= REMEMBERED {
                passed.clear();
            }
            passed.insert(key, verifier.stored_key);
        }
        Ok(ok)
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
        assert!(check.verify("app", Some(&plain), "pw").await.unwrap());
        assert!(!check.verify("app", Some(&plain), "nope").await.unwrap());
        let md5 = Secret::from_stored(&postgres_protocol::password::md5(b"pw", "app"));
        assert!(check.verify("app", Some(&md5), "pw").await.unwrap());
        assert!(!check.verify("app", Some(&md5), "nope").await.unwrap());
        let scram = Secret::from_stored(&postgres_protocol::password::scram_sha_256(b"pw"));
        assert!(check.verify("app", Some(&scram), "pw").await.unwrap());
        // Remembered: the same answer, and a wrong password still fails.
        assert!(check.verify("app", Some(&scram), "pw").await.unwrap());
        assert!(!check.verify("app", Some(&scram), "nope").await.unwrap());
        // A changed verifier is checked again.
        let other = Secret::from_stored(&postgres_protocol::password::scram_sha_256(b"new"));
        assert!(!check.verify("app", Some(&other), "pw").await.unwrap());
        assert!(!check.verify("ghost", None, "pw").await.unwrap());
    }
}
