//! The projection store: what the FHIR API reads. Everything in it is derived from the log by the
//! projectors and can be deleted and rebuilt.
//!
//! [`ResourceStore`] is the trait the API and the projectors use; [`embedded::EmbeddedStore`] keeps it
//! in one redb file (ACID transactions, MVCC readers). The projector's checkpoint is written in the
//! same transaction as the data it covers, and applying a version twice changes nothing, so a crash at
//! any point is repaired by replaying from the checkpoint.

pub mod digest;
mod drop_behind;
pub mod embedded;
pub mod key;
pub mod sorter;
mod values;

use serde::{Deserialize, Serialize};

/// One version of a resource as the store keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResourceVersion {
    pub resource_type: String,
    pub id: String,
    pub version_id: u64,
    /// `meta.lastUpdated` as written (RFC 3339, milliseconds, UTC) and as epoch milliseconds.
    pub last_updated: String,
    pub last_updated_ms: i64,
    pub deleted: bool,
    /// The full resource as raw JSON text; `None` for a deletion. For the audit trail's records
    /// (`fact`), the event they are rendered from instead.
    pub resource: Option<Box<serde_json::value::RawValue>>,
    /// Whether `resource` holds an audit record's fact (`cairn_audit::fact`) rather than the record:
    /// the store keeps facts, readers see records (`cairn_projector::audit::Rendered`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fact: bool,
    /// Index keys computed by the projector: the patient compartment (`Patient/x`) ...
    #[serde(default)]
    pub patient: Option<String>,
    /// ... the identifiers as `system|value` ...
    #[serde(default)]
    pub identifiers: Vec<String>,
    /// ... and the date-index key (see `cairn_fhir::index::date_key`), for a patient's readings by time.
    #[serde(default)]
    pub date_key: Option<i64>,
    /// The resource already parsed, when whoever handed this version over had it as a tree (an
    /// audit record rendered for a search that matches it next): [`Self::take_resource_value`] takes
    /// it instead of parsing `resource` again. Never stored. Whoever sets it sets `resource` from the
    /// same tree, and whoever changes `resource` clears it.
    #[serde(skip)]
    pub parsed: Option<serde_json::Value>,
}

impl ResourceVersion {
    pub fn key(&self) -> String {
        format!("{}/{}", self.resource_type, self.id)
    }

    /// The version's canonical encoding (JSON): what the digest covers and the CQL store keeps; the
    /// embedded store keeps it LZ4-compressed. The same bytes everywhere, so digests agree.
    pub fn encode(&self) -> Vec<u8> {
        // Room for the resource and the fields around it, so the buffer seldom grows and copies.
        let mut out = Vec::with_capacity(self.resource.as_ref().map_or(0, |r| r.get().len()) + 512);
        self.encode_into(&mut out);
        out
    }

    /// [`ResourceVersion::encode`], appended to `out`: the bytes `serde_json` makes of the derived
    /// `Serialize` (field order, escaping, `null`s), written directly. Every stored version is encoded
    /// once for the store and again for the digest; through serde this took about a sixth of a
    /// rebuild's CPU, mostly in escaping field names and short strings byte by byte. A test holds the
    /// two encodings equal. Returns where in `out` the fields from `id` to `identifiers` lie: all
    /// but the type and the date key, which is what a write's AuditEvent and Provenance have in
    /// common (the embedded store keeps it once).
    pub fn encode_into(&self, out: &mut Vec<u8>) -> std::ops::Range<usize> {
        let resource = self.resource.as_deref().map(|r| r.get().len()).unwrap_or(4);
        out.reserve(160 + resource);
        self.encode_head(out);
        let middle_start = out.len();
        self.encode_middle(out);
        let middle = middle_start..out.len();
        self.encode_tail(out);
        middle
    }

    /// [`ResourceVersion::encode_into`] without its middle, which is left for the caller to put
    /// in at the returned place: the record of a version whose middle is stored elsewhere.
    pub fn encode_around_middle(&self, out: &mut Vec<u8>) -> usize {
        self.encode_head(out);
        let at = out.len();
        self.encode_tail(out);
        at
    }

