//! Verifying Kubernetes projected ServiceAccount tokens against the
//! cluster issuer's published keys.
//!
//! Keys come from a JWKS file or a directory of them (dev and tests: the
//! dev token issuer writes one), or from the cluster's OIDC discovery
//! document (`/.well-known/openid-configuration` → `jwks_uri`). Either is
//! re-read every refresh interval and at once when a token names a key
//! not known (at most every [`MIN_REFRESH_GAP`], so forged `kid`s cannot
//! turn every call into a fetch); a failed refresh keeps the last good keys.
//!
//! A token must be signed with an asymmetric algorithm of its key's family
//! (RS*, PS*, ES*; never HS* or `none`), name the configured issuer, carry
//! the identity service's audience, be unexpired (30 s leeway) and carry
//! `kubernetes.io` namespace and ServiceAccount claims that agree with
//! `sub`.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use base64::Engine as _;
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet},
};
use shop_kit::sa_token::ServiceAccountClaims;

/// Clock skew allowed on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;
/// Largest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// An unknown `kid` refreshes the keys at most this often.
pub const MIN_REFRESH_GAP: Duration = Duration::from_secs(10);
/// Largest JWKS or discovery document read, in bytes.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// Why a token was refused (`UNAUTHENTICATED`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TokenError(pub String);

/// Where the issuer's keys are.
#[derive(Clone, Debug)]
pub enum KeySource {
    /// A JWKS file, or a directory whose `*.json` files are JWKS.
    Files(PathBuf),
    /// An OIDC discovery document URL (`http://` or `https://`).
    Discovery {
        /// The discovery URL.
        url: String,
        /// PEM CA bundle for `https://` (the cluster CA).
        ca_file: Option<PathBuf>,
        /// A bearer token file sent with the requests (the service's own
        /// ServiceAccount token; the API server's discovery endpoints may
        /// require one).
        token_file: Option<PathBuf>,
    },
}

/// A workload identity a token proved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proven {
    /// The namespace.
    pub namespace: String,
    /// The ServiceAccount.
    pub service_account: String,
}

struct Key {
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

/// Verifies ServiceAccount tokens.
pub struct TokenVerifier {
    issuer: String,
    audience: String,
    source: KeySource,
    keys: RwLock<Arc<HashMap<String, Key>>>,
    last_refresh: tokio::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

fn key_of(jwk: &Jwk) -> Option<Key> {
    let algorithms = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return None,
        },
        // Symmetric keys and others: never from a published key set.
        _ => return None,
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(Key { key, algorithms })
}

fn parse_jwks(text: &[u8], origin: &str) -> Result<HashMap<String, Key>, String> {
    let set: JwkSet =
        serde_json::from_slice(text).map_err(|e| format!("{origin}: not a JWKS document: {e}"))?;
    Ok(set
        .keys
        .iter()
        .filter_map(|jwk| Some((jwk.common.key_id.clone()?, key_of(jwk)?)))
        .collect())
}

impl TokenVerifier {
    /// A verifier for tokens from `issuer` to `audience`, keys from `source`
    /// (none loaded until [`TokenVerifier::refresh`]).
    pub fn new(issuer: &str, audience: &str, source: KeySource) -> Self {
        Self {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            source,
            keys: RwLock::new(Arc::new(HashMap::new())),
            last_refresh: tokio::sync::Mutex::new(None),
        }
    }

    /// How many keys are loaded.
    pub fn key_count(&self) -> usize {
        self.keys.read().expect("keys lock").len()
    }

    /// Re-reads the keys; on failure the last good ones stay.
    pub async fn refresh(&self) -> Result<usize, String> {
        *self.last_refresh.lock().await = Some(Instant::now());
        let keys = match &self.source {
            KeySource::Files(path) => read_key_files(path)?,
            KeySource::Discovery {
                url,
                ca_file,
                token_file,
            } => {
                let bearer = token_file
                    .as_ref()
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .map(|t| t.trim().to_owned());
                let doc = crate::http::get(
                    url,
                    ca_file.as_deref(),
                    bearer.as_deref(),
                    MAX_DOCUMENT_BYTES,
                )
                .await?;
                #[derive(serde::Deserialize)]
                struct Discovery {
                    issuer: String,
                    jwks_uri: String,
                }
                let discovery: Discovery = serde_json::from_slice(&doc)
                    .map_err(|e| format!("{url}: not an OIDC discovery document: {e}"))?;
                if discovery.issuer != self.issuer {
                    return Err(format!(
                        "{url} names issuer {:?}, not the configured --token-issuer {:?}",
                        discovery.issuer, self.issuer
                    ));
                }
                // The document may point anywhere; the token goes only to
                // the origin the operator configured.
                let jwks_bearer = bearer
                    .as_deref()
                    .filter(|_| crate::http::same_origin(url, &discovery.jwks_uri));
                let jwks = crate::http::get(
                    &discovery.jwks_uri,
                    ca_file.as_deref(),
                    jwks_bearer,
                    MAX_DOCUMENT_BYTES,
                )
                .await?;
                parse_jwks(&jwks, &discovery.jwks_uri)?
            }
        };
        if keys.is_empty() {
            return Err(
                "the key set holds no usable signing key (RSA, P-256 or P-384 with a kid)".into(),
            );
        }
        let count = keys.len();
        *self.keys.write().expect("keys lock") = Arc::new(keys);
        Ok(count)
    }

