//! The index keys the store keeps for a resource: its patient compartment and its identifiers.

use serde_json::Value;
use serde_json::value::RawValue;

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

/// Only the elements the indexes read, found in raw resource text: the rest of the document is
/// skipped without building it, and these are borrowed as text (the projector's hot path).
#[derive(serde::Deserialize)]
struct IndexedElements<'a> {
    #[serde(default, borrow)]
    subject: Option<&'a RawValue>,
    #[serde(default, borrow)]
    patient: Option<&'a RawValue>,
    #[serde(default, borrow)]
    identifier: Option<&'a RawValue>,
    #[serde(default, borrow, rename = "effectiveDateTime")]
    effective_date_time: Option<&'a RawValue>,
    #[serde(default, borrow, rename = "effectiveInstant")]
    effective_instant: Option<&'a RawValue>,
    #[serde(default, borrow, rename = "effectivePeriod")]
    effective_period: Option<&'a RawValue>,
    #[serde(default, borrow)]
    meta: Option<&'a RawValue>,
}

/// The index keys of a resource given as raw JSON: patient compartment, identifiers, date key and
/// `meta.lastUpdated`.
pub struct IndexKeys {
    pub patient: Option<String>,
    pub identifiers: Vec<String>,
    pub date_key: Option<i64>,
    pub last_updated: Option<String>,
}

impl IndexKeys {
    const NONE: IndexKeys = IndexKeys { patient: None, identifiers: Vec::new(), date_key: None, last_updated: None };
}

/// A field of an element, read from the element's raw text when that is simple: an object (not an
/// array, which serde would read into a struct by position) without escapes, whose fields are plain
/// strings or absent, each named once. `None` when not simple: the caller reads the element as a tree.
fn simple_fields<'a, T: serde::Deserialize<'a>>(raw: &'a RawValue) -> Option<T> {
    let text = raw.get();
    if !text.starts_with('{') || text.contains('\\') {
        return None;
    }
    serde_json::from_str(text).ok()
}

#[derive(serde::Deserialize)]
struct ReferenceFields<'a> {
    #[serde(default, borrow)]
    reference: Option<&'a str>,
}

#[derive(serde::Deserialize)]
struct IdentifierFields<'a> {
    #[serde(default, borrow)]
    system: Option<&'a str>,
    #[serde(default, borrow)]
    value: Option<&'a str>,
}

#[derive(serde::Deserialize)]
struct MetaFields<'a> {
    #[serde(default, borrow, rename = "lastUpdated")]
    last_updated: Option<&'a str>,
}

/// An element as a tree: the slow path, and the elements a resource has few of (the `effective[x]`
/// the date index reads). `None` if it is no valid JSON value.
fn tree(raw: &RawValue) -> Option<Value> {
    serde_json::from_str(raw.get()).ok()
}

/// The index keys of a resource. The same keys as reading the elements as trees
/// ([`patient_of`], [`identifiers_of`], [`date_key`]) would give, and none at all when an element is
/// not valid JSON as a tree reads it (the projector's answer for a resource it cannot read); a test
/// holds the two ways equal.
pub fn index_keys(resource_type: &str, id: &str, raw: &str) -> IndexKeys {
    let Ok(e) = serde_json::from_str::<IndexedElements>(raw) else { return IndexKeys::NONE };
    // Text taken as it is gets fewer checks than a tree (serde_json's bound of 127 levels, counted
    // from the resource; a lone surrogate in an escape): an element a tree would refuse makes the
    // resource unreadable, as when every element was read as a tree.
    let elements =
        [e.subject, e.patient, e.identifier, e.meta, e.effective_date_time, e.effective_instant, e.effective_period];
    if elements.into_iter().flatten().any(|r| nesting(r.get()) > MAX_ELEMENT_NESTING) {
        return IndexKeys::NONE;
    }
    let escaped = [e.subject, e.patient, e.identifier, e.meta].into_iter().flatten();
    if escaped.filter(|r| r.get().contains('\\')).any(|r| tree(r).is_none()) {
        return IndexKeys::NONE;
    }
    let reference = |element: Option<&RawValue>| -> Option<Option<String>> {
        let Some(raw) = element else { return Some(None) };
        let text = match simple_fields::<ReferenceFields>(raw) {
            Some(r) => r.reference.map(str::to_owned),
            None => tree(raw)?.get("reference").and_then(Value::as_str).map(str::to_owned),
        };
        Some(text.as_deref().and_then(patient_reference))
    };
    let patient = match resource_type {
        "Patient" => Some(Some(format!("Patient/{id}"))),
        "Observation" => reference(e.subject),
        "Device" => reference(e.patient),
        _ => Some(None),
    };
    let Some(patient) = patient else { return IndexKeys::NONE };
    let Some(identifiers) = e.identifier.map_or(Some(Vec::new()), identifiers_in) else { return IndexKeys::NONE };
    let last_updated = match e.meta {
        None => None,
        Some(raw) => match simple_fields::<MetaFields>(raw) {
            Some(m) => m.last_updated.map(str::to_owned),
            None => {
                let Some(meta) = tree(raw) else { return IndexKeys::NONE };
                meta.get("lastUpdated").and_then(Value::as_str).map(str::to_owned)
            }
        },
    };
    let mut effective = serde_json::Map::new();
    for (k, v) in [
        ("effectiveDateTime", e.effective_date_time),
        ("effectiveInstant", e.effective_instant),
        ("effectivePeriod", e.effective_period),
    ] {
        if let Some(raw) = v {
            let Some(v) = tree(raw) else { return IndexKeys::NONE };
            effective.insert(k.into(), v);
        }
    }
    IndexKeys { patient, identifiers, date_key: date_key(resource_type, &Value::Object(effective)), last_updated }
}

