//! The audit projection: AuditEvents (and, for writes, a Provenance) as stored versions. The shapes
//! are `cairn_audit`'s; this adds the index keys: the patient compartment, and for AuditEvents the
//! date-index key (`recorded`), so "who accessed patient X between T1 and T2" reads one patient's
//! records in one time window.

use cairn_audit::AuditRecord;
use cairn_events::Event;
use cairn_store::ResourceVersion;

pub fn project(event: &Event) -> Vec<ResourceVersion> {
    let mut records = cairn_audit::audit_events(event);
    records.extend(cairn_audit::provenance(event));
    records.into_iter().map(version).collect()
}

fn version(r: AuditRecord) -> ResourceVersion {
    let last_updated = r.resource["meta"]["lastUpdated"].as_str().unwrap_or_default().to_owned();
    let date_key = (r.resource_type == "AuditEvent").then_some(r.recorded_ms);
    ResourceVersion {
        resource_type: r.resource_type.to_owned(),
        id: r.id,
        version_id: 1,
        last_updated,
        last_updated_ms: r.recorded_ms,
        deleted: false,
        resource: Some(serde_json::value::to_raw_value(&r.resource).expect("JSON values serialize")),
        patient: r.patient,
        identifiers: Vec::new(),
        date_key,
    }
}
