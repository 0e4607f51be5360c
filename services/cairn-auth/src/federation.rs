//! Sign-in through upstream OpenID providers: the decisions. Which providers exist (events
//! `auth.idp.*`), which Cairn user an upstream identity signs in as (`auth.identity.linked`: an
//! admin's link, or just-in-time provisioning when the provider is configured for it; never an
//! email claim), and the sign-in itself, recorded with the authenticator (issuer, subject, `acr`,
//! `amr`) that the session, its codes and its tokens carry on.
//!
//! The protocol with the provider (discovery, the code exchange, ID token validation) is the edge
//! crate `cairn-federation`'s; it hands over an identity only after the ID token checked out.

use crate::flow::{LoginRefusal, SignedIn, unavailable};
use crate::keys::SigningKey;
use crate::state::Idp;
use crate::{AuthError, AuthServer, random_token, sha256_hex};
use cairn_events::{
    Actor, Authenticator, Event, IdentityLinked, IdpDisabled, IdpRegistered, LoginFailed, LoginFailure, LoginMethod,
    LoginSucceeded, Payload, UpstreamClientAuth, UserCreated,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// An upstream provider as an administrator (or the TOML file) describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdpConfig {
    pub idp_id: String,
    pub display_name: String,
    pub issuer: String,
    pub client_id: String,
    /// `client_secret_basic` (default), `client_secret_post` or `private_key_jwt`.
    #[serde(default = "default_method")]
    pub client_auth_method: String,
    /// A file holding the client secret (one line), for the `client_secret_*` methods.
    #[serde(default)]
    pub client_secret_file: Option<String>,
    /// A PKCS#8 PEM private key (EC P-256 or RSA), for `private_key_jwt`.
    #[serde(default)]
    pub private_key_file: Option<String>,
    /// Scopes asked of the provider besides `openid`.
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub userinfo: bool,
    /// Just-in-time provisioning: new upstream identities become users with this role.
    #[serde(default)]
    pub provision_role: Option<String>,
}

fn default_method() -> String {
    "client_secret_basic".into()
}

/// What Cairn presents at a provider's token endpoint, read from the configured file.
pub enum UpstreamCredential {
    /// A client secret, sent with HTTP Basic (`basic`) or in the form body.
    Secret { secret: String, basic: bool },
    /// A key that signs an RFC 7523 client assertion.
    Key(SigningKey),
}

impl std::fmt::Debug for UpstreamCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamCredential::Secret { basic, .. } => write!(f, "Secret {{ basic: {basic}, .. }}"),
            UpstreamCredential::Key(k) => write!(f, "Key({})", k.kid),
        }
    }
}

impl UpstreamCredential {
    /// Reads the credential an IdP registration names, and checks it is the one registered (a file
    /// changed since means a reconfiguration that was not recorded: refused, not used silently).
    /// Blocking: file reads and an Argon2id verification (tens of milliseconds).
    pub fn load(auth: &UpstreamClientAuth) -> Result<UpstreamCredential, AuthError> {
        match auth {
            UpstreamClientAuth::ClientSecretBasic { secret_file, secret_hash }
            | UpstreamClientAuth::ClientSecretPost { secret_file, secret_hash } => {
                let secret = read_secret(secret_file)?;
                if !crate::password::verify(&secret, secret_hash) {
                    return Err(AuthError::Invalid(format!(
                        "the client secret in {secret_file} changed since the provider was registered; register it again (cairn admin idp add)"
                    )));
                }
                let basic = matches!(auth, UpstreamClientAuth::ClientSecretBasic { .. });
                Ok(UpstreamCredential::Secret { secret, basic })
            }
            UpstreamClientAuth::PrivateKeyJwt { key_file, kid, .. } => {
                let key = crate::keys::load_assertion_key(std::path::Path::new(key_file))?;
                if key.kid != *kid {
                    return Err(AuthError::Invalid(format!(
                        "the private key in {key_file} changed since the provider was registered; register it again (cairn admin idp add)"
                    )));
                }
                Ok(UpstreamCredential::Key(key))
            }
        }
    }

