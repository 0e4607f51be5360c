//! JWT access tokens (RFC 9068): what they carry, how they are signed, and how a resource server
//! checks them.
//!
//! jsonwebtoken checks the signature, the algorithm allow-list, `iss`, `aud`, `exp` and `nbf`; it
//! does not check `typ`, so we do, before anything else.

use crate::keys::SigningKey;
use crate::scope::ScopeSet;
use crate::state::AuthState;
use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The `typ` header of an RFC 9068 access token.
pub const ACCESS_TOKEN_TYP: &str = "at+jwt";

/// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
pub const LEEWAY_SECS: u64 = 30;

/// The claims of a Cairn access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AccessClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: i64,
    pub iat: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    pub jti: String,
    pub client_id: String,
    pub scope: String,
    /// SMART launch context: the patient in context (a FHIR id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    /// The FHIR resource that represents the user (`Patient/1`, `Practitioner/7`).
    #[serde(default, rename = "fhirUser", skip_serializing_if = "Option::is_none")]
    pub fhir_user: Option<String>,
    /// The refresh-token family the token came from, for family revocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fam: Option<String>,
}

/// Signs `claims` as an RFC 9068 access token.
pub fn sign(claims: &AccessClaims, key: &SigningKey) -> Result<String, crate::AuthError> {
    let mut header = Header::new(key.algorithm);
    header.typ = Some(ACCESS_TOKEN_TYP.into());
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &key.encoding)
        .map_err(|e| crate::AuthError::Internal(format!("signing failed: {e}")))
}

/// A token that passed every check, as the FHIR API sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedToken {
    pub claims: AccessClaims,
    pub scopes: ScopeSet,
    pub kid: String,
}

/// Why a token was refused. Every case is RFC 6750 `invalid_token`; the text says which rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    #[error("the token is not a JWT")]
    Malformed,
    #[error("the token's typ is not at+jwt")]
    WrongType,
    #[error("the token's algorithm is not accepted")]
    Algorithm,
    #[error("the token was signed by an unknown key")]
    UnknownKey,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token was issued by someone else")]
    WrongIssuer,
    #[error("the token is meant for another audience")]
    WrongAudience,
    #[error("the token lacks a required claim or has a malformed one")]
    Claims,
    #[error("the token's client is disabled")]
    ClientDisabled,
    #[error("the token's user is disabled")]
    UserDisabled,
    #[error("the token has been revoked")]
    Revoked,
    /// Not the token's fault: this instance's view of revocations lags too far behind the log to
    /// judge any token safely (503, not 401).
    #[error("this server's revocation feed is behind the log; try again shortly")]
    FeedBehind,
}

/// Verifies tokens against the keys published in the log, remembering the tokens it has already
/// verified (a device gateway sends the same token with every request until it expires).
pub struct Verifier {
    issuer: String,
    audience: String,
    cache: Mutex<HashMap<Arc<str>, Arc<VerifiedToken>>>,
}

/// Verified tokens remembered at most; when full, expired entries are dropped, and if that frees
/// nothing the cache starts over.
const CACHE_LIMIT: usize = 100_000;

impl Verifier {
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Verifier {
        Verifier { issuer: issuer.into(), audience: audience.into(), cache: Mutex::new(HashMap::new()) }
    }

    /// Checks `token` completely: header `typ` and `alg`, a published access-token key, signature,
    /// issuer, audience, expiry, not-before, the claims' shape; then that its client and user are
    /// not disabled (checked on every call, cached or not).
    pub fn verify(&self, token: &str, state: &AuthState, now: i64) -> Result<Arc<VerifiedToken>, TokenRejection> {
        let cached = self.cache.lock().expect("verifier cache").get(token).cloned();
        let verified = match cached {
            Some(v) => {
                if v.claims.exp + (LEEWAY_SECS as i64) < now {
                    return Err(TokenRejection::Expired);
                }
                v
            }
            None => {
                let v = Arc::new(self.verify_uncached(token, state)?);
                let mut cache = self.cache.lock().expect("verifier cache");
                if cache.len() >= CACHE_LIMIT {
                    cache.retain(|_, t| t.claims.exp + (LEEWAY_SECS as i64) >= now);
                    if cache.len() >= CACHE_LIMIT {
                        cache.clear();
                    }
                }
                cache.insert(Arc::from(token), v.clone());
                v
            }
        };
        match state.client(&verified.claims.client_id) {
            Some(c) if c.disabled => return Err(TokenRejection::ClientDisabled),
            None => return Err(TokenRejection::ClientDisabled),
            _ => {}
        }
        if state.is_revoked(&verified.claims, &verified.kid) {
            return Err(TokenRejection::Revoked);
        }
        if let Some(user) = state.user(&verified.claims.sub)
            && user.disabled
        {
            return Err(TokenRejection::UserDisabled);
        }
        Ok(verified)
    }

    fn verify_uncached(&self, token: &str, state: &AuthState) -> Result<VerifiedToken, TokenRejection> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenRejection::Malformed)?;
        let typ_ok = header
            .typ
            .as_deref()
            .is_some_and(|t| t.eq_ignore_ascii_case(ACCESS_TOKEN_TYP) || t.eq_ignore_ascii_case("application/at+jwt"));
        if !typ_ok {
            return Err(TokenRejection::WrongType);
        }
        if header.alg != Algorithm::ES256 {
            return Err(TokenRejection::Algorithm);
        }
        let kid = header.kid.ok_or(TokenRejection::UnknownKey)?;
        let key = state
            .key(&kid)
            .filter(|k| k.purpose == cairn_events::KeyPurpose::AccessToken && k.algorithm == header.alg)
            .filter(|k| k.is_live(crate::now_secs() * 1000))
            .ok_or(TokenRejection::UnknownKey)?;
        let mut validation = Validation::new(key.algorithm);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<AccessClaims>(token, &key.decoding, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidSignature => TokenRejection::BadSignature,
                ErrorKind::ExpiredSignature => TokenRejection::Expired,
                ErrorKind::ImmatureSignature => TokenRejection::NotYetValid,
                ErrorKind::InvalidIssuer => TokenRejection::WrongIssuer,
                ErrorKind::InvalidAudience => TokenRejection::WrongAudience,
                ErrorKind::InvalidAlgorithm => TokenRejection::Algorithm,
                ErrorKind::Json(_) | ErrorKind::MissingRequiredClaim(_) => TokenRejection::Claims,
                _ => TokenRejection::Malformed,
            }
        })?;
        let scopes = ScopeSet::parse(&data.claims.scope).map_err(|_| TokenRejection::Claims)?;
        Ok(VerifiedToken { claims: data.claims, scopes, kid })
    }
}
