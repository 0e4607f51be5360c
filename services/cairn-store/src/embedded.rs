//! The embedded projection store: one redb file.
//!
//! Tables (keys are tuples; `key` is `Type/id`):
//! - `versions` (key, version) -> ResourceVersion JSON: every version, for vread and history;
//! - `current` key -> CurrentEntry JSON: newest version number and the index keys it put in place;
//! - `by_patient` (patient, type, id), `by_identifier` (type, system|value, id): indexes over
//!   current, non-deleted resources (listing a whole type ranges over `current` by key prefix);
//! - `by_patient_date` (patient, type, date key, id): a patient's Observations by effective time;
//! - `changes` (lastUpdated ms, key, version): every version by time, for type and system history;
//! - `checkpoints` (topic, partition) -> next offset.

use crate::digest::StoreDigest;
use crate::{Checkpoint, ResourceStore, ResourceVersion, Result, StoreError};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const VERSIONS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("versions");
const CURRENT: TableDefinition<&str, &[u8]> = TableDefinition::new("current");
const BY_PATIENT: TableDefinition<(&str, &str, &str), ()> = TableDefinition::new("by_patient");
const BY_IDENTIFIER: TableDefinition<(&str, &str, &str), ()> = TableDefinition::new("by_identifier");
const BY_PATIENT_DATE: TableDefinition<(&str, &str, i64, &str), ()> = TableDefinition::new("by_patient_date");
const CHANGES: TableDefinition<(i64, &str, u64), ()> = TableDefinition::new("changes");
type CurrentTable = redb::ReadOnlyTable<&'static str, &'static [u8]>;
type VersionsTable = redb::ReadOnlyTable<(&'static str, u64), &'static [u8]>;

const CHECKPOINTS: TableDefinition<(&str, u32), u64> = TableDefinition::new("checkpoints");

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
    /// 256 MiB cache it stays near 400 MB.
    pub fn open_with_cache(path: impl AsRef<Path>, cache_bytes: usize) -> Result<EmbeddedStore> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| storage(&path, e))?;
        }
        let db = redb::Builder::new().set_cache_size(cache_bytes).create(&path).map_err(|e| storage(&path, e))?;
        let store = EmbeddedStore { db, path };
        // Create every table up front so readers never meet a missing one.
        let tx = store.db.begin_write().map_err(|e| store.err(e))?;
        {
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
        let Some(entry) = current.get(key).map_err(|e| self.err(e))? else { return Ok(None) };
        let entry: CurrentEntry = decode(entry.value())?;
        match versions.get((key, entry.version_id)).map_err(|e| self.err(e))? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Err(StoreError::Corrupt(format!("{key}: current version {} missing", entry.version_id))),
        }
    }
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
                if versions_t.get((key.as_str(), v.version_id)).map_err(|e| self.err(e))?.is_some() {
                    continue; // already applied: replay is idempotent
                }
                versions_t.insert((key.as_str(), v.version_id), encode(v).as_slice()).map_err(|e| self.err(e))?;
                changes.insert((v.last_updated_ms, key.as_str(), v.version_id), ()).map_err(|e| self.err(e))?;
                let previous: Option<CurrentEntry> = match current_t.get(key.as_str()).map_err(|e| self.err(e))? {
                    Some(g) => Some(decode(g.value())?),
                    None => None,
                };
                if previous.as_ref().is_some_and(|p| p.version_id > v.version_id) {
                    continue; // an older version arriving late does not become current
                }
                if let Some(p) = &previous
                    && !p.deleted
                {
                    if let Some(patient) = &p.patient {
                        by_patient
                            .remove((patient.as_str(), v.resource_type.as_str(), v.id.as_str()))
                            .map_err(|e| self.err(e))?;
                        if let Some(d) = p.date_key {
                            by_patient_date
                                .remove((patient.as_str(), v.resource_type.as_str(), d, v.id.as_str()))
                                .map_err(|e| self.err(e))?;
                        }
                    }
                    for ident in &p.identifiers {
                        by_identifier
                            .remove((v.resource_type.as_str(), ident.as_str(), v.id.as_str()))
                            .map_err(|e| self.err(e))?;
                    }
                }
                let entry = CurrentEntry {
                    version_id: v.version_id,
                    deleted: v.deleted,
                    patient: v.patient.clone(),
                    identifiers: v.identifiers.clone(),
                    date_key: v.date_key,
                };
                current_t.insert(key.as_str(), encode(&entry).as_slice()).map_err(|e| self.err(e))?;
                if !v.deleted {
                    if let Some(patient) = &v.patient {
                        by_patient
                            .insert((patient.as_str(), v.resource_type.as_str(), v.id.as_str()), ())
                            .map_err(|e| self.err(e))?;
                        if let Some(d) = v.date_key {
                            by_patient_date
                                .insert((patient.as_str(), v.resource_type.as_str(), d, v.id.as_str()), ())
                                .map_err(|e| self.err(e))?;
                        }
                    }
                    for ident in &v.identifiers {
                        by_identifier
                            .insert((v.resource_type.as_str(), ident.as_str(), v.id.as_str()), ())
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
        match versions.get((key.as_str(), version_id)).map_err(|e| self.err(e))? {
            Some(g) => Ok(Some(decode(g.value())?)),
            None => Ok(None),
        }
    }

    async fn history(&self, resource_type: &str, id: &str) -> Result<Vec<ResourceVersion>> {
        let key = format!("{resource_type}/{id}");
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let versions = tx.open_table(VERSIONS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for item in versions.range((key.as_str(), 0)..=(key.as_str(), u64::MAX)).map_err(|e| self.err(e))?.rev() {
            let (_, v) = item.map_err(|e| self.err(e))?;
            out.push(decode(v.value())?);
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
        let current = tx.open_table(CURRENT).map_err(|e| self.err(e))?;
        let versions = tx.open_table(VERSIONS).map_err(|e| self.err(e))?;
        let mut emit = |id: &str| -> Result<bool> {
            Ok(match self.current_version(&current, &versions, &format!("{resource_type}/{id}"))? {
                Some(v) if !v.deleted => visit(v),
                _ => true,
            })
        };
        match patient {
            Some(p) => {
                let t = tx.open_table(BY_PATIENT).map_err(|e| self.err(e))?;
                for item in t.range((p, resource_type, "")..).map_err(|e| self.err(e))? {
                    let (k, _) = item.map_err(|e| self.err(e))?;
                    let (kp, kt, id) = k.value();
                    if kp != p || kt != resource_type {
                        break;
                    }
                    if !emit(id)? {
                        break;
                    }
                }
            }
            None => {
                // Keys are `Type/id`; '0' is the character after '/', so this is exactly the type.
                let (from, to) = (format!("{resource_type}/"), format!("{resource_type}0"));
                for item in current.range(from.as_str()..to.as_str()).map_err(|e| self.err(e))? {
                    let (k, _) = item.map_err(|e| self.err(e))?;
                    let key = k.value();
                    if !emit(&key[from.len()..])? {
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
        let (from, to) = (format!("{resource_type}/"), format!("{resource_type}0"));
        let mut n = 0;
        for item in current.range(from.as_str()..to.as_str()).map_err(|e| self.err(e))? {
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
        let versions = tx.open_table(VERSIONS).map_err(|e| self.err(e))?;
        let current = tx.open_table(CURRENT).map_err(|e| self.err(e))?;
        let index = tx.open_table(BY_PATIENT_DATE).map_err(|e| self.err(e))?;
        let ranges = [(i64::MIN, i64::MIN.saturating_add(1)), (from.max(i64::MIN + 1), to)];
        for (lo, hi) in ranges {
            if lo >= hi {
                continue;
            }
            for item in index
                .range((patient, resource_type, lo, "")..(patient, resource_type, hi, ""))
                .map_err(|e| self.err(e))?
            {
                let (k, _) = item.map_err(|e| self.err(e))?;
                let (_, _, _, id) = k.value();
                if let Some(v) = self.current_version(&current, &versions, &format!("{resource_type}/{id}"))?
                    && !v.deleted
                    && !visit(v)
                {
                    return Ok(());
                }
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
        for item in changes.range((from_ms, "", 0)..(to_ms.saturating_add(1), "", 0)).map_err(|e| self.err(e))?.rev() {
            if out.len() >= limit {
                break;
            }
            let (k, _) = item.map_err(|e| self.err(e))?;
            let (_, key, version) = k.value();
            if !crate::key_has_type(key, resource_type) {
                continue;
            }
            if let Some(v) = versions.get((key, version)).map_err(|e| self.err(e))? {
                out.push(decode(v.value())?);
            }
        }
        Ok(out)
    }

    async fn find_by_identifier(&self, resource_type: &str, identifier: &str) -> Result<Vec<String>> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(BY_IDENTIFIER).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for item in t.range((resource_type, identifier, "")..).map_err(|e| self.err(e))? {
            let (k, _) = item.map_err(|e| self.err(e))?;
            let (kt, ki, id) = k.value();
            if kt != resource_type || ki != identifier {
                break;
            }
            out.push(id.to_owned());
        }
        Ok(out)
    }

    async fn digest(&self) -> Result<String> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let mut d = StoreDigest::new();
        let versions = tx.open_table(VERSIONS).map_err(|e| self.err(e))?;
        for item in versions.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let (key, version) = k.value();
            d.version(key, version, v.value());
        }
        let current = tx.open_table(CURRENT).map_err(|e| self.err(e))?;
        for item in current.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let entry: CurrentEntry = decode(v.value())?;
            d.current(k.value(), entry.version_id, entry.deleted);
        }
        let by_patient = tx.open_table(BY_PATIENT).map_err(|e| self.err(e))?;
        for item in by_patient.iter().map_err(|e| self.err(e))? {
            let (k, _) = item.map_err(|e| self.err(e))?;
            let (p, t, id) = k.value();
            d.by_patient(p, t, id);
        }
        let by_patient_date = tx.open_table(BY_PATIENT_DATE).map_err(|e| self.err(e))?;
        for item in by_patient_date.iter().map_err(|e| self.err(e))? {
            let (k, _) = item.map_err(|e| self.err(e))?;
            let (p, t, date, id) = k.value();
            d.by_patient_date(p, t, date, id);
        }
        let by_identifier = tx.open_table(BY_IDENTIFIER).map_err(|e| self.err(e))?;
        for item in by_identifier.iter().map_err(|e| self.err(e))? {
            let (k, _) = item.map_err(|e| self.err(e))?;
            let (t, i, id) = k.value();
            d.by_identifier(t, i, id);
        }
        Ok(d.finish())
    }
}
