use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use shop_api::auth::v1::{
    GetPublicKeysRequest, GetPublicKeysResponse, LoginRequest, LoginResponse, PublicKey,
    RegisterRequest, RegisterResponse, VerifyTokenRequest, VerifyTokenResponse,
    auth_service_server,
};
use shop_kit::{db, time, validate};
use sqlx::{AnyPool, Row};
use tonic::{Request, Response, Status};

use crate::{
    Claims, Error, TokenError, TokenVerifier, password,
    tokens::{LEEWAY_SECS, SigningKey},
};

/// The auth service's gRPC implementation.
#[derive(Clone)]
pub struct AuthService {
    inner: Arc<Inner>,
}

struct Inner {
    pool: AnyPool,
    issuer: String,
    audience: String,
    ttl: Duration,
    keys: RwLock<Arc<Keys>>,
    /// Hash checked when the user does not exist, so both failures cost the same.
    dummy_hash: String,
    last_reload: tokio::sync::Mutex<tokio::time::Instant>,
    limiter: crate::limit::LoginLimiter,
}

struct Keys {
    signing: SigningKey,
    public: Vec<PublicKey>,
    verifier: TokenVerifier,
}

/// Reloading keys on an unknown `kid` is rate limited so random kids cannot
/// turn every request into a database query.
const KEY_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

impl AuthService {
    /// Loads the signing keys (creating the first one if there is none).
    pub async fn new(
        pool: AnyPool,
        issuer: String,
        audience: String,
        ttl: Duration,
    ) -> Result<Self, Error> {
        let dummy_hash = password::hash(uuid::Uuid::new_v4().to_string())
            .await
            .map_err(Error::Keys)?;
        let keys = load_keys(&pool, &issuer, &audience, ttl, true).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                issuer,
                audience,
                ttl,
                keys: RwLock::new(Arc::new(keys)),
                dummy_hash,
                last_reload: tokio::sync::Mutex::new(tokio::time::Instant::now()),
                limiter: crate::limit::LoginLimiter::default(),
            }),
        })
    }

    fn keys(&self) -> Arc<Keys> {
        self.inner.keys.read().expect("key lock poisoned").clone()
    }

    /// Rotates the signing key whenever it is older than `max_age`: a new
    /// key signs from then on, the old one is retired but still verifies
    /// until the last token it signed has expired.
    pub async fn rotate_forever(self, max_age: Duration) {
        let every = (max_age / 4).clamp(Duration::from_millis(500), Duration::from_secs(600));
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.rotate_if_older_than(max_age).await {
                tracing::warn!("signing key rotation failed, will retry: {e}");
            }
        }
    }

    async fn rotate_if_older_than(&self, max_age: Duration) -> Result<(), Error> {
        let inner = &self.inner;
        let keys_error = |e: sqlx::Error| Error::Keys(e.to_string());
        let now = time::now_millis();
        let active: Option<i64> = sqlx::query(
            "SELECT MAX(created_at) AS newest FROM signing_keys WHERE retired_at IS NULL",
        )
        .fetch_one(&inner.pool)
        .await
        .map_err(keys_error)?
        .try_get("newest")
        .map_err(keys_error)?;
        if active.is_some_and(|created| now - created < max_age.as_millis() as i64) {
            return Ok(());
        }
        let mut tx = inner.pool.begin().await.map_err(keys_error)?;
        sqlx::query("UPDATE signing_keys SET retired_at = $1 WHERE retired_at IS NULL")
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(keys_error)?;
        let key = create_key(&mut *tx, now).await?;
        tx.commit().await.map_err(keys_error)?;
        tracing::info!(kid = %key.kid, "signing key rotated");
        let keys = load_keys(
            &inner.pool,
            &inner.issuer,
            &inner.audience,
            inner.ttl,
            false,
        )
        .await?;
        *inner.keys.write().expect("key lock poisoned") = Arc::new(keys);
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
                let inner = &self.inner;
                let keys = load_keys(
                    &inner.pool,
                    &inner.issuer,
                    &inner.audience,
                    inner.ttl,
                    false,
                )
                .await
                .map_err(|e| {
                    tracing::warn!("reloading signing keys failed: {e}");
                    TokenError::UnknownKey
                })?;
                let keys = Arc::new(keys);
                *inner.keys.write().expect("key lock poisoned") = keys.clone();
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
    let oldest_useful = now - ttl.as_millis() as i64 - LEEWAY_SECS as i64 * 1000;
    let rows = sqlx::query(
        "SELECT kid, private_key, retired_at FROM signing_keys \
         WHERE retired_at IS NULL OR retired_at > $1 ORDER BY created_at DESC, kid",
    )
    .bind(oldest_useful)
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

/// Who is logging in, for the brute-force limits: the verified workload
/// identity if any, else the peer address.
fn caller_key<T>(request: &Request<T>) -> String {
    let peer = request.extensions().get::<mesh_client::tls::PeerInfo>();
    match peer {
        Some(p) if p.identity.is_some() => p
            .identity
            .as_ref()
            .map(|i| i.to_string())
            .unwrap_or_default(),
        Some(p) => p
            .remote_addr
            .map(|a| a.ip().to_string())
            .unwrap_or_default(),
        None => "unknown".into(),
    }
}

#[tonic::async_trait]
impl auth_service_server::AuthService for AuthService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let req = request.into_inner();
        let name = username(&req.username)?;
        password_field(&req.password)?;
        let hash = password::hash(req.password.clone()).await.map_err(|e| {
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
        let caller = caller_key(&request);
        let req = request.into_inner();
        if req.username.is_empty() {
            return Err(validate::invalid("username", "is required"));
        }
        if let Err(wait) = self.inner.limiter.check(&caller, &req.username) {
            let secs = wait.as_secs().max(1);
            let mut status =
                Status::resource_exhausted(format!("too many failed logins; retry in {secs} s"));
            if let Ok(value) = secs.to_string().parse() {
                status.metadata_mut().insert("retry-after", value);
            }
            return Err(status);
        }
        if req.password.is_empty() {
            return Err(validate::invalid("password", "is required"));
        }
        if req.username.len() > 64 || req.password.len() > 128 {
            return Err(Status::unauthenticated(BAD_LOGIN));
        }
        let row = sqlx::query("SELECT user_id, password_hash FROM users WHERE username = $1")
            .bind(&req.username)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(db::status)?;
        let (user_id, hash) = match row {
            Some(row) => (
                Some(row.try_get::<String, _>("user_id").map_err(db::status)?),
                row.try_get::<String, _>("password_hash")
                    .map_err(db::status)?,
            ),
            None => (None, self.inner.dummy_hash.clone()),
        };
        // Verify even for a missing user so both failures take the same time.
        let matches = password::verify(req.password, hash).await;
        let user_id = match (user_id, matches) {
            (Some(id), true) => id,
            _ => {
                self.inner.limiter.failed(&caller, &req.username);
                return Err(Status::unauthenticated(BAD_LOGIN));
            }
        };
        self.inner.limiter.succeeded(&caller, &req.username);
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
        let token = self.keys().signing.sign(&claims).map_err(|e| {
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
        Ok(Response::new(GetPublicKeysResponse {
            keys: self.keys().public.clone(),
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