    fn encode_head(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(br#"{"resource_type":"#);
        json_str(out, &self.resource_type);
    }

    fn encode_middle(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(br#","id":"#);
        json_str(out, &self.id);
        out.extend_from_slice(br#","version_id":"#);
        out.extend_from_slice(itoa::Buffer::new().format(self.version_id).as_bytes());
        out.extend_from_slice(br#","last_updated":"#);
        json_str(out, &self.last_updated);
        out.extend_from_slice(br#","last_updated_ms":"#);
        out.extend_from_slice(itoa::Buffer::new().format(self.last_updated_ms).as_bytes());
        out.extend_from_slice(if self.deleted { br#","deleted":true"# } else { br#","deleted":false"# });
        out.extend_from_slice(br#","resource":"#);
        match &self.resource {
            Some(raw) => out.extend_from_slice(raw.get().as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        if self.fact {
            out.extend_from_slice(br#","fact":true"#);
        }
        out.extend_from_slice(br#","patient":"#);
        match &self.patient {
            Some(p) => json_str(out, p),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(br#","identifiers":["#);
        for (i, identifier) in self.identifiers.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_str(out, identifier);
        }
        out.push(b']');
    }

    fn encode_tail(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(br#","date_key":"#);
        match self.date_key {
            Some(k) => out.extend_from_slice(itoa::Buffer::new().format(k).as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.push(b'}');
    }

    /// Whether `self` and `other` encode to the same middle ([`ResourceVersion::encode_into`]),
    /// compared field by field rather than encoded. Every field is named, so a field added to the
    /// struct must be placed here too (in the middle or not) before this compiles.
    pub fn same_middle(&self, other: &ResourceVersion) -> bool {
        let ResourceVersion {
            resource_type: _,
            id,
            version_id,
            last_updated,
            last_updated_ms,
            deleted,
            resource,
            fact,
            patient,
            identifiers,
            date_key: _,
            parsed: _,
        } = self;
        resource.as_ref().map(|r| r.get()) == other.resource.as_ref().map(|r| r.get())
            && *id == other.id
            && *version_id == other.version_id
            && *last_updated == other.last_updated
            && *last_updated_ms == other.last_updated_ms
            && *deleted == other.deleted
            && *fact == other.fact
            && *patient == other.patient
            && *identifiers == other.identifiers
    }

    /// The resource parsed; `None` for a deletion.
    pub fn resource_value(&self) -> Option<serde_json::Value> {
        self.resource.as_ref().map(|r| serde_json::from_str(r.get()).expect("stored resources are valid JSON"))
    }

    /// The resource parsed, taking the tree in `parsed` when there is one; `None` for a deletion.
    pub fn take_resource_value(&mut self) -> Option<serde_json::Value> {
        self.parsed.take().or_else(|| self.resource_value())
    }
}

/// `s` as a JSON string, escaped as `serde_json` escapes it: `"` and `\`, the short forms of
/// backspace, tab, newline, form feed and carriage return, `\u00xx` (lower-case hex) for the other
/// control characters, everything else as it is. Runs without an escape are copied whole.
fn json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b >= 0x20 && b != b'"' && b != b'\\' {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x09 => out.extend_from_slice(b"\\t"),
            0x0a => out.extend_from_slice(b"\\n"),
            0x0c => out.extend_from_slice(b"\\f"),
            0x0d => out.extend_from_slice(b"\\r"),
            _ => out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]),
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Whether a resource key `Type/id` names a resource of `resource_type` (`None`: any type but the
/// audit trail's, `READ_ONLY_TYPES`: they are left out of the system-wide change list, system
/// `_history`, since every request adds to them and they would bury the resources clients wrote;
/// their own type-level history has them).
pub fn key_has_type(key: &str, resource_type: Option<&str>) -> bool {
    let is = |t: &str| key.strip_prefix(t).is_some_and(|rest| rest.starts_with('/'));
    match resource_type {
        Some(t) => is(t),
        None => !cairn_fhir::resource::READ_ONLY_TYPES.iter().any(|t| is(t)),
    }
}

/// A projector's position in one partition: the next offset it will apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub topic: String,
    pub partition: u32,
    pub next_offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("projection store {path}: {detail}")]
    Storage { path: String, detail: String },
    #[error("projection store holds an unreadable record: {0}")]
    Corrupt(String),
    #[error(
        "projection store {path} has the layout of another Cairn build (format {found}, this build uses \
         format {}); it is derived from the log: delete it and it is rebuilt (or replay again)",
        embedded::FORMAT
    )]
    OtherFormat { path: String, found: u64 },
    #[error(
        "projection store {path} is an unfinished rebuild (its indexes were never built); it is derived \
         from the log: delete it and it is rebuilt (or replay again)"
    )]
    Unfinished { path: String },
    #[error(
        "projection store {path} is damaged ({detail}); it is derived from the log: delete it and it is \
         rebuilt (or replay again)"
    )]
    Damaged { path: String, detail: String },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Reads and writes of the projected FHIR resources.
#[async_trait::async_trait]
pub trait ResourceStore: Send + Sync + 'static {
    /// Applies versions and checkpoints in one atomic write. Versions already present are skipped
    /// (idempotent replay). `durable` asks for an fsync; without it the write is atomic and visible
    /// but may be lost in a crash, which replay from the last durable checkpoint repairs. (An
    /// embedded store being rebuilt from the log writes its indexes only at the end,
    /// `EmbeddedStore::build_indexes`: nothing reads it before.)
    async fn apply(&self, versions: &[ResourceVersion], checkpoints: &[Checkpoint], durable: bool) -> Result<()>;

    async fn checkpoint(&self, topic: &str, partition: u32) -> Result<Option<u64>>;

    /// The newest version (possibly a deletion).
    async fn current(&self, resource_type: &str, id: &str) -> Result<Option<ResourceVersion>>;

    async fn version(&self, resource_type: &str, id: &str, version_id: u64) -> Result<Option<ResourceVersion>>;

    /// Every version of one resource, newest first.
    async fn history(&self, resource_type: &str, id: &str) -> Result<Vec<ResourceVersion>>;

    /// Current, non-deleted resources of a type, optionally only one patient's compartment, in no
    /// order the caller may rely on (searches sort what they find). `visit` returns false to stop.
    async fn scan_current(
        &self,
        resource_type: &str,
        patient: Option<&str>,
        visit: &mut (dyn FnMut(ResourceVersion) -> bool + Send),
    ) -> Result<()>;

    /// Like [`ResourceStore::scan_current`] for one patient, but only resources whose date-index key is in
    /// `[from, to)`, plus those in the long/unknown bucket (`i64::MIN`).
    async fn scan_patient_dates(
        &self,
        resource_type: &str,
        patient: &str,
        from: i64,
        to: i64,
        visit: &mut (dyn FnMut(ResourceVersion) -> bool + Send),
    ) -> Result<()>;

    /// How many current, non-deleted resources of a type there are (without reading them).
    async fn count_current(&self, resource_type: &str) -> Result<u64>;

    /// Versions of every resource (or of one type) whose lastUpdated is in `[from_ms, to_ms]`, newest
    /// first, at most `limit`.
    async fn changes(
        &self,
        resource_type: Option<&str>,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<ResourceVersion>>;

    /// Ids of current, non-deleted resources of a type carrying the identifier `system|value`.
    async fn find_by_identifier(&self, resource_type: &str, identifier: &str) -> Result<Vec<String>>;

    /// Takes the lease `name` for `holder` for `ttl`, unless another holder has it (false). API
    /// processes sharing a store take turns this way before deciding a resource's next version, so two
    /// processes cannot both write version n+1. The embedded store has one process, whose own locks
    /// suffice: it always grants.
    async fn acquire_lease(&self, _name: &str, _holder: &str, _ttl: std::time::Duration) -> Result<bool> {
        Ok(true)
    }

    /// Gives the lease back if `holder` still has it.
    async fn release_lease(&self, _name: &str, _holder: &str) -> Result<()> {
        Ok(())
    }

    /// A digest of everything projected (checkpoints excluded), to prove a rebuild is identical.
    async fn digest(&self) -> Result<String>;
}

#[cfg(test)]
mod tests {
    use super::ResourceVersion;
    use serde_json::value::RawValue;

    fn version(text: &str, resource: Option<&str>, fact: bool, deleted: bool) -> ResourceVersion {
        ResourceVersion {
            resource_type: format!("Observation{text}"),
            id: format!("{text}-id"),
            version_id: u64::MAX - text.len() as u64,
            last_updated: text.to_owned(),
            last_updated_ms: i64::MIN + text.len() as i64,
            deleted,
            resource: resource.map(|r| RawValue::from_string(r.to_owned()).unwrap()),
            fact,
            patient: (!text.is_empty()).then(|| format!("Patient/{text}")),
            identifiers: (0..text.len() % 4).map(|i| format!("urn:{i}|{text}")).collect(),
            date_key: (!text.len().is_multiple_of(3)).then_some(-(text.len() as i64)),
            parsed: None,
        }
    }

    /// The hand-written encoding is the bytes serde makes of the derived `Serialize`: the digest and
    /// the CQL store's records depend on it. Every byte below 0x80 and some beyond appear in strings.
    #[test]
    fn encoding_equals_serde_for_every_field_and_escape() {
        let mut texts: Vec<String> = (0u8..0x80).map(|b| format!("a{}b", b as char)).collect();
        texts.extend(
            ["", "\"\\\"", "\u{7f}\u{80}é€😀", "\u{0}\u{1f}\n\r\t\u{8}\u{c}", "plain-text.value"].map(String::from),
        );
        texts.push((0u8..0x80).map(char::from).collect());
        let mut checked = 0;
        for (i, text) in texts.iter().enumerate() {
            for resource in [None, Some(r#"{"resourceType":"Observation","a":[1,"\u0000"]}"#), Some("null")] {
                let v = version(text, resource, i % 2 == 0, i % 5 == 0);
                let mut ours = b"prefix".to_vec();
                let middle = v.encode_into(&mut ours);
                assert!(ours[middle.start..].starts_with(br#","id":"#) && ours[..middle.end].ends_with(b"]"));
                assert!(ours[middle.end..].starts_with(br#","date_key":"#), "text {text:?}");
                assert_eq!(
                    String::from_utf8_lossy(&ours[6..]),
                    String::from_utf8_lossy(&serde_json::to_vec(&v).unwrap()),
                    "text {text:?}"
                );
                assert_eq!(&ours[..6], b"prefix", "encode_into appends");
                checked += 1;
            }
        }
        assert_eq!(checked, texts.len() * 3);
    }
}
