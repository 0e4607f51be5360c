//! What a projector spends per event, before the store: turning a write event into its resource
//! version, and into its AuditEvent and Provenance (the audit trail's share), and an access event
//! (a search that returned 50 readings) into its AuditEvent; and on the reading side, what rendering a
//! stored audit record from its fact costs. Figures: docs/performance.md.

use cairn_events::{EventType, Payload, VersionedRef, sample_event};
use criterion::{Criterion, criterion_group, criterion_main};

fn projection(c: &mut Criterion) {
    let write = sample_event(EventType::FhirResourceCreated);
    let bytes = write.canonical_bytes();
    c.bench_function("decode_write_event", |b| {
        b.iter(|| cairn_events::Event::from_canonical_bytes(&bytes).expect("a canonical event"))
    });
    c.bench_function("project_write/resource", |b| b.iter(|| cairn_projector::resources::project(write.clone())));
    c.bench_function("project_write/audit_event_and_provenance", |b| {
        b.iter(|| cairn_projector::audit::project(&write))
    });
    let mut search = sample_event(EventType::FhirAccessSearch);
    if let Payload::AccessSearch(s) = &mut search.payload {
        s.returned = (0..50)
            .map(|i| VersionedRef {
                resource_type: "Observation".into(),
                id: format!("01a2242f-2af1-71a2-96cd-{i:012}"),
                version_id: 1,
                patient: Some("Patient/p-1".into()),
            })
            .collect();
    }
    c.bench_function("project_search_of_50/audit_event", |b| b.iter(|| cairn_projector::audit::project(&search)));
    let fact = cairn_audit::fact(&write);
    let id = write.id.to_string();
    c.bench_function("read_write_audit_event/render_from_fact", |b| {
        b.iter(|| cairn_audit::render("AuditEvent", &id, fact.get()).expect("renders"))
    });
}

criterion_group!(benches, projection);
criterion_main!(benches);
