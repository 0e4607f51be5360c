//! Sign-ins, sign-outs, token decisions and security administration: DICOM 110114 User
//! Authentication (110122 Login, 110123 Logout), token issuance and refusal in the IHE ITI-71
//! shape, and 110113 Security Alert for revocations and account changes.

use crate::codes::*;
use cairn_events::{Event, LoginFailure, Payload, RevocationTarget, TokenKind};
use serde_json::{Value, json};

fn user_authentication(subtype: Value, outcome_code: &str, agents: Vec<Value>) -> Value {
    json!({
        "type": coding(DCM, "110114", "User Authentication"),
        "subtype": [subtype],
        "action": "E",
        "outcome": outcome_code,
        "agent": agents,
        "source": source(),
    })
}

fn authorization_server() -> Value {
    json!({
        "type": {"coding": [coding(DCM, "110152", "Destination Role ID")]},
        "who": server_who(),
        "requestor": false,
    })
}

fn with_network(mut agent: Value, event: &Event) -> Value {
    put(&mut agent, "network", network(&event.actor));
    agent
}

fn security_alert(event: &Event, what: Value, description: String) -> Value {
    let mut requestor = json!({
        "who": event.actor.subject.as_deref().map(|s| json!({"identifier": {"system": USER_ID_SYSTEM, "value": s}}))
            .or_else(|| event.actor.client_id.as_deref().map(client_who))
            .unwrap_or_else(|| json!({"display": "administrator (cairn admin)"})),
        "requestor": true,
    });
    put(&mut requestor, "network", network(&event.actor));
    json!({
        "type": coding(DCM, "110113", "Security Alert"),
        "subtype": [coding(DCM, "110137", "User Security Attributes Changed")],
        "action": "E",
        "outcome": "0",
        "agent": [requestor, authorization_server()],
        "source": source(),
        "entity": [{
            "what": what,
            "type": coding(ENTITY_TYPE, "2", "System Object"),
            "role": coding(OBJECT_ROLE, "13", "Security Resource"),
            "description": description,
        }],
    })
}

fn identifier(system: &str, value: &str) -> Value {
    json!({"identifier": {"system": system, "value": value}})
}

