//! Token verification at the edge with auth's public keys, fetched with
//! `GetPublicKeys`, refreshed periodically and at once when a token names a
//! key the gateway does not know yet (auth rotated its signing key).

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use auth::{Claims, TokenError, TokenVerifier};
use mesh_client::MeshChannel;
use shop_api::auth::v1::{GetPublicKeysRequest, auth_service_client::AuthServiceClient};
use tokio::{sync::Mutex, time::Instant};
use tonic::Status;

/// How often keys are re-read when nothing asks sooner.
pub const REFRESH_EVERY: Duration = Duration::from_secs(60);
/// An unknown `kid` refreshes at most this often, so forged kids cannot
/// turn every call into a call to auth.
const MIN_REFRESH_GAP: Duration = Duration::from_secs(1);

/// The current verifier and how to renew it.
#[derive(Clone)]
pub struct KeyCache {
    verifier: Arc<RwLock<Option<Arc<TokenVerifier>>>>,
    last_refresh: Arc<Mutex<Option<Instant>>>,
    auth: AuthServiceClient<MeshChannel>,
    issuer: String,
    audience: String,
}

impl KeyCache {
    /// Keys from `auth` for tokens from `issuer` to `audience`; none are
    /// fetched until needed or refreshed.
    pub fn new(auth: AuthServiceClient<MeshChannel>, issuer: &str, audience: &str) -> Self {
        Self {
            verifier: Arc::default(),
            last_refresh: Arc::default(),
            auth,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
        }
    }

    /// The claims of `token`, or `UNAUTHENTICATED` saying why not
    /// (`UNAVAILABLE` if auth's keys cannot be fetched at all).
    pub async fn verify(&self, token: &str) -> Result<Claims, Status> {
        let current = self.verifier.read().expect("key lock").clone();
        let verifier = match current {
            Some(verifier) => verifier,
            None => self.refresh(false).await?,
        };
        match verifier.verify(token) {
            Err(TokenError::UnknownKey) => {
                let renewed = self.refresh(false).await?;
                Ok(renewed.verify(token)?)
            }
            result => Ok(result?),
        }
    }

    /// Fetches the keys now (unless one was attempted less than a second
    /// ago, successful or not, and `force` is false) and returns the
    /// verifier in force afterwards. Callers queue on one fetch at a time,
    /// so auth sees at most one `GetPublicKeys` per second from calls.
    pub async fn refresh(&self, force: bool) -> Result<Arc<TokenVerifier>, Status> {
        let mut last = self.last_refresh.lock().await;
        if !force && last.is_some_and(|at| at.elapsed() < MIN_REFRESH_GAP) {
            return self
                .verifier
                .read()
                .expect("key lock")
                .clone()
                .ok_or_else(|| {
                    Status::unavailable("token keys from auth are not available yet; retry shortly")
                });
        }
        // Counted from the attempt, so a failing auth is not asked again at once.
        *last = Some(Instant::now());
        let keys = self
            .auth
            .clone()
            .get_public_keys(GetPublicKeysRequest {})
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                    "cannot fetch token keys from auth to check the token: {}",
                    e.message()
                ))
            })?
            .into_inner()
            .keys;
        let verifier = Arc::new(
            TokenVerifier::new(
                &self.issuer,
                &self.audience,
                keys.iter().map(|k| (k.kid.as_str(), k.x.as_str())),
            )
            .map_err(|e| Status::unavailable(format!("auth published unusable keys: {e}")))?,
        );
        *self.verifier.write().expect("key lock") = Some(verifier.clone());
        tracing::debug!(keys = keys.len(), "token keys refreshed");
        Ok(verifier)
    }
}
