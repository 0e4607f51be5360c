//! The envelope of every fact Cairn records, and every payload type.
//!
//! An [`Event`] is what the platform appends to its log: an authentication, a token grant, a FHIR
//! write, a FHIR read or search. Everything else (the FHIR store, AuditEvent, Provenance, revocation
//! lists) is derived from events, so this crate is the contract between the writers and the
//! projectors. It knows nothing of HTTP, Kafka, CQL or storage.
//!
//! Encoding: an event is stored as the JSON produced by [`Event::canonical_bytes`]. Those exact bytes
//! are what the log chains (`hash = SHA-256(prev_hash || SHA-256(canonical bytes))`); the chain fields
//! `prev_hash` and `hash` are therefore *not* part of the canonical bytes: the log fills them in when
//! an event is read back (see `cairn-log`).
//!
//! Each event type has a JSON Schema in `schemas/events/<type>.schema.json`; a test validates a
//! sample of every type against it, and [`EventType::ALL`] plus the exhaustive `match` in
//! [`Payload::event_type`] make it impossible to add a type without a schema test.

mod payload;
mod time;

pub use payload::*;
pub use time::Timestamp;

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// The envelope version written by this build. Bump it when an envelope or payload field changes
/// meaning; readers keep accepting every older version.
pub const SCHEMA_VERSION: u32 = 1;

/// Every kind of fact Cairn records. The dotted name is the wire form (`type` in the envelope).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    AuthLoginSucceeded,
    AuthLoginFailed,
    AuthTokenIssued,
    AuthTokenRevoked,
    AuthClientRegistered,
    AuthClientDisabled,
    AuthUserCreated,
    AuthUserDisabled,
    AuthKeyPublished,
    AuthTokenRefused,
    AuthTokenIntrospected,
    AuthConsentRecorded,
    AuthCodeIssued,
    AuthCodeRedeemed,
    AuthLogout,
    AuthIdpRegistered,
    AuthIdpDisabled,
    AuthIdentityLinked,
    FhirResourceCreated,
    FhirResourceUpdated,
    FhirResourceDeleted,
    FhirAccessRead,
    FhirAccessSearch,
    FhirRequestRefused,
}

impl EventType {
    pub const ALL: [EventType; 24] = [
        EventType::AuthLoginSucceeded,
        EventType::AuthLoginFailed,
        EventType::AuthTokenIssued,
        EventType::AuthTokenRevoked,
        EventType::AuthClientRegistered,
        EventType::AuthClientDisabled,
        EventType::AuthUserCreated,
        EventType::AuthUserDisabled,
        EventType::AuthKeyPublished,
        EventType::AuthTokenRefused,
        EventType::AuthTokenIntrospected,
        EventType::AuthConsentRecorded,
        EventType::AuthCodeIssued,
        EventType::AuthCodeRedeemed,
        EventType::AuthLogout,
        EventType::AuthIdpRegistered,
        EventType::AuthIdpDisabled,
        EventType::AuthIdentityLinked,
        EventType::FhirResourceCreated,
        EventType::FhirResourceUpdated,
        EventType::FhirResourceDeleted,
        EventType::FhirAccessRead,
        EventType::FhirAccessSearch,
        EventType::FhirRequestRefused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::AuthLoginSucceeded => "auth.login.succeeded",
            EventType::AuthLoginFailed => "auth.login.failed",
            EventType::AuthTokenIssued => "auth.token.issued",
            EventType::AuthTokenRevoked => "auth.token.revoked",
            EventType::AuthClientRegistered => "auth.client.registered",
            EventType::AuthClientDisabled => "auth.client.disabled",
            EventType::AuthUserCreated => "auth.user.created",
            EventType::AuthUserDisabled => "auth.user.disabled",
            EventType::AuthKeyPublished => "auth.key.published",
            EventType::AuthTokenRefused => "auth.token.refused",
            EventType::AuthTokenIntrospected => "auth.token.introspected",
            EventType::AuthConsentRecorded => "auth.consent.recorded",
            EventType::AuthCodeIssued => "auth.code.issued",
            EventType::AuthCodeRedeemed => "auth.code.redeemed",
            EventType::AuthLogout => "auth.logout",
            EventType::AuthIdpRegistered => "auth.idp.registered",
            EventType::AuthIdpDisabled => "auth.idp.disabled",
            EventType::AuthIdentityLinked => "auth.identity.linked",
            EventType::FhirResourceCreated => "fhir.resource.created",
            EventType::FhirResourceUpdated => "fhir.resource.updated",
            EventType::FhirResourceDeleted => "fhir.resource.deleted",
            EventType::FhirAccessRead => "fhir.access.read",
            EventType::FhirAccessSearch => "fhir.access.search",
            EventType::FhirRequestRefused => "fhir.request.refused",
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventType {
    type Err = EventError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s).ok_or_else(|| EventError::UnknownType(s.to_owned()))
    }
}

