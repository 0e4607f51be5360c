//! The embedded projection store: one redb file.
//!
//! Tables (keys are tuples encoded as order-preserving bytes, `crate::key`; `key` is `Type/id`):
//! - `versions` (key, version) -> ResourceVersion JSON, LZ4-compressed ([`pack`]): every version,
//!   for vread and history;
//! - `current` key -> CurrentEntry JSON: newest version number and the index keys it put in place;
//! - `by_patient` (patient, type, id), `by_identifier` (type, system|value, id): indexes over
//!   current, non-deleted resources (listing a whole type ranges over `current` by key prefix);
//! - `by_patient_date` (patient, type, date key, id): a patient's Observations by effective time;
//! - `changes` (lastUpdated ms, key, version): every version by time, for type and system history;
//! - `checkpoints` (topic, partition) -> next offset;
//! - `meta` `format` -> [`FORMAT`], the layout of the file.

use crate::digest::StoreDigest;
use crate::key::{BadKey, KeyBuf, KeyReader};
use crate::{Checkpoint, ResourceStore, ResourceVersion, Result, StoreError};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const VERSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("versions");
const CURRENT: TableDefinition<&[u8], &[u8]> = TableDefinition::new("current");
const BY_PATIENT: TableDefinition<&[u8], ()> = TableDefinition::new("by_patient");
const BY_IDENTIFIER: TableDefinition<&[u8], ()> = TableDefinition::new("by_identifier");
const BY_PATIENT_DATE: TableDefinition<&[u8], ()> = TableDefinition::new("by_patient_date");
const CHANGES: TableDefinition<&[u8], ()> = TableDefinition::new("changes");
const CHECKPOINTS: TableDefinition<(&str, u32), u64> = TableDefinition::new("checkpoints");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
type CurrentTable = redb::ReadOnlyTable<&'static [u8], &'static [u8]>;
type VersionsTable = redb::ReadOnlyTable<&'static [u8], &'static [u8]>;

/// The layout of the store file. 1: redb tuple keys (until 2026-11-29); 2: byte keys; 3: version
/// records compressed. A file of another layout is not read: the store is derived from the log, so
/// it is rebuilt instead ([`EmbeddedStore::open_or_rebuild`]).
pub const FORMAT: u64 = 3;

/// A version record as the `versions` table keeps it: LZ4 (the `lz4_flex` crate) with the length
/// first. Version records are most of what a rebuild writes, and redb's cost grows with the bytes
/// it writes (decision 0010); JSON records shrink to about half. Only this store compresses: the
/// record itself (what the digest covers, what the CQL store keeps) is unchanged.
fn pack(record: &[u8]) -> Vec<u8> {
    lz4_flex::block::compress_prepend_size(record)
}

/// The largest version record [`unpack`] accepts: far above the API's request limit, and it keeps a
/// damaged length from asking for gigabytes.
const MAX_RECORD_BYTES: usize = 256 << 20;

fn unpack(stored: &[u8]) -> Result<Vec<u8>> {
    let corrupt = |why: String| StoreError::Corrupt(format!("a version record does not decompress: {why}"));
    let (n, data) =
        lz4_flex::block::uncompressed_size(stored).map_err(|_| corrupt("it is shorter than its length".into()))?;
    if n > MAX_RECORD_BYTES {
        return Err(corrupt(format!("it claims {n} bytes")));
    }
    let record = lz4_flex::block::decompress(data, n).map_err(|e| corrupt(e.to_string()))?;
    // The decoder stops where the data ends; a damaged length would otherwise go unnoticed.
    if record.len() != n {
        return Err(corrupt(format!("it claims {n} bytes and holds {}", record.len())));
    }
    Ok(record)
}

fn decode_version(stored: &[u8]) -> Result<ResourceVersion> {
    decode(&unpack(stored)?)
}

fn version_key(key: &str, version: u64) -> KeyBuf {
    KeyBuf::new().str(key).u64(version)
}

fn current_key(key: &str) -> KeyBuf {
    KeyBuf::new().str(key)
}

/// Every key of one resource type in `current` starts with this.
fn type_prefix(resource_type: &str) -> KeyBuf {
    KeyBuf::new().str_prefix(&format!("{resource_type}/"))
}

