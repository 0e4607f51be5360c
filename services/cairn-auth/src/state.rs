//! The authorization server's view of the world, projected from the `cairn.auth` topic: clients,
//! users, published signing keys. Every instance builds it by replaying the topic before it serves
//! and keeps it current by tailing it, so a client registered or disabled through one instance is
//! known to all of them.

use crate::keys::decoding_key;
use crate::scope::ScopeSet;
use cairn_events::{
    Authenticator, ClientKind, ClientRegistered, CodeIssued, Event, IdpRegistered, KeyPurpose, Payload,
    RevocationTarget, TokenKind, UserCreated,
};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::collections::HashMap;

/// A registered client as currently known.
#[derive(Debug, Clone)]
pub struct Client {
    pub registration: ClientRegistered,
    /// The allowed scopes, parsed (unknown scopes in a registration are dropped when projecting).
    pub allowed: ScopeSet,
    pub disabled: bool,
}

impl Client {
    pub fn id(&self) -> &str {
        &self.registration.client_id
    }
    pub fn kind(&self) -> ClientKind {
        self.registration.kind
    }
}

/// A user account as currently known.
#[derive(Debug, Clone)]
pub struct User {
    pub account: UserCreated,
    pub disabled: bool,
}

/// An upstream OpenID provider as currently configured.
#[derive(Debug, Clone)]
pub struct Idp {
    pub registration: IdpRegistered,
    pub disabled: bool,
}

/// A signing key some instance published.
#[derive(Clone)]
pub struct PublishedKey {
    pub kid: String,
    pub algorithm: Algorithm,
    pub purpose: KeyPurpose,
    pub jwk: serde_json::Value,
    pub decoding: DecodingKey,
    /// When a rotation published this key's successor (ms); the key retires a token lifetime later.
    pub replaced_ms: Option<i64>,
}

impl PublishedKey {
    /// Whether tokens it signed may still be alive at `now_ms` (so it stays in the JWKS and verifies).
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.replaced_ms.is_none_or(|t| t + crate::server::MAX_TOKEN_LIFETIME.as_millis() as i64 > now_ms)
    }
}

#[derive(Default)]
pub struct AuthState {
    clients: HashMap<String, Client>,
    users: HashMap<String, User>,
    user_ids_by_name: HashMap<String, String>,
    keys: Vec<PublishedKey>,
    /// Log seal public keys (JWK), in the order published: in the JWKS for good, since a seal made
    /// with any of them must stay verifiable; never accepted for a token.
    seal_keys: Vec<serde_json::Value>,
    revoked: Revocations,
    sessions: HashMap<String, Session>,
    codes: HashMap<String, Code>,
    families: HashMap<String, Family>,
    refresh: HashMap<String, RefreshToken>,
    failures: LoginFailures,
    /// RFC 7591 initial access tokens (by hash) and their expiry (ms).
    registration_tokens: HashMap<String, i64>,
    idps: HashMap<String, Idp>,
    /// Upstream identities (`cairn_events::identity_key`) and the user each signs in as.
    links: HashMap<String, String>,
}

/// A browser session (by the hash of its cookie).
#[derive(Debug, Clone)]
pub struct Session {
    pub user_id: String,
    pub started_ms: i64,
    pub ended: bool,
    /// The upstream provider that vouched for this sign-in, if any.
    pub authenticator: Option<Authenticator>,
}

/// An authorization code (by its hash) and what became of it.
#[derive(Debug, Clone)]
pub struct Code {
    pub issued: CodeIssued,
    /// The family of the first redemption; later redemptions are reuse.
    pub first_redemption: Option<String>,
}

/// The tokens descended from one authorization code: their shared context.
#[derive(Debug, Clone)]
pub struct Family {
    pub client_id: String,
    pub user_id: String,
    pub scope: String,
    pub patient: Option<String>,
    pub fhir_user: Option<String>,
    pub auth_time_ms: i64,
    pub authenticator: Option<Authenticator>,
    /// When the last token issued in the family expires (ms); after that the family is forgotten.
    pub expires_ms: i64,
}

/// A refresh token (by its hash, which is its `jti`).
#[derive(Debug, Clone)]
pub struct RefreshToken {
    pub family_id: String,
    pub client_id: String,
    pub user_id: String,
    pub scope: String,
    pub expires_ms: i64,
    /// The first refresh token that replaced this one; presenting this one again after that is reuse.
    pub rotated_to: Option<String>,
}

