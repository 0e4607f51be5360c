//! In-memory matching of resources against parsed searches.
//!
//! Matching is defined per (resource type, parameter) by the element paths R4 gives each search
//! parameter, and is deliberately total: a resource that lacks the element, holds a malformed value
//! there, or a hand-built parameter this module cannot evaluate simply does not match (except under
//! `:not`, which R4 defines to include resources without the element). It never panics, because it
//! runs over whatever the event store replays.

use super::date::{self, NEG_INF, POS_INF};
use super::number::{self, Decimal};
use super::text::fold;
use super::{DateRange, ParamKind, SearchParam, SearchQuery, SearchValue, date_range, param_kind};
use chrono::{DateTime, Utc};
use serde_json::Value;

/// `code`-typed elements carry their code system implicitly; R4 lets a token search name it, so
/// `status=http://hl7.org/fhir/observation-status|final` must match `"status": "final"`.
const OBSERVATION_STATUS: &str = "http://hl7.org/fhir/observation-status";
const DEVICE_STATUS: &str = "http://hl7.org/fhir/device-status";
const ADMINISTRATIVE_GENDER: &str = "http://hl7.org/fhir/administrative-gender";
const AUDIT_EVENT_ACTION: &str = "http://hl7.org/fhir/audit-event-action";
const AUDIT_EVENT_OUTCOME: &str = "http://hl7.org/fhir/audit-event-outcome";

fn str_at<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key)?.as_str()
}

fn array<'a>(value: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    value.get(key).and_then(Value::as_array).into_iter().flatten()
}

/// The type and id a reference names: `Type/id`, a bare `id`, or an absolute URL ending in
/// `Type/id`, with any `/_history/vid` dropped because a version-specific reference still points
/// at the same resource. Shared by the parser and the matcher so that both sides of a comparison
/// are normalised the same way. `urn:` and `#contained` references name nothing searchable.
pub(super) fn reference_parts(text: &str) -> Option<(Option<&str>, &str)> {
    let (absolute, path) = match text.find("://") {
        Some(at) => (true, &text[at + 3..]),
        None => (false, text),
    };
    let mut segments: Vec<&str> = path.split('/').collect();
    if segments.len() >= 4 && segments[segments.len() - 2] == "_history" {
        segments.truncate(segments.len() - 2);
    }
    let valid_type =
        |t: &str| t.starts_with(|c: char| c.is_ascii_uppercase()) && t.chars().all(|c| c.is_ascii_alphanumeric());
    let valid_id = |id: &str| {
        (1..=64).contains(&id.len()) && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    };
    match segments.as_slice() {
        [id] if !absolute && valid_id(id) => Some((None, id)),
        [ty, id] if !absolute && valid_type(ty) && valid_id(id) => Some((Some(ty), id)),
        [_host, .., ty, id] if absolute && valid_type(ty) && valid_id(id) => Some((Some(ty), id)),
        _ => None,
    }
}

/// A Reference element's target; `Reference.type` fills in the type when the reference is a bare
/// id, which some devices send.
fn reference_target(reference: &Value) -> Option<(Option<&str>, &str)> {
    let (ty, id) = reference_parts(str_at(reference, "reference")?)?;
    Some((ty.or_else(|| str_at(reference, "type")), id))
}

/// (system, code) pairs: a Coding, an Identifier (system, value), or a code with its implicit system.
type Coding<'a> = (Option<&'a str>, Option<&'a str>);

fn push_codings<'a>(concept: &'a Value, out: &mut Vec<Coding<'a>>) {
    out.extend(array(concept, "coding").map(|c| (str_at(c, "system"), str_at(c, "code"))));
}

fn token_targets<'a>(resource_type: &str, name: &str, resource: &'a Value) -> Vec<Coding<'a>> {
    let mut out = Vec::new();
    let mut code = |system: Option<&'a str>, key: &str| {
        if let Some(code) = str_at(resource, key) {
            out.push((system, Some(code)));
        }
    };
    match (resource_type, name) {
        (_, "_id") => code(None, "id"),
        ("Observation", "status") => code(Some(OBSERVATION_STATUS), "status"),
        ("Device", "status") => code(Some(DEVICE_STATUS), "status"),
        ("Patient", "gender") => code(Some(ADMINISTRATIVE_GENDER), "gender"),
        (_, "identifier") => {
            out.extend(array(resource, "identifier").map(|i| (str_at(i, "system"), str_at(i, "value"))));
        }
        ("Observation", "code") | ("Device", "type") => {
            if let Some(concept) = resource.get(name) {
                push_codings(concept, &mut out);
            }
        }
        ("Observation", "category") => array(resource, "category").for_each(|c| push_codings(c, &mut out)),
        ("AuditEvent", "action") => code(Some(AUDIT_EVENT_ACTION), "action"),
        ("AuditEvent", "outcome") => code(Some(AUDIT_EVENT_OUTCOME), "outcome"),
        ("AuditEvent", "type") => out.extend(resource.get("type").map(coding)),
        ("AuditEvent", "subtype") => out.extend(array(resource, "subtype").map(coding)),
        ("AuditEvent", "site") => {
            out.extend(resource.get("source").and_then(|s| str_at(s, "site")).map(|v| (None, Some(v))))
        }
        ("AuditEvent", "altid") => {
            out.extend(array(resource, "agent").filter_map(|a| str_at(a, "altId")).map(|v| (None, Some(v))))
        }
        ("AuditEvent", "agent-role") | ("Provenance", "agent-role") => {
            array(resource, "agent").flat_map(|a| array(a, "role")).for_each(|c| push_codings(c, &mut out))
        }
        ("AuditEvent", "entity-role") => {
            out.extend(array(resource, "entity").filter_map(|e| e.get("role")).map(coding))
        }
        ("AuditEvent", "entity-type") => {
            out.extend(array(resource, "entity").filter_map(|e| e.get("type")).map(coding))
        }
        ("Provenance", "agent-type") => {
            array(resource, "agent").filter_map(|a| a.get("type")).for_each(|c| push_codings(c, &mut out))
        }
        ("Provenance", "signature-type") => {
            out.extend(array(resource, "signature").flat_map(|s| array(s, "type")).map(coding))
        }
        _ => {}
    }
    out
}

/// A Coding's (system, code).
fn coding(c: &Value) -> Coding<'_> {
    (str_at(c, "system"), str_at(c, "code"))
}

/// `system: Some("")` is the parser's encoding of `|code`: the coding must have no system.
fn token_matches(system: Option<&str>, code: Option<&str>, (target_system, target_code): Coding) -> bool {
    let system_ok = match system {
        None => true,
        Some("") => target_system.is_none(),
        Some(s) => target_system == Some(s),
    };
    let code_ok = match code {
        None => system.is_some(), // `system|`; a value with neither matches nothing
        Some(c) => target_code == Some(c),
    };
    system_ok && code_ok
}

