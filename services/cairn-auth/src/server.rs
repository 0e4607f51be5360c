//! [`AuthServer`]: the authorization server's use cases over the event log.
//!
//! Every decision that changes or reveals something (a grant, a refusal, an introspection, a
//! revocation, a registration) is appended to the log before the answer is returned; when the log
//! cannot take it, the answer is `temporarily_unavailable` and nothing is issued.

use crate::client_auth::{self, FormRequest};
use crate::keys::KeyRing;
use crate::scope::{Context, Scope, ScopeSet};
use crate::state::{AuthState, Client};
use crate::token::{self, AccessClaims, TokenRejection, VerifiedToken, Verifier};
use crate::{AuthError, OAuthError, assertion, now_secs, password, random_token, sha256_hex};
use cairn_events::{
    Actor, ClientDisabled, ClientKind, ClientRegistered, Event, KeyPublished, KeyPurpose, Payload, RevocationTarget,
    Timestamp, TokenIntrospected, TokenIssued, TokenKind, TokenRefused, TokenRevoked, UserCreated, UserDisabled,
    topics,
};
use cairn_log::{EventLog, NewRecord, Tailed};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Settings of the authorization server. Times are kept short by default.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// The issuer: the server's public base URL, without a trailing slash.
    pub issuer: String,
    /// Lifetime of tokens issued to backend services (`client_credentials`); at most 5 minutes.
    pub backend_token_lifetime: Duration,
    /// Lifetime of access tokens issued to apps (authorization code and refresh grants).
    pub access_token_lifetime: Duration,
    /// Lifetime of refresh tokens granted with `offline_access`.
    pub offline_refresh_lifetime: Duration,
    /// Lifetime of a browser session, and of refresh tokens granted with `online_access`.
    pub session_lifetime: Duration,
    /// Lifetime of an authorization code.
    pub code_lifetime: Duration,
    /// How long to wait for the log when this instance must catch up (startup, an unknown `kid`).
    pub catch_up_timeout: Duration,
    /// How far this instance's view of `cairn.auth` (revocations, disabled users and clients) may lag
    /// behind the log before it refuses bearer tokens (503) rather than risk admitting a revoked one.
    pub feed_lag_bound: Duration,
    /// Whether users may sign in with a Cairn password (off: only through upstream providers).
    pub password_login: bool,
}

impl AuthSettings {
    pub fn new(issuer: impl Into<String>) -> AuthSettings {
        AuthSettings {
            issuer: issuer.into().trim_end_matches('/').to_owned(),
            backend_token_lifetime: Duration::from_secs(300),
            access_token_lifetime: Duration::from_secs(900),
            offline_refresh_lifetime: Duration::from_secs(30 * 24 * 3600),
            session_lifetime: Duration::from_secs(8 * 3600),
            code_lifetime: Duration::from_secs(60),
            catch_up_timeout: Duration::from_secs(30),
            feed_lag_bound: Duration::from_secs(5),
            password_login: true,
        }
    }
    pub fn fhir_base(&self) -> String {
        format!("{}/fhir", self.issuer)
    }
    pub fn token_endpoint(&self) -> String {
        format!("{}/token", self.issuer)
    }
}

/// The longest a backend-services token may live (SMART Backend Services).
pub const MAX_BACKEND_TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// Administrative commands (the `cairn admin` CLI sends these to a running server).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AdminCommand {
    ClientRegister {
        name: String,
        kind: ClientKind,
        #[serde(default)]
        client_id: Option<String>,
        #[serde(default)]
        redirect_uris: Vec<String>,
        scope: String,
        #[serde(default)]
        jwks: Option<Value>,
        #[serde(default)]
        jwks_uri: Option<String>,
    },
    ClientDisable {
        client_id: String,
    },
    ClientList,
    UserAdd {
        username: String,
        password: String,
        #[serde(default)]
        fhir_user: Option<String>,
        #[serde(default)]
        roles: Vec<String>,
    },
    UserDisable {
        username: String,
    },
    UserList,
    /// Creates new signing keys, publishes them, then signs with them; the old ones stay published
    /// until every token they signed has expired.
    KeysRotate,
    /// An RFC 7591 initial access token for `/register`.
    RegistrationToken {
        expires_in_secs: u64,
    },
    /// Adds (or reconfigures) an upstream OpenID provider.
    IdpAdd(crate::federation::IdpConfig),
    IdpDisable {
        idp_id: String,
    },
    IdpList,
    /// Links an upstream identity (provider, `sub`) to a user.
    UserLink {
        username: String,
        idp_id: String,
        subject: String,
    },
    Revoke {
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        client_id: Option<String>,
        #[serde(default)]
        jti: Option<String>,
    },
}

pub(crate) struct Projection {
    pub(crate) state: AuthState,
    /// Next offset to apply, per partition of `cairn.auth`.
    next: Vec<u64>,
}

/// The authorization server of one process.
pub struct AuthServer {
    pub(crate) log: Arc<dyn EventLog>,
    pub(crate) settings: AuthSettings,
    /// `None` for an administrative instance (the `cairn admin` CLI offline), which signs nothing.
    pub(crate) keys: Option<RwLock<KeyRing>>,
    pub(crate) projection: RwLock<Projection>,
    applied: tokio::sync::watch::Sender<u64>,
    verifier: Verifier,
    replay: assertion::ReplayCache,
    jwks_fetcher: std::sync::OnceLock<Arc<dyn crate::jwks::JwksFetcher>>,
    jwks_cache: crate::jwks::JwksCache,
    /// When (ms) this instance last had applied everything the log held at that moment.
    current_at_ms: std::sync::atomic::AtomicI64,
    /// When the latest catch-up for an unknown `kid` started (they run one at a time).
    kid_catch_up: tokio::sync::Mutex<Option<std::time::Instant>>,
}

/// How often the feed's lag behind the log is measured.
const FEED_CHECK_EVERY: Duration = Duration::from_millis(100);

/// What an access token is issued for.
pub(crate) struct Grant<'a> {
    pub client_id: &'a str,
    pub subject: &'a str,
    pub scopes: &'a ScopeSet,
    pub lifetime_secs: i64,
    pub grant_type: &'a str,
    pub patient: Option<String>,
    pub fhir_user: Option<String>,
    pub family: Option<String>,
}

