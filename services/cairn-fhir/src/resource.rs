//! Parsing and validating the resources Cairn owns, before anything is appended.
//!
//! The resource is kept as the JSON the client sent (plus `id` and `meta`), so extensions and
//! elements we do not index survive a round trip. Validation checks what we rely on: well-formed
//! JSON without duplicate keys or absurd nesting, the right `resourceType`, no unknown elements, the
//! cardinality and types of the elements we index, and the data types of dates, instants, decimals,
//! quantities and references.

use crate::outcome::{Issue, IssueCode};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::fmt;

/// The resource types this server stores.
pub const RESOURCE_TYPES: [&str; 3] = ["Observation", "Patient", "Device"];

/// Deepest JSON nesting accepted. R4 resources of these types need far less; the bound keeps a
/// hostile document from exhausting the stack or the CPU.
pub const MAX_DEPTH: usize = 32;

/// The audit trail's types: read and searched through the API, written only by the server's audit
/// projection from the log.
pub const READ_ONLY_TYPES: [&str; 2] = ["AuditEvent", "Provenance"];

/// Whether clients may write resources of this type.
pub fn is_supported_type(t: &str) -> bool {
    RESOURCE_TYPES.contains(&t)
}

/// Whether the type can be read and searched (the writable types and the audit trail's).
pub fn is_readable_type(t: &str) -> bool {
    is_supported_type(t) || is_read_only_type(t)
}

pub fn is_read_only_type(t: &str) -> bool {
    READ_ONLY_TYPES.contains(&t)
}

/// Largest `X-Provenance` header accepted.
pub const MAX_X_PROVENANCE_BYTES: usize = 16 * 1024;

/// Checks the Provenance a client sends in `X-Provenance` with a write: a Provenance without
/// `target` and `recorded` (the server sets both), whose agents name who they are and whose
/// entities have a role and a `what`. Returns it as compact JSON text.
pub fn parse_x_provenance(text: &str) -> Result<String, Vec<Issue>> {
    let at = |e: &str| format!("X-Provenance.{e}");
    if text.len() > MAX_X_PROVENANCE_BYTES {
        return Err(vec![Issue::error(
            IssueCode::TooLong,
            format!("X-Provenance is {} bytes; the limit is {MAX_X_PROVENANCE_BYTES}", text.len()),
        )]);
    }
    let value = parse_json(text.as_bytes())?;
    let mut issues = Vec::new();
    let Some(obj) = value.as_object() else {
        return Err(vec![Issue::error(IssueCode::Structure, "X-Provenance must be a JSON object (a Provenance)")]);
    };
    if obj.get("resourceType").and_then(Value::as_str) != Some("Provenance") {
        issues.push(
            Issue::error(IssueCode::Invalid, "X-Provenance must be a Provenance resource").at(at("resourceType")),
        );
    }
    for set_by_server in ["target", "recorded"] {
        if obj.contains_key(set_by_server) {
            issues.push(
                Issue::error(
                    IssueCode::Invalid,
                    format!(
                        "X-Provenance must not carry `{set_by_server}`: the server sets it for each resource written"
                    ),
                )
                .at(at(set_by_server)),
            );
        }
    }
    let named = |who: &Value| {
        who.as_object().is_some_and(|w| ["reference", "identifier", "display"].iter().any(|k| w.contains_key(*k)))
    };
    for (i, agent) in obj.get("agent").and_then(Value::as_array).into_iter().flatten().enumerate() {
        if !agent.get("who").is_some_and(named) {
            issues.push(
                Issue::error(IssueCode::Required, "an agent needs `who` (a reference, identifier or display)")
                    .at(at(&format!("agent[{i}].who"))),
            );
        }
    }
    const ROLES: [&str; 5] = ["derivation", "revision", "quotation", "source", "removal"];
    for (i, entity) in obj.get("entity").and_then(Value::as_array).into_iter().flatten().enumerate() {
        if !entity.get("role").and_then(Value::as_str).is_some_and(|r| ROLES.contains(&r)) {
            issues.push(
                Issue::error(IssueCode::Value, format!("an entity's role is one of {}", ROLES.join(", ")))
                    .at(at(&format!("entity[{i}].role"))),
            );
        }
        if !entity.get("what").is_some_and(named) {
            issues
                .push(Issue::error(IssueCode::Required, "an entity needs `what`").at(at(&format!("entity[{i}].what"))));
        }
    }
    if issues.is_empty() { Ok(serde_json::to_string(&value).expect("JSON values serialize")) } else { Err(issues) }
}

