//! Typed payloads, one per [`EventType`].

use crate::{Actor, Event, EventError, EventType, Timestamp};
use serde::{Deserialize, Serialize};

/// The typed body of an event. The variant decides the envelope's `type`.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    LoginSucceeded(LoginSucceeded),
    LoginFailed(LoginFailed),
    TokenIssued(TokenIssued),
    TokenRevoked(TokenRevoked),
    ClientRegistered(ClientRegistered),
    ClientDisabled(ClientDisabled),
    UserCreated(UserCreated),
    UserDisabled(UserDisabled),
    KeyPublished(KeyPublished),
    TokenRefused(TokenRefused),
    TokenIntrospected(TokenIntrospected),
    ConsentRecorded(ConsentRecorded),
    CodeIssued(CodeIssued),
    CodeRedeemed(CodeRedeemed),
    Logout(Logout),
    IdpRegistered(IdpRegistered),
    IdpDisabled(IdpDisabled),
    IdentityLinked(IdentityLinked),
    ResourceCreated(ResourceWritten),
    ResourceUpdated(ResourceWritten),
    ResourceDeleted(ResourceDeleted),
    AccessRead(AccessRead),
    AccessSearch(AccessSearch),
    RequestRefused(RequestRefused),
}

impl Payload {
    pub fn event_type(&self) -> EventType {
        match self {
            Payload::LoginSucceeded(_) => EventType::AuthLoginSucceeded,
            Payload::LoginFailed(_) => EventType::AuthLoginFailed,
            Payload::TokenIssued(_) => EventType::AuthTokenIssued,
            Payload::TokenRevoked(_) => EventType::AuthTokenRevoked,
            Payload::ClientRegistered(_) => EventType::AuthClientRegistered,
            Payload::ClientDisabled(_) => EventType::AuthClientDisabled,
            Payload::UserCreated(_) => EventType::AuthUserCreated,
            Payload::UserDisabled(_) => EventType::AuthUserDisabled,
            Payload::KeyPublished(_) => EventType::AuthKeyPublished,
            Payload::TokenRefused(_) => EventType::AuthTokenRefused,
            Payload::TokenIntrospected(_) => EventType::AuthTokenIntrospected,
            Payload::ConsentRecorded(_) => EventType::AuthConsentRecorded,
            Payload::CodeIssued(_) => EventType::AuthCodeIssued,
            Payload::CodeRedeemed(_) => EventType::AuthCodeRedeemed,
            Payload::Logout(_) => EventType::AuthLogout,
            Payload::IdpRegistered(_) => EventType::AuthIdpRegistered,
            Payload::IdpDisabled(_) => EventType::AuthIdpDisabled,
            Payload::IdentityLinked(_) => EventType::AuthIdentityLinked,
            Payload::ResourceCreated(_) => EventType::FhirResourceCreated,
            Payload::ResourceUpdated(_) => EventType::FhirResourceUpdated,
            Payload::ResourceDeleted(_) => EventType::FhirResourceDeleted,
            Payload::AccessRead(_) => EventType::FhirAccessRead,
            Payload::AccessSearch(_) => EventType::FhirAccessSearch,
            Payload::RequestRefused(_) => EventType::FhirRequestRefused,
        }
    }

    pub(crate) fn from_json(t: EventType, json: &str) -> Result<Payload, EventError> {
        let mut d = serde_json::Deserializer::from_str(json);
        let payload = Payload::deserialize_as(t, &mut d)?;
        d.end()?;
        Ok(payload)
    }

