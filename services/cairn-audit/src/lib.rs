//! The audit trail's FHIR shapes, built from log events: an AuditEvent for every FHIR interaction,
//! refusal, sign-in and token decision (following IHE BALP), and a Provenance for every write.
//!
//! Pure functions of one event: ids, times and every value come from the event, never from the
//! moment of projection, so rebuilding the trail from the log gives the same bytes (invariant 2).
//! Nothing here knows HTTP, Kafka or CQL; the projector stores what these functions return.

mod auth;
mod codes;
pub mod csv;
pub mod export;
mod provenance;
mod rest;
pub mod scan;
pub mod seen;
pub mod summary;
pub mod timeline;

pub use provenance::provenance;

use cairn_events::{Event, Payload};
use serde_json::Value;
use serde_json::value::RawValue;

/// One AuditEvent or Provenance to store, with the index keys the store needs.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    /// `AuditEvent` or `Provenance`.
    pub resource_type: &'static str,
    pub id: String,
    pub resource: Value,
    /// The patient compartment (`Patient/<id>`) the record is about, when there is one.
    pub patient: Option<String>,
    /// `recorded`, in epoch milliseconds.
    pub recorded_ms: i64,
}

impl AuditRecord {
    /// Where this record goes in the store.
    pub fn key(&self) -> RecordKey {
        RecordKey {
            resource_type: self.resource_type,
            id: self.id.clone(),
            patient: self.patient.clone(),
            recorded_ms: self.recorded_ms,
        }
    }
}

/// The AuditEvents an event gives (none for events that are not audited on their own: a published
/// key, an issued code, an introspection; see `docs/decisions/0008-audit-trail.md`). A search that
/// returned several patients' data gives one AuditEvent per patient (BALP's Patient* shapes).
pub fn audit_events(event: &Event) -> Vec<AuditRecord> {
    let bodies: Vec<(Value, Option<String>)> = match &event.payload {
        Payload::ResourceCreated(w) => rest::write(event, "create", &w.resource_type, &w.id, w.version_id),
        Payload::ResourceUpdated(w) => rest::write(event, "update", &w.resource_type, &w.id, w.version_id),
        Payload::ResourceDeleted(d) => rest::write(event, "delete", &d.resource_type, &d.id, d.version_id),
        Payload::AccessRead(r) => rest::read(event, r),
        Payload::AccessSearch(s) => rest::search(event, s),
        Payload::RequestRefused(r) => rest::refused(event, r),
        _ => auth::audit(event),
    };
    let count = bodies.len();
    bodies
        .into_iter()
        .enumerate()
        .map(|(n, (body, patient))| record("AuditEvent", record_id(event, n, count), body, patient, event))
        .collect()
}

/// The id of the `n`th of an event's `count` AuditEvents: the event id, numbered when there are
/// several.
fn record_id(event: &Event, n: usize, count: usize) -> String {
    if count > 1 { format!("{}-{}", event.id, n + 1) } else { event.id.to_string() }
}

/// Where an audit record goes in the store: what its index keys need, known without rendering it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordKey {
    pub resource_type: &'static str,
    pub id: String,
    /// The patient compartment (`Patient/<id>`) the record is about, when there is one.
    pub patient: Option<String>,
    /// `recorded` (and `meta.lastUpdated`), in epoch milliseconds.
    pub recorded_ms: i64,
}

/// The records an event gives ([`audit_events`] and [`provenance`]), as their keys, without rendering
/// them for writes and FHIR accesses (the projector's hot path): a write gives one AuditEvent and one
/// Provenance named by the event id, an access one AuditEvent per patient it touched. Other events
/// are rendered.
pub fn record_keys(event: &Event) -> Vec<RecordKey> {
    let key = |resource_type, id, patient| RecordKey {
        resource_type,
        id,
        patient,
        recorded_ms: event.occurred_at.as_millis(),
    };
    let audit_events_about = |patients: Vec<Option<String>>| -> Vec<RecordKey> {
        let count = patients.len();
        patients.into_iter().enumerate().map(|(n, p)| key("AuditEvent", record_id(event, n, count), p)).collect()
    };
    match &event.payload {
        Payload::ResourceCreated(_) | Payload::ResourceUpdated(_) | Payload::ResourceDeleted(_) => vec![
            key("AuditEvent", event.id.to_string(), event.patient.clone()),
            key("Provenance", event.id.to_string(), event.patient.clone()),
        ],
        Payload::AccessRead(r) => audit_events_about(vec![rest::read_patient(event, r)]),
        Payload::AccessSearch(s) => audit_events_about(rest::search_patients(event, s)),
        Payload::RequestRefused(_) => audit_events_about(vec![event.patient.clone()]),
        _ => audit_events(event).iter().chain(provenance(event).as_ref()).map(AuditRecord::key).collect(),
    }
}

