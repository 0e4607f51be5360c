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
/// Sign-ins in progress kept at most (older ones are dropped first).
const MAX_PENDING: usize = 10_000;
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
    nonce: String,
    pkce_verifier: String,
    /// SHA-256 of the binding cookie given to the browser that started it.
    binding_sha256: [u8; 32],
    /// The app's authorization request, to continue with once signed in.
    authorize: Vec<(String, String)>,
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

/// A sign-in that failed, with the app's authorization request when it is known (so the sign-in
/// page can be shown again for it).
pub struct Failed {
    pub failure: FederatedFailure,
    pub authorize: Option<Vec<(String, String)>>,
}

fn failure(reason: LoginFailure, detail: impl Into<String>) -> FederatedFailure {
    FederatedFailure { reason, detail: detail.into(), authenticator: None }
}

#[derive(Debug)]
pub struct HttpError(String);

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
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
        let resp = http
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
        let body = resp.bytes().await.map_err(|e| HttpError(describe_reqwest(&e)))?;
        out.body(body.to_vec()).map_err(|e| HttpError(e.to_string()))
    }

    fn client_fn(
        &self,
    ) -> impl Fn(HttpRequest) -> std::pin::Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send>> + use<>
    {
        let http = self.http.clone();
        move |req| Box::pin(Self::send(http.clone(), req))
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
            tracing::warn!(issuer, error = %error_chain(&e), "upstream provider discovery failed");
            failure(LoginFailure::UpstreamError, format!("discovery failed: {}", error_chain(&e)))
        })?;
        let m = Arc::new(m);
        self.discovered.lock().expect("cache").insert(issuer.to_owned(), (Instant::now(), m.clone()));
        Ok(m)
    }

    /// Starts a sign-in at `idp` for the app request `authorize`: where to send the browser.
    pub async fn begin(
        &self,
        idp: &IdpRegistered,
        authorize: Vec<(String, String)>,
    ) -> Result<Started, FederatedFailure> {
        let metadata = self.metadata(&idp.issuer, false).await?;
        let client =
            CoreClient::from_provider_metadata((*metadata).clone(), ClientId::new(idp.client_id.clone()), None)
                .set_redirect_uri(
                    RedirectUrl::new(self.callback_uri(&idp.idp_id))
                        .map_err(|_| failure(LoginFailure::UpstreamError, "Cairn's callback address is not a URL"))?,
                );
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
        let mut pending = self.pending.lock().expect("pending");
        pending.retain(|_, p| p.started.elapsed() < PENDING_LIFETIME);
        if pending.len() >= MAX_PENDING
            && let Some(oldest) = pending.iter().min_by_key(|(_, p)| p.started).map(|(k, _)| k.clone())
        {
            pending.remove(&oldest);
        }
        pending.insert(
            state,
            Pending {
                idp_id: idp.idp_id.clone(),
                nonce,
                pkce_verifier: verifier.secret().clone(),
                binding_sha256: Sha256::digest(binding.as_bytes()).into(),
                authorize,
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
        let authorize = Some(pending.authorize.clone());
        let fail = |reason: LoginFailure, detail: String| Failed {
            failure: failure(reason, detail),
            authorize: authorize.clone(),
        };
        let bound = binding.is_some_and(|b| <[u8; 32]>::from(Sha256::digest(b.as_bytes())) == pending.binding_sha256);
        if !bound {
            return Err(fail(LoginFailure::StateMismatch, "the sign-in was started in another browser".into()));
        }
        if pending.idp_id != path_idp {
            return Err(fail(LoginFailure::StateMismatch, "the answer came back for another provider".into()));
        }
        if pending.started.elapsed() > PENDING_LIFETIME {
            return Err(fail(LoginFailure::StateMismatch, "the sign-in took longer than ten minutes".into()));
        }
        let Some(idp) = idp else {
            return Err(fail(LoginFailure::UnknownProvider, "the provider is disabled or no longer configured".into()));
        };
        if let Some(error) = param("error") {
            let code: String = error.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').take(64).collect();
            return Err(fail(LoginFailure::UpstreamRejected, format!("the provider answered error `{code}`")));
        }
        // RFC 9207: an answer that names another issuer is a mix-up attack.
        if let Some(iss) = param("iss")
            && iss.trim_end_matches('/') != idp.issuer
        {
            return Err(fail(LoginFailure::UpstreamRejected, "the authorization response names another issuer".into()));
        }
        let code = param("code")
            .ok_or_else(|| fail(LoginFailure::UpstreamRejected, "the provider's answer has no code".into()))?;
        let credential = UpstreamCredential::load(&idp.client_auth).map_err(|e| {
            tracing::error!(idp = %idp.idp_id, error = %e, "the upstream client credential cannot be used");
            fail(LoginFailure::UpstreamError, format!("Cairn's credential for the provider cannot be used: {e}"))
        })?;
        let metadata =
            self.metadata(&idp.issuer, false).await.map_err(|f| Failed { failure: f, authorize: authorize.clone() })?;
        let redirect = RedirectUrl::new(self.callback_uri(&idp.idp_id))
            .map_err(|_| fail(LoginFailure::UpstreamError, "Cairn's callback address is not a URL".into()))?;
        let client = self.client(idp, &metadata, &credential, redirect.clone());
        let token_endpoint = metadata
            .token_endpoint()
            .map(|u| u.to_string())
            .ok_or_else(|| fail(LoginFailure::UpstreamError, "the provider has no token endpoint".into()))?;
        let mut exchange = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .map_err(|_| fail(LoginFailure::UpstreamError, "the provider has no token endpoint".into()))?
            .set_pkce_verifier(PkceCodeVerifier::new(pending.pkce_verifier.clone()));
        if let Some(assertion) = credential
            .assertion(&idp.client_id, &token_endpoint)
            .map_err(|e| fail(LoginFailure::UpstreamError, format!("cannot sign the client assertion: {e}")))?
        {
            exchange = exchange
                .add_extra_param("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
                .add_extra_param("client_assertion", assertion);
        }
        let http = self.client_fn();
        let token = exchange.request_async(&http).await.map_err(|e| match e {
            RequestTokenError::ServerResponse(r) => {
                fail(LoginFailure::UpstreamRejected, format!("the token endpoint refused the code: {}", r.error()))
            }
            RequestTokenError::Request(e) => {
                fail(LoginFailure::UpstreamError, format!("the token endpoint could not be reached: {e}"))
            }
            RequestTokenError::Parse(_, _) => {
                fail(LoginFailure::UpstreamError, "the token endpoint's answer is not a token response".into())
            }
            RequestTokenError::Other(m) => fail(LoginFailure::UpstreamError, format!("the token endpoint failed: {m}")),
        })?;
        let id_token = token
            .id_token()
            .ok_or_else(|| fail(LoginFailure::InvalidIdToken, "the token response has no ID token".into()))?;
        let nonce = Nonce::new(pending.nonce.clone());
        let verify = |client: &CoreClient<_, _, _, _, _, _>| {
            let verifier: CoreIdTokenVerifier = client.id_token_verifier().set_allowed_algs(ALLOWED_ALGS);
            id_token.claims(&verifier, &nonce).cloned()
        };
        let claims = match verify(&client) {
            Err(ClaimsVerificationError::SignatureVerification(SignatureVerificationError::NoMatchingKey)) => {
                // The provider may have rotated its keys: fetch them again, once.
                let fresh = self
                    .metadata(&idp.issuer, true)
                    .await
                    .map_err(|f| Failed { failure: f, authorize: authorize.clone() })?;
                verify(&self.client(idp, &fresh, &credential, redirect))
            }
            other => other,
        }
        .map_err(|e| fail(LoginFailure::InvalidIdToken, explain(&e)))?;
        let identity = Authenticator {
            issuer: idp.issuer.clone(),
            subject: claims.subject().to_string(),
            acr: claims.auth_context_ref().map(|a| a.to_string()),
            amr: claims.auth_method_refs().map(|v| v.iter().map(|m| m.to_string()).collect()).unwrap_or_default(),
        };
        if identity.subject.is_empty() || identity.subject.len() > 255 {
            return Err(fail(LoginFailure::InvalidIdToken, "the ID token's subject is empty or too long".into()));
        }
        if idp.use_userinfo {
            let request = client
                .user_info(token.access_token().clone(), Some(claims.subject().clone()))
                .map_err(|_| fail(LoginFailure::UpstreamError, "the provider has no userinfo endpoint".into()))?;
            let answer: Result<openidconnect::core::CoreUserInfoClaims, _> = request.request_async(&http).await;
            answer.map_err(|e| match e {
                openidconnect::UserInfoError::ClaimsVerification(e) => {
                    fail(LoginFailure::InvalidIdToken, format!("userinfo does not match the ID token: {}", explain(&e)))
                }
                e => fail(LoginFailure::UpstreamError, format!("userinfo failed: {}", error_chain(&e))),
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
            let alg = a.split('`').nth(1).unwrap_or(a.as_str());
            format!("the ID token's signature algorithm {alg} is not accepted")
        }
        ClaimsVerificationError::SignatureVerification(SignatureVerificationError::NoSignature) => {
            "the ID token is not signed".into()
        }
        ClaimsVerificationError::SignatureVerification(_) => "the ID token's signature does not verify".into(),
        other => format!("the ID token is invalid: {other}"),
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

fn describe_reqwest(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "connection refused or unreachable".into()
    } else {
        error_chain(e)
    }
}
