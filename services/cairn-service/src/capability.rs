//! The CapabilityStatement: exactly what this build serves, nothing more. Search parameters come
//! from the one table the parser uses (`cairn_fhir::search::search_params`), so the statement cannot
//! drift from what search accepts.

use cairn_fhir::resource::{READ_ONLY_TYPES, RESOURCE_TYPES};
use cairn_fhir::search;
use serde_json::{Value, json};

/// The search parameters of a type, from the table the parser uses.
fn search_params(resource_type: &str) -> Vec<Value> {
    let mut params: Vec<Value> =
        search::search_params(resource_type).iter().map(|p| json!({"name": p.name, "type": p.kind.as_str()})).collect();
    params.push(json!({
        "name": "_asOf",
        "type": "date",
        "documentation": "Search the resources as they were at this instant (full precision with a time zone): \
                          each resource's newest version written by then, unless it was a deletion. Combines with \
                          every other parameter. Reads the type's versions back from that instant, at most 20,000 \
                          (422 beyond: use `cairn replay --until` for older moments of a busy type)."
    }));
    params
}

fn resource(resource_type: &str) -> Value {
    let mut r = writable_resource(resource_type);
    if resource_type == "Patient" {
        r["operation"] = json!([{
            "name": "timeline",
            "definition": "urn:cairn:OperationDefinition/Patient-timeline",
            "documentation": "GET Patient/{id}/$timeline?from=&to=[&_format=csv]: every event that touched the patient in the window (writes with the versions before and after, reads and searches that returned the patient's data and by whom, the sign-ins and token grants behind them), oldest first, from the event log. Reads the whole log. Needs AuditEvent search access covering the patient; recorded in the trail."
        }]);
    }
    r
}

fn writable_resource(resource_type: &str) -> Value {
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
        "searchParam": search_params(resource_type),
    })
}

/// AuditEvent and Provenance: read and searched, written only by the server.
fn read_only_resource(resource_type: &str) -> Value {
    json!({
        "type": resource_type,
        "documentation": if resource_type == "AuditEvent" {
            "Written by the server's audit projection from the event log; read-only (writes answer 405). Needs a scope naming the type (user/AuditEvent.rs); a patient-context token reads its own compartment's records. Compliance reports: GET AuditEvent/$report?kind=patient-access|user-activity|failed-logins|security-alerts&from=&to=[&patient=|&user=][&_format=csv]."
        } else {
            "Written by the server's audit projection from the event log; read-only (writes answer 405). Needs a scope naming the type (user/Provenance.rs); a patient-context token reads its own compartment's records."
        },
        "interaction": [
            {"code": "read"}, {"code": "vread"}, {"code": "history-instance"}, {"code": "history-type"}, {"code": "search-type"}
        ],
        "versioning": "versioned",
        "readHistory": true,
        "searchParam": search_params(resource_type),
    })
}

/// The statement of this server; `view` is set on a read-only view of a replayed store, which
/// lists only the reading interactions.
pub fn capability_statement(base_url: &str, software_version: &str, view: Option<&str>) -> Value {
    let mut cs = full_statement(base_url, software_version);
    if let Some(view) = view {
        let rest = &mut cs["rest"][0];
        for r in rest["resource"].as_array_mut().into_iter().flatten() {
            let ty = r["type"].as_str().unwrap_or_default().to_owned();
            // The investigations read the live log: a view refuses them.
            *r = read_only_resource(&ty);
            r["documentation"] = format!("This server shows a {view}: read-only (writes answer 405).").into();
        }
        if let Some(rest) = rest.as_object_mut() {
            rest.remove("operation");
        }
        // Batches of reads are answered (their writes refused one by one); transactions are not.
        if let Some(system) = cs["rest"][0]["interaction"].as_array_mut() {
            system.retain(|i| i["code"] != "transaction");
        }
        let rest = &mut cs["rest"][0];
        rest["documentation"] = format!(
            "A read-only view of a {view}, rebuilt from the event log by `cairn replay`. Every access is recorded in the live audit trail. Search result parameters as on the live server."
        )
        .into();
    }
    cs
}

fn full_statement(base_url: &str, software_version: &str) -> Value {
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
            "documentation": "Every write is an event in a durable, hash-chained log before it is acknowledged; reads see every acknowledged write. Search result parameters: _count (default 50, max 1000), _offset, _sort (date, -date on Observation and AuditEvent; _lastUpdated, -_lastUpdated), _summary=count, _total=accurate, _elements. Prefer: handling=lenient ignores unknown search parameters. System-level _history leaves out AuditEvent and Provenance (see their type-level history).",
            "resource": RESOURCE_TYPES.iter().map(|t| resource(t)).chain(READ_ONLY_TYPES.iter().map(|t| read_only_resource(t))).collect::<Vec<_>>(),
            "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}],
            "operation": [{
                "name": "seen",
                "definition": "urn:cairn:OperationDefinition/seen",
                "documentation": "GET $seen?user=|client=&from=&to=[&_format=csv]: each read and search the user (or client) made in the window, with every resource version it returned, content included, reproduced from the event log. Reads the whole log. Needs access to every AuditEvent; recorded in the trail."
            }],
        }],
    })
}
