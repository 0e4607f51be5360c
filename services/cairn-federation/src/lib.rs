//! Cairn as an OpenID Connect relying party of upstream identity providers (the `openidconnect`
//! crate): discovery, the authorization code flow with PKCE, `state` and `nonce`, the code exchange
//! (client secret or `private_key_jwt`), ID token validation (issuer, audience, expiry, nonce, an
//! algorithm allow-list, keys by `kid` with one JWKS refresh when the `kid` is unknown), userinfo.
//!
//! An edge crate: it speaks HTTP to providers and hands `cairn-auth` an identity only after every
//! check passed, or a [`FederatedFailure`] saying what failed (recorded by the caller).
//!
//! A sign-in in progress is remembered in this process for ten minutes, keyed by its `state` and
//! bound to the browser that started it by a cookie; the browser must come back to the same
//! process (one process per data directory on the embedded log; sticky routing for `/login/idp/`
//! behind a load balancer otherwise).

use cairn_auth::federation::{FederatedFailure, UpstreamCredential};
use cairn_events::{Authenticator, IdpRegistered, LoginFailure};
use openidconnect::core::{
    CoreAuthenticationFlow, CoreClient, CoreIdTokenVerifier, CoreJwsSigningAlgorithm, CoreProviderMetadata,
};
use openidconnect::{
    AuthType, AuthorizationCode, ClaimsVerificationError, ClientId, ClientSecret, CsrfToken, HttpRequest, HttpResponse,
    IssuerUrl, Nonce, OAuth2TokenResponse, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RequestTokenError, Scope,
    SignatureVerificationError, TokenResponse,
};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a sign-in may take at the provider.
const PENDING_LIFETIME: Duration = Duration::from_secs(600);
/// Sign-ins in progress kept at most, in all and per source address.
const MAX_PENDING: usize = 10_000;
const MAX_PENDING_PER_SOURCE: usize = 32;
/// The largest answer read from a provider.
const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// How long a provider's discovery document (and JWKS) is reused.
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);

/// ID token signatures accepted: asymmetric only (never `none`, never an HMAC keyed with something
/// the provider published).
const ALLOWED_ALGS: [CoreJwsSigningAlgorithm; 9] = [
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha384,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha512,
    CoreJwsSigningAlgorithm::RsaSsaPssSha256,
    CoreJwsSigningAlgorithm::RsaSsaPssSha384,
    CoreJwsSigningAlgorithm::RsaSsaPssSha512,
    CoreJwsSigningAlgorithm::EcdsaP256Sha256,
    CoreJwsSigningAlgorithm::EcdsaP384Sha384,
    CoreJwsSigningAlgorithm::EdDsa,
];

/// A sign-in started at a provider, waiting for the browser to come back.
struct Pending {
    idp_id: String,
    /// The provider as it was registered when the sign-in started: a reconfiguration in between
    /// ends the sign-in rather than sending the code somewhere else.
    issuer: String,
    client_id: String,
    nonce: String,
    pkce_verifier: String,
    /// SHA-256 of the binding cookie given to the browser that started it.
    binding_sha256: [u8; 32],
    /// The app's authorization request, to continue with once signed in.
    authorize: Vec<(String, String)>,
    /// The address the sign-in was started from (for the per-address limit).
    source: Option<String>,
    started: Instant,
}

/// Where to send the browser, and the cookie that binds the sign-in to it.
pub struct Started {
    pub redirect_to: String,
    pub binding_cookie: String,
}

/// A sign-in the provider vouched for.
pub struct Finished {
    pub identity: Authenticator,
    pub authorize: Vec<(String, String)>,
}

/// A sign-in that failed, with the app's authorization request when it is known to be this
/// browser's (so the sign-in page can be shown again for it).
pub struct Failed {
    pub failure: FederatedFailure,
    pub authorize: Option<Vec<(String, String)>>,
}

fn failure(reason: LoginFailure, detail: &str) -> FederatedFailure {
    FederatedFailure { reason, detail: detail.to_owned(), authenticator: None }
}

/// A back-channel request that failed, described without anything the provider sent.
#[derive(Debug)]
pub struct HttpError(&'static str);

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}
impl std::error::Error for HttpError {}

/// The relying party of one Cairn process.
pub struct Federation {
    http: reqwest::Client,
    /// Cairn's own public base URL (its issuer): callbacks are `{base}/login/idp/{id}/callback`.
    base: String,
    discovered: Mutex<HashMap<String, (Instant, Arc<CoreProviderMetadata>)>>,
    pending: Mutex<HashMap<String, Pending>>,
}

