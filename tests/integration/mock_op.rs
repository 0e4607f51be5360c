//! An OpenID Provider inside the test process, for Cairn to sign users in through as a relying party.
//!
//! A real provider cannot be told to hand out an ID token for someone else, an expired one, or one
//! signed with a key it never published; this one can, on demand ([`Misbehaviour`]), so that the
//! federation tests can show Cairn refuses every one of them. Everything else it does by the book
//! (PKCE S256 only, single-use codes, RFC 6749 client authentication, RFC 9207 `iss` in the
//! authorization response), so that a refusal is caused by the misbehaviour and nothing else.
//!
//! There is no sign-in page and no cookie: `/authorize` answers at once with a 302 to the client's
//! `redirect_uri`, as if the user were already signed in and had consented. Any HTTP client that
//! follows redirects (a browser, or reqwest with a cookie store for Cairn's own session) therefore
//! goes straight through to Cairn's callback.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::KeyPair as _;
use axum::Router;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value, json};

/// How the provider breaks the protocol. Read when each request arrives, so a misbehaviour set between
/// `/authorize` and `/token` still applies to the ID token of that sign-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    /// By the book.
    None,
    /// The ID token's `aud` is `"someone-else"`.
    WrongAudience,
    /// The ID token expired an hour ago (`iat` and `auth_time` two hours ago).
    Expired,
    /// The ID token's `nonce` is not the one of the authorization request.
    WrongNonce,
    /// The ID token's `iss` is `http://evil.example` (the discovery document and the `iss` of the
    /// authorization response stay right, so only the ID token check can catch it).
    WrongIssuer,
    /// Signed by a key that is not in the JWKS, under the `kid` of the one that is.
    ForeignKey,
    /// Signed by a key that is not in the JWKS, under a `kid` that is not either: a relying party that
    /// refetches the JWKS on an unknown `kid` must still refuse it.
    UnknownKid,
    /// `"alg":"none"` and an empty signature (the header still names the published `kid`).
    AlgNone,
    /// HS256 with the published RSA public key as the HMAC secret: the key's SubjectPublicKeyInfo
    /// PEM text (`-----BEGIN PUBLIC KEY-----`, 64-column lines, trailing newline), which is what a
    /// verifier that takes "the key" as bytes whatever the `alg` would feed to HMAC.
    Hs256WithPublicKey,
    /// `/authorize` redirects back with `error=access_denied`.
    ErrorAtAuthorize,
    /// `/token` answers 503 with an HTML body, as a load balancer in front of a dead provider does.
    TokenEndpointDown,
}

/// The provider; the server stops when this is dropped. It runs on the tokio runtime that called
/// [`MockOp::start`]: with a current-thread runtime it only answers while that runtime is polled
/// (inside `block_on`), which is not the case while a test waits synchronously on the Cairn process.
pub struct MockOp {
    issuer: String,
    provider: Arc<Mutex<Provider>>,
    server: tokio::task::JoinHandle<()>,
}

struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
    public_pem: String,
}

/// What one sign-in granted: fixed at `/authorize`, checked and spent at `/token`.
struct Grant {
    client_id: String,
    redirect_uri: String,
    code_challenge: String,
    nonce: String,
    scope: String,
    sub: String,
    extra: Map<String, Value>,
    auth_time: u64,
    used: bool,
}

struct Provider {
    issuer: String,
    client_id: String,
    client_secret: String,
    misbehaviour: Misbehaviour,
    sub: String,
    extra: Map<String, Value>,
    key: SigningKey,
    /// Never published: signs the [`Misbehaviour::ForeignKey`] and [`Misbehaviour::UnknownKid`] tokens.
    foreign: SigningKey,
    codes: HashMap<String, Grant>,
    /// Access token -> the claims `/userinfo` answers with.
    access_tokens: HashMap<String, Map<String, Value>>,
    jwks_fetches: usize,
    token_requests: usize,
}

type Shared = Arc<Mutex<Provider>>;

