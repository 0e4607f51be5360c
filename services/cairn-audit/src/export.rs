//! Audit slices: the AuditEvents and Provenances about one patient in a time window, with the proof
//! that the log events they are built from are in the sealed log, unaltered (`cairn audit export`
//! writes one, `cairn audit verify --export` checks one on any machine, without the log).
//!
//! The proof is a set of [`cairn_log::proof::Span`]s: the events of the slice whole, the other records
//! of their stretches as digests, and the signed seals that close them. Verifying recomputes the
//! chains, checks the seals' signatures against keys the verifier trusts, then renders the proven
//! events again and requires exactly the slice's records: an edited AuditEvent, an added one, or one
//! left out of a proven event is caught. What the proof cannot show is that no event about the patient
//! was left out of the slice altogether (see `cairn_log::proof`).

use crate::{AuditRecord, audit_events, provenance};
use cairn_events::{Event, Timestamp};
use cairn_log::proof::{Proven, Span, verify_spans};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeSet;

/// The format name every slice carries.
pub const FORMAT: &str = "cairn-audit-slice-v1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditSlice {
    pub format: String,
    /// The patient, `Patient/<id>`.
    pub patient: String,
    /// The window: records with `recorded` in `[from, to]`.
    pub from: Timestamp,
    pub to: Timestamp,
    pub exported_at: Timestamp,
    /// The AuditEvents and Provenances, by `recorded`, then type and id.
    pub records: Vec<Value>,
    /// The log records they are built from, proven against the signed seals.
    pub proof: Vec<Span>,
}

/// The AuditEvents and the Provenance `event` gives about `patient` (`Patient/<id>`) in the window.
pub fn records_about(event: &Event, patient: &str, from: Timestamp, to: Timestamp) -> Vec<AuditRecord> {
    let window = from.as_millis()..=to.as_millis();
    audit_events(event)
        .into_iter()
        .chain(provenance(event))
        .filter(|r| r.patient.as_deref() == Some(patient) && window.contains(&r.recorded_ms))
        .collect()
}

/// Sorts records the way a slice holds them.
pub fn sort_records(records: &mut [AuditRecord]) {
    records.sort_by(|a, b| (a.recorded_ms, a.resource_type, &a.id).cmp(&(b.recorded_ms, b.resource_type, &b.id)));
}

/// The records a slice holds for its proven events, sorted: what `cairn audit export` writes and what
/// [`verify_slice`] requires. Each event is consumed as it is rendered (a long slice's event bytes are
/// not held beside its records); an event that is not a Cairn event, or gives no record about
/// `patient` in the window, is an error.
pub fn render_proven(
    proven: Vec<Proven>,
    patient: &str,
    from: Timestamp,
    to: Timestamp,
) -> Result<Vec<AuditRecord>, String> {
    let mut records = Vec::new();
    for r in proven {
        let event = Event::from_canonical_bytes(&r.value)
            .map_err(|e| format!("{}/{} offset {}: not a Cairn event: {e}", r.topic, r.partition, r.offset))?;
        let about = records_about(&event, patient, from, to);
        if about.is_empty() {
            return Err(format!(
                "{}/{} offset {}: the event gives no record about {patient} in the window: the slice holds an event \
                 it should not",
                r.topic, r.partition, r.offset
            ));
        }
        records.extend(about);
    }
    sort_records(&mut records);
    Ok(records)
}

/// What a verified slice holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SliceReport {
    pub patient: String,
    pub from: Timestamp,
    pub to: Timestamp,
    /// Log events proven.
    pub events: usize,
    pub audit_events: usize,
    pub provenances: usize,
    /// Distinct seals the proof rests on.
    pub seals: usize,
    /// Whether the seals' signatures were checked (keys were given).
    pub signatures_checked: bool,
    /// The ids of the keys that signed those seals.
    pub seal_key_ids: Vec<String>,
}

/// Verifies a slice against seal keys the verifier trusts (with none, the signatures are not checked
/// and the report says so). The error names the first thing that is wrong.
pub fn verify_slice(slice: &AuditSlice, keys: &[ed25519_dalek::VerifyingKey]) -> Result<SliceReport, String> {
    if slice.format != FORMAT {
        return Err(format!("not an audit slice of format {FORMAT} (it says `{}`)", slice.format));
    }
    let proven = verify_spans(&slice.proof, keys)?;
    let mut names = BTreeSet::new();
    for r in &slice.records {
        let name = (r["resourceType"].as_str().unwrap_or("?"), r["id"].as_str().unwrap_or("?"));
        if !names.insert(name) {
            return Err(format!("{}/{} appears twice in the slice", name.0, name.1));
        }
    }
    let events = proven.len();
    let expected = render_proven(proven, &slice.patient, slice.from, slice.to)?;
    let name = |r: &Value| format!("{}/{}", r["resourceType"].as_str().unwrap_or("?"), r["id"].as_str().unwrap_or("?"));
    for (i, record) in slice.records.iter().enumerate() {
        match expected.get(i) {
            Some(e) if e.resource == *record => {}
            Some(e) if name(&e.resource) == name(record) => {
                return Err(format!("{} differs from what its proven event gives: it was altered", name(record)));
            }
            _ => {
                let proven_names: BTreeSet<String> = expected.iter().map(|e| name(&e.resource)).collect();
                return Err(if proven_names.contains(&name(record)) {
                    format!("{} is out of order or repeated", name(record))
                } else {
                    format!("{} is not backed by a proven event: it was added", name(record))
                });
            }
        }
    }
    if let Some(missing) = expected.get(slice.records.len()) {
        return Err(format!("{} follows from a proven event but the slice leaves it out", name(&missing.resource)));
    }
    let seals: BTreeSet<(&str, u32, u64)> = slice
        .proof
        .iter()
        .flat_map(|s| s.after.iter().chain(std::iter::once(&s.until)))
        .map(|s| (s.topic.as_str(), s.partition, s.records))
        .collect();
    Ok(SliceReport {
        patient: slice.patient.clone(),
        from: slice.from,
        to: slice.to,
        events,
        audit_events: expected.iter().filter(|r| r.resource_type == "AuditEvent").count(),
        provenances: expected.iter().filter(|r| r.resource_type == "Provenance").count(),
        seals: seals.len(),
        signatures_checked: !keys.is_empty(),
        seal_key_ids: slice
            .proof
            .iter()
            .flat_map(|s| s.after.iter().chain(std::iter::once(&s.until)))
            .filter_map(|s| s.key_id.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    })
}