impl AuthServer {
    /// Loads (or creates) this process's signing keys from `keys_dir`, rebuilds the state from the
    /// log, publishes keys the log does not know yet, and keeps following the log. Without a key
    /// directory the instance only administers (it issues no tokens).
    pub async fn start(
        log: Arc<dyn EventLog>,
        keys_dir: Option<&Path>,
        settings: AuthSettings,
    ) -> Result<Arc<AuthServer>, AuthError> {
        let keys = keys_dir.map(KeyRing::load_or_create).transpose()?.map(RwLock::new);
        let partitions = log.partitions(topics::AUTH).map_err(|e| AuthError::Unavailable(e.to_string()))? as usize;
        let server = Arc::new(AuthServer {
            log,
            verifier: Verifier::new(settings.issuer.clone(), settings.fhir_base()),
            settings,
            keys,
            projection: RwLock::new(Projection { state: AuthState::default(), next: vec![0; partitions] }),
            applied: tokio::sync::watch::channel(0).0,
            replay: assertion::ReplayCache::default(),
            jwks_fetcher: std::sync::OnceLock::new(),
            jwks_cache: crate::jwks::JwksCache::default(),
            current_at_ms: std::sync::atomic::AtomicI64::new(0),
            kid_catch_up: tokio::sync::Mutex::new(None),
        });
        tokio::spawn(follow(Arc::downgrade(&server)));
        server.catch_up().await?;
        server.current_at_ms.store(Timestamp::now().as_millis(), std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(watch_feed(Arc::downgrade(&server)));
        let unpublished: Vec<KeyPublished> = {
            let p = server.projection.read().expect("auth projection");
            let ring = server.keys.as_ref().map(|r| r.read().expect("key ring"));
            ring.iter()
                .flat_map(|ring| ring.keys())
                .filter(|k| p.state.key(&k.kid).is_none())
                .map(|k| KeyPublished {
                    kid: k.kid.clone(),
                    alg: k.public_jwk["alg"].as_str().unwrap_or_default().to_owned(),
                    purpose: k.purpose,
                    jwk: k.public_jwk.clone(),
                    replaces: None,
                })
                .collect()
        };
        for key in unpublished {
            tracing::info!(kid = %key.kid, purpose = ?key.purpose, "publishing signing key");
            server.append(Event::new(Payload::from(key))).await?;
        }
        server.catch_up().await?;
        Ok(server)
    }

    pub fn settings(&self) -> &AuthSettings {
        &self.settings
    }

    /// Waits until every event in the auth topic at this moment has been applied.
    pub async fn catch_up(&self) -> Result<(), AuthError> {
        let partitions = self.projection.read().expect("auth projection").next.len();
        let deadline = tokio::time::Instant::now() + self.settings.catch_up_timeout;
        let mut ends = Vec::with_capacity(partitions);
        for p in 0..partitions {
            // A topic created a moment ago may have no partition leader yet: retry until the deadline.
            let end = loop {
                match self.log.end_offset(topics::AUTH, p as u32).await {
                    Ok(end) => break end,
                    Err(e) if tokio::time::Instant::now() >= deadline => {
                        return Err(AuthError::Unavailable(e.to_string()));
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "reading the auth topic's end offset; retrying");
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    }
                }
            };
            ends.push(end);
        }
        self.wait_for(&ends).await
    }