impl MockOp {
    /// Starts the provider. `client_id`/`client_secret`: the credentials Cairn will present
    /// (client_secret_basic or client_secret_post both accepted).
    pub async fn start(client_id: &str, client_secret: &str) -> MockOp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let (key, foreign) =
            tokio::task::spawn_blocking(|| (signing_key("mock-key-1"), signing_key("never-published"))).await.unwrap();
        let provider = Arc::new(Mutex::new(Provider {
            issuer: issuer.clone(),
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            misbehaviour: Misbehaviour::None,
            sub: "mock-user-1".to_owned(),
            extra: Map::new(),
            key,
            foreign,
            codes: HashMap::new(),
            access_tokens: HashMap::new(),
            jwks_fetches: 0,
            token_requests: 0,
        }));
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/authorize", get(authorize))
            .route("/token", post(token))
            .route("/userinfo", get(userinfo).post(userinfo))
            .with_state(provider.clone());
        // Aborting the serve task also winds down its connections (idle ones at once).
        let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        MockOp { issuer, provider, server }
    }

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn issuer(&self) -> String {
        self.issuer.clone()
    }

    pub fn set_misbehaviour(&self, m: Misbehaviour) {
        self.lock().misbehaviour = m;
    }

    /// The `sub` of the sign-ins from now on (default `mock-user-1`); taken at `/authorize`.
    pub fn set_subject(&self, sub: &str) {
        self.lock().sub = sub.to_owned();
    }

    /// Replaces the extra claims (a JSON object) of the sign-ins from now on, in the ID token and at
    /// `/userinfo`; taken at `/authorize`. They win over the standard claims (so a test can send, say,
    /// an `aud` array), and a misbehaviour wins over both.
    pub fn set_claims(&self, extra: Value) {
        let Value::Object(extra) = extra else { panic!("set_claims takes a JSON object, not {extra}") };
        self.lock().extra = extra;
    }

    /// Publishes a new signing key with a new kid and signs with it from now on; the JWKS holds only
    /// the new key afterwards (tests that the relying party refetches the JWKS on an unknown kid).
    pub fn rotate_key(&self) {
        let kid = format!("mock-key-{}", random_token());
        let key = signing_key(&kid);
        self.lock().key = key;
    }

    /// The `kid` of the published key.
    pub fn kid(&self) -> String {
        self.lock().key.kid.clone()
    }

    /// How many times `/jwks` was fetched.
    pub fn jwks_fetches(&self) -> usize {
        self.lock().jwks_fetches
    }

    /// How many requests reached `/token`, refused and [`Misbehaviour::TokenEndpointDown`] ones included.
    pub fn token_requests(&self) -> usize {
        self.lock().token_requests
    }

    fn lock(&self) -> MutexGuard<'_, Provider> {
        self.provider.lock().unwrap()
    }
}

impl Drop for MockOp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn random_token() -> String {
    let mut b = [0u8; 24];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    URL_SAFE_NO_PAD.encode(b)
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let lines: Vec<&str> = body.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

fn signing_key(kid: &str) -> SigningKey {
    let pair = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
    // jsonwebtoken's DER constructor wants PKCS#1 and aws-lc-rs exports PKCS#8; its PEM reader takes both.
    let pkcs8: Pkcs8V1Der = pair.as_der().unwrap();
    let encoding = EncodingKey::from_rsa_pem(pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes()).unwrap();
    let public = pair.public_key();
    let spki: PublicKeyX509Der = public.as_der().unwrap();
    let components = PublicKeyComponents::<Vec<u8>>::from(public);
    SigningKey {
        kid: kid.to_owned(),
        encoding,
        jwk: json!({"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
            "n": URL_SAFE_NO_PAD.encode(&components.n), "e": URL_SAFE_NO_PAD.encode(&components.e)}),
        public_pem: pem("PUBLIC KEY", spki.as_ref()),
    }
}

fn bad_request(reason: &str) -> Response {
    (StatusCode::BAD_REQUEST, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], reason.to_owned()).into_response()
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let mut resp = (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(json!({"error": error, "error_description": description})),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, "Basic realm=\"mock-op\"".parse().unwrap());
    }
    resp
}

