//! Code systems and the Codings and agents every shape shares.

use cairn_events::Actor;
use serde_json::{Value, json};

pub const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
pub const AUDIT_EVENT_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-event-type";
pub const RESTFUL_INTERACTION: &str = "http://hl7.org/fhir/restful-interaction";
pub const ENTITY_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";
pub const OBJECT_ROLE: &str = "http://terminology.hl7.org/CodeSystem/object-role";
pub const PARTICIPATION: &str = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType";
pub const SOURCE_TYPE: &str = "http://terminology.hl7.org/CodeSystem/security-source-type";
pub const BALP_ENTITY_TYPE: &str = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType";
pub const IHE_EVENT_TYPE: &str = "urn:ihe:event-type-code";
pub const DATA_OPERATION: &str = "http://terminology.hl7.org/CodeSystem/v3-DataOperation";
pub const PROVENANCE_PARTICIPANT: &str = "http://terminology.hl7.org/CodeSystem/provenance-participant-type";

/// Identifier systems for the parties Cairn itself names.
pub const CLIENT_ID_SYSTEM: &str = "urn:cairn:oauth-client";
pub const USER_ID_SYSTEM: &str = "urn:cairn:user";
pub const USERNAME_SYSTEM: &str = "urn:cairn:username";
pub const JTI_SYSTEM: &str = "urn:ietf:params:oauth:jti";
pub const IDP_SYSTEM: &str = "urn:cairn:identity-provider";

pub fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({"system": system, "code": code, "display": display})
}

pub fn concept(system: &str, code: &str, display: &str) -> Value {
    json!({"coding": [coding(system, code, display)]})
}

/// The AuditEvent `outcome` for an HTTP status: 0 success, 4 minor failure (the client's request
/// was refused: 4xx), 8 serious failure (the server could not do it: 5xx).
pub fn outcome(status: u16) -> &'static str {
    match status {
        ..400 => "0",
        400..500 => "4",
        _ => "8",
    }
}

/// This server as the observer of every record.
pub fn source() -> Value {
    json!({
        "site": "cairn",
        "observer": server_who(),
        "type": [coding(SOURCE_TYPE, "4", "Application Server")],
    })
}

pub fn server_who() -> Value {
    json!({"identifier": {"system": "urn:cairn:server", "value": "cairn"}, "display": "Cairn FHIR server"})
}

pub fn client_who(client_id: &str) -> Value {
    json!({"identifier": {"system": CLIENT_ID_SYSTEM, "value": client_id}, "display": client_id})
}

/// The user: their FHIR resource (`fhirUser`) when the token named one, else their Cairn user id.
pub fn user_who(actor: &Actor, subject: &str) -> Value {
    match &actor.fhir_user {
        Some(r) => json!({"reference": r, "identifier": {"system": USER_ID_SYSTEM, "value": subject}}),
        None => json!({"identifier": {"system": USER_ID_SYSTEM, "value": subject}}),
    }
}

/// `urn:ietf:params:oauth:jti:<jti>`: the token that authorised the act (BALP).
pub fn jti_policy(actor: &Actor) -> Option<Value> {
    actor.jti.as_ref().map(|j| Value::String(format!("{JTI_SYSTEM}:{j}")))
}

pub fn network(actor: &Actor) -> Option<Value> {
    actor.source_address.as_ref().map(|a| json!({"address": a, "type": "2"}))
}

/// The upstream OpenID provider that vouched for the user, as an agent: the identity it asserted
/// (issuer as the identifier system, the `sub` as its value), `acr` and `amr` as its policies.
pub fn upstream_agent(a: &cairn_events::Authenticator) -> Value {
    let mut agent = json!({
        "type": {"coding": [coding(DCM, "110150", "Application")]},
        "who": {"identifier": {"system": a.issuer, "value": a.subject}, "display": "upstream identity provider"},
        "requestor": false,
    });
    let policies: Vec<Value> = a
        .acr
        .iter()
        .map(|acr| json!(format!("acr:{acr}")))
        .chain(a.amr.iter().map(|m| json!(format!("amr:{m}"))))
        .collect();
    put(&mut agent, "policy", (!policies.is_empty()).then_some(Value::Array(policies)));
    agent
}

/// The user behind the request, if it was not the client acting for itself (SMART Backend
/// Services tokens name the client as their subject).
pub fn acting_user(actor: &Actor) -> Option<&str> {
    actor.subject.as_deref().filter(|s| Some(*s) != actor.client_id.as_deref())
}

/// The patient entity (BALP `entity[patient]`).
pub fn patient_entity(patient: &str) -> Value {
    json!({
        "what": {"reference": patient},
        "type": coding(ENTITY_TYPE, "1", "Person"),
        "role": coding(OBJECT_ROLE, "1", "Patient"),
    })
}

/// The request id (BALP `entity[transaction]`), which ties the record to the server's logs.
pub fn transaction_entity(request_id: &str) -> Value {
    json!({
        "what": {"identifier": {"value": request_id}},
        "type": coding(BALP_ENTITY_TYPE, "XrequestId", "X-Request-Id"),
    })
}

/// The replay an access was served from (`cairn serve --read-only`), so the record says the data
/// shown was the past as rebuilt, not the live record.
pub fn view_entity(view: &str) -> Value {
    json!({
        "what": {"identifier": {"system": "urn:cairn:replay-view", "value": view}},
        "type": coding(ENTITY_TYPE, "2", "System Object"),
        "description": format!("served from a {view}"),
    })
}

/// A FHIR resource (at a version, when known) as a BALP `entity[data]`.
pub fn data_entity(reference: String) -> Value {
    json!({
        "what": {"reference": reference},
        "type": coding(ENTITY_TYPE, "2", "System Object"),
        "role": coding(OBJECT_ROLE, "4", "Domain Resource"),
    })
}

/// Inserts `value` under `key` when there is one.
pub fn put(target: &mut Value, key: &str, value: Option<Value>) {
    if let (Some(v), Some(o)) = (value, target.as_object_mut()) {
        o.insert(key.to_owned(), v);
    }
}
