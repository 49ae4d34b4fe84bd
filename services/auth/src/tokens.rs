//! JWT issue. Verification, which every service that checks users shares,
//! lives in [`shop_kit::token`] and is re-exported here.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::{Ed25519KeyPair, KeyPair};

pub use shop_kit::token::{Claims, LEEWAY_SECS, TokenError, TokenVerifier};

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