/// Parses a request body as a FHIR JSON resource of `expected_type`, or explains every problem.
pub fn parse(body: &[u8], expected_type: &str) -> Result<Value, Vec<Issue>> {
    let value = parse_json(body)?;
    validate(&value, expected_type)?;
    Ok(value)
}

/// Strict JSON: UTF-8, no duplicate keys, bounded depth, numbers in range.
pub fn parse_json(body: &[u8]) -> Result<Value, Vec<Issue>> {
    if std::str::from_utf8(body).is_err() {
        return Err(vec![Issue::error(IssueCode::Structure, "the body is not valid UTF-8")]);
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let strict = StrictValue::deserialize_with_depth(&mut de, 0)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| vec![Issue::error(IssueCode::Structure, format!("malformed JSON: {e}"))])?;
    Ok(strict)
}

/// The key under which serde_json's `arbitrary_precision` passes a number's text.
const ARBITRARY_PRECISION_NUMBER: &str = "$serde_json::private::Number";

/// A JSON number from its text, refusing what no decimal can hold (`1e999`).
fn number_from_text(text: &str) -> Result<Value, String> {
    let finite = text.parse::<f64>().map(f64::is_finite).unwrap_or(false);
    if !finite {
        return Err(format!("number out of range: {text}"));
    }
    serde_json::from_str::<serde_json::Number>(text).map(Value::Number).map_err(|e| e.to_string())
}

struct StrictValue;

impl StrictValue {
    fn deserialize_with_depth<'de, D: Deserializer<'de>>(d: D, depth: usize) -> Result<Value, D::Error> {
        d.deserialize_any(StrictVisitor { depth })
    }
}

struct StrictVisitor {
    depth: usize,
}

struct Nested {
    depth: usize,
}

impl<'de> de::DeserializeSeed<'de> for Nested {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        StrictValue::deserialize_with_depth(d, self.depth)
    }
}

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v).map(Value::Number).ok_or_else(|| E::custom("number out of range"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(de::Error::custom(format!("nested deeper than {MAX_DEPTH} levels")));
        }
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Nested { depth: self.depth + 1 })? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(de::Error::custom(format!("nested deeper than {MAX_DEPTH} levels")));
        }
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.is_empty() && key == ARBITRARY_PRECISION_NUMBER {
                // serde_json hands numbers over as their text (feature `arbitrary_precision`), so a
                // decimal keeps its written precision (`5.10` stays `5.10`, as FHIR requires).
                let text: String = map.next_value()?;
                return number_from_text(&text).map_err(de::Error::custom);
            }
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate key `{key}`")));
            }
            let v = map.next_value_seed(Nested { depth: self.depth + 1 })?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// Element names of each type in R4 (4.0.1). `_name` siblings carry extensions of primitives.
fn known_elements(resource_type: &str) -> &'static [&'static str] {
    const OBSERVATION: &[&str] = &[
        "identifier",
        "basedOn",
        "partOf",
        "status",
        "category",
        "code",
        "subject",
        "focus",
        "encounter",
        "effectiveDateTime",
        "effectivePeriod",
        "effectiveTiming",
        "effectiveInstant",
        "issued",
        "performer",
        "valueQuantity",
        "valueCodeableConcept",
        "valueString",
        "valueBoolean",
        "valueInteger",
        "valueRange",
        "valueRatio",
        "valueSampledData",
        "valueTime",
        "valueDateTime",
        "valuePeriod",
        "dataAbsentReason",
        "interpretation",
        "note",
        "bodySite",
        "method",
        "specimen",
        "device",
        "referenceRange",
        "hasMember",
        "derivedFrom",
        "component",
    ];
    const PATIENT: &[&str] = &[
        "identifier",
        "active",
        "name",
        "telecom",
        "gender",
        "birthDate",
        "deceasedBoolean",
        "deceasedDateTime",
        "address",
        "maritalStatus",
        "multipleBirthBoolean",
        "multipleBirthInteger",
        "photo",
        "contact",
        "communication",
        "generalPractitioner",
        "managingOrganization",
        "link",
    ];
    const DEVICE: &[&str] = &[
        "identifier",
        "definition",
        "udiCarrier",
        "status",
        "statusReason",
        "distinctIdentifier",
        "manufacturer",
        "manufactureDate",
        "expirationDate",
        "lotNumber",
        "serialNumber",
        "deviceName",
        "modelNumber",
        "partNumber",
        "type",
        "specialization",
        "version",
        "property",
        "patient",
        "owner",
        "contact",
        "location",
        "url",
        "note",
        "safety",
        "parent",
    ];
    match resource_type {
        "Observation" => OBSERVATION,
        "Patient" => PATIENT,
        "Device" => DEVICE,
        _ => &[],
    }
}