/// Whether the store keeps an event's records as its [`fact`]: writes and FHIR accesses, the
/// volume of the trail, whose events carry nothing their records leave out (a write's body aside,
/// which the fact drops). Authentication events carry hashes of passwords, client secrets, codes and
/// tokens that their records leave out, so their records are stored rendered.
pub fn stored_as_fact(event: &Event) -> bool {
    matches!(
        event.payload,
        Payload::ResourceCreated(_)
            | Payload::ResourceUpdated(_)
            | Payload::ResourceDeleted(_)
            | Payload::AccessRead(_)
            | Payload::AccessSearch(_)
            | Payload::RequestRefused(_)
    )
}

/// What the store keeps for an audit record instead of its rendered body (for the events
/// [`stored_as_fact`] names): the event the record comes
/// from, in canonical form, with a write's resource body left out (the records name the version
/// written; its body is stored once, as the resource). Every record is a pure function of its event,
/// so [`render`] gives the same record again on read. Measured: storing each write's AuditEvent and
/// Provenance whole made the projection store nine times the size of the log (docs/performance.md).
pub fn fact(event: &Event) -> Box<RawValue> {
    let without_body = |w: &cairn_events::ResourceWritten| cairn_events::ResourceWritten {
        resource_type: w.resource_type.clone(),
        id: w.id.clone(),
        version_id: w.version_id,
        resource: RawValue::NULL.to_owned(),
        provenance: w.provenance.clone(),
    };
    let payload = match &event.payload {
        Payload::ResourceCreated(w) => Some(Payload::ResourceCreated(without_body(w))),
        Payload::ResourceUpdated(w) => Some(Payload::ResourceUpdated(without_body(w))),
        _ => None,
    };
    match payload {
        Some(payload) => Event {
            id: event.id,
            schema_version: event.schema_version,
            occurred_at: event.occurred_at,
            actor: event.actor.clone(),
            request_id: event.request_id.clone(),
            patient: event.patient.clone(),
            payload,
            prev_hash: None,
            hash: None,
        }
        .canonical_raw(),
        None => event.canonical_raw(),
    }
}

/// The audit record `resource_type`/`id` rendered from its [`fact`]; `None` if the fact is not an
/// event this build reads or gives no such record.
pub fn render(resource_type: &str, id: &str, fact: &str) -> Option<Value> {
    let event = Event::from_canonical_bytes(fact.as_bytes()).ok()?;
    let records = match resource_type {
        "Provenance" => provenance(&event).into_iter().collect(),
        "AuditEvent" => audit_events(&event),
        _ => Vec::new(),
    };
    records.into_iter().find(|r| r.id == id).map(|r| r.resource)
}

/// Adds `resourceType`, `id`, `meta` and `recorded` to a body built by the shape modules.
fn record(resource_type: &'static str, id: String, body: Value, patient: Option<String>, event: &Event) -> AuditRecord {
    let recorded = event.occurred_at.to_rfc3339();
    let mut resource = serde_json::json!({
        "resourceType": resource_type,
        "id": id,
        "meta": {"versionId": "1", "lastUpdated": recorded},
        "recorded": recorded,
    });
    let fields = resource.as_object_mut().expect("an object");
    if let Value::Object(body) = body {
        fields.extend(body);
    }
    AuditRecord { resource_type, id, resource, patient, recorded_ms: event.occurred_at.as_millis() }
}

#[cfg(test)]
mod tests;