    /// The payload of an event of type `t`, from any deserializer: from its own text
    /// ([`Payload::from_json`]), or in place inside the envelope (`WireOwned`), read once.
    pub(crate) fn deserialize_as<'de, D: serde::Deserializer<'de>>(t: EventType, d: D) -> Result<Payload, D::Error> {
        Ok(match t {
            EventType::AuthLoginSucceeded => Payload::LoginSucceeded(Deserialize::deserialize(d)?),
            EventType::AuthLoginFailed => Payload::LoginFailed(Deserialize::deserialize(d)?),
            EventType::AuthTokenIssued => Payload::TokenIssued(Deserialize::deserialize(d)?),
            EventType::AuthTokenRevoked => Payload::TokenRevoked(Deserialize::deserialize(d)?),
            EventType::AuthClientRegistered => Payload::ClientRegistered(Deserialize::deserialize(d)?),
            EventType::AuthClientDisabled => Payload::ClientDisabled(Deserialize::deserialize(d)?),
            EventType::AuthUserCreated => Payload::UserCreated(Deserialize::deserialize(d)?),
            EventType::AuthUserDisabled => Payload::UserDisabled(Deserialize::deserialize(d)?),
            EventType::AuthKeyPublished => Payload::KeyPublished(Deserialize::deserialize(d)?),
            EventType::AuthTokenRefused => Payload::TokenRefused(Deserialize::deserialize(d)?),
            EventType::AuthTokenIntrospected => Payload::TokenIntrospected(Deserialize::deserialize(d)?),
            EventType::AuthConsentRecorded => Payload::ConsentRecorded(Deserialize::deserialize(d)?),
            EventType::AuthCodeIssued => Payload::CodeIssued(Deserialize::deserialize(d)?),
            EventType::AuthCodeRedeemed => Payload::CodeRedeemed(Deserialize::deserialize(d)?),
            EventType::AuthLogout => Payload::Logout(Deserialize::deserialize(d)?),
            EventType::AuthIdpRegistered => Payload::IdpRegistered(Deserialize::deserialize(d)?),
            EventType::AuthIdpDisabled => Payload::IdpDisabled(Deserialize::deserialize(d)?),
            EventType::AuthIdentityLinked => Payload::IdentityLinked(Deserialize::deserialize(d)?),
            EventType::FhirResourceCreated => Payload::ResourceCreated(Deserialize::deserialize(d)?),
            EventType::FhirResourceUpdated => Payload::ResourceUpdated(Deserialize::deserialize(d)?),
            EventType::FhirResourceDeleted => Payload::ResourceDeleted(Deserialize::deserialize(d)?),
            EventType::FhirAccessRead => Payload::AccessRead(Deserialize::deserialize(d)?),
            EventType::FhirAccessSearch => Payload::AccessSearch(Deserialize::deserialize(d)?),
            EventType::FhirRequestRefused => Payload::RequestRefused(Deserialize::deserialize(d)?),
        })
    }
}

/// Serializes a payload as its bare body (the type travels in the envelope).
pub(crate) struct PayloadRef<'a>(pub &'a Payload);

impl Serialize for PayloadRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Payload::LoginSucceeded(p) => p.serialize(s),
            Payload::LoginFailed(p) => p.serialize(s),
            Payload::TokenIssued(p) => p.serialize(s),
            Payload::TokenRevoked(p) => p.serialize(s),
            Payload::ClientRegistered(p) => p.serialize(s),
            Payload::ClientDisabled(p) => p.serialize(s),
            Payload::UserCreated(p) => p.serialize(s),
            Payload::UserDisabled(p) => p.serialize(s),
            Payload::KeyPublished(p) => p.serialize(s),
            Payload::TokenRefused(p) => p.serialize(s),
            Payload::TokenIntrospected(p) => p.serialize(s),
            Payload::ConsentRecorded(p) => p.serialize(s),
            Payload::CodeIssued(p) => p.serialize(s),
            Payload::CodeRedeemed(p) => p.serialize(s),
            Payload::Logout(p) => p.serialize(s),
            Payload::IdpRegistered(p) => p.serialize(s),
            Payload::IdpDisabled(p) => p.serialize(s),
            Payload::IdentityLinked(p) => p.serialize(s),
            Payload::ResourceCreated(p) | Payload::ResourceUpdated(p) => p.serialize(s),
            Payload::ResourceDeleted(p) => p.serialize(s),
            Payload::AccessRead(p) => p.serialize(s),
            Payload::AccessSearch(p) => p.serialize(s),
            Payload::RequestRefused(p) => p.serialize(s),
        }
    }
}

