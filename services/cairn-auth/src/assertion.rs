//! `private_key_jwt` client authentication (RFC 7523, SMART Backend Services): the client signs a
//! short-lived JWT with its own key; we check it against the keys it registered.
//!
//! Rules (SMART App Launch 2.2, Backend Services): `alg` RS384 or ES384; `kid` names one of the
//! client's keys; `jku` is not honoured; `iss` = `sub` = client_id; `aud` = our token endpoint; `exp`
//! at most five minutes ahead; `jti` never seen before from that client (remembered until `exp`).

use crate::OAuthError;
use crate::token::LEEWAY_SECS;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The longest an assertion may live, per SMART.
pub const MAX_ASSERTION_LIFETIME_SECS: i64 = 300;

#[derive(Debug, Deserialize)]
struct AssertionClaims {
    iss: String,
    sub: String,
    exp: i64,
    jti: String,
}

/// The `iss` an assertion claims, read before its signature is checked, to find whose keys to use.
/// Nothing else is trusted from an unverified assertion.
pub fn claimed_client(assertion: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Iss {
        iss: Option<String>,
        sub: Option<String>,
    }
    let claims: Iss = jsonwebtoken::dangerous::insecure_decode(assertion).ok()?.claims;
    claims.iss.or(claims.sub)
}

/// `(client_id, jti)`.
type Used = (String, String);

/// Assertion `jti`s already used, per client, until their `exp`.
#[derive(Default)]
pub struct ReplayCache {
    inner: Mutex<Seen>,
}

/// The used `(client, jti)`s, and the same entries ordered by expiry so that pruning is cheap.
#[derive(Default)]
struct Seen {
    set: HashSet<Used>,
    by_exp: BTreeMap<i64, Vec<Used>>,
}

impl ReplayCache {
    /// Records `(client, jti)`; false if it was already there.
    fn first_use(&self, client_id: &str, jti: &str, exp: i64, now: i64) -> bool {
        let mut guard = self.inner.lock().expect("replay cache");
        let Seen { set: seen, by_exp } = &mut *guard;
        // Forget what has expired (with leeway: an expired assertion is refused anyway).
        let horizon = now - LEEWAY_SECS as i64;
        let stale: Vec<i64> = by_exp.range(..horizon).map(|(k, _)| *k).collect();
        for k in stale {
            for entry in by_exp.remove(&k).unwrap_or_default() {
                seen.remove(&entry);
            }
        }
        let key = (client_id.to_owned(), jti.to_owned());
        if !seen.insert(key.clone()) {
            return false;
        }
        by_exp.entry(exp).or_default().push(key);
        true
    }
}

/// Verifies a client assertion for `client_id` against its JWK Set. Every failure is
/// `invalid_client`, with a description that names the rule broken.
pub fn verify(
    assertion: &str,
    client_id: &str,
    jwks: &serde_json::Value,
    token_endpoint: &str,
    replay: &ReplayCache,
    now: i64,
) -> Result<(), OAuthError> {
    let header = jsonwebtoken::decode_header(assertion)
        .map_err(|_| OAuthError::invalid_client("client_assertion is not a JWT"))?;
    if !matches!(header.alg, Algorithm::RS384 | Algorithm::ES384) {
        return Err(OAuthError::invalid_client("client_assertion must be signed with RS384 or ES384"));
    }
    if header.jku.is_some() {
        return Err(OAuthError::invalid_client("client_assertion jku is not accepted; register the key set instead"));
    }
    let kid = header.kid.ok_or_else(|| OAuthError::invalid_client("client_assertion has no kid"))?;
    let jwk_value =
        jwks["keys"].as_array().into_iter().flatten().find(|k| k["kid"].as_str() == Some(&kid)).ok_or_else(|| {
            OAuthError::invalid_client(format!("client_assertion kid `{kid}` is not one of the client's keys"))
        })?;
    let jwk: Jwk = serde_json::from_value(jwk_value.clone())
        .map_err(|_| OAuthError::invalid_client(format!("the client's key `{kid}` is not a usable JWK")))?;
    if let Some(alg) = jwk_value["alg"].as_str()
        && alg != format!("{:?}", header.alg)
    {
        return Err(OAuthError::invalid_client(format!("client key `{kid}` is for {alg}, not {:?}", header.alg)));
    }
    let key = DecodingKey::from_jwk(&jwk)
        .map_err(|_| OAuthError::invalid_client(format!("the client's key `{kid}` is not usable")))?;
    let mut validation = Validation::new(header.alg);
    validation.leeway = LEEWAY_SECS;
    validation.set_issuer(&[client_id]);
    validation.sub = Some(client_id.to_owned());
    validation.set_audience(&[token_endpoint]);
    validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
    let claims = jsonwebtoken::decode::<AssertionClaims>(assertion, &key, &validation)
        .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            OAuthError::invalid_client(match e.kind() {
                ErrorKind::InvalidSignature => "client_assertion signature does not verify".to_owned(),
                ErrorKind::ExpiredSignature => "client_assertion has expired".to_owned(),
                ErrorKind::InvalidAudience => {
                    format!("client_assertion aud must be the token endpoint {token_endpoint}")
                }
                ErrorKind::InvalidIssuer | ErrorKind::InvalidSubject => {
                    "client_assertion iss and sub must both be the client_id".to_owned()
                }
                ErrorKind::MissingRequiredClaim(c) => format!("client_assertion lacks the {c} claim"),
                ErrorKind::Json(_) => "client_assertion lacks jti or has a malformed claim".to_owned(),
                _ => "client_assertion is malformed".to_owned(),
            })
        })?
        .claims;
    debug_assert_eq!((claims.iss.as_str(), claims.sub.as_str()), (client_id, client_id));
    if claims.exp > now + MAX_ASSERTION_LIFETIME_SECS + LEEWAY_SECS as i64 {
        return Err(OAuthError::invalid_client("client_assertion exp is more than five minutes ahead"));
    }
    if claims.jti.is_empty() || !replay.first_use(client_id, &claims.jti, claims.exp, now) {
        return Err(OAuthError::invalid_client("client_assertion jti was already used"));
    }
    Ok(())
}