    /// Refreshes unless the last refresh was less than [`MIN_REFRESH_GAP`]
    /// ago (an unknown `kid`, or no keys yet: callers cannot make the
    /// service fetch at their rate).
    pub async fn refresh_if_due(&self) {
        // Decided and marked under one hold of the lock: callers queued
        // behind it see the mark, so a burst of unknown kids makes one
        // fetch, not one each.
        let due = {
            let mut last = self.last_refresh.lock().await;
            let due = last.is_none_or(|t| t.elapsed() >= MIN_REFRESH_GAP);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due && let Err(e) = self.refresh().await {
            tracing::warn!("cannot refresh the token issuer's keys: {e}");
        }
    }

    /// Refreshes every `every` until `stop`.
    pub async fn refresh_until(
        self: Arc<Self>,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.refresh().await {
                tracing::warn!(
                    "cannot refresh the token issuer's keys, keeping the last good ones: {e}"
                );
            }
        }
    }

    /// The identity `token` proves, if it is valid now.
    pub async fn verify(&self, token: &str) -> Result<Proven, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError(format!(
                "the token is longer than {MAX_TOKEN_BYTES} bytes"
            )));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| {
            TokenError(
                "the token is not a JWT; send the projected ServiceAccount token file's contents"
                    .into(),
            )
        })?;
        // Name a foreign issuer plainly (this only chooses the message; the
        // token is refused either way and verified in full otherwise).
        if let Some(iss) = unverified_issuer(token).filter(|iss| *iss != self.issuer) {
            return Err(TokenError(format!(
                "the token was issued by {iss:?}, not by the cluster's ServiceAccount issuer {:?}",
                self.issuer
            )));
        }
        let kid = header
            .kid
            .clone()
            .ok_or_else(|| TokenError("the token names no signing key (kid)".into()))?;
        if !self.keys.read().expect("keys lock").contains_key(&kid) {
            self.refresh_if_due().await;
        }
        let keys = self.keys.read().expect("keys lock").clone();
        let key = keys.get(&kid).ok_or_else(|| {
            TokenError(format!(
                "the token was signed by key {kid:?}, which the issuer {:?} does not publish",
                self.issuer
            ))
        })?;
        let mut validation = Validation::new(key.algorithms[0]);
        validation.algorithms = key.algorithms.clone();
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        let claims = jsonwebtoken::decode::<ServiceAccountClaims>(token, &key.key, &validation)
            .map(|data| data.claims)
            .map_err(|e| {
                TokenError(match e.kind() {
                    ErrorKind::ExpiredSignature => "the token has expired; send the current contents of the projected token file (the kubelet rotates it)".into(),
                    ErrorKind::ImmatureSignature => "the token is not valid yet (nbf in the future); check the clocks".into(),
                    ErrorKind::InvalidAudience => format!(
                        "the token's audience is not {:?}; project the token with `audience: {}`",
                        self.audience, self.audience
                    ),
                    ErrorKind::InvalidIssuer => format!("the token's issuer is not {:?}", self.issuer),
                    ErrorKind::InvalidSignature => "the token's signature does not verify".into(),
                    ErrorKind::InvalidAlgorithm => format!(
                        "the token's algorithm {:?} does not fit its key",
                        header.alg
                    ),
                    ErrorKind::Json(_) | ErrorKind::MissingRequiredClaim(_) => "the token lacks the ServiceAccount claims (iss, sub, aud, exp, kubernetes.io namespace and serviceaccount); use a projected ServiceAccount token".into(),
                    _ => format!("the token is invalid: {e}"),
                })
            })?;
        let k = &claims.kubernetes;
        let expected_sub = format!(
            "system:serviceaccount:{}:{}",
            k.namespace, k.serviceaccount.name
        );
        if claims.sub != expected_sub {
            return Err(TokenError(format!(
                "the token's sub {:?} does not match its kubernetes.io claims ({expected_sub:?})",
                claims.sub
            )));
        }
        Ok(Proven {
            namespace: k.namespace.clone(),
            service_account: k.serviceaccount.name.clone(),
        })
    }
}

fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get("iss")?.as_str().map(str::to_owned)
}