macro_rules! into_payload {
    ($($ty:ident => $variant:ident),* $(,)?) => {
        $(impl From<$ty> for Payload {
            fn from(p: $ty) -> Payload { Payload::$variant(p) }
        })*
    };
}
into_payload!(
    LoginSucceeded => LoginSucceeded,
    LoginFailed => LoginFailed,
    TokenIssued => TokenIssued,
    TokenRevoked => TokenRevoked,
    ClientRegistered => ClientRegistered,
    ClientDisabled => ClientDisabled,
    UserCreated => UserCreated,
    UserDisabled => UserDisabled,
    KeyPublished => KeyPublished,
    TokenRefused => TokenRefused,
    TokenIntrospected => TokenIntrospected,
    ConsentRecorded => ConsentRecorded,
    CodeIssued => CodeIssued,
    CodeRedeemed => CodeRedeemed,
    Logout => Logout,
    IdpRegistered => IdpRegistered,
    IdpDisabled => IdpDisabled,
    IdentityLinked => IdentityLinked,
    ResourceDeleted => ResourceDeleted,
    AccessRead => AccessRead,
    AccessSearch => AccessSearch,
    RequestRefused => RequestRefused,
);

/// Who vouched for a user that signed in through an upstream OpenID provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Authenticator {
    pub issuer: String,
    pub subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acr: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub amr: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoginMethod {
    Password,
    Federated,
}

/// `auth.login.succeeded`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginSucceeded {
    pub user_id: String,
    pub username: String,
    pub method: LoginMethod,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authenticator: Option<Authenticator>,
    /// Identifies the browser session; never the session cookie itself.
    pub session_id: String,
}

/// Why a login was refused. Stable codes: reports group by them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoginFailure {
    UnknownUser,
    BadPassword,
    UserDisabled,
    Throttled,
    CsrfMismatch,
    /// The upstream provider could not be reached, or answered with something unusable.
    UpstreamError,
    /// The upstream provider refused (e.g. the user cancelled) or its token request failed.
    UpstreamRejected,
    /// The upstream identity is not linked to a Cairn user (and the provider does not provision).
    UnlinkedIdentity,
    /// The browser came back without the sign-in it started: unknown or expired `state`, another
    /// browser, another provider.
    StateMismatch,
    /// The upstream ID token failed validation (signature, issuer, audience, expiry, nonce, algorithm).
    InvalidIdToken,
    /// The upstream provider is disabled or not configured.
    UnknownProvider,
    /// Sign-in with a Cairn password is switched off on this server.
    PasswordLoginDisabled,
}

/// `auth.login.failed`. The attempted password is never recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginFailed {
    /// The username as typed, when one was typed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    pub reason: LoginFailure,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authenticator: Option<Authenticator>,
    /// The upstream provider (its `idp_id`) of a federated sign-in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idp: Option<String>,
    /// What exactly failed, for the auditor (fixed wording, never a token or a secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    Access,
    Refresh,
    Id,
    /// An RFC 7591 initial access token for the registration endpoint.
    Registration,
}

/// `auth.token.issued`. Carries the token's identity and claims, never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenIssued {
    pub jti: String,
    pub kind: TokenKind,
    /// `authorization_code`, `refresh_token` or `client_credentials`.
    pub grant_type: String,
    pub client_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub scope: String,
    pub audience: String,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
    /// Refresh-token family, so that reuse of one member can revoke all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family_id: Option<String>,
    /// Signing key id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// For a rotated refresh token: the `jti` of the refresh token it replaces (which is now used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_from: Option<String>,
}

/// What a revocation kills.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RevocationTarget {
    /// One token, remembered until its own expiry.
    Token { jti: String, expires_at: Timestamp },
    /// Every token of a refresh-token family.
    Family { family_id: String },
    /// Every token issued to this subject before `issued_before`.
    Subject { subject: String, issued_before: Timestamp },
    /// Every token issued to this client before `issued_before`.
    Client { client_id: String, issued_before: Timestamp },
    /// Every token signed with this key.
    SigningKey { kid: String },
}

/// `auth.token.revoked`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRevoked {
    pub target: RevocationTarget,
    /// e.g. `revocation_endpoint`, `refresh_token_reuse`, `code_reuse`, `user_disabled`, `logout`, `admin`.
    pub reason: String,
}

/// How a client authenticates at the token endpoint (SMART's client types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientKind {
    /// No credentials (a browser or native app); PKCE only.
    Public,
    /// A shared secret (`client_secret_basic` or `client_secret_post`).
    ConfidentialSymmetric,
    /// A signed JWT assertion (`private_key_jwt`, SMART Backend Services).
    ConfidentialAsymmetric,
}