/// Recent failed sign-ins (event times, ms) per username and per source address.
#[derive(Default)]
struct LoginFailures {
    by_user: HashMap<String, std::collections::VecDeque<i64>>,
    by_address: HashMap<String, std::collections::VecDeque<i64>>,
}

/// The window login throttling counts failures in.
pub const THROTTLE_WINDOW_MS: i64 = 15 * 60 * 1000;
/// Failures per username within the window before the account is locked for the rest of it.
pub const MAX_FAILURES_PER_USER: usize = 5;
/// Failures per source address within the window before the address is locked out.
pub const MAX_FAILURES_PER_ADDRESS: usize = 20;
/// How long a family is remembered after its code was redeemed if no token is issued in it.
const FAMILY_GRACE_MS: i64 = 10 * 60 * 1000;

/// What `auth.token.revoked` events have killed. A revoked `jti` is remembered only until the
/// token's own expiry, so the list stays bounded.
#[derive(Default)]
struct Revocations {
    jtis: HashMap<String, i64>,
    /// Revoked families and when their last token expires (ms); forgotten after that.
    families: HashMap<String, i64>,
    /// Tokens issued (iat, seconds) before this time are dead.
    subjects: HashMap<String, i64>,
    clients: HashMap<String, i64>,
    kids: std::collections::HashSet<String>,
    /// Expired `jti`s are pruned when the list has grown this much since the last pruning.
    prune_at: usize,
    families_prune_at: usize,
}

impl AuthState {
    /// Whether events of this type can change the state (the others, such as introspections and
    /// refusals, are skipped without being parsed: they are most of the topic under load).
    pub fn cares_about(t: cairn_events::EventType) -> bool {
        use cairn_events::EventType as T;
        !matches!(t, T::AuthTokenIntrospected | T::AuthTokenRefused | T::AuthConsentRecorded)
    }

