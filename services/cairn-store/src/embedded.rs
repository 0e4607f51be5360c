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

use crate::{Checkpoint, ResourceStore, ResourceVersion, Result, StoreError};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
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

impl ResourceStore for EmbeddedStore {
    fn apply(&self, versions: &[ResourceVersion], checkpoints: &[Checkpoint], durable: bool) -> Result<()> {
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

    fn checkpoint(&self, topic: &str, partition: u32) -> Result<Option<u64>> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(CHECKPOINTS).map_err(|e| self.err(e))?;
        Ok(t.get((topic, partition)).map_err(|e| self.err(e))?.map(|g| g.value()))
    }

    fn current(&self, resource_type: &str, id: &str) -> Result<Option<ResourceVersion>> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let current = tx.open_table(CURRENT).map_err(|e| self.err(e))?;
        let versions = tx.open_table(VERSIONS).map_err(|e| self.err(e))?;
        self.current_version(&current, &versions, &format!("{resource_type}/{id}"))
    }

    fn version(&self, resource_type: &str, id: &str, version_id: u64) -> Result<Option<ResourceVersion>> {
        let key = format!("{resource_type}/{id}");
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let versions = tx.open_table(VERSIONS).map_err(|e| self.err(e))?;
        match versions.get((key.as_str(), version_id)).map_err(|e| self.err(e))? {
            Some(g) => Ok(Some(decode(g.value())?)),
            None => Ok(None),
        }
    }

    fn history(&self, resource_type: &str, id: &str) -> Result<Vec<ResourceVersion>> {
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

    fn scan_current(
        &self,
        resource_type: &str,
        patient: Option<&str>,
        visit: &mut dyn FnMut(ResourceVersion) -> bool,
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

    fn count_current(&self, resource_type: &str) -> Result<u64> {
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

    fn scan_patient_dates(
        &self,
        resource_type: &str,
        patient: &str,
        from: i64,
        to: i64,
        visit: &mut dyn FnMut(ResourceVersion) -> bool,
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
                match self.current_version(&current, &versions, &format!("{resource_type}/{id}"))? {
                    Some(v) if !v.deleted => {
                        if !visit(v) {
                            return Ok(());
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn changes(
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
            if let Some(t) = resource_type
                && !key.strip_prefix(t).is_some_and(|rest| rest.starts_with('/'))
            {
                continue;
            }
            if let Some(v) = versions.get((key, version)).map_err(|e| self.err(e))? {
                out.push(decode(v.value())?);
            }
        }
        Ok(out)
    }

    fn find_by_identifier(&self, resource_type: &str, identifier: &str) -> Result<Vec<String>> {
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

    fn digest(&self) -> Result<String> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let mut h = Sha256::new();
        let versions = tx.open_table(VERSIONS).map_err(|e| self.err(e))?;
        for item in versions.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let (key, version) = k.value();
            h.update(b"V");
            h.update(key.as_bytes());
            h.update(version.to_be_bytes());
            h.update(v.value());
        }
        let current = tx.open_table(CURRENT).map_err(|e| self.err(e))?;
        for item in current.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            h.update(b"C");
            h.update(k.value().as_bytes());
            h.update(v.value());
        }
        let by_patient = tx.open_table(BY_PATIENT).map_err(|e| self.err(e))?;
        for item in by_patient.iter().map_err(|e| self.err(e))? {
            let (k, _) = item.map_err(|e| self.err(e))?;
            let (p, t, id) = k.value();
            h.update(format!("P{p}\0{t}\0{id}\0").as_bytes());
        }
        let by_patient_date = tx.open_table(BY_PATIENT_DATE).map_err(|e| self.err(e))?;
        for item in by_patient_date.iter().map_err(|e| self.err(e))? {
            let (k, _) = item.map_err(|e| self.err(e))?;
            let (p, t, d, id) = k.value();
            h.update(format!("D{p}\0{t}\0{d}\0{id}\0").as_bytes());
        }
        let by_identifier = tx.open_table(BY_IDENTIFIER).map_err(|e| self.err(e))?;
        for item in by_identifier.iter().map_err(|e| self.err(e))? {
            let (k, _) = item.map_err(|e| self.err(e))?;
            let (t, i, id) = k.value();
            h.update(format!("I{t}\0{i}\0{id}\0").as_bytes());
        }
        Ok(hex::encode(h.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn version(id: &str, v: u64, patient: &str, deleted: bool) -> ResourceVersion {
        ResourceVersion {
            resource_type: "Observation".into(),
            id: id.into(),
            version_id: v,
            last_updated: format!("2026-11-28T10:00:0{v}.000Z"),
            last_updated_ms: 1_795_000_000_000 + v as i64 * 1000,
            deleted,
            resource: (!deleted).then(|| {
                serde_json::value::to_raw_value(&json!({"resourceType": "Observation", "id": id, "status": "final"}))
                    .unwrap()
            }),
            patient: Some(patient.into()),
            identifiers: vec![format!("urn:sys|{id}")],
            date_key: Some(v as i64 * 100),
        }
    }

    #[test]
    fn versions_current_indexes_and_checkpoints() {
        let tmp = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(tmp.path().join("r.redb")).unwrap();
        let cp = |o| Checkpoint { topic: "cairn.fhir".into(), partition: 3, next_offset: o };
        store
            .apply(&[version("a", 1, "Patient/p1", false), version("b", 1, "Patient/p2", false)], &[cp(2)], false)
            .unwrap();
        store.apply(&[version("a", 2, "Patient/p2", false)], &[cp(3)], true).unwrap();
        assert_eq!(store.checkpoint("cairn.fhir", 3).unwrap(), Some(3));
        assert_eq!(store.current("Observation", "a").unwrap().unwrap().version_id, 2);
        assert_eq!(
            store.history("Observation", "a").unwrap().iter().map(|v| v.version_id).collect::<Vec<_>>(),
            vec![2, 1]
        );
        let mut seen = Vec::new();
        store
            .scan_current("Observation", Some("Patient/p2"), &mut |v| {
                seen.push(v.id);
                true
            })
            .unwrap();
        assert_eq!(seen, vec!["a", "b"], "a moved to p2 with its new version");
        let mut seen = Vec::new();
        store
            .scan_current("Observation", Some("Patient/p1"), &mut |v| {
                seen.push(v.id);
                true
            })
            .unwrap();
        assert!(seen.is_empty());
        assert_eq!(store.find_by_identifier("Observation", "urn:sys|a").unwrap(), vec!["a"]);
        let mut seen = Vec::new();
        store
            .scan_patient_dates("Observation", "Patient/p2", 150, 250, &mut |v| {
                seen.push((v.id, v.version_id));
                true
            })
            .unwrap();
        assert_eq!(seen, vec![("a".to_owned(), 2)], "only a's current version, by its date key");
        let mut seen = Vec::new();
        store
            .scan_patient_dates("Observation", "Patient/p2", 0, 150, &mut |v| {
                seen.push(v.id);
                true
            })
            .unwrap();
        assert_eq!(seen, vec!["b"]);

        // Replaying the same versions changes nothing.
        let before = store.digest().unwrap();
        store
            .apply(&[version("a", 1, "Patient/p1", false), version("a", 2, "Patient/p2", false)], &[cp(3)], false)
            .unwrap();
        assert_eq!(store.digest().unwrap(), before);

        // A deletion is a version; the resource leaves the indexes.
        store.apply(&[version("a", 3, "Patient/p2", true)], &[cp(4)], false).unwrap();
        assert!(store.current("Observation", "a").unwrap().unwrap().deleted);
        assert!(store.find_by_identifier("Observation", "urn:sys|a").unwrap().is_empty());
        let mut seen = Vec::new();
        store
            .scan_current("Observation", None, &mut |v| {
                seen.push(v.id);
                true
            })
            .unwrap();
        assert_eq!(seen, vec!["b"]);
        assert_eq!(store.count_current("Observation").unwrap(), 1);
        assert_eq!(store.count_current("Patient").unwrap(), 0);
        let changes = store.changes(Some("Observation"), 0, i64::MAX, 10).unwrap();
        assert_eq!(changes.len(), 4);
        assert_eq!(changes[0].version_id, 3, "newest first");
        assert_eq!(store.changes(None, 0, 1_795_000_001_500, 10).unwrap().len(), 2);
    }
}
