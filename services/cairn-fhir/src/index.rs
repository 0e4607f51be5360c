//! The index keys the store keeps for a resource: its patient compartment and its identifiers.

use serde_json::Value;

/// The patient compartment of a resource as `Patient/<id>`: a Patient itself, an Observation's
/// subject when it is a Patient, a Device's patient.
pub fn patient_of(resource_type: &str, id: &str, resource: &Value) -> Option<String> {
    let reference = match resource_type {
        "Patient" => return Some(format!("Patient/{id}")),
        "Observation" => resource.get("subject"),
        "Device" => resource.get("patient"),
        _ => None,
    }?;
    let r = reference.get("reference")?.as_str()?;
    patient_reference(r)
}

/// `Patient/123`, `Patient/123/_history/2` or an absolute URL ending in `Patient/123` -> `Patient/123`.
pub fn patient_reference(r: &str) -> Option<String> {
    let parts: Vec<&str> = r.split('/').collect();
    let at = parts.iter().rposition(|p| *p == "Patient")?;
    let id = parts.get(at + 1)?;
    if crate::resource::is_valid_id(id) && (parts.len() == at + 2 || parts.get(at + 2) == Some(&"_history")) {
        Some(format!("Patient/{id}"))
    } else {
        None
    }
}

/// Only the elements the indexes read, parsed from raw resource text: the rest of the document is
/// skipped without building it (the projector's hot path).
#[derive(serde::Deserialize)]
struct IndexedElements {
    #[serde(default)]
    subject: Option<Value>,
    #[serde(default)]
    patient: Option<Value>,
    #[serde(default)]
    identifier: Option<Value>,
    #[serde(default, rename = "effectiveDateTime")]
    effective_date_time: Option<Value>,
    #[serde(default, rename = "effectiveInstant")]
    effective_instant: Option<Value>,
    #[serde(default, rename = "effectivePeriod")]
    effective_period: Option<Value>,
    #[serde(default)]
    meta: Option<Value>,
}

/// The index keys of a resource given as raw JSON: patient compartment, identifiers, date key and
/// `meta.lastUpdated`.
pub struct IndexKeys {
    pub patient: Option<String>,
    pub identifiers: Vec<String>,
    pub date_key: Option<i64>,
    pub last_updated: Option<String>,
}

pub fn index_keys(resource_type: &str, id: &str, raw: &str) -> IndexKeys {
    let Ok(e) = serde_json::from_str::<IndexedElements>(raw) else {
        return IndexKeys { patient: None, identifiers: Vec::new(), date_key: None, last_updated: None };
    };
    let mut view = serde_json::Map::new();
    view.insert("resourceType".into(), Value::String(resource_type.to_owned()));
    for (k, v) in [
        ("subject", e.subject),
        ("patient", e.patient),
        ("identifier", e.identifier),
        ("effectiveDateTime", e.effective_date_time),
        ("effectiveInstant", e.effective_instant),
        ("effectivePeriod", e.effective_period),
    ] {
        if let Some(v) = v {
            view.insert(k.into(), v);
        }
    }
    let last_updated = e.meta.as_ref().and_then(|m| m.get("lastUpdated")).and_then(Value::as_str).map(str::to_owned);
    let view = Value::Object(view);
    IndexKeys {
        patient: patient_of(resource_type, id, &view),
        identifiers: identifiers_of(&view),
        date_key: date_key(resource_type, &view),
        last_updated,
    }
}

/// Identifiers as `system|value` (system empty when absent).
pub fn identifiers_of(resource: &Value) -> Vec<String> {
    let Some(ids) = resource.get("identifier").and_then(Value::as_array) else { return Vec::new() };
    ids.iter()
        .filter_map(|i| {
            let value = i.get("value")?.as_str()?;
            let system = i.get("system").and_then(Value::as_str).unwrap_or("");
            Some(format!("{system}|{value}"))
        })
        .collect()
}

/// Effective ranges at most this long are indexed by their start; longer or open ones go to a bucket
/// every date search also reads. The slack lets a `ge`/`gt` search prune by start: a short target
/// ending after a bound started at most this long before it.
pub const SHORT_EFFECTIVE_MS: i64 = 24 * 60 * 60 * 1000;

/// The bucket of Observations whose effective range is long, open or unknown.
pub const LONG_EFFECTIVE: i64 = i64::MIN;

/// Whether a type's resources carry a date-index key, so that one patient's resources in a time window
/// can be read directly: Observations (by `effective[x]`, [`date_key`]) and AuditEvents (by
/// `recorded`, set by the audit projection).
pub fn has_patient_date_index(resource_type: &str) -> bool {
    matches!(resource_type, "Observation" | "AuditEvent")
}

