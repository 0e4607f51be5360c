//! The SMART App Launch (standalone) flow: the authorization request, sign-in, consent, the code,
//! its exchange with PKCE, refresh-token rotation, ID tokens and userinfo, logout.
//!
//! Single use without a shared lock: a code's redemption (and a refresh token's rotation) is an
//! event keyed like the code, so all redemptions of one code land in one partition, in one order.
//! An instance appends its redemption, waits until its state has applied it, and looks whether it
//! was the first. If not, the code was used twice: everything issued from it is revoked.

use crate::client_auth::FormRequest;
use crate::scope::{Context, Scope, ScopeSet};
use crate::server::Grant;
use crate::state::User;
use crate::{AuthError, AuthServer, OAuthError, now_secs, password, random_token, sha256_hex};
use base64::Engine;
use cairn_events::{
    Actor, CodeIssued, CodeRedeemed, ConsentRecorded, Event, KeyPurpose, LoginFailed, LoginFailure, LoginMethod,
    LoginSucceeded, Logout, Payload, RevocationTarget, Timestamp, TokenIssued, TokenKind, TokenRevoked,
};
use serde_json::{Value, json};

/// A validated authorization request, ready for the login and consent pages.
#[derive(Debug, Clone)]
pub struct AuthorizeRequest {
    pub client_id: String,
    pub client_name: String,
    pub redirect_uri: String,
    pub state: Option<String>,
    /// What the app asked for, limited to what the client may have (the consent page offers these).
    pub scopes: ScopeSet,
    pub code_challenge: String,
    pub nonce: Option<String>,
    /// The request's parameters, to carry through the sign-in and consent forms.
    pub params: Vec<(String, String)>,
}

impl AuthorizeRequest {
    /// Whether granting these scopes needs a patient in context.
    pub fn needs_patient(&self, scopes: &ScopeSet) -> bool {
        scopes.iter().any(|s| {
            matches!(s, Scope::LaunchPatient) || matches!(s, Scope::Resource(r) if r.context == Context::Patient)
        })
    }
}

/// Why an authorization request cannot go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthorizeError {
    /// The client or its redirect URI cannot be trusted: tell the user, redirect nowhere.
    Page(String),
    /// Tell the app: a redirect to its URI with `error` (RFC 6749 4.1.2.1).
    Redirect(String),
}

/// Why a sign-in was refused; the text is what the user reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRefusal(pub String);

/// A signed-in browser: the cookie value to set and the user.
pub struct SignedIn {
    pub cookie: String,
    pub user_id: String,
}

impl std::fmt::Debug for SignedIn {
    // Never prints the cookie: it is the session's bearer secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedIn").field("user_id", &self.user_id).finish_non_exhaustive()
    }
}

/// The PKCE verifier alphabet and length (RFC 7636 4.1).
fn valid_verifier(v: &str) -> bool {
    (43..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

fn s256(verifier: &str) -> String {
    use sha2::Digest;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()))
}

/// `uri` with `params` added to its query.
pub fn with_query(uri: &str, params: &[(&str, &str)]) -> String {
    let mut out = uri.to_owned();
    let mut sep = if uri.contains('?') { '&' } else { '?' };
    for (k, v) in params {
        out.push(sep);
        out.push_str(k);
        out.push('=');
        out.push_str(&form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>());
        sep = '&';
    }
    out
}

impl AuthServer {
    // ---------------------------------------------------------------- the authorization request