/// `auth.client.registered`: a new client, or a client's new registration (the latest one counts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientRegistered {
    pub client_id: String,
    pub client_name: String,
    pub kind: ClientKind,
    /// Exact redirect URIs for the authorization code flow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redirect_uris: Vec<String>,
    /// The scopes this client may be granted (space separated SMART scopes).
    pub scope: String,
    /// SHA-256 (hex) of the generated secret of a symmetric client; the secret itself is shown once
    /// and never recorded. Secrets are 256 random bits, so a fast hash is enough.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_sha256: Option<String>,
    /// The public keys of an asymmetric client, inline (a JWK Set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<serde_json::Value>,
    /// Or where to fetch them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// `admin` (the CLI) or `dynamic` (RFC 7591 registration endpoint).
    pub registered_by: String,
}

/// `auth.client.disabled`: the client gets no new tokens and its live tokens stop working.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientDisabled {
    pub client_id: String,
    pub reason: String,
}

/// `auth.user.created`. The password is recorded only as an Argon2id hash (PHC string).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserCreated {
    pub user_id: String,
    pub username: String,
    /// Empty for a user who signs in only through an upstream provider (no password works).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub password_hash: String,
    /// The FHIR resource that represents the user, e.g. `Patient/123` or `Practitioner/7`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fhir_user: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
}

/// `auth.user.disabled`: the user cannot sign in and their live tokens stop working.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDisabled {
    pub user_id: String,
    pub reason: String,
}

/// What a signing key signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyPurpose {
    AccessToken,
    IdToken,
    /// The log's seals (signed checkpoints of the hash chains, Ed25519): published so auditors find
    /// the key in the JWKS; never accepted for a token.
    LogSeal,
}

/// `auth.key.published`: a signing public key. Every API instance learns the token keys it must
/// accept from these events, and a key signs nothing before its event is durable. Log seal keys are
/// published the same way, so the JWKS names every key a seal may carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPublished {
    pub kid: String,
    pub alg: String,
    pub purpose: KeyPurpose,
    /// The public key as a JWK (RFC 7517), `kid`, `alg` and `use` included.
    pub jwk: serde_json::Value,
    /// The key this one rotates out (`cairn admin keys rotate`): that one stays published until
    /// every token it signed has expired, then leaves the JWKS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
}

/// `auth.token.refused`: a token request the authorization server refused. Never carries the
/// credentials that were presented.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRefused {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_type: Option<String>,
    /// The client the request claimed to be, when it named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The RFC 6749 error code (`invalid_client`, `invalid_grant`, ...).
    pub error: String,
    /// Why, in words (the same text the client got).
    pub reason: String,
}

/// `auth.token.introspected`: a resource server asked about a token (RFC 7662).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenIntrospected {
    /// The client that asked.
    pub client_id: String,
    /// The token's `jti`, when it was one of ours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    pub active: bool,
}

/// `auth.consent.recorded`: what a user allowed an app (or that they refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentRecorded {
    pub user_id: String,
    pub client_id: String,
    pub requested_scope: String,
    /// Empty when refused.
    pub granted_scope: String,
    pub approved: bool,
    /// The patient in context, a FHIR id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
}

/// `auth.code.issued`: an authorization code, recorded by its SHA-256 (the code itself is never
/// recorded), with everything the token request will be checked against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeIssued {
    pub code_hash: String,
    pub client_id: String,
    pub user_id: String,
    pub redirect_uri: String,
    pub scope: String,
    /// PKCE S256 challenge.
    pub code_challenge: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    #[serde(default, rename = "fhirUser", skip_serializing_if = "Option::is_none")]
    pub fhir_user: Option<String>,
    /// Identifies the browser session that signed in (a hash, never the cookie).
    pub session_id: String,
    pub auth_time: Timestamp,
    pub expires_at: Timestamp,
    /// The upstream provider that vouched for the session's sign-in, carried into the tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authenticator: Option<Authenticator>,
}

/// `auth.code.redeemed`: a code was exchanged; the tokens issued from it form `family_id`. A second
/// redemption of the same code revokes that family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeRedeemed {
    pub code_hash: String,
    pub client_id: String,
    pub family_id: String,
}

/// `auth.logout`: a browser session ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logout {
    pub session_id: String,
    pub user_id: String,
}