async fn discovery(State(op): State<Shared>) -> Response {
    let issuer = op.lock().unwrap().issuer.clone();
    axum::Json(json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/authorize"),
        "token_endpoint": format!("{issuer}/token"),
        "userinfo_endpoint": format!("{issuer}/userinfo"),
        "jwks_uri": format!("{issuer}/jwks"),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": ["openid", "profile", "email"],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "acr", "amr",
            "name", "email", "email_verified"],
        "authorization_response_iss_parameter_supported": true,
    }))
    .into_response()
}

async fn jwks(State(op): State<Shared>) -> Response {
    let mut op = op.lock().unwrap();
    op.jwks_fetches += 1;
    axum::Json(json!({"keys": [op.key.jwk.clone()]})).into_response()
}

async fn authorize(State(op): State<Shared>, Query(q): Query<HashMap<String, String>>) -> Response {
    let mut op = op.lock().unwrap();
    let param = |name: &str| q.get(name).map(String::as_str).filter(|v| !v.is_empty());
    let Some(client_id) = param("client_id") else { return bad_request("client_id is missing") };
    if client_id != op.client_id {
        return bad_request("unknown client_id");
    }
    let Some(redirect_uri) = param("redirect_uri") else { return bad_request("redirect_uri is missing") };
    let Ok(mut back) = reqwest::Url::parse(redirect_uri) else {
        return bad_request("redirect_uri is not an absolute URL");
    };
    if param("response_type") != Some("code") {
        return bad_request("response_type must be code");
    }
    let scope = param("scope").unwrap_or_default();
    if !scope.split(' ').any(|s| s == "openid") {
        return bad_request("scope must include openid");
    }
    let Some(state) = param("state") else { return bad_request("state is missing") };
    let Some(nonce) = param("nonce") else { return bad_request("nonce is missing") };
    let Some(code_challenge) = param("code_challenge") else { return bad_request("code_challenge is missing") };
    if param("code_challenge_method") != Some("S256") {
        return bad_request("code_challenge_method must be S256");
    }
    if URL_SAFE_NO_PAD.decode(code_challenge).map(|d| d.len()) != Ok(32) {
        return bad_request("code_challenge is not a base64url SHA-256 digest");
    }

    if op.misbehaviour == Misbehaviour::ErrorAtAuthorize {
        back.query_pairs_mut()
            .append_pair("error", "access_denied")
            .append_pair("error_description", "The user declined to sign in")
            .append_pair("state", state)
            .append_pair("iss", &op.issuer);
    } else {
        let code = random_token();
        let grant = Grant {
            client_id: client_id.to_owned(),
            redirect_uri: redirect_uri.to_owned(),
            code_challenge: code_challenge.to_owned(),
            nonce: nonce.to_owned(),
            scope: scope.to_owned(),
            sub: op.sub.clone(),
            extra: op.extra.clone(),
            auth_time: now(),
            used: false,
        };
        op.codes.insert(code.clone(), grant);
        back.query_pairs_mut().append_pair("code", &code).append_pair("state", state).append_pair("iss", &op.issuer);
    }
    (StatusCode::FOUND, [(header::LOCATION, back.to_string()), (header::CACHE_CONTROL, "no-store".to_owned())])
        .into_response()
}

/// `application/x-www-form-urlencoded` decoding, which RFC 6749 2.3.1 applies to both halves of the
/// Basic credentials.
fn form_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            _ => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

/// `None` without a Basic `Authorization` header; `Some(None)` if it is malformed.
fn basic_credentials(headers: &HeaderMap) -> Option<Option<(String, String)>> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(encoded.trim()).ok().and_then(|d| String::from_utf8(d).ok());
    Some(decoded.and_then(|d| {
        let (id, secret) = d.split_once(':')?;
        Some((form_decode(id)?, form_decode(secret)?))
    }))
}