impl Serialize for EventType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EventType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Who performed the action. Every field is optional: a failed login has no subject yet, a device
/// gateway has a client but no user, an anonymous local-development request has nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The `jti` of the access token the request carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// The FHIR resource that represents the user, e.g. `Practitioner/123`.
    #[serde(default, rename = "fhirUser", skip_serializing_if = "Option::is_none")]
    pub fhir_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// Who vouched for the user, when they signed in through an upstream OpenID provider (carried
    /// by the tokens their sign-in produced, so every access names it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authenticator: Option<Authenticator>,
}

/// A SHA-256 digest in the hash chain, written as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChainHash(pub [u8; 32]);

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChainHash({})", hex::encode(self.0))
    }
}

impl fmt::Display for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl FromStr for ChainHash {
    type Err = EventError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| EventError::BadHash(s.to_owned()))?;
        Ok(ChainHash(out))
    }
}

impl Serialize for ChainHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for ChainHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One recorded fact. See the crate documentation for the encoding rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// UUIDv7: time-ordered, so ids sort roughly by creation.
    pub id: Uuid,
    pub schema_version: u32,
    pub occurred_at: Timestamp,
    pub actor: Actor,
    pub request_id: Option<String>,
    /// The patient compartment this event belongs to, as a logical id (`Patient/<id>`), when known.
    pub patient: Option<String>,
    pub payload: Payload,
    /// Filled in by the log when the event is read back; never part of the canonical bytes.
    pub prev_hash: Option<ChainHash>,
    /// Filled in by the log when the event is read back; never part of the canonical bytes.
    pub hash: Option<ChainHash>,
}

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("unknown event type `{0}`")]
    UnknownType(String),
    #[error("`{0}` is not a SHA-256 hex digest")]
    BadHash(String),
    #[error("malformed event: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("event schema_version {found} is newer than this build understands ({supported})")]
    TooNew { found: u32, supported: u32 },
}

impl Event {
    /// A new event with a fresh UUIDv7 and the current time, truncated to milliseconds.
    pub fn new(payload: impl Into<Payload>) -> Self {
        Event {
            id: Uuid::now_v7(),
            schema_version: SCHEMA_VERSION,
            occurred_at: Timestamp::now(),
            actor: Actor::default(),
            request_id: None,
            patient: None,
            payload: payload.into(),
            prev_hash: None,
            hash: None,
        }
    }

    pub fn with_actor(mut self, actor: Actor) -> Self {
        self.actor = actor;
        self
    }

    pub fn with_request_id(mut self, request_id: impl Into<String>) -> Self {
        self.request_id = Some(request_id.into());
        self
    }

    pub fn with_patient(mut self, patient: impl Into<String>) -> Self {
        self.patient = Some(patient.into());
        self
    }

    pub fn event_type(&self) -> EventType {
        self.payload.event_type()
    }

