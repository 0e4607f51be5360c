//! Passwords: Argon2id (RFC 9106) with the crate's defaults (19 MiB, 2 passes), PHC strings.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

/// Hashes a password for storage. Refuses passwords too short to be worth hashing.
pub fn hash(password: &str) -> Result<String, crate::AuthError> {
    if password.chars().count() < 8 {
        return Err(crate::AuthError::Invalid("a password needs at least 8 characters".into()));
    }
    let mut salt = [0u8; 16];
    aws_lc_rs::rand::fill(&mut salt).expect("the system RNG works");
    let salt = SaltString::encode_b64(&salt).map_err(|e| crate::AuthError::Internal(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| crate::AuthError::Internal(format!("password hashing failed: {e}")))
}

/// Whether `password` matches `phc`. A malformed stored hash never matches.
pub fn verify(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

/// A hash to verify against when the user does not exist, so that unknown users cost the same time
/// as known ones (no username probing by timing).
pub fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    // Random per process: never a password anyone could know (it must not match, and callers also
    // refuse when the decoy was used).
    DECOY.get_or_init(|| hash(&crate::random_token(32)).expect("hashing works"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn hashes_verify_and_are_salted() {
        let a = super::hash("correct horse battery").unwrap();
        let b = super::hash("correct horse battery").unwrap();
        assert!(a.starts_with("$argon2id$"));
        assert_ne!(a, b);
        assert!(super::verify("correct horse battery", &a));
        assert!(!super::verify("correct horse batterx", &a));
        assert!(!super::verify("x", "not a hash"));
        assert!(super::hash("short").is_err());
    }
}
