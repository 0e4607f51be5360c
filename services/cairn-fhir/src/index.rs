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
}
