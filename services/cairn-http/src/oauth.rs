//! The authorization server's HTTP surface: discovery documents, JWKS, and the token,
//! introspection, revocation, registration and userinfo endpoints (thin handlers over `cairn_auth::AuthServer`), plus the
//! bearer-token check the FHIR API runs on every request.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use cairn_auth::client_auth::FormRequest;
use cairn_auth::{AuthServer, OAuthError, TokenRejection, VerifiedToken};
use cairn_events::Actor;
use serde_json::{Value, json};
use std::sync::Arc;

/// The largest form body the OAuth endpoints read (assertions and tokens are a few KB).
const MAX_FORM_BYTES: usize = 64 * 1024;

pub fn routes(auth: Arc<AuthServer>) -> Router {
    Router::new()
        .route("/.well-known/openid-configuration", get(server_metadata))
        .route("/.well-known/oauth-authorization-server", get(server_metadata))
        .route("/fhir/.well-known/smart-configuration", get(smart_configuration))
        .route("/jwks", get(jwks))
        .route("/token", post(token))
        .route("/introspect", post(introspect))
        .route("/revoke", post(revoke))
        .route("/register", post(register))
        .route("/userinfo", get(userinfo).post(userinfo))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FORM_BYTES))
        .with_state(auth)
}

/// Public JSON (discovery, JWKS): any origin may read it, as SMART asks.
fn public_json(body: Value) -> Response {
    let mut r = Json(body).into_response();
    r.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=60"));
    r
}

async fn server_metadata(State(auth): State<Arc<AuthServer>>) -> Response {
    public_json(auth.server_metadata())
}

async fn smart_configuration(State(auth): State<Arc<AuthServer>>) -> Response {
    public_json(auth.smart_configuration())
}

async fn jwks(State(auth): State<Arc<AuthServer>>) -> Response {
    public_json(auth.jwks())
}

/// A token-endpoint answer: never cached (RFC 6749 5.1).
fn no_store(status: StatusCode, body: Value) -> Response {
    let mut r = (status, Json(body)).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut().insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    r
}

/// An RFC 6749 5.2 error response.
struct OAuthFailure {
    error: OAuthError,
    basic_attempted: bool,
}

impl IntoResponse for OAuthFailure {
    fn into_response(self) -> Response {
        let e = self.error;
        let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
        let mut r = no_store(status, json!({"error": e.error, "error_description": e.description}));
        if status == StatusCode::UNAUTHORIZED {
            let scheme = if self.basic_attempted { "Basic realm=\"cairn\"" } else { "Bearer realm=\"cairn\"" };
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(scheme));
        }
        r
    }
}

/// The actor as far as HTTP knows it: where the request came from.
pub fn request_actor(headers: &HeaderMap, peer: Option<std::net::SocketAddr>) -> Actor {
    Actor {
        source_address: peer.map(|p| p.ip().to_string()),
        user_agent: headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(256).collect()),
        ..Actor::default()
    }
}

/// Parses an `application/x-www-form-urlencoded` body and the Basic credentials.
fn form_request(headers: &HeaderMap, body: &[u8]) -> Result<FormRequest, OAuthFailure> {
    let fail = |d: &str| OAuthFailure { error: OAuthError::invalid_request(d), basic_attempted: false };
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if content_type.split(';').next().unwrap_or("").trim() != "application/x-www-form-urlencoded" {
        return Err(fail("the body must be application/x-www-form-urlencoded"));
    }
    let params = form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    let basic = match headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        None => None,
        Some(v) => {
            let malformed = || OAuthFailure {
                error: OAuthError::invalid_client("malformed Basic credentials"),
                basic_attempted: true,
            };
            let encoded = v.strip_prefix("Basic ").ok_or_else(malformed)?;
            let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).map_err(|_| malformed())?;
            let text = String::from_utf8(decoded).map_err(|_| malformed())?;
            let (id, secret) = text.split_once(':').ok_or_else(malformed)?;
            // RFC 6749 2.3.1: both parts are form-encoded before base64.
            let decode =
                |s: &str| form_urlencoded::parse(format!("x={s}").as_bytes()).next().map(|(_, v)| v.into_owned());
            Some((decode(id).ok_or_else(malformed)?, decode(secret).ok_or_else(malformed)?))
        }
    };
    Ok(FormRequest { params, basic })
}

