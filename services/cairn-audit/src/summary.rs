//! One AuditEvent flattened to the columns compliance reports and investigation timelines show.

use crate::codes::{CLIENT_ID_SYSTEM, JTI_SYSTEM};
use serde::Serialize;
use serde_json::Value;

/// What an AuditEvent says, flattened: the columns of the access reports and of timelines.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub recorded: String,
    /// C, R, U, D or E.
    pub action: String,
    /// The subtype's code: `read`, `search-type`, `create`, `ITI-71`, `110122`, ...
    pub interaction: String,
    /// `success`, or `failure (<code>): <why>`.
    pub outcome: String,
    /// The requestor: a Cairn user id, or the client acting for itself.
    pub user: String,
    pub fhir_user: String,
    pub client: String,
    pub address: String,
    /// `Patient/<id>` entities, space-separated.
    pub patient: String,
    /// The data entities (`Type/id/_history/n`), space-separated.
    pub resources: String,
    pub request_id: String,
    /// The access token's `jti`, when the record names one.
    pub jti: String,
}

fn text(v: &Value) -> String {
    v.as_str().map(str::to_owned).unwrap_or_default()
}

/// Flattens an AuditEvent (one this crate made) into a [`Summary`].
pub fn summarize(a: &Value) -> Summary {
    let agents = a["agent"].as_array().map(Vec::as_slice).unwrap_or_default();
    let requestor = agents.iter().find(|g| g["requestor"] == true).unwrap_or(&Value::Null);
    let client = agents
        .iter()
        .find_map(|g| {
            (g["who"]["identifier"]["system"] == CLIENT_ID_SYSTEM).then(|| text(&g["who"]["identifier"]["value"]))
        })
        .unwrap_or_default();
    let address = agents.iter().find_map(|g| g["network"]["address"].as_str()).unwrap_or_default().to_owned();
    let entities = a["entity"].as_array().map(Vec::as_slice).unwrap_or_default();
    // The token: an agent's policy (a request made with it), or an entity (a token granted).
    let jti = agents
        .iter()
        .flat_map(|g| g["policy"].as_array().map(Vec::as_slice).unwrap_or_default())
        .find_map(|p| p.as_str().and_then(|p| p.strip_prefix(JTI_SYSTEM)).and_then(|p| p.strip_prefix(':')))
        .map(str::to_owned)
        .or_else(|| {
            entities.iter().find_map(|e| {
                (e["what"]["identifier"]["system"] == JTI_SYSTEM).then(|| text(&e["what"]["identifier"]["value"]))
            })
        })
        .unwrap_or_default();
    // By the entity's role (object-role): 1 the patient, 4 the data.
    let refs = |role: &str| {
        entities
            .iter()
            .filter(|e| e["role"]["code"] == role)
            .filter_map(|e| e["what"]["reference"].as_str())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let request_id = entities
        .iter()
        .find(|e| e["type"]["code"] == "XrequestId")
        .map(|e| text(&e["what"]["identifier"]["value"]))
        .unwrap_or_default();
    Summary {
        recorded: text(&a["recorded"]),
        action: text(&a["action"]),
        interaction: text(&a["subtype"][0]["code"]),
        outcome: match a["outcome"].as_str() {
            Some("0") => "success".into(),
            Some(code) => format!("failure ({code}): {}", text(&a["outcomeDesc"])),
            None => String::new(),
        },
        user: requestor["altId"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| text(&requestor["who"]["identifier"]["value"])),
        fhir_user: text(&requestor["who"]["reference"]),
        client,
        address,
        patient: refs("1"),
        resources: refs("4"),
        request_id,
        jti,
    }
}