fn corrupt(_: BadKey) -> StoreError {
    StoreError::Corrupt("an index key does not decode".into())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CurrentEntry {
    version_id: u64,
    deleted: bool,
    patient: Option<String>,
    identifiers: Vec<String>,
    #[serde(default)]
    date_key: Option<i64>,
}

pub struct EmbeddedStore {
    db: Database,
    path: PathBuf,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store file with redb's default cache. Prefer
    /// [`EmbeddedStore::open_with_cache`]: see there.
    pub fn open(path: impl AsRef<Path>) -> Result<EmbeddedStore> {
        Self::open_with_cache(path, 256 << 20)
    }

    /// Opens the store with a page cache of `cache_bytes`. The bound matters: measured with redb's
    /// default settings, a server ingesting a million Observations grew to 11 GB resident; with a
    /// 256 MiB cache it stays near 400 MB. A file of another layout is refused
    /// ([`StoreError::OtherFormat`]).
    pub fn open_with_cache(path: impl AsRef<Path>, cache_bytes: usize) -> Result<EmbeddedStore> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| storage(&path, e))?;
        }
        let db = redb::Builder::new().set_cache_size(cache_bytes).create(&path).map_err(|e| storage(&path, e))?;
        let store = EmbeddedStore { db, path };
        let tx = store.db.begin_write().map_err(|e| store.err(e))?;
        {
            let names: Vec<String> = tx.list_tables().map_err(|e| store.err(e))?.map(|t| t.name().to_owned()).collect();
            let format = if names.iter().any(|n| n == META.name()) {
                tx.open_table(META)
                    .map_err(|e| store.err(e))?
                    .get("format")
                    .map_err(|e| store.err(e))?
                    .map(|g| g.value())
            } else {
                None
            };
            match format {
                Some(FORMAT) => {}
                // A file that holds tables but no format marker is the first layout.
                found if found.is_some() || !names.is_empty() => {
                    return Err(StoreError::OtherFormat {
                        path: store.path.display().to_string(),
                        found: found.unwrap_or(1),
                    });
                }
                _ => {
                    tx.open_table(META)
                        .map_err(|e| store.err(e))?
                        .insert("format", FORMAT)
                        .map_err(|e| store.err(e))?;
                }
            }
            // Create every table up front so readers never meet a missing one.
            tx.open_table(VERSIONS).map_err(|e| store.err(e))?;
            tx.open_table(CURRENT).map_err(|e| store.err(e))?;
            tx.open_table(BY_PATIENT).map_err(|e| store.err(e))?;
            tx.open_table(BY_IDENTIFIER).map_err(|e| store.err(e))?;
            tx.open_table(BY_PATIENT_DATE).map_err(|e| store.err(e))?;
            tx.open_table(CHANGES).map_err(|e| store.err(e))?;
            tx.open_table(CHECKPOINTS).map_err(|e| store.err(e))?;
        }
        tx.commit().map_err(|e| store.err(e))?;
        Ok(store)
    }

    /// Like [`EmbeddedStore::open_with_cache`], but a store file of another layout is deleted and
    /// started again empty, with a warning: it is derived, and the projectors rebuild it from the
    /// log (their checkpoints went with it).
    pub fn open_or_rebuild(path: impl AsRef<Path>, cache_bytes: usize) -> Result<EmbeddedStore> {
        let path = path.as_ref();
        match Self::open_with_cache(path, cache_bytes) {
            Err(StoreError::OtherFormat { found, .. }) => {
                tracing::warn!(
                    path = %path.display(),
                    found,
                    format = FORMAT,
                    "the projection store has the layout of another Cairn build; rebuilding it from the log"
                );
                std::fs::remove_file(path).map_err(|e| storage(path, e))?;
                Self::open_with_cache(path, cache_bytes)
            }
            other => other,
        }
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        storage(&self.path, e)
    }

    /// The newest version of `key` (possibly a deletion), through tables of one read transaction.
    fn current_version(
        &self,
        current: &CurrentTable,
        versions: &VersionsTable,
        key: &str,
    ) -> Result<Option<ResourceVersion>> {
        let Some(entry) = current.get(current_key(key).bytes()).map_err(|e| self.err(e))? else { return Ok(None) };
        let entry: CurrentEntry = decode(entry.value())?;
        match versions.get(version_key(key, entry.version_id).bytes()).map_err(|e| self.err(e))? {
            Some(v) => Ok(Some(decode_version(v.value())?)),
            None => Err(StoreError::Corrupt(format!("{key}: current version {} missing", entry.version_id))),
        }
    }

    /// Visits the current, non-deleted resources of `resource_type` named by the keys in
    /// `[from, to)` of `index` (`id_of` reads the id out of a key); `visit` returns false to stop.
    fn visit_index(
        &self,
        tx: &redb::ReadTransaction,
        index: TableDefinition<&[u8], ()>,
        resource_type: &str,
        (from, to): (&[u8], &[u8]),
        id_of: fn(&[u8]) -> Result<String, BadKey>,
        visit: &mut (dyn FnMut(ResourceVersion) -> bool + Send),
    ) -> Result<bool> {
        let current = tx.open_table(CURRENT).map_err(|e| self.err(e))?;
        let versions = tx.open_table(VERSIONS).map_err(|e| self.err(e))?;
        let t = tx.open_table(index).map_err(|e| self.err(e))?;
        for item in t.range(from..to).map_err(|e| self.err(e))? {
            let (k, _) = item.map_err(|e| self.err(e))?;
            let id = id_of(k.value()).map_err(corrupt)?;
            if let Some(v) = self.current_version(&current, &versions, &format!("{resource_type}/{id}"))?
                && !v.deleted
                && !visit(v)
            {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// The id out of a `by_patient` key (patient, type, id).
fn by_patient_id(key: &[u8]) -> Result<String, BadKey> {
    let mut r = KeyReader::new(key);
    r.skip_str()?;
    r.skip_str()?;
    r.str()
}

/// The id out of a `by_patient_date` key (patient, type, date, id).
fn by_patient_date_id(key: &[u8]) -> Result<String, BadKey> {
    let mut r = KeyReader::new(key);
    r.skip_str()?;
    r.skip_str()?;
    r.i64()?;
    r.str()
}

/// The end of the range of every key starting with `prefix`: the prefix with its last byte raised
/// by one. Prefixes here end in a string terminator (0x00) or in `/`, never in 0xFF.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    match end.last_mut() {
        Some(last) if *last < 0xFF => *last += 1,
        _ => unreachable!("key prefixes end in a terminator or `/`"),
    }
    end
}

fn storage(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage { path: path.display().to_string(), detail: e.to_string() }
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("store records serialize")
}

#[async_trait::async_trait]
impl ResourceStore for EmbeddedStore {
    async fn apply(&self, versions: &[ResourceVersion], checkpoints: &[Checkpoint], durable: bool) -> Result<()> {
        let mut tx = self.db.begin_write().map_err(|e| self.err(e))?;
        tx.set_durability(if durable { Durability::Immediate } else { Durability::None }).map_err(|e| self.err(e))?;
        {
            let mut versions_t = tx.open_table(VERSIONS).map_err(|e| self.err(e))?;
            let mut current_t = tx.open_table(CURRENT).map_err(|e| self.err(e))?;
            let mut by_patient = tx.open_table(BY_PATIENT).map_err(|e| self.err(e))?;
            let mut by_identifier = tx.open_table(BY_IDENTIFIER).map_err(|e| self.err(e))?;
            let mut by_patient_date = tx.open_table(BY_PATIENT_DATE).map_err(|e| self.err(e))?;
            let mut changes = tx.open_table(CHANGES).map_err(|e| self.err(e))?;
            for v in versions {
                let key = v.key();
                // One lookup each for `versions` and `current`: an insert hands back what it replaced.
                let vkey = version_key(&key, v.version_id);
                let encoded = pack(&v.encode());
                let replaced = versions_t
                    .insert(vkey.bytes(), encoded.as_slice())
                    .map_err(|e| self.err(e))?
                    .map(|old| old.value().to_vec());
                if let Some(old) = replaced {
                    // Already applied (replay is idempotent). A projection is a pure function of its
                    // event, so these are the same bytes; if a build projected differently, what was
                    // stored first stays, matching the current pointer and indexes made with it.
                    if old != encoded {
                        versions_t.insert(vkey.bytes(), old.as_slice()).map_err(|e| self.err(e))?;
                    }
                    continue;
                }
                let change = KeyBuf::new().i64(v.last_updated_ms).str(&key).u64(v.version_id);
                changes.insert(change.bytes(), ()).map_err(|e| self.err(e))?;
                let ckey = current_key(&key);
                let entry = CurrentEntry {
                    version_id: v.version_id,
                    deleted: v.deleted,
                    patient: v.patient.clone(),
                    identifiers: v.identifiers.clone(),
                    date_key: v.date_key,
                };
                let previous: Option<(CurrentEntry, Vec<u8>)> =
                    match current_t.insert(ckey.bytes(), encode(&entry).as_slice()).map_err(|e| self.err(e))? {
                        Some(g) => Some((decode(g.value())?, g.value().to_vec())),
                        None => None,
                    };
                if let Some((p, bytes)) = &previous
                    && p.version_id > v.version_id
                {
                    // An older version arriving late does not become current: put the newer back.
                    current_t.insert(ckey.bytes(), bytes.as_slice()).map_err(|e| self.err(e))?;
                    continue;
                }
                let previous = previous.map(|(p, _)| p);
                let (rtype, id) = (v.resource_type.as_str(), v.id.as_str());
                if let Some(p) = &previous
                    && !p.deleted
                {
                    if let Some(patient) = &p.patient {
                        by_patient
                            .remove(KeyBuf::new().str(patient).str(rtype).str(id).bytes())
                            .map_err(|e| self.err(e))?;
                        if let Some(d) = p.date_key {
                            let k = KeyBuf::new().str(patient).str(rtype).i64(d).str(id);
                            by_patient_date.remove(k.bytes()).map_err(|e| self.err(e))?;
                        }
                    }
                    for ident in &p.identifiers {
                        by_identifier
                            .remove(KeyBuf::new().str(rtype).str(ident).str(id).bytes())
                            .map_err(|e| self.err(e))?;
                    }
                }
                if !v.deleted {
                    if let Some(patient) = &v.patient {
                        by_patient
                            .insert(KeyBuf::new().str(patient).str(rtype).str(id).bytes(), ())
                            .map_err(|e| self.err(e))?;
                        if let Some(d) = v.date_key {
                            let k = KeyBuf::new().str(patient).str(rtype).i64(d).str(id);
                            by_patient_date.insert(k.bytes(), ()).map_err(|e| self.err(e))?;
                        }
                    }
                    for ident in &v.identifiers {
                        by_identifier
                            .insert(KeyBuf::new().str(rtype).str(ident).str(id).bytes(), ())
                            .map_err(|e| self.err(e))?;
                    }
                }
            }
            let mut cps = tx.open_table(CHECKPOINTS).map_err(|e| self.err(e))?;
            for c in checkpoints {
                cps.insert((c.topic.as_str(), c.partition), c.next_offset).map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    async fn checkpoint(&self, topic: &str, partition: u32) -> Result<Option<u64>> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(CHECKPOINTS).map_err(|e| self.err(e))?;
        Ok(t.get((topic, partition)).map_err(|e| self.err(e))?.map(|g| g.value()))
    }

    async fn current(&self, resource_type: &str, id: &str) -> Result<Option<ResourceVersion>> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let current = tx.open_table(CURRENT).map_err(|e| self.err(e))?;
        let versions = tx.open_table(VERSIONS).map_err(|e| self.err(e))?;
        self.current_version(&current, &versions, &format!("{resource_type}/{id}"))
    }

    async fn version(&self, resource_type: &str, id: &str, version_id: u64) -> Result<Option<ResourceVersion>> {
        let key = format!("{resource_type}/{id}");
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let versions = tx.open_table(VERSIONS).map_err(|e| self.err(e))?;
        match versions.get(version_key(&key, version_id).bytes()).map_err(|e| self.err(e))? {
            Some(g) => Ok(Some(decode_version(g.value())?)),
            None => Ok(None),
        }
    }

    async fn history(&self, resource_type: &str, id: &str) -> Result<Vec<ResourceVersion>> {
        let key = current_key(&format!("{resource_type}/{id}"));
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let versions = tx.open_table(VERSIONS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        let end = prefix_end(key.bytes());
        for item in versions.range(key.bytes()..end.as_slice()).map_err(|e| self.err(e))?.rev() {
            let (_, v) = item.map_err(|e| self.err(e))?;
            out.push(decode_version(v.value())?);
        }
        Ok(out)
    }

    async fn scan_current(
        &self,
        resource_type: &str,
        patient: Option<&str>,
        visit: &mut (dyn FnMut(ResourceVersion) -> bool + Send),
    ) -> Result<()> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        match patient {
            Some(p) => {
                let from = KeyBuf::new().str(p).str(resource_type);
                let to = prefix_end(from.bytes());
                self.visit_index(&tx, BY_PATIENT, resource_type, (from.bytes(), &to), by_patient_id, visit)?;
            }
            None => {
                let current = tx.open_table(CURRENT).map_err(|e| self.err(e))?;
                let versions = tx.open_table(VERSIONS).map_err(|e| self.err(e))?;
                let from = type_prefix(resource_type);
                let to = prefix_end(from.bytes());
                for item in current.range(from.bytes()..to.as_slice()).map_err(|e| self.err(e))? {
                    let (k, _) = item.map_err(|e| self.err(e))?;
                    let key = KeyReader::new(k.value()).str().map_err(corrupt)?;
                    if let Some(v) = self.current_version(&current, &versions, &key)?
                        && !v.deleted
                        && !visit(v)
                    {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    async fn count_current(&self, resource_type: &str) -> Result<u64> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let current = tx.open_table(CURRENT).map_err(|e| self.err(e))?;
        let from = type_prefix(resource_type);
        let to = prefix_end(from.bytes());
        let mut n = 0;
        for item in current.range(from.bytes()..to.as_slice()).map_err(|e| self.err(e))? {
            let (_, v) = item.map_err(|e| self.err(e))?;
            let entry: CurrentEntry = decode(v.value())?;
            n += u64::from(!entry.deleted);
        }
        Ok(n)
    }

    async fn scan_patient_dates(
        &self,
        resource_type: &str,
        patient: &str,
        from: i64,
        to: i64,
        visit: &mut (dyn FnMut(ResourceVersion) -> bool + Send),
    ) -> Result<()> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let ranges = [(i64::MIN, i64::MIN.saturating_add(1)), (from.max(i64::MIN + 1), to)];
        for (lo, hi) in ranges {
            if lo >= hi {
                continue;
            }
            let start = KeyBuf::new().str(patient).str(resource_type).i64(lo);
            let end = KeyBuf::new().str(patient).str(resource_type).i64(hi);
            let bounds = (start.bytes(), end.bytes());
            if !self.visit_index(&tx, BY_PATIENT_DATE, resource_type, bounds, by_patient_date_id, visit)? {
                return Ok(());
            }
        }
        Ok(())
    }

    async fn changes(
        &self,
        resource_type: Option<&str>,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<ResourceVersion>> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let changes = tx.open_table(CHANGES).map_err(|e| self.err(e))?;
        let versions = tx.open_table(VERSIONS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        let from = KeyBuf::new().i64(from_ms);
        let to = KeyBuf::new().i64(to_ms.saturating_add(1));
        for item in changes.range(from.bytes()..to.bytes()).map_err(|e| self.err(e))?.rev() {
            if out.len() >= limit {
                break;
            }
            let (k, _) = item.map_err(|e| self.err(e))?;
            let mut r = KeyReader::new(k.value());
            r.i64().map_err(corrupt)?;
            let key = r.str().map_err(corrupt)?;
            let version = r.u64().map_err(corrupt)?;
            if !crate::key_has_type(&key, resource_type) {
                continue;
            }
            if let Some(v) = versions.get(version_key(&key, version).bytes()).map_err(|e| self.err(e))? {
                out.push(decode_version(v.value())?);
            }
        }
        Ok(out)
    }

    async fn find_by_identifier(&self, resource_type: &str, identifier: &str) -> Result<Vec<String>> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(BY_IDENTIFIER).map_err(|e| self.err(e))?;
        let from = KeyBuf::new().str(resource_type).str(identifier);
        let to = prefix_end(from.bytes());
        let mut out = Vec::new();
        for item in t.range(from.bytes()..to.as_slice()).map_err(|e| self.err(e))? {
            let (k, _) = item.map_err(|e| self.err(e))?;
            let mut r = KeyReader::new(k.value());
            r.skip_str().map_err(corrupt)?;
            r.skip_str().map_err(corrupt)?;
            out.push(r.str().map_err(corrupt)?);
        }
        Ok(out)
    }

    async fn digest(&self) -> Result<String> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let mut d = StoreDigest::new();
        let versions = tx.open_table(VERSIONS).map_err(|e| self.err(e))?;
        for item in versions.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let mut r = KeyReader::new(k.value());
            let (key, version) = (r.str().map_err(corrupt)?, r.u64().map_err(corrupt)?);
            d.version(&key, version, &unpack(v.value())?);
        }
        let current = tx.open_table(CURRENT).map_err(|e| self.err(e))?;
        for item in current.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let entry: CurrentEntry = decode(v.value())?;
            d.current(&KeyReader::new(k.value()).str().map_err(corrupt)?, entry.version_id, entry.deleted);
        }
        let by_patient = tx.open_table(BY_PATIENT).map_err(|e| self.err(e))?;
        for item in by_patient.iter().map_err(|e| self.err(e))? {
            let (k, _) = item.map_err(|e| self.err(e))?;
            let mut r = KeyReader::new(k.value());
            let (p, t, id) = (r.str().map_err(corrupt)?, r.str().map_err(corrupt)?, r.str().map_err(corrupt)?);
            d.by_patient(&p, &t, &id);
        }
        let by_patient_date = tx.open_table(BY_PATIENT_DATE).map_err(|e| self.err(e))?;
        for item in by_patient_date.iter().map_err(|e| self.err(e))? {
            let (k, _) = item.map_err(|e| self.err(e))?;
            let mut r = KeyReader::new(k.value());
            let (p, t) = (r.str().map_err(corrupt)?, r.str().map_err(corrupt)?);
            let (date, id) = (r.i64().map_err(corrupt)?, r.str().map_err(corrupt)?);
            d.by_patient_date(&p, &t, date, &id);
        }
        let by_identifier = tx.open_table(BY_IDENTIFIER).map_err(|e| self.err(e))?;
        for item in by_identifier.iter().map_err(|e| self.err(e))? {
            let (k, _) = item.map_err(|e| self.err(e))?;
            let mut r = KeyReader::new(k.value());
            let (t, i, id) = (r.str().map_err(corrupt)?, r.str().map_err(corrupt)?, r.str().map_err(corrupt)?);
            d.by_identifier(&t, &i, &id);
        }
        Ok(d.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_of_the_first_layout_is_refused_and_rebuilt_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resources.redb");
        {
            // The first layout: redb tuple keys, no format marker.
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            let old: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("versions");
            tx.open_table(old).unwrap().insert(("Observation/a", 1), b"{}".as_slice()).unwrap();
            tx.commit().unwrap();
        }
        match EmbeddedStore::open(&path) {
            Err(e @ StoreError::OtherFormat { found: 1, .. }) => {
                assert!(e.to_string().contains("delete it and it is rebuilt"), "{e}")
            }
            other => panic!("expected OtherFormat, got {:?}", other.map(|_| ())),
        }
        let store = EmbeddedStore::open_or_rebuild(&path, 1 << 20).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert!(rt.block_on(store.current("Observation", "a")).unwrap().is_none(), "started again empty");
        drop(store);
        EmbeddedStore::open(&path).expect("the new file has this build's layout");
    }

    #[test]
    fn version_records_are_stored_compressed_and_damage_is_an_error() {
        let record = br#"{"resource_type":"Observation","id":"a","resource":{"status":"final","code":{"text":"glucose glucose glucose"}}}"#;
        let stored = pack(record);
        assert!(stored.len() < record.len(), "{} >= {}", stored.len(), record.len());
        assert_eq!(unpack(&stored).unwrap(), record);

        let mut longer = stored.clone();
        longer[..4].copy_from_slice(&(record.len() as u32 + 1).to_le_bytes());
        let e = unpack(&longer).unwrap_err().to_string();
        assert!(e.contains("holds"), "{e}");

        let mut huge = stored.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = unpack(&huge).unwrap_err().to_string();
        assert!(e.contains("does not decompress") && e.contains("claims"), "{e}");
        let e = unpack(&stored[..2]).unwrap_err().to_string();
        assert!(e.contains("shorter than its length"), "{e}");
        let mut cut = stored.clone();
        cut.truncate(stored.len() - 3);
        assert!(matches!(unpack(&cut), Err(StoreError::Corrupt(_))));
    }
}
