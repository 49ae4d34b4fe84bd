//! Password hashing with argon2id at OWASP's minimum parameters
//! (m = 19 MiB, t = 2, p = 1). Hashing runs on the blocking pool: it takes
//! tens of milliseconds of CPU by design.

use argon2::{
    Algorithm, Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier, Version,
    password_hash::SaltString,
};

fn hasher() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).expect("OWASP parameters are valid");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes a password into a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$...`).
pub(crate) async fn hash(password: String) -> Result<String, String> {
    tokio::task::spawn_blocking(move || {
        // 16 random bytes from ring, already our CSPRNG, instead of pulling in rand_core's.
        let mut bytes = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| "no system randomness".to_owned())?;
        let salt = SaltString::encode_b64(&bytes).map_err(|e| e.to_string())?;
        hasher()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Whether `password` matches the PHC string `hash`. A malformed hash is a
/// mismatch, never a panic.
pub(crate) async fn verify(password: String, hash: String) -> bool {
    tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash)
            .map(|parsed| {
                hasher()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_with_owasp_parameters_and_verifies() {
        let hash = hash("correct horse".into()).await.unwrap();
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(verify("correct horse".into(), hash.clone()).await);
        assert!(!verify("wrong horse".into(), hash).await);
        assert!(!verify("x".into(), "not a hash".into()).await);
    }
}
