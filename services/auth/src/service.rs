use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use mesh_client::tls::{PeerInfo, SpiffeId};
use shop_api::auth::v1::{
    GetPublicKeysRequest, GetPublicKeysResponse, LoginRequest, LoginResponse, PublicKey,
    RegisterRequest, RegisterResponse, VerifyTokenRequest, VerifyTokenResponse,
    auth_service_server,
};
use shop_kit::{db, time, validate};
use sqlx::{AnyPool, Row};
use tonic::{Request, Response, Status};

use crate::{
    CLIENT_HEADER, Claims, Error, TokenError, TokenVerifier,
    limit::{self, Limiter},
    password::{self, Hashing},
    tokens::{LEEWAY_SECS, SigningKey},
};

/// The auth service's gRPC implementation.
#[derive(Clone)]
pub struct AuthService {
    inner: Arc<Inner>,
}

/// What an [`AuthService`] is configured with.
#[derive(Clone, Debug)]
pub struct Options {
    /// The `iss` claim of issued tokens.
    pub issuer: String,
    /// The `aud` claim of issued tokens.
    pub audience: String,
    /// Lifetime of issued tokens.
    pub ttl: Duration,
    /// The gateway, whose end-client header is believed.
    pub trusted_gateway: SpiffeId,
    /// Password hashes allowed to run at once.
    pub max_concurrent_hashes: usize,
}

struct Inner {
    pool: AnyPool,
    issuer: String,
    audience: String,
    ttl: Duration,
    trusted_gateway: SpiffeId,
    keys: RwLock<Arc<Keys>>,
    /// Hash checked when the user does not exist, so both failures cost the same.
    dummy_hash: String,
    last_reload: tokio::sync::Mutex<tokio::time::Instant>,
    /// Login attempts.
    limiter: Limiter,
    /// Registrations, apart so their churn cannot evict login counts.
    registrations: Limiter,
    hashing: Hashing,
}

struct Keys {
    signing: SigningKey,
    public: Vec<PublicKey>,
    verifier: TokenVerifier,
}

/// Reloading keys on an unknown `kid` is rate limited so random kids cannot
/// turn every request into a database query.
const KEY_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// The signing key every replica must sign with: the newest unretired one
/// (ties broken by kid, so all replicas pick the same).
const NEWEST_ACTIVE: &str = "SELECT kid, created_at FROM signing_keys WHERE retired_at IS NULL \
     ORDER BY created_at DESC, kid LIMIT 1";