fn is_known(resource_type: &str, key: &str) -> bool {
    const COMMON: &[&str] = &[
        "resourceType",
        "id",
        "meta",
        "implicitRules",
        "language",
        "text",
        "contained",
        "extension",
        "modifierExtension",
    ];
    let base = key.strip_prefix('_').unwrap_or(key);
    COMMON.contains(&base) || known_elements(resource_type).contains(&base)
}

/// Checks a parsed resource; collects every problem rather than stopping at the first.
pub fn validate(value: &Value, expected_type: &str) -> Result<(), Vec<Issue>> {
    let mut issues = Vec::new();
    let Some(obj) = value.as_object() else {
        return Err(vec![Issue::error(IssueCode::Structure, "a resource must be a JSON object")]);
    };
    match obj.get("resourceType").and_then(Value::as_str) {
        None => {
            return Err(vec![Issue::error(IssueCode::Required, "resourceType is missing").at("resourceType")]);
        }
        Some(t) if t != expected_type => {
            return Err(vec![
                Issue::error(
                    IssueCode::Invalid,
                    format!("resourceType `{t}` does not match the URL (`{expected_type}`)"),
                )
                .at("resourceType"),
            ]);
        }
        Some(_) => {}
    }
    for key in obj.keys() {
        if !is_known(expected_type, key) {
            issues.push(
                Issue::error(IssueCode::Structure, format!("unknown element `{key}`"))
                    .at(format!("{expected_type}.{key}")),
            );
        }
    }
    if let Some(id) = obj.get("id") {
        match id.as_str() {
            Some(s) if is_valid_id(s) => {}
            _ => issues.push(
                Issue::error(IssueCode::Value, "id must be 1-64 of A-Z a-z 0-9 - .").at(format!("{expected_type}.id")),
            ),
        }
    }
    if let Some(meta) = obj.get("meta")
        && !meta.is_object()
    {
        issues.push(Issue::error(IssueCode::Structure, "meta must be an object").at(format!("{expected_type}.meta")));
    }
    check_choice(obj, expected_type, "effective", &mut issues);
    check_choice(obj, expected_type, "value", &mut issues);
    check_choice(obj, expected_type, "deceased", &mut issues);
    check_choice(obj, expected_type, "multipleBirth", &mut issues);
    match expected_type {
        "Observation" => validate_observation(obj, &mut issues),
        "Patient" => validate_patient(obj, &mut issues),
        "Device" => validate_device(obj, &mut issues),
        _ => issues
            .push(Issue::error(IssueCode::NotSupported, format!("resource type `{expected_type}` is not supported"))),
    }
    if issues.is_empty() { Ok(()) } else { Err(issues) }
}

fn check_choice(obj: &Map<String, Value>, t: &str, prefix: &str, issues: &mut Vec<Issue>) {
    let present: Vec<&String> = obj
        .keys()
        .filter(|k| k.strip_prefix(prefix).is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase())))
        .collect();
    if present.len() > 1 {
        issues.push(
            Issue::error(IssueCode::Structure, format!("only one {prefix}[x] is allowed, found {present:?}"))
                .at(format!("{t}.{prefix}[x]")),
        );
    }
}

const OBSERVATION_STATUS: &[&str] =
    &["registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error", "unknown"];

