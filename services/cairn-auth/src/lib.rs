//! Cairn's authorization server: the decisions, as plain functions over the event log.
//!
//! Clients, users and published signing keys are a projection of the `cairn.auth` topic
//! ([`state::AuthState`]), kept current by tailing it; every grant, refusal, introspection and
//! registration is an event appended before the answer goes out. Access tokens are RFC 9068 JWTs
//! signed by a key of this process ([`keys`]) whose public half was published as an event first, so
//! every API instance that tails the log can verify them ([`token`]). Scopes are SMART's ([`scope`]).
//!
//! Knows nothing of HTTP: `cairn-http` maps requests to these functions and their errors to RFC 6749
//! and RFC 6750 responses.

pub mod assertion;
pub mod client_auth;
pub mod federation;
pub mod flow;
pub mod jwks;
pub mod keys;
pub mod password;
pub mod scope;
pub mod server;
pub mod state;
pub mod token;

pub use server::{AdminCommand, AuthServer, AuthSettings};
pub use token::{TokenRejection, VerifiedToken};

/// An error that is not the client's fault, or a setup problem.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Internal(String),
    /// The log refused the event: fail closed.
    #[error("the event log cannot take the event: {0}")]
    Unavailable(String),
    /// An administrative request that cannot be done as asked.
    #[error("{0}")]
    Invalid(String),
}

/// An RFC 6749 section 5.2 error (also used by introspection, revocation and registration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    /// `invalid_request`, `invalid_client`, `invalid_grant`, `unauthorized_client`,
    /// `unsupported_grant_type`, `invalid_scope`, `unsupported_token_type`, `server_error`,
    /// `temporarily_unavailable`.
    pub error: &'static str,
    pub description: String,
    pub status: u16,
}

impl OAuthError {
    pub fn new(error: &'static str, description: impl Into<String>) -> OAuthError {
        let status = match error {
            "invalid_client" => 401,
            "server_error" => 500,
            "temporarily_unavailable" => 503,
            _ => 400,
        };
        OAuthError { error, description: description.into(), status }
    }
    pub fn invalid_request(d: impl Into<String>) -> OAuthError {
        Self::new("invalid_request", d)
    }
    pub fn invalid_client(d: impl Into<String>) -> OAuthError {
        Self::new("invalid_client", d)
    }
    pub fn invalid_grant(d: impl Into<String>) -> OAuthError {
        Self::new("invalid_grant", d)
    }
    pub fn invalid_scope(d: impl Into<String>) -> OAuthError {
        Self::new("invalid_scope", d)
    }
}

impl From<AuthError> for OAuthError {
    fn from(e: AuthError) -> OAuthError {
        match e {
            AuthError::Unavailable(_) => OAuthError::new(
                "temporarily_unavailable",
                "the audit log cannot record this request; try again shortly",
            ),
            AuthError::Invalid(d) => OAuthError::invalid_request(d),
            AuthError::Internal(d) => {
                tracing::error!(error = %d, "authorization server error");
                OAuthError::new("server_error", "internal error")
            }
        }
    }
}

/// Seconds since the Unix epoch, the unit of JWT time claims.
pub(crate) fn now_secs() -> i64 {
    cairn_events::Timestamp::now().as_millis() / 1000
}

/// A random URL-safe string of `bytes` random bytes (ids, secrets, codes).
pub fn random_token(bytes: usize) -> String {
    use base64::Engine;
    let mut buf = vec![0u8; bytes];
    aws_lc_rs::rand::fill(&mut buf).expect("the system RNG works");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

/// SHA-256 as lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let d = sha2::Sha256::digest(data);
    let mut out = String::with_capacity(64);
    for b in d {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 15) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests;
