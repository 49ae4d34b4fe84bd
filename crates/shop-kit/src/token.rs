//! Checking who the end user is: shop access tokens (EdDSA JWTs signed by
//! auth) verified in process against auth's published keys.
//!
//! Verification pins `EdDSA`, requires `exp`, `iss`, `aud` and `sub`, allows
//! 30 s of clock skew, and uses the token's `kid` only to look a key up in
//! the known set, never to build a path or a query. [`KeyCache`] holds the
//! keys from auth's `GetPublicKeys` (refreshed periodically and at once when
//! a token names a key it does not know, at most once a second), so a
//! service checks tokens with no call to auth per request and keeps
//! checking them while auth is down. [`UserTokens`] is what a service that
//! acts for users calls on every request.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use mesh_client::MeshChannel;
use serde::{Deserialize, Serialize};
use shop_api::auth::v1::{GetPublicKeysRequest, auth_service_client::AuthServiceClient};
use tokio::{sync::Mutex, time::Instant};
use tonic::{Status, metadata::MetadataMap};

/// The header an edge gateway sets to the subject of the token it verified;
/// services that check the token themselves refuse a call where the two differ.
pub const VERIFIED_SUBJECT_HEADER: &str = "x-verified-subject";

/// Metadata in which the edge gateway names the end client of a call (its
/// rate-limit key, like `address 203.0.113.7`). The gateway drops any value
/// a client sends; auth believes it only from the gateway's identity.
pub const CLIENT_HEADER: &str = "x-shop-client";

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 30;

/// The claims of a shop access token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// The username.
    pub name: String,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Not before, Unix seconds. Typed here so a non-numeric `nbf` fails
    /// to decode instead of being skipped by the library's check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Not a JWT, or its header cannot be read.
    #[error("token is malformed")]
    Malformed,
    /// No `kid`, or one that is not in the key set.
    #[error("token was signed by an unknown key")]
    UnknownKey,
    /// Signature, algorithm, expiry, issuer or audience check failed.
    #[error("token is invalid: {0}")]
    Invalid(String),
}

impl From<TokenError> for tonic::Status {
    fn from(err: TokenError) -> Self {
        tonic::Status::unauthenticated(err.to_string())
    }
}

