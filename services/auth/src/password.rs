//! Password hashing with argon2id at OWASP's minimum parameters
//! (m = 19 MiB, t = 2, p = 1). Hashing runs on the blocking pool: it takes
//! tens of milliseconds of CPU by design.
//!
//! Each hash needs 19 MiB while it runs, and anyone may ask for one
//! (Register, Login), so the number running at once is bounded by a
//! [`Hashing`] permit: when all are taken a call is refused at once rather
//! than queued, which would only move the pile-up into memory and
//! deadlines. The permit travels into the blocking task, so a caller that
//! gives up does not free it before its hash is done.
//!
//! Each permit also carries the hash's working memory, kept in a pool and
//! reused, so hashing memory is at most permits × 19 MiB for the life of
//! the process. Letting argon2 allocate it per hash was measured to keep
//! far more: glibc keeps freed 19 MiB blocks in its per-thread arenas, and
//! with 4 hashes at a time the process held 490 MB after a few dozen.

use std::sync::{Arc, Mutex};

use argon2::{
    Algorithm, Argon2, Block, Params, Version,
    password_hash::{Output, ParamsString, PasswordHash, SaltString},
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// OWASP's minimum for argon2id: m = 19 MiB, t = 2, p = 1.
fn params() -> Params {
    Params::new(19 * 1024, 2, 1, None).expect("OWASP parameters are valid")
}

fn hasher() -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params())
}

/// Working memory of one hash: `params().block_count()` 1 KiB blocks.
type Memory = Box<[Block]>;

/// The bound on hashes running at once, and their reused memory.
pub(crate) struct Hashing {
    permits: Arc<Semaphore>,
    memory: Arc<Mutex<Vec<Memory>>>,
    max: usize,
}

/// The right to run one hash, with the memory to run it in.
pub(crate) struct Permit {
    memory: Option<Memory>,
    pool: Arc<Mutex<Vec<Memory>>>,
    _held: OwnedSemaphorePermit,
}

impl Permit {
    /// The memory, allocated on first use (on the blocking pool, where
    /// hashing runs: filling 19 MiB is not for an async worker).
    fn memory(&mut self) -> &mut [Block] {
        self.memory
            .get_or_insert_with(|| vec![Block::new(); params().block_count()].into_boxed_slice())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // Back to the pool before the permit (a field) is released.
        if let Some(memory) = self.memory.take() {
            self.pool.lock().expect("memory pool lock").push(memory);
        }
    }
}

impl Hashing {
    /// At most `max` hashes at once.
    pub(crate) fn new(max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            memory: Arc::default(),
            max,
        }
    }

    /// A permit, or `None` when `max` hashes are running.
    pub(crate) fn try_start(&self) -> Option<Permit> {
        let held = self.permits.clone().try_acquire_owned().ok()?;
        Some(Permit {
            memory: self.memory.lock().expect("memory pool lock").pop(),
            pool: self.memory.clone(),
            _held: held,
        })
    }

    /// The bound.
    pub(crate) fn max(&self) -> usize {
        self.max
    }
}

/// Hashes a password into a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$...`).
pub(crate) async fn hash(password: String, mut permit: Permit) -> Result<String, String> {
    tokio::task::spawn_blocking(move || {
        // 16 random bytes from ring, already our CSPRNG, instead of pulling in rand_core's.
        let mut salt = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
            .map_err(|_| "no system randomness".to_owned())?;
        hash_with(password.as_bytes(), &salt, permit.memory())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// What `argon2`'s `PasswordHasher::hash_password` makes, in `memory`.
fn hash_with(password: &[u8], salt: &[u8], memory: &mut [Block]) -> Result<String, String> {
    let params = params();
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    hasher()
        .hash_password_into_with_memory(password, salt, &mut out, memory)
        .map_err(|e| e.to_string())?;
    let salt = SaltString::encode_b64(salt).map_err(|e| e.to_string())?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(|e| e.to_string())?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&out).map_err(|e| e.to_string())?),
    };
    Ok(phc.to_string())
}