fn reference_targets<'a>(resource_type: &str, name: &str, resource: &'a Value) -> Vec<(Option<&'a str>, &'a str)> {
    let targets = |refs: Vec<&'a Value>| refs.into_iter().filter_map(reference_target).collect::<Vec<_>>();
    let patients =
        |refs: Vec<(Option<&'a str>, &'a str)>| refs.into_iter().filter(|(t, _)| *t == Some("Patient")).collect();
    let agents = || array(resource, "agent").filter_map(|a| a.get("who")).collect::<Vec<_>>();
    let entities = || array(resource, "entity").filter_map(|e| e.get("what")).collect::<Vec<_>>();
    match (resource_type, name) {
        ("AuditEvent" | "Provenance", "agent") => return targets(agents()),
        ("AuditEvent" | "Provenance", "entity") => return targets(entities()),
        // R4: an agent or an entity that is a Patient.
        ("AuditEvent", "patient") => return patients(targets(agents().into_iter().chain(entities()).collect())),
        ("AuditEvent", "source") => {
            return targets(resource.get("source").and_then(|s| s.get("observer")).into_iter().collect());
        }
        ("Provenance", "target") => return targets(array(resource, "target").collect()),
        // R4: a target that is a Patient.
        ("Provenance", "patient") => return patients(targets(array(resource, "target").collect())),
        ("Provenance", "location") => return targets(resource.get("location").into_iter().collect()),
        _ => {}
    }
    let element = match (resource_type, name) {
        ("Observation", "patient" | "subject") => "subject",
        ("Observation", "device") => "device",
        ("Device", "patient") => "patient",
        _ => return Vec::new(),
    };
    let target = resource.get(element).and_then(reference_target);
    // `patient` is `subject` restricted to Patients: a Group with the same id must not match.
    let patient_only = name == "patient";
    target.filter(|(ty, _)| !patient_only || *ty == Some("Patient")).into_iter().collect()
}

/// The range an Observation's `effective[x]` covers. A Period's open end means "still ongoing"
/// and a missing start "since some unknown time", so they extend to ±infinity rather than being
/// ignored; a Period with neither bound says nothing and matches nothing.
fn effective_range(observation: &Value) -> Option<DateRange> {
    if let Some(text) = str_at(observation, "effectiveDateTime").or_else(|| str_at(observation, "effectiveInstant")) {
        return date_range(text);
    }
    let period = observation.get("effectivePeriod")?;
    let low = match period.get("start") {
        None => NEG_INF,
        Some(start) => date_range(start.as_str()?)?.low,
    };
    let high = match period.get("end") {
        None => POS_INF,
        Some(end) => date_range(end.as_str()?)?.high,
    };
    (low < high && (low, high) != (NEG_INF, POS_INF)).then_some(DateRange { low, high })
}

/// The range an Observation's `effective[x]` covers (Periods may be open-ended), for indexing.
pub fn observation_effective(observation: &Value) -> Option<DateRange> {
    effective_range(observation)
}

fn last_updated(resource: &Value) -> Option<DateRange> {
    date_range(str_at(resource.get("meta")?, "lastUpdated")?)
}

fn date_targets(resource_type: &str, name: &str, resource: &Value) -> Option<DateRange> {
    match (resource_type, name) {
        (_, "_lastUpdated") => last_updated(resource),
        ("Observation", "date") => effective_range(resource),
        ("Patient", "birthdate") => date_range(str_at(resource, "birthDate")?),
        ("AuditEvent", "date") | ("Provenance", "recorded") => date_range(str_at(resource, "recorded")?),
        ("Provenance", "when") => match str_at(resource, "occurredDateTime") {
            Some(t) => date_range(t),
            None => {
                let period = resource.get("occurredPeriod")?;
                let low = period.get("start").and_then(Value::as_str).and_then(date_range).map_or(NEG_INF, |r| r.low);
                let high = period.get("end").and_then(Value::as_str).and_then(date_range).map_or(POS_INF, |r| r.high);
                (low < high).then_some(DateRange { low, high })
            }
        },
        _ => None,
    }
}

/// (value, system, code-or-unit). The unit stands in for a missing code because many glucose
/// meters send only `"unit": "mg/dL"`, and R4 says a quantity search's code matches either.
fn quantity_target<'a>(
    resource_type: &str,
    name: &str,
    resource: &'a Value,
) -> Option<(f64, Option<&'a str>, Option<&'a str>)> {
    if (resource_type, name) != ("Observation", "value-quantity") {
        return None;
    }
    let q = resource.get("valueQuantity")?;
    Some((q.get("value")?.as_f64()?, str_at(q, "system"), str_at(q, "code").or_else(|| str_at(q, "unit"))))
}

fn string_targets<'a>(resource_type: &str, name: &str, resource: &'a Value) -> Vec<&'a str> {
    match (resource_type, name) {
        ("AuditEvent", "address") => {
            return array(resource, "agent")
                .filter_map(|a| a.get("network"))
                .filter_map(|n| str_at(n, "address"))
                .collect();
        }
        ("AuditEvent", "agent-name") => return array(resource, "agent").filter_map(|a| str_at(a, "name")).collect(),
        ("AuditEvent", "entity-name") => return array(resource, "entity").filter_map(|e| str_at(e, "name")).collect(),
        ("Patient", _) => {}
        _ => return Vec::new(),
    }
    let mut out = Vec::new();
    for human_name in array(resource, "name") {
        if matches!(name, "name" | "family") {
            out.extend(str_at(human_name, "family"));
        }
        if matches!(name, "name" | "given") {
            out.extend(array(human_name, "given").filter_map(Value::as_str));
        }
        if name == "name" {
            out.extend(str_at(human_name, "text"));
        }
    }
    out
}

/// Whether a resource matches one parameter (any of its values). Uses the current time, which
/// only the `ap` date prefix depends on.
pub fn matches_param(resource: &Value, param: &SearchParam) -> bool {
    matches_param_at(resource, param, Utc::now())
}