/// `fhir.resource.created` and `fhir.resource.updated`: the full resource as stored, meta included.
///
/// The resource is kept as raw JSON text: written once by the API, copied verbatim by the projector
/// into the store, parsed only by those who need its elements. (Measured: re-serializing it was a
/// large share of the projector's time.)
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceWritten {
    pub resource_type: String,
    pub id: String,
    pub version_id: u64,
    pub resource: Box<serde_json::value::RawValue>,
    /// The Provenance the client sent in `X-Provenance` (JSON text, as checked by the API), merged
    /// into the Provenance the audit trail records for this write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<String>,
}

impl ResourceWritten {
    pub fn new(resource_type: &str, id: &str, version_id: u64, resource: &serde_json::Value) -> ResourceWritten {
        ResourceWritten {
            resource_type: resource_type.to_owned(),
            id: id.to_owned(),
            version_id,
            resource: serde_json::value::to_raw_value(resource).expect("JSON values serialize"),
            provenance: None,
        }
    }

    /// With the client's `X-Provenance` (JSON text).
    pub fn with_provenance(mut self, provenance: Option<String>) -> ResourceWritten {
        self.provenance = provenance;
        self
    }

    /// The resource as a JSON value.
    pub fn resource_value(&self) -> serde_json::Value {
        serde_json::from_str(self.resource.get()).expect("raw values hold valid JSON")
    }
}

impl PartialEq for ResourceWritten {
    fn eq(&self, other: &Self) -> bool {
        self.resource_type == other.resource_type
            && self.id == other.id
            && self.version_id == other.version_id
            && self.resource.get() == other.resource.get()
            && self.provenance == other.provenance
    }
}

/// `fhir.resource.deleted`: the deletion is itself a version, so history stays complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceDeleted {
    pub resource_type: String,
    pub id: String,
    pub version_id: u64,
    /// As in [`ResourceWritten::provenance`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<String>,
}

/// A resource at one version: what a read or search disclosed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionedRef {
    pub resource_type: String,
    pub id: String,
    pub version_id: u64,
    /// The patient compartment of that version (`Patient/<id>`), when it has one: the audit trail
    /// records one AuditEvent per patient whose data left the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
}

/// `fhir.access.read`: read, vread or instance history, including refusals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRead {
    /// The FHIR restful interaction code: `read`, `vread`, `history-instance`.
    pub interaction: String,
    pub resource_type: String,
    pub id: String,
    /// The HTTP status the client received.
    pub status: u16,
    /// What left the server; empty when the access was refused.
    #[serde(default)]
    pub returned: Vec<VersionedRef>,
    /// Set when the access was served from a replay of the log (`cairn serve --read-only`): what
    /// the replay shows, e.g. `replay until 2026-11-28T09:00:00Z`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view: Option<String>,
}

/// `fhir.access.search`: type or system search and type or system history, including refusals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessSearch {
    /// `search-type`, `search-system`, `history-type`, `history-system`, or `operation` (a report over
    /// the audit trail).
    pub interaction: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_type: Option<String>,
    /// The query string as received, after the `?`.
    pub query: String,
    pub status: u16,
    #[serde(default)]
    pub returned: Vec<VersionedRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// Set when the access was served from a replay of the log (`cairn serve --read-only`): what
    /// the replay shows, e.g. `replay until 2026-11-28T09:00:00Z`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view: Option<String>,
}

/// `fhir.request.refused`: a FHIR request refused before or instead of its interaction (a write
/// that failed validation, a precondition or a scope check; a bearer token refused with 401).
/// Refused reads and searches are recorded by their own `fhir.access.*` events instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestRefused {
    /// The FHIR restful interaction attempted (`create`, `update`, `delete`, `transaction`, `batch`,
    /// `read`, `search-type`, ...), as far as the request showed it.
    pub interaction: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The HTTP status the client received.
    pub status: u16,
    /// The OperationOutcome issue code, or the RFC 6750 error for a refused bearer token.
    pub code: String,
    /// Why, in words (the text the client got).
    pub reason: String,
    /// Set when the access was served from a replay of the log (`cairn serve --read-only`): what
    /// the replay shows, e.g. `replay until 2026-11-28T09:00:00Z`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view: Option<String>,
}