fn validate_observation(obj: &Map<String, Value>, issues: &mut Vec<Issue>) {
    let at = |e: &str| format!("Observation.{e}");
    match obj.get("status") {
        None => issues.push(Issue::error(IssueCode::Required, "Observation.status is required").at(at("status"))),
        Some(Value::String(s)) if OBSERVATION_STATUS.contains(&s.as_str()) => {}
        Some(other) => issues.push(
            Issue::error(IssueCode::Value, format!("status {other} is not one of {}", OBSERVATION_STATUS.join(", ")))
                .at(at("status")),
        ),
    }
    match obj.get("code") {
        None => issues.push(Issue::error(IssueCode::Required, "Observation.code is required").at(at("code"))),
        Some(c) => check_codeable_concept(c, &at("code"), issues),
    }
    if let Some(c) = obj.get("category") {
        check_array(c, &at("category"), issues, check_codeable_concept);
    }
    if let Some(ids) = obj.get("identifier") {
        check_array(ids, &at("identifier"), issues, check_identifier);
    }
    for r in ["subject", "device", "encounter", "specimen"] {
        if let Some(v) = obj.get(r) {
            check_reference(v, &at(r), issues);
        }
    }
    if let Some(v) = obj.get("effectiveDateTime") {
        check_primitive(v, &at("effectiveDateTime"), issues, "dateTime", is_date_time);
    }
    if let Some(v) = obj.get("effectiveInstant") {
        check_primitive(v, &at("effectiveInstant"), issues, "instant", is_instant);
    }
    if let Some(v) = obj.get("issued") {
        check_primitive(v, &at("issued"), issues, "instant", is_instant);
    }
    if let Some(v) = obj.get("effectivePeriod") {
        check_period(v, &at("effectivePeriod"), issues);
    }
    if let Some(v) = obj.get("valueQuantity") {
        check_quantity(v, &at("valueQuantity"), issues);
    }
    if let Some(v) = obj.get("valueDateTime") {
        check_primitive(v, &at("valueDateTime"), issues, "dateTime", is_date_time);
    }
    if let Some(v) = obj.get("valueInteger")
        && v.as_i64().is_none_or(|n| i32::try_from(n).is_err())
    {
        issues.push(Issue::error(IssueCode::Value, "valueInteger must be a 32-bit integer").at(at("valueInteger")));
    }
    if let Some(components) = obj.get("component") {
        check_array(components, &at("component"), issues, |c, path, issues| {
            match c.get("code") {
                None => {
                    issues.push(Issue::error(IssueCode::Required, "component.code is required").at(path.to_owned()))
                }
                Some(code) => check_codeable_concept(code, &format!("{path}.code"), issues),
            }
            if let Some(q) = c.get("valueQuantity") {
                check_quantity(q, &format!("{path}.valueQuantity"), issues);
            }
        });
    }
}

fn validate_patient(obj: &Map<String, Value>, issues: &mut Vec<Issue>) {
    let at = |e: &str| format!("Patient.{e}");
    if let Some(ids) = obj.get("identifier") {
        check_array(ids, &at("identifier"), issues, check_identifier);
    }
    if let Some(v) = obj.get("birthDate") {
        check_primitive(v, &at("birthDate"), issues, "date", is_date);
    }
    if let Some(v) = obj.get("gender")
        && !matches!(v.as_str(), Some("male" | "female" | "other" | "unknown"))
    {
        issues.push(Issue::error(IssueCode::Value, "gender must be male, female, other or unknown").at(at("gender")));
    }
    if let Some(v) = obj.get("active")
        && !v.is_boolean()
    {
        issues.push(Issue::error(IssueCode::Value, "active must be a boolean").at(at("active")));
    }
    if let Some(names) = obj.get("name") {
        check_array(names, &at("name"), issues, |n, path, issues| {
            if !n.is_object() {
                issues.push(Issue::error(IssueCode::Structure, "a HumanName must be an object").at(path.to_owned()));
                return;
            }
            if let Some(f) = n.get("family")
                && !f.is_string()
            {
                issues.push(Issue::error(IssueCode::Value, "family must be a string").at(format!("{path}.family")));
            }
            if let Some(g) = n.get("given")
                && !g.as_array().is_some_and(|a| a.iter().all(Value::is_string))
            {
                issues.push(
                    Issue::error(IssueCode::Value, "given must be an array of strings").at(format!("{path}.given")),
                );
            }
        });
    }
    if let Some(v) = obj.get("deceasedDateTime") {
        check_primitive(v, &at("deceasedDateTime"), issues, "dateTime", is_date_time);
    }
}

const DEVICE_STATUS: &[&str] = &["active", "inactive", "entered-in-error", "unknown"];

fn validate_device(obj: &Map<String, Value>, issues: &mut Vec<Issue>) {
    let at = |e: &str| format!("Device.{e}");
    if let Some(ids) = obj.get("identifier") {
        check_array(ids, &at("identifier"), issues, check_identifier);
    }
    if let Some(v) = obj.get("status")
        && !v.as_str().is_some_and(|s| DEVICE_STATUS.contains(&s))
    {
        issues.push(
            Issue::error(IssueCode::Value, format!("status must be one of {}", DEVICE_STATUS.join(", ")))
                .at(at("status")),
        );
    }
    if let Some(t) = obj.get("type") {
        check_codeable_concept(t, &at("type"), issues);
    }
    for r in ["patient", "owner", "location", "parent"] {
        if let Some(v) = obj.get(r) {
            check_reference(v, &at(r), issues);
        }
    }
    for d in ["manufactureDate", "expirationDate"] {
        if let Some(v) = obj.get(d) {
            check_primitive(v, &at(d), issues, "dateTime", is_date_time);
        }
    }
}