/// A form endpoint's answer: 200 with the JSON, never cached, or the RFC 6749 error.
fn answer(req: &FormRequest, result: Result<Value, OAuthError>) -> Result<Response, OAuthFailure> {
    result
        .map(|v| no_store(StatusCode::OK, v))
        .map_err(|error| OAuthFailure { error, basic_attempted: req.basic.is_some() })
}

async fn token(
    State(auth): State<Arc<AuthServer>>,
    peer: crate::fhir::Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OAuthFailure> {
    let req = form_request(&headers, &body)?;
    answer(&req, auth.token(&req, &request_actor(&headers, peer.0)).await)
}

async fn introspect(
    State(auth): State<Arc<AuthServer>>,
    peer: crate::fhir::Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OAuthFailure> {
    let req = form_request(&headers, &body)?;
    answer(&req, auth.introspect(&req, &request_actor(&headers, peer.0)).await)
}

async fn revoke(
    State(auth): State<Arc<AuthServer>>,
    peer: crate::fhir::Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OAuthFailure> {
    let req = form_request(&headers, &body)?;
    answer(&req, auth.revoke(&req, &request_actor(&headers, peer.0)).await.map(|()| json!({})))
}

/// `POST /register` (RFC 7591): JSON in, JSON out, 201 on success.
async fn register(
    State(auth): State<Arc<AuthServer>>,
    peer: crate::fhir::Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let metadata: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            let e = OAuthError::new("invalid_client_metadata", "the body must be a JSON object of client metadata");
            return OAuthFailure { error: e, basic_attempted: false }.into_response();
        }
    };
    match auth.register(bearer, &metadata, &request_actor(&headers, peer.0)).await {
        Ok(v) => no_store(StatusCode::CREATED, v),
        Err(error) => OAuthFailure { error, basic_attempted: false }.into_response(),
    }
}

async fn userinfo(State(auth): State<Arc<AuthServer>>, headers: HeaderMap) -> Response {
    let token = match authenticate_bearer(&auth, &headers).await {
        Ok(t) => t,
        Err(BearerFailure::Rejected(cairn_auth::TokenRejection::FeedBehind)) => {
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        Err(failure) => return bearer_error(StatusCode::UNAUTHORIZED, &failure.challenge().0),
    };
    match auth.userinfo(&token) {
        Ok(v) => {
            let mut r = axum::Json(v).into_response();
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(_) => bearer_error(
            StatusCode::FORBIDDEN,
            "Bearer realm=\"cairn\", error=\"insufficient_scope\", scope=\"openid\"",
        ),
    }
}

fn bearer_error(status: StatusCode, challenge: &str) -> Response {
    let mut r = status.into_response();
    if let Ok(v) = HeaderValue::from_str(challenge) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

/// Why a FHIR request was not authenticated, as RFC 6750 wants it said.
pub enum BearerFailure {
    /// No credentials at all: 401 with a bare challenge.
    Missing,
    /// Something other than `Authorization: Bearer <token>`.
    Malformed,
    Rejected(TokenRejection),
}

impl BearerFailure {
    /// The `WWW-Authenticate` challenge and the human explanation.
    pub fn challenge(&self) -> (String, String) {
        match self {
            BearerFailure::Missing => ("Bearer realm=\"cairn\"".into(), "a bearer token is required".into()),
            BearerFailure::Malformed => (
                "Bearer realm=\"cairn\", error=\"invalid_request\", error_description=\"use Authorization: Bearer <token>\"".into(),
                "the Authorization header is not a bearer token".into(),
            ),
            BearerFailure::Rejected(r) => {
                (format!("Bearer realm=\"cairn\", error=\"invalid_token\", error_description=\"{r}\""), r.to_string())
            }
        }
    }
}

/// Verifies the request's bearer token.
pub async fn authenticate_bearer(auth: &AuthServer, headers: &HeaderMap) -> Result<Arc<VerifiedToken>, BearerFailure> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else { return Err(BearerFailure::Missing) };
    if values.next().is_some() {
        return Err(BearerFailure::Malformed);
    }
    let value = value.to_str().map_err(|_| BearerFailure::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(BearerFailure::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(BearerFailure::Malformed);
    }
    auth.verify(token.trim()).await.map_err(BearerFailure::Rejected)
}