    /// Validates `/authorize` parameters. Client and redirect URI first: until both are known good,
    /// errors are shown to the user, never sent to an unverified address.
    pub fn authorize_request(&self, params: &[(String, String)]) -> Result<AuthorizeRequest, AuthorizeError> {
        let req = FormRequest { params: params.to_vec(), basic: None };
        let page = |e: OAuthError| AuthorizeError::Page(e.description);
        let client_id = req.require("client_id").map_err(page)?;
        let client = self
            .read_state(|s| s.client(client_id).cloned())
            .filter(|c| !c.disabled)
            .ok_or_else(|| AuthorizeError::Page(format!("unknown or disabled app `{client_id}`")))?;
        let redirect_uri = match req.get("redirect_uri").map_err(page)? {
            Some(uri) if client.registration.redirect_uris.iter().any(|r| r == uri) => uri.to_owned(),
            Some(_) => return Err(AuthorizeError::Page("the redirect_uri is not registered for this app".into())),
            None if client.registration.redirect_uris.len() == 1 => client.registration.redirect_uris[0].clone(),
            None => return Err(AuthorizeError::Page("redirect_uri is required".into())),
        };
        let state = req.get("state").ok().flatten().map(str::to_owned);
        let fail = |error: &str, description: &str| {
            let mut p = vec![("error", error), ("error_description", description)];
            if let Some(s) = &state {
                p.push(("state", s));
            }
            p.push(("iss", &self.settings.issuer));
            AuthorizeError::Redirect(with_query(&redirect_uri, &p))
        };
        let get = |name: &str| req.get(name).map_err(|e| fail("invalid_request", &e.description));
        match get("response_type")? {
            Some("code") => {}
            Some(other) => {
                return Err(fail(
                    "unsupported_response_type",
                    &format!("response_type `{other}` is not supported; use code"),
                ));
            }
            None => return Err(fail("invalid_request", "response_type is required")),
        }
        match get("code_challenge_method")? {
            Some("S256") => {}
            Some(m) => {
                return Err(fail("invalid_request", &format!("code_challenge_method `{m}` is not accepted; use S256")));
            }
            None => {
                return Err(fail(
                    "invalid_request",
                    "PKCE is required: code_challenge with code_challenge_method=S256",
                ));
            }
        }
        let code_challenge =
            get("code_challenge")?.ok_or_else(|| fail("invalid_request", "code_challenge is required"))?;
        if code_challenge.len() != 43
            || !code_challenge.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(fail("invalid_request", "code_challenge must be a base64url SHA-256 (43 characters)"));
        }
        let aud = match (get("aud")?, get("resource")?) {
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => return Err(fail("invalid_request", "aud is required: the FHIR base URL the token is for")),
        };
        if aud.trim_end_matches('/') != self.settings.fhir_base() {
            return Err(fail(
                "invalid_request",
                &format!("aud must be this server's FHIR base URL {}", self.settings.fhir_base()),
            ));
        }
        if get("request")?.is_some() || get("request_uri")?.is_some() {
            return Err(fail("request_not_supported", "request objects are not supported"));
        }
        let requested =
            ScopeSet::parse(get("scope")?.unwrap_or("")).map_err(|e| fail("invalid_scope", &e.to_string()))?;
        // An app signing a user in gets patient/ and user/ scopes; system/ scopes are for backends.
        let scopes = requested.narrowed_to(&client.allowed).filtered(|s| {
            !matches!(s, Scope::Resource(r) if r.context == Context::System) && !matches!(s, Scope::Launch)
        });
        if scopes.is_empty() {
            return Err(fail("invalid_scope", "none of the requested scopes is allowed for this app"));
        }
        Ok(AuthorizeRequest {
            client_id: client_id.to_owned(),
            client_name: client.registration.client_name.clone(),
            redirect_uri: redirect_uri.clone(),
            state: state.clone(),
            scopes,
            code_challenge: code_challenge.to_owned(),
            nonce: get("nonce")?.map(str::to_owned),
            params: params.to_vec(),
        })
    }

    // ---------------------------------------------------------------- sign-in and sessions

    /// Checks a username and password. Every attempt is an event; failures count towards throttling
    /// per username and per source address; the user never learns which part was wrong.
    pub async fn login(&self, username: &str, password_given: &str, actor: &Actor) -> Result<SignedIn, LoginRefusal> {
        let now_ms = Timestamp::now().as_millis();
        let generic = || LoginRefusal("Wrong username or password.".into());
        let refuse = |reason: LoginFailure| {
            Event::new(Payload::from(LoginFailed {
                username: Some(username.chars().take(64).collect()),
                reason,
                authenticator: None,
                idp: None,
                detail: None,
            }))
            .with_actor(actor.clone())
        };
        if !self.settings.password_login {
            let e = LoginFailed {
                username: Some(username.chars().take(64).collect()),
                reason: LoginFailure::PasswordLoginDisabled,
                authenticator: None,
                idp: None,
                detail: Some("password sign-in is switched off".into()),
            };
            self.append(Event::new(Payload::from(e)).with_actor(actor.clone())).await.map_err(|_| unavailable())?;
            return Err(LoginRefusal("Sign-in with a password is switched off here.".into()));
        }
        if let Some(until) = self.read_state(|s| s.throttled_until(username, actor.source_address.as_deref(), now_ms)) {
            self.append(refuse(LoginFailure::Throttled)).await.map_err(|_| unavailable())?;
            let minutes = ((until - now_ms) / 60_000).max(1);
            return Err(LoginRefusal(format!("Too many failed sign-ins. Try again in {minutes} minute(s).")));
        }
        let user = self.read_state(|s| s.user_by_name(username).cloned());
        // A user without a password (one who signs in only upstream) and an unknown user cost the
        // same time as any other, verified against the decoy; but only a real hash can match.
        let own_hash = user.as_ref().map(|u| u.account.password_hash.clone()).filter(|h| !h.is_empty());
        let has_password = own_hash.is_some();
        let hash = own_hash.unwrap_or_else(|| password::decoy_hash().to_owned());
        let given = password_given.to_owned();
        // Argon2 takes tens of milliseconds of CPU: off the async workers.
        let verified = tokio::task::spawn_blocking(move || password::verify(&given, &hash)).await.unwrap_or(false);
        let matches = has_password && verified;
        let user = match user {
            None => {
                self.append(refuse(LoginFailure::UnknownUser)).await.map_err(|_| unavailable())?;
                return Err(generic());
            }
            Some(_) if !matches => {
                self.append(refuse(LoginFailure::BadPassword)).await.map_err(|_| unavailable())?;
                return Err(generic());
            }
            Some(u) if u.disabled => {
                self.append(refuse(LoginFailure::UserDisabled)).await.map_err(|_| unavailable())?;
                return Err(generic());
            }
            Some(u) => u,
        };
        let cookie = random_token(32);
        let event = LoginSucceeded {
            user_id: user.account.user_id.clone(),
            username: user.account.username.clone(),
            method: LoginMethod::Password,
            authenticator: None,
            session_id: sha256_hex(cookie.as_bytes()),
        };
        let actor = Actor {
            subject: Some(user.account.user_id.clone()),
            fhir_user: user.account.fhir_user.clone(),
            ..actor.clone()
        };
        self.append_and_apply(Event::new(Payload::from(event)).with_actor(actor)).await.map_err(|_| unavailable())?;
        Ok(SignedIn { cookie, user_id: user.account.user_id })
    }

    /// Records a sign-in refused before the password was looked at (a missing or wrong CSRF token).
    pub async fn login_refused(
        &self,
        username: Option<&str>,
        reason: LoginFailure,
        actor: &Actor,
    ) -> Result<(), AuthError> {
        let e = LoginFailed {
            username: username.map(|u| u.chars().take(64).collect()),
            reason,
            authenticator: None,
            idp: None,
            detail: None,
        };
        self.append(Event::new(Payload::from(e)).with_actor(actor.clone())).await.map(|_| ())
    }

    /// The user a session cookie belongs to, if the session is live.
    pub fn session_user(&self, cookie: &str) -> Option<User> {
        let id = sha256_hex(cookie.as_bytes());
        let now = Timestamp::now().as_millis();
        let lifetime = self.settings.session_lifetime.as_millis() as i64;
        self.read_state(|s| {
            let session = s.session(&id).filter(|x| !x.ended && x.started_ms + lifetime > now)?;
            // A session an upstream provider vouched for ends when that provider is disabled.
            if session.authenticator.as_ref().is_some_and(|a| !s.upstream_trusted(a)) {
                return None;
            }
            s.user(&session.user_id).filter(|u| !u.disabled).cloned()
        })
    }

    /// Ends the session of `cookie`, if any.
    pub async fn logout(&self, cookie: &str, actor: &Actor) -> Result<bool, AuthError> {
        let session_id = sha256_hex(cookie.as_bytes());
        let Some(user_id) = self.read_state(|s| s.session(&session_id).filter(|x| !x.ended).map(|x| x.user_id.clone()))
        else {
            return Ok(false);
        };
        let actor = Actor { subject: Some(user_id.clone()), ..actor.clone() };
        // Signing out ends what the user's sign-ins granted: every token issued to them until now.
        let cut_off = TokenRevoked {
            target: RevocationTarget::Subject { subject: user_id.clone(), issued_before: Timestamp::now() },
            reason: "logout".into(),
        };
        self.append_all_and_apply(vec![
            Event::new(Payload::from(Logout { session_id, user_id })).with_actor(actor.clone()),
            Event::new(Payload::from(cut_off)).with_actor(actor),
        ])
        .await?;
        Ok(true)
    }

    // ---------------------------------------------------------------- consent and the code

    /// The user's decision on the consent page. `chosen` is what they left ticked (`None`: they
    /// refused); `patient` the patient they picked when they are not a patient themselves. Returns
    /// the address to send the browser to.
    pub async fn decide(
        &self,
        req: &AuthorizeRequest,
        user: &User,
        cookie: &str,
        chosen: Option<&[String]>,
        patient: Option<&str>,
        actor: &Actor,
    ) -> Result<String, AuthorizeError> {
        let actor = Actor {
            subject: Some(user.account.user_id.clone()),
            client_id: Some(req.client_id.clone()),
            fhir_user: user.account.fhir_user.clone(),
            ..actor.clone()
        };
        let mut redirect = vec![];
        let Some(chosen) = chosen else {
            let refused = ConsentRecorded {
                user_id: user.account.user_id.clone(),
                client_id: req.client_id.clone(),
                requested_scope: req.scopes.to_string(),
                granted_scope: String::new(),
                approved: false,
                patient: None,
            };
            self.append(Event::new(Payload::from(refused)).with_actor(actor)).await.map_err(|_| page_unavailable())?;
            redirect.push(("error", "access_denied"));
            redirect.push(("error_description", "the user did not allow the request"));
            if let Some(s) = &req.state {
                redirect.push(("state", s.as_str()));
            }
            redirect.push(("iss", &self.settings.issuer));
            return Ok(with_query(&req.redirect_uri, &redirect));
        };
        let granted = req.scopes.filtered(|s| chosen.iter().any(|c| *c == s.to_string()));
        if granted.is_empty() {
            return Err(AuthorizeError::Page("choose at least one permission to allow, or deny the request".into()));
        }
        let patient = if req.needs_patient(&granted) {
            let own = user.account.fhir_user.as_deref().and_then(|f| f.strip_prefix("Patient/"));
            match (own, patient.map(str::trim).filter(|p| !p.is_empty())) {
                (Some(own), _) => Some(own.to_owned()),
                (None, Some(p))
                    if p.len() <= 64 && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') =>
                {
                    Some(p.to_owned())
                }
                (None, Some(_)) => return Err(AuthorizeError::Page("that is not a valid patient id".into())),
                (None, None) => return Err(AuthorizeError::Page("choose the patient this app may see".into())),
            }
        } else {
            None
        };
        let code = random_token(32);
        let now = Timestamp::now();
        let session_id = sha256_hex(cookie.as_bytes());
        let consent = ConsentRecorded {
            user_id: user.account.user_id.clone(),
            client_id: req.client_id.clone(),
            requested_scope: req.scopes.to_string(),
            granted_scope: granted.to_string(),
            approved: true,
            patient: patient.clone(),
        };
        let issued = CodeIssued {
            code_hash: sha256_hex(code.as_bytes()),
            client_id: req.client_id.clone(),
            user_id: user.account.user_id.clone(),
            redirect_uri: req.redirect_uri.clone(),
            scope: granted.to_string(),
            code_challenge: req.code_challenge.clone(),
            nonce: req.nonce.clone(),
            patient,
            fhir_user: user.account.fhir_user.clone(),
            auth_time: self
                .read_state(|s| s.session(&session_id).map(|x| Timestamp::from_millis(x.started_ms)))
                .unwrap_or(now),
            authenticator: self.read_state(|s| s.session(&session_id).and_then(|x| x.authenticator.clone())),
            session_id,
            expires_at: Timestamp::from_millis(now.as_millis() + self.settings.code_lifetime.as_millis() as i64),
        };
        self.append_all_and_apply(vec![
            Event::new(Payload::from(consent)).with_actor(actor.clone()),
            Event::new(Payload::from(issued)).with_actor(actor),
        ])
        .await
        .map_err(|_| page_unavailable())?;
        redirect.push(("code", code.as_str()));
        if let Some(s) = &req.state {
            redirect.push(("state", s.as_str()));
        }
        redirect.push(("iss", &self.settings.issuer));
        Ok(with_query(&req.redirect_uri, &redirect))
    }

    // ---------------------------------------------------------------- the token endpoint

    pub(crate) async fn authorization_code(&self, req: &FormRequest, actor: &Actor) -> Result<Value, OAuthError> {
        let client = self.authenticate(req).await?;
        let code = req.require("code")?;
        let code_hash = sha256_hex(code.as_bytes());
        let found = self
            .find_or_catch_up(|s| s.code(&code_hash).cloned())
            .await?
            .ok_or_else(|| OAuthError::invalid_grant("unknown or expired authorization code"))?;
        let issued = &found.issued;
        if issued.client_id != client.id() {
            return Err(OAuthError::invalid_grant("the code was issued to another client"));
        }
        if let Some(first) = &found.first_redemption {
            self.revoke_family(first, "code_reuse", actor).await?;
            return Err(OAuthError::invalid_grant("the code was already used; the tokens issued from it are revoked"));
        }
        if issued.expires_at.as_millis() < Timestamp::now().as_millis() {
            return Err(OAuthError::invalid_grant("the authorization code has expired"));
        }
        if req.require("redirect_uri")? != issued.redirect_uri {
            return Err(OAuthError::invalid_grant("redirect_uri differs from the authorization request's"));
        }
        let verifier =
            req.get("code_verifier")?.ok_or_else(|| OAuthError::invalid_grant("code_verifier is required (PKCE)"))?;
        if !valid_verifier(verifier) || s256(verifier) != issued.code_challenge {
            return Err(OAuthError::invalid_grant(
                "PKCE verification failed: code_verifier does not match code_challenge",
            ));
        }
        let family = uuid::Uuid::now_v7().to_string();
        let redeemed =
            CodeRedeemed { code_hash: code_hash.clone(), client_id: client.id().to_owned(), family_id: family.clone() };
        let actor =
            Actor { client_id: Some(client.id().to_owned()), subject: Some(issued.user_id.clone()), ..actor.clone() };
        self.append_and_apply(Event::new(Payload::from(redeemed)).with_actor(actor.clone())).await?;
        let first = self.read_state(|s| s.code(&code_hash).and_then(|c| c.first_redemption.clone()));
        if first.as_deref() != Some(family.as_str()) {
            // Another redemption came first: the code was used twice.
            if let Some(first) = first {
                self.revoke_family(&first, "code_reuse", &actor).await?;
            }
            return Err(OAuthError::invalid_grant("the code was already used; the tokens issued from it are revoked"));
        }
        let scopes = ScopeSet::parse(&issued.scope).map_err(|e| OAuthError::new("server_error", e.to_string()))?;
        self.issue_user_tokens(
            &client.registration.client_id,
            &issued.user_id,
            &scopes,
            &family,
            None,
            "authorization_code",
            issued.nonce.as_deref(),
            &actor,
        )
        .await
    }

    pub(crate) async fn refresh_token(&self, req: &FormRequest, actor: &Actor) -> Result<Value, OAuthError> {
        let client = self.authenticate(req).await?;
        let presented = req.require("refresh_token")?;
        let jti = sha256_hex(presented.as_bytes());
        let token = self
            .find_or_catch_up(|s| s.refresh_token(&jti).cloned())
            .await?
            .ok_or_else(|| OAuthError::invalid_grant("unknown refresh token"))?;
        if token.client_id != client.id() {
            return Err(OAuthError::invalid_grant("the refresh token was issued to another client"));
        }
        if self.read_state(|s| s.is_family_revoked(&token.family_id)) {
            return Err(OAuthError::invalid_grant("the refresh token has been revoked"));
        }
        let actor =
            Actor { client_id: Some(client.id().to_owned()), subject: Some(token.user_id.clone()), ..actor.clone() };
        if token.rotated_to.is_some() {
            // RFC 9700 4.14.2: a used refresh token presented again means it leaked. Kill the family.
            self.revoke_family(&token.family_id, "refresh_token_reuse", &actor).await?;
            return Err(OAuthError::invalid_grant("the refresh token was already used; its whole family is revoked"));
        }
        if token.expires_ms < Timestamp::now().as_millis() {
            return Err(OAuthError::invalid_grant("the refresh token has expired"));
        }
        if self.read_state(|s| s.user(&token.user_id).is_none_or(|u| u.disabled)) {
            return Err(OAuthError::invalid_grant("the user is disabled"));
        }
        let original = ScopeSet::parse(&token.scope).map_err(|e| OAuthError::new("server_error", e.to_string()))?;
        let scopes = match req.get("scope")? {
            None => original,
            Some(asked) => {
                let asked = ScopeSet::parse(asked).map_err(|e| OAuthError::invalid_scope(e.to_string()))?;
                if asked.iter().any(|s| !original.contains(s)) {
                    return Err(OAuthError::invalid_scope("a refresh cannot widen the scopes granted"));
                }
                asked
            }
        };
        let answer = self
            .issue_user_tokens(
                client.id(),
                &token.user_id,
                &scopes,
                &token.family_id,
                Some(&jti),
                "refresh_token",
                None,
                &actor,
            )
            .await?;
        // Two rotations of the same token at once: only the first stands.
        let winner = self.read_state(|s| s.refresh_token(&jti).and_then(|t| t.rotated_to.clone()));
        let ours = answer["refresh_token"].as_str().map(|r| sha256_hex(r.as_bytes()));
        if winner != ours {
            self.revoke_family(&token.family_id, "refresh_token_reuse", &actor).await?;
            return Err(OAuthError::invalid_grant("the refresh token was already used; its whole family is revoked"));
        }
        Ok(answer)
    }

    /// Looks something up in the state; if it is not there it may have been recorded a moment ago
    /// by another instance, so catch up with the log once and look again.
    async fn find_or_catch_up<T>(
        &self,
        find: impl Fn(&crate::state::AuthState) -> Option<T>,
    ) -> Result<Option<T>, AuthError> {
        if let Some(found) = self.read_state(&find) {
            return Ok(Some(found));
        }
        self.catch_up().await?;
        Ok(self.read_state(&find))
    }

    pub(crate) async fn revoke_family(&self, family_id: &str, reason: &str, actor: &Actor) -> Result<(), AuthError> {
        let e = TokenRevoked {
            target: RevocationTarget::Family { family_id: family_id.to_owned() },
            reason: reason.to_owned(),
        };
        self.append_and_apply(Event::new(Payload::from(e)).with_actor(actor.clone())).await
    }

    /// Access token, ID token (with `openid`) and refresh token (with `offline_access` or
    /// `online_access`) for a user, all recorded in one atomic append before they are returned.
    #[allow(clippy::too_many_arguments)]
    async fn issue_user_tokens(
        &self,
        client_id: &str,
        user_id: &str,
        scopes: &ScopeSet,
        family: &str,
        rotated_from: Option<&str>,
        grant_type: &str,
        nonce: Option<&str>,
        actor: &Actor,
    ) -> Result<Value, OAuthError> {
        let context = self
            .read_state(|s| s.family(family).cloned())
            .ok_or_else(|| OAuthError::invalid_grant("the grant behind this token is unknown"))?;
        if context.authenticator.as_ref().is_some_and(|a| !self.read_state(|s| s.upstream_trusted(a))) {
            return Err(OAuthError::invalid_grant("the identity provider the user signed in with is disabled"));
        }
        let fhir_user = context.fhir_user.clone().filter(|_| scopes.contains(&Scope::FhirUser));
        let lifetime = self.settings.access_token_lifetime.as_secs() as i64;
        let patient = context.patient.clone().filter(|_| {
            scopes.iter().any(|s| {
                matches!(s, Scope::LaunchPatient) || matches!(s, Scope::Resource(r) if r.context == Context::Patient)
            })
        });
        let (access, access_event) = self.issue_access_token(&Grant {
            client_id,
            subject: user_id,
            scopes,
            lifetime_secs: lifetime,
            grant_type,
            patient: patient.clone(),
            fhir_user: fhir_user.clone(),
            family: Some(family.to_owned()),
        })?;
        // The grant's events name who vouched for the user, like the accesses made with it.
        let actor = &Actor { authenticator: context.authenticator.clone(), ..actor.clone() };
        let now = now_secs();
        let mut events = vec![Event::new(Payload::from(access_event.clone())).with_actor(actor.clone())];
        let mut answer = json!({
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": lifetime,
            "scope": scopes.to_string(),
        });
        if let Some(p) = &patient {
            answer["patient"] = p.clone().into();
            answer["need_patient_banner"] = true.into();
        }
        answer["smart_style_url"] = format!("{}/smart-style.json", self.settings.issuer).into();
        if scopes.contains(&Scope::OpenId) {
            let key = self.signing_key(KeyPurpose::IdToken)?;
            let mut claims = json!({
                "iss": self.settings.issuer, "sub": user_id, "aud": client_id, "azp": client_id,
                "exp": now + lifetime, "iat": now, "auth_time": context.auth_time_ms / 1000,
                "jti": uuid::Uuid::now_v7().to_string(),
            });
            if let Some(n) = nonce {
                claims["nonce"] = n.into();
            }
            if let Some(f) = &fhir_user {
                claims["fhirUser"] = format!("{}/fhir/{f}", self.settings.issuer).into();
            }
            let mut header = jsonwebtoken::Header::new(key.algorithm);
            header.kid = Some(key.kid.clone());
            let id_token = jsonwebtoken::encode(&header, &claims, &key.encoding)
                .map_err(|e| OAuthError::new("server_error", format!("signing failed: {e}")))?;
            events.push(
                Event::new(Payload::from(TokenIssued {
                    jti: claims["jti"].as_str().unwrap_or_default().to_owned(),
                    kind: TokenKind::Id,
                    kid: Some(key.kid.clone()),
                    family_id: Some(family.to_owned()),
                    audience: client_id.to_owned(),
                    rotated_from: None,
                    ..access_event.clone()
                }))
                .with_actor(actor.clone()),
            );
            answer["id_token"] = id_token.into();
        }
        let offline = scopes.contains(&Scope::OfflineAccess);
        if offline || scopes.contains(&Scope::OnlineAccess) {
            let refresh = random_token(32);
            let lifetime =
                if offline { self.settings.offline_refresh_lifetime } else { self.settings.session_lifetime };
            events.push(
                Event::new(Payload::from(TokenIssued {
                    jti: sha256_hex(refresh.as_bytes()),
                    kind: TokenKind::Refresh,
                    kid: None,
                    family_id: Some(family.to_owned()),
                    audience: self.settings.token_endpoint(),
                    issued_at: Timestamp::from_millis(now * 1000),
                    expires_at: Timestamp::from_millis(now * 1000 + lifetime.as_millis() as i64),
                    rotated_from: rotated_from.map(str::to_owned),
                    ..access_event.clone()
                }))
                .with_actor(actor.clone()),
            );
            answer["refresh_token"] = refresh.into();
        }
        self.append_all_and_apply(events).await?;
        Ok(answer)
    }

    /// Who vouched for the user behind a token of `family` (an upstream provider's identity), for
    /// the audit trail. A family this instance has not seen yet (issued a moment ago elsewhere)
    /// is looked for again after catching up with the log.
    pub async fn family_authenticator(&self, family: &str) -> Option<cairn_events::Authenticator> {
        // On every bearer request with a family: only the authenticator is copied out of the state.
        self.find_or_catch_up(|s| s.family(family).map(|f| f.authenticator.clone())).await.ok().flatten().flatten()
    }

    // ---------------------------------------------------------------- userinfo

    /// `/userinfo` for a verified access token that carries `openid`.
    pub fn userinfo(&self, token: &crate::VerifiedToken) -> Result<Value, crate::TokenRejection> {
        if !token.scopes.contains(&Scope::OpenId) {
            return Err(crate::TokenRejection::Claims);
        }
        let user = self.read_state(|s| s.user(&token.claims.sub).cloned()).ok_or(crate::TokenRejection::Claims)?;
        let mut out = json!({"sub": user.account.user_id, "preferred_username": user.account.username});
        if let (Some(f), true) = (&user.account.fhir_user, token.scopes.contains(&Scope::FhirUser)) {
            out["fhirUser"] = format!("{}/fhir/{f}", self.settings.issuer).into();
        }
        Ok(out)
    }
}

pub(crate) fn unavailable() -> LoginRefusal {
    LoginRefusal("Sign-in is unavailable right now (the audit log cannot record it). Try again shortly.".into())
}

fn page_unavailable() -> AuthorizeError {
    AuthorizeError::Page("the audit log cannot record this right now; try again shortly".into())
}
