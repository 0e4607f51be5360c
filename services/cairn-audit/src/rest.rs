//! BALP RESTful shapes: type `rest`, the interaction as subtype, client and server agents typed by
//! the direction data flows, the user as requestor with the token's `jti` as policy, the data,
//! patient, query and transaction entities.

use crate::codes::*;
use base64::Engine;
use cairn_events::{AccessRead, AccessSearch, Event, RequestRefused};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// The AuditEvent `action` of a FHIR interaction.
fn action(interaction: &str) -> &'static str {
    match interaction {
        "create" => "C",
        "update" | "patch" => "U",
        "delete" => "D",
        "read" | "vread" | "search-type" | "search-system" | "history-instance" | "history-type" | "history-system" => {
            "R"
        }
        _ => "E",
    }
}

/// The BALP agent types of client and server: who sends the data and who receives it.
fn agent_types(interaction: &str) -> (Value, Value) {
    let source = coding(DCM, "110153", "Source Role ID");
    let destination = coding(DCM, "110152", "Destination Role ID");
    match action(interaction) {
        "R" => (destination, source),
        "D" => (coding(DCM, "110150", "Application"), coding(PARTICIPATION, "CST", "custodian")),
        _ => (source, destination),
    }
}

/// Whether the interaction is a code of `http://hl7.org/fhir/restful-interaction`.
fn is_restful(interaction: &str) -> bool {
    matches!(
        interaction,
        "read"
            | "vread"
            | "update"
            | "patch"
            | "delete"
            | "history"
            | "history-instance"
            | "history-type"
            | "history-system"
            | "create"
            | "search"
            | "search-type"
            | "search-system"
            | "capabilities"
            | "transaction"
            | "batch"
            | "operation"
    )
}

/// The body every REST record shares; entities are added by the caller.
fn rest(event: &Event, interaction: &str, status: u16, outcome_desc: Option<String>) -> Value {
    let actor = &event.actor;
    let (client_type, server_type) = agent_types(interaction);
    let user = acting_user(actor);
    // The requestor: the user when there is one, else the client acting for itself.
    let mut client = json!({
        "type": {"coding": [client_type]},
        "who": actor.client_id.as_deref().map(client_who).unwrap_or_else(|| json!({"display": "unauthenticated client"})),
        "requestor": user.is_none(),
    });
    put(&mut client, "network", network(actor));
    if user.is_none() {
        put(&mut client, "policy", jti_policy(actor).map(|p| json!([p])));
    }
    let server = json!({"type": {"coding": [server_type]}, "who": server_who(), "requestor": false});
    let mut agents = vec![client, server];
    if let Some(subject) = user {
        let role = if action(interaction) == "R" {
            coding(PARTICIPATION, "IRCP", "information recipient")
        } else {
            coding(PARTICIPATION, "AUT", "author (originator)")
        };
        let mut agent = json!({
            "type": {"coding": [role]},
            "who": user_who(actor, subject),
            "altId": subject,
            "requestor": true,
        });
        put(&mut agent, "policy", jti_policy(actor).map(|p| json!([p])));
        agents.push(agent);
    }
    if let Some(a) = &actor.authenticator {
        // The token came from a sign-in an upstream provider vouched for: name it beside the user.
        agents.push(upstream_agent(a));
    }
    let subtype = if is_restful(interaction) {
        coding(RESTFUL_INTERACTION, interaction, interaction)
    } else {
        json!({"system": "urn:cairn:interaction", "code": interaction})
    };
    let mut body = json!({
        "type": coding(AUDIT_EVENT_TYPE, "rest", "Restful Operation"),
        "subtype": [subtype],
        "action": action(interaction),
        "outcome": outcome(status),
        "agent": agents,
        "source": source(),
    });
    put(
        &mut body,
        "outcomeDesc",
        outcome_desc.or_else(|| (status >= 400).then(|| format!("HTTP {status}"))).map(Value::String),
    );
    body
}

fn set_entities(body: &mut Value, event: &Event, mut entities: Vec<Value>, patient: Option<&str>) {
    if let Some(p) = patient {
        entities.push(patient_entity(p));
    }
    if let Some(r) = &event.request_id {
        entities.push(transaction_entity(r));
    }
    if !entities.is_empty() {
        body["entity"] = Value::Array(entities);
    }
}

