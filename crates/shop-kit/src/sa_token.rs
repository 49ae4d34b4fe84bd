//! Kubernetes projected ServiceAccount tokens: their claims, and a dev
//! token issuer that stands in for the cluster's.
//!
//! A projected token (a `serviceAccountToken` volume source) is a JWT the
//! kubelet writes into the pod and rotates, signed by the cluster's
//! ServiceAccount issuer, bound to an audience and expiring. The mesh's
//! identity service takes it as proof of a workload's namespace and
//! ServiceAccount. [`DevTokenIssuer`] mints the same tokens with a local
//! ES256 key and publishes its JWKS, for `shopctl up` and tests, where no
//! cluster exists.

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _},
};
use serde::{Deserialize, Serialize};

/// A named object in the `kubernetes.io` claim.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ObjectRef {
    /// The object's name.
    pub name: String,
    /// The object's uid.
    #[serde(default)]
    pub uid: String,
}

/// The `kubernetes.io` claim of a ServiceAccount token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KubernetesClaim {
    /// The pod's namespace.
    pub namespace: String,
    /// The ServiceAccount the token is for.
    pub serviceaccount: ObjectRef,
    /// The pod the token is bound to (projected tokens only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<ObjectRef>,
}

/// The claims of a projected ServiceAccount token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceAccountClaims {
    /// The cluster's ServiceAccount issuer.
    pub iss: String,
    /// `system:serviceaccount:<namespace>:<name>`.
    pub sub: String,
    /// Audiences (Kubernetes always writes a list).
    pub aud: Vec<String>,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Not before, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// Namespace, ServiceAccount and pod.
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: KubernetesClaim,
}

impl ServiceAccountClaims {
    /// Claims as the kubelet would request them: for `service_account` in
    /// `namespace`, to `audience`, valid from now for `ttl`.
    pub fn new(
        issuer: &str,
        namespace: &str,
        service_account: &str,
        audience: &str,
        ttl: Duration,
    ) -> Self {
        let now = unix(SystemTime::now());
        Self {
            iss: issuer.to_owned(),
            sub: format!("system:serviceaccount:{namespace}:{service_account}"),
            aud: vec![audience.to_owned()],
            exp: now + ttl.as_secs() as i64,
            iat: now,
            nbf: Some(now),
            kubernetes: KubernetesClaim {
                namespace: namespace.to_owned(),
                serviceaccount: ObjectRef {
                    name: service_account.to_owned(),
                    uid: uuid::Uuid::new_v4().to_string(),
                },
                pod: None,
            },
        }
    }
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Why the dev issuer could not do something.
#[derive(Debug, thiserror::Error)]
#[error("dev token issuer: {0}")]
pub struct DevTokenError(String);

/// A token issuer for development: an ES256 key standing in for the
/// cluster's ServiceAccount issuer. Never use it in a real cluster.
pub struct DevTokenIssuer {
    issuer: String,
    pkcs8: Vec<u8>,
    kid: String,
    x: String,
    y: String,
}

impl std::fmt::Debug for DevTokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevTokenIssuer")
            .field("issuer", &self.issuer)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl DevTokenIssuer {
    /// A new issuer named `issuer` (the `iss` of its tokens) with a fresh key.
    pub fn generate(issuer: &str) -> Result<Self, DevTokenError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| DevTokenError("cannot generate a key".into()))?;
        Self::from_pkcs8(issuer, pkcs8.as_ref())
    }

    /// The issuer with the PKCS#8 (DER) P-256 key `pkcs8`.
    pub fn from_pkcs8(issuer: &str, pkcs8: &[u8]) -> Result<Self, DevTokenError> {
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &rng)
            .map_err(|e| DevTokenError(format!("not a PKCS#8 P-256 key: {e}")))?;
        let point = pair.public_key().as_ref();
        if point.len() != 65 || point[0] != 4 {
            return Err(DevTokenError("unexpected public key encoding".into()));
        }
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let digest = ring::digest::digest(&ring::digest::SHA256, point);
        Ok(Self {
            issuer: issuer.to_owned(),
            pkcs8: pkcs8.to_vec(),
            kid: b64.encode(&digest.as_ref()[..12]),
            x: b64.encode(&point[1..33]),
            y: b64.encode(&point[33..]),
        })
    }

    /// Reads the issuer from `dir` (`issuer`, `key.der`), creating it
    /// there (the key 0600) on first use; writes `jwks.json` each time.
    pub fn load_or_create(dir: &Path, issuer: &str) -> Result<Self, DevTokenError> {
        let io = |e: std::io::Error| DevTokenError(format!("{}: {e}", dir.display()));
        let key_path = dir.join("key.der");
        let this = match std::fs::read(&key_path) {
            Ok(der) => Self::from_pkcs8(issuer, &der)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let this = Self::generate(issuer)?;
                std::fs::create_dir_all(dir).map_err(io)?;
                write_private(&key_path, &this.pkcs8).map_err(io)?;
                this
            }
            Err(e) => return Err(io(e)),
        };
        std::fs::write(dir.join("jwks.json"), this.jwks_json()).map_err(io)?;
        Ok(this)
    }

    /// The `iss` of its tokens.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The public key set, as the cluster publishes it at
    /// `/openid/v1/jwks`.
    pub fn jwks_json(&self) -> String {
        serde_json::json!({
            "keys": [{
                "kty": "EC",
                "crv": "P-256",
                "alg": "ES256",
                "use": "sig",
                "kid": self.kid,
                "x": self.x,
                "y": self.y,
            }]
        })
        .to_string()
    }

    /// A token with exactly these claims.
    pub fn mint_claims(&self, claims: &ServiceAccountClaims) -> Result<String, DevTokenError> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(&self.pkcs8))
            .map_err(|e| DevTokenError(format!("cannot sign: {e}")))
    }

    /// A token for `service_account` in `namespace`, to `audience`, valid for `ttl`.
    pub fn mint(
        &self,
        namespace: &str,
        service_account: &str,
        audience: &str,
        ttl: Duration,
    ) -> Result<String, DevTokenError> {
        self.mint_claims(&ServiceAccountClaims::new(
            &self.issuer,
            namespace,
            service_account,
            audience,
            ttl,
        ))
    }
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)?.write_all(contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_against_the_published_jwks() {
        let issuer = DevTokenIssuer::generate("https://dev.example").unwrap();
        let token = issuer
            .mint("shop", "orders", "mesh-identity", Duration::from_secs(600))
            .unwrap();
        let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&issuer.jwks_json()).unwrap();
        let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
        let key = jsonwebtoken::DecodingKey::from_jwk(set.find(&kid).unwrap()).unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::ES256);
        validation.set_audience(&["mesh-identity"]);
        validation.set_issuer(&["https://dev.example"]);
        let claims = jsonwebtoken::decode::<ServiceAccountClaims>(&token, &key, &validation)
            .unwrap()
            .claims;
        assert_eq!(claims.sub, "system:serviceaccount:shop:orders");
        assert_eq!(claims.kubernetes.serviceaccount.name, "orders");
    }
}
