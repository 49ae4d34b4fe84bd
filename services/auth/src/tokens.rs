//! JWT issue and verification.
//!
//! Verification pins `EdDSA`, requires `exp`, `iss`, `aud` and `sub`, allows
//! 30 s of clock skew, and uses the token's `kid` only to look a key up in
//! the known set, never to build a path or a query.

use std::collections::HashMap;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};

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

/// An Ed25519 signing key with its id.
pub(crate) struct SigningKey {
    pub(crate) kid: String,
    encoding: EncodingKey,
    /// Public key, base64url without padding (the JWK `x`).
    pub(crate) x: String,
}

impl SigningKey {
    /// A new random key: `(key, pkcs8 document base64)` for storage.
    pub(crate) fn generate() -> Result<(Self, String), String> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| e.to_string())?;
        let stored = URL_SAFE_NO_PAD.encode(pkcs8.as_ref());
        let kid = uuid::Uuid::new_v4().simple().to_string();
        Ok((Self::from_stored(kid, &stored)?, stored))
    }

    /// Rebuilds a key from its stored pkcs8 document.
    pub(crate) fn from_stored(kid: String, stored: &str) -> Result<Self, String> {
        let pkcs8 = URL_SAFE_NO_PAD.decode(stored).map_err(|e| e.to_string())?;
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|e| e.to_string())?;
        Ok(Self {
            kid,
            encoding: EncodingKey::from_ed_der(&pkcs8),
            x: URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()),
        })
    }

    /// Signs `claims` with this key, naming it in the `kid` header.
    pub(crate) fn sign(&self, claims: &Claims) -> Result<String, String> {
        let header = Header {
            kid: Some(self.kid.clone()),
            ..Header::new(Algorithm::EdDSA)
        };
        jsonwebtoken::encode(&header, claims, &self.encoding).map_err(|e| e.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp_offset: i64) -> Claims {
        let now = shop_kit::time::now_millis() / 1000;
        Claims {
            sub: "u1".into(),
            name: "ann".into(),
            iss: "iss".into(),
            aud: "aud".into(),
            exp: now + exp_offset,
            iat: now,
            nbf: None,
        }
    }

    #[test]
    fn verifies_own_tokens_and_refuses_tampering() {
        let (key, _) = SigningKey::generate().unwrap();
        let verifier =
            TokenVerifier::new("iss", "aud", [(key.kid.as_str(), key.x.as_str())]).unwrap();
        let token = key.sign(&claims(60)).unwrap();
        assert_eq!(verifier.verify(&token).unwrap().sub, "u1");

        let expired = key.sign(&claims(-120)).unwrap();
        assert!(matches!(
            verifier.verify(&expired),
            Err(TokenError::Invalid(_))
        ));

        let other =
            TokenVerifier::new("iss", "other", [(key.kid.as_str(), key.x.as_str())]).unwrap();
        assert!(matches!(other.verify(&token), Err(TokenError::Invalid(_))));

        let (stranger, _) = SigningKey::generate().unwrap();
        let forged = SigningKey {
            kid: key.kid.clone(),
            ..stranger
        }
        .sign(&claims(60))
        .unwrap();
        assert!(matches!(
            verifier.verify(&forged),
            Err(TokenError::Invalid(_))
        ));
        assert!(matches!(
            verifier.verify("a.b.c"),
            Err(TokenError::Malformed)
        ));
    }

    fn b64(json: &str) -> String {
        URL_SAFE_NO_PAD.encode(json)
    }

    /// A token with this header and payload JSON, signed by `key`.
    fn signed_raw(key: &SigningKey, header: &str, payload: &str) -> String {
        let message = format!("{}.{}", b64(header), b64(payload));
        let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &key.encoding, Algorithm::EdDSA)
            .unwrap();
        format!("{message}.{sig}")
    }

    #[test]
    fn refuses_every_classic_jwt_attack() {
        let (key, _) = SigningKey::generate().unwrap();
        let verifier =
            TokenVerifier::new("iss", "aud", [(key.kid.as_str(), key.x.as_str())]).unwrap();
        let now = shop_kit::time::now_millis() / 1000;
        let kid = key.kid.clone();
        let payload = |exp: &str, extra: &str| {
            format!(r#"{{"sub":"u","name":"n","iss":"iss","aud":"aud","iat":{now}{exp}{extra}}}"#)
        };
        let good = payload(&format!(r#","exp":{}"#, now + 60), "");
        let header = format!(r#"{{"alg":"EdDSA","kid":"{kid}","typ":"JWT"}}"#);
        assert!(
            verifier.verify(&signed_raw(&key, &header, &good)).is_ok(),
            "control"
        );

        let refuse = |token: String, why: &str| {
            assert!(verifier.verify(&token).is_err(), "accepted: {why}");
        };
        // alg: none, no signature.
        let none = format!(r#"{{"alg":"none","kid":"{kid}"}}"#);
        refuse(format!("{}.{}.", b64(&none), b64(&good)), "alg none");
        // HS256 "signed" with the public key as the HMAC secret.
        let hs = jsonwebtoken::encode(
            &Header {
                kid: Some(kid.clone()),
                ..Header::new(Algorithm::HS256)
            },
            &serde_json::from_str::<serde_json::Value>(&good).unwrap(),
            &EncodingKey::from_secret(key.x.as_bytes()),
        )
        .unwrap();
        refuse(hs, "HS256 with the public key");
        // An algorithm that is not allowed, even over a valid EdDSA signature.
        let es = format!(r#"{{"alg":"ES256","kid":"{kid}"}}"#);
        refuse(signed_raw(&key, &es, &good), "alg ES256");
        // Expired beyond the leeway; exp and nbf as strings; no exp.
        let expired = payload(&format!(r#","exp":{}"#, now - 120), "");
        refuse(signed_raw(&key, &header, &expired), "expired");
        let string_exp = payload(&format!(r#","exp":"{}""#, now + 60), "");
        refuse(signed_raw(&key, &header, &string_exp), "exp as a string");
        let string_nbf = payload(
            &format!(r#","exp":{}"#, now + 60),
            &format!(r#","nbf":"{now}""#),
        );
        refuse(signed_raw(&key, &header, &string_nbf), "nbf as a string");
        refuse(signed_raw(&key, &header, &payload("", "")), "no exp");
        // Wrong audience, wrong issuer.
        let wrong_aud = good.replace(r#""aud":"aud""#, r#""aud":"other""#);
        refuse(signed_raw(&key, &header, &wrong_aud), "wrong aud");
        let wrong_iss = good.replace(r#""iss":"iss""#, r#""iss":"evil""#);
        refuse(signed_raw(&key, &header, &wrong_iss), "wrong iss");
        // Unknown and hostile key ids are only looked up, never used.
        for bad_kid in ["unknown", "../../etc/passwd", "' OR 1=1 --", ""] {
            let h = format!(r#"{{"alg":"EdDSA","kid":"{bad_kid}"}}"#);
            let result = verifier.verify(&signed_raw(&key, &h, &good));
            assert!(
                matches!(result, Err(TokenError::UnknownKey)),
                "kid {bad_kid:?}"
            );
        }
        // A token of a key that has left the set (rotated out and expired).
        let (old, _) = SigningKey::generate().unwrap();
        let old_header = format!(r#"{{"alg":"EdDSA","kid":"{}"}}"#, old.kid);
        let result = verifier.verify(&signed_raw(&old, &old_header, &good));
        assert!(matches!(result, Err(TokenError::UnknownKey)));
    }

    proptest::proptest! {
        // Random text and a real token with one byte changed never verify.
        #[test]
        fn garbage_and_tampered_tokens_never_verify(garbage in "\\PC{0,400}", at in 0usize..400, byte in 0u8..128) {
            let (key, _) = SigningKey::generate().unwrap();
            let verifier = TokenVerifier::new("iss", "aud", [(key.kid.as_str(), key.x.as_str())]).unwrap();
            proptest::prop_assert!(verifier.verify(&garbage).is_err());
            let token = key.sign(&claims(60)).unwrap();
            let mut bytes = token.clone().into_bytes();
            let i = at % bytes.len();
            if bytes[i] != byte && byte.is_ascii_graphic() {
                bytes[i] = byte;
                let tampered = String::from_utf8(bytes).unwrap();
                proptest::prop_assert!(verifier.verify(&tampered).is_err(), "{} verified", tampered);
            }
        }
    }
}