fn check_array(v: &Value, path: &str, issues: &mut Vec<Issue>, each: impl Fn(&Value, &str, &mut Vec<Issue>)) {
    match v.as_array() {
        None => issues.push(Issue::error(IssueCode::Structure, "must be an array").at(path.to_owned())),
        Some(items) if items.is_empty() => issues.push(
            Issue::error(IssueCode::Structure, "an array must not be empty (omit the element)").at(path.to_owned()),
        ),
        Some(items) => {
            for (i, item) in items.iter().enumerate() {
                each(item, &format!("{path}[{i}]"), issues);
            }
        }
    }
}

fn check_primitive(v: &Value, path: &str, issues: &mut Vec<Issue>, type_name: &str, ok: fn(&str) -> bool) {
    match v.as_str() {
        Some(s) if ok(s) => {}
        _ => issues
            .push(Issue::error(IssueCode::Value, format!("{v} is not a valid FHIR {type_name}")).at(path.to_owned())),
    }
}

fn check_codeable_concept(v: &Value, path: &str, issues: &mut Vec<Issue>) {
    let Some(obj) = v.as_object() else {
        issues.push(Issue::error(IssueCode::Structure, "a CodeableConcept must be an object").at(path.to_owned()));
        return;
    };
    if let Some(codings) = obj.get("coding") {
        check_array(codings, &format!("{path}.coding"), issues, |c, p, issues| {
            let Some(c) = c.as_object() else {
                issues.push(Issue::error(IssueCode::Structure, "a Coding must be an object").at(p.to_owned()));
                return;
            };
            for field in ["system", "code", "display", "version"] {
                if c.get(field).is_some_and(|f| f.as_str().is_none_or(|s| s.trim().is_empty())) {
                    issues.push(
                        Issue::error(IssueCode::Value, format!("{field} must be a non-empty string"))
                            .at(format!("{p}.{field}")),
                    );
                }
            }
        });
    }
    if obj.get("text").is_some_and(|t| !t.is_string()) {
        issues.push(Issue::error(IssueCode::Value, "text must be a string").at(format!("{path}.text")));
    }
    if !obj.contains_key("coding") && !obj.contains_key("text") {
        issues.push(Issue::error(IssueCode::Required, "a CodeableConcept needs coding or text").at(path.to_owned()));
    }
}

fn check_identifier(v: &Value, path: &str, issues: &mut Vec<Issue>) {
    let Some(obj) = v.as_object() else {
        issues.push(Issue::error(IssueCode::Structure, "an Identifier must be an object").at(path.to_owned()));
        return;
    };
    for field in ["system", "value"] {
        if obj.get(field).is_some_and(|f| f.as_str().is_none_or(|s| s.is_empty())) {
            issues.push(
                Issue::error(IssueCode::Value, format!("{field} must be a non-empty string"))
                    .at(format!("{path}.{field}")),
            );
        }
    }
}

/// A literal reference must be `Type/id`, `Type/id/_history/n`, an absolute URL, `#local` or a
/// `urn:uuid:` (the latter only inside a Bundle, resolved before storing).
fn check_reference(v: &Value, path: &str, issues: &mut Vec<Issue>) {
    let Some(obj) = v.as_object() else {
        issues.push(Issue::error(IssueCode::Structure, "a Reference must be an object").at(path.to_owned()));
        return;
    };
    if let Some(r) = obj.get("reference") {
        match r.as_str() {
            Some(s) if is_valid_reference(s) => {}
            _ => issues.push(
                Issue::error(
                    IssueCode::Value,
                    format!("{r} is not a valid reference (Type/id, an absolute URL or #id)"),
                )
                .at(format!("{path}.reference")),
            ),
        }
    }
}

pub fn is_valid_reference(s: &str) -> bool {
    if let Some(local) = s.strip_prefix('#') {
        return !local.is_empty();
    }
    if s.starts_with("urn:uuid:") || s.starts_with("urn:oid:") {
        return s.len() > 9;
    }
    if s.starts_with("http://") || s.starts_with("https://") {
        return !s.contains(char::is_whitespace);
    }
    let parts: Vec<&str> = s.split('/').collect();
    match parts.as_slice() {
        [t, id] => is_type_name(t) && is_valid_id(id),
        [t, id, "_history", v] => is_type_name(t) && is_valid_id(id) && v.parse::<u64>().is_ok(),
        _ => false,
    }
}