async fn token(
    State(op): State<Shared>,
    headers: HeaderMap,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    let mut op = op.lock().unwrap();
    op.token_requests += 1;
    if op.misbehaviour == Misbehaviour::TokenEndpointDown {
        return (StatusCode::SERVICE_UNAVAILABLE, [(header::CONTENT_TYPE, "text/html")], "<html>down</html>")
            .into_response();
    }
    let Ok(Form(form)) = form else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "the body must be a form");
    };
    let field = |name: &str| form.get(name).map(String::as_str);

    let (client_id, secret) = match (basic_credentials(&headers), field("client_secret")) {
        (Some(_), Some(_)) => {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "more than one client authentication");
        }
        (Some(None), None) => {
            return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "malformed Basic credentials");
        }
        (Some(Some((id, secret))), None) => {
            if field("client_id").is_some_and(|form_id| form_id != id) {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "client_id differs from Basic");
            }
            (id, secret)
        }
        (None, Some(secret)) => (field("client_id").unwrap_or_default().to_owned(), secret.to_owned()),
        (None, None) => return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "no client authentication"),
    };
    if client_id != op.client_id || secret != op.client_secret {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "wrong client credentials");
    }
    if field("grant_type") != Some("authorization_code") {
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type", "only authorization_code");
    }

    let code = field("code").unwrap_or_default();
    let Some(grant) = op.codes.get_mut(code) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "unknown code");
    };
    if grant.used {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "code already used");
    }
    // Any attempt spends the code, as strict providers do.
    grant.used = true;
    if grant.client_id != client_id {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "code issued to another client");
    }
    if field("redirect_uri") != Some(grant.redirect_uri.as_str()) {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "redirect_uri does not match");
    }
    let verifier = field("code_verifier").unwrap_or_default();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes());
    if !(43..=128).contains(&verifier.len()) || URL_SAFE_NO_PAD.encode(digest.as_ref()) != grant.code_challenge {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "code_verifier does not match");
    }

    let scope = grant.scope.clone();
    let mut userinfo = Map::new();
    userinfo.insert("sub".into(), json!(grant.sub));
    userinfo.extend(grant.extra.clone());
    let grant = op.codes.get(code).unwrap();
    let id_token = op.id_token(grant);
    let access_token = random_token();
    op.access_tokens.insert(access_token.clone(), userinfo);
    (
        [(header::CACHE_CONTROL, "no-store"), (header::PRAGMA, "no-cache")],
        axum::Json(json!({"access_token": access_token, "token_type": "Bearer", "expires_in": 300,
            "id_token": id_token, "scope": scope})),
    )
        .into_response()
}

impl Provider {
    fn id_token(&self, grant: &Grant) -> String {
        let now = now();
        let mut claims = Map::new();
        claims.insert("iss".into(), json!(self.issuer));
        claims.insert("sub".into(), json!(grant.sub));
        claims.insert("aud".into(), json!(grant.client_id));
        claims.insert("exp".into(), json!(now + 300));
        claims.insert("iat".into(), json!(now));
        claims.insert("auth_time".into(), json!(grant.auth_time));
        claims.insert("nonce".into(), json!(grant.nonce));
        claims.extend(grant.extra.clone());
        match self.misbehaviour {
            Misbehaviour::WrongAudience => {
                claims.insert("aud".into(), json!("someone-else"));
            }
            Misbehaviour::Expired => {
                claims.insert("exp".into(), json!(now - 3600));
                claims.insert("iat".into(), json!(now - 7200));
                claims.insert("auth_time".into(), json!(now - 7200));
            }
            Misbehaviour::WrongNonce => {
                claims.insert("nonce".into(), json!(random_token()));
            }
            Misbehaviour::WrongIssuer => {
                claims.insert("iss".into(), json!("http://evil.example"));
            }
            _ => {}
        }

        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.key.kid.clone());
        match self.misbehaviour {
            Misbehaviour::ForeignKey => jsonwebtoken::encode(&header, &claims, &self.foreign.encoding).unwrap(),
            Misbehaviour::UnknownKid => {
                header.kid = Some(self.foreign.kid.clone());
                jsonwebtoken::encode(&header, &claims, &self.foreign.encoding).unwrap()
            }
            Misbehaviour::AlgNone => {
                // jsonwebtoken has no "none"; the header is written by hand.
                let header = json!({"alg": "none", "typ": "JWT", "kid": self.key.kid});
                format!(
                    "{}.{}.",
                    URL_SAFE_NO_PAD.encode(header.to_string()),
                    URL_SAFE_NO_PAD.encode(Value::Object(claims).to_string())
                )
            }
            Misbehaviour::Hs256WithPublicKey => {
                header.alg = Algorithm::HS256;
                let secret = EncodingKey::from_secret(self.key.public_pem.as_bytes()).unwrap();
                jsonwebtoken::encode(&header, &claims, &secret).unwrap()
            }
            _ => jsonwebtoken::encode(&header, &claims, &self.key.encoding).unwrap(),
        }
    }
}