/// How Cairn authenticates to an upstream provider's token endpoint. The secret or private key
/// itself stays in a file on each server (never in the log); the event records where, and a
/// fingerprint so a changed file is noticed: for a secret an Argon2id hash (PHC string; a secret
/// chosen at a provider may be guessable, so no fast hash), for a key its public thumbprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum UpstreamClientAuth {
    ClientSecretBasic {
        secret_file: String,
        secret_hash: String,
    },
    ClientSecretPost {
        secret_file: String,
        secret_hash: String,
    },
    /// A signed JWT assertion (RFC 7523) with a private key in PEM; `kid` is the RFC 7638 thumbprint
    /// of its public key, as registered at the provider.
    PrivateKeyJwt {
        key_file: String,
        kid: String,
        alg: String,
    },
}

/// `auth.idp.registered`: an upstream OpenID provider users may sign in through (a new one, or a
/// new configuration of one: the latest counts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdpRegistered {
    /// Short id used in addresses (`/login/idp/{idp_id}`): lowercase letters, digits, `-`.
    pub idp_id: String,
    /// What the sign-in page's button says.
    pub display_name: String,
    /// The provider's issuer URL; its discovery document is `{issuer}/.well-known/openid-configuration`.
    pub issuer: String,
    pub client_id: String,
    pub client_auth: UpstreamClientAuth,
    /// Scopes asked of the provider (`openid` always among them).
    pub scopes: Vec<String>,
    /// Whether to call the provider's userinfo endpoint after the ID token checks out.
    #[serde(default)]
    pub use_userinfo: bool,
    /// When set, an upstream identity seen for the first time gets a new Cairn user with this role
    /// (just-in-time provisioning); when absent, only identities an admin linked may sign in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provision_role: Option<String>,
    /// `admin` (the CLI) or `config` (the TOML file, at start).
    pub registered_by: String,
}

/// `auth.idp.disabled`: nobody signs in through this provider any more (its links stay).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdpDisabled {
    pub idp_id: String,
    pub reason: String,
}

/// `auth.identity.linked`: an upstream identity (issuer, subject) signs in as a Cairn user. The
/// first link of an identity counts; later ones are ignored (they lost a race or were mistakes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityLinked {
    pub idp_id: String,
    pub issuer: String,
    pub subject: String,
    pub user_id: String,
    /// `admin` or `provisioning`.
    pub linked_by: String,
}

impl IdentityLinked {
    /// The identity's key: its issuer and subject (both can hold any character, so length-prefixed).
    pub fn identity_key(&self) -> String {
        identity_key(&self.issuer, &self.subject)
    }
}

/// The one key of an upstream identity.
pub fn identity_key(issuer: &str, subject: &str) -> String {
    format!("{}:{issuer}{subject}", issuer.len())
}