fn is_type_name(t: &str) -> bool {
    t.starts_with(|c: char| c.is_ascii_uppercase()) && t.chars().all(|c| c.is_ascii_alphanumeric())
}

/// FHIR id: `[A-Za-z0-9\-\.]{1,64}`.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// FHIR date: `YYYY`, `YYYY-MM` or `YYYY-MM-DD`, with a real calendar date.
pub fn is_date(s: &str) -> bool {
    match s.len() {
        4 => s.bytes().all(|b| b.is_ascii_digit()),
        7 => chrono::NaiveDate::parse_from_str(&format!("{s}-01"), "%Y-%m-%d").is_ok() && s.as_bytes()[4] == b'-',
        10 => chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok(),
        _ => false,
    }
}

/// FHIR dateTime: a date, or a date with a time and a zone (seconds required by R4, fraction optional).
pub fn is_date_time(s: &str) -> bool {
    is_date(s) || is_instant(s)
}

/// FHIR instant: full date and time with seconds and a zone.
pub fn is_instant(s: &str) -> bool {
    s.len() >= 20 && s.as_bytes()[10] == b'T' && chrono::DateTime::parse_from_rfc3339(s).is_ok()
}

fn check_period(v: &Value, path: &str, issues: &mut Vec<Issue>) {
    let Some(obj) = v.as_object() else {
        issues.push(Issue::error(IssueCode::Structure, "a Period must be an object").at(path.to_owned()));
        return;
    };
    for f in ["start", "end"] {
        if let Some(x) = obj.get(f) {
            check_primitive(x, &format!("{path}.{f}"), issues, "dateTime", is_date_time);
        }
    }
    if let (Some(s), Some(e)) = (obj.get("start").and_then(Value::as_str), obj.get("end").and_then(Value::as_str))
        && let (Ok(s), Ok(e)) = (chrono::DateTime::parse_from_rfc3339(s), chrono::DateTime::parse_from_rfc3339(e))
        && e < s
    {
        issues.push(Issue::error(IssueCode::Value, "Period.end is before Period.start").at(path.to_owned()));
    }
}

pub const UCUM: &str = "http://unitsofmeasure.org";

fn check_quantity(v: &Value, path: &str, issues: &mut Vec<Issue>) {
    let Some(obj) = v.as_object() else {
        issues.push(Issue::error(IssueCode::Structure, "a Quantity must be an object").at(path.to_owned()));
        return;
    };
    if let Some(value) = obj.get("value")
        && !value.is_number()
    {
        issues.push(Issue::error(IssueCode::Value, format!("{value} is not a decimal")).at(format!("{path}.value")));
    }
    if let Some(c) = obj.get("comparator")
        && !matches!(c.as_str(), Some("<" | "<=" | ">=" | ">"))
    {
        issues
            .push(Issue::error(IssueCode::Value, "comparator must be <, <=, >= or >").at(format!("{path}.comparator")));
    }
    for f in ["unit", "system", "code"] {
        if obj.get(f).is_some_and(|x| x.as_str().is_none_or(|s| s.is_empty())) {
            issues.push(
                Issue::error(IssueCode::Value, format!("{f} must be a non-empty string")).at(format!("{path}.{f}")),
            );
        }
    }
    if obj.contains_key("code") && !obj.contains_key("system") {
        issues.push(Issue::error(IssueCode::Required, "a coded Quantity needs a system").at(format!("{path}.system")));
    }
    if obj.get("system").and_then(Value::as_str) == Some(UCUM) {
        match obj.get("code").and_then(Value::as_str) {
            Some(code) if is_plausible_ucum(code) => {}
            Some(code) => issues.push(
                Issue::error(IssueCode::Value, format!("`{code}` is not a UCUM unit code")).at(format!("{path}.code")),
            ),
            None => issues
                .push(Issue::error(IssueCode::Required, "a UCUM Quantity needs a code").at(format!("{path}.code"))),
        }
    }
}

/// UCUM codes are printable ASCII without spaces; common clinical units are checked exactly.
fn is_plausible_ucum(code: &str) -> bool {
    !code.is_empty() && code.bytes().all(|b| b.is_ascii_graphic()) && !code.contains(['"', '{', '}'])
        || code.starts_with('{')
}

