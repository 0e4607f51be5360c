//! A Provenance for every acknowledged write: the version written as `target`, who wrote it (the
//! user and the client app from the token), the activity, and the version it replaced.

use crate::AuditRecord;
use crate::codes::*;
use cairn_events::{Event, Payload};
use serde_json::{Value, json};

/// The Provenance of a `fhir.resource.*` event; `None` for every other event.
pub fn provenance(event: &Event) -> Option<AuditRecord> {
    let (resource_type, id, version, activity, sent) = match &event.payload {
        Payload::ResourceCreated(w) => (&w.resource_type, &w.id, w.version_id, ("CREATE", "create"), &w.provenance),
        Payload::ResourceUpdated(w) => (&w.resource_type, &w.id, w.version_id, ("UPDATE", "revise"), &w.provenance),
        Payload::ResourceDeleted(d) => (&d.resource_type, &d.id, d.version_id, ("DELETE", "delete"), &d.provenance),
        _ => return None,
    };
    let actor = &event.actor;
    let author = coding(PROVENANCE_PARTICIPANT, "author", "Author");
    let mut agents = Vec::new();
    if let Some(subject) = acting_user(actor) {
        agents.push(json!({"type": {"coding": [author.clone()]}, "who": user_who(actor, subject)}));
    }
    match &actor.client_id {
        // The app that sent the write: its author when it acted for itself (a device gateway with
        // SMART Backend Services), else the performer for the user.
        Some(client) => {
            let role =
                if agents.is_empty() { author } else { coding(PROVENANCE_PARTICIPANT, "performer", "Performer") };
            agents.push(json!({"type": {"coding": [role]}, "who": client_who(client)}));
        }
        None if agents.is_empty() => {
            agents.push(json!({"type": {"coding": [author]}, "who": {"display": "unauthenticated request (--insecure-no-auth)"}}));
        }
        None => {}
    }
    let mut body = json!({
        "target": [{"reference": format!("{resource_type}/{id}/_history/{version}")}],
        "activity": concept(DATA_OPERATION, activity.0, activity.1),
        "agent": agents,
    });
    if version > 1 {
        body["entity"] = json!([{
            "role": "revision",
            "what": {"reference": format!("{resource_type}/{id}/_history/{}", version - 1)},
        }]);
    }
    if let Some(sent) = sent.as_deref().and_then(|t| serde_json::from_str::<Value>(t).ok()) {
        merge_sent(&mut body, &sent);
    }
    let mut record = crate::record("Provenance", event.id.to_string(), body, event.patient.clone(), event);
    // `meta.source` names the request that made the write (the X-Request-Id of the server's logs).
    if let Some(r) = &event.request_id {
        record.resource["meta"]["source"] = Value::String(format!("urn:cairn:request:{r}"));
    }
    Some(record)
}

/// Merges what the client said in `X-Provenance` (checked by the API): its agents after the ones the
/// token names (which stay first: the server vouches for them), its entities after the replaced
/// version, and its reason, policy, location and time of the activity. Target, recorded and activity
/// are the server's.
fn merge_sent(body: &mut Value, sent: &Value) {
    for key in ["agent", "entity"] {
        if let Some(extra) = sent.get(key).and_then(Value::as_array) {
            let list = body.as_object_mut().expect("an object").entry(key).or_insert_with(|| Value::Array(Vec::new()));
            if let Some(list) = list.as_array_mut() {
                list.extend(extra.iter().cloned());
            }
        }
    }
    for key in ["reason", "policy", "location", "occurredDateTime", "occurredPeriod"] {
        if let Some(v) = sent.get(key) {
            body[key] = v.clone();
        }
    }
}