    /// The bytes stored in the log and covered by the hash chain: compact JSON with a fixed field
    /// order, without the chain fields.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&WireRef::from(self)).expect("events always serialize")
    }

    /// [`Event::canonical_bytes`] as a JSON value, without reading the text back to check it (as
    /// `RawValue::from_string` would): what the audit trail stores as a record's fact.
    pub fn canonical_raw(&self) -> Box<serde_json::value::RawValue> {
        serde_json::value::to_raw_value(&WireRef::from(self)).expect("events always serialize")
    }

    /// Parses canonical bytes read from the log. The chain fields stay `None`; the log sets them.
    pub fn from_canonical_bytes(bytes: &[u8]) -> Result<Event, EventError> {
        let wire: WireOwned = serde_json::from_slice(bytes)?;
        wire.into_event()
    }

    /// The type of an event in canonical bytes, read without parsing the rest (the type is the
    /// second field, right after the id). `None` if the bytes do not look canonical: parse them.
    pub fn peek_type(bytes: &[u8]) -> Option<EventType> {
        let rest = bytes.strip_prefix(br#"{"id":""#)?;
        let rest = rest.get(36..)?.strip_prefix(br#"","type":""#)?;
        let end = rest.iter().take(64).position(|b| *b == b'"')?;
        std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
    }

    /// The full envelope as JSON, chain fields included when known (used by `cairn log tail`).
    pub fn to_json_with_chain(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(WireRef::from(self)).expect("events always serialize");
        if let Some(map) = v.as_object_mut() {
            if let Some(h) = self.prev_hash {
                map.insert("prev_hash".into(), serde_json::Value::String(h.to_string()));
            }
            if let Some(h) = self.hash {
                map.insert("hash".into(), serde_json::Value::String(h.to_string()));
            }
        }
        v
    }
}

/// Field order here is the canonical order of the stored JSON.
#[derive(Serialize)]
struct WireRef<'a> {
    id: &'a Uuid,
    #[serde(rename = "type")]
    event_type: EventType,
    schema_version: u32,
    occurred_at: &'a Timestamp,
    actor: &'a Actor,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patient: &'a Option<String>,
    payload: PayloadRef<'a>,
}

impl<'a> From<&'a Event> for WireRef<'a> {
    fn from(e: &'a Event) -> Self {
        WireRef {
            id: &e.id,
            event_type: e.event_type(),
            schema_version: e.schema_version,
            occurred_at: &e.occurred_at,
            actor: &e.actor,
            request_id: &e.request_id,
            patient: &e.patient,
            payload: PayloadRef(&e.payload),
        }
    }
}

/// An event as read from its JSON: the envelope's fields, and the payload read in place once the
/// type (and a schema version this build reads) came before it, as they do in canonical bytes. A
/// payload that comes first (`cairn log tail` output, whose keys are sorted) is kept as text and
/// read after. Reading it in place spares a second pass over a write's resource and a copy of it
/// (the projector's hot path, docs/performance.md). Written out because serde's derive cannot hand
/// one field's value to the reading of another; it accepts what the derive with
/// `deny_unknown_fields` accepted, in a JSON object.
struct WireOwned {
    id: Uuid,
    event_type: EventType,
    schema_version: u32,
    occurred_at: Timestamp,
    actor: Actor,
    request_id: Option<String>,
    patient: Option<String>,
    payload: WirePayload,
}

// Lives on the stack while one event is read; boxing the payload would cost an allocation per event.
#[allow(clippy::large_enum_variant)]
enum WirePayload {
    Read(Payload),
    Text(Box<serde_json::value::RawValue>),
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum WireField {
    Id,
    Type,
    SchemaVersion,
    OccurredAt,
    Actor,
    RequestId,
    Patient,
    Payload,
    // Accepted (and ignored) so that `cairn log tail` output can be parsed back.
    PrevHash,
    Hash,
}

const WIRE_FIELDS: &[&str] =
    &["id", "type", "schema_version", "occurred_at", "actor", "request_id", "patient", "payload", "prev_hash", "hash"];

impl<'de> Deserialize<'de> for WireOwned {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_struct("WireOwned", WIRE_FIELDS, WireVisitor)
    }
}

struct WireVisitor;

/// Whether a payload of type `t` is read in place: the types the projectors meet by the million,
/// whose payloads hold no JSON tree. A tree read in place lies one level deeper than read from the
/// payload's own text, and serde_json refuses trees deeper than 127 levels: a client's `jwks` that
/// read before would not (a test holds the two ways alike).
fn read_in_place(t: EventType) -> bool {
    matches!(
        t,
        EventType::FhirResourceCreated
            | EventType::FhirResourceUpdated
            | EventType::FhirResourceDeleted
            | EventType::FhirAccessRead
            | EventType::FhirAccessSearch
    )
}

/// Reads a payload of a known type in place.
struct PayloadOf(EventType);

impl<'de> serde::de::DeserializeSeed<'de> for PayloadOf {
    type Value = Payload;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Payload, D::Error> {
        Payload::deserialize_as(self.0, d)
    }
}

