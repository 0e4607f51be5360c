//! The resource projector as a pure function: one FHIR write event -> one stored version.
//! Time and ids come from the event, never from the moment of projection, so a replay is identical.

use cairn_events::{Event, Payload};
use cairn_fhir::index;
use cairn_store::ResourceVersion;

pub fn project(event: Event) -> Option<ResourceVersion> {
    let occurred_at = event.occurred_at;
    match event.payload {
        Payload::ResourceCreated(w) | Payload::ResourceUpdated(w) => {
            let keys = index::index_keys(&w.resource_type, &w.id, w.resource.get());
            let last_updated = keys.last_updated.unwrap_or_else(|| occurred_at.to_rfc3339());
            let last_updated_ms = last_updated
                .parse::<cairn_events::Timestamp>()
                .map(|t| t.as_millis())
                .unwrap_or(occurred_at.as_millis());
            Some(ResourceVersion {
                patient: keys.patient,
                identifiers: keys.identifiers,
                date_key: keys.date_key,
                parsed: None,
                resource_type: w.resource_type,
                id: w.id,
                version_id: w.version_id,
                last_updated,
                last_updated_ms,
                deleted: false,
                resource: Some(w.resource),
                fact: false,
            })
        }
        Payload::ResourceDeleted(d) => Some(ResourceVersion {
            resource_type: d.resource_type,
            id: d.id,
            version_id: d.version_id,
            last_updated: occurred_at.to_rfc3339(),
            last_updated_ms: occurred_at.as_millis(),
            deleted: true,
            resource: None,
            fact: false,
            patient: None,
            identifiers: Vec::new(),
            date_key: None,
            parsed: None,
        }),
        _ => None,
    }
}