    /// Applies one event of the `cairn.auth` topic. Events of other kinds are ignored; so is a
    /// published key that cannot be used (logged), rather than stopping the projection.
    pub fn apply(&mut self, event: &Event) {
        match &event.payload {
            Payload::ClientRegistered(r) => {
                let allowed = ScopeSet::parse_known(&r.scope);
                self.clients.insert(r.client_id.clone(), Client { registration: r.clone(), allowed, disabled: false });
            }
            Payload::ClientDisabled(d) => {
                if let Some(c) = self.clients.get_mut(&d.client_id) {
                    c.disabled = true;
                }
            }
            Payload::UserCreated(u) => {
                // The first account of a name and of an id counts: a second creation (two
                // instances racing, a provisioning repeated) changes nothing, so every instance
                // and every replay agrees on who a username is.
                if self.users.contains_key(&u.user_id) || self.user_ids_by_name.contains_key(&u.username) {
                    return;
                }
                self.user_ids_by_name.insert(u.username.clone(), u.user_id.clone());
                self.users.insert(u.user_id.clone(), User { account: u.clone(), disabled: false });
            }
            Payload::UserDisabled(d) => {
                if let Some(u) = self.users.get_mut(&d.user_id) {
                    u.disabled = true;
                }
            }
            Payload::KeyPublished(k) if k.purpose == cairn_events::KeyPurpose::LogSeal => {
                // Published again at every start of a projector-only process: kept once.
                self.seal_keys.retain(|j| j["kid"] != k.kid.as_str());
                self.seal_keys.push(k.jwk.clone());
            }
            Payload::KeyPublished(k) => {
                if self.keys.iter().any(|p| p.kid == k.kid) {
                    return;
                }
                if let Some(old) = k.replaces.as_ref().and_then(|old| self.keys.iter_mut().find(|p| p.kid == *old)) {
                    old.replaced_ms.get_or_insert(event.occurred_at.as_millis());
                }
                match decoding_key(&k.jwk) {
                    Ok((algorithm, decoding)) => self.keys.push(PublishedKey {
                        kid: k.kid.clone(),
                        algorithm,
                        purpose: k.purpose,
                        jwk: k.jwk.clone(),
                        decoding,
                        replaced_ms: None,
                    }),
                    Err(e) => tracing::error!(kid = %k.kid, error = %e, "published key ignored"),
                }
            }
            Payload::TokenRevoked(r) => self.revoke(&r.target, event.occurred_at.as_millis() / 1000),
            Payload::LoginSucceeded(l) => {
                self.sessions.insert(
                    l.session_id.clone(),
                    Session {
                        user_id: l.user_id.clone(),
                        started_ms: event.occurred_at.as_millis(),
                        ended: false,
                        authenticator: l.authenticator.clone(),
                    },
                );
                self.failures.by_user.remove(&l.username);
            }
            Payload::LoginFailed(f) => {
                let at = event.occurred_at.as_millis();
                if let Some(u) = &f.username {
                    push_failure(self.failures.by_user.entry(u.clone()).or_default(), at);
                }
                if let Some(a) = &event.actor.source_address {
                    push_failure(self.failures.by_address.entry(a.clone()).or_default(), at);
                }
            }
            Payload::Logout(l) => {
                if let Some(s) = self.sessions.get_mut(&l.session_id) {
                    s.ended = true;
                }
            }
            Payload::CodeIssued(c) => {
                let now = event.occurred_at.as_millis();
                // Codes live a minute: forget the long-expired ones as new ones come (time from the event).
                if self.codes.len() >= 1024 {
                    self.codes.retain(|_, code| code.issued.expires_at.as_millis() + 3_600_000 >= now);
                }
                self.codes.insert(c.code_hash.clone(), Code { issued: c.clone(), first_redemption: None });
            }
            Payload::CodeRedeemed(r) => {
                if let Some(code) = self.codes.get_mut(&r.code_hash)
                    && code.first_redemption.is_none()
                {
                    code.first_redemption = Some(r.family_id.clone());
                    let c = &code.issued;
                    self.families.insert(
                        r.family_id.clone(),
                        Family {
                            client_id: c.client_id.clone(),
                            user_id: c.user_id.clone(),
                            scope: c.scope.clone(),
                            patient: c.patient.clone(),
                            fhir_user: c.fhir_user.clone(),
                            auth_time_ms: c.auth_time.as_millis(),
                            authenticator: c.authenticator.clone(),
                            // Its first tokens follow at once and move this on.
                            expires_ms: event.occurred_at.as_millis() + FAMILY_GRACE_MS,
                        },
                    );
                    self.prune_families(event.occurred_at.as_millis());
                }
            }
            Payload::IdpRegistered(r) => {
                self.idps.insert(r.idp_id.clone(), Idp { registration: r.clone(), disabled: false });
            }
            Payload::IdpDisabled(d) => {
                if let Some(i) = self.idps.get_mut(&d.idp_id) {
                    i.disabled = true;
                }
            }
            Payload::IdentityLinked(l) => {
                self.links.entry(l.identity_key()).or_insert_with(|| l.user_id.clone());
            }
            Payload::TokenIssued(t) if t.kind == TokenKind::Registration => {
                self.registration_tokens.insert(t.jti.clone(), t.expires_at.as_millis());
            }
            Payload::TokenIssued(t) if t.kind == TokenKind::Access => self.extend_family(t),
            Payload::TokenIssued(t) if t.kind == TokenKind::Refresh => {
                self.extend_family(t);
                let now = event.occurred_at.as_millis();
                if self.refresh.len() >= 1024 {
                    self.refresh.retain(|_, r| r.expires_ms >= now);
                }
                if let Some(previous) = t.rotated_from.as_ref().and_then(|p| self.refresh.get_mut(p)) {
                    previous.rotated_to.get_or_insert_with(|| t.jti.clone());
                }
                self.refresh.insert(
                    t.jti.clone(),
                    RefreshToken {
                        family_id: t.family_id.clone().unwrap_or_default(),
                        client_id: t.client_id.clone(),
                        user_id: t.subject.clone().unwrap_or_default(),
                        scope: t.scope.clone(),
                        expires_ms: t.expires_at.as_millis(),
                        rotated_to: None,
                    },
                );
            }
            _ => {}
        }
    }

    /// A token issued in a family keeps the family (and its revocation) remembered until it expires.
    fn extend_family(&mut self, t: &cairn_events::TokenIssued) {
        if let Some(f) = t.family_id.as_ref().and_then(|f| self.families.get_mut(f)) {
            f.expires_ms = f.expires_ms.max(t.expires_at.as_millis());
        }
    }

    /// Forgets families (and revoked families) whose every token has expired, once their number has
    /// doubled since the last pruning. Time comes from the event, so a replay prunes exactly as the
    /// live run did.
    fn prune_families(&mut self, now_ms: i64) {
        let r = &mut self.revoked;
        if self.families.len() + r.families.len() < r.families_prune_at {
            return;
        }
        let alive = |expires_ms: i64| expires_ms + crate::token::LEEWAY_SECS as i64 * 1000 >= now_ms;
        self.families.retain(|_, f| alive(f.expires_ms));
        r.families.retain(|_, expires_ms| alive(*expires_ms));
        r.families_prune_at = ((self.families.len() + r.families.len()) * 2).max(1024);
    }