impl<'de> serde::de::Visitor<'de> for WireVisitor {
    type Value = WireOwned;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an event object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<WireOwned, A::Error> {
        use serde::de::Error;
        fn once<T, E: Error>(slot: &mut Option<T>, value: T, name: &'static str) -> Result<(), E> {
            match slot.replace(value) {
                Some(_) => Err(E::duplicate_field(name)),
                None => Ok(()),
            }
        }
        let (mut id, mut event_type, mut schema_version, mut occurred_at) = (None, None, None, None);
        let (mut actor, mut request_id, mut patient, mut payload) = (None, None, None, None);
        let (mut prev_hash, mut hash) = (None::<Option<ChainHash>>, None::<Option<ChainHash>>);
        while let Some(field) = map.next_key::<WireField>()? {
            match field {
                WireField::Id => once(&mut id, map.next_value()?, "id")?,
                WireField::Type => once(&mut event_type, map.next_value()?, "type")?,
                WireField::SchemaVersion => once(&mut schema_version, map.next_value()?, "schema_version")?,
                WireField::OccurredAt => once(&mut occurred_at, map.next_value()?, "occurred_at")?,
                WireField::Actor => once(&mut actor, map.next_value()?, "actor")?,
                WireField::RequestId => once(&mut request_id, map.next_value()?, "request_id")?,
                WireField::Patient => once(&mut patient, map.next_value()?, "patient")?,
                WireField::PrevHash => once(&mut prev_hash, map.next_value()?, "prev_hash")?,
                WireField::Hash => once(&mut hash, map.next_value()?, "hash")?,
                WireField::Payload => {
                    let value = match (event_type, schema_version) {
                        (Some(t), Some(v)) if v <= SCHEMA_VERSION && read_in_place(t) => {
                            WirePayload::Read(map.next_value_seed(PayloadOf(t))?)
                        }
                        _ => WirePayload::Text(map.next_value()?),
                    };
                    once(&mut payload, value, "payload")?;
                }
            }
        }
        Ok(WireOwned {
            id: id.ok_or_else(|| A::Error::missing_field("id"))?,
            event_type: event_type.ok_or_else(|| A::Error::missing_field("type"))?,
            schema_version: schema_version.ok_or_else(|| A::Error::missing_field("schema_version"))?,
            occurred_at: occurred_at.ok_or_else(|| A::Error::missing_field("occurred_at"))?,
            actor: actor.unwrap_or_default(),
            request_id: request_id.unwrap_or_default(),
            patient: patient.unwrap_or_default(),
            payload: payload.ok_or_else(|| A::Error::missing_field("payload"))?,
        })
    }
}