/// A realistic example event of each type, for tests, schema checks and benchmarks. The exhaustive
/// `match` means a new event type cannot be added without an example (and so without a schema test).
pub fn sample_event(t: EventType) -> Event {
    let actor = Actor {
        subject: Some("user-7".into()),
        client_id: Some("glucose-gateway".into()),
        jti: Some("0f9c4f0e-7a43-4d1f-8b7e-2d1c3f9a5b11".into()),
        fhir_user: Some("Patient/p-1".into()),
        source_address: Some("192.0.2.10".into()),
        user_agent: Some("cairn-test/1.0".into()),
        authenticator: Some(Authenticator {
            issuer: "https://idp.example.org".into(),
            subject: "248289761001".into(),
            acr: None,
            amr: vec!["pwd".into()],
        }),
    };
    let now = Timestamp::from_millis(1_795_000_000_123);
    let later = Timestamp::from_millis(1_795_000_300_123);
    let payload: Payload = match t {
        EventType::AuthLoginSucceeded => LoginSucceeded {
            user_id: "user-7".into(),
            username: "alice".into(),
            method: LoginMethod::Federated,
            authenticator: Some(Authenticator {
                issuer: "https://idp.example.org".into(),
                subject: "248289761001".into(),
                acr: Some("urn:mace:incommon:iap:silver".into()),
                amr: vec!["pwd".into(), "otp".into()],
            }),
            session_id: "s-1".into(),
        }
        .into(),
        EventType::AuthLoginFailed => LoginFailed {
            username: None,
            reason: LoginFailure::InvalidIdToken,
            authenticator: None,
            idp: Some("hospital".into()),
            detail: Some("the ID token's audience does not include this client".into()),
        }
        .into(),
        EventType::AuthTokenIssued => TokenIssued {
            jti: "0f9c4f0e-7a43-4d1f-8b7e-2d1c3f9a5b11".into(),
            kind: TokenKind::Access,
            grant_type: "authorization_code".into(),
            client_id: "growth-chart".into(),
            subject: Some("user-7".into()),
            scope: "launch/patient patient/Observation.rs openid fhirUser".into(),
            audience: "https://cairn.example.org/fhir".into(),
            issued_at: now,
            expires_at: later,
            family_id: Some("fam-1".into()),
            kid: Some("k-2026-11".into()),
            rotated_from: Some("9d2c0c3e2b5b6f1e8c4a7d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c".into()),
        }
        .into(),
        EventType::AuthTokenRevoked => TokenRevoked {
            target: RevocationTarget::Subject { subject: "user-7".into(), issued_before: now },
            reason: "user_disabled".into(),
        }
        .into(),
        EventType::AuthClientRegistered => ClientRegistered {
            client_id: "glucose-gateway".into(),
            client_name: "Glucose gateway".into(),
            kind: ClientKind::ConfidentialAsymmetric,
            redirect_uris: vec![],
            scope: "system/Observation.cru system/Device.rs".into(),
            secret_sha256: None,
            jwks: Some(serde_json::json!({"keys": [{"kty": "EC", "crv": "P-384", "kid": "gw-1", "alg": "ES384",
                "x": "4r5K3JpAJdxnVu4tBmTkWYb6qVdSvtnZxEPMbdMQDHo5U1MQmN0mYyq9zvUNkWAL",
                "y": "U8Hk3d1DaBcsk6e9Wmcg3vhX8YZTp1h8hQoVqwDKN_Ny0Q5JDi1bjMZDnX6a-dRH"}]})),
            jwks_uri: None,
            registered_by: "admin".into(),
        }
        .into(),
        EventType::AuthClientDisabled => {
            ClientDisabled { client_id: "glucose-gateway".into(), reason: "admin".into() }.into()
        }
        EventType::AuthUserCreated => UserCreated {
            user_id: "user-7".into(),
            username: "alice".into(),
            password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA".into(),
            fhir_user: Some("Patient/p-1".into()),
            roles: vec!["patient".into()],
        }
        .into(),
        EventType::AuthUserDisabled => UserDisabled { user_id: "user-7".into(), reason: "admin".into() }.into(),
        EventType::AuthKeyPublished => KeyPublished {
            kid: "k-2026-11".into(),
            alg: "ES256".into(),
            purpose: KeyPurpose::AccessToken,
            jwk: serde_json::json!({"kty": "EC", "crv": "P-256", "kid": "k-2026-11", "alg": "ES256", "use": "sig",
                "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}),
            replaces: Some("k-2026-10".into()),
        }
        .into(),
        EventType::AuthTokenRefused => TokenRefused {
            grant_type: Some("client_credentials".into()),
            client_id: Some("glucose-gateway".into()),
            error: "invalid_client".into(),
            reason: "client assertion jti was already used".into(),
        }
        .into(),
        EventType::AuthTokenIntrospected => TokenIntrospected {
            client_id: "resource-server".into(),
            jti: Some("0f9c4f0e-7a43-4d1f-8b7e-2d1c3f9a5b11".into()),
            active: true,
        }
        .into(),
        EventType::AuthConsentRecorded => ConsentRecorded {
            user_id: "user-7".into(),
            client_id: "growth-chart".into(),
            requested_scope: "launch/patient patient/Observation.rs openid fhirUser offline_access".into(),
            granted_scope: "launch/patient patient/Observation.rs openid fhirUser".into(),
            approved: true,
            patient: Some("p-1".into()),
        }
        .into(),
        EventType::AuthCodeIssued => CodeIssued {
            code_hash: "4f2c0c3e2b5b6f1e8c4a7d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c".into(),
            client_id: "growth-chart".into(),
            user_id: "user-7".into(),
            redirect_uri: "https://app.example.org/callback".into(),
            scope: "launch/patient patient/Observation.rs openid fhirUser".into(),
            code_challenge: "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM".into(),
            nonce: Some("n-0S6_WzA2Mj".into()),
            patient: Some("p-1".into()),
            fhir_user: Some("Patient/p-1".into()),
            session_id: "s-1".into(),
            auth_time: now,
            expires_at: Timestamp::from_millis(now.as_millis() + 60_000),
            authenticator: Some(Authenticator {
                issuer: "https://idp.example.org".into(),
                subject: "248289761001".into(),
                acr: None,
                amr: vec!["pwd".into()],
            }),
        }
        .into(),
        EventType::AuthCodeRedeemed => CodeRedeemed {
            code_hash: "4f2c0c3e2b5b6f1e8c4a7d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c".into(),
            client_id: "growth-chart".into(),
            family_id: "fam-1".into(),
        }
        .into(),
        EventType::AuthLogout => Logout { session_id: "s-1".into(), user_id: "user-7".into() }.into(),
        EventType::AuthIdpRegistered => IdpRegistered {
            idp_id: "hospital".into(),
            display_name: "Hospital ID".into(),
            issuer: "https://idp.example.org".into(),
            client_id: "cairn-prod".into(),
            client_auth: UpstreamClientAuth::ClientSecretBasic {
                secret_file: "/etc/cairn/idp-hospital.secret".into(),
                secret_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$3m9sR7c8gGmV3wqJ3Yw2Jm1bT7yq8w1c9n0pW5uQ2xk".into(),
            },
            scopes: vec!["openid".into(), "profile".into()],
            use_userinfo: true,
            provision_role: Some("patient".into()),
            registered_by: "admin".into(),
        }
        .into(),
        EventType::AuthIdpDisabled => IdpDisabled { idp_id: "hospital".into(), reason: "admin".into() }.into(),
        EventType::AuthIdentityLinked => IdentityLinked {
            idp_id: "hospital".into(),
            issuer: "https://idp.example.org".into(),
            subject: "248289761001".into(),
            user_id: "user-7".into(),
            linked_by: "admin".into(),
        }
        .into(),
        EventType::FhirResourceCreated | EventType::FhirResourceUpdated => {
            let version_id = if t == EventType::FhirResourceCreated { 1 } else { 2 };
            let written = ResourceWritten::new(
                "Observation",
                "obs-1",
                version_id,
                &serde_json::json!({
                    "resourceType": "Observation",
                    "id": "obs-1",
                    "meta": {"versionId": version_id.to_string(), "lastUpdated": "2026-11-18T09:46:40.123Z"},
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
                    "subject": {"reference": "Patient/p-1"},
                    "valueQuantity": {"value": 104, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}
                }),
            )
            .with_provenance(Some(
                r#"{"resourceType":"Provenance","agent":[{"type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/provenance-participant-type","code":"author"}]},"who":{"reference":"Device/meter-7"}}]}"#.into(),
            ));
            if t == EventType::FhirResourceCreated {
                Payload::ResourceCreated(written)
            } else {
                Payload::ResourceUpdated(written)
            }
        }
        EventType::FhirResourceDeleted => {
            ResourceDeleted {
                resource_type: "Observation".into(),
                id: "obs-1".into(),
                version_id: 3,
                provenance: Some(r#"{"resourceType":"Provenance","reason":[{"text":"entered in error"}]}"#.into()),
            }
            .into()
        }
        EventType::FhirAccessRead => AccessRead {
            interaction: "read".into(),
            resource_type: "Observation".into(),
            id: "obs-1".into(),
            status: 200,
            returned: vec![VersionedRef {
                resource_type: "Observation".into(),
                id: "obs-1".into(),
                                version_id: 2,
                patient: Some("Patient/p-1".into()),
            }],
            view: Some("replay until 2026-11-28T09:00:00.000Z".into()),
        }
        .into(),
        EventType::FhirAccessSearch => AccessSearch {
            interaction: "search-type".into(),
            resource_type: Some("Observation".into()),
            query: "patient=p-1&code=http://loinc.org|2339-0".into(),
            status: 200,
            returned: vec![VersionedRef {
                resource_type: "Observation".into(),
                id: "obs-1".into(),
                version_id: 2,
                patient: Some("Patient/p-1".into()),
            }],
                        total: Some(1),
            view: None,
        }
        .into(),
        EventType::FhirRequestRefused => RequestRefused {
            interaction: "update".into(),
            resource_type: Some("Observation".into()),
            id: Some("obs-1".into()),
            status: 412,
            code: "conflict".into(),
                        reason: "If-Match W/\"1\" does not match the current version 2".into(),
            view: None,
        }
        .into(),
    };
    let mut e = Event::new(payload).with_actor(actor).with_request_id("req-42").with_patient("Patient/p-1");
    e.occurred_at = now;
    e
}
