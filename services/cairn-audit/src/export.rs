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
use serde_json::value::RawValue;
use std::collections::BTreeSet;

/// The format name every slice carries.
pub const FORMAT: &str = "cairn-audit-slice-v1";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditSlice {
    pub format: String,
    /// The patient, `Patient/<id>`.
    pub patient: String,
    /// The window: records with `recorded` in `[from, to]`.
    pub from: Timestamp,
    pub to: Timestamp,
    pub exported_at: Timestamp,
    /// The AuditEvents and Provenances, by `recorded`, then type and id. Kept as JSON text: a year
    /// of one patient's readings is hundreds of thousands of records, and as `Value` trees they took
    /// several times the memory of their text.
    pub records: Vec<Box<RawValue>>,
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

/// A record as a slice holds it: its compact JSON text, and what it is sorted and named by.
pub struct SliceRecord {
    pub recorded_ms: i64,
    pub resource_type: &'static str,
    pub id: String,
    pub json: Box<RawValue>,
}

impl SliceRecord {
    fn name(&self) -> String {
        format!("{}/{}", self.resource_type, self.id)
    }
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
) -> Result<Vec<SliceRecord>, String> {
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
        // To text at once: the trees are not kept.
        for r in about {
            let json = serde_json::value::to_raw_value(&r.resource).map_err(|e| e.to_string())?;
            records.push(SliceRecord { recorded_ms: r.recorded_ms, resource_type: r.resource_type, id: r.id, json });
        }
    }
    records.sort_by(|a, b| (a.recorded_ms, a.resource_type, &a.id).cmp(&(b.recorded_ms, b.resource_type, &b.id)));
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
    let events = proven.len();
    let expected = render_proven(proven, &slice.patient, slice.from, slice.to)?;
    let mut names = BTreeSet::new();
    for (i, raw) in slice.records.iter().enumerate() {
        // One record parsed at a time, compared in the same compact form the renderer gives.
        let record: Value =
            serde_json::from_str(raw.get()).map_err(|e| format!("record {i} of the slice is not JSON: {e}"))?;
        let name =
            format!("{}/{}", record["resourceType"].as_str().unwrap_or("?"), record["id"].as_str().unwrap_or("?"));
        if !names.insert(name.clone()) {
            return Err(format!("{name} appears twice in the slice"));
        }
        let text = serde_json::to_string(&record).map_err(|e| e.to_string())?;
        match expected.get(i) {
            Some(e) if e.json.get() == text => {}
            Some(e) if e.name() == name => {
                return Err(format!("{name} differs from what its proven event gives: it was altered"));
            }
            _ => {
                return Err(if expected.iter().any(|e| e.name() == name) {
                    format!("{name} is out of order or repeated")
                } else {
                    format!("{name} is not backed by a proven event: it was added")
                });
            }
        }
    }
    if let Some(missing) = expected.get(slice.records.len()) {
        return Err(format!("{} follows from a proven event but the slice leaves it out", missing.name()));
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