async fn userinfo(State(op): State<Shared>, headers: HeaderMap) -> Response {
    let op = op.lock().unwrap();
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match token.and_then(|t| op.access_tokens.get(t)) {
        Some(claims) => axum::Json(Value::Object(claims.clone())).into_response(),
        None => {
            (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer error=\"invalid_token\"")]).into_response()
        }
    }
}

mod tests {
    use super::*;
    use jsonwebtoken::errors::ErrorKind;
    use jsonwebtoken::{DecodingKey, Validation};

    const CLIENT_ID: &str = "cairn-rp";
    /// Characters that RFC 6749 2.3.1 makes a client form-encode in Basic credentials.
    const CLIENT_SECRET: &str = "s3cret: with+odd/chars&%";
    const REDIRECT: &str = "http://127.0.0.1:9/federation/callback?tenant=a";

    fn form_encode(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => (b as char).to_string(),
                b' ' => "+".to_owned(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    }

    fn param(url: &str, name: &str) -> Option<String> {
        reqwest::Url::parse(url).unwrap().query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
    }

    fn segment(token: &str, i: usize) -> Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').nth(i).unwrap()).unwrap()).unwrap()
    }

    struct Rp {
        http: reqwest::Client,
        issuer: String,
    }

    struct Authorized {
        location: String,
        verifier: String,
        nonce: String,
    }

    impl Rp {
        fn authorize_request(&self, params: &[(&str, &str)]) -> reqwest::RequestBuilder {
            self.http.get(reqwest::Url::parse_with_params(&format!("{}/authorize", self.issuer), params).unwrap())
        }