/// The deepest an element may nest: serde_json reads trees 127 levels deep, and the resource's own
/// object is the first.
const MAX_ELEMENT_NESTING: usize = 126;

/// How deeply the objects and arrays of a JSON text nest (a scalar: 0). The text is valid JSON.
fn nesting(text: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// [`identifiers_of`] for a raw `identifier` element; `None` if it is no valid JSON value.
fn identifiers_in(raw: &RawValue) -> Option<Vec<String>> {
    let text = raw.get();
    if !text.starts_with('[') || text.contains('\\') {
        let mut resource = serde_json::Map::new();
        resource.insert("identifier".into(), tree(raw)?);
        return Some(identifiers_of(&Value::Object(resource)));
    }
    let items: Vec<&RawValue> = serde_json::from_str(text).ok()?;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let (system, value) = match simple_fields::<IdentifierFields>(item) {
            Some(i) => (i.system.map(str::to_owned), i.value.map(str::to_owned)),
            None => {
                let i = tree(item)?;
                let field = |name: &str| i.get(name).and_then(Value::as_str).map(str::to_owned);
                (field("system"), field("value"))
            }
        };
        if let Some(value) = value {
            out.push(format!("{}|{value}", system.as_deref().unwrap_or("")));
        }
    }
    Some(out)
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
    use proptest::prelude::*;
    use serde_json::json;

    /// What `index_keys` computed before it read elements as text: every element as a tree.
    fn index_keys_from_trees(resource_type: &str, id: &str, raw: &str) -> IndexKeys {
        #[derive(serde::Deserialize)]
        struct Trees {
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
        let Ok(e) = serde_json::from_str::<Trees>(raw) else { return IndexKeys::NONE };
        let mut view = serde_json::Map::new();
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
        let last_updated =
            e.meta.as_ref().and_then(|m| m.get("lastUpdated")).and_then(Value::as_str).map(str::to_owned);
        let view = Value::Object(view);
        IndexKeys {
            patient: patient_of(resource_type, id, &view),
            identifiers: identifiers_of(&view),
            date_key: date_key(resource_type, &view),
            last_updated,
        }
    }

    /// Element texts to build resources from: ordinary ones, and each way of being unusual (wrong
    /// types, arrays where objects belong, a field named twice, escapes, a lone surrogate that only
    /// a tree refuses).
    fn element(name: &'static str) -> impl Strategy<Value = String> {
        let values: Vec<&'static str> = match name {
            "subject" | "patient" => vec![
                r#"{"reference":"Patient/p1"}"#,
                r#"{"display":"x","reference":"https://h.org/fhir/Patient/p2/_history/3"}"#,
                r#"{"reference":"Group/g"}"#,
                r#"{"reference":5}"#,
                r#"{"reference":"Patient/a","reference":"Patient/b"}"#,
                r#"{"reference":"Patient\/p3"}"#,
                r#"{"display":"\ud800","reference":"Patient/p4"}"#,
                r#"["Patient/p5"]"#,
                r#""Patient/p6""#,
                r#"null"#,
                r#"{}"#,
            ],
            "identifier" => vec![
                r#"[{"system":"s","value":"v"},{"value":"w"}]"#,
                r#"[{"value":1},{"system":2,"value":"x"},"y",["s","v"],null]"#,
                r#"[{"value":"a","value":"b"}]"#,
                r#"[{"system":"urn:\u0041","value":"q\"uote"}]"#,
                r#"[{"value":"\udc00"}]"#,
                r#"{"system":"s","value":"v"}"#,
                r#"[]"#,
                r#"null"#,
            ],
            "meta" => vec![
                r#"{"lastUpdated":"2026-01-02T03:04:05.006Z","versionId":"1"}"#,
                r#"{"lastUpdated":7}"#,
                r#"{"lastUpdated":"a","lastUpdated":"b"}"#,
                r#"{"lastUpdated":"2026-01-02T03:04:05Z","tag":[{"code":"\ud800"}]}"#,
                r#"["2026"]"#,
                r#"null"#,
            ],
            "effectiveDateTime" => vec![r#""2026-03-10T23:30:00Z""#, r#""2026-03""#, r#"5"#, r#""\ud800""#],
            "effectivePeriod" => {
                vec![r#"{"start":"2026-03-09T22:00:00Z","end":"2026-03-10T02:00:00Z"}"#, r#"{"start":"2026-01-01"}"#]
            }
            _ => vec![r#""2026-03-11T00:00:00.000Z""#],
        };
        proptest::sample::select(values).prop_map(|v| v.to_owned())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]
        #[test]
        fn index_keys_from_text_equal_index_keys_from_trees(
            resource_type in proptest::sample::select(vec!["Observation", "Device", "Patient", "Provenance"]),
            elements in proptest::collection::vec(
                proptest::sample::select(vec!["subject", "patient", "identifier", "meta", "effectiveDateTime", "effectivePeriod", "effectiveInstant", "status"])
                    .prop_flat_map(|name| (Just(name), element(name))),
                0..6,
            ),
        ) {
            let fields: Vec<String> = elements.iter().map(|(name, text)| format!("{name:?}:{text}")).collect();
            let raw = format!(r#"{{"resourceType":"{resource_type}",{}"id":"r1"}}"#, fields.iter().map(|f| format!("{f},")).collect::<String>());
            let (text, trees) = (index_keys(resource_type, "r1", &raw), index_keys_from_trees(resource_type, "r1", &raw));
            prop_assert_eq!(&text.patient, &trees.patient, "{}", raw);
            prop_assert_eq!(&text.identifiers, &trees.identifiers, "{}", raw);
            prop_assert_eq!(text.date_key, trees.date_key, "{}", raw);
            prop_assert_eq!(&text.last_updated, &trees.last_updated, "{}", raw);
        }
    }

    /// A tree is at most 127 levels deep for serde_json, counted from the resource: an element
    /// nested deeper made the whole resource unreadable, and still does, whichever way it is read.
    #[test]
    fn index_keys_refuse_elements_nested_as_deep_as_trees_refuse_them() {
        assert_eq!(nesting(r#"{"a":"[[\"{{\\","b":[1,{}]}"#), 3, "brackets in strings do not count");
        assert_eq!(nesting(r#""x""#), 0);
        let deep = |levels: usize| format!("{}{}", "[".repeat(levels), "]".repeat(levels));
        for levels in 120..132 {
            let nested = deep(levels);
            for element in [
                format!(r#""subject":{{"reference":"Patient/p1","extension":{nested}}}"#),
                format!(r#""meta":{{"lastUpdated":"2026-01-02T03:04:05Z","tag":{nested}}}"#),
                format!(r#""identifier":[{{"system":"s","value":"v","period":{nested}}}]"#),
                format!(r#""effectivePeriod":{{"start":"2026-01-01T00:00:00Z","x":{nested}}}"#),
                format!(r#""effectiveDateTime":"2026-01-01T00:00:00Z","status":{nested}"#),
            ] {
                let raw = format!(r#"{{"resourceType":"Observation",{element},"id":"r1"}}"#);
                let (text, trees) =
                    (index_keys("Observation", "r1", &raw), index_keys_from_trees("Observation", "r1", &raw));
                let what = format!("{levels} levels: {}", &element[..20]);
                assert_eq!(text.patient, trees.patient, "{what}");
                assert_eq!(text.identifiers, trees.identifiers, "{what}");
                assert_eq!(text.date_key, trees.date_key, "{what}");
                assert_eq!(text.last_updated, trees.last_updated, "{what}");
            }
        }
    }

    #[test]
    fn index_keys_read_an_ordinary_observation() {
        let raw = r#"{"resourceType":"Observation","id":"o1","meta":{"lastUpdated":"2026-01-02T03:04:05.006Z"},"identifier":[{"system":"s","value":"v"}],"subject":{"reference":"Patient/p1"},"effectiveDateTime":"2026-03-10T23:30:00Z"}"#;
        let keys = index_keys("Observation", "o1", raw);
        assert_eq!(keys.patient.as_deref(), Some("Patient/p1"));
        assert_eq!(keys.identifiers, ["s|v"]);
        assert_eq!(keys.date_key, Some(1_773_185_400_000));
        assert_eq!(keys.last_updated.as_deref(), Some("2026-01-02T03:04:05.006Z"));
        let broken = r#"{"resourceType":"Observation","subject":{"reference":"Patient/p1","display":"\ud800"}}"#;
        assert_eq!(
            index_keys("Observation", "o1", broken).patient,
            None,
            "a lone surrogate makes the resource unreadable"
        );
    }

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