impl AuthService {
    /// Loads the signing keys (creating the first one if there is none).
    pub async fn new(pool: AnyPool, options: Options) -> Result<Self, Error> {
        let Options {
            issuer,
            audience,
            ttl,
            trusted_gateway,
            max_concurrent_hashes,
        } = options;
        let hashing = Hashing::new(max_concurrent_hashes);
        let permit = hashing.try_start().ok_or(Error::NoHashPermits)?;
        let dummy_hash = password::hash(uuid::Uuid::new_v4().to_string(), permit)
            .await
            .map_err(Error::Keys)?;
        let keys = load_keys(&pool, &issuer, &audience, ttl, true).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                issuer,
                audience,
                ttl,
                trusted_gateway,
                keys: RwLock::new(Arc::new(keys)),
                dummy_hash,
                last_reload: tokio::sync::Mutex::new(tokio::time::Instant::now()),
                limiter: Limiter::default(),
                registrations: Limiter::default(),
                hashing,
            }),
        })
    }

    fn keys(&self) -> Arc<Keys> {
        self.inner.keys.read().expect("key lock poisoned").clone()
    }

    async fn reload_keys(&self) -> Result<Arc<Keys>, Error> {
        let inner = &self.inner;
        let keys = Arc::new(
            load_keys(
                &inner.pool,
                &inner.issuer,
                &inner.audience,
                inner.ttl,
                false,
            )
            .await?,
        );
        *inner.keys.write().expect("key lock poisoned") = keys.clone();
        Ok(keys)
    }

    /// The keys with the database's newest active key signing, reloaded
    /// if another replica rotated since this one last looked. One indexed
    /// query, next to a login's argon2 work, so a replica never signs with
    /// a key retired before the login began.
    async fn current_keys(&self) -> Result<Arc<Keys>, Error> {
        let keys = self.keys();
        match newest_active(&self.inner.pool).await? {
            Some((kid, _)) if kid == keys.signing.kid => Ok(keys),
            _ => {
                let keys = self.reload_keys().await?;
                tracing::info!(kid = %keys.signing.kid, "adopted the newest signing key");
                Ok(keys)
            }
        }
    }

    /// Rotates the signing key whenever it is older than `max_age`: a new
    /// key signs from then on, the old one is retired but still verifies
    /// until the last token it signed has expired, and is deleted then.
    pub async fn rotate_forever(self, max_age: Duration) {
        let every = (max_age / 4).clamp(Duration::from_millis(500), Duration::from_secs(600));
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.rotation_turn(max_age, time::now_millis()).await {
                tracing::warn!("signing key rotation failed, will retry: {e}");
            }
        }
    }

    /// One turn of the rotation loop at `now` (Unix ms): rotate if the
    /// newest active key is older than `max_age`, delete keys nothing can
    /// verify with any more, and sign with the newest active key.
    ///
    /// Rotation is one decision of the database: a replica retires the key
    /// it saw as newest only if that key is still active (a conditional
    /// UPDATE in the transaction that inserts the successor), so of
    /// replicas rotating at once exactly one wins; the others change
    /// nothing and adopt the winner's key. A fresh key is never retired,
    /// because a replica only ever retires the key it found too old.
    async fn rotation_turn(&self, max_age: Duration, now: i64) -> Result<(), Error> {
        let pool = &self.inner.pool;
        let keys_error = |e: sqlx::Error| Error::Keys(e.to_string());
        let newest = newest_active(pool).await?;
        let due = newest
            .as_ref()
            .is_none_or(|(_, created)| now - created >= max_age.as_millis() as i64);
        if due {
            let mut tx = pool.begin().await.map_err(keys_error)?;
            let won = match &newest {
                Some((kid, created)) => {
                    let retired = sqlx::query(
                        "UPDATE signing_keys SET retired_at = $1 WHERE kid = $2 AND retired_at IS NULL",
                    )
                    .bind(now)
                    .bind(kid)
                    .execute(&mut *tx)
                    .await
                    .map_err(keys_error)?;
                    if retired.rows_affected() == 1 {
                        // Keys older still (two created at once by replicas
                        // starting on an empty database) go with it.
                        sqlx::query(
                            "UPDATE signing_keys SET retired_at = $1 \
                             WHERE retired_at IS NULL AND created_at <= $2",
                        )
                        .bind(now)
                        .bind(created)
                        .execute(&mut *tx)
                        .await
                        .map_err(keys_error)?;
                        true
                    } else {
                        false
                    }
                }
                None => true,
            };
            if won {
                let key = create_key(&mut *tx, now).await?;
                tx.commit().await.map_err(keys_error)?;
                tracing::info!(kid = %key.kid, "signing key rotated");
            } else {
                tx.rollback().await.map_err(keys_error)?;
                tracing::info!("another replica rotated the signing key first");
            }
        }
        let deleted = delete_expired_keys(pool, now, self.inner.ttl).await?;
        if deleted > 0 {
            tracing::info!(deleted, "deleted signing keys past their last token");
        }
        self.current_keys().await?;
        Ok(())
    }

    /// Verifies a token, reloading keys once if it names a key this replica
    /// has not seen (another replica may have created it).
    pub async fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        match self.keys().verifier.verify(token) {
            Err(TokenError::UnknownKey) => {
                let mut last = self.inner.last_reload.lock().await;
                if last.elapsed() < KEY_RELOAD_INTERVAL {
                    return Err(TokenError::UnknownKey);
                }
                *last = tokio::time::Instant::now();
                let keys = self.reload_keys().await.map_err(|e| {
                    tracing::warn!("reloading signing keys failed: {e}");
                    TokenError::UnknownKey
                })?;
                keys.verifier.verify(token)
            }
            other => other,
        }
    }
}