    /// An RFC 7523 client assertion for `token_endpoint`, valid for a minute.
    pub fn assertion(&self, client_id: &str, token_endpoint: &str) -> Result<Option<String>, AuthError> {
        let UpstreamCredential::Key(key) = self else { return Ok(None) };
        let now = crate::now_secs();
        let claims = json!({
            "iss": client_id, "sub": client_id, "aud": token_endpoint,
            "jti": uuid::Uuid::new_v4().to_string(), "iat": now, "exp": now + 60,
        });
        key.sign_json(&claims).map(Some)
    }
}

fn read_secret(path: &str) -> Result<String, AuthError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| AuthError::Invalid(format!("client secret file {path}: {e}")))?;
    crate::keys::check_private(std::path::Path::new(path))?;
    let secret = text.trim_end_matches(['\n', '\r']).to_owned();
    if secret.is_empty() || secret.contains('\n') {
        return Err(AuthError::Invalid(format!("client secret file {path}: expected the secret on one line")));
    }
    Ok(secret)
}

fn valid_idp_id(id: &str) -> bool {
    (1..=32).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Only `https` issuers, except on loopback (development and tests).
fn valid_issuer(issuer: &str) -> bool {
    secure_url(issuer) && !issuer.contains(['?', '#'])
}

/// An address Cairn may send a provider's secrets and codes to, or take its keys from: `https`, or
/// `http` on loopback (development and tests).
pub fn secure_url(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://")) else {
        return false;
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let hostname = host.rsplit_once(':').map_or(host, |(h, port)| if port.parse::<u16>().is_ok() { h } else { host });
    !hostname.is_empty()
        && !hostname.contains('@')
        && !url.contains([' ', '\n', '\r'])
        && (url.starts_with("https://") || matches!(hostname, "127.0.0.1" | "localhost" | "[::1]"))
}

impl IdpConfig {
    /// Checks the configuration and reads its credential file, giving the event to record.
    pub fn to_registration(&self, registered_by: &str) -> Result<IdpRegistered, AuthError> {
        let bad = |m: String| Err(AuthError::Invalid(m));
        if !valid_idp_id(&self.idp_id) {
            return bad(format!("idp id `{}`: use 1-32 lowercase letters, digits or '-'", self.idp_id));
        }
        if self.display_name.trim().is_empty() || self.display_name.len() > 80 {
            return bad("display name: 1-80 characters".into());
        }
        // Exactly as the provider states it (a trailing '/' included): OpenID Connect compares
        // issuers as strings.
        let issuer = self.issuer.clone();
        if !valid_issuer(&issuer) {
            return bad(format!(
                "issuer `{}`: an https URL (http only on loopback), without query or fragment",
                self.issuer
            ));
        }
        if self.client_id.is_empty() || self.client_id.len() > 255 {
            return bad("client id: 1-255 characters".into());
        }
        let client_auth = match (self.client_auth_method.as_str(), &self.client_secret_file, &self.private_key_file) {
            ("client_secret_basic" | "client_secret_post", Some(file), None) => {
                let absolute = absolute(file)?;
                let secret_hash = crate::password::hash(&read_secret(&absolute)?)?;
                if self.client_auth_method == "client_secret_basic" {
                    UpstreamClientAuth::ClientSecretBasic { secret_file: absolute, secret_hash }
                } else {
                    UpstreamClientAuth::ClientSecretPost { secret_file: absolute, secret_hash }
                }
            }
            ("private_key_jwt", None, Some(file)) => {
                let absolute = absolute(file)?;
                let key = crate::keys::load_assertion_key(std::path::Path::new(&absolute))?;
                let alg = key.public_jwk["alg"].as_str().unwrap_or_default().to_owned();
                UpstreamClientAuth::PrivateKeyJwt { key_file: absolute, kid: key.kid.clone(), alg }
            }
            ("client_secret_basic" | "client_secret_post", _, _) => {
                return bad(format!("{}: give the client secret file (and no private key)", self.client_auth_method));
            }
            ("private_key_jwt", _, _) => {
                return bad("private_key_jwt: give the private key file (and no secret)".into());
            }
            (other, _, _) => {
                return bad(format!(
                    "client auth method `{other}`: use client_secret_basic, client_secret_post or private_key_jwt"
                ));
            }
        };
        let mut scopes = vec!["openid".to_owned()];
        for s in &self.scopes {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\') {
                return bad(format!("scope `{s}` is not a valid OAuth scope"));
            }
            if !scopes.contains(s) {
                scopes.push(s.clone());
            }
        }
        if let Some(role) = &self.provision_role
            && (role.is_empty() || role.len() > 32 || !role.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        {
            return bad(format!("provisioning role `{role}`: 1-32 letters, digits or '-'"));
        }
        Ok(IdpRegistered {
            idp_id: self.idp_id.clone(),
            display_name: self.display_name.trim().to_owned(),
            issuer,
            client_id: self.client_id.clone(),
            client_auth,
            scopes,
            use_userinfo: self.userinfo,
            provision_role: self.provision_role.clone(),
            registered_by: registered_by.to_owned(),
        })
    }
}

/// Whether `new` (just made from `config`) says what `recorded` says: everything equal but the
/// secret's hash, which is salted, so the secret in the file is checked against the recorded one.
fn same_registration(recorded: &IdpRegistered, new: &IdpRegistered, config: &IdpConfig) -> bool {
    let secret_matches = |recorded_hash: &str| {
        config
            .client_secret_file
            .as_deref()
            .and_then(|f| read_secret(&absolute(f).ok()?).ok())
            .is_some_and(|s| crate::password::verify(&s, recorded_hash))
    };
    let auth_same = match (&recorded.client_auth, &new.client_auth) {
        (
            UpstreamClientAuth::ClientSecretBasic { secret_file: a, secret_hash },
            UpstreamClientAuth::ClientSecretBasic { secret_file: b, .. },
        )
        | (
            UpstreamClientAuth::ClientSecretPost { secret_file: a, secret_hash },
            UpstreamClientAuth::ClientSecretPost { secret_file: b, .. },
        ) => a == b && secret_matches(secret_hash),
        (a, b) => a == b,
    };
    auth_same
        && IdpRegistered {
            client_auth: new.client_auth.clone(),
            registered_by: new.registered_by.clone(),
            ..recorded.clone()
        } == *new
}

fn absolute(file: &str) -> Result<String, AuthError> {
    std::path::absolute(file).map(|p| p.display().to_string()).map_err(|e| AuthError::Invalid(format!("{file}: {e}")))
}

/// The UUIDv5 namespace of users provisioned from upstream identities.
const PROVISIONED_USERS: uuid::Uuid = uuid::Uuid::from_u128(0x6c1f_4f7e_2d8a_4b8e_9a51_1e0c_c3a7_0f42);

/// Why a federated sign-in failed, as recorded and as shown.
#[derive(Debug, Clone)]
pub struct FederatedFailure {
    pub reason: LoginFailure,
    /// For the audit record: what exactly failed (fixed wording).
    pub detail: String,
    /// The identity, when the failure came after the ID token checked out.
    pub authenticator: Option<Authenticator>,
}

impl AuthServer {
    /// The enabled upstream providers, in the order the sign-in page lists them.
    pub fn enabled_idps(&self) -> Vec<Idp> {
        let mut idps: Vec<Idp> = self.read_state(|s| s.idps().filter(|i| !i.disabled).cloned().collect());
        idps.sort_by(|a, b| a.registration.display_name.cmp(&b.registration.display_name));
        idps
    }

    /// An enabled upstream provider.
    pub fn enabled_idp(&self, idp_id: &str) -> Option<Idp> {
        self.read_state(|s| s.idp(idp_id).filter(|i| !i.disabled).cloned())
    }

    /// Records an IdP configuration unless the log already holds this one (so the TOML file's
    /// providers are recorded once, and again only when they change). A provider an admin disabled
    /// stays disabled whatever the file says (only `cairn admin idp add` enables it again). Returns
    /// whether it appended.
    pub async fn register_idp(&self, config: &IdpConfig, registered_by: &str) -> Result<bool, AuthError> {
        let current = self.read_state(|s| s.idp(&config.idp_id).cloned());
        let disabled_by_admin = registered_by == "config" && current.as_ref().is_some_and(|i| i.disabled);
        let config = config.clone();
        let registered_by = registered_by.to_owned();
        // Reading files and Argon2id: off the async workers.
        let (registration, unchanged) = tokio::task::spawn_blocking(move || {
            let registration = config.to_registration(&registered_by)?;
            let unchanged =
                current.is_some_and(|i| !i.disabled && same_registration(&i.registration, &registration, &config));
            Ok::<_, AuthError>((registration, unchanged))
        })
        .await
        .map_err(|e| AuthError::Internal(e.to_string()))??;
        if disabled_by_admin {
            // Checked all the same, so a mistake in the file still shows.
            tracing::warn!(idp = %registration.idp_id, "identity provider disabled in the log: the config file does not enable it again");
            return Ok(false);
        }
        if unchanged {
            return Ok(false);
        }
        let actor = Actor { subject: Some("admin".into()), ..Actor::default() };
        self.append_and_apply(Event::new(Payload::from(registration)).with_actor(actor)).await?;
        Ok(true)
    }

    pub(crate) async fn disable_idp(&self, idp_id: &str) -> Result<Value, AuthError> {
        if self.read_state(|s| s.idp(idp_id).is_none()) {
            return Err(AuthError::Invalid(format!("no identity provider `{idp_id}`")));
        }
        let e = IdpDisabled { idp_id: idp_id.to_owned(), reason: "admin".into() };
        let actor = Actor { subject: Some("admin".into()), ..Actor::default() };
        self.append_and_apply(Event::new(Payload::from(e)).with_actor(actor)).await?;
        Ok(json!({"idp_id": idp_id, "disabled": true}))
    }

    pub(crate) fn list_idps(&self) -> Value {
        self.read_state(|s| {
            let mut idps: Vec<Value> = s
                .idps()
                .map(|i| {
                    let r = &i.registration;
                    let method = match &r.client_auth {
                        UpstreamClientAuth::ClientSecretBasic { .. } => "client_secret_basic",
                        UpstreamClientAuth::ClientSecretPost { .. } => "client_secret_post",
                        UpstreamClientAuth::PrivateKeyJwt { .. } => "private_key_jwt",
                    };
                    json!({
                        "idp_id": r.idp_id, "display_name": r.display_name, "issuer": r.issuer,
                        "client_id": r.client_id, "client_auth_method": method, "scopes": r.scopes,
                        "userinfo": r.use_userinfo, "provision_role": r.provision_role,
                        "registered_by": r.registered_by, "disabled": i.disabled,
                    })
                })
                .collect();
            idps.sort_by(|a, b| a["idp_id"].as_str().cmp(&b["idp_id"].as_str()));
            json!(idps)
        })
    }

    /// `cairn admin user link`: the upstream identity (provider, subject) signs in as `username`.
    pub(crate) async fn link_identity(&self, username: &str, idp_id: &str, subject: &str) -> Result<Value, AuthError> {
        let (user_id, idp) = self.read_state(|s| {
            (s.user_by_name(username).map(|u| u.account.user_id.clone()), s.idp(idp_id).map(|i| i.registration.clone()))
        });
        let user_id = user_id.ok_or_else(|| AuthError::Invalid(format!("no user `{username}`")))?;
        let idp = idp.ok_or_else(|| AuthError::Invalid(format!("no identity provider `{idp_id}`")))?;
        if subject.is_empty() || subject.len() > 255 {
            return Err(AuthError::Invalid("the upstream subject is 1-255 characters (the `sub` claim)".into()));
        }
        if let Some(existing) = self.read_state(|s| s.linked_user(&idp.issuer, subject).map(str::to_owned)) {
            let name = self.read_state(|s| s.user(&existing).map(|u| u.account.username.clone())).unwrap_or_default();
            return Err(AuthError::Invalid(format!("that identity is already linked to user `{name}`")));
        }
        let link = IdentityLinked {
            idp_id: idp_id.to_owned(),
            issuer: idp.issuer.clone(),
            subject: subject.to_owned(),
            user_id: user_id.clone(),
            linked_by: "admin".into(),
        };
        let actor = Actor { subject: Some("admin".into()), ..Actor::default() };
        self.append_and_apply(Event::new(Payload::from(link)).with_actor(actor)).await?;
        // Two admins linking the same identity at once: the first link counts.
        let winner = self.read_state(|s| s.linked_user(&idp.issuer, subject).map(str::to_owned));
        if winner.as_deref() != Some(user_id.as_str()) {
            return Err(AuthError::Invalid("that identity was linked to another user a moment ago".into()));
        }
        Ok(
            json!({"username": username, "user_id": user_id, "idp_id": idp_id, "issuer": idp.issuer, "subject": subject}),
        )
    }

    /// Records a federated sign-in that failed before an identity was established (or with one, when
    /// `failure.authenticator` is set).
    pub async fn federated_login_failed(
        &self,
        idp_id: Option<&str>,
        failure: &FederatedFailure,
        actor: &Actor,
    ) -> Result<(), AuthError> {
        let e = LoginFailed {
            username: None,
            reason: failure.reason,
            authenticator: failure.authenticator.clone(),
            idp: idp_id.filter(|i| valid_idp_id(i)).map(str::to_owned),
            detail: Some(failure.detail.chars().take(300).collect()),
        };
        self.append(Event::new(Payload::from(e)).with_actor(actor.clone())).await.map(|_| ())
    }

    /// Signs in the user an upstream identity is linked to (provisioning one first, when the
    /// provider is configured for it). `identity` has passed every ID token check.
    pub async fn federated_login(
        &self,
        idp_id: &str,
        identity: Authenticator,
        actor: &Actor,
    ) -> Result<SignedIn, LoginRefusal> {
        let idp = self.enabled_idp(idp_id);
        let refuse = |reason: LoginFailure, detail: &str| FederatedFailure {
            reason,
            detail: detail.to_owned(),
            authenticator: Some(identity.clone()),
        };
        let Some(idp) = idp.filter(|i| i.registration.issuer == identity.issuer) else {
            let f = refuse(LoginFailure::UnknownProvider, "the provider is disabled or no longer configured");
            self.federated_login_failed(Some(idp_id), &f, actor).await.map_err(|_| unavailable())?;
            return Err(LoginRefusal("Sign-in through this provider is not available.".into()));
        };
        let name = &idp.registration.display_name;
        let mut user_id = self.read_state(|s| s.linked_user(&identity.issuer, &identity.subject).map(str::to_owned));
        if user_id.is_none()
            && let Some(role) = &idp.registration.provision_role
        {
            user_id = Some(self.provision(&idp, &identity, role, actor).await.map_err(|_| unavailable())?);
        }
        let Some(user_id) = user_id else {
            let f = refuse(LoginFailure::UnlinkedIdentity, "the upstream identity is not linked to a Cairn user");
            self.federated_login_failed(Some(idp_id), &f, actor).await.map_err(|_| unavailable())?;
            return Err(LoginRefusal(format!(
                "Your {name} account is not linked to a Cairn account. Ask an administrator to link it (provider `{idp_id}`, account id `{}`).",
                identity.subject
            )));
        };
        let user = self.read_state(|s| s.user(&user_id).cloned());
        let Some(user) = user.filter(|u| !u.disabled) else {
            let f = refuse(LoginFailure::UserDisabled, "the linked Cairn user is disabled");
            self.federated_login_failed(Some(idp_id), &f, actor).await.map_err(|_| unavailable())?;
            return Err(LoginRefusal("This account cannot sign in. Ask an administrator.".into()));
        };
        let cookie = random_token(32);
        let event = LoginSucceeded {
            user_id: user.account.user_id.clone(),
            username: user.account.username.clone(),
            method: LoginMethod::Federated,
            authenticator: Some(identity.clone()),
            session_id: sha256_hex(cookie.as_bytes()),
        };
        let actor = Actor {
            subject: Some(user.account.user_id.clone()),
            fhir_user: user.account.fhir_user.clone(),
            authenticator: Some(identity),
            ..actor.clone()
        };
        self.append_and_apply(Event::new(Payload::from(event)).with_actor(actor)).await.map_err(|_| unavailable())?;
        Ok(SignedIn { cookie, user_id: user.account.user_id })
    }

    /// Just-in-time provisioning: a new user without a password, linked to the identity, in one
    /// append. If another instance linked the identity a moment earlier, its link counts (the user
    /// made here is left without a link and cannot sign in).
    async fn provision(
        &self,
        idp: &Idp,
        identity: &Authenticator,
        role: &str,
        actor: &Actor,
    ) -> Result<String, AuthError> {
        // Both derived from the identity, so two first sign-ins at once (two tabs, two instances)
        // make the same user, not two accounts with one name. The username is the provider and a
        // digest of the identity (subjects can hold any character, and may be personal data).
        let key = cairn_events::identity_key(&identity.issuer, &identity.subject);
        let user_id = uuid::Uuid::new_v5(&PROVISIONED_USERS, key.as_bytes()).to_string();
        let username = format!("{}-{}", idp.registration.idp_id, &sha256_hex(key.as_bytes())[..16]);
        let created = UserCreated {
            user_id: user_id.clone(),
            username,
            password_hash: String::new(),
            fhir_user: None,
            roles: vec![role.to_owned()],
        };
        let link = IdentityLinked {
            idp_id: idp.registration.idp_id.clone(),
            issuer: identity.issuer.clone(),
            subject: identity.subject.clone(),
            user_id: user_id.clone(),
            linked_by: "provisioning".into(),
        };
        let actor = Actor { subject: Some(user_id.clone()), authenticator: Some(identity.clone()), ..actor.clone() };
        self.append_all_and_apply(vec![
            Event::new(Payload::from(created)).with_actor(actor.clone()),
            Event::new(Payload::from(link)).with_actor(actor),
        ])
        .await?;
        Ok(self
            .read_state(|s| s.linked_user(&identity.issuer, &identity.subject).map(str::to_owned))
            .unwrap_or(user_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuers_are_https_except_on_loopback() {
        assert!(valid_issuer("https://login.example.org"));
        assert!(valid_issuer("https://login.example.org/realms/x"));
        assert!(valid_issuer("http://127.0.0.1:8080"));
        assert!(valid_issuer("http://localhost:3000/op"));
        assert!(!valid_issuer("http://login.example.org"));
        assert!(!valid_issuer("http://127.0.0.1.evil.example"));
        assert!(!valid_issuer("ftp://127.0.0.1"));
        assert!(!valid_issuer("https://login.example.org/?q=1"));
        assert!(!valid_issuer("https://"));
    }

    #[test]
    fn idp_ids_are_short_and_plain() {
        assert!(valid_idp_id("hospital-id"));
        assert!(!valid_idp_id(""));
        assert!(!valid_idp_id("Hospital"));
        assert!(!valid_idp_id("a/b"));
        assert!(!valid_idp_id(&"x".repeat(33)));
    }
}