    async fn wait_for(&self, ends: &[u64]) -> Result<(), AuthError> {
        let mut rx = self.applied.subscribe();
        let deadline = tokio::time::Instant::now() + self.settings.catch_up_timeout;
        loop {
            {
                let p = self.projection.read().expect("auth projection");
                if p.next.iter().zip(ends).all(|(n, e)| n >= e) {
                    return Ok(());
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return Err(AuthError::Unavailable(
                    "the authorization state did not catch up with the log in time".into(),
                ));
            }
        }
    }

    pub(crate) async fn append(&self, event: Event) -> Result<cairn_log::Position, AuthError> {
        let record = NewRecord::new(event.topic(), event.partition_key(), event.canonical_bytes());
        self.log.append(record).await.map_err(|e| {
            tracing::error!(error = %e, "auth event refused by the log: failing closed");
            AuthError::Unavailable(e.to_string())
        })
    }

    /// Appends and waits until this instance's state includes the event (read-your-writes for admin
    /// commands).
    pub(crate) async fn append_and_apply(&self, event: Event) -> Result<(), AuthError> {
        self.append_all_and_apply(vec![event]).await
    }

    /// Appends several events atomically and waits until this instance has applied them.
    pub(crate) async fn append_all_and_apply(&self, events: Vec<Event>) -> Result<(), AuthError> {
        let records: Vec<NewRecord> =
            events.iter().map(|e| NewRecord::new(e.topic(), e.partition_key(), e.canonical_bytes())).collect();
        let positions = self.log.append_batch(records).await.map_err(|e| {
            tracing::error!(error = %e, "auth events refused by the log: failing closed");
            AuthError::Unavailable(e.to_string())
        })?;
        let mut ends = vec![0; self.projection.read().expect("auth projection").next.len()];
        for pos in positions {
            let end = &mut ends[pos.partition as usize];
            *end = (*end).max(pos.offset + 1);
        }
        self.wait_for(&ends).await
    }

    pub(crate) fn read_state<T>(&self, f: impl FnOnce(&AuthState) -> T) -> T {
        f(&self.projection.read().expect("auth projection").state)
    }

    // ---------------------------------------------------------------- token endpoint

    /// `POST /token`. Refusals are recorded as `auth.token.refused` before they are returned.
    pub async fn token(&self, req: &FormRequest, actor: &Actor) -> Result<Value, OAuthError> {
        let grant_type = req.get("grant_type").ok().flatten().map(str::to_owned);
        match self.grant(req, actor).await {
            Ok(v) => Ok(v),
            Err(e) if e.error == "temporarily_unavailable" || e.error == "server_error" => Err(e),
            Err(e) => {
                let refused = TokenRefused {
                    grant_type,
                    client_id: req.claimed_client(),
                    error: e.error.to_owned(),
                    reason: e.description.clone(),
                };
                self.append(Event::new(Payload::from(refused)).with_actor(actor.clone())).await?;
                Err(e)
            }
        }
    }

    async fn grant(&self, req: &FormRequest, actor: &Actor) -> Result<Value, OAuthError> {
        let grant_type = req.require("grant_type")?;
        match grant_type {
            "client_credentials" => self.client_credentials(req, actor).await,
            "authorization_code" => self.authorization_code(req, actor).await,
            "refresh_token" => self.refresh_token(req, actor).await,
            "password" | "implicit" => Err(OAuthError::new(
                "unsupported_grant_type",
                format!("the {grant_type} grant is not offered (RFC 9700)"),
            )),
            other => Err(OAuthError::new("unsupported_grant_type", format!("grant_type `{other}` is not supported"))),
        }
    }

    pub(crate) async fn authenticate(&self, req: &FormRequest) -> Result<Client, OAuthError> {
        let token_endpoint = self.settings.token_endpoint();
        let fetched = self.fetch_client_keys(req).await?;
        self.read_state(|s| {
            client_auth::authenticate(s, req, &token_endpoint, &self.replay, now_secs(), fetched.as_ref())
        })
    }

    /// For an assertion from a client that registered a `jwks_uri`: its key set, fetched (or cached).
    async fn fetch_client_keys(&self, req: &FormRequest) -> Result<Option<Value>, OAuthError> {
        let Some(jwt) = req.get("client_assertion").ok().flatten() else { return Ok(None) };
        let Some(claimed) = assertion::claimed_client(jwt) else { return Ok(None) };
        let Some(uri) = self.read_state(|s| s.client(&claimed).and_then(|c| c.registration.jwks_uri.clone())) else {
            return Ok(None);
        };
        let Some(fetcher) = self.jwks_fetcher.get() else {
            return Err(OAuthError::invalid_client("this server cannot fetch client key sets"));
        };
        let kid = jsonwebtoken::decode_header(jwt).ok().and_then(|h| h.kid);
        match self.jwks_cache.get(fetcher.as_ref(), &uri, kid.as_deref()).await {
            Ok(set) => Ok(Some(set)),
            Err(e) => {
                tracing::warn!(client_id = %claimed, error = %e, "fetching a client's jwks_uri failed");
                Err(OAuthError::invalid_client("the client's key set could not be fetched from its jwks_uri"))
            }
        }
    }

    /// Lets this server fetch client key sets from their `jwks_uri` (the edge knows HTTP).
    pub fn set_jwks_fetcher(&self, fetcher: Arc<dyn crate::jwks::JwksFetcher>) {
        let _ = self.jwks_fetcher.set(fetcher);
    }

    async fn client_credentials(&self, req: &FormRequest, actor: &Actor) -> Result<Value, OAuthError> {
        let client = self.authenticate(req).await?;
        if client.kind() == ClientKind::Public {
            return Err(OAuthError::new("unauthorized_client", "public clients cannot use client_credentials"));
        }
        let requested = req.get("scope")?.ok_or_else(|| OAuthError::invalid_scope("scope is required"))?;
        let requested = ScopeSet::parse(requested).map_err(|e| OAuthError::invalid_scope(e.to_string()))?;
        if requested.iter().any(|s| !matches!(s, Scope::Resource(r) if r.context == Context::System)) {
            return Err(OAuthError::invalid_scope("client_credentials grants system/ scopes only"));
        }
        let granted = requested.narrowed_to(&client.allowed);
        if granted.is_empty() {
            return Err(OAuthError::invalid_scope("none of the requested scopes is allowed for this client"));
        }
        let lifetime = self.settings.backend_token_lifetime.min(MAX_BACKEND_TOKEN_LIFETIME).as_secs() as i64;
        let (token, issued) = self.issue_access_token(&Grant {
            client_id: client.id(),
            subject: client.id(),
            scopes: &granted,
            lifetime_secs: lifetime,
            grant_type: "client_credentials",
            patient: None,
            fhir_user: None,
            family: None,
        })?;
        self.append(
            Event::new(Payload::from(issued))
                .with_actor(Actor { client_id: Some(client.id().to_owned()), ..actor.clone() }),
        )
        .await?;
        Ok(json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": lifetime,
            "scope": granted.to_string(),
        }))
    }

    /// The key that signs tokens of `purpose` now.
    pub(crate) fn signing_key(&self, purpose: KeyPurpose) -> Result<Arc<crate::keys::SigningKey>, AuthError> {
        self.keys
            .as_ref()
            .map(|ring| ring.read().expect("key ring").newest(purpose).clone())
            .ok_or_else(|| AuthError::Internal("this instance has no signing key".into()))
    }

    pub(crate) fn issue_access_token(&self, g: &Grant) -> Result<(String, TokenIssued), OAuthError> {
        let key = self.signing_key(KeyPurpose::AccessToken)?;
        let now = now_secs();
        let claims = AccessClaims {
            iss: self.settings.issuer.clone(),
            sub: g.subject.to_owned(),
            aud: self.settings.fhir_base(),
            exp: now + g.lifetime_secs,
            iat: now,
            nbf: None,
            jti: uuid::Uuid::now_v7().to_string(),
            client_id: g.client_id.to_owned(),
            scope: g.scopes.to_string(),
            patient: g.patient.clone(),
            fhir_user: g.fhir_user.clone(),
            fam: g.family.clone(),
        };
        let token = token::sign(&claims, &key)?;
        let issued = TokenIssued {
            jti: claims.jti.clone(),
            kind: TokenKind::Access,
            grant_type: g.grant_type.to_owned(),
            client_id: claims.client_id.clone(),
            subject: Some(claims.sub.clone()),
            scope: claims.scope.clone(),
            audience: claims.aud.clone(),
            issued_at: Timestamp::from_millis(now * 1000),
            expires_at: Timestamp::from_millis(claims.exp * 1000),
            family_id: g.family.clone(),
            kid: Some(key.kid.clone()),
            rotated_from: None,
        };
        Ok((token, issued))
    }

    // ---------------------------------------------------------------- resource server side

    /// Verifies a bearer token presented to the FHIR API. A token signed by a key this instance has
    /// not seen yet makes it catch up with the log once before refusing: a key is published before
    /// it signs anything, so no token in flight fails for an unknown `kid`.
    pub async fn verify(&self, token: &str) -> Result<Arc<VerifiedToken>, TokenRejection> {
        if self.feed_lag() > self.settings.feed_lag_bound {
            return Err(TokenRejection::FeedBehind);
        }
        match self.verify_now(token) {
            Err(TokenRejection::UnknownKey) => {
                // One catch-up at a time, shared: a catch-up that started after this token arrived
                // has seen every key published before it, so a flood of tokens with made-up kids
                // costs one read of the log's end per round, not one per token.
                let arrived = std::time::Instant::now();
                let mut last = self.kid_catch_up.lock().await;
                if last.is_none_or(|started| started < arrived) {
                    *last = Some(std::time::Instant::now());
                    if self.catch_up().await.is_err() {
                        return Err(TokenRejection::UnknownKey);
                    }
                }
                drop(last);
                self.verify_now(token)
            }
            other => other,
        }
    }

    /// How long ago this instance last had applied everything the log held (its revocation feed's
    /// lag). Past `feed_lag_bound` tokens are refused with 503.
    pub fn feed_lag(&self) -> Duration {
        let at = self.current_at_ms.load(std::sync::atomic::Ordering::Relaxed);
        Duration::from_millis((Timestamp::now().as_millis() - at).max(0) as u64)
    }

    fn verify_now(&self, token: &str) -> Result<Arc<VerifiedToken>, TokenRejection> {
        self.read_state(|s| self.verifier.verify(token, s, now_secs()))
    }

    // ---------------------------------------------------------------- introspection, revocation

    /// `POST /introspect` (RFC 7662). Only confidential clients may ask. Anything not active is
    /// exactly `{"active": false}`.
    pub async fn introspect(&self, req: &FormRequest, actor: &Actor) -> Result<Value, OAuthError> {
        let caller = self.authenticate(req).await?;
        if caller.kind() == ClientKind::Public {
            return Err(OAuthError::invalid_client("public clients may not introspect tokens"));
        }
        let token = req.require("token")?;
        let verified = match self.verify(token).await {
            Ok(v) => Some(v),
            Err(TokenRejection::FeedBehind) => {
                return Err(OAuthError::new(
                    "temporarily_unavailable",
                    "this server's revocation feed is behind the log",
                ));
            }
            Err(_) => None,
        };
        let event = TokenIntrospected {
            client_id: caller.id().to_owned(),
            jti: verified.as_ref().map(|v| v.claims.jti.clone()),
            active: verified.is_some(),
        };
        self.append(
            Event::new(Payload::from(event))
                .with_actor(Actor { client_id: Some(caller.id().to_owned()), ..actor.clone() }),
        )
        .await?;
        let Some(v) = verified else { return Ok(json!({"active": false})) };
        let c = &v.claims;
        let mut out = json!({
            "active": true,
            "scope": c.scope,
            "client_id": c.client_id,
            "sub": c.sub,
            "exp": c.exp,
            "iat": c.iat,
            "iss": c.iss,
            "aud": c.aud,
            "jti": c.jti,
            "token_type": "Bearer",
        });
        if let Some(p) = &c.patient {
            out["patient"] = p.clone().into();
        }
        if let Some(f) = &c.fhir_user {
            out["fhirUser"] = f.clone().into();
        }
        Ok(out)
    }

    /// `POST /revoke` (RFC 7009): a client revokes one of its own tokens. Unknown and invalid tokens
    /// are answered with success, as the RFC asks.
    pub async fn revoke(&self, req: &FormRequest, actor: &Actor) -> Result<(), OAuthError> {
        let caller = self.authenticate(req).await?;
        let token = req.require("token")?;
        if let Some(hint) = req.get("token_type_hint")?
            && !matches!(hint, "access_token" | "refresh_token")
        {
            return Err(OAuthError::new(
                "unsupported_token_type",
                format!("token_type_hint `{hint}` is not supported"),
            ));
        }
        let Ok(v) = self.verify(token).await else { return Ok(()) };
        if v.claims.client_id != caller.id() {
            return Err(OAuthError::new("unauthorized_client", "a client may revoke only its own tokens"));
        }
        let revoked = TokenRevoked {
            target: RevocationTarget::Token {
                jti: v.claims.jti.clone(),
                expires_at: Timestamp::from_millis(v.claims.exp * 1000),
            },
            reason: "revocation_endpoint".into(),
        };
        self.append_and_apply(
            Event::new(Payload::from(revoked))
                .with_actor(Actor { client_id: Some(caller.id().to_owned()), ..actor.clone() }),
        )
        .await?;
        Ok(())
    }

    // ---------------------------------------------------------------- discovery

    /// `/jwks`: the public keys tokens may be verified with (every live token key published in the
    /// log), and the log's seal keys (Ed25519, `"use": "sig"`, `"alg": "EdDSA"`), which auditors use
    /// to check the signed checkpoints (`cairn audit verify --jwks`).
    pub fn jwks(&self) -> Value {
        let now = Timestamp::now().as_millis();
        self.read_state(|s| {
            let tokens = s.keys().iter().filter(|k| k.is_live(now)).map(|k| k.jwk.clone());
            json!({"keys": tokens.chain(s.seal_keys().iter().cloned()).collect::<Vec<_>>()})
        })
    }

    /// Publishes a log seal public key (a JWK from `cairn_log::seal`) unless the log has it already.
    pub async fn publish_seal_key(&self, kid: &str, jwk: Value) -> Result<(), AuthError> {
        if self.read_state(|s| s.seal_keys().iter().any(|j| j["kid"] == kid)) {
            return Ok(());
        }
        let event = KeyPublished {
            kid: kid.to_owned(),
            alg: "EdDSA".into(),
            purpose: KeyPurpose::LogSeal,
            jwk,
            replaces: None,
        };
        self.append_and_apply(Event::new(Payload::from(event))).await
    }

    /// RFC 8414 / OpenID Connect Discovery metadata: only what this server really does.
    pub fn server_metadata(&self) -> Value {
        let i = &self.settings.issuer;
        json!({
            "issuer": i,
            "authorization_endpoint": format!("{i}/authorize"),
            "token_endpoint": self.settings.token_endpoint(),
            "userinfo_endpoint": format!("{i}/userinfo"),
            "jwks_uri": format!("{i}/jwks"),
            "introspection_endpoint": format!("{i}/introspect"),
            "revocation_endpoint": format!("{i}/revoke"),
            "end_session_endpoint": format!("{i}/logout"),
            "registration_endpoint": format!("{i}/register"),
            "grant_types_supported": GRANT_TYPES,
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": TOKEN_AUTH_METHODS,
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            "introspection_endpoint_auth_methods_supported": AUTH_METHODS,
            "revocation_endpoint_auth_methods_supported": AUTH_METHODS,
            "scopes_supported": SCOPES_SUPPORTED,
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "azp", "fhirUser", "preferred_username"],
            "code_challenge_methods_supported": ["S256"],
            "authorization_response_iss_parameter_supported": true,
        })
    }

    /// `{fhir-base}/.well-known/smart-configuration` (SMART App Launch 2.2): capabilities that work.
    pub fn smart_configuration(&self) -> Value {
        let i = &self.settings.issuer;
        json!({
            "issuer": i,
            "jwks_uri": format!("{i}/jwks"),
            "authorization_endpoint": format!("{i}/authorize"),
            "token_endpoint": self.settings.token_endpoint(),
            "token_endpoint_auth_methods_supported": TOKEN_AUTH_METHODS,
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            "grant_types_supported": GRANT_TYPES,
            "scopes_supported": SCOPES_SUPPORTED,
            "response_types_supported": ["code"],
            "introspection_endpoint": format!("{i}/introspect"),
            "revocation_endpoint": format!("{i}/revoke"),
            "userinfo_endpoint": format!("{i}/userinfo"),
            "registration_endpoint": format!("{i}/register"),
            "code_challenge_methods_supported": ["S256"],
            "capabilities": [
                "launch-standalone", "authorize-post",
                "client-public", "client-confidential-symmetric", "client-confidential-asymmetric",
                "sso-openid-connect", "context-banner", "context-style", "context-standalone-patient",
                "permission-offline", "permission-online", "permission-patient", "permission-user",
                "permission-v1", "permission-v2",
            ],
        })
    }

    /// The styling hints `smart_style_url` points at (SMART App Launch: context-style).
    pub fn smart_style(&self) -> Value {
        json!({
            "color_background": "#f6f7f9", "color_error": "#b3261e", "color_highlight": "#1f6feb",
            "color_modal_backdrop": "", "color_success": "#1a7f37", "color_text": "#1f2328",
            "dim_border_radius": "6px", "dim_font_size": "15px", "dim_spacing_size": "16px",
            "font_family_body": "system-ui, sans-serif", "font_family_heading": "system-ui, sans-serif",
        })
    }

    // ---------------------------------------------------------------- administration

    /// Runs an administrative command; its events are applied here before it returns.
    pub async fn admin(&self, cmd: AdminCommand) -> Result<Value, AuthError> {
        let admin_actor = Actor { subject: Some("admin".into()), ..Actor::default() };
        match cmd {
            AdminCommand::ClientRegister { name, kind, client_id, redirect_uris, scope, jwks, jwks_uri } => {
                let (registration, secret) = new_client(name, kind, client_id, redirect_uris, scope, jwks, jwks_uri, "admin")?;
                if self.read_state(|s| s.client(&registration.client_id).is_some()) {
                    return Err(AuthError::Invalid(format!("client `{}` already exists", registration.client_id)));
                }
                let id = registration.client_id.clone();
                self.append_and_apply(Event::new(Payload::from(registration)).with_actor(admin_actor)).await?;
                let mut out = json!({"client_id": id});
                if let Some(secret) = secret {
                    out["client_secret"] = secret.into();
                }
                Ok(out)
            }
            AdminCommand::ClientDisable { client_id } => {
                if self.read_state(|s| s.client(&client_id).is_none()) {
                    return Err(AuthError::Invalid(format!("no client `{client_id}`")));
                }
                let e = ClientDisabled { client_id: client_id.clone(), reason: "admin".into() };
                self.append_and_apply(Event::new(Payload::from(e)).with_actor(admin_actor)).await?;
                Ok(json!({"client_id": client_id, "disabled": true}))
            }
            AdminCommand::ClientList => Ok(self.read_state(|s| {
                let mut clients: Vec<Value> = s
                    .clients()
                    .map(|c| {
                        json!({
                            "client_id": c.id(), "name": c.registration.client_name, "kind": c.kind(),
                            "scope": c.registration.scope, "redirect_uris": c.registration.redirect_uris, "disabled": c.disabled,
                        })
                    })
                    .collect();
                clients.sort_by(|a, b| a["client_id"].as_str().cmp(&b["client_id"].as_str()));
                json!(clients)
            })),
            AdminCommand::UserAdd { username, password, fhir_user, roles } => {
                validate_username(&username)?;
                if let Some(f) = &fhir_user {
                    validate_fhir_user(f)?;
                }
                if self.read_state(|s| s.user_by_name(&username).is_some()) {
                    return Err(AuthError::Invalid(format!("user `{username}` already exists")));
                }
                let password_hash = password::hash(&password)?;
                let user_id = uuid::Uuid::new_v4().to_string();
                let e = UserCreated { user_id: user_id.clone(), username: username.clone(), password_hash, fhir_user, roles };
                self.append_and_apply(Event::new(Payload::from(e)).with_actor(admin_actor)).await?;
                Ok(json!({"user_id": user_id, "username": username}))
            }
            AdminCommand::UserDisable { username } => {
                let user_id = self
                    .read_state(|s| s.user_by_name(&username).map(|u| u.account.user_id.clone()))
                    .ok_or_else(|| AuthError::Invalid(format!("no user `{username}`")))?;
                let e = UserDisabled { user_id: user_id.clone(), reason: "admin".into() };
                self.append_and_apply(Event::new(Payload::from(e)).with_actor(admin_actor)).await?;
                Ok(json!({"user_id": user_id, "username": username, "disabled": true}))
            }
            AdminCommand::UserList => Ok(self.read_state(|s| {
                let mut users: Vec<Value> = s
                    .users()
                    .map(|u| {
                        json!({
                            "user_id": u.account.user_id, "username": u.account.username, "fhir_user": u.account.fhir_user,
                            "roles": u.account.roles, "disabled": u.disabled,
                            "password": !u.account.password_hash.is_empty(),
                            "linked_identities": s.links_of(&u.account.user_id),
                        })
                    })
                    .collect();
                users.sort_by(|a, b| a["username"].as_str().cmp(&b["username"].as_str()));
                json!(users)
            })),
            AdminCommand::IdpAdd(config) => {
                let appended = self.register_idp(&config, "admin").await?;
                                let mut out = json!({"idp_id": config.idp_id, "changed": appended});
                if let Some(file) = &config.private_key_file {
                    // What to register at the provider for private_key_jwt.
                    out["public_jwk"] = crate::keys::load_assertion_key(std::path::Path::new(file))?.public_jwk;
                }
                Ok(out)
            }
            AdminCommand::IdpDisable { idp_id } => self.disable_idp(&idp_id).await,
            AdminCommand::IdpList => Ok(self.list_idps()),
            AdminCommand::UserLink { username, idp_id, subject } => {
                self.link_identity(&username, &idp_id, &subject).await
            }
            AdminCommand::KeysRotate => self.rotate_keys().await,
            AdminCommand::RegistrationToken { expires_in_secs } => {
                if !(60..=30 * 24 * 3600).contains(&expires_in_secs) {
                    return Err(AuthError::Invalid("a registration token lives 60 seconds to 30 days".into()));
                }
                let token = random_token(32);
                let now = Timestamp::now();
                let issued = TokenIssued {
                    jti: sha256_hex(token.as_bytes()),
                    kind: TokenKind::Registration,
                    grant_type: "admin".into(),
                    client_id: "admin".into(),
                    subject: None,
                    scope: "register".into(),
                    audience: format!("{}/register", self.settings.issuer),
                    issued_at: now,
                    expires_at: Timestamp::from_millis(now.as_millis() + expires_in_secs as i64 * 1000),
                    family_id: None,
                    kid: None,
                    rotated_from: None,
                };
                let expires_at = issued.expires_at.to_rfc3339();
                self.append_and_apply(Event::new(Payload::from(issued)).with_actor(admin_actor)).await?;
                Ok(json!({"registration_token": token, "expires_at": expires_at}))
            }
            AdminCommand::Revoke { username, client_id, jti } => {
                let now = Timestamp::now();
                let target = match (username, client_id, jti) {
                    (Some(u), None, None) => {
                        let subject = self
                            .read_state(|s| s.user_by_name(&u).map(|u| u.account.user_id.clone()))
                            .ok_or_else(|| AuthError::Invalid(format!("no user `{u}`")))?;
                        RevocationTarget::Subject { subject, issued_before: now }
                    }
                    (None, Some(c), None) => {
                        if self.read_state(|s| s.client(&c).is_none()) {
                            return Err(AuthError::Invalid(format!("no client `{c}`")));
                        }
                        RevocationTarget::Client { client_id: c, issued_before: now }
                    }
                    // The expiry of a bare jti is unknown here: keep it for the longest any token lives.
                    (None, None, Some(j)) => RevocationTarget::Token {
                        jti: j,
                        expires_at: Timestamp::from_millis(now.as_millis() + MAX_TOKEN_LIFETIME.as_millis() as i64),
                    },
                    _ => return Err(AuthError::Invalid("name exactly one of a user, a client or a jti".into())),
                };
                let e = TokenRevoked { target: target.clone(), reason: "admin".into() };
                self.append_and_apply(Event::new(Payload::from(e)).with_actor(admin_actor)).await?;
                Ok(json!({"revoked": target}))
            }
        }
    }

    /// `POST /register` (RFC 7591), authorized by an initial access token from
    /// `cairn admin registration-token`. Returns the registration (201) or an RFC 7591 error.
    pub async fn register(&self, bearer: Option<&str>, metadata: &Value, actor: &Actor) -> Result<Value, OAuthError> {
        let now = Timestamp::now().as_millis();
        let authorized =
            bearer.is_some_and(|t| self.read_state(|s| s.registration_token_valid(&sha256_hex(t.as_bytes()), now)));
        if !authorized {
            let mut e = OAuthError::new(
                "invalid_token",
                "registration needs a valid initial access token (cairn admin registration-token)",
            );
            e.status = 401;
            return Err(e);
        }
        let meta_err = |d: String| {
            let code = if d.contains("redirect URI") { "invalid_redirect_uri" } else { "invalid_client_metadata" };
            OAuthError::new(code, d)
        };
        let text = |k: &str| metadata.get(k).and_then(Value::as_str).map(str::to_owned);
        let method = text("token_endpoint_auth_method").unwrap_or_else(|| "client_secret_basic".into());
        let kind = match method.as_str() {
            "none" => ClientKind::Public,
            "client_secret_basic" | "client_secret_post" => ClientKind::ConfidentialSymmetric,
            "private_key_jwt" => ClientKind::ConfidentialAsymmetric,
            other => return Err(meta_err(format!("token_endpoint_auth_method `{other}` is not supported"))),
        };
        let redirect_uris: Vec<String> = match metadata.get("redirect_uris") {
            None => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| meta_err("redirect_uris must be strings".into())))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(meta_err("redirect_uris must be an array".into())),
        };
        if let Some(grants) = metadata.get("grant_types") {
            let ok = grants.as_array().is_some_and(|a| {
                a.iter()
                    .all(|g| matches!(g.as_str(), Some("authorization_code" | "refresh_token" | "client_credentials")))
            });
            if !ok {
                return Err(meta_err(
                    "grant_types may hold authorization_code, refresh_token and client_credentials".into(),
                ));
            }
        }
        let name = text("client_name").ok_or_else(|| meta_err("client_name is required".into()))?;
        let scope =
            text("scope").ok_or_else(|| meta_err("scope is required: the scopes the client may be granted".into()))?;
        let (registration, secret) = new_client(
            name,
            kind,
            None,
            redirect_uris,
            scope,
            metadata.get("jwks").cloned(),
            text("jwks_uri"),
            "dynamic",
        )
        .map_err(|e| meta_err(e.to_string()))?;
        let mut out = json!({
            "client_id": registration.client_id,
            "client_id_issued_at": now / 1000,
            "client_name": registration.client_name,
            "redirect_uris": registration.redirect_uris,
            "token_endpoint_auth_method": method,
            "scope": registration.scope,
        });
        if let Some(g) = metadata.get("grant_types") {
            out["grant_types"] = g.clone();
        }
        if let Some(j) = &registration.jwks {
            out["jwks"] = j.clone();
        }
        if let Some(secret) = secret {
            out["client_secret"] = secret.into();
            out["client_secret_expires_at"] = 0.into();
        }
        self.append_and_apply(Event::new(Payload::from(registration)).with_actor(actor.clone())).await?;
        Ok(out)
    }

    /// Rotates this instance's signing keys: each new key is published (durably, and applied here)
    /// before it signs anything; other instances learn it from the log, and one that meets its `kid`
    /// first catches up with the log before judging the token.
    async fn rotate_keys(&self) -> Result<Value, AuthError> {
        let ring = self
            .keys
            .as_ref()
            .ok_or_else(|| AuthError::Invalid("keys rotate needs a running server (its signing keys)".into()))?;
        let mut rotated = Vec::new();
        for purpose in [KeyPurpose::AccessToken, KeyPurpose::IdToken] {
            let (old, new) = {
                let r = ring.read().expect("key ring");
                (r.newest(purpose).kid.clone(), r.generate(purpose)?)
            };
            let published = KeyPublished {
                kid: new.kid.clone(),
                alg: new.public_jwk["alg"].as_str().unwrap_or_default().to_owned(),
                purpose,
                jwk: new.public_jwk.clone(),
                replaces: Some(old.clone()),
            };
            let actor = Actor { subject: Some("admin".into()), ..Actor::default() };
            self.append_and_apply(Event::new(Payload::from(published)).with_actor(actor)).await?;
            ring.write().expect("key ring").adopt(new.clone());
            tracing::info!(purpose = ?purpose, old = %old, new = %new.kid, "signing key rotated");
            rotated.push(json!({"purpose": purpose, "old_kid": old, "new_kid": new.kid}));
        }
        Ok(json!({"rotated": rotated}))
    }

    /// Whether the state follows the log (for readiness).
    pub fn applied_positions(&self) -> Vec<u64> {
        self.projection.read().expect("auth projection").next.clone()
    }
}