/// create, update, delete: acknowledged writes.
pub fn write(
    event: &Event,
    interaction: &str,
    resource_type: &str,
    id: &str,
    version: u64,
) -> Vec<(Value, Option<String>)> {
    let status = if interaction == "create" { 201 } else { 200 };
    let mut body = rest(event, interaction, status, None);
    let data = data_entity(format!("{resource_type}/{id}/_history/{version}"));
    set_entities(&mut body, event, vec![data], event.patient.as_deref());
    vec![(body, event.patient.clone())]
}

/// read, vread, instance history, including refusals (the resource asked for, without a version).
pub fn read(event: &Event, r: &AccessRead) -> Vec<(Value, Option<String>)> {
    let mut body = rest(event, &r.interaction, r.status, None);
    let mut data = if r.returned.is_empty() {
        vec![data_entity(format!("{}/{}", r.resource_type, r.id))]
    } else {
        r.returned
            .iter()
            .map(|v| data_entity(format!("{}/{}/_history/{}", v.resource_type, v.id, v.version_id)))
            .collect()
    };
    data.extend(r.view.as_deref().map(view_entity));
    let patient = read_patient(event, r);
    set_entities(&mut body, event, data, patient.as_deref());
    vec![(body, patient)]
}

/// The patient a read's record is about: the event's, else the first returned version's.
pub fn read_patient(event: &Event, r: &AccessRead) -> Option<String> {
    event.patient.clone().or_else(|| r.returned.iter().find_map(|v| v.patient.clone()))
}

/// The patients a search's records are about, in record order: each patient whose data was
/// returned (`None`: versions outside any compartment), or the event's when nothing was.
pub fn search_patients(event: &Event, s: &AccessSearch) -> Vec<Option<String>> {
    let patients: std::collections::BTreeSet<Option<String>> = s.returned.iter().map(|v| v.patient.clone()).collect();
    if patients.is_empty() { vec![event.patient.clone()] } else { patients.into_iter().collect() }
}

/// Searches and type or system history: one record per patient whose data was returned (BALP
/// Patient* shapes), each naming the query and the versions of that patient's data; versions
/// outside any compartment go into a record without a patient.
pub fn search(event: &Event, s: &AccessSearch) -> Vec<(Value, Option<String>)> {
    let mut groups: BTreeMap<Option<String>, Vec<Value>> =
        search_patients(event, s).into_iter().map(|p| (p, Vec::new())).collect();
    for v in &s.returned {
        let reference = format!("{}/{}/_history/{}", v.resource_type, v.id, v.version_id);
        groups.entry(v.patient.clone()).or_default().push(data_entity(reference));
    }
    let query = base64::engine::general_purpose::STANDARD.encode(match &s.resource_type {
        Some(t) => format!("{t}?{}", s.query),
        None => format!("?{}", s.query),
    });
    groups
        .into_iter()
        .map(|(patient, mut entities)| {
            let mut body = rest(event, &s.interaction, s.status, None);
            entities.insert(
                0,
                json!({
                    "type": coding(ENTITY_TYPE, "2", "System Object"),
                    "role": coding(OBJECT_ROLE, "24", "Query"),
                                        "query": query,
                }),
            );
            entities.extend(s.view.as_deref().map(view_entity));
            set_entities(&mut body, event, entities, patient.as_deref());
            (body, patient)
        })
        .collect()
}

/// A request refused before or instead of its interaction.
pub fn refused(event: &Event, r: &RequestRefused) -> Vec<(Value, Option<String>)> {
    let mut body = rest(event, &r.interaction, r.status, Some(format!("HTTP {} {}: {}", r.status, r.code, r.reason)));
    // An id that is not a valid FHIR id (the reason it was refused, perhaps) cannot be a reference.
    let valid_id = |id: &str| {
        (1..=64).contains(&id.len()) && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    };
    let mut data = match (&r.resource_type, &r.id) {
        (Some(t), Some(id)) if valid_id(id) => vec![data_entity(format!("{t}/{id}"))],
        _ => Vec::new(),
    };
    data.extend(r.view.as_deref().map(view_entity));
    set_entities(&mut body, event, data, event.patient.as_deref());
    vec![(body, event.patient.clone())]
}