/// Generates a signing key and stores it as active.
async fn create_key<'e>(
    executor: impl sqlx::Executor<'e, Database = sqlx::Any>,
    now: i64,
) -> Result<SigningKey, Error> {
    let (key, stored) = SigningKey::generate().map_err(Error::Keys)?;
    sqlx::query(
        "INSERT INTO signing_keys (kid, private_key, public_key, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(&key.kid)
    .bind(&stored)
    .bind(&key.x)
    .bind(now)
    .execute(executor)
    .await
    .map_err(|e| Error::Keys(e.to_string()))?;
    Ok(key)
}

/// The newest active key's `(kid, created_at)`.
async fn newest_active(pool: &AnyPool) -> Result<Option<(String, i64)>, Error> {
    let keys_error = |e: sqlx::Error| Error::Keys(e.to_string());
    sqlx::query(NEWEST_ACTIVE)
        .fetch_optional(pool)
        .await
        .map_err(keys_error)?
        .map(|row| Ok((row.try_get("kid")?, row.try_get("created_at")?)))
        .transpose()
        .map_err(keys_error)
}

/// The time (Unix ms) before which a retired key verifies nothing any
/// more: its last token has expired, leeway included.
fn oldest_useful(now: i64, ttl: Duration) -> i64 {
    now - ttl.as_millis() as i64 - LEEWAY_SECS as i64 * 1000
}

/// Deletes keys retired before [`oldest_useful`]: no token they signed can
/// verify, so keeping their private halves only adds to what a leaked
/// database gives away. Returns how many went.
async fn delete_expired_keys(pool: &AnyPool, now: i64, ttl: Duration) -> Result<u64, Error> {
    sqlx::query("DELETE FROM signing_keys WHERE retired_at IS NOT NULL AND retired_at <= $1")
        .bind(oldest_useful(now, ttl))
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
        .map_err(|e| Error::Keys(e.to_string()))
}

async fn load_keys(
    pool: &AnyPool,
    issuer: &str,
    audience: &str,
    ttl: Duration,
    create: bool,
) -> Result<Keys, Error> {
    let keys_error = |e: sqlx::Error| Error::Keys(e.to_string());
    let now = time::now_millis();
    // Keys retired longer ago than a token lives can no longer verify anything.
    let useful_after = oldest_useful(now, ttl);
    let rows = sqlx::query(
        "SELECT kid, private_key, retired_at FROM signing_keys \
         WHERE retired_at IS NULL OR retired_at > $1 ORDER BY created_at DESC, kid",
    )
    .bind(useful_after)
    .fetch_all(pool)
    .await
    .map_err(keys_error)?;
    let mut loaded = Vec::new();
    let mut signing = None;
    for row in rows {
        let kid: String = row.try_get("kid").map_err(keys_error)?;
        let private: String = row.try_get("private_key").map_err(keys_error)?;
        let retired: Option<i64> = row.try_get("retired_at").map_err(keys_error)?;
        let key = SigningKey::from_stored(kid, &private).map_err(Error::Keys)?;
        loaded.push((key.kid.clone(), key.x.clone()));
        if retired.is_none() && signing.is_none() {
            signing = Some(key);
        }
    }
    let signing = match signing {
        Some(key) => key,
        None if create => {
            let key = create_key(pool, now).await?;
            tracing::info!(kid = %key.kid, "created a token signing key");
            loaded.push((key.kid.clone(), key.x.clone()));
            key
        }
        None => return Err(Error::Keys("no active signing key".into())),
    };
    let verifier = TokenVerifier::new(
        issuer,
        audience,
        loaded.iter().map(|(kid, x)| (kid.as_str(), x.as_str())),
    )
    .map_err(|e| Error::Keys(e.to_string()))?;
    let public = loaded
        .into_iter()
        .map(|(kid, x)| PublicKey {
            kid,
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            alg: "EdDSA".into(),
            x,
        })
        .collect();
    Ok(Keys {
        signing,
        public,
        verifier,
    })
}

fn username(value: &str) -> Result<&str, Status> {
    let valid_chars = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if value.is_empty() {
        return Err(validate::invalid("username", "is required"));
    }
    if !(3..=64).contains(&value.len()) || !valid_chars {
        return Err(validate::invalid(
            "username",
            "must be 3 to 64 characters of a-z, 0-9, '.', '_' and '-'",
        ));
    }
    Ok(value)
}

fn password_field(value: &str) -> Result<&str, Status> {
    if value.is_empty() {
        return Err(validate::invalid("password", "is required"));
    }
    if !(8..=128).contains(&value.len()) {
        return Err(validate::invalid(
            "password",
            format!("must be 8 to 128 bytes, got {}", value.len()),
        ));
    }
    Ok(value)
}

const BAD_LOGIN: &str = "invalid username or password";

/// Who the end client of a call is, for the login and registration
/// limits: the client the gateway names in [`CLIENT_HEADER`] when the
/// verified caller is the gateway, else the verified workload identity,
/// else the peer address (plaintext). The header is believed from nobody
/// else, and a gateway that sends none counts as one client.
fn end_client<T>(request: &Request<T>, gateway: &SpiffeId) -> String {
    let peer = request.extensions().get::<PeerInfo>();
    let identity = peer.and_then(|p| p.identity.as_ref());
    if identity == Some(gateway) {
        let named = request
            .metadata()
            .get(CLIENT_HEADER)
            .and_then(|v| v.to_str().ok())
            // The gateway's keys are short ASCII; anything else is not its.
            .filter(|v| {
                !v.is_empty()
                    && v.len() <= 64
                    && v.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
            });
        if let Some(client) = named {
            return format!("edge {client}");
        }
    }
    match (identity, peer.and_then(|p| p.remote_addr)) {
        (Some(id), _) => format!("workload {id}"),
        (None, Some(addr)) => format!("address {}", addr.ip()),
        (None, None) => "unknown".into(),
    }
}

/// `RESOURCE_EXHAUSTED` with `message` and the standard `retry-after`
/// (whole seconds, at least 1).
fn exhausted(message: impl FnOnce(u64) -> String, wait: Duration) -> Status {
    let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
    let mut status = Status::resource_exhausted(message(secs));
    if let Ok(value) = secs.to_string().parse() {
        status.metadata_mut().insert("retry-after", value);
    }
    status
}

impl AuthService {
    /// A hashing permit, or `RESOURCE_EXHAUSTED` when the bound is reached.
    fn start_hash(&self) -> Result<password::Permit, Status> {
        let max = self.inner.hashing.max();
        self.inner.hashing.try_start().ok_or_else(|| {
            exhausted(
                |secs| {
                    format!(
                        "auth is already checking {max} passwords at once, its limit; retry in {secs} s"
                    )
                },
                Duration::from_secs(1),
            )
        })
    }
}

#[tonic::async_trait]
impl auth_service_server::AuthService for AuthService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let client = end_client(&request, &self.inner.trusted_gateway);
        let req = request.into_inner();
        let name = username(&req.username)?;
        password_field(&req.password)?;
        // The permit first, so no limiter entry is made without one: the
        // hashing bound also bounds how fast entries can churn.
        let permit = self.start_hash()?;
        // Counted before hashing, and kept: an account made is an attempt.
        let _counted = self
            .inner
            .registrations
            .attempt(&limit::register_limits(&client))
            .map_err(|wait| {
                exhausted(
                    |secs| {
                        format!(
                            "too many registrations from {client} (at most {} a minute); retry in {secs} s",
                            limit::REGISTRATIONS_PER_CLIENT
                        )
                    },
                    wait,
                )
            })?;
        let hash = password::hash(req.password.clone(), permit)
            .await
            .map_err(|e| {
                tracing::error!("hashing failed: {e}");
                Status::internal("internal error")
            })?;
        let user_id = uuid::Uuid::new_v4().to_string();
        let now = time::now_millis();
        let inserted = sqlx::query(
            "INSERT INTO users (user_id, username, password_hash, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&user_id)
        .bind(name)
        .bind(&hash)
        .bind(now)
        .execute(&self.inner.pool)
        .await;
        match inserted {
            Ok(_) => Ok(Response::new(RegisterResponse {
                user_id,
                username: name.to_owned(),
                created_at: Some(time::timestamp(now)),
            })),
            Err(e) if db::is_unique_violation(&e) => Err(Status::already_exists(format!(
                "username {name:?} is taken; choose another"
            ))),
            Err(e) => Err(db::status(e)),
        }
    }

    async fn login(
        &self,
        request: Request<LoginRequest>,
    ) -> Result<Response<LoginResponse>, Status> {
        let client = end_client(&request, &self.inner.trusted_gateway);
        let req = request.into_inner();
        if req.username.is_empty() {
            return Err(validate::invalid("username", "is required"));
        }
        if req.password.is_empty() {
            return Err(validate::invalid("password", "is required"));
        }
        // No account has such a name or password: refused without hashing.
        if req.username.len() > 64 || req.password.len() > 128 {
            return Err(Status::unauthenticated(BAD_LOGIN));
        }
        // The permit first, so no limiter entry is made without one: the
        // hashing bound also bounds how fast entries can churn.
        let permit = self.start_hash()?;
        // Every login this client makes, kept whatever its outcome: a
        // correct password costs a hash as a wrong one does.
        let hashed = self
            .inner
            .limiter
            .attempt(&limit::hashed_login_limits(&client))
            .map_err(|wait| {
                exhausted(
                    |secs| {
                        format!(
                            "too many logins from {client} (at most {} a minute, succeeded or not); retry in {secs} s",
                            limit::HASHED_LOGINS_PER_CLIENT
                        )
                    },
                    wait,
                )
            })?;
        // Counted before the password is checked, in one step with the
        // check, so parallel guesses are counted too; taken back below for
        // a login that succeeds or is never tried.
        let attempt = match self
            .inner
            .limiter
            .attempt(&limit::login_limits(&client, &req.username))
        {
            Ok(attempt) => attempt,
            Err(wait) => {
                self.inner.limiter.refund(hashed, |_| false);
                return Err(exhausted(
                    |secs| format!("too many failed logins; retry in {secs} s"),
                    wait,
                ));
            }
        };
        let row = match sqlx::query("SELECT user_id, password_hash FROM users WHERE username = $1")
            .bind(&req.username)
            .fetch_optional(&self.inner.pool)
            .await
        {
            Ok(row) => row,
            Err(e) => {
                self.inner.limiter.refund(attempt, |_| false);
                self.inner.limiter.refund(hashed, |_| false);
                return Err(db::status(e));
            }
        };
        drop(hashed);
        let (user_id, hash) = match row {
            Some(row) => (
                Some(row.try_get::<String, _>("user_id").map_err(db::status)?),
                row.try_get::<String, _>("password_hash")
                    .map_err(db::status)?,
            ),
            None => (None, self.inner.dummy_hash.clone()),
        };
        // Verify even for a missing user so both failures take the same time.
        let matches = password::verify(req.password, hash, permit).await;
        let user_id = match (user_id, matches) {
            (Some(id), true) => id,
            // The attempt stays counted.
            _ => return Err(Status::unauthenticated(BAD_LOGIN)),
        };
        let account = limit::account_key(&client, &req.username);
        self.inner.limiter.refund(attempt, |_| false);
        self.inner.limiter.clear(&account);
        let keys = self.current_keys().await.map_err(|e| {
            tracing::error!("loading the signing key failed: {e}");
            Status::unavailable("auth cannot read its signing keys; retry later")
        })?;
        let now = time::now_millis() / 1000;
        let exp = now + self.inner.ttl.as_secs() as i64;
        let claims = Claims {
            sub: user_id.clone(),
            name: req.username,
            iss: self.inner.issuer.clone(),
            aud: self.inner.audience.clone(),
            exp,
            iat: now,
            nbf: None,
        };
        let token = keys.signing.sign(&claims).map_err(|e| {
            tracing::error!("signing failed: {e}");
            Status::internal("internal error")
        })?;
        Ok(Response::new(LoginResponse {
            access_token: token,
            token_type: "Bearer".into(),
            expires_at: Some(time::timestamp(exp * 1000)),
            user_id,
        }))
    }

    async fn get_public_keys(
        &self,
        _request: Request<GetPublicKeysRequest>,
    ) -> Result<Response<GetPublicKeysResponse>, Status> {
        // Another replica may have rotated: the keys published are the
        // database's (looked at most once a second), so a verifier's cache
        // never replaces a new key with this replica's stale set.
        let keys = {
            let mut last = self.inner.last_reload.lock().await;
            if last.elapsed() < KEY_RELOAD_INTERVAL {
                self.keys()
            } else {
                *last = tokio::time::Instant::now();
                self.current_keys().await.unwrap_or_else(|e| {
                    tracing::warn!("publishing this replica's keys; cannot read newer ones: {e}");
                    self.keys()
                })
            }
        };
        Ok(Response::new(GetPublicKeysResponse {
            keys: keys.public.clone(),
        }))
    }

    async fn verify_token(
        &self,
        request: Request<VerifyTokenRequest>,
    ) -> Result<Response<VerifyTokenResponse>, Status> {
        let token = request.into_inner().token;
        if token.is_empty() {
            return Err(validate::invalid("token", "is required"));
        }
        if token.len() > 8 * 1024 {
            return Err(Status::unauthenticated("token is malformed"));
        }
        let claims = self.verify(&token).await?;
        Ok(Response::new(VerifyTokenResponse {
            subject: claims.sub,
            username: claims.name,
            expires_at: Some(time::timestamp(claims.exp * 1000)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SQLite file of its own, removed afterwards.
    struct TempDb(std::path::PathBuf);

    impl TempDb {
        fn new() -> Self {
            let name = format!("auth-test-{}.db", uuid::Uuid::new_v4().simple());
            Self(std::env::temp_dir().join(name))
        }

        fn url(&self) -> String {
            format!("sqlite://{}", self.0.display())
        }
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            for suffix in ["", "-wal", "-shm"] {
                let mut path = self.0.clone().into_os_string();
                path.push(suffix);
                let _ = std::fs::remove_file(path);
            }
        }
    }

    const TTL: Duration = Duration::from_secs(60);

    async fn service(db: &TempDb) -> AuthService {
        let pool = db::connect(&db.url(), &crate::MIGRATOR).await.unwrap();
        AuthService::new(
            pool,
            Options {
                issuer: "iss".into(),
                audience: "aud".into(),
                ttl: TTL,
                trusted_gateway: "spiffe://shop.test/ns/shop/sa/gateway".parse().unwrap(),
                max_concurrent_hashes: 2,
            },
        )
        .await
        .unwrap()
    }

    /// `(kid, retired_at)` of every stored key, oldest first.
    async fn stored(service: &AuthService) -> Vec<(String, Option<i64>)> {
        sqlx::query("SELECT kid, retired_at FROM signing_keys ORDER BY created_at, kid")
            .fetch_all(&service.inner.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|row| (row.get("kid"), row.get("retired_at")))
            .collect()
    }

    #[tokio::test]
    async fn keys_are_deleted_once_their_last_token_has_expired() {
        let db = TempDb::new();
        let service = service(&db).await;
        let pool = &service.inner.pool;
        let now = time::now_millis();
        let last_useful = now - TTL.as_millis() as i64 - LEEWAY_SECS as i64 * 1000;
        let mut retired = Vec::new();
        for (age, retired_at) in [(3, last_useful - 1), (2, last_useful + 1_000)] {
            let key = create_key(pool, now - age * 86_400_000).await.unwrap();
            sqlx::query("UPDATE signing_keys SET retired_at = $1 WHERE kid = $2")
                .bind(retired_at)
                .bind(&key.kid)
                .execute(pool)
                .await
                .unwrap();
            retired.push(key.kid);
        }
        let active = service.keys().signing.kid.clone();
        assert_eq!(stored(&service).await.len(), 3);
        service
            .rotation_turn(Duration::from_secs(3_600), now)
            .await
            .unwrap();
        let kids: Vec<String> = stored(&service).await.into_iter().map(|k| k.0).collect();
        assert!(
            !kids.contains(&retired[0]),
            "a key past its last token is deleted: {kids:?}"
        );
        assert!(
            kids.contains(&retired[1]),
            "a key whose tokens may still verify is kept"
        );
        assert!(kids.contains(&active), "the active key is kept");
    }

    #[tokio::test]
    async fn replicas_rotating_at_once_retire_one_key_and_agree_on_the_next() {
        let db = TempDb::new();
        let a = service(&db).await;
        let b = service(&db).await;
        let max_age = Duration::from_secs(2);
        let mut now = time::now_millis();
        for round in 1..=3 {
            // Both find the key too old at the same moment.
            now += 10_000;
            let (ra, rb) =
                tokio::join!(a.rotation_turn(max_age, now), b.rotation_turn(max_age, now));
            ra.unwrap();
            rb.unwrap();
            let keys = stored(&a).await;
            assert_eq!(keys.len(), 1 + round, "one new key per round: {keys:?}");
            let active: Vec<&String> = keys
                .iter()
                .filter(|k| k.1.is_none())
                .map(|k| &k.0)
                .collect();
            assert_eq!(active.len(), 1, "{keys:?}");
            assert_eq!(&a.keys().signing.kid, active[0]);
            assert_eq!(&b.keys().signing.kid, active[0], "the loser adopted it");
        }
    }

    #[tokio::test]
    async fn a_replica_that_did_not_rotate_signs_with_the_new_key() {
        let db = TempDb::new();
        let a = service(&db).await;
        let b = service(&db).await;
        let old = b.keys().signing.kid.clone();
        a.rotation_turn(Duration::from_secs(2), time::now_millis() + 10_000)
            .await
            .unwrap();
        let new = a.keys().signing.kid.clone();
        assert_ne!(new, old);
        assert_eq!(b.current_keys().await.unwrap().signing.kid, new);
    }

    #[tokio::test]
    async fn a_replica_that_did_not_rotate_publishes_the_new_key() {
        use auth_service_server::AuthService as _;
        let db = TempDb::new();
        let a = service(&db).await;
        let b = service(&db).await;
        a.rotation_turn(Duration::from_secs(2), time::now_millis() + 10_000)
            .await
            .unwrap();
        let new = a.keys().signing.kid.clone();
        // Past the reload gap, b's published keys are the database's, so a
        // verifier refreshing from b learns the key a signs with now.
        tokio::time::sleep(KEY_RELOAD_INTERVAL).await;
        let published = b
            .get_public_keys(Request::new(GetPublicKeysRequest {}))
            .await
            .unwrap()
            .into_inner()
            .keys;
        assert!(
            published.iter().any(|k| k.kid == new),
            "b published {published:?}, not {new}"
        );
    }
}
