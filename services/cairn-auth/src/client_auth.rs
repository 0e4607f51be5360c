//! Who is calling the token, introspection and revocation endpoints (RFC 6749 2.3, RFC 7523).
//!
//! Exactly one method per request: HTTP Basic (`client_secret_basic`), `client_secret` in the form
//! (`client_secret_post`), a signed assertion (`private_key_jwt`), or, for public clients, the bare
//! `client_id`. A client may only use the method its registration says.

use crate::state::{AuthState, Client};
use crate::{OAuthError, assertion};
use cairn_events::ClientKind;
use subtle::ConstantTimeEq;

/// The parameters of a form-encoded OAuth request, and the Basic credentials if any.
#[derive(Debug, Clone, Default)]
pub struct FormRequest {
    pub params: Vec<(String, String)>,
    /// `Authorization: Basic`, already base64- and form-decoded (RFC 6749 2.3.1).
    pub basic: Option<(String, String)>,
}

impl FormRequest {
    /// One parameter. RFC 6749 3.1: parameters must not be repeated; empty means absent.
    pub fn get(&self, name: &str) -> Result<Option<&str>, OAuthError> {
        let mut found = self.params.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let first = found.next();
        if found.next().is_some() {
            return Err(OAuthError::invalid_request(format!("parameter `{name}` is repeated")));
        }
        Ok(first.filter(|v| !v.is_empty()))
    }

    pub fn require(&self, name: &str) -> Result<&str, OAuthError> {
        self.get(name)?.ok_or_else(|| OAuthError::invalid_request(format!("parameter `{name}` is required")))
    }

    /// The client the request says it comes from, before authentication (for refusal events).
    pub fn claimed_client(&self) -> Option<String> {
        if let Some((id, _)) = &self.basic {
            return Some(id.clone());
        }
        if let Ok(Some(id)) = self.get("client_id") {
            return Some(id.to_owned());
        }
        self.get("client_assertion").ok().flatten().and_then(assertion::claimed_client)
    }
}

/// Authenticates the caller. `token_endpoint` is the audience assertions must name; `fetched_jwks` is
/// the key set fetched from the client's `jwks_uri`, for a client that registered one.
pub fn authenticate(
    state: &AuthState,
    req: &FormRequest,
    token_endpoint: &str,
    replay: &assertion::ReplayCache,
    now: i64,
    fetched_jwks: Option<&serde_json::Value>,
) -> Result<Client, OAuthError> {
    let assertion = req.get("client_assertion")?;
    let assertion_type = req.get("client_assertion_type")?;
    let post_secret = req.get("client_secret")?;
    let methods = [req.basic.is_some(), assertion.is_some(), post_secret.is_some()].iter().filter(|m| **m).count();
    if methods > 1 {
        return Err(OAuthError::invalid_request("use exactly one client authentication method"));
    }
    let form_client_id = req.get("client_id")?;
    let unknown = || OAuthError::invalid_client("unknown client or bad credentials");
    let client = if let Some((id, secret)) = &req.basic {
        if form_client_id.is_some_and(|f| f != id) {
            return Err(OAuthError::invalid_request("client_id does not match the Basic credentials"));
        }
        let client = state.client(id).ok_or_else(unknown)?;
        check_secret(client, secret)?;
        client
    } else if let Some(secret) = post_secret {
        let id = form_client_id.ok_or_else(|| OAuthError::invalid_request("client_secret without client_id"))?;
        let client = state.client(id).ok_or_else(unknown)?;
        check_secret(client, secret)?;
        client
    } else if let Some(jwt) = assertion {
        if assertion_type != Some(assertion::ASSERTION_TYPE) {
            return Err(OAuthError::invalid_request(format!(
                "client_assertion_type must be {}",
                assertion::ASSERTION_TYPE
            )));
        }
        let id =
            assertion::claimed_client(jwt).ok_or_else(|| OAuthError::invalid_client("client_assertion has no iss"))?;
        if form_client_id.is_some_and(|f| f != id) {
            return Err(OAuthError::invalid_client("client_id does not match the assertion's iss"));
        }
        let client = state.client(&id).ok_or_else(unknown)?;
        if client.kind() != ClientKind::ConfidentialAsymmetric {
            return Err(OAuthError::invalid_client("this client does not authenticate with private_key_jwt"));
        }
        let jwks =
            client.registration.jwks.as_ref().or(fetched_jwks).ok_or_else(|| {
                OAuthError::invalid_client("the client's key set could not be fetched from its jwks_uri")
            })?;
        assertion::verify(jwt, &id, jwks, token_endpoint, replay, now)?;
        client
    } else {
        let id = form_client_id.ok_or_else(|| OAuthError::invalid_client("client authentication is required"))?;
        let client = state.client(id).ok_or_else(unknown)?;
        if client.kind() != ClientKind::Public {
            return Err(OAuthError::invalid_client("this client must authenticate"));
        }
        client
    };
    if client.disabled {
        return Err(OAuthError::invalid_client("this client is disabled"));
    }
    Ok(client.clone())
}

fn check_secret(client: &Client, secret: &str) -> Result<(), OAuthError> {
    let expected = match (client.kind(), &client.registration.secret_sha256) {
        (ClientKind::ConfidentialSymmetric, Some(h)) => h.as_bytes(),
        _ => return Err(OAuthError::invalid_client("this client does not authenticate with a secret")),
    };
    let presented = crate::sha256_hex(secret.as_bytes());
    if bool::from(presented.as_bytes().ct_eq(expected)) {
        Ok(())
    } else {
        Err(OAuthError::invalid_client("unknown client or bad credentials"))
    }
}