/// [`matches_param`] with an explicit "now", so that `ap` results are reproducible (in tests, and
/// across the pages of one search).
pub fn matches_param_at(resource: &Value, param: &SearchParam, now: DateTime<Utc>) -> bool {
    let Some(resource_type) = str_at(resource, "resourceType") else {
        return false;
    };
    let Some(kind) = param_kind(resource_type, &param.name) else {
        return false;
    };
    let modifier = param.modifier.as_deref();
    if modifier.is_some_and(|m| !kind.modifiers().contains(&m)) {
        return false;
    }
    let name = param.name.as_str();
    match kind {
        ParamKind::Token => {
            let targets = token_targets(resource_type, name, resource);
            let any = param.values.iter().any(|v| match v {
                SearchValue::Token { system, code } => {
                    targets.iter().any(|t| token_matches(system.as_deref(), code.as_deref(), *t))
                }
                _ => false,
            });
            if modifier == Some("not") { !any } else { any }
        }
        ParamKind::Reference => {
            let targets = reference_targets(resource_type, name, resource);
            param.values.iter().any(|v| match v {
                SearchValue::Reference { resource_type: ty, id } => targets.iter().any(|(target_ty, target_id)| {
                    target_id == id && ty.as_deref().is_none_or(|ty| *target_ty == Some(ty))
                }),
                _ => false,
            })
        }
        ParamKind::Date => {
            let Some(target) = date_targets(resource_type, name, resource) else {
                return false;
            };
            param.values.iter().any(|v| match v {
                SearchValue::Date { prefix, value } => date::compare(*prefix, value, &target, now),
                _ => false,
            })
        }
        ParamKind::Quantity => {
            let Some((target, target_system, target_code)) = quantity_target(resource_type, name, resource) else {
                return false;
            };
            param.values.iter().any(|v| match v {
                SearchValue::Quantity { prefix, value, precision_low, precision_high, system, code } => {
                    let search = Decimal { value: *value, low: *precision_low, high: *precision_high };
                    number::compare(*prefix, &search, target)
                        && system.as_deref().is_none_or(|s| target_system == Some(s))
                        && code.as_deref().is_none_or(|c| target_code == Some(c))
                }
                _ => false,
            })
        }
        ParamKind::Uri => {
            let targets: Vec<&str> = match (resource_type, name) {
                ("AuditEvent", "policy") => {
                    array(resource, "agent").flat_map(|a| array(a, "policy")).filter_map(Value::as_str).collect()
                }
                _ => Vec::new(),
            };
            param.values.iter().any(|v| matches!(v, SearchValue::Uri(u) if targets.contains(&u.as_str())))
        }
        ParamKind::String => {
            let exact = modifier == Some("exact");
            let targets = string_targets(resource_type, name, resource);
            param.values.iter().any(|v| match v {
                SearchValue::String(s) if exact => targets.iter().any(|t| t == s),
                SearchValue::String(s) => {
                    let wanted = fold(s);
                    targets.iter().any(|t| fold(t).starts_with(&wanted))
                }
                _ => false,
            })
        }
    }
}

/// Whether a resource matches all params. A resource of another type never matches, so callers
/// may scan a mixed stream.
pub fn matches(resource: &Value, query: &SearchQuery) -> bool {
    matches_at(resource, query, Utc::now())
}

/// [`matches`] with an explicit "now" (see [`matches_param_at`]).
pub fn matches_at(resource: &Value, query: &SearchQuery, now: DateTime<Utc>) -> bool {
    str_at(resource, "resourceType") == Some(query.resource_type.as_str())
        && query.params.iter().all(|p| matches_param_at(resource, p, now))
}

/// The sort value of a resource for a sort key: Observation `date` is the start of
/// `effective[x]`, `_lastUpdated` is `meta.lastUpdated`. A Period without a start has no
/// meaningful position, so it yields `None` (leaving the caller to decide where such resources
/// go) rather than pretending it is the far past.
pub fn sort_value(resource: &Value, param: &str) -> Option<DateTime<Utc>> {
    let low = match param {
        "date" if str_at(resource, "resourceType") == Some("Observation") => effective_range(resource)?.low,
        "date" if str_at(resource, "resourceType") == Some("AuditEvent") => {
            date_range(str_at(resource, "recorded")?)?.low
        }
        "_lastUpdated" => last_updated(resource)?.low,
        _ => return None,
    };
    (low != NEG_INF).then_some(low)
}