    fn revoke(&mut self, target: &RevocationTarget, now: i64) {
        let r = &mut self.revoked;
        match target {
            RevocationTarget::Token { jti, expires_at } => {
                r.jtis.insert(jti.clone(), expires_at.as_millis() / 1000);
                if r.jtis.len() >= r.prune_at {
                    // Time comes from the event, so a replay prunes exactly as the live run did.
                    r.jtis.retain(|_, exp| *exp + crate::token::LEEWAY_SECS as i64 >= now);
                    r.prune_at = (r.jtis.len() * 2).max(1024);
                }
            }
            RevocationTarget::Family { family_id } => {
                // A family never seen here (its redemption predates a pruning) is kept for the
                // longest any of its tokens could live.
                let expires_ms = self.families.get(family_id).map_or(i64::MAX, |f| f.expires_ms);
                r.families.insert(family_id.clone(), expires_ms);
            }
            RevocationTarget::Subject { subject, issued_before } => {
                let t = r.subjects.entry(subject.clone()).or_default();
                *t = (*t).max((issued_before.as_millis() + 999) / 1000);
            }
            RevocationTarget::Client { client_id, issued_before } => {
                let t = r.clients.entry(client_id.clone()).or_default();
                *t = (*t).max((issued_before.as_millis() + 999) / 1000);
            }
            RevocationTarget::SigningKey { kid } => {
                r.kids.insert(kid.clone());
            }
        }
    }

    /// Whether a token with these claims has been revoked (by `jti`, family, subject or client
    /// cut-off, or its signing key).
    pub fn is_revoked(&self, claims: &crate::token::AccessClaims, kid: &str) -> bool {
        let r = &self.revoked;
        r.jtis.contains_key(&claims.jti)
            || claims.fam.as_ref().is_some_and(|f| r.families.contains_key(f))
            || r.subjects.get(&claims.sub).is_some_and(|t| claims.iat < *t)
            || r.clients.get(&claims.client_id).is_some_and(|t| claims.iat < *t)
            || r.kids.contains(kid)
            || claims
                .fam
                .as_ref()
                .and_then(|f| self.families.get(f))
                .and_then(|f| f.authenticator.as_ref())
                .is_some_and(|a| !self.upstream_trusted(a))
    }

    /// Whether an initial access token (by hash) may register a client at `now_ms`.
    pub fn registration_token_valid(&self, hash: &str, now_ms: i64) -> bool {
        self.registration_tokens.get(hash).is_some_and(|exp| *exp > now_ms)
    }

    pub fn session(&self, session_id: &str) -> Option<&Session> {
        self.sessions.get(session_id)
    }

    pub fn code(&self, code_hash: &str) -> Option<&Code> {
        self.codes.get(code_hash)
    }

    pub fn family(&self, family_id: &str) -> Option<&Family> {
        self.families.get(family_id)
    }

    pub fn refresh_token(&self, jti: &str) -> Option<&RefreshToken> {
        self.refresh.get(jti)
    }

    /// Families and revoked families remembered: (known, revoked). For tests of the pruning.
    #[cfg(test)]
    pub(crate) fn remembered_families(&self) -> (usize, usize) {
        (self.families.len(), self.revoked.families.len())
    }

    pub fn is_family_revoked(&self, family_id: &str) -> bool {
        self.revoked.families.contains_key(family_id)
    }

    /// Until when (ms) sign-ins for this username or from this address are refused, if they are.
    pub fn throttled_until(&self, username: &str, address: Option<&str>, now_ms: i64) -> Option<i64> {
        let locked = |q: Option<&std::collections::VecDeque<i64>>, max: usize| {
            let q = q?;
            let recent: Vec<i64> = q.iter().copied().filter(|t| *t + THROTTLE_WINDOW_MS > now_ms).collect();
            (recent.len() >= max).then(|| recent[recent.len() - max] + THROTTLE_WINDOW_MS)
        };
        let by_user = locked(self.failures.by_user.get(username), MAX_FAILURES_PER_USER);
        let by_address = address.and_then(|a| locked(self.failures.by_address.get(a), MAX_FAILURES_PER_ADDRESS));
        by_user.into_iter().chain(by_address).max()
    }

    pub fn client(&self, client_id: &str) -> Option<&Client> {
        self.clients.get(client_id)
    }

    pub fn clients(&self) -> impl Iterator<Item = &Client> {
        self.clients.values()
    }