/// Whether `password` matches the PHC string `hash`. A malformed hash is a
/// mismatch, never a panic.
pub(crate) async fn verify(password: String, hash: String, mut permit: Permit) -> bool {
    tokio::task::spawn_blocking(move || verify_with(password.as_bytes(), &hash, permit.memory()))
        .await
        .unwrap_or(false)
}

/// What `argon2`'s `PasswordVerifier::verify_password` decides, in
/// `memory`. A hash that needs more memory than a permit holds is not one
/// of ours and does not match.
fn verify_with(password: &[u8], phc: &str, memory: &mut [Block]) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(parsed.algorithm) else {
        return false;
    };
    let Ok(version) = parsed.version.map_or(Ok(Version::V0x13), Version::try_from) else {
        return false;
    };
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let Some(memory) = memory.get_mut(..params.block_count()) else {
        return false;
    };
    let mut out = vec![0u8; expected.len()];
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password, salt, &mut out, memory)
        .is_ok()
        // Output's equality is constant-time.
        && Output::new(&out).is_ok_and(|computed| computed == expected)
}

#[cfg(test)]
mod tests {
    use argon2::{PasswordHasher, PasswordVerifier};

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

    #[test]
    fn hashes_and_verifies_exactly_as_the_argon2_crate_does() {
        let mut memory = vec![Block::new(); params().block_count()];
        let salt = *b"sixteen byte salt";
        let salt = &salt[..16];
        let ours = hash_with(b"pass phrase", salt, &mut memory).unwrap();
        let theirs = hasher()
            .hash_password(b"pass phrase", &SaltString::encode_b64(salt).unwrap())
            .unwrap()
            .to_string();
        assert_eq!(ours, theirs, "same PHC string, so stored hashes stay valid");
        assert!(
            hasher()
                .verify_password(b"pass phrase", &PasswordHash::new(&ours).unwrap())
                .is_ok()
        );
        assert!(verify_with(b"pass phrase", &theirs, &mut memory));
        assert!(!verify_with(b"pass phrasE", &theirs, &mut memory));
        // A stored hash asking for more memory than a permit holds.
        let big = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(32 * 1024, 1, 1, None).unwrap(),
        )
        .hash_password(b"pass phrase", &SaltString::encode_b64(salt).unwrap())
        .unwrap()
        .to_string();
        assert!(!verify_with(b"pass phrase", &big, &mut memory));
        for garbage in [
            "",
            "$argon2id$",
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA",
            &theirs[..20],
        ] {
            assert!(
                !verify_with(b"pass phrase", garbage, &mut memory),
                "{garbage:?}"
            );
        }
    }

    #[tokio::test]
    async fn memory_is_reused_and_permits_are_bounded() {
        let hashing = Hashing::new(2);
        let first = hashing.try_start().unwrap();
        let second = hashing.try_start().unwrap();
        assert!(hashing.try_start().is_none(), "both permits are taken");
        hash("one".into(), first).await.unwrap();
        hash("two".into(), second).await.unwrap();
        let third = hashing.try_start().unwrap();
        let fourth = hashing.try_start().unwrap();
        assert!(third.memory.is_some() && fourth.memory.is_some(), "reused");
        assert!(hashing.try_start().is_none());
        drop((third, fourth));
        assert_eq!(
            hashing.memory.lock().unwrap().len(),
            2,
            "never more than the bound"
        );
    }

    #[tokio::test]
    async fn an_abandoned_hash_frees_its_permit_when_done() {
        let hashing = Hashing::new(2);
        let first = hashing.try_start().unwrap();
        let _second = hashing.try_start().unwrap();
        assert!(hashing.try_start().is_none(), "both permits are taken");
        // A caller that gives up (drops the future) after the hash started
        // does not lose the permit for good.
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