impl WireOwned {
    fn into_event(self) -> Result<Event, EventError> {
        if self.schema_version > SCHEMA_VERSION {
            return Err(EventError::TooNew { found: self.schema_version, supported: SCHEMA_VERSION });
        }
        let payload = match self.payload {
            WirePayload::Read(p) => p,
            WirePayload::Text(text) => Payload::from_json(self.event_type, text.get())?,
        };
        Ok(Event {
            id: self.id,
            schema_version: self.schema_version,
            occurred_at: self.occurred_at,
            actor: self.actor,
            request_id: self.request_id,
            patient: self.patient,
            payload,
            prev_hash: None,
            hash: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_round_trip_keeps_every_field() {
        for t in EventType::ALL {
            let e = sample_event(t);
            let bytes = e.canonical_bytes();
            let back = Event::from_canonical_bytes(&bytes).unwrap();
            assert_eq!(back, e, "{t}");
            assert_eq!(back.canonical_bytes(), bytes, "{t}: re-encoding changed the bytes");
            assert_eq!(e.canonical_raw().get().as_bytes(), bytes, "{t}: the raw value is the canonical text");
        }
    }

    #[test]
    fn type_names_are_unique_and_parse_back() {
        let mut names: Vec<_> = EventType::ALL.iter().map(|t| t.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), EventType::ALL.len());
        for t in EventType::ALL {
            assert_eq!(t.as_str().parse::<EventType>().unwrap(), t);
        }
        assert!("fhir.resource.exploded".parse::<EventType>().is_err());
    }

    #[test]
    fn chain_fields_are_not_canonical() {
        let mut e = sample_event(EventType::FhirAccessRead);
        let before = e.canonical_bytes();
        e.prev_hash = Some(ChainHash([1; 32]));
        e.hash = Some(ChainHash([2; 32]));
        assert_eq!(e.canonical_bytes(), before);
        let json = e.to_json_with_chain();
        assert_eq!(json["hash"], hex::encode([2u8; 32]));
    }

    #[test]
    fn mismatched_payload_is_rejected() {
        let e = sample_event(EventType::AuthLoginFailed);
        let mut v: serde_json::Value = serde_json::from_slice(&e.canonical_bytes()).unwrap();
        v["type"] = "fhir.resource.deleted".into();
        let err = Event::from_canonical_bytes(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(matches!(err, EventError::Malformed(_)), "{err}");
    }

    #[test]
    fn the_type_is_read_without_parsing() {
        for t in EventType::ALL {
            assert_eq!(Event::peek_type(&sample_event(t).canonical_bytes()), Some(t));
        }
        assert_eq!(Event::peek_type(b"{\"type\":\"auth.logout\"}"), None);
    }

    /// In canonical bytes the type comes before the payload, which is read in place; with sorted
    /// keys (`cairn log tail` output) the payload comes first and is read after. One event either way.
    #[test]
    fn the_payload_is_read_in_place_or_after_the_type_alike() {
        for t in EventType::ALL {
            let e = sample_event(t);
            let canonical = e.canonical_bytes();
            let text = String::from_utf8(canonical.clone()).unwrap();
            assert!(text.find("\"type\"").unwrap() < text.find("\"payload\"").unwrap(), "{t}");
            let sorted = serde_json::to_vec(&e.to_json_with_chain()).unwrap();
            let sorted_text = String::from_utf8(sorted.clone()).unwrap();
            assert!(sorted_text.find("\"payload\"").unwrap() < sorted_text.find("\"type\"").unwrap(), "{t}");
            assert_eq!(Event::from_canonical_bytes(&canonical).unwrap(), e, "{t}");
            assert_eq!(Event::from_canonical_bytes(&sorted).unwrap(), e, "{t}");
        }
    }

    /// The envelope is as strict as it was when serde derived its reading (`deny_unknown_fields`).
    #[test]
    fn the_envelope_refuses_unknown_repeated_and_missing_fields() {
        let e = sample_event(EventType::FhirResourceCreated);
        let text = String::from_utf8(e.canonical_bytes()).unwrap();
        let body = text.strip_prefix('{').unwrap();
        let payload_at = text.find(",\"payload\":").unwrap();
        for (case, bad) in [
            ("unknown field", format!("{{\"extra\":1,{body}")),
            ("type twice", format!("{{\"type\":\"fhir.resource.deleted\",{body}")),
            ("payload twice", text.replacen(",\"payload\":", ",\"payload\":{},\"payload\":", 1)),
            ("no payload", format!("{}}}", &text[..payload_at])),
            ("no id", text.replacen("\"id\":", "\"ID\":", 1)),
            ("not an object", "[1]".to_owned()),
        ] {
            assert!(Event::from_canonical_bytes(bad.as_bytes()).is_err(), "{case}: {bad}");
        }
    }

    /// A registered client's `jwks` is a tree: as deep as it may be in the payload's own text, the
    /// event reads the same in canonical order and with sorted keys.
    #[test]
    fn deep_trees_in_a_payload_read_alike_both_ways() {
        for levels in 120..130 {
            let mut e = sample_event(EventType::AuthClientRegistered);
            let mut deep = serde_json::json!([]);
            for _ in 1..levels {
                deep = serde_json::json!([deep]);
            }
            let Payload::ClientRegistered(c) = &mut e.payload else { unreachable!() };
            c.jwks = Some(serde_json::json!({"keys": [], "x": deep}));
            let canonical = Event::from_canonical_bytes(&e.canonical_bytes()).map_err(|e| e.to_string());
            let sorted = Event::from_canonical_bytes(&serde_json::to_vec(&e.to_json_with_chain()).unwrap());
            assert_eq!(canonical.is_ok(), sorted.is_ok(), "{levels} levels: {canonical:?}");
            if levels == 120 {
                assert_eq!(canonical.unwrap(), e);
            }
        }
    }

    #[test]
    fn a_newer_schema_is_refused_before_its_payload_is_read() {
        let e = sample_event(EventType::FhirResourceCreated);
        let text = String::from_utf8(e.canonical_bytes()).unwrap();
        let at = text.find(",\"payload\":").unwrap();
        let newer = format!("{},\"payload\":{{\"shape\":\"of tomorrow\"}}}}", &text[..at]).replacen(
            &format!("\"schema_version\":{SCHEMA_VERSION}"),
            &format!("\"schema_version\":{}", SCHEMA_VERSION + 1),
            1,
        );
        let err = Event::from_canonical_bytes(newer.as_bytes()).unwrap_err();
        assert!(matches!(err, EventError::TooNew { .. }), "{err}");
    }

    #[test]
    fn newer_schema_version_is_refused() {
        let e = sample_event(EventType::AuthLoginFailed);
        let mut v: serde_json::Value = serde_json::from_slice(&e.canonical_bytes()).unwrap();
        v["schema_version"] = (SCHEMA_VERSION + 1).into();
        let err = Event::from_canonical_bytes(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(matches!(err, EventError::TooNew { .. }));
    }
}

/// Every event type the code can produce validates against its JSON Schema in `schemas/events/`.
#[cfg(test)]
mod schema_tests {
    use super::*;
    use std::path::PathBuf;

    fn schema_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../schemas/events")
    }

    fn load(name: &str) -> serde_json::Value {
        let path = schema_dir().join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn validator(t: EventType) -> jsonschema::Validator {
        let envelope = load("envelope.schema.json");
        let envelope_id = envelope["$id"].as_str().unwrap().to_owned();
        let registry = jsonschema::Registry::new().add(envelope_id, envelope).unwrap().prepare().unwrap();
        jsonschema::options()
            .should_validate_formats(true)
            .with_registry(&registry)
            .build(&load(&format!("{t}.schema.json")))
            .unwrap_or_else(|e| panic!("schema for {t} does not compile: {e}"))
    }

    fn errors(v: &jsonschema::Validator, instance: &serde_json::Value) -> Vec<String> {
        v.iter_errors(instance).map(|e| format!("{} at {}", e, e.instance_path())).collect()
    }

    #[test]
    fn every_event_type_validates_against_its_schema() {
        for t in EventType::ALL {
            let v = validator(t);
            let event = sample_event(t);
            let stored: serde_json::Value = serde_json::from_slice(&event.canonical_bytes()).unwrap();
            assert_eq!(errors(&v, &stored), Vec::<String>::new(), "{t} (canonical form)");
            // The chained form printed by `cairn log tail` validates too.
            let mut chained = event.clone();
            chained.prev_hash = Some(ChainHash([0xab; 32]));
            chained.hash = Some(ChainHash([0xcd; 32]));
            assert_eq!(errors(&v, &chained.to_json_with_chain()), Vec::<String>::new(), "{t} (chained)");
        }
    }

    #[test]
    fn every_schema_file_belongs_to_an_event_type() {
        for entry in std::fs::read_dir(schema_dir()).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            let Some(t) = name.strip_suffix(".schema.json") else { panic!("stray file {name}") };
            if t != "envelope" {
                t.parse::<EventType>().unwrap_or_else(|_| panic!("{name} has no event type"));
            }
        }
    }

    /// The schemas are not vacuous: a payload of the wrong shape or a wrong type name is refused.
    #[test]
    fn schemas_refuse_malformed_events() {
        for t in EventType::ALL {
            let v = validator(t);
            let good: serde_json::Value = serde_json::from_slice(&sample_event(t).canonical_bytes()).unwrap();

            let mut wrong_type = good.clone();
            let other = EventType::ALL.into_iter().find(|o| *o != t).unwrap();
            wrong_type["type"] = other.as_str().into();
            assert!(!v.is_valid(&wrong_type), "{t}: accepted type {other}");

            let mut extra = good.clone();
            extra["payload"]["unexpected"] = 1.into();
            assert!(!v.is_valid(&extra), "{t}: accepted an unknown payload field");

            let mut no_time = good.clone();
            no_time.as_object_mut().unwrap().remove("occurred_at");
            assert!(!v.is_valid(&no_time), "{t}: accepted a missing occurred_at");

            let mut coarse_time = good.clone();
            coarse_time["occurred_at"] = "2026-11-28T13:23:25Z".into();
            assert!(!v.is_valid(&coarse_time), "{t}: accepted a time without milliseconds");
        }
    }
}

/// The log's topics and which events go where. Projectors subscribe by topic.
pub mod topics {
    /// FHIR writes: `fhir.resource.*`.
    pub const FHIR: &str = "cairn.fhir";
    /// FHIR reads and searches (`fhir.access.*`) and refused FHIR requests (`fhir.request.refused`).
    pub const ACCESS: &str = "cairn.access";
    /// Authentication and tokens: `auth.*`.
    pub const AUTH: &str = "cairn.auth";
    pub const ALL: [&str; 3] = [FHIR, ACCESS, AUTH];
}

impl Event {
    /// The topic this event is appended to.
    pub fn topic(&self) -> &'static str {
        match self.event_type() {
            EventType::FhirResourceCreated | EventType::FhirResourceUpdated | EventType::FhirResourceDeleted => {
                topics::FHIR
            }
            EventType::FhirAccessRead | EventType::FhirAccessSearch | EventType::FhirRequestRefused => topics::ACCESS,
            EventType::AuthLoginSucceeded
            | EventType::AuthLoginFailed
            | EventType::AuthTokenIssued
            | EventType::AuthTokenRevoked
            | EventType::AuthClientRegistered
            | EventType::AuthClientDisabled
            | EventType::AuthUserCreated
            | EventType::AuthUserDisabled
            | EventType::AuthKeyPublished
            | EventType::AuthTokenRefused
            | EventType::AuthTokenIntrospected
            | EventType::AuthConsentRecorded
            | EventType::AuthCodeIssued
            | EventType::AuthCodeRedeemed
            | EventType::AuthLogout
            | EventType::AuthIdpRegistered
            | EventType::AuthIdpDisabled
            | EventType::AuthIdentityLinked => topics::AUTH,
        }
    }

    /// The key that picks the event's partition. Every version of a resource shares a key, so its
    /// history is totally ordered; accesses are keyed by patient so one patient's audit trail is one
    /// ordered stream; authentication events by subject (or client), so a user's logins and tokens
    /// are ordered.
    pub fn partition_key(&self) -> String {
        match &self.payload {
            Payload::ResourceCreated(w) | Payload::ResourceUpdated(w) => format!("{}/{}", w.resource_type, w.id),
            Payload::ResourceDeleted(d) => format!("{}/{}", d.resource_type, d.id),
            Payload::AccessRead(_) | Payload::AccessSearch(_) | Payload::RequestRefused(_) => {
                self.patient.clone().or_else(|| self.actor.subject.clone()).unwrap_or_else(|| self.id.to_string())
            }
            Payload::TokenIssued(t) => t.subject.clone().unwrap_or_else(|| t.client_id.clone()),
            Payload::LoginSucceeded(l) => l.user_id.clone(),
            Payload::LoginFailed(l) => l.username.clone().unwrap_or_else(|| self.id.to_string()),
            Payload::TokenRevoked(r) => match &r.target {
                RevocationTarget::Token { jti, .. } => jti.clone(),
                RevocationTarget::Family { family_id } => family_id.clone(),
                RevocationTarget::Subject { subject, .. } => subject.clone(),
                RevocationTarget::Client { client_id, .. } => client_id.clone(),
                RevocationTarget::SigningKey { kid } => kid.clone(),
            },
            Payload::ClientRegistered(c) => c.client_id.clone(),
            Payload::ClientDisabled(c) => c.client_id.clone(),
            Payload::UserCreated(u) => u.user_id.clone(),
            Payload::UserDisabled(u) => u.user_id.clone(),
            Payload::KeyPublished(k) => k.kid.clone(),
            Payload::TokenRefused(r) => r.client_id.clone().unwrap_or_else(|| self.id.to_string()),
            Payload::TokenIntrospected(i) => i.jti.clone().unwrap_or_else(|| i.client_id.clone()),
            Payload::ConsentRecorded(c) => c.user_id.clone(),
            // Every event about one code shares a partition, so the first redemption is well defined.
            Payload::CodeIssued(c) => c.code_hash.clone(),
            Payload::CodeRedeemed(c) => c.code_hash.clone(),
            Payload::Logout(l) => l.user_id.clone(),
            Payload::IdpRegistered(i) => i.idp_id.clone(),
            Payload::IdpDisabled(i) => i.idp_id.clone(),
            // Every link of one upstream identity shares a partition, so the first link is well defined.
            Payload::IdentityLinked(l) => l.identity_key(),
        }
    }
}