/// Why a sign-in could not start, for the page.
#[derive(Debug)]
pub enum NotStarted {
    /// Recorded and shown like any failed sign-in.
    Failed(FederatedFailure),
    /// Too many sign-ins in progress from this address (not recorded: it is the flood itself).
    Busy,
}

impl Federation {
    pub fn new(public_base: &str) -> Federation {
        let http = reqwest::Client::builder()
            // A provider never redirects a back-channel request; following one would let a
            // compromised discovery document point Cairn at anything.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .user_agent("cairn-federation")
            .build()
            .expect("an HTTP client");
        Federation {
            http,
            base: public_base.trim_end_matches('/').to_owned(),
            discovered: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// The redirect URI registered at the provider for `idp_id`.
    pub fn callback_uri(&self, idp_id: &str) -> String {
        format!("{}/login/idp/{idp_id}/callback", self.base)
    }

    async fn send(http: reqwest::Client, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let (parts, body) = req.into_parts();
        let mut resp = http
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body)
            .send()
            .await
            .map_err(|e| HttpError(describe_reqwest(&e)))?;
        let mut out = openidconnect::http::Response::builder().status(resp.status());
        for (k, v) in resp.headers() {
            out = out.header(k, v);
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| HttpError(describe_reqwest(&e)))? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(HttpError("the answer is larger than 1 MiB"));
            }
            body.extend_from_slice(&chunk);
        }
        out.body(body).map_err(|_| HttpError("the answer is not valid HTTP"))
    }

    fn client_fn(
        &self,
    ) -> impl Fn(HttpRequest) -> std::pin::Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send>> + use<>
    {
        let http = self.http.clone();
        move |req| Box::pin(Self::send(http.clone(), req))
    }

    /// Discovery of `issuer` now, for an administrator adding a provider: a readable error (the
    /// provider's text included, since only the administrator sees it) when it would not work.
    pub async fn check_provider(&self, issuer: &str) -> Result<(), String> {
        let url = IssuerUrl::new(issuer.to_owned()).map_err(|e| format!("issuer {issuer}: {e}"))?;
        let http = self.client_fn();
        let m = CoreProviderMetadata::discover_async(url, &http)
            .await
            .map_err(|e| format!("discovery at {issuer} failed: {}", error_chain(&e)))?;
        check_endpoints(&m).map_err(|e| format!("{issuer}: {e}"))
    }

    /// The provider's metadata and keys, from the cache unless `refresh`.
    async fn metadata(&self, issuer: &str, refresh: bool) -> Result<Arc<CoreProviderMetadata>, FederatedFailure> {
        if !refresh
            && let Some((at, m)) = self.discovered.lock().expect("cache").get(issuer)
            && at.elapsed() < DISCOVERY_TTL
        {
            return Ok(m.clone());
        }
        let url = IssuerUrl::new(issuer.to_owned())
            .map_err(|_| failure(LoginFailure::UpstreamError, "the provider's issuer is not a URL"))?;
        let http = self.client_fn();
        let m = CoreProviderMetadata::discover_async(url, &http).await.map_err(|e| {
            // The provider's own words stay out of the audit record (and its logs at this level).
            tracing::warn!(issuer, "upstream provider discovery failed");
            tracing::debug!(issuer, error = %error_chain(&e), "upstream provider discovery failed");
            failure(LoginFailure::UpstreamError, discovery_failure(&e))
        })?;
        check_endpoints(&m).map_err(|e| {
            tracing::warn!(issuer, problem = e, "upstream provider refused");
            failure(LoginFailure::UpstreamError, e)
        })?;
        let m = Arc::new(m);
        self.discovered.lock().expect("cache").insert(issuer.to_owned(), (Instant::now(), m.clone()));
        Ok(m)
    }

    /// Starts a sign-in at `idp` for the app request `authorize` (already validated) from the
    /// address `source`: where to send the browser.
    pub async fn begin(
        &self,
        idp: &IdpRegistered,
        authorize: Vec<(String, String)>,
        source: Option<&str>,
    ) -> Result<Started, NotStarted> {
        {
            let mut pending = self.pending.lock().expect("pending");
            pending.retain(|_, p| p.started.elapsed() < PENDING_LIFETIME);
            let from_here = pending.values().filter(|p| p.source.as_deref() == source).count();
            if from_here >= MAX_PENDING_PER_SOURCE || pending.len() >= MAX_PENDING {
                return Err(NotStarted::Busy);
            }
        }
        let metadata = self.metadata(&idp.issuer, false).await.map_err(NotStarted::Failed)?;
        let redirect = RedirectUrl::new(self.callback_uri(&idp.idp_id)).map_err(|_| {
            NotStarted::Failed(failure(LoginFailure::UpstreamError, "Cairn's callback address is not a URL"))
        })?;
        let client =
            CoreClient::from_provider_metadata((*metadata).clone(), ClientId::new(idp.client_id.clone()), None)
                .set_redirect_uri(redirect);
        let state = cairn_auth::random_token(32);
        let nonce = cairn_auth::random_token(32);
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let (state_for_url, nonce_for_url) = (state.clone(), nonce.clone());
        let mut request = client.authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            move || CsrfToken::new(state_for_url),
            move || Nonce::new(nonce_for_url),
        );
        for s in idp.scopes.iter().filter(|s| *s != "openid") {
            request = request.add_scope(Scope::new(s.clone()));
        }
        let (url, _, _) = request.set_pkce_challenge(challenge).url();
        let binding = cairn_auth::random_token(32);
        self.pending.lock().expect("pending").insert(
            state,
            Pending {
                idp_id: idp.idp_id.clone(),
                issuer: idp.issuer.clone(),
                client_id: idp.client_id.clone(),
                nonce,
                pkce_verifier: verifier.secret().clone(),
                binding_sha256: Sha256::digest(binding.as_bytes()).into(),
                authorize,
                source: source.map(str::to_owned),
                started: Instant::now(),
            },
        );
        Ok(Started { redirect_to: url.to_string(), binding_cookie: binding })
    }

    /// The browser came back from the provider to `/login/idp/{path_idp}/callback` with `query`.
    /// `idp` is the provider's current registration (None if it is disabled or unknown now);
    /// `binding` the browser's binding cookie.
    pub async fn finish(
        &self,
        path_idp: &str,
        idp: Option<&IdpRegistered>,
        query: &[(String, String)],
        binding: Option<&str>,
    ) -> Result<Finished, Failed> {
        let param = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let lost = |detail: &str| Failed { failure: failure(LoginFailure::StateMismatch, detail), authorize: None };
        let state = param("state").ok_or_else(|| lost("the provider's answer has no state"))?;
        let pending = self.pending.lock().expect("pending").remove(state);
        let pending = pending.ok_or_else(|| lost("unknown or already used state"))?;
        let bound = binding.is_some_and(|b| <[u8; 32]>::from(Sha256::digest(b.as_bytes())) == pending.binding_sha256);
        if !bound {
            // Not this browser's sign-in: show it nothing of the app request behind it.
            return Err(lost("the sign-in was started in another browser"));
        }
        let authorize = Some(pending.authorize.clone());
        let lift = |f: FederatedFailure| Failed { failure: f, authorize: authorize.clone() };
        let fail = |reason: LoginFailure, detail: &str| lift(failure(reason, detail));
        if pending.idp_id != path_idp {
            return Err(fail(LoginFailure::StateMismatch, "the answer came back for another provider"));
        }
        if pending.started.elapsed() > PENDING_LIFETIME {
            return Err(fail(LoginFailure::StateMismatch, "the sign-in took longer than ten minutes"));
        }
        let Some(idp) = idp else {
            return Err(fail(LoginFailure::UnknownProvider, "the provider is disabled or no longer configured"));
        };
        if idp.issuer != pending.issuer || idp.client_id != pending.client_id {
            return Err(fail(LoginFailure::StateMismatch, "the provider was reconfigured during the sign-in"));
        }
        if let Some(error) = param("error") {
            let detail = format!("the provider answered error `{}`", error_code(error));
            return Err(fail(LoginFailure::UpstreamRejected, &detail));
        }
        // RFC 9207: an answer that names another issuer is a mix-up attack.
        if param("iss").is_some_and(|iss| iss != idp.issuer) {
            return Err(fail(LoginFailure::UpstreamRejected, "the authorization response names another issuer"));
        }
        let code =
            param("code").ok_or_else(|| fail(LoginFailure::UpstreamRejected, "the provider's answer has no code"))?;
        let client_auth = idp.client_auth.clone();
        // File reads and an Argon2id check: off the async workers.
        let credential = tokio::task::spawn_blocking(move || UpstreamCredential::load(&client_auth))
            .await
            .map_err(|_| fail(LoginFailure::UpstreamError, "Cairn's credential for the provider cannot be used"))?
            .map_err(|e| {
                tracing::error!(idp = %idp.idp_id, error = %e, "the upstream client credential cannot be used");
                fail(LoginFailure::UpstreamError, "Cairn's credential for the provider cannot be used")
            })?;
        let metadata = self.metadata(&idp.issuer, false).await.map_err(lift)?;
        let redirect = RedirectUrl::new(self.callback_uri(&idp.idp_id))
            .map_err(|_| fail(LoginFailure::UpstreamError, "Cairn's callback address is not a URL"))?;
        let client = self.client(idp, &metadata, &credential, redirect.clone());
        let token_endpoint = metadata
            .token_endpoint()
            .map(|u| u.to_string())
            .ok_or_else(|| fail(LoginFailure::UpstreamError, "the provider has no token endpoint"))?;
        let mut exchange = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .map_err(|_| fail(LoginFailure::UpstreamError, "the provider has no token endpoint"))?
            .set_pkce_verifier(PkceCodeVerifier::new(pending.pkce_verifier.clone()));
        if let Some(assertion) = credential
            .assertion(&idp.client_id, &token_endpoint)
            .map_err(|_| fail(LoginFailure::UpstreamError, "cannot sign the client assertion"))?
        {
            exchange = exchange
                .add_extra_param("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
                .add_extra_param("client_assertion", assertion);
        }
        let http = self.client_fn();
        let token = exchange.request_async(&http).await.map_err(|e| match e {
            RequestTokenError::ServerResponse(r) => fail(
                LoginFailure::UpstreamRejected,
                &format!("the token endpoint refused the code: `{}`", error_code(r.error().as_ref())),
            ),
            RequestTokenError::Request(e) => {
                fail(LoginFailure::UpstreamError, &format!("the token endpoint could not be reached: {e}"))
            }
            RequestTokenError::Parse(_, _) => {
                fail(LoginFailure::UpstreamError, "the token endpoint's answer is not a token response")
            }
            RequestTokenError::Other(_) => fail(LoginFailure::UpstreamError, "the token endpoint's answer is unusable"),
        })?;
        let id_token =
            token.id_token().ok_or_else(|| fail(LoginFailure::InvalidIdToken, "the token response has no ID token"))?;
        let nonce = Nonce::new(pending.nonce.clone());
        let verify = |client: &CoreClient<_, _, _, _, _, _>| {
            let verifier: CoreIdTokenVerifier = client.id_token_verifier().set_allowed_algs(ALLOWED_ALGS);
            id_token.claims(&verifier, &nonce).cloned()
        };
        let claims = match verify(&client) {
            Err(ClaimsVerificationError::SignatureVerification(SignatureVerificationError::NoMatchingKey)) => {
                // The provider may have rotated its keys: fetch them again, once.
                let fresh = self.metadata(&idp.issuer, true).await.map_err(lift)?;
                verify(&self.client(idp, &fresh, &credential, redirect))
            }
            other => other,
        }
        .map_err(|e| fail(LoginFailure::InvalidIdToken, &explain(&e)))?;
        let subject = claims.subject().to_string();
        if subject.is_empty() || subject.len() > 255 {
            return Err(fail(LoginFailure::InvalidIdToken, "the ID token's subject is empty or too long"));
        }
        // acr and amr are the provider's words: kept short and few, empty ones dropped.
        let identity = Authenticator {
            issuer: idp.issuer.clone(),
            subject,
            acr: claims.auth_context_ref().map(|a| a.to_string()).filter(|a| !a.is_empty() && a.len() <= 255),
            amr: claims
                .auth_method_refs()
                .map(|v| v.iter().map(|m| m.to_string()).filter(|m| !m.is_empty() && m.len() <= 64).take(8).collect())
                .unwrap_or_default(),
        };
        if idp.use_userinfo {
            let request = client
                .user_info(token.access_token().clone(), Some(claims.subject().clone()))
                .map_err(|_| fail(LoginFailure::UpstreamError, "the provider has no userinfo endpoint"))?;
            let answer: Result<openidconnect::core::CoreUserInfoClaims, _> = request.request_async(&http).await;
            answer.map_err(|e| match e {
                openidconnect::UserInfoError::ClaimsVerification(_) => {
                    fail(LoginFailure::InvalidIdToken, "userinfo names another subject than the ID token")
                }
                openidconnect::UserInfoError::Request(_) => {
                    fail(LoginFailure::UpstreamError, "userinfo could not be reached")
                }
                _ => fail(LoginFailure::UpstreamError, "userinfo's answer is unusable"),
            })?;
        }
        Ok(Finished { identity, authorize: pending.authorize })
    }

    /// The relying-party client for `idp` with the provider's metadata and Cairn's credential.
    fn client(
        &self,
        idp: &IdpRegistered,
        metadata: &CoreProviderMetadata,
        credential: &UpstreamCredential,
        redirect: RedirectUrl,
    ) -> CoreClient<
        openidconnect::EndpointSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointMaybeSet,
        openidconnect::EndpointMaybeSet,
    > {
        let (secret, auth_type) = match credential {
            UpstreamCredential::Secret { secret, basic } => (
                Some(ClientSecret::new(secret.clone())),
                if *basic { AuthType::BasicAuth } else { AuthType::RequestBody },
            ),
            UpstreamCredential::Key(_) => (None, AuthType::RequestBody),
        };
        CoreClient::from_provider_metadata(metadata.clone(), ClientId::new(idp.client_id.clone()), secret)
            .set_auth_type(auth_type)
            .set_redirect_uri(redirect)
    }
}

