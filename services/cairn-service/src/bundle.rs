//! Response Bundles: searchset and history.

use crate::{FhirError, FhirResult};
use cairn_events::VersionedRef;
use cairn_fhir::outcome::{Issue, IssueCode, operation_outcome};
use cairn_fhir::search::{self, SearchQuery};
use cairn_store::ResourceVersion;
use serde_json::{Value, json};

/// A search match, kept small: only what sorting and paging need. The resources of the one page
/// that is returned are fetched afterwards, so a search over millions of matches (or `_summary=count`)
/// never holds millions of resources in memory.
pub struct Hit {
    keys: Vec<Option<chrono::DateTime<chrono::Utc>>>,
    pub id: String,
    pub version_id: u64,
}

/// The sort order of a query. Default: `_lastUpdated` ascending then id, so resources written while a
/// client pages land after the pages it has seen.
pub fn sort_keys(query: &SearchQuery) -> Vec<(String, bool)> {
    if query.sort.is_empty() {
        vec![("_lastUpdated".to_owned(), false)]
    } else {
        query.sort.iter().map(|k| (k.param.clone(), k.descending)).collect()
    }
}

pub fn hit(v: &ResourceVersion, r: &Value, keys: &[(String, bool)]) -> Hit {
    Hit {
        keys: keys.iter().map(|(p, _)| search::sort_value(r, p)).collect(),
        id: v.id.clone(),
        version_id: v.version_id,
    }
}

/// Sorts the hits and returns the page's `[start, end)` and the total.
pub fn page(hits: &mut [Hit], keys: &[(String, bool)], query: &SearchQuery) -> (usize, usize) {
    hits.sort_by(|a, b| {
        for (i, (_, descending)) in keys.iter().enumerate() {
            let ord = a.keys[i].cmp(&b.keys[i]);
            let ord = if *descending { ord.reverse() } else { ord };
            if ord != std::cmp::Ordering::Equal {
                return ord;
            }
        }
        a.id.cmp(&b.id)
    });
    let total = hits.len();
    let start = query.offset.min(total);
    let end = if query.summary_count { start } else { (start + query.count).min(total) };
    (start, end)
}

/// Wraps one page of results in a searchset Bundle with self/next/previous links.
#[allow(clippy::too_many_arguments)] // each is one part of the page the links must reproduce
pub fn searchset(
    base: &str,
    resource_type: &str,
    raw_query: &str,
    query: &SearchQuery,
    total: usize,
    start: usize,
    page: Vec<ResourceVersion>,
    ignored: &[String],
) -> (Value, Vec<VersionedRef>) {
    let self_url = link(base, resource_type, raw_query, None);
    let mut bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": [{"relation": "self", "url": self_url}],
    });
    if query.summary_count {
        return (bundle, Vec::new());
    }
    let end = start + page.len();
    let links = bundle["link"].as_array_mut().expect("link array");
    if end < total {
        links.push(json!({"relation": "next", "url": link(base, resource_type, raw_query, Some(end))}));
    }
    if start > 0 {
        let prev = start.saturating_sub(query.count);
        links.push(json!({"relation": "previous", "url": link(base, resource_type, raw_query, Some(prev))}));
    }
    let mut entries: Vec<Value> = page
        .iter()
        .map(|v| {
            let mut resource = v.resource_value().unwrap_or(Value::Null);
            if let Some(elements) = &query.elements {
                resource = subset(resource, elements);
            }
            json!({
                "fullUrl": format!("{base}/{}/{}", v.resource_type, v.id),
                "resource": resource,
                "search": {"mode": "match"},
            })
        })
        .collect();
    if !ignored.is_empty() {
        let issue = Issue {
            severity: cairn_fhir::outcome::Severity::Warning,
            code: IssueCode::NotSupported,
            diagnostics: format!("ignored unknown search parameters: {}", ignored.join(", ")),
            expression: None,
        };
        entries.push(json!({"resource": operation_outcome(&[issue]), "search": {"mode": "outcome"}}));
    }
    bundle["entry"] = Value::Array(entries);
    let returned = page.iter().map(version_ref).collect();
    (bundle, returned)
}

/// What a response disclosed: type, id and version of a stored resource.
pub fn version_ref(v: &ResourceVersion) -> VersionedRef {
    VersionedRef {
        resource_type: v.resource_type.clone(),
        id: v.id.clone(),
        version_id: v.version_id,
        patient: v.patient.clone(),
    }
}

/// The same query with `_offset` replaced.
fn link(base: &str, resource_type: &str, raw_query: &str, offset: Option<usize>) -> String {
    let mut parts: Vec<&str> = raw_query.split('&').filter(|p| !p.is_empty() && !p.starts_with("_offset=")).collect();
    let offset_part;
    if let Some(o) = offset {
        offset_part = format!("_offset={o}");
        parts.push(&offset_part);
    }
    if parts.is_empty() {
        format!("{base}/{resource_type}")
    } else {
        format!("{base}/{resource_type}?{}", parts.join("&"))
    }
}