/// Sets `id` and the server-owned parts of `meta`, keeping everything else the client sent.
pub fn stamp(resource: &mut Value, id: &str, version_id: u64, last_updated: &str) {
    let obj = resource.as_object_mut().expect("validated resources are objects");
    obj.insert("id".into(), Value::String(id.to_owned()));
    let meta = obj.entry("meta").or_insert_with(|| Value::Object(Map::new()));
    if let Some(meta) = meta.as_object_mut() {
        meta.insert("versionId".into(), Value::String(version_id.to_string()));
        meta.insert("lastUpdated".into(), Value::String(last_updated.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn glucose() -> Value {
        json!({
            "resourceType": "Observation",
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0", "display": "Glucose [Mass/volume] in Blood"}]},
            "subject": {"reference": "Patient/p1"},
            "device": {"reference": "Device/meter-7"},
            "identifier": [{"system": "urn:ietf:rfc:3986", "value": "urn:uuid:2b1f0f6e-3c7a-4e8e-9f59-0c5d2b0f2a11"}],
            "effectiveDateTime": "2026-11-28T08:30:00+01:00",
            "valueQuantity": {"value": 104, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
            "extension": [{"url": "http://example.org/x", "valueString": "kept"}]
        })
    }

    fn codes(r: Result<Value, Vec<Issue>>) -> Vec<String> {
        r.unwrap_err().into_iter().map(|i| format!("{}: {}", i.expression.unwrap_or_default(), i.diagnostics)).collect()
    }

    #[test]
    fn a_realistic_reading_is_accepted_unchanged() {
        let body = serde_json::to_vec(&glucose()).unwrap();
        assert_eq!(parse(&body, "Observation").unwrap(), glucose());
    }

    #[test]
    fn malformed_documents_are_refused() {
        assert!(codes(parse(b"{", "Observation"))[0].contains("malformed JSON"));
        assert!(codes(parse(&[0xff, 0xfe], "Observation"))[0].contains("UTF-8"));
        let dup = br#"{"resourceType":"Observation","status":"final","status":"final","code":{"text":"x"}}"#;
        assert!(codes(parse(dup, "Observation"))[0].contains("duplicate key `status`"));
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert!(codes(parse(deep.as_bytes(), "Observation"))[0].contains("nested deeper"));
        assert!(
            codes(parse(br#"{"resourceType":"Observation","x":1e999}"#, "Observation"))[0].contains("malformed JSON")
        );
        assert!(codes(parse(b"[]", "Observation"))[0].contains("object"));
    }

    #[test]
    fn element_rules_are_enforced() {
        let mut r = glucose();
        r["resourceType"] = "Patient".into();
        assert!(codes(parse(&serde_json::to_vec(&r).unwrap(), "Observation"))[0].contains("does not match"));

        let mut r = glucose();
        r.as_object_mut().unwrap().remove("status");
        r.as_object_mut().unwrap().remove("code");
        r["bogus"] = 1.into();
        r["effectiveDateTime"] = "2026-02-30".into();
        r["valueQuantity"]["value"] = "104".into();
        r["subject"]["reference"] = "Patient/has space".into();
        r["effectiveInstant"] = "2026-11-28T08:30:00Z".into();
        let found = codes(parse(&serde_json::to_vec(&r).unwrap(), "Observation"));
        for expected in [
            "Observation.status: Observation.status is required",
            "Observation.code: Observation.code is required",
            "Observation.bogus: unknown element `bogus`",
            "Observation.effectiveDateTime",
            "Observation.valueQuantity.value",
            "Observation.subject.reference",
            "Observation.effective[x]",
        ] {
            assert!(found.iter().any(|f| f.starts_with(expected)), "missing {expected}: {found:#?}");
        }
    }

    #[test]
    fn dates_and_instants_follow_fhir() {
        for ok in ["2026", "2026-11", "2026-11-28", "2026-11-28T08:30:00Z", "2026-11-28T08:30:00.123+01:00"] {
            assert!(is_date_time(ok), "{ok}");
        }
        for bad in ["26", "2026-13", "2026-11-31", "2026-11-28T08:30", "2026-11-28T08:30:00", "2026-11-28 08:30:00Z"] {
            assert!(!is_date_time(bad), "{bad}");
        }
        assert!(is_instant("2026-11-28T08:30:00Z") && !is_instant("2026-11-28"));
    }

    #[test]
    fn decimals_keep_their_written_precision() {
        let body = br#"{"resourceType":"Observation","status":"final","code":{"text":"g"},"valueQuantity":{"value":5.10,"unit":"mmol/L"},"component":[{"code":{"text":"x"},"valueQuantity":{"value":104.00}}]}"#;
        let v = parse(body, "Observation").unwrap();
        let text = serde_json::to_string(&v).unwrap();
        assert!(text.contains("\"value\":5.10") && text.contains("\"value\":104.00"), "{text}");
        assert_eq!(v["valueQuantity"]["value"].as_f64(), Some(5.1));
    }

    #[test]
    fn stamping_keeps_client_meta() {
        let mut r = glucose();
        r["meta"] = json!({"profile": ["http://example.org/p"], "versionId": "99"});
        stamp(&mut r, "abc", 3, "2026-11-28T10:00:00.000Z");
        assert_eq!(r["id"], "abc");
        assert_eq!(r["meta"]["versionId"], "3");
        assert_eq!(r["meta"]["profile"][0], "http://example.org/p");
        assert_eq!(r["extension"][0]["valueString"], "kept");
    }
}

/// Property tests: arbitrary bytes and arbitrary mutations of a valid reading never panic the parser
/// or the validator; whatever is accepted is an object of the right type that survives a
/// serialize-parse round trip unchanged.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn base() -> Value {
        serde_json::json!({
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
            "subject": {"reference": "Patient/p1"},
            "effectiveDateTime": "2026-11-28T08:30:00Z",
            "valueQuantity": {"value": 104, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}
        })
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
            ".{0,12}".prop_map(Value::String),
            prop_oneof![Just("2026-02-30"), Just("2026-11-28T08:30:00Z"), Just("Patient/x"), Just("final"), Just("")]
                .prop_map(|s| Value::String(s.to_owned())),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-zA-Z_]{1,10}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    const FIELDS: &[&str] = &[
        "status",
        "code",
        "subject",
        "effectiveDateTime",
        "valueQuantity",
        "category",
        "identifier",
        "device",
        "effectivePeriod",
        "component",
        "id",
        "meta",
        "bogus",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(&bytes, "Observation");
        }

        #[test]
        fn mutated_readings_are_accepted_only_when_sound(field in 0..FIELDS.len(), replacement in arb_json(), remove in any::<bool>()) {
            let mut r = base();
            let name = FIELDS[field];
            if remove {
                r.as_object_mut().unwrap().remove(name);
            } else {
                r[name] = replacement;
            }
            let bytes = serde_json::to_vec(&r).unwrap();
            match parse(&bytes, "Observation") {
                Ok(v) => {
                    prop_assert_eq!(&v, &r);
                    prop_assert_eq!(v["resourceType"].as_str(), Some("Observation"));
                    prop_assert!(v.get("status").and_then(Value::as_str).is_some(), "accepted without a status");
                    prop_assert!(v.get("code").is_some(), "accepted without a code");
                    prop_assert!(v.get("bogus").is_none(), "accepted an unknown element");
                    let again = parse(&serde_json::to_vec(&v).unwrap(), "Observation").unwrap();
                    prop_assert_eq!(again, v);
                }
                Err(issues) => prop_assert!(!issues.is_empty()),
            }
        }
    }

    #[test]
    fn x_provenance_is_checked_before_anything_is_written() {
        let ok = r#"{"resourceType":"Provenance","agent":[{"who":{"reference":"Device/m-1"}}],"entity":[{"role":"source","what":{"display":"upload 7"}}]}"#;
        assert!(parse_x_provenance(ok).is_ok());
        let problems = |t: &str| {
            parse_x_provenance(t).unwrap_err().iter().map(|i| i.diagnostics.clone()).collect::<Vec<_>>().join(" | ")
        };
        assert!(problems("[]").contains("JSON object"));
        assert!(problems("{").contains("malformed JSON"));
        assert!(problems(r#"{"resourceType":"Observation"}"#).contains("Provenance resource"));
        assert!(
            problems(r#"{"resourceType":"Provenance","target":[],"recorded":"2026-01-01T00:00:00Z"}"#)
                .contains("`recorded`")
        );
        assert!(problems(r#"{"resourceType":"Provenance","agent":[{"type":{}}]}"#).contains("needs `who`"));
        assert!(
            problems(r#"{"resourceType":"Provenance","entity":[{"role":"inspiration","what":{"display":"x"}}]}"#)
                .contains("role")
        );
        assert!(
            problems(&format!(r#"{{"resourceType":"Provenance","text":"{}"}}"#, "x".repeat(MAX_X_PROVENANCE_BYTES)))
                .contains("limit")
        );
    }
}