fn read_key_files(path: &std::path::Path) -> Result<HashMap<String, Key>, String> {
    let mut keys = HashMap::new();
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_owned()]
    };
    for file in files {
        let text = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        if text.len() > MAX_DOCUMENT_BYTES {
            return Err(format!(
                "{}: larger than {MAX_DOCUMENT_BYTES} bytes",
                file.display()
            ));
        }
        keys.extend(parse_jwks(&text, &file.display().to_string())?);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shop_kit::sa_token::DevTokenIssuer;

    const ISS: &str = "https://kubernetes.default.svc.cluster.local";
    const AUD: &str = "mesh-identity";

    async fn verifier(issuer: &DevTokenIssuer) -> (TokenVerifier, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("jwks.json"), issuer.jwks_json()).unwrap();
        let v = TokenVerifier::new(ISS, AUD, KeySource::Files(dir.path().to_owned()));
        v.refresh().await.unwrap();
        (v, dir)
    }

    #[tokio::test]
    async fn a_good_token_proves_its_service_account() {
        let issuer = DevTokenIssuer::generate(ISS).unwrap();
        let (v, _dir) = verifier(&issuer).await;
        let token = issuer
            .mint("shop", "orders", AUD, Duration::from_secs(600))
            .unwrap();
        assert_eq!(
            v.verify(&token).await.unwrap(),
            Proven {
                namespace: "shop".into(),
                service_account: "orders".into()
            }
        );
    }

    #[tokio::test]
    async fn symmetric_keys_and_unsigned_tokens_are_never_accepted() {
        // A published "oct" key (which no ServiceAccount issuer has) is
        // ignored, so an HS256 token under its kid finds no key.
        let dir = tempfile::tempdir().unwrap();
        let secret =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b"shared-secret-shared-secret");
        std::fs::write(
            dir.path().join("jwks.json"),
            serde_json::json!({"keys": [{"kty": "oct", "kid": "k1", "k": secret, "alg": "HS256"}]})
                .to_string(),
        )
        .unwrap();
        let v = TokenVerifier::new(ISS, AUD, KeySource::Files(dir.path().to_owned()));
        assert!(
            v.refresh().await.is_err(),
            "a key set of only symmetric keys is unusable"
        );
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let claims =
            ServiceAccountClaims::new(ISS, "shop", "orders", AUD, Duration::from_secs(600));
        let token = jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"shared-secret-shared-secret"),
        )
        .unwrap();
        assert!(v.verify(&token).await.is_err());
        // alg "none": not even a JWT to the parser.
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let unsigned = format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","kid":"k1"}"#),
            b64.encode(serde_json::to_vec(&claims).unwrap())
        );
        assert!(v.verify(&unsigned).await.is_err());
        // An ES256 token relabelled RS256 does not fit its key.
        let issuer = DevTokenIssuer::generate(ISS).unwrap();
        let (v, _dir) = verifier(&issuer).await;
        let token = issuer
            .mint("shop", "orders", AUD, Duration::from_secs(600))
            .unwrap();
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let mut header: serde_json::Value =
            serde_json::from_slice(&b64.decode(&parts[0]).unwrap()).unwrap();
        header["alg"] = "RS256".into();
        parts[0] = b64.encode(header.to_string());
        let e = v.verify(&parts.join(".")).await.unwrap_err();
        assert!(e.0.contains("does not fit its key"), "{e}");
    }

    #[tokio::test]
    async fn bad_tokens_are_refused_with_what_is_wrong() {
        let issuer = DevTokenIssuer::generate(ISS).unwrap();
        let (v, _dir) = verifier(&issuer).await;
        let mut expired =
            ServiceAccountClaims::new(ISS, "shop", "orders", AUD, Duration::from_secs(600));
        expired.exp -= 3600;
        expired.iat -= 3600;
        expired.nbf = Some(expired.iat);
        let e = v
            .verify(&issuer.mint_claims(&expired).unwrap())
            .await
            .unwrap_err();
        assert!(e.0.contains("expired"), "{e}");

        let e = v
            .verify(
                &issuer
                    .mint("shop", "orders", "other", Duration::from_secs(600))
                    .unwrap(),
            )
            .await
            .unwrap_err();
        assert!(e.0.contains("audience"), "{e}");

        let foreign = DevTokenIssuer::generate("https://evil.example").unwrap();
        let e = v
            .verify(
                &foreign
                    .mint("shop", "orders", AUD, Duration::from_secs(600))
                    .unwrap(),
            )
            .await
            .unwrap_err();
        assert!(e.0.contains("evil.example"), "{e}");

        // Same issuer name, another key: not published.
        let impostor = DevTokenIssuer::generate(ISS).unwrap();
        let e = v
            .verify(
                &impostor
                    .mint("shop", "orders", AUD, Duration::from_secs(600))
                    .unwrap(),
            )
            .await
            .unwrap_err();
        assert!(e.0.contains("does not publish"), "{e}");

        let mut lying =
            ServiceAccountClaims::new(ISS, "shop", "orders", AUD, Duration::from_secs(600));
        lying.sub = "system:serviceaccount:shop:payments".into();
        let e = v
            .verify(&issuer.mint_claims(&lying).unwrap())
            .await
            .unwrap_err();
        assert!(e.0.contains("does not match"), "{e}");

        let e = v.verify("not a token").await.unwrap_err();
        assert!(e.0.contains("not a JWT"), "{e}");
    }
}