fn failure_code(reason: LoginFailure) -> String {
    serde_json::to_value(reason).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

/// The AuditEvent bodies of an `auth.*` event (with the patient the record is about, if any).
pub fn audit(event: &Event) -> Vec<(Value, Option<String>)> {
    let body = match &event.payload {
        Payload::LoginSucceeded(l) => {
            let mut user = json!({
                "who": {"identifier": {"system": USER_ID_SYSTEM, "value": l.user_id}},
                "name": l.username,
                "altId": l.user_id,
                "requestor": true,
            });
            put(&mut user, "network", network(&event.actor));
            let mut agents = vec![user, authorization_server()];
            if let Some(a) = &l.authenticator {
                // Who vouched for the user: the upstream OpenID provider and the identity it asserted.
                agents.push(upstream_agent(a));
            }
            user_authentication(coding(DCM, "110122", "Login"), "0", agents)
        }
        Payload::LoginFailed(f) => {
            let who = match &f.username {
                Some(u) => identifier(USERNAME_SYSTEM, u),
                None => json!({"display": "no username given"}),
            };
            let user = with_network(json!({"who": who, "requestor": true}), event);
            let mut agents = vec![user, authorization_server()];
            if let Some(a) = &f.authenticator {
                agents.push(upstream_agent(a));
            }
            let mut body = user_authentication(coding(DCM, "110122", "Login"), "4", agents);
            let mut desc = format!("login refused: {}", failure_code(f.reason));
            if let Some(idp) = &f.idp {
                desc.push_str(&format!(" (identity provider {idp})"));
            }
            if let Some(d) = &f.detail {
                desc.push_str(&format!(": {d}"));
            }
            body["outcomeDesc"] = Value::String(desc);
            body
        }
        Payload::Logout(l) => {
            let user = with_network(
                json!({"who": {"identifier": {"system": USER_ID_SYSTEM, "value": l.user_id}}, "altId": l.user_id, "requestor": true}),
                event,
            );
            user_authentication(coding(DCM, "110123", "Logout"), "0", vec![user, authorization_server()])
        }
        // One record per grant: the access token's issuance stands for the refresh and ID tokens
        // issued with it.
        Payload::TokenIssued(t) if t.kind == TokenKind::Access => {
            let user = t.subject.as_deref().filter(|s| *s != t.client_id);
            let mut client = json!({
                "type": {"coding": [coding(DCM, "110153", "Source Role ID")]},
                "who": client_who(&t.client_id),
                "requestor": user.is_none(),
            });
            put(&mut client, "network", network(&event.actor));
            let mut agents = vec![client, authorization_server()];
            if let Some(u) = user {
                agents.push(json!({
                    "who": {"identifier": {"system": USER_ID_SYSTEM, "value": u}},
                    "altId": u,
                    "requestor": true,
                    "policy": [format!("{JTI_SYSTEM}:{}", t.jti)],
                }));
            }
            if let Some(a) = &event.actor.authenticator {
                agents.push(upstream_agent(a));
            }
            let request = format!("grant_type={}&scope={}", t.grant_type, t.scope);
            let mut body = user_authentication(coding(IHE_EVENT_TYPE, "ITI-71", "Authorization Token"), "0", agents);
            body["entity"] = json!([
                {
                    "type": coding(ENTITY_TYPE, "2", "System Object"),
                    "role": coding(OBJECT_ROLE, "24", "Query"),
                    "query": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, request),
                },
                {
                    "what": identifier(JTI_SYSTEM, &t.jti),
                    "type": coding(ENTITY_TYPE, "2", "System Object"),
                    "role": coding(OBJECT_ROLE, "13", "Security Resource"),
                    "description": format!("access token for {}, expires {}", t.audience, t.expires_at.to_rfc3339()),
                },
            ]);
            body
        }
        Payload::TokenRefused(r) => {
            let mut client = json!({
                "type": {"coding": [coding(DCM, "110153", "Source Role ID")]},
                "who": r.client_id.as_deref().map(client_who).unwrap_or_else(|| json!({"display": "unidentified client"})),
                "requestor": true,
            });
            put(&mut client, "network", network(&event.actor));
            let mut body = user_authentication(
                coding(IHE_EVENT_TYPE, "ITI-71", "Authorization Token"),
                "4",
                vec![client, authorization_server()],
            );
            body["outcomeDesc"] = Value::String(format!("{}: {}", r.error, r.reason));
            body
        }
        Payload::TokenRevoked(r) => {
            let (what, described) = match &r.target {
                RevocationTarget::Token { jti, .. } => (identifier(JTI_SYSTEM, jti), "token".to_owned()),
                RevocationTarget::Family { family_id } => {
                    (identifier("urn:cairn:token-family", family_id), "refresh-token family".to_owned())
                }
                RevocationTarget::Subject { subject, issued_before } => (
                    identifier(USER_ID_SYSTEM, subject),
                    format!("every token of the user issued before {}", issued_before.to_rfc3339()),
                ),
                RevocationTarget::Client { client_id, issued_before } => (
                    identifier(CLIENT_ID_SYSTEM, client_id),
                    format!("every token of the client issued before {}", issued_before.to_rfc3339()),
                ),
                RevocationTarget::SigningKey { kid } => {
                    (identifier("urn:cairn:signing-key", kid), "signing key".to_owned())
                }
            };
            security_alert(event, what, format!("revoked {described} ({})", r.reason))
        }
        Payload::UserCreated(u) => security_alert(
            event,
            identifier(USER_ID_SYSTEM, &u.user_id),
            format!("user account {} created", u.username),
        ),
        Payload::UserDisabled(u) => security_alert(
            event,
            identifier(USER_ID_SYSTEM, &u.user_id),
            format!("user account disabled ({})", u.reason),
        ),
        Payload::ClientRegistered(c) => security_alert(
            event,
            identifier(CLIENT_ID_SYSTEM, &c.client_id),
            format!("client {} registered with scope {}", c.client_name, c.scope),
        ),
        Payload::ClientDisabled(c) => {
            security_alert(event, identifier(CLIENT_ID_SYSTEM, &c.client_id), format!("client disabled ({})", c.reason))
        }
        Payload::IdpRegistered(i) => security_alert(
            event,
            identifier(IDP_SYSTEM, &i.idp_id),
            format!(
                "identity provider {} ({}) registered by {}: client {}, provisioning {}",
                i.idp_id,
                i.issuer,
                i.registered_by,
                i.client_id,
                i.provision_role.as_deref().map_or("off".to_owned(), |r| format!("with role {r}"))
            ),
        ),
        Payload::IdpDisabled(i) => security_alert(
            event,
            identifier(IDP_SYSTEM, &i.idp_id),
            format!("identity provider disabled ({})", i.reason),
        ),
        Payload::IdentityLinked(l) => security_alert(
            event,
            identifier(USER_ID_SYSTEM, &l.user_id),
            format!("upstream identity {} at {} linked ({})", l.subject, l.issuer, l.linked_by),
        ),
        _ => return Vec::new(),
    };
    vec![(body, event.patient.clone())]
}
