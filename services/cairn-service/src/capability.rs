//! The CapabilityStatement: exactly what this build serves, nothing more.

use serde_json::{Value, json};

fn search_param(name: &str, kind: &str, doc: &str) -> Value {
    json!({"name": name, "type": kind, "documentation": doc})
}

pub fn capability_statement(base_url: &str, software_version: &str) -> Value {
    let common = [
        search_param("_id", "token", "logical id"),
        search_param("_lastUpdated", "date", "meta.lastUpdated, with prefixes"),
    ];
    let observation_params: Vec<Value> = common
        .iter()
        .cloned()
        .chain([
            search_param("patient", "reference", "subject, when it is a Patient"),
            search_param("subject", "reference", "subject"),
            search_param("code", "token", "code.coding: system|code, code, system|"),
            search_param("category", "token", "category.coding"),
            search_param("date", "date", "effective[x] (dateTime, instant, Period); prefixes eq ne lt gt le ge sa eb ap with precision semantics"),
            search_param("device", "reference", "device"),
            search_param("identifier", "token", "identifier system|value"),
            search_param("status", "token", "status"),
            search_param("value-quantity", "quantity", "valueQuantity: [prefix]number|system|code"),
        ])
        .collect();
    let patient_params: Vec<Value> = common
        .iter()
        .cloned()
        .chain([
            search_param("identifier", "token", "identifier system|value"),
            search_param("name", "string", "any part of name, prefix match"),
            search_param("family", "string", "name.family"),
            search_param("given", "string", "name.given"),
            search_param("birthdate", "date", "birthDate"),
            search_param("gender", "token", "gender"),
        ])
        .collect();
    let device_params: Vec<Value> = common
        .iter()
        .cloned()
        .chain([
            search_param("identifier", "token", "identifier system|value"),
            search_param("type", "token", "type.coding"),
            search_param("patient", "reference", "patient"),
            search_param("status", "token", "status"),
        ])
        .collect();
    let resource = |t: &str, params: Vec<Value>| {
        json!({
            "type": t,
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
    };
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
            "documentation": "Every write is an event in a durable, hash-chained log before it is acknowledged. Search result parameters: _count (default 50, max 1000), _offset, _sort (date, -date, _lastUpdated, -_lastUpdated), _summary=count, _total=accurate, _elements. Prefer: handling=lenient ignores unknown search parameters.",
            "resource": [
                resource("Observation", observation_params),
                resource("Patient", patient_params),
                resource("Device", device_params),
            ],
            "interaction": [{"code": "history-system"}],
        }],
    })
}