/// Verifies shop access tokens against a set of public keys.
#[derive(Clone)]
pub struct TokenVerifier {
    keys: HashMap<String, DecodingKey>,
    validation: Validation,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl TokenVerifier {
    /// A verifier for tokens from `issuer` to `audience`, trusting the
    /// Ed25519 public keys given as `(kid, x)` with `x` base64url.
    pub fn new<'a>(
        issuer: &str,
        audience: &str,
        keys: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, TokenError> {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        let keys = keys
            .into_iter()
            .map(|(kid, x)| {
                DecodingKey::from_ed_components(x)
                    .map(|key| (kid.to_owned(), key))
                    .map_err(|e| TokenError::Invalid(format!("bad public key {kid}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { keys, validation })
    }

    /// The claims of `token` if it is valid now.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        // The algorithm is pinned by `validation`; the header's is only compared.
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.keys.get(kid))
            .ok_or(TokenError::UnknownKey)?;
        jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| TokenError::Invalid(e.to_string()))
    }
}

/// How often [`KeyCache`] re-reads keys when nothing asks sooner.
pub const REFRESH_EVERY: Duration = Duration::from_secs(60);
/// An unknown `kid` refreshes at most this often, so forged kids cannot
/// turn every call into a call to auth.
const MIN_REFRESH_GAP: Duration = Duration::from_secs(1);

/// What a call hears when auth's keys cannot be fetched.
fn keys_unavailable() -> Status {
    Status::unavailable("cannot fetch the keys to check the token; retry shortly")
}

/// Auth's public keys, cached in process, and how to renew them (cheap to clone).
#[derive(Clone)]
pub struct KeyCache {
    verifier: Arc<RwLock<Option<Arc<TokenVerifier>>>>,
    last_refresh: Arc<Mutex<Option<Instant>>>,
    auth: AuthServiceClient<MeshChannel>,
    issuer: String,
    audience: String,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
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
    /// (`UNAVAILABLE` if auth's keys were never fetched and cannot be now).
    pub async fn verify(&self, token: &str) -> Result<Claims, Status> {
        let current = self.verifier.read().expect("key lock").clone();
        let verifier = match current {
            Some(verifier) => verifier,
            None => self.refresh(false).await?,
        };
        match verifier.verify(token) {
            Err(TokenError::UnknownKey) => {
                // Auth may have rotated since the last refresh.
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
    ///
    /// With no keys at all (the fetches so far failed: auth not up yet, a
    /// dial that lost a race at start), a caller inside that second waits
    /// for its end and fetches then, within its own deadline: failing it
    /// at once failed every call of that second while auth was answering.
    pub async fn refresh(&self, force: bool) -> Result<Arc<TokenVerifier>, Status> {
        let arrived = Instant::now();
        let mut last = self.last_refresh.lock().await;
        if !force && let Some(at) = *last {
            let current = self.verifier.read().expect("key lock").clone();
            match current {
                // Tried under a second ago (by a caller queued ahead, or
                // for a forged kid): the keys in hand.
                Some(verifier) if at.elapsed() < MIN_REFRESH_GAP => return Ok(verifier),
                // A fetch made while this caller queued failed: its answer
                // is this one's too (waiting for the next would chain every
                // queued caller a second behind the one before).
                None if at >= arrived => return Err(keys_unavailable()),
                // No keys and tried under a second ago: wait out the gap.
                None if at.elapsed() < MIN_REFRESH_GAP => {
                    tokio::time::sleep_until(at + MIN_REFRESH_GAP).await;
                }
                _ => {}
            }
        }
        // Counted from the attempt, so a failing auth is not asked again at once.
        *last = Some(Instant::now());
        let keys = self
            .auth
            .clone()
            .get_public_keys(GetPublicKeysRequest {})
            .await
            .map_err(|e| {
                tracing::warn!("cannot fetch token keys from auth: {e}");
                keys_unavailable()
            })?
            .into_inner()
            .keys;
        let verifier = Arc::new(
            TokenVerifier::new(
                &self.issuer,
                &self.audience,
                keys.iter().map(|k| (k.kid.as_str(), k.x.as_str())),
            )
            .map_err(|e| {
                tracing::error!("auth published unusable keys: {e}");
                Status::unavailable("cannot check tokens right now; retry shortly")
            })?,
        );
        *self.verifier.write().expect("key lock") = Some(verifier.clone());
        tracing::debug!(keys = keys.len(), "token keys refreshed");
        Ok(verifier)
    }

    /// Refreshes the keys every [`REFRESH_EVERY`] until `stop` is cancelled,
    /// so rotations are seen before a token names the new key.
    pub async fn refresh_until(self, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(REFRESH_EVERY);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.refresh(true).await {
                tracing::warn!("token keys not refreshed: {}", e.message());
            }
        }
    }
}

/// Which tokens a service accepts, from flags or environment (the same
/// names and defaults as auth's, which signs them).
#[derive(Clone, Debug, clap::Args)]
pub struct TokenArgs {
    /// Issuer of the tokens auth signs.
    #[arg(long, env = "TOKEN_ISSUER", default_value = "mesh-shop-auth")]
    pub token_issuer: String,
    /// Audience of the tokens auth signs.
    #[arg(long, env = "TOKEN_AUDIENCE", default_value = "mesh-shop")]
    pub token_audience: String,
}

impl TokenArgs {
    /// A key cache for these tokens, fetching keys from `auth`.
    pub fn key_cache(&self, auth: AuthServiceClient<MeshChannel>) -> KeyCache {
        KeyCache::new(auth, &self.token_issuer, &self.token_audience)
    }
}

/// The end user of a request, for services that act for users: the bearer
/// token verified locally with [`KeyCache`], cross-checked with the subject
/// an edge gateway forwarded.
#[derive(Clone, Debug)]
pub struct UserTokens {
    keys: KeyCache,
}

impl UserTokens {
    /// Users proven by tokens that `keys` verifies.
    pub fn new(keys: KeyCache) -> Self {
        Self { keys }
    }

    /// The key cache, to refresh it in the background.
    pub fn keys(&self) -> &KeyCache {
        &self.keys
    }

    /// The user id of the request's bearer token: `UNAUTHENTICATED` for a
    /// missing or bad token, `PERMISSION_DENIED` when a gateway's forwarded
    /// subject names someone else.
    pub async fn user(&self, metadata: &MetadataMap) -> Result<String, Status> {
        let header = metadata.get("authorization");
        // A header that is not text reads as a malformed one.
        let token = crate::bearer_token(header.map(|v| v.to_str().unwrap_or("")))?;
        let subject = self.keys.verify(token).await?.sub;
        // Behind the edge gateway the call also carries the subject the
        // gateway verified; both checks must name the same user.
        if let Some(claimed) = metadata.get(VERIFIED_SUBJECT_HEADER)
            && claimed.as_bytes() != subject.as_bytes()
        {
            tracing::warn!(%subject, "the gateway's verified subject does not match the token");
            return Err(Status::permission_denied(
                "the verified subject forwarded with the call does not match its token",
            ));
        }
        Ok(subject)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use shop_api::auth::v1::{
        GetPublicKeysResponse, LoginRequest, LoginResponse, RegisterRequest, RegisterResponse,
        VerifyTokenRequest, VerifyTokenResponse,
        auth_service_server::{AuthService, AuthServiceServer},
    };
    use tonic::{Request, Response};

    use super::*;

    /// An auth whose first two `GetPublicKeys` fail (it is still starting)
    /// and whose later ones answer (with no keys: enough for the cache).
    struct StartingAuth {
        fetches: Arc<AtomicUsize>,
    }

    #[tonic::async_trait]
    impl AuthService for StartingAuth {
        async fn register(
            &self,
            _: Request<RegisterRequest>,
        ) -> Result<Response<RegisterResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn login(&self, _: Request<LoginRequest>) -> Result<Response<LoginResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn get_public_keys(
            &self,
            _: Request<GetPublicKeysRequest>,
        ) -> Result<Response<GetPublicKeysResponse>, Status> {
            match self.fetches.fetch_add(1, Ordering::SeqCst) {
                0 | 1 => Err(Status::unavailable("starting")),
                _ => Ok(Response::new(GetPublicKeysResponse { keys: Vec::new() })),
            }
        }

        async fn verify_token(
            &self,
            _: Request<VerifyTokenRequest>,
        ) -> Result<Response<VerifyTokenResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
    }

    #[tokio::test]
    async fn a_caller_right_after_a_failed_fetch_waits_out_the_gap_once_and_queued_ones_share_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fetches = Arc::new(AtomicUsize::new(0));
        let auth = StartingAuth {
            fetches: fetches.clone(),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AuthServiceServer::new(auth))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let mesh = mesh_client::Mesh::new(mesh_client::MeshConfig::default());
        let channel = mesh.channel(&format!("static:///{addr}")).unwrap();
        let cache = KeyCache::new(AuthServiceClient::new(channel), "iss", "aud");
        let fetched = || fetches.load(Ordering::SeqCst);

        // The first fetch fails: the caller hears auth is unreachable.
        let before_first = Instant::now();
        let first = cache.refresh(false).await.unwrap_err();
        assert_eq!(first.code(), tonic::Code::Unavailable);
        assert_eq!(fetched(), 1);
        // Two callers right after, with no keys in hand: the first to get
        // in waits out the second and fetches again (auth still fails);
        // the one queued behind it shares that answer, no third fetch.
        let (a, b) = tokio::join!(cache.refresh(false), cache.refresh(false));
        assert_eq!(a.unwrap_err().code(), tonic::Code::Unavailable);
        assert_eq!(b.unwrap_err().code(), tonic::Code::Unavailable);
        assert_eq!(
            fetched(),
            2,
            "queued callers share the fetch they waited for"
        );
        assert!(
            before_first.elapsed() >= MIN_REFRESH_GAP,
            "auth was asked again only after the gap"
        );
        // The next caller waits out the gap too, and now gets the keys
        // instead of a refusal.
        cache
            .refresh(false)
            .await
            .expect("the keys on the third try");
        assert_eq!(fetched(), 3);
        // With keys in hand, a caller inside the gap asks auth nothing.
        cache.refresh(false).await.unwrap();
        assert_eq!(fetched(), 3, "at most one fetch a second");
    }
}