/// The date-index key of a resource: for an Observation, the start of a short `effective[x]` in
/// epoch milliseconds, or [`LONG_EFFECTIVE`]; `None` for resources not in the date index.
pub fn date_key(resource_type: &str, resource: &Value) -> Option<i64> {
    if resource_type != "Observation" {
        return None;
    }
    Some(match crate::search::observation_effective(resource) {
        Some(r)
            if r.low != chrono::DateTime::<chrono::Utc>::MIN_UTC
                && r.high != chrono::DateTime::<chrono::Utc>::MAX_UTC
                && (r.high - r.low).num_milliseconds() <= SHORT_EFFECTIVE_MS =>
        {
            r.low.timestamp_millis()
        }
        _ => LONG_EFFECTIVE,
    })
}

/// Bounds `[from, to)` on the date-index key that every Observation matching the query's `date`
/// parameters must fall in (short ones; the long bucket is always read too), or `None` if the query
/// does not bound the date. Conservative: candidates are still matched exactly afterwards.
pub fn date_bounds(query: &crate::search::SearchQuery) -> Option<(i64, i64)> {
    use crate::search::{Prefix, SearchValue};
    let mut bounds: Option<(i64, i64)> = None;
    for p in query.params.iter().filter(|p| p.name == "date" && p.modifier.is_none()) {
        // OR of values: the hull of each value's range.
        let mut hull: Option<(i64, i64)> = None;
        for v in &p.values {
            let SearchValue::Date { prefix, value } = v else { return bounds };
            let (sl, sh) = (value.low.timestamp_millis(), value.high.timestamp_millis());
            let range = match prefix {
                Prefix::Eq => (sl, sh),
                Prefix::Ge => (sl.saturating_sub(SHORT_EFFECTIVE_MS), i64::MAX),
                Prefix::Gt => (sh.saturating_sub(SHORT_EFFECTIVE_MS), i64::MAX),
                Prefix::Sa => (sh.saturating_sub(SHORT_EFFECTIVE_MS), i64::MAX),
                Prefix::Le => (i64::MIN + 1, sh),
                Prefix::Lt | Prefix::Eb => (i64::MIN + 1, sl),
                Prefix::Ne | Prefix::Ap => (i64::MIN + 1, i64::MAX),
            };
            hull = Some(match hull {
                None => range,
                Some((lo, hi)) => (lo.min(range.0), hi.max(range.1)),
            });
        }
        if let Some((lo, hi)) = hull {
            bounds = Some(match bounds {
                None => (lo, hi),
                Some((blo, bhi)) => (blo.max(lo), bhi.min(hi)),
            });
        }
    }
    bounds
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn compartments_and_identifiers() {
        let obs = json!({"subject": {"reference": "Patient/p1"}, "identifier": [{"system": "s", "value": "v"}, {"value": "w"}]});
        assert_eq!(patient_of("Observation", "o", &obs).as_deref(), Some("Patient/p1"));
        assert_eq!(identifiers_of(&obs), vec!["s|v", "|w"]);
        assert_eq!(patient_of("Observation", "o", &json!({"subject": {"reference": "Group/g"}})), None);
        assert_eq!(patient_reference("https://x.org/fhir/Patient/9/_history/2").as_deref(), Some("Patient/9"));
        assert_eq!(patient_of("Patient", "p7", &json!({})).as_deref(), Some("Patient/p7"));
    }

    #[test]
    fn date_keys_and_bounds_never_lose_a_match() {
        use crate::search::{matches, parse_query};
        let obs = |effective: Value| {
            let mut o = json!({"resourceType": "Observation", "status": "final", "code": {"text": "g"}});
            for (k, v) in effective.as_object().unwrap() {
                o[k] = v.clone();
            }
            o
        };
        let targets = [
            obs(json!({"effectiveDateTime": "2026-03-10T23:30:00Z"})),
            obs(json!({"effectiveDateTime": "2026-03-10"})),
            obs(json!({"effectiveDateTime": "2026-03"})),
            obs(json!({"effectivePeriod": {"start": "2026-03-09T22:00:00Z", "end": "2026-03-10T02:00:00Z"}})),
            obs(json!({"effectivePeriod": {"start": "2026-01-01T00:00:00Z"}})),
            obs(json!({"effectiveInstant": "2026-03-11T00:00:00.000Z"})),
            obs(json!({})),
        ];
        let queries = [
            "date=2026-03-10",
            "date=ge2026-03-10",
            "date=gt2026-03-10",
            "date=le2026-03-10",
            "date=lt2026-03-10",
            "date=sa2026-03-10",
            "date=eb2026-03-10",
            "date=ne2026-03-10",
            "date=ge2026-03-10&date=le2026-03-10",
            "date=2026-03-09,2026-03-11",
            "date=gt2026-03-10T23:00:00Z",
            "date=ap2026-03-10",
        ];
        for q in queries {
            let (query, _) = parse_query("Observation", q, false).unwrap();
            let bounds = date_bounds(&query);
            for t in &targets {
                if !matches(t, &query) {
                    continue;
                }
                let key = date_key("Observation", t).unwrap();
                if key == LONG_EFFECTIVE {
                    continue; // the long bucket is always read
                }
                if let Some((lo, hi)) = bounds {
                    assert!((lo..hi).contains(&key), "{q}: {t} matches but its key {key} is outside [{lo}, {hi})");
                }
            }
        }
    }
}
