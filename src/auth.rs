//! Who may connect, join and publish. With `--jwt-secret` or `--jwt-public-key` set, every upgrade
//! carries a JWT: `sub` is the user id, `rooms` (glob patterns) limits what it may join, `pub`
//! allows publishing and direct messages, `exp` bounds the connection's life, and `limits`
//! (`{"rate":N,"burst":N}`) gives a trusted connection, such as a feed, its own command rate. Without either,
//! clients name themselves and may do anything (the embedded default; the node warns at start).
//!
//! Time claims: `exp` and `nbf` are checked with [`LEEWAY_SECS`] of leeway for clocks that differ a
//! little; a token without `exp` is accepted unless `--require-exp` is set; an `exp` or `nbf` past
//! [`MAX_CLAIM_SECS`] is refused, so every time the node derives from a token is representable.
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

/// Seconds of clock difference allowed on `exp` and `nbf`: claims are whole seconds, and a token
/// minted with `nbf` = now on a host whose clock is a moment ahead must still be accepted.
pub const LEEWAY_SECS: u64 = 5;

/// The latest `exp` or `nbf` accepted: 9999-12-31T23:59:59Z. Later values are no real expiry (a
/// bug in the issuer, or a probe), and far enough out they cannot be added to a clock.
pub const MAX_CLAIM_SECS: u64 = 253_402_300_799;

/// What one connection may do.
#[derive(Debug, Clone)]
pub struct Grants {
    pub user: Arc<str>,
    rooms: Option<Vec<glob::Pattern>>,
    can_publish: bool,
    /// Seconds since the Unix epoch after which the connection is closed; at most
    /// [`MAX_CLAIM_SECS`].
    pub expires: Option<u64>,
    /// The token's own command rate, instead of `--command-rate` and `--command-burst`.
    pub limits: Option<Limits>,
}

/// A connection's command budget: `rate` commands a second after a burst of `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub rate: u32,
    pub burst: u32,
}

/// The most a `limits` claim may raise either number to.
pub const MAX_LIMIT: u32 = 1_000_000;

impl Grants {
    /// No auth configured: the client's own name, every right.
    pub fn open(user: Arc<str>) -> Grants {
        Grants {
            user,
            rooms: None,
            can_publish: true,
            expires: None,
            limits: None,
        }
    }

