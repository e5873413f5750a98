//! md5 password authentication (`md5` + md5(md5(password + user) + salt)).

use md5::{Digest, Md5};

fn hex_md5(parts: &[&[u8]]) -> String {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// What a client sends for `password`, `user` and `salt`.
pub fn md5_client_response(user: &str, password: &str, salt: [u8; 4]) -> String {
    let inner = hex_md5(&[password.as_bytes(), user.as_bytes()]);
    format!("md5{}", hex_md5(&[inner.as_bytes(), &salt]))
}

/// Checks a client's md5 response against a plain password or a stored `md5<hex>` hash.
pub fn verify_md5(
    user: &str,
    plain: Option<&str>,
    stored_md5: Option<&str>,
    salt: [u8; 4],
    response: &[u8],
) -> bool {
    let inner = match (plain, stored_md5) {
        (Some(p), _) => hex_md5(&[p.as_bytes(), user.as_bytes()]),
        (None, Some(m)) => m[3..].to_string(),
        (None, None) => return false,
    };
    let expected = format!("md5{}", hex_md5(&[inner.as_bytes(), &salt]));
    constant_time_eq(expected.as_bytes(), response)
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_postgres_protocol_and_rejects_wrong() {
        let salt = [1, 2, 3, 4];
        let ours = md5_client_response("app", "secret", salt);
        assert_eq!(
            ours,
            postgres_protocol::authentication::md5_hash(b"app", b"secret", salt)
        );
        assert!(verify_md5(
            "app",
            Some("secret"),
            None,
            salt,
            ours.as_bytes()
        ));
        let stored = postgres_protocol::password::md5(b"secret", "app");
        assert!(verify_md5(
            "app",
            None,
            Some(&stored),
            salt,
            ours.as_bytes()
        ));
        assert!(!verify_md5(
            "app",
            Some("other"),
            None,
            salt,
            ours.as_bytes()
        ));
        assert!(!verify_md5(
            "bob",
            Some("secret"),
            None,
            salt,
            ours.as_bytes()
        ));
    }
}