/// The longest any access token lives (the bound for remembering a revoked `jti`).
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

const SCOPES_SUPPORTED: &[&str] = &[
    "openid",
    "fhirUser",
    "launch/patient",
    "offline_access",
    "online_access",
    "patient/*.cruds",
    "patient/*.rs",
    "patient/Observation.rs",
    "patient/Observation.crus",
    "patient/Patient.rs",
    "user/*.cruds",
    "user/*.rs",
    "user/Observation.rs",
    "system/*.cruds",
    "system/*.rs",
    "system/Observation.crs",
];
const GRANT_TYPES: &[&str] = &["authorization_code", "refresh_token", "client_credentials"];
const AUTH_METHODS: &[&str] = &["client_secret_basic", "client_secret_post", "private_key_jwt"];
/// Public clients (`none`) may use the token endpoint too, with PKCE.
const TOKEN_AUTH_METHODS: &[&str] = &["client_secret_basic", "client_secret_post", "private_key_jwt", "none"];

/// Measures, for as long as the server lives, whether the state has caught up with the log's end:
/// reads the end offsets, and if the state has applied them, records the moment they were read.
async fn watch_feed(server: std::sync::Weak<AuthServer>) {
    loop {
        tokio::time::sleep(FEED_CHECK_EVERY).await;
        let Some(s) = server.upgrade() else { return };
        let read_at = Timestamp::now().as_millis();
        let partitions = s.projection.read().expect("auth projection").next.len();
        // A stalled log must not stall this loop (the lag gauge would freeze): a read of the ends
        // that takes longer than an interval counts as not current.
        let read_ends = async {
            let mut ends = Vec::with_capacity(partitions);
            for p in 0..partitions {
                match s.log.end_offset(topics::AUTH, p as u32).await {
                    Ok(e) => ends.push(e),
                    Err(_) => break,
                }
            }
            ends
        };
        let ends = tokio::time::timeout(FEED_CHECK_EVERY, read_ends).await.unwrap_or_default();
        if ends.len() == partitions {
            let applied = s.projection.read().expect("auth projection").next.clone();
            if applied.iter().zip(&ends).all(|(a, e)| a >= e) {
                s.current_at_ms.fetch_max(read_at, std::sync::atomic::Ordering::Relaxed);
            } else {
                // Behind now; give the follower one interval to reach what was read.
                let waited = tokio::time::timeout(FEED_CHECK_EVERY, s.wait_for(&ends)).await;
                if matches!(waited, Ok(Ok(()))) {
                    s.current_at_ms.fetch_max(read_at, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        metrics::gauge!("cairn_auth_feed_lag_seconds").set(s.feed_lag().as_secs_f64());
    }
}

/// Tails `cairn.auth` and applies every event to the server's state, for as long as the server lives.
async fn follow(server: std::sync::Weak<AuthServer>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(s) = server.upgrade() else { return };
        let from: Vec<(u32, u64)> = {
            let p = s.projection.read().expect("auth projection");
            p.next.iter().enumerate().map(|(i, n)| (i as u32, *n)).collect()
        };
        let mut tail = s.log.tail_partitions(topics::AUTH, &from);
        drop(s);
        while let Some(item) = tail.next().await {
            let Some(s) = server.upgrade() else { return };
            match item {
                Ok(Tailed::Record(r)) if Event::peek_type(&r.value).is_some_and(|t| !AuthState::cares_about(t)) => {
                    let mut p = s.projection.write().expect("auth projection");
                    p.next[r.partition as usize] = r.offset + 1;
                    drop(p);
                    s.applied.send_modify(|n| *n += 1);
                }
                Ok(Tailed::Record(r)) => {
                    match Event::from_canonical_bytes(&r.value) {
                        Ok(event) => {
                            let mut p = s.projection.write().expect("auth projection");
                            p.state.apply(&event);
                            p.next[r.partition as usize] = r.offset + 1;
                        }
                        Err(e) => {
                            // An event this build cannot read must not stop the others being applied.
                            tracing::error!(partition = r.partition, offset = r.offset, error = %e, "auth event skipped");
                            s.projection.write().expect("auth projection").next[r.partition as usize] = r.offset + 1;
                        }
                    }
                    s.applied.send_modify(|n| *n += 1);
                    backoff = Duration::from_millis(100);
                }
                Ok(Tailed::Passed { partition, next_offset }) => {
                    let mut p = s.projection.write().expect("auth projection");
                    let n = &mut p.next[partition as usize];
                    *n = (*n).max(next_offset);
                    drop(p);
                    s.applied.send_modify(|n| *n += 1);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "auth log tail failed; retrying");
                    break;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[allow(clippy::too_many_arguments)]
fn new_client(
    name: String,
    kind: ClientKind,
    client_id: Option<String>,
    redirect_uris: Vec<String>,
    scope: String,
    jwks: Option<Value>,
    jwks_uri: Option<String>,
    registered_by: &str,
) -> Result<(ClientRegistered, Option<String>), AuthError> {
    let invalid = |m: String| AuthError::Invalid(m);
    if name.trim().is_empty() {
        return Err(invalid("a client needs a name".into()));
    }
    let client_id = client_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    if client_id.is_empty()
        || client_id.len() > 128
        || !client_id.chars().all(|c| c.is_ascii_alphanumeric() || "-._~".contains(c))
    {
        return Err(invalid(format!("client id `{client_id}`: use 1-128 letters, digits, '-', '.', '_' or '~'")));
    }
    let scopes = ScopeSet::parse(&scope).map_err(|e| invalid(e.to_string()))?;
    if scopes.is_empty() {
        return Err(invalid("a client needs at least one allowed scope".into()));
    }
    for uri in &redirect_uris {
        validate_redirect_uri(uri)?;
    }
    match kind {
        ClientKind::Public if redirect_uris.is_empty() => {
            return Err(invalid("a public client needs at least one redirect URI".into()));
        }
        ClientKind::ConfidentialAsymmetric => match (&jwks, &jwks_uri) {
            (Some(set), None) => validate_client_jwks(set)?,
            (None, Some(uri)) => validate_jwks_uri(uri)?,
            _ => return Err(invalid("an asymmetric client needs its public keys: a JWK Set".into())),
        },
        _ if jwks.is_some() || jwks_uri.is_some() => {
            return Err(invalid("only confidential-asymmetric clients register keys".into()));
        }
        _ => {}
    }
    let secret = (kind == ClientKind::ConfidentialSymmetric).then(|| random_token(32));
    let registration = ClientRegistered {
        client_id,
        client_name: name,
        kind,
        redirect_uris,
        scope: scopes.to_string(),
        secret_sha256: secret.as_deref().map(|s| sha256_hex(s.as_bytes())),
        jwks,
        jwks_uri,
        registered_by: registered_by.to_owned(),
    };
    Ok((registration, secret))
}

fn validate_redirect_uri(uri: &str) -> Result<(), AuthError> {
    let bad = |why: &str| AuthError::Invalid(format!("redirect URI `{uri}`: {why}"));
    let rest = if let Some(r) = uri.strip_prefix("https://") {
        r
    } else if let Some(r) = uri.strip_prefix("http://") {
        let host = r.split(['/', ':', '?']).next().unwrap_or_default();
        if !matches!(host, "localhost" | "127.0.0.1" | "[::1]") {
            return Err(bad("plain http is allowed only for loopback addresses"));
        }
        r
    } else {
        return Err(bad("must be an absolute https URL (or http on loopback)"));
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(bad("has no host"));
    }
    if uri.contains('#') {
        return Err(bad("must not contain a fragment"));
    }
    if uri.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("contains whitespace"));
    }
    Ok(())
}

/// A client's key set must be public keys we can use for RS384 or ES384, each with a `kid`.
fn validate_client_jwks(set: &Value) -> Result<(), AuthError> {
    let keys = set["keys"]
        .as_array()
        .filter(|k| !k.is_empty())
        .ok_or_else(|| AuthError::Invalid("the JWK Set has no keys".into()))?;
    for k in keys {
        let kid = k["kid"].as_str().ok_or_else(|| AuthError::Invalid("every key in the JWK Set needs a kid".into()))?;
        if k.get("d").is_some() || k.get("p").is_some() {
            return Err(AuthError::Invalid(format!(
                "key `{kid}` contains private key material; register the public key only"
            )));
        }
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(k.clone())
            .map_err(|e| AuthError::Invalid(format!("key `{kid}` is not a valid JWK: {e}")))?;
        jsonwebtoken::DecodingKey::from_jwk(&jwk)
            .map_err(|e| AuthError::Invalid(format!("key `{kid}` is not usable: {e}")))?;
    }
    Ok(())
}

/// Where client keys may be fetched from: https, or http on loopback (development and tests); no
/// credentials, no fragment.
fn validate_jwks_uri(uri: &str) -> Result<(), AuthError> {
    validate_redirect_uri(uri).map_err(|e| AuthError::Invalid(e.to_string().replace("redirect URI", "jwks_uri")))?;
    if uri.split("://").nth(1).is_some_and(|rest| rest.split('/').next().unwrap_or("").contains('@')) {
        return Err(AuthError::Invalid(format!("jwks_uri `{uri}` must not carry credentials")));
    }
    Ok(())
}

fn validate_username(u: &str) -> Result<(), AuthError> {
    if u.is_empty() || u.len() > 64 || !u.chars().all(|c| c.is_ascii_alphanumeric() || "-._@".contains(c)) {
        return Err(AuthError::Invalid(format!("username `{u}`: use 1-64 letters, digits, '-', '.', '_' or '@'")));
    }
    Ok(())
}

fn validate_fhir_user(f: &str) -> Result<(), AuthError> {
    let ok = f.split_once('/').is_some_and(|(t, id)| {
        matches!(t, "Patient" | "Practitioner" | "PractitionerRole" | "RelatedPerson" | "Person")
            && !id.is_empty()
            && id.len() <= 64
            && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    });
    if ok {
        Ok(())
    } else {
        Err(AuthError::Invalid(format!("fhir user `{f}`: expected e.g. Patient/123 or Practitioner/7")))
    }
}