    /// What a connect hook's answer grants: exactly what a token with these claims would (`sub`,
    /// `rooms`, `pub`, `exp`).
    pub fn granted(
        user: Arc<str>,
        rooms: Option<Vec<glob::Pattern>>,
        can_publish: bool,
        expires: Option<u64>,
    ) -> Grants {
        Grants {
            user,
            rooms,
            can_publish,
            expires,
            limits: None,
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
    nbf: Option<u64>,
    rooms: Option<Vec<String>>,
    #[serde(rename = "pub")]
    publish: Option<bool>,
    limits: Option<serde_json::Value>,
}

/// The `limits` claim: an object of exactly `rate` and `burst`, each from 1 to [`MAX_LIMIT`].
fn limits(claim: &serde_json::Value) -> Result<Limits, AuthError> {
    let bad = || {
        AuthError::Invalid(format!(
            "limits must be {{\"rate\":N,\"burst\":N}}, each from 1 to {MAX_LIMIT}"
        ))
    };
    let fields = claim.as_object().filter(|o| o.len() == 2).ok_or_else(bad)?;
    let number = |key: &str| {
        fields
            .get(key)
            .and_then(serde_json::Value::as_u64)
            .filter(|n| (1..=u64::from(MAX_LIMIT)).contains(n))
            .map(|n| n as u32)
            .ok_or_else(bad)
    };
    Ok(Limits {
        rate: number("rate")?,
        burst: number("burst")?,
    })
}

/// Checks tokens against the configured key.
pub struct Verifier {
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
    require_exp: bool,
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
        Ok(Verifier {
            key,
            algorithms,
            require_exp: false,
        })
    }

    /// Refuse tokens without `exp` (`--require-exp`).
    pub fn require_exp(mut self, required: bool) -> Verifier {
        self.require_exp = required;
        self
    }

    pub fn verify(&self, token: &str) -> Result<Grants, AuthError> {
        let header = decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        if !self.algorithms.contains(&header.alg) {
            return Err(AuthError::Invalid(format!("algorithm {:?} not accepted", header.alg)));
        }
        let mut validation = Validation::new(header.alg);
        let required: &[&str] = if self.require_exp { &["sub", "exp"] } else { &["sub"] };
        validation.required_spec_claims = required.iter().copied().map(String::from).collect();
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let data = decode::<Claims>(token, &self.key, &validation).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let claims = data.claims;
        for (name, value) in [("exp", claims.exp), ("nbf", claims.nbf)] {
            if value.is_some_and(|v| v > MAX_CLAIM_SECS) {
                return Err(AuthError::Invalid(format!(
                    "{name} past {MAX_CLAIM_SECS} (9999-12-31T23:59:59Z)"
                )));
            }
        }
        names::check(&claims.sub).map_err(|e| AuthError::Invalid(format!("sub {e}")))?;
        let rooms = match claims.rooms {
            None => None,
            Some(list) => Some(
                list.iter()
                    .map(|p| glob::Pattern::new(p).map_err(|e| AuthError::Invalid(format!("rooms pattern {p:?}: {e}"))))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let limits = claims.limits.as_ref().map(limits).transpose()?;
        Ok(Grants {
            user: claims.sub.into(),
            rooms,
            can_publish: claims.publish.unwrap_or(false),
            expires: claims.exp,
            limits,
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
        assert_eq!(g.limits, None);
    }

    #[test]
    fn a_limits_claim_is_the_connections_rate_and_a_bad_one_is_refused() {
        let v = Verifier::new(&JwtKey::Secret("k".into())).unwrap();
        let g = v
            .verify(&token(json!({"sub":"feed","limits":{"rate":20000,"burst":40000}}), "k"))
            .unwrap();
        assert_eq!(
            g.limits,
            Some(Limits {
                rate: 20000,
                burst: 40000
            })
        );
        for bad in [
            json!({"rate":0,"burst":10}),
            json!({"rate":10,"burst":MAX_LIMIT + 1}),
            json!({"rate":-1,"burst":10}),
            json!({"rate":"lots","burst":10}),
            json!({"rate":10}),
            json!({"rate":10,"burst":10,"ceiling":1}),
            json!([10, 10]),
        ] {
            let t = token(json!({"sub":"feed","limits":bad}), "k");
            assert!(v.verify(&t).is_err(), "accepted limits {bad}");
        }
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
        assert!(
            v.verify(&token(json!({"sub":"{a}","exp":later()}), "k")).is_err(),
            "brace in sub"
        );
        assert!(
            v.verify(&token(json!({"sub":"a\u{202e}b","exp":later()}), "k"))
                .is_err(),
            "bidi control in sub"
        );
    }

    fn now() -> u64 {
        crate::envelope::now_us() / 1_000_000
    }

    #[test]
    fn nbf_is_enforced_with_the_leeway() {
        let v = Verifier::new(&JwtKey::Secret("k".into())).unwrap();
        let nbf = |at: u64| token(json!({"sub":"a","exp":later(),"nbf":at}), "k");
        assert!(v.verify(&nbf(now() + 3600)).is_err(), "an hour ahead");
        assert!(v.verify(&nbf(now() + LEEWAY_SECS + 2)).is_err(), "past the leeway");
        assert!(v.verify(&nbf(now() + 1)).is_ok(), "within the leeway");
        assert!(v.verify(&nbf(now() - 60)).is_ok(), "in the past");
        assert!(
            v.verify(&token(json!({"sub":"a","nbf":"soon"}), "k")).is_err(),
            "not a number"
        );
        // exp gets the same leeway.
        assert!(v.verify(&token(json!({"sub":"a","exp":now() - 1}), "k")).is_ok());
        assert!(v
            .verify(&token(json!({"sub":"a","exp":now() - LEEWAY_SECS - 2}), "k"))
            .is_err());
    }

    #[test]
    fn far_future_claims_are_refused() {
        let v = Verifier::new(&JwtKey::Secret("k".into())).unwrap();
        assert!(v.verify(&token(json!({"sub":"a","exp":u64::MAX}), "k")).is_err());
        assert!(v
            .verify(&token(json!({"sub":"a","exp":MAX_CLAIM_SECS + 1}), "k"))
            .is_err());
        assert!(
            v.verify(&token(json!({"sub":"a","exp":1e300}), "k")).is_err(),
            "not a u64"
        );
        assert!(v.verify(&token(json!({"sub":"a","exp":-5}), "k")).is_err());
        let g = v.verify(&token(json!({"sub":"a","exp":MAX_CLAIM_SECS}), "k")).unwrap();
        assert_eq!(g.expires, Some(MAX_CLAIM_SECS));
        // The latest accepted expiry still fits on a clock (what the session adds it to).
        let left = MAX_CLAIM_SECS - now();
        assert!(tokio::time::Instant::now()
            .checked_add(std::time::Duration::from_secs(left))
            .is_some());
    }

    #[test]
    fn exp_is_optional_unless_required() {
        let v = Verifier::new(&JwtKey::Secret("k".into())).unwrap();
        let open_ended = token(json!({"sub":"a"}), "k");
        assert_eq!(v.verify(&open_ended).unwrap().expires, None);
        let v = v.require_exp(true);
        assert!(v.verify(&open_ended).is_err());
        assert!(v.verify(&token(json!({"sub":"a","exp":later()}), "k")).is_ok());
    }
}
