//! The authorization server's view of the world, projected from the `cairn.auth` topic: clients,
//! users, published signing keys. Every instance builds it by replaying the topic before it serves
//! and keeps it current by tailing it, so a client registered or disabled through one instance is
//! known to all of them.

use crate::keys::decoding_key;
use crate::scope::ScopeSet;
use cairn_events::{ClientKind, ClientRegistered, Event, KeyPurpose, Payload, RevocationTarget, UserCreated};
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

/// A signing key some instance published.
#[derive(Clone)]
pub struct PublishedKey {
    pub kid: String,
    pub algorithm: Algorithm,
    pub purpose: KeyPurpose,
    pub jwk: serde_json::Value,
    pub decoding: DecodingKey,
}

#[derive(Default)]
pub struct AuthState {
    clients: HashMap<String, Client>,
    users: HashMap<String, User>,
    user_ids_by_name: HashMap<String, String>,
    keys: Vec<PublishedKey>,
    revoked: Revocations,
}

/// What `auth.token.revoked` events have killed. A revoked `jti` is remembered only until the
/// token's own expiry, so the list stays bounded.
#[derive(Default)]
struct Revocations {
    jtis: HashMap<String, i64>,
    families: std::collections::HashSet<String>,
    /// Tokens issued (iat, seconds) before this time are dead.
    subjects: HashMap<String, i64>,
    clients: HashMap<String, i64>,
    kids: std::collections::HashSet<String>,
    /// Expired `jti`s are pruned when the list has grown this much since the last pruning.
    prune_at: usize,
}

impl AuthState {
    /// Applies one event of the `cairn.auth` topic. Events of other kinds are ignored; so is a
    /// published key that cannot be used (logged), rather than stopping the projection.
    pub fn apply(&mut self, event: &Event) {
        match &event.payload {
            Payload::ClientRegistered(r) => {
                let allowed = r
                    .scope
                    .split(' ')
                    .filter(|s| !s.is_empty())
                    .filter_map(|s| crate::scope::Scope::parse(s).ok())
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(" ");
                let allowed = ScopeSet::parse(&allowed).unwrap_or_default();
                self.clients.insert(r.client_id.clone(), Client { registration: r.clone(), allowed, disabled: false });
            }
            Payload::ClientDisabled(d) => {
                if let Some(c) = self.clients.get_mut(&d.client_id) {
                    c.disabled = true;
                }
            }
            Payload::UserCreated(u) => {
                self.user_ids_by_name.insert(u.username.clone(), u.user_id.clone());
                self.users.insert(u.user_id.clone(), User { account: u.clone(), disabled: false });
            }
            Payload::UserDisabled(d) => {
                if let Some(u) = self.users.get_mut(&d.user_id) {
                    u.disabled = true;
                }
            }
            Payload::KeyPublished(k) => {
                if self.keys.iter().any(|p| p.kid == k.kid) {
                    return;
                }
                match decoding_key(&k.jwk) {
                    Ok((algorithm, decoding)) => self.keys.push(PublishedKey {
                        kid: k.kid.clone(),
                        algorithm,
                        purpose: k.purpose,
                        jwk: k.jwk.clone(),
                        decoding,
                    }),
                    Err(e) => tracing::error!(kid = %k.kid, error = %e, "published key ignored"),
                }
            }
            Payload::TokenRevoked(r) => self.revoke(&r.target, event.occurred_at.as_millis() / 1000),
            _ => {}
        }
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
                r.families.insert(family_id.clone());
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
            || claims.fam.as_ref().is_some_and(|f| r.families.contains(f))
            || r.subjects.get(&claims.sub).is_some_and(|t| claims.iat < *t)
            || r.clients.get(&claims.client_id).is_some_and(|t| claims.iat < *t)
            || r.kids.contains(kid)
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

    pub fn key(&self, kid: &str) -> Option<&PublishedKey> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    pub fn keys(&self) -> &[PublishedKey] {
        &self.keys
    }
}