/// An OAuth error code as the provider sent it, reduced to the characters such codes have.
fn error_code(code: &str) -> String {
    code.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').take(64).collect()
}

/// Every endpoint Cairn will send a secret or code to, or take keys from, must be as safe as the
/// issuer: https (http only on loopback, for development).
fn check_endpoints(m: &CoreProviderMetadata) -> Result<(), &'static str> {
    let mut urls = vec![m.authorization_endpoint().as_str(), m.jwks_uri().as_str()];
    urls.extend(m.token_endpoint().map(|u| u.as_str()));
    urls.extend(m.userinfo_endpoint().map(|u| u.as_str()));
    if urls.iter().all(|u| cairn_auth::federation::secure_url(u)) {
        Ok(())
    } else {
        Err("the provider's discovery document names an endpoint that is not https")
    }
}

/// Why discovery failed, in fixed words.
fn discovery_failure(e: &openidconnect::DiscoveryError<HttpError>) -> &'static str {
    match e {
        openidconnect::DiscoveryError::Request(_) => "discovery failed: the provider could not be reached",
        openidconnect::DiscoveryError::Response(..) => "discovery failed: the provider answered with an error",
        openidconnect::DiscoveryError::Parse(_) => "discovery failed: not a discovery document",
        openidconnect::DiscoveryError::Validation(_) => "discovery failed: the document names another issuer",
        _ => "discovery failed",
    }
}