        async fn authorize(&self) -> Authorized {
            let verifier = random_token() + &random_token();
            let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes());
            let nonce = random_token();
            let resp = self
                .authorize_request(&[
                    ("response_type", "code"),
                    ("client_id", CLIENT_ID),
                    ("redirect_uri", REDIRECT),
                    ("scope", "openid email"),
                    ("state", "st-1"),
                    ("nonce", &nonce),
                    ("code_challenge", &URL_SAFE_NO_PAD.encode(digest.as_ref())),
                    ("code_challenge_method", "S256"),
                ])
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 302);
            let location = resp.headers()[header::LOCATION].to_str().unwrap().to_owned();
            assert!(location.starts_with(REDIRECT), "{location}");
            assert_eq!(param(&location, "state").as_deref(), Some("st-1"));
            assert_eq!(param(&location, "iss"), Some(self.issuer.clone()));
            assert_eq!(param(&location, "tenant").as_deref(), Some("a"), "the redirect_uri's own query is kept");
            Authorized { location, verifier, nonce }
        }

        async fn exchange(&self, code: &str, verifier: &str) -> (u16, Value) {
            let resp = self
                .http
                .post(format!("{}/token", self.issuer))
                .basic_auth(form_encode(CLIENT_ID), Some(form_encode(CLIENT_SECRET)))
                .form(&[
                    ("grant_type", "authorization_code"),
                    ("code", code),
                    ("redirect_uri", REDIRECT),
                    ("code_verifier", verifier),
                ])
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
        }

        async fn exchange_post(&self, code: &str, verifier: &str, secret: &str) -> u16 {
            let form = [
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", REDIRECT),
                ("code_verifier", verifier),
                ("client_id", CLIENT_ID),
                ("client_secret", secret),
            ];
            let resp = self.http.post(format!("{}/token", self.issuer)).form(&form).send().await.unwrap();
            resp.status().as_u16()
        }

        /// A whole sign-in; the token response and the nonce sent.
        async fn sign_in(&self) -> (Value, String) {
            let a = self.authorize().await;
            let (status, token) = self.exchange(&param(&a.location, "code").unwrap(), &a.verifier).await;
            assert_eq!(status, 200, "{token}");
            (token, a.nonce)
        }

        async fn jwks(&self) -> Value {
            self.http.get(format!("{}/jwks", self.issuer)).send().await.unwrap().json().await.unwrap()
        }
    }

    fn verify(id_token: &str, jwks: &Value, issuer: &str) -> jsonwebtoken::errors::Result<Value> {
        let kid = jsonwebtoken::decode_header(id_token)?.kid.unwrap();
        let jwk = jwks["keys"].as_array().unwrap().iter().find(|k| k["kid"] == kid.as_str()).expect("kid in JWKS");
        let key = DecodingKey::from_rsa_components(jwk["n"].as_str().unwrap(), jwk["e"].as_str().unwrap())?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[CLIENT_ID]);
        validation.set_issuer(&[issuer]);
        Ok(jsonwebtoken::decode::<Value>(id_token, &key, &validation)?.claims)
    }

    #[test]
    fn the_mock_provider_signs_in_by_the_book_and_misbehaves_on_demand() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let op = MockOp::start(CLIENT_ID, CLIENT_SECRET).await;
            let issuer = op.issuer();
            let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
            let rp = Rp { http: http.clone(), issuer: issuer.clone() };

            let config: Value = http
                .get(format!("{issuer}/.well-known/openid-configuration"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(config["issuer"], issuer.as_str());
            assert_eq!(config["token_endpoint"], format!("{issuer}/token"));
            assert_eq!(config["jwks_uri"], format!("{issuer}/jwks"));
            assert_eq!(config["code_challenge_methods_supported"], json!(["S256"]));

            // Refusals at /authorize are plain 400s, not redirects.
            let resp = rp
                .authorize_request(&[("response_type", "code"), ("client_id", CLIENT_ID), ("redirect_uri", REDIRECT)])
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 400);
            assert_eq!(resp.text().await.unwrap(), "scope must include openid");

            // A sign-in with extra claims, verified against the JWKS.
            op.set_subject("alice");
            op.set_claims(
                json!({"email": "alice@example.org", "email_verified": true, "acr": "urn:mace:incommon:iap:silver"}),
            );
            let jwks = rp.jwks().await;
            assert_eq!(op.jwks_fetches(), 1);
            assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
            assert_eq!(jwks["keys"][0]["kty"], "RSA");
            assert!(jwks["keys"][0].get("d").is_none());
            let (token, nonce) = rp.sign_in().await;
            assert_eq!((token["token_type"].as_str(), token["expires_in"].as_u64()), (Some("Bearer"), Some(300)));
            let id_token = token["id_token"].as_str().unwrap();
            assert_eq!(jsonwebtoken::decode_header(id_token).unwrap().kid, Some(op.kid()));
            let claims = verify(id_token, &jwks, &issuer).unwrap();
            assert_eq!((claims["sub"].as_str(), claims["nonce"].as_str()), (Some("alice"), Some(nonce.as_str())));
            assert_eq!(claims["email"], "alice@example.org");
            assert!(claims["auth_time"].as_u64().unwrap() <= claims["iat"].as_u64().unwrap());

            // Userinfo answers the access token, and nothing else.
            let access = token["access_token"].as_str().unwrap();
            let info: Value =
                http.get(format!("{issuer}/userinfo")).bearer_auth(access).send().await.unwrap().json().await.unwrap();
            assert_eq!(
                info,
                json!({"sub": "alice", "email": "alice@example.org", "email_verified": true,
                "acr": "urn:mace:incommon:iap:silver"})
            );
            let resp = http.get(format!("{issuer}/userinfo")).bearer_auth("forged").send().await.unwrap();
            assert_eq!(resp.status(), 401);

            // A code is spent by its first use, and only the right verifier redeems one.
            let a = rp.authorize().await;
            let code = param(&a.location, "code").unwrap();
            let (status, err) = rp.exchange(&code, &(a.verifier.clone() + "x")).await;
            assert_eq!((status, err["error"].as_str()), (400, Some("invalid_grant")));
            let (status, err) = rp.exchange(&code, &a.verifier).await;
            assert_eq!((status, err["error"].as_str()), (400, Some("invalid_grant")), "spent");

            // client_secret_post works too; a wrong secret is invalid_client.
            let a = rp.authorize().await;
            let code = param(&a.location, "code").unwrap();
            assert_eq!(rp.exchange_post(&code, &a.verifier, "wrong").await, 401);
            let a = rp.authorize().await;
            let code = param(&a.location, "code").unwrap();
            assert_eq!(rp.exchange_post(&code, &a.verifier, CLIENT_SECRET).await, 200);
            // Basic credentials sent without form-encoding do not match a secret that needs it.
            let a = rp.authorize().await;
            let resp = http
                .post(format!("{issuer}/token"))
                .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
                .form(&[
                    ("grant_type", "authorization_code"),
                    ("code", param(&a.location, "code").unwrap().as_str()),
                    ("redirect_uri", REDIRECT),
                    ("code_verifier", a.verifier.as_str()),
                ])
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 401);

            // The claim misbehaviours: each one fails the check it is meant for.
            op.set_misbehaviour(Misbehaviour::WrongAudience);
            let (token, _) = rp.sign_in().await;
            let id_token = token["id_token"].as_str().unwrap();
            assert_eq!(segment(id_token, 1)["aud"], "someone-else");
            let err = verify(id_token, &jwks, &issuer).unwrap_err();
            assert!(matches!(err.kind(), ErrorKind::InvalidAudience), "{err:?}");
            op.set_misbehaviour(Misbehaviour::Expired);
            let (token, _) = rp.sign_in().await;
            let err = verify(token["id_token"].as_str().unwrap(), &jwks, &issuer).unwrap_err();
            assert!(matches!(err.kind(), ErrorKind::ExpiredSignature), "{err:?}");
            op.set_misbehaviour(Misbehaviour::WrongIssuer);
            let (token, _) = rp.sign_in().await;
            let err = verify(token["id_token"].as_str().unwrap(), &jwks, &issuer).unwrap_err();
            assert!(matches!(err.kind(), ErrorKind::InvalidIssuer), "{err:?}");
            op.set_misbehaviour(Misbehaviour::WrongNonce);
            let (token, nonce) = rp.sign_in().await;
            let claims = verify(token["id_token"].as_str().unwrap(), &jwks, &issuer).unwrap();
            assert_ne!(claims["nonce"], nonce.as_str());

            // The signature misbehaviours.
            op.set_misbehaviour(Misbehaviour::ForeignKey);
            let (token, _) = rp.sign_in().await;
            let id_token = token["id_token"].as_str().unwrap();
            assert_eq!(jsonwebtoken::decode_header(id_token).unwrap().kid, Some(op.kid()));
            let err = verify(id_token, &jwks, &issuer).unwrap_err();
            assert!(matches!(err.kind(), ErrorKind::InvalidSignature), "{err:?}");
            op.set_misbehaviour(Misbehaviour::UnknownKid);
            let (token, _) = rp.sign_in().await;
            let kid = jsonwebtoken::decode_header(token["id_token"].as_str().unwrap()).unwrap().kid.unwrap();
            assert!(jwks["keys"].as_array().unwrap().iter().all(|k| k["kid"] != kid.as_str()));
            op.set_misbehaviour(Misbehaviour::AlgNone);
            let (token, _) = rp.sign_in().await;
            let id_token = token["id_token"].as_str().unwrap();
            let parts: Vec<&str> = id_token.split('.').collect();
            assert_eq!(parts.len(), 3);
            assert_eq!(parts[2], "");
            assert_eq!(segment(id_token, 0)["alg"], "none");
            assert_eq!(segment(id_token, 1)["sub"], "alice");
            op.set_misbehaviour(Misbehaviour::Hs256WithPublicKey);
            let (token, _) = rp.sign_in().await;
            let id_token = token["id_token"].as_str().unwrap();
            let header = jsonwebtoken::decode_header(id_token).unwrap();
            assert_eq!((header.alg, header.kid), (Algorithm::HS256, Some(op.kid())));
            let secret = op.provider.lock().unwrap().key.public_pem.clone();
            assert!(secret.starts_with("-----BEGIN PUBLIC KEY-----\n"));
            let mut hs = Validation::new(Algorithm::HS256);
            hs.set_audience(&[CLIENT_ID]);
            jsonwebtoken::decode::<Value>(id_token, &DecodingKey::from_secret(secret.as_bytes()).unwrap(), &hs)
                .expect("HMAC over the public key PEM");

            // The endpoint misbehaviours.
            op.set_misbehaviour(Misbehaviour::ErrorAtAuthorize);
            let resp = rp
                .authorize_request(&[
                    ("response_type", "code"),
                    ("client_id", CLIENT_ID),
                    ("redirect_uri", REDIRECT),
                    ("scope", "openid"),
                    ("state", "st-2"),
                    ("nonce", "n"),
                    ("code_challenge", &URL_SAFE_NO_PAD.encode([0u8; 32])),
                    ("code_challenge_method", "S256"),
                ])
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 302);
            let location = resp.headers()[header::LOCATION].to_str().unwrap().to_owned();
            assert_eq!(param(&location, "error").as_deref(), Some("access_denied"));
            assert_eq!(param(&location, "state").as_deref(), Some("st-2"));
            assert!(param(&location, "code").is_none());
            op.set_misbehaviour(Misbehaviour::None);
            let a = rp.authorize().await;
            op.set_misbehaviour(Misbehaviour::TokenEndpointDown);
            let before = op.token_requests();
            let resp = http
                .post(format!("{issuer}/token"))
                .form(&[("grant_type", "authorization_code"), ("code", param(&a.location, "code").unwrap().as_str())])
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 503);
            assert_eq!(resp.text().await.unwrap(), "<html>down</html>");
            assert_eq!(op.token_requests(), before + 1);

            // Rotation: a new kid, alone in the JWKS, on the tokens from now on.
            op.set_misbehaviour(Misbehaviour::None);
            let old_kid = op.kid();
            op.rotate_key();
            let jwks = rp.jwks().await;
            assert_eq!(op.jwks_fetches(), 2);
            let keys = jwks["keys"].as_array().unwrap();
            assert_eq!(keys.len(), 1);
            assert_ne!(keys[0]["kid"], old_kid.as_str());
            assert_eq!(keys[0]["kid"], op.kid().as_str());
            let (token, _) = rp.sign_in().await;
            let id_token = token["id_token"].as_str().unwrap();
            assert_eq!(jsonwebtoken::decode_header(id_token).unwrap().kid, Some(op.kid()));
            verify(id_token, &jwks, &issuer).unwrap();

            // Dropping the provider stops it.
            drop(op);
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            assert!(reqwest::Client::new().get(format!("{issuer}/jwks")).send().await.is_err());
        });
    }
}
