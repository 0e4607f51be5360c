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
    let many = bodies.len() > 1;
    bodies
        .into_iter()
        .enumerate()
        .map(|(n, (body, patient))| {
            let id = if many { format!("{}-{}", event.id, n + 1) } else { event.id.to_string() };
            record("AuditEvent", id, body, patient, event)
        })
        .collect()
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