/// What failed in an ID token, in words for the audit record.
fn explain(e: &ClaimsVerificationError) -> String {
    match e {
        ClaimsVerificationError::Expired(_) => "the ID token has expired".into(),
        ClaimsVerificationError::InvalidAudience(_) => "the ID token's audience does not include this client".into(),
        ClaimsVerificationError::InvalidIssuer(_) => "the ID token was issued by another issuer".into(),
        ClaimsVerificationError::InvalidNonce(_) => "the ID token's nonce does not match this sign-in".into(),
        ClaimsVerificationError::InvalidSubject(_) => "the subject does not match".into(),
        ClaimsVerificationError::SignatureVerification(SignatureVerificationError::NoMatchingKey) => {
            "the ID token is signed with a key the provider does not publish".into()
        }
        ClaimsVerificationError::SignatureVerification(SignatureVerificationError::DisallowedAlg(a))
        | ClaimsVerificationError::SignatureVerification(SignatureVerificationError::UnsupportedAlg(a)) => {
            // The library's text lists the allowed set in no fixed order; name the algorithm only.
            let alg: String = a
                .split('`')
                .nth(1)
                .unwrap_or(a.as_str())
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .take(16)
                .collect();
            format!("the ID token's signature algorithm {alg} is not accepted")
        }
        ClaimsVerificationError::SignatureVerification(SignatureVerificationError::NoSignature) => {
            "the ID token is not signed".into()
        }
        ClaimsVerificationError::SignatureVerification(_) => "the ID token's signature does not verify".into(),
        _ => "the ID token is invalid".into(),
    }
}

/// An error and its causes on one line (reqwest hides the useful part in its sources).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn describe_reqwest(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection refused or unreachable"
    } else {
        "the exchange failed"
    }
}