/// `_elements`: the listed top-level elements plus the mandatory ones, tagged SUBSETTED.
fn subset(resource: Value, elements: &[String]) -> Value {
    let Value::Object(map) = resource else { return resource };
    let mut out = serde_json::Map::new();
    for (k, v) in map {
        if k == "resourceType" || k == "id" || k == "meta" || elements.iter().any(|e| e == &k) {
            out.insert(k, v);
        }
    }
    // Stored resources always have an object `meta` (validation and stamping ensure it); anything
    // else is left as it is rather than trusted.
    let tags = out
        .entry("meta")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .map(|m| m.entry("tag").or_insert_with(|| json!([])));
    if let Some(tags) = tags.and_then(Value::as_array_mut) {
        tags.push(json!({"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}));
    }
    Value::Object(out)
}

/// `_since`, `_at` and `_count` of a history interaction.
pub struct HistoryParams {
    pub since_ms: Option<i64>,
    pub at: Option<(i64, i64)>,
    pub count: usize,
}

impl HistoryParams {
    pub fn parse(raw: &str) -> FhirResult<HistoryParams> {
        let mut p = HistoryParams { since_ms: None, at: None, count: 100 };
        for pair in raw.split('&').filter(|s| !s.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_encoding::percent_decode_str(value).decode_utf8_lossy().replace('+', " ");
            let bad = |why: &str| FhirError::new(400, IssueCode::Invalid, format!("{name}={value}: {why}"));
            match name {
                "_since" => {
                    let t: cairn_events::Timestamp = value.parse().map_err(|_| bad("not an instant"))?;
                    p.since_ms = Some(t.as_millis());
                }
                "_at" => {
                    let range = search::date_range(&value).ok_or_else(|| bad("not a date"))?;
                    p.at = Some((range.low.timestamp_millis(), range.high.timestamp_millis()));
                }
                "_count" => {
                    let n: usize = value.parse().map_err(|_| bad("not a count"))?;
                    p.count = n.min(1000);
                }
                "_format" => {}
                _ => {
                    return Err(FhirError::new(
                        400,
                        IssueCode::NotSupported,
                        format!("history does not support `{name}`"),
                    ));
                }
            }
        }
        Ok(p)
    }

    /// Time window of versions to read for type and system history: with `_at`, every version that
    /// started before the window's end (an older one may still have been current during it), filtered
    /// afterwards by [`current_during`].
    pub fn window(&self) -> (i64, i64) {
        let from = if self.at.is_some() { i64::MIN } else { self.since_ms.unwrap_or(i64::MIN) };
        let to = self.at.map(|(_, high)| high - 1).unwrap_or(i64::MAX);
        (from, to)
    }
}

/// History with `_at`: the versions that were current at some moment of the window `[low, high)`, of
/// one resource or many. A version is current from its lastUpdated until the next version of the same
/// resource. Input: every version that started before the window's end, newest first; output the same
/// order.
pub fn current_during(versions: Vec<ResourceVersion>, at: (i64, i64)) -> Vec<ResourceVersion> {
    // When the version after the one being looked at took over, per resource.
    let mut next_start: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    let mut out = Vec::new();
    for v in versions {
        let start = v.last_updated_ms;
        let end = next_start.insert(v.key(), start).unwrap_or(i64::MAX);
        if start < at.1 && end > at.0 {
            out.push(v);
        }
    }
    out
}

pub fn history(base: &str, versions: &[ResourceVersion]) -> Value {
    let entries: Vec<Value> = versions
        .iter()
        .map(|v| {
            let url = format!("{}/{}", v.resource_type, v.id);
            let (method, status) = match (v.deleted, v.version_id) {
                (true, _) => ("DELETE", "204 No Content"),
                (false, 1) => ("POST", "201 Created"),
                (false, _) => ("PUT", "200 OK"),
            };
            let mut e = json!({
                "fullUrl": format!("{base}/{url}"),
                "request": {"method": method, "url": if method == "POST" { v.resource_type.clone() } else { url.clone() }},
                "response": {"status": status, "etag": format!("W/\"{}\"", v.version_id), "lastModified": v.last_updated},
            });
            if let Some(r) = v.resource_value() {
                e["resource"] = r;
            }
            e
        })
        .collect();
    json!({"resourceType": "Bundle", "type": "history", "total": entries.len(), "entry": entries})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(id: &str, version_id: u64, at_ms: i64) -> ResourceVersion {
        ResourceVersion {
            resource_type: "Observation".into(),
            id: id.into(),
            version_id,
            last_updated: String::new(),
            last_updated_ms: at_ms,
            deleted: false,
            resource: None,
            fact: false,
            patient: None,
            identifiers: Vec::new(),
            date_key: None,
            parsed: None,
        }
    }

    fn keys(vs: &[ResourceVersion]) -> Vec<String> {
        vs.iter().map(|v| format!("{}@{}", v.id, v.version_id)).collect()
    }

    #[test]
    fn at_keeps_the_versions_current_during_the_window() {
        // a: v1 at 100, v2 at 200, v3 at 300. b: v1 at 150, v2 at 250. Newest first, as the store gives.
        let all = || vec![v("a", 3, 300), v("b", 2, 250), v("a", 2, 200), v("b", 1, 150), v("a", 1, 100)];
        // At 120: only a@1 existed.
        assert_eq!(keys(&current_during(all(), (120, 121))), ["a@1"]);
        // At 220: a@2 (since 200) and b@1 (since 150); a@1 had been replaced.
        assert_eq!(keys(&current_during(all(), (220, 221))), ["a@2", "b@1"]);
        // A window from 180 to 260 saw a@1 until 200, a@2, b@1 until 250, and b@2.
        assert_eq!(keys(&current_during(all(), (180, 260))), ["b@2", "a@2", "b@1", "a@1"]);
        // Exactly at a version's start: that version, not the one it replaced.
        assert_eq!(keys(&current_during(all(), (200, 201))), ["a@2", "b@1"]);
        // Before anything existed: nothing.
        assert!(current_during(all(), (10, 20)).is_empty());
    }
}
