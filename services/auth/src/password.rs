//! Password hashing with argon2id at OWASP's minimum parameters
//! (m = 19 MiB, t = 2, p = 1). Hashing runs on the blocking pool: it takes
//! tens of milliseconds of CPU by design.
//!
//! Each hash holds 19 MiB while it runs, and anyone may ask for one
//! (Register, Login), so the number running at once is bounded by a
//! [`Hashing`] permit: when all are taken a call is refused at once rather
//! than queued, which would only move the pile-up into memory and
//! deadlines. The permit travels into the blocking task, so a caller that
//! gives up does not free it before its hash is done.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use argon2::{
    Algorithm, Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier, Version,
    password_hash::SaltString,
};

fn hasher() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).expect("OWASP parameters are valid");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// The bound on hashes running at once.
pub(crate) struct Hashing {
    permits: Arc<Semaphore>,
    max: usize,
}

/// The right to run one hash.
pub(crate) struct Permit {
    _held: OwnedSemaphorePermit,
}

impl Hashing {
    /// At most `max` hashes at once.
    pub(crate) fn new(max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A permit, or `None` when `max` hashes are running.
    pub(crate) fn try_start(&self) -> Option<Permit> {
        self.permits
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|held| Permit { _held: held })
    }

    /// The bound.
    pub(crate) fn max(&self) -> usize {
        self.max
    }
}

/// Hashes a password into a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$...`).
pub(crate) async fn hash(password: String, permit: Permit) -> Result<String, String> {
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
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
pub(crate) async fn verify(password: String, hash: String, permit: Permit) -> bool {
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
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
        let hashing = Hashing::new(1);
        let permit = || hashing.try_start().unwrap();
        let hash = hash("correct horse".into(), permit()).await.unwrap();
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(verify("correct horse".into(), hash.clone(), permit()).await);
        assert!(!verify("wrong horse".into(), hash, permit()).await);
        assert!(!verify("x".into(), "not a hash".into(), permit()).await);
    }

    #[tokio::test]
    async fn an_abandoned_hash_frees_its_permit_when_done() {
        let hashing = Hashing::new(2);
        let first = hashing.try_start().unwrap();
        let _second = hashing.try_start().unwrap();
        assert!(hashing.try_start().is_none(), "both permits are taken");
        // A caller that gives up (drops the future) after the hash started
        // does not free the permit before the blocking task ends.
        let task = tokio::spawn(hash("abandoned password".into(), first));
        tokio::task::yield_now().await;
        task.abort();
        let _ = task.await;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        let third = loop {
            if let Some(p) = hashing.try_start() {
                break p;
            }
            assert!(tokio::time::Instant::now() < deadline, "permit never freed");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        drop(third);
    }
}