/// The patient an Observation is about, as `Patient/id`, whatever form the subject reference was
/// written in; paging keys and per-patient indexes need one spelling per patient.
pub fn observation_patient(resource: &Value) -> Option<String> {
    match reference_target(resource.get("subject")?)? {
        (Some("Patient"), id) => Some(format!("Patient/{id}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::{Prefix, parse_query};
    use serde_json::json;

    const LOINC: &str = "http://loinc.org";
    const UCUM: &str = "http://unitsofmeasure.org";
    const CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
    const LAB_IDS: &str = "urn:oid:2.16.840.1.113883.19.5.99";

    fn now() -> DateTime<Utc> {
        "2026-03-10T00:00:00Z".parse().expect("fixed now")
    }

    fn category(code: &str) -> Value {
        json!({ "coding": [{ "system": CATEGORY, "code": code }] })
    }

    fn loinc(code: &str, display: &str) -> Value {
        json!({ "coding": [{ "system": LOINC, "code": code, "display": display }] })
    }

    /// Venous glucose from the lab, in mg/dL, with a zoned effectiveDateTime (06:30Z).
    fn glu1() -> Value {
        json!({
            "resourceType": "Observation",
            "id": "glu-1",
            "meta": { "versionId": "1", "lastUpdated": "2026-03-04T06:31:12.345Z" },
            "identifier": [{ "system": LAB_IDS, "value": "LAB-0001" }],
            "status": "final",
            "category": [category("laboratory")],
            "code": loinc("2339-0", "Glucose [Mass/volume] in Blood"),
            "subject": { "reference": "Patient/pat-1" },
            "effectiveDateTime": "2026-03-04T07:30:00+01:00",
            "valueQuantity": { "value": 97, "unit": "mg/dL", "system": UCUM, "code": "mg/dL" },
            "device": { "reference": "Device/cgm-1" }
        })
    }

    /// A CGM reading in mmol/L: effectiveInstant, and an absolute subject reference.
    fn glu2() -> Value {
        json!({
            "resourceType": "Observation",
            "id": "glu-2",
            "meta": { "versionId": "3", "lastUpdated": "2026-03-04T12:00:05.000Z" },
            "identifier": [{ "system": "https://cgm.example.com/readings", "value": "R-42" }],
            "status": "preliminary",
            "category": [category("vital-signs")],
            "code": loinc("15074-8", "Glucose [Moles/volume] in Blood"),
            "subject": { "reference": "https://fhir.example.org/fhir/Patient/pat-1" },
            "effectiveInstant": "2026-03-04T12:00:00.000Z",
            "valueQuantity": { "value": 5.4, "unit": "mmol/L", "system": UCUM, "code": "mmol/L" },
            "device": { "reference": "Device/cgm-1" }
        })
    }

    /// A two-day average over a closed Period (end at day precision), with a system-less local code,
    /// only a unit, and a Group subject that happens to share a patient's id.
    fn glu3() -> Value {
        json!({
            "resourceType": "Observation",
            "id": "glu-3",
            "meta": { "lastUpdated": "2026-03-03T09:00:00Z" },
            "status": "final",
            "category": [category("laboratory"), category("vital-signs")],
            "code": { "coding": [
                { "system": LOINC, "code": "15074-8" },
                { "code": "GLU-AVG" }
            ] },
            "subject": { "reference": "Group/pat-1" },
            "effectivePeriod": { "start": "2026-03-01T00:00:00Z", "end": "2026-03-02" },
            "valueQuantity": { "value": 7.8, "unit": "mmol/L" }
        })
    }

    /// An ongoing monitoring period (no end).
    fn glu4() -> Value {
        json!({
            "resourceType": "Observation",
            "id": "glu-4",
            "meta": { "lastUpdated": "2026-03-05T08:00:00Z" },
            "status": "amended",
            "category": [category("laboratory")],
            "code": loinc("2339-0", "Glucose [Mass/volume] in Blood"),
            "subject": { "reference": "Patient/pat-2" },
            "effectivePeriod": { "start": "2026-03-05T08:00:00Z" },
            "valueQuantity": { "value": 180, "unit": "mg/dL", "system": UCUM, "code": "mg/dL" }
        })
    }

    /// A period with no start; subject as a bare id plus Reference.type.
    fn glu5() -> Value {
        json!({
            "resourceType": "Observation",
            "id": "glu-5",
            "meta": { "lastUpdated": "2026-03-01T00:00:00Z" },
            "status": "final",
            "category": [category("vital-signs")],
            "code": loinc("15074-8", "Glucose [Moles/volume] in Blood"),
            "subject": { "reference": "pat-2", "type": "Patient" },
            "effectivePeriod": { "end": "2026-02-28T23:59:59Z" },
            "valueQuantity": { "value": 5.44, "unit": "mmol/L", "system": UCUM, "code": "mmol/L" }
        })
    }

    fn pat1() -> Value {
        json!({
            "resourceType": "Patient",
            "id": "pat-1",
            "meta": { "lastUpdated": "2026-01-15T10:00:00Z" },
            "identifier": [{ "system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-12345" }],
            "name": [
                { "use": "official", "family": "Müller", "given": ["Zoë", "Anne"] },
                { "use": "usual", "text": "Zoe Mueller" }
            ],
            "gender": "female",
            "birthDate": "1980-05"
        })
    }

    fn pat2() -> Value {
        json!({
            "resourceType": "Patient",
            "id": "pat-2",
            "meta": { "lastUpdated": "2026-02-01T10:00:00Z" },
            "identifier": [{ "system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-67890" }],
            "name": [{ "family": "O'Brien", "given": ["Seán"] }],
            "gender": "male",
            "birthDate": "1975-12-31"
        })
    }

    fn cgm1() -> Value {
        json!({
            "resourceType": "Device",
            "id": "cgm-1",
            "meta": { "lastUpdated": "2026-02-20T08:00:00Z" },
            "identifier": [{ "system": "https://cgm.example.com/serial", "value": "SN-0001" }],
            "status": "active",
            "type": { "coding": [{ "system": "http://snomed.info/sct", "code": "337414009", "display": "Blood glucose meter" }] },
            "patient": { "reference": "Patient/pat-1" }
        })
    }

    fn cgm2() -> Value {
        json!({
            "resourceType": "Device",
            "id": "cgm-2",
            "meta": { "lastUpdated": "2026-02-21T08:00:00Z" },
            "identifier": [{ "system": "https://cgm.example.com/serial", "value": "SN-0002" }],
            "status": "inactive",
            "type": { "coding": [{ "code": "CGM" }] },
            "patient": { "reference": "http://other.example.org/fhir/Patient/pat-2/_history/7" }
        })
    }

    fn all() -> Vec<Value> {
        vec![glu1(), glu2(), glu3(), glu4(), glu5(), pat1(), pat2(), cgm1(), cgm2()]
    }

    /// Ids of the fixtures that a query string matches.
    fn ids(resource_type: &str, query: &str) -> Vec<String> {
        let (q, ignored) = parse_query(resource_type, query, false).unwrap_or_else(|e| panic!("{query}: {e}"));
        assert!(ignored.is_empty());
        all()
            .iter()
            .filter(|r| matches_at(r, &q, now()))
            .map(|r| r["id"].as_str().expect("fixture id").to_string())
            .collect()
    }

    fn obs(query: &str) -> Vec<String> {
        ids("Observation", query)
    }

    #[test]
    fn id_and_last_updated() {
        assert_eq!(obs("_id=glu-1,glu-3"), ["glu-1", "glu-3"]);
        assert_eq!(obs("_id:not=glu-1"), ["glu-2", "glu-3", "glu-4", "glu-5"]);
        assert_eq!(ids("Patient", "_id=pat-2"), ["pat-2"]);
        assert_eq!(ids("Device", "_id=pat-2"), Vec::<String>::new());
        assert_eq!(obs("_lastUpdated=2026-03-04"), ["glu-1", "glu-2"]);
        // The search instant equals glu-1's to the millisecond: eq and ge include it, gt does not.
        assert_eq!(obs("_lastUpdated=2026-03-04T06:31:12.345Z"), ["glu-1"]);
        assert_eq!(obs("_lastUpdated=gt2026-03-04T06:31:12.345Z"), ["glu-2", "glu-4"]);
        assert_eq!(obs("_lastUpdated=ge2026-03-04T06:31:12.345Z"), ["glu-1", "glu-2", "glu-4"]);
        assert_eq!(obs("_lastUpdated=lt2026-03-02"), ["glu-5"]);
        assert_eq!(ids("Device", "_lastUpdated=2026-02"), ["cgm-1", "cgm-2"]);
    }

    #[test]
    fn patient_and_subject_references() {
        assert_eq!(obs("patient=pat-1"), ["glu-1", "glu-2"]);
        assert_eq!(obs("patient=Patient/pat-2"), ["glu-4", "glu-5"]);
        assert_eq!(obs("patient=https://elsewhere.example/fhir/Patient/pat-1"), ["glu-1", "glu-2"]);
        assert_eq!(obs("patient=pat-1,pat-2"), ["glu-1", "glu-2", "glu-4", "glu-5"]);
        // A bare subject id matches any type; a typed one only that type.
        assert_eq!(obs("subject=pat-1"), ["glu-1", "glu-2", "glu-3"]);
        assert_eq!(obs("subject=Group/pat-1"), ["glu-3"]);
        assert_eq!(obs("subject=Patient/pat-1"), ["glu-1", "glu-2"]);
        assert_eq!(obs("subject=pat-3"), Vec::<String>::new());
        // Even a hand-built `patient` value without a type only looks at Patient subjects.
        let untyped = SearchParam {
            name: "patient".into(),
            modifier: None,
            values: vec![SearchValue::Reference { resource_type: None, id: "pat-1".into() }],
        };
        assert!(matches_param_at(&glu1(), &untyped, now()));
        assert!(!matches_param_at(&glu3(), &untyped, now()));
    }

    #[test]
    fn device_reference() {
        assert_eq!(obs("device=Device/cgm-1"), ["glu-1", "glu-2"]);
        assert_eq!(obs("device=cgm-1"), ["glu-1", "glu-2"]);
        assert_eq!(obs("device=DeviceMetric/cgm-1"), Vec::<String>::new());
        assert_eq!(obs("device=cgm-2"), Vec::<String>::new());
    }

    #[test]
    fn code_token_forms() {
        assert_eq!(obs("code=http://loinc.org|15074-8"), ["glu-2", "glu-3", "glu-5"]);
        assert_eq!(obs("code=2339-0"), ["glu-1", "glu-4"]);
        assert_eq!(obs("code=http://loinc.org|"), ["glu-1", "glu-2", "glu-3", "glu-4", "glu-5"]);
        assert_eq!(obs("code=http://snomed.info/sct|2339-0"), Vec::<String>::new());
        // `|code` wants a coding without a system; glu-3's local code has none, LOINC codes do.
        assert_eq!(obs("code=|GLU-AVG"), ["glu-3"]);
        assert_eq!(obs("code=GLU-AVG"), ["glu-3"]);
        assert_eq!(obs("code=|15074-8"), Vec::<String>::new());
        assert_eq!(obs("code=2339-0,http://loinc.org|15074-8"), ["glu-1", "glu-2", "glu-3", "glu-4", "glu-5"]);
        // Codes are case-sensitive.
        assert_eq!(obs("code=glu-avg"), Vec::<String>::new());
    }

    #[test]
    fn token_not_modifier() {
        assert_eq!(obs("code:not=2339-0"), ["glu-2", "glu-3", "glu-5"]);
        // :not over OR values excludes resources matching any of them.
        assert_eq!(obs("code:not=2339-0,GLU-AVG"), ["glu-2", "glu-5"]);
        assert_eq!(obs("status:not=final"), ["glu-2", "glu-4"]);
        // Resources without the element match :not (R4).
        assert_eq!(obs("identifier:not=R-42"), ["glu-1", "glu-3", "glu-4", "glu-5"]);
    }

    #[test]
    fn category_token() {
        assert_eq!(obs("category=vital-signs"), ["glu-2", "glu-3", "glu-5"]);
        assert_eq!(
            obs("category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory"),
            ["glu-1", "glu-3", "glu-4"]
        );
        assert_eq!(obs("category=laboratory&category=vital-signs"), ["glu-3"]);
        assert_eq!(obs("category=http://loinc.org|laboratory"), Vec::<String>::new());
    }

    #[test]
    fn identifier_token() {
        assert_eq!(obs("identifier=urn:oid:2.16.840.1.113883.19.5.99|LAB-0001"), ["glu-1"]);
        assert_eq!(obs("identifier=R-42"), ["glu-2"]);
        assert_eq!(obs("identifier=https://cgm.example.com/readings|"), ["glu-2"]);
        assert_eq!(obs("identifier=https://cgm.example.com/readings|LAB-0001"), Vec::<String>::new());
        assert_eq!(obs("identifier=|R-42"), Vec::<String>::new());
        assert_eq!(ids("Patient", "identifier=urn:oid:1.2.36.146.595.217.0.1|MRN-67890"), ["pat-2"]);
        assert_eq!(ids("Patient", "identifier=urn:oid:1.2.36.146.595.217.0.1|"), ["pat-1", "pat-2"]);
        assert_eq!(ids("Device", "identifier=SN-0002"), ["cgm-2"]);
    }

    #[test]
    fn status_with_implicit_system() {
        assert_eq!(obs("status=final"), ["glu-1", "glu-3", "glu-5"]);
        assert_eq!(obs("status=final,amended"), ["glu-1", "glu-3", "glu-4", "glu-5"]);
        assert_eq!(obs("status=http://hl7.org/fhir/observation-status|amended"), ["glu-4"]);
        assert_eq!(obs("status=http://hl7.org/fhir/device-status|final"), Vec::<String>::new());
        assert_eq!(obs("status=|final"), Vec::<String>::new());
        assert_eq!(ids("Device", "status=active"), ["cgm-1"]);
        assert_eq!(ids("Device", "status=http://hl7.org/fhir/device-status|inactive"), ["cgm-2"]);
    }

    #[test]
    fn date_on_date_times_instants_and_periods() {
        // glu-1 06:30:00Z (s), glu-2 12:00:00.000Z (ms), glu-3 [03-01, 03-03), glu-4 [03-05T08:00, +inf),
        // glu-5 (-inf, 03-01T00:00:00).
        assert_eq!(obs("date=2026-03-04"), ["glu-1", "glu-2"]);
        assert_eq!(obs("date=2026-03"), ["glu-1", "glu-2", "glu-3"]);
        assert_eq!(obs("date=2026"), ["glu-1", "glu-2", "glu-3"]);
        assert_eq!(obs("date=ne2026-03"), ["glu-4", "glu-5"]);
        assert_eq!(obs("date=ge2026-03-04"), ["glu-1", "glu-2", "glu-4"]);
        assert_eq!(obs("date=gt2026-03-04"), ["glu-4"]);
        assert_eq!(obs("date=gt2026-03-05"), ["glu-4"]); // ongoing, so some part lies after
        assert_eq!(obs("date=lt2026-03-02"), ["glu-3", "glu-5"]);
        assert_eq!(obs("date=le2026-03-01"), ["glu-5"]); // glu-3 ends on 03-02: neither before nor inside
        assert_eq!(obs("date=sa2026-03-04"), ["glu-4"]);
        assert_eq!(obs("date=eb2026-03-01"), ["glu-5"]); // ends exactly where the day starts
        assert_eq!(obs("date=eb2026-03-03"), ["glu-3", "glu-5"]);
        assert_eq!(obs("date=eb2026-03-02"), ["glu-5"]);
    }

    #[test]
    fn date_precision_and_zones() {
        // Minute: 07:30+01:00 is 06:30:00Z, inside the UTC minute 06:30.
        assert_eq!(obs("date=2026-03-04T06:30"), ["glu-1"]);
        assert_eq!(obs("date=2026-03-04T07:30"), Vec::<String>::new());
        assert_eq!(obs("date=2026-03-04T07:30%2B01:00"), ["glu-1"]);
        assert_eq!(obs("date=2026-03-04T07:30+01:00"), ["glu-1"]); // unencoded `+`
        assert_eq!(obs("date=le2026-03-04T06:30"), ["glu-1", "glu-3", "glu-5"]);
        // Second: glu-1 is a whole second, glu-2 a millisecond.
        assert_eq!(obs("date=2026-03-04T06:30:00Z"), ["glu-1"]);
        assert_eq!(obs("date=2026-03-04T12:00:00Z"), ["glu-2"]);
        assert_eq!(obs("date=2026-03-04T12:00:00.000Z"), ["glu-2"]);
        // A millisecond search cannot contain a whole-second target.
        assert_eq!(obs("date=2026-03-04T06:30:00.000Z"), Vec::<String>::new());
        assert_eq!(obs("date=gt2026-03-04T12:00:00Z"), ["glu-4"]);
        assert_eq!(obs("date=ge2026-03-04T12:00:00.000Z"), ["glu-2", "glu-4"]);
        assert_eq!(obs("date=lt2026-03-04T12:00:00.000Z"), ["glu-1", "glu-3", "glu-5"]);
        assert_eq!(obs("date=2026-03-04T08:00:00-04:00"), ["glu-2"]);
    }

    #[test]
    fn date_or_and_and() {
        assert_eq!(obs("date=ge2026-03-04&date=lt2026-03-05"), ["glu-1", "glu-2"]);
        assert_eq!(obs("date=2026-03-04,sa2026-03-04"), ["glu-1", "glu-2", "glu-4"]);
        assert_eq!(obs("date=ge2026-01-01&date=lt2026-02-01"), ["glu-5"]);
        assert_eq!(obs("date=ge2026-03-04&patient=pat-1&code=15074-8"), ["glu-2"]);
    }

    #[test]
    fn date_ap() {
        // now = 03-10; 03-03 ends 6 days earlier, so the 1-day floor applies: [03-02, 03-05).
        assert_eq!(obs("date=ap2026-03-03"), ["glu-1", "glu-2", "glu-3"]);
        assert_eq!(obs("date=ap2026-03-06"), ["glu-4"]);
        // A year-old search value widens by ~5 weeks: 2025-02 ends 374 days before now.
        assert_eq!(obs("date=ap2025-02"), ["glu-5"]);
    }

    #[test]
    fn value_quantity() {
        assert_eq!(obs("value-quantity=5.4"), ["glu-2", "glu-5"]); // 5.44 is within [5.35, 5.45)
        assert_eq!(obs("value-quantity=5.40"), ["glu-2"]);
        assert_eq!(obs("value-quantity=5.4||mmol/L"), ["glu-2", "glu-5"]);
        assert_eq!(obs("value-quantity=5.4|http://unitsofmeasure.org|mmol/L"), ["glu-2", "glu-5"]);
        assert_eq!(obs("value-quantity=5.4||mg"), Vec::<String>::new());
        assert_eq!(obs("value-quantity=5.4|http://example.org/units|mmol/L"), Vec::<String>::new());
        // glu-3 has only a unit and no system.
        assert_eq!(obs("value-quantity=7.8||mmol/L"), ["glu-3"]);
        assert_eq!(obs("value-quantity=7.8|http://unitsofmeasure.org|mmol/L"), Vec::<String>::new());
        assert_eq!(obs("value-quantity=gt100||mg/dL"), ["glu-4"]);
        assert_eq!(obs("value-quantity=le97"), ["glu-1", "glu-2", "glu-3", "glu-5"]);
        assert_eq!(obs("value-quantity=lt97"), ["glu-2", "glu-3", "glu-5"]);
        assert_eq!(obs("value-quantity=ge97"), ["glu-1", "glu-4"]);
        assert_eq!(obs("value-quantity=sa97"), ["glu-4"]);
        assert_eq!(obs("value-quantity=eb5.44"), ["glu-2"]);
        assert_eq!(obs("value-quantity=ap100"), ["glu-1"]);
        assert_eq!(obs("value-quantity=ap5|http://unitsofmeasure.org|mmol/L"), ["glu-2", "glu-5"]);
        assert_eq!(obs("value-quantity=ap7||mmol/L"), Vec::<String>::new()); // 7.8 is 11% away
        assert_eq!(obs("value-quantity=ne97"), ["glu-2", "glu-3", "glu-4", "glu-5"]);
        assert_eq!(obs("value-quantity=97,180"), ["glu-1", "glu-4"]);
        assert_eq!(obs("value-quantity=1e2"), ["glu-1"]); // [50, 150)
        assert_eq!(obs("value-quantity=ge5&value-quantity=lt6"), ["glu-2", "glu-5"]);
    }

    #[test]
    fn patient_name_is_accent_and_case_insensitive_prefix() {
        let pat = |q: &str| ids("Patient", q);
        assert_eq!(pat("name=muller"), ["pat-1"]);
        assert_eq!(pat("name=MÜL"), ["pat-1"]);
        assert_eq!(pat("name=zo"), ["pat-1"]);
        assert_eq!(pat("name=zoe+mue"), ["pat-1"]); // name.text
        assert_eq!(pat("name=mueller"), Vec::<String>::new()); // text starts with "Zoe", family is Müller
        assert_eq!(pat("name=sean"), ["pat-2"]);
        assert_eq!(pat("name=brien"), Vec::<String>::new()); // prefix, not substring
        assert_eq!(pat("name=o'b,zoë"), ["pat-1", "pat-2"]);
        assert_eq!(pat("family=o%27brien"), ["pat-2"]);
        assert_eq!(pat("family=anne"), Vec::<String>::new());
        assert_eq!(pat("given=anne"), ["pat-1"]);
        assert_eq!(pat("given=mü"), Vec::<String>::new());
    }

    #[test]
    fn exact_string_modifier() {
        let pat = |q: &str| ids("Patient", q);
        assert_eq!(pat("name:exact=M%C3%BCller"), ["pat-1"]);
        assert_eq!(pat("name:exact=Muller"), Vec::<String>::new());
        assert_eq!(pat("name:exact=m%C3%BCller"), Vec::<String>::new());
        assert_eq!(pat("name:exact=M%C3%BCl"), Vec::<String>::new());
        assert_eq!(pat("name:exact=Zoe+Mueller"), ["pat-1"]);
        assert_eq!(pat("given:exact=Se%C3%A1n"), ["pat-2"]);
        assert_eq!(pat("family:exact=Zo%C3%AB"), Vec::<String>::new());
    }

    #[test]
    fn birthdate_and_gender() {
        let pat = |q: &str| ids("Patient", q);
        assert_eq!(pat("birthdate=1980"), ["pat-1"]);
        assert_eq!(pat("birthdate=1980-05"), ["pat-1"]);
        assert_eq!(pat("birthdate=1980-05-12"), Vec::<String>::new()); // the target month is wider
        assert_eq!(pat("birthdate=lt1980-05-12"), ["pat-1", "pat-2"]);
        assert_eq!(pat("birthdate=gt1980-05-12"), ["pat-1"]);
        assert_eq!(pat("birthdate=1975-12-31"), ["pat-2"]);
        assert_eq!(pat("birthdate=sa1975-12-31"), ["pat-1"]);
        assert_eq!(pat("birthdate=eb1976"), ["pat-2"]);
        assert_eq!(pat("gender=female"), ["pat-1"]);
        assert_eq!(pat("gender:not=female"), ["pat-2"]);
        assert_eq!(pat("gender=http://hl7.org/fhir/administrative-gender|male"), ["pat-2"]);
        assert_eq!(pat("gender=female,male&birthdate=ge1978"), ["pat-1"]);
    }

    #[test]
    fn device_params() {
        let dev = |q: &str| ids("Device", q);
        assert_eq!(dev("type=http://snomed.info/sct|337414009"), ["cgm-1"]);
        assert_eq!(dev("type=|CGM"), ["cgm-2"]);
        assert_eq!(dev("type:not=CGM"), ["cgm-1"]);
        assert_eq!(dev("patient=pat-1"), ["cgm-1"]);
        assert_eq!(dev("patient=Patient/pat-2"), ["cgm-2"]); // absolute, versioned reference
        assert_eq!(dev("status=active,inactive&patient=pat-2"), ["cgm-2"]);
    }

    #[test]
    fn resource_type_must_match_the_query() {
        let (q, _) = parse_query("Patient", "_id=glu-1", false).expect("query");
        assert!(!matches_at(&glu1(), &q, now()));
        let (q, _) = parse_query("Observation", "", false).expect("query");
        assert!(matches(&glu1(), &q));
        assert!(!matches(&pat1(), &q));
        assert!(!matches(&json!({ "id": "glu-1" }), &q));
    }

    #[test]
    fn unevaluable_params_do_not_match() {
        let code = |name: &str, modifier: Option<&str>| SearchParam {
            name: name.into(),
            modifier: modifier.map(str::to_string),
            values: vec![SearchValue::Token { system: None, code: Some("2339-0".into()) }],
        };
        assert!(matches_param(&glu1(), &code("code", None)));
        assert!(!matches_param(&glu1(), &code("code", Some("text"))));
        assert!(!matches_param(&glu1(), &code("gender", None)));
        assert!(!matches_param(&pat1(), &code("code", None)));
        // A value of the wrong kind does not match either.
        let wrong_kind =
            SearchParam { name: "date".into(), modifier: None, values: vec![SearchValue::String("2026".into())] };
        assert!(!matches_param(&glu1(), &wrong_kind));
        // A token with neither system nor code matches nothing.
        let empty = SearchParam {
            name: "code".into(),
            modifier: None,
            values: vec![SearchValue::Token { system: None, code: None }],
        };
        assert!(!matches_param(&glu1(), &empty));
    }

    #[test]
    fn malformed_resources_do_not_match_and_do_not_panic() {
        let (q, _) = parse_query("Observation", "date=2026", false).expect("query");
        for effective in [
            json!({ "effectiveDateTime": "2026-13-01" }),
            json!({ "effectiveDateTime": 2026 }),
            json!({ "effectivePeriod": {} }),
            json!({ "effectivePeriod": { "start": "2026-03-05", "end": "2026-03-01" } }),
            json!({ "effectivePeriod": { "start": null } }),
            json!({ "effectivePeriod": "2026" }),
        ] {
            let mut resource = json!({ "resourceType": "Observation", "id": "bad" });
            if let (Some(target), Some(fields)) = (resource.as_object_mut(), effective.as_object()) {
                target.extend(fields.clone());
            }
            assert!(!matches_at(&resource, &q, now()), "{effective}");
        }
        let (q, _) = parse_query("Observation", "value-quantity=5&code=x&subject=p&category=c", false).expect("query");
        let junk = json!({
            "resourceType": "Observation", "valueQuantity": { "value": "5" }, "code": { "coding": "x" },
            "subject": { "reference": "urn:uuid:1234" }, "category": { "coding": [{ "code": "c" }] }
        });
        for p in &q.params {
            assert!(!matches_param_at(&junk, p, now()), "{}", p.name);
        }
    }

    #[test]
    fn public_matches_param_uses_the_real_clock() {
        let param = SearchParam {
            name: "date".into(),
            modifier: None,
            values: vec![SearchValue::Date { prefix: Prefix::Ap, value: date_range("2026-03-04").expect("date") }],
        };
        // Whatever today is, the widened range still contains the day itself.
        assert!(matches_param(&glu1(), &param));
    }

    #[test]
    fn sort_values() {
        let at = |s: &str| Some(s.parse::<DateTime<Utc>>().expect("instant"));
        assert_eq!(sort_value(&glu1(), "date"), at("2026-03-04T06:30:00Z"));
        assert_eq!(sort_value(&glu2(), "date"), at("2026-03-04T12:00:00Z"));
        assert_eq!(sort_value(&glu3(), "date"), at("2026-03-01T00:00:00Z"));
        assert_eq!(sort_value(&glu4(), "date"), at("2026-03-05T08:00:00Z"));
        assert_eq!(sort_value(&glu5(), "date"), None);
        assert_eq!(sort_value(&glu1(), "_lastUpdated"), at("2026-03-04T06:31:12.345Z"));
        assert_eq!(sort_value(&pat1(), "_lastUpdated"), at("2026-01-15T10:00:00Z"));
        assert_eq!(sort_value(&pat1(), "date"), None);
        assert_eq!(sort_value(&pat1(), "birthdate"), None);
        assert_eq!(sort_value(&json!({ "resourceType": "Observation" }), "_lastUpdated"), None);
        // Sorting a page by date descending, ties and missing values last.
        let mut page = [glu3(), glu5(), glu1(), glu4(), glu2()];
        page.sort_by_key(|r| std::cmp::Reverse(sort_value(r, "date")));
        let order: Vec<&str> = page.iter().filter_map(|r| r["id"].as_str()).collect();
        assert_eq!(order, ["glu-4", "glu-2", "glu-1", "glu-3", "glu-5"]);
    }

    #[test]
    fn observation_patient_normalises_the_subject() {
        assert_eq!(observation_patient(&glu1()).as_deref(), Some("Patient/pat-1"));
        assert_eq!(observation_patient(&glu2()).as_deref(), Some("Patient/pat-1"));
        assert_eq!(observation_patient(&glu3()), None); // a Group
        assert_eq!(observation_patient(&glu5()).as_deref(), Some("Patient/pat-2"));
        assert_eq!(observation_patient(&json!({ "subject": { "reference": "urn:uuid:0c3f" } })), None);
        assert_eq!(observation_patient(&json!({ "subject": { "display": "Jane" } })), None);
        assert_eq!(observation_patient(&json!({})), None);
    }

    #[test]
    fn reference_parts_forms() {
        assert_eq!(reference_parts("Patient/pat-1"), Some((Some("Patient"), "pat-1")));
        assert_eq!(reference_parts("pat-1"), Some((None, "pat-1")));
        assert_eq!(reference_parts("https://x.org/fhir/R4/Patient/pat-1"), Some((Some("Patient"), "pat-1")));
        assert_eq!(reference_parts("https://x.org/fhir/Patient/pat-1/_history/2"), Some((Some("Patient"), "pat-1")));
        assert_eq!(reference_parts("Patient/pat-1/_history/2"), Some((Some("Patient"), "pat-1")));
        // `https://Patient/1`: the host is not a type; an absolute URL needs host/Type/id.
        for bad in [
            "",
            "Patient/",
            "patient/1",
            "Patient/1/extra",
            "https://x.org/1",
            "https://Patient/1",
            "urn:uuid:1",
            "#c1",
            "a b",
        ] {
            assert_eq!(reference_parts(bad), None, "{bad}");
        }
    }

    fn audit_event() -> Value {
        json!({
            "resourceType": "AuditEvent",
            "id": "ae-1",
            "meta": {"versionId": "1", "lastUpdated": "2026-11-28T08:30:00.123Z"},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
            "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": "read"}],
            "action": "R",
            "recorded": "2026-11-28T08:30:00.123Z",
            "outcome": "0",
            "agent": [
                {"type": {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110152"}]},
                 "who": {"identifier": {"system": "urn:cairn:oauth-client", "value": "gw"}}, "requestor": false,
                 "network": {"address": "192.0.2.10", "type": "2"}},
                {"role": [{"coding": [{"system": "urn:test:role", "code": "nurse"}]}],
                 "who": {"reference": "Practitioner/pr-1"}, "altId": "user-7", "name": "Alice Nurse", "requestor": true,
                 "policy": ["urn:ietf:params:oauth:jti:abc"]}
            ],
            "source": {"site": "cairn", "observer": {"reference": "Device/server-1"}},
            "entity": [
                {"what": {"reference": "Observation/o-1/_history/2"},
                 "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"},
                 "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "4"}, "name": "glucose"},
                {"what": {"reference": "Patient/p-1"},
                 "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1"},
                 "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"}}
            ]
        })
    }

    fn hits(resource: &Value, resource_type: &str, query: &str) -> bool {
        let (q, _) = parse_query(resource_type, query, false).unwrap_or_else(|e| panic!("{query}: {e}"));
        matches_at(resource, &q, now())
    }

    #[test]
    fn every_audit_event_parameter_finds_its_element() {
        let a = audit_event();
        for (query, expected) in [
            ("action=R", true),
            ("action=C", false),
            ("address=192.0.2", true),
            ("address=198.51", false),
            ("agent=Practitioner/pr-1", true),
            ("agent=Practitioner/pr-2", false),
            ("agent-name=alice", true),
            ("agent-role=urn:test:role|nurse", true),
            ("agent-role=doctor", false),
            ("altid=user-7", true),
            ("date=2026-11-28", true),
            ("date=ge2026-11-29", false),
            ("entity=Observation/o-1", true),
            ("entity=Patient/p-1", true),
            ("entity-name=gluc", true),
            ("entity-role=http://terminology.hl7.org/CodeSystem/object-role|1", true),
            ("entity-type=http://terminology.hl7.org/CodeSystem/audit-entity-type|2", true),
            ("entity-type=3", false),
            ("outcome=0", true),
            ("outcome=4,8", false),
            ("patient=Patient/p-1", true),
            ("patient=p-1", true),
            ("patient=p-2", false),
            ("policy=urn:ietf:params:oauth:jti:abc", true),
            ("policy=urn:ietf:params:oauth:jti:ab", false),
            ("site=cairn", true),
            ("source=Device/server-1", true),
            ("subtype=http://hl7.org/fhir/restful-interaction|read", true),
            ("subtype=create", false),
            ("type=rest", true),
            ("type=http://dicom.nema.org/resources/ontology/DCM|110114", false),
            ("_id=ae-1", true),
        ] {
            assert_eq!(hits(&a, "AuditEvent", query), expected, "{query}");
        }
    }

    #[test]
    fn every_provenance_parameter_finds_its_element() {
        let p = json!({
            "resourceType": "Provenance",
            "id": "pv-1",
            "target": [{"reference": "Observation/o-1/_history/2"}, {"reference": "Patient/p-1"}],
            "recorded": "2026-11-28T08:30:00.123Z",
            "occurredPeriod": {"start": "2026-11-28T08:00:00Z", "end": "2026-11-28T09:00:00Z"},
            "location": {"reference": "Location/ward-3"},
            "agent": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "author"}]},
                       "role": [{"coding": [{"system": "urn:test:role", "code": "nurse"}]}],
                       "who": {"reference": "Device/meter-7"}}],
            "entity": [{"role": "revision", "what": {"reference": "Observation/o-1/_history/1"}}],
            "signature": [{"type": [{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.1"}]}]
        });
        for (query, expected) in [
            ("agent=Device/meter-7", true),
            ("agent=Device/meter-8", false),
            ("agent-role=nurse", true),
            ("agent-type=author", true),
            ("agent-type=performer", false),
            ("entity=Observation/o-1", true),
            ("location=Location/ward-3", true),
            ("patient=Patient/p-1", true),
            ("patient=Patient/p-2", false),
            ("recorded=2026-11-28", true),
            ("recorded=lt2026-11-28", false),
            ("signature-type=1.2.840.10065.1.12.1.1", true),
            ("target=Observation/o-1", true),
            ("target=Observation/o-2", false),
            ("when=ge2026-11-28T08:30:00Z", true),
            ("when=gt2026-11-28T10:00:00Z", false),
        ] {
            assert_eq!(hits(&p, "Provenance", query), expected, "{query}");
        }
    }
}