    pub fn user(&self, user_id: &str) -> Option<&User> {
        self.users.get(user_id)
    }

    pub fn user_by_name(&self, username: &str) -> Option<&User> {
        self.user_ids_by_name.get(username).and_then(|id| self.users.get(id))
    }

    pub fn users(&self) -> impl Iterator<Item = &User> {
        self.users.values()
    }

    pub fn idp(&self, idp_id: &str) -> Option<&Idp> {
        self.idps.get(idp_id)
    }

    pub fn idps(&self) -> impl Iterator<Item = &Idp> {
        self.idps.values()
    }

    /// Whether an upstream identity still counts: some enabled provider has its issuer. Sessions,
    /// refresh-token families and access tokens that came from a disabled provider stop working.
    pub fn upstream_trusted(&self, authenticator: &Authenticator) -> bool {
        self.idps.values().any(|i| !i.disabled && i.registration.issuer == authenticator.issuer)
    }

    /// The user an upstream identity signs in as.
    pub fn linked_user(&self, issuer: &str, subject: &str) -> Option<&str> {
        self.links.get(&cairn_events::identity_key(issuer, subject)).map(String::as_str)
    }

    /// How many upstream identities sign in as this user.
    pub fn links_of(&self, user_id: &str) -> usize {
        self.links.values().filter(|u| *u == user_id).count()
    }

    pub fn key(&self, kid: &str) -> Option<&PublishedKey> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    /// Users, clients, keys and the revocation list as JSON, every list sorted: what `cairn replay`
    /// writes beside a replayed store. Never a secret: password and client-secret hashes are left out.
    pub fn snapshot(&self) -> serde_json::Value {
        use serde_json::json;
        let mut users: Vec<_> = self
            .users
            .values()
            .map(|u| {
                json!({"user_id": u.account.user_id, "username": u.account.username,
                       "fhir_user": u.account.fhir_user, "roles": u.account.roles, "disabled": u.disabled})
            })
            .collect();
        users.sort_by(|a, b| a["user_id"].as_str().cmp(&b["user_id"].as_str()));
        let mut clients: Vec<_> = self
            .clients
            .values()
            .map(|c| {
                json!({"client_id": c.registration.client_id, "client_name": c.registration.client_name,
                       "kind": c.registration.kind, "scope": c.registration.scope,
                       "redirect_uris": c.registration.redirect_uris, "disabled": c.disabled})
            })
            .collect();
        clients.sort_by(|a, b| a["client_id"].as_str().cmp(&b["client_id"].as_str()));
        let keys: Vec<_> = self
            .keys
            .iter()
            .map(|k| json!({"kid": k.kid, "purpose": k.purpose, "replaced_ms": k.replaced_ms}))
            .chain(self.seal_keys.iter().map(|j| json!({"kid": j["kid"], "purpose": "log_seal"})))
            .collect();
        fn sorted(m: &HashMap<String, i64>) -> std::collections::BTreeMap<&String, &i64> {
            m.iter().collect()
        }
        let idps: std::collections::BTreeMap<_, _> = self
            .idps
            .iter()
            .map(|(id, i)| {
                let r = &i.registration;
                (
                    id,
                    json!({"display_name": r.display_name, "issuer": r.issuer, "client_id": r.client_id,
                            "provision_role": r.provision_role, "disabled": i.disabled}),
                )
            })
            .collect();
        let links: std::collections::BTreeMap<_, _> = self.links.iter().collect();
        let r = &self.revoked;
        json!({
            "users": users,
            "clients": clients,
            "keys": keys,
            "identity_providers": idps,
            "identity_links": links,
            "revoked": {
                "tokens_until_expiry_s": sorted(&r.jtis),
                "families_until_ms": sorted(&r.families),
                "users_issued_before_s": sorted(&r.subjects),
                "clients_issued_before_s": sorted(&r.clients),
                "signing_keys": r.kids.iter().collect::<std::collections::BTreeSet<_>>(),
            },
        })
    }

    pub fn seal_keys(&self) -> &[serde_json::Value] {
        &self.seal_keys
    }

    pub fn keys(&self) -> &[PublishedKey] {
        &self.keys
    }
}

/// Keeps at most the failures that can still count.
fn push_failure(q: &mut std::collections::VecDeque<i64>, at: i64) {
    q.push_back(at);
    while q.len() > MAX_FAILURES_PER_ADDRESS || q.front().is_some_and(|t| *t + THROTTLE_WINDOW_MS < at) {
        q.pop_front();
    }
}
