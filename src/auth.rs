//! Who may connect, join and publish. With `--jwt-secret` or `--jwt-public-key` set, every upgrade
//! carries a JWT: `sub` is the user id, `rooms` (glob patterns) limits what it may join, `pub`
//! allows publishing and direct messages, and `exp` bounds the connection's life. Without either,
//! clients name themselves and may do anything (the embedded default; the node warns at start).
//!
//! Tokens and keys are never logged.

use std::sync::Arc;

use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::names;

/// Where JWT signatures are checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtKey {
    /// HS256 with this secret.
    Secret(String),
    /// RS256 or ES256 with this PEM public key.
    PublicKeyPem(String),
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("invalid key: {0}")]
    Key(String),
}

/// What one connection may do.
#[derive(Debug, Clone)]
pub struct Grants {
    pub user: Arc<str>,
    rooms: Option<Vec<glob::Pattern>>,
    can_publish: bool,
    /// Seconds since the Unix epoch after which the connection is closed.
    pub expires: Option<u64>,
}

impl Grants {
    /// No auth configured: the client's own name, every right.
    pub fn open(user: Arc<str>) -> Grants {
        Grants {
            user,
            rooms: None,
            can_publish: true,
            expires: None,
        }
    }

    pub fn may_join(&self, room: &str) -> bool {
        self.rooms
            .as_ref()
            .is_none_or(|patterns| patterns.iter().any(|p| p.matches(room)))
    }

    pub fn may_publish(&self) -> bool {
        self.can_publish
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: Option<u64>,
    rooms: Option<Vec<String>>,
    #[serde(rename = "pub")]
    publish: Option<bool>,
}

/// Checks tokens against the configured key.
pub struct Verifier {
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

/// Builds the decoding key, refusing what cannot be parsed (checked at start by the config).
pub fn decoding_key(key: &JwtKey) -> Result<(DecodingKey, Vec<Algorithm>), AuthError> {
    match key {
        JwtKey::Secret(s) => Ok((DecodingKey::from_secret(s.as_bytes()), vec![Algorithm::HS256])),
        JwtKey::PublicKeyPem(pem) => {
            if let Ok(k) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
                Ok((k, vec![Algorithm::RS256]))
            } else if let Ok(k) = DecodingKey::from_ec_pem(pem.as_bytes()) {
                Ok((k, vec![Algorithm::ES256]))
            } else {
                Err(AuthError::Key("not an RSA or EC public key in PEM".into()))
            }
        }
    }
}

impl Verifier {
    pub fn new(key: &JwtKey) -> Result<Verifier, AuthError> {
        let (key, algorithms) = decoding_key(key)?;
        Ok(Verifier { key, algorithms })
    }

    pub fn verify(&self, token: &str) -> Result<Grants, AuthError> {
        let header = decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        if !self.algorithms.contains(&header.alg) {
            return Err(AuthError::Invalid(format!("algorithm {:?} not accepted", header.alg)));
        }
        let mut validation = Validation::new(header.alg);
        validation.required_spec_claims = ["sub"].into_iter().map(String::from).collect();
        validation.leeway = 0;
        let data = decode::<Claims>(token, &self.key, &validation).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let claims = data.claims;
        names::check(&claims.sub).map_err(|e| AuthError::Invalid(format!("sub {e}")))?;
        let rooms = match claims.rooms {
            None => None,
            Some(list) => Some(
                list.iter()
                    .map(|p| glob::Pattern::new(p).map_err(|e| AuthError::Invalid(format!("rooms pattern {p:?}: {e}"))))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        Ok(Grants {
            user: claims.sub.into(),
            rooms,
            can_publish: claims.publish.unwrap_or(false),
            expires: claims.exp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn later() -> u64 {
        crate::envelope::now_us() / 1_000_000 + 3600
    }

    #[test]
    fn grants_follow_claims() {
        let v = Verifier::new(&JwtKey::Secret("k".into())).unwrap();
        let g = v
            .verify(&token(
                json!({"sub":"ann","exp":later(),"rooms":["match:*","lobby"],"pub":true}),
                "k",
            ))
            .unwrap();
        assert_eq!(&*g.user, "ann");
        assert!(g.may_join("match:42") && g.may_join("lobby") && !g.may_join("vip"));
        assert!(g.may_publish());
        let g = v.verify(&token(json!({"sub":"bob","exp":later()}), "k")).unwrap();
        assert!(g.may_join("anything") && !g.may_publish());
    }

    #[test]
    fn bad_tokens_are_refused() {
        let v = Verifier::new(&JwtKey::Secret("k".into())).unwrap();
        assert!(v.verify("not.a.token").is_err());
        assert!(
            v.verify(&token(json!({"sub":"a","exp":later()}), "other")).is_err(),
            "wrong signature"
        );
        assert!(v.verify(&token(json!({"sub":"a","exp":1}), "k")).is_err(), "expired");
        assert!(v.verify(&token(json!({"exp":later()}), "k")).is_err(), "no sub");
        assert!(
            v.verify(&token(json!({"sub":"","exp":later()}), "k")).is_err(),
            "empty sub"
        );
        assert!(
            v.verify(&token(json!({"sub":"a","exp":later(),"rooms":["[" ]}), "k"))
                .is_err(),
            "bad glob"
        );
    }
}
