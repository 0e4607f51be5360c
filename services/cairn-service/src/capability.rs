//! The CapabilityStatement: exactly what this build serves, nothing more. Search parameters come
//! from the one table the parser uses (`cairn_fhir::search::search_params`), so the statement cannot
//! drift from what search accepts.

use cairn_fhir::resource::RESOURCE_TYPES;
use cairn_fhir::search;
use serde_json::{Value, json};

fn resource(resource_type: &str) -> Value {
    let params: Vec<Value> =
        search::search_params(resource_type).iter().map(|p| json!({"name": p.name, "type": p.kind.as_str()})).collect();
    json!({
        "type": resource_type,
        "interaction": [
            {"code": "read"}, {"code": "vread"}, {"code": "update"}, {"code": "delete"},
            {"code": "history-instance"}, {"code": "history-type"}, {"code": "create"}, {"code": "search-type"}
        ],
        "versioning": "versioned-update",
        "readHistory": true,
        "updateCreate": true,
        "conditionalCreate": true,
        "conditionalUpdate": false,
        "conditionalDelete": "not-supported",
        "searchParam": params,
    })
}

pub fn capability_statement(base_url: &str, software_version: &str) -> Value {
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-28",
        "kind": "instance",
        "software": {"name": "Cairn", "version": software_version},
        "implementation": {"description": "Cairn event-sourced FHIR server", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "application/json"],
        "rest": [{
            "mode": "server",
            "documentation": "Every write is an event in a durable, hash-chained log before it is acknowledged; reads see every acknowledged write. Search result parameters: _count (default 50, max 1000), _offset, _sort (date, -date, _lastUpdated, -_lastUpdated), _summary=count, _total=accurate, _elements. Prefer: handling=lenient ignores unknown search parameters.",
            "resource": RESOURCE_TYPES.iter().map(|t| resource(t)).collect::<Vec<_>>(),
            "interaction": [{"code": "history-system"}],
        }],
    })
}
