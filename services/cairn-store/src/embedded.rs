//! The embedded projection store: one redb file, and beside it the value file (`crate::values`)
//! that holds every version record.
//!
//! Tables (keys are tuples encoded as order-preserving bytes, `crate::key`; `key` is `Type/id`):
//! - `versions` (key, version) -> a [`VersionRow`]: where the version record lies in the value file
//!   (the record is ResourceVersion JSON, LZ4-compressed, [`Packer`]) and whether it is a deletion.
//!   Every version, for vread and history; a resource's versions are adjacent, the newest last,
//!   so the last one is its current version (listing a whole type ranges over them by key prefix);
//! - `by_patient_date` (patient, type, date key, id): a patient's Observations by effective time
//!   and AuditEvents by recording time;
//! - `by_patient` (patient, type, id): the resources in a patient's compartment that have no date
//!   key (Patients, Devices, Provenances); with `by_patient_date` it finds a whole compartment, and a
//!   resource is in one of the two only (`index_keys`);
//! - `by_identifier` (type, system|value, id). The three indexes are over current, non-deleted
//!   resources;
//! - `changes` (lastUpdated ms, key, version): every version by time, for type and system history;
//! - `checkpoints` (topic, partition) -> next offset;
//! - `meta` `format` -> [`FORMAT`], the layout of the file; `values_len`, the value file's length
//!   as of this transaction; `indexes_pending` while a rebuild
//!   ([`EmbeddedStore::create_for_rebuild`]) has not built the indexes yet.

use crate::digest::StoreDigest;
use crate::drop_behind::DropBehind;
use crate::key::{BadKey, KeyBuf, KeyReader};
use crate::sorter::{KeySorter, difference};
use crate::values::{Appender, Pointer, ValueFile};
use crate::{Checkpoint, ResourceStore, ResourceVersion, Result, StoreError};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::Deserialize;
use std::borrow::Cow;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

const VERSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("versions");
const BY_PATIENT: TableDefinition<&[u8], ()> = TableDefinition::new("by_patient");
const BY_IDENTIFIER: TableDefinition<&[u8], ()> = TableDefinition::new("by_identifier");
const BY_PATIENT_DATE: TableDefinition<&[u8], ()> = TableDefinition::new("by_patient_date");
const CHANGES: TableDefinition<&[u8], ()> = TableDefinition::new("changes");
const CHECKPOINTS: TableDefinition<(&str, u32), u64> = TableDefinition::new("checkpoints");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Present in `meta` from the start of a rebuild until its indexes are built: a file that still has
/// it was left by an interrupted rebuild, and its indexes are incomplete.
const INDEXES_PENDING: &str = "indexes_pending";
/// The value file's committed length, in `meta`.
const VALUES_LEN: &str = "values_len";
type VersionsTable = redb::ReadOnlyTable<&'static [u8], &'static [u8]>;

/// The layout of the store file. 1: redb tuple keys (until 2026-11-29); 2: byte keys; 3: version
/// records compressed; 4: version records in the value file; 5: no `current` table (the newest
/// row in `versions` is the current version); 6: a resource with a date key is in `by_patient_date`
/// only, no longer in `by_patient` too; 7: a record may be spliced from another (`Packer`). A file
/// of another layout is not read: the store is derived
/// from the log, so it is rebuilt instead ([`EmbeddedStore::open_or_rebuild`]).
pub const FORMAT: u64 = 7;

/// Packs version records as the value file keeps them (the `versions` table points to them): the
/// record's JSON ([`ResourceVersion::encode`]) compressed with LZ4 (the `lz4_flex` crate, block
/// format), its length first. Version records are most of what a rebuild writes (decision 0010);
/// JSON records shrink to about half. Only this store compresses: the record itself (what the
/// digest covers, what the CQL store keeps) is unchanged. A packer keeps its buffers and LZ4's
/// table from one record to the next: allocating and zeroing them for each record took about a
/// fifth of packing a rebuild's records.
///
/// A write's AuditEvent and Provenance differ only in their type and date key: the rest of their
/// records (`ResourceVersion::encode_into`'s middle: id, times, patient, and the fact they are
/// both rendered from) is the same. The second of the two in a batch is packed as a splice
/// ([`Packer::pack_spliced`]): its type and date key as they are, and where its middle lies in the
/// first one's record: 78 bytes for a Provenance that packed whole to about 440 (a quarter of what
/// a write event put in the value file). A spliced record is marked in its length's
/// top bit ([`SPLICED`]): [length | flag][the other record's pointer][where the middle starts in
/// that record][where it goes in this one][its length][the rest of this record].
#[derive(Default)]
struct Packer {
    table: lz4_flex::block::CompressTable,
    encoded: Vec<u8>,
    compressed: Vec<u8>,
}

/// Set in a packed record's length when its middle is spliced in from another record. Records are
/// far below 2^31 bytes ([`MAX_RECORD_BYTES`]), so the bit is free in the plain format.
const SPLICED: u32 = 1 << 31;
/// Where a spliced record holds the pointer of the record its middle comes from, filled in by the
/// writer once that record's place in the value file is known.
const SPLICE_POINTER: std::ops::Range<usize> = 4..4 + Pointer::BYTES;
/// The bytes before the rest of a spliced record: its length, the pointer, and three `u32`s.
const SPLICE_HEADER: usize = SPLICE_POINTER.end + 12;

impl Packer {
    /// The version's record, packed.
    fn pack(&mut self, version: &ResourceVersion) -> Vec<u8> {
        self.pack_locating_middle(version).0
    }

    /// [`Packer::pack`], and where the record's middle lies in it (unpacked), for the records
    /// spliced from it.
    fn pack_locating_middle(&mut self, version: &ResourceVersion) -> (Vec<u8>, std::ops::Range<usize>) {
        self.encoded.clear();
        let middle = version.encode_into(&mut self.encoded);
        let most = lz4_flex::block::get_maximum_output_size(self.encoded.len());
        if self.compressed.len() < most {
            self.compressed.resize(most, 0);
        }
        let n = lz4_flex::block::compress_into_with_table(&self.encoded, &mut self.compressed, &mut self.table)
            .expect("the output has room for the worst case");
        // A record of 65,535 bytes or more made the table a large one; smaller records go back to the
        // small one, so every record packs to the same bytes as LZ4 packing it alone.
        if self.encoded.len() >= u16::MAX as usize {
            self.table = lz4_flex::block::CompressTable::default();
        }
        let mut packed = Vec::with_capacity(4 + n);
        packed.extend_from_slice(&(self.encoded.len() as u32).to_le_bytes());
        packed.extend_from_slice(&self.compressed[..n]);
        (packed, middle)
    }

    /// The version's record without its middle, which another record holds at `from` (where the
    /// same middle lies in that record, unpacked); the other record's pointer is left zero
    /// ([`SPLICE_POINTER`]) for the writer. The middle is not encoded again. The rest (a type and a
    /// date key) is a few dozen bytes, too few for LZ4 to shrink.
    fn pack_spliced(&mut self, version: &ResourceVersion, from: std::ops::Range<usize>) -> Vec<u8> {
        self.encoded.clear();
        let at = version.encode_around_middle(&mut self.encoded);
        let rest = self.encoded.len();
        let mut packed = Vec::with_capacity(SPLICE_HEADER + rest);
        packed.extend_from_slice(&((rest + from.len()) as u32 | SPLICED).to_le_bytes());
        packed.extend_from_slice(&[0; Pointer::BYTES]);
        for n in [from.start, at, from.len()] {
            packed.extend_from_slice(&(n as u32).to_le_bytes());
        }
        packed.extend_from_slice(&self.encoded);
        packed
    }
}

/// One version's packed record, as the packer hands it to the writer.
struct Packed {
    bytes: Vec<u8>,
    /// Spliced from the record of the batch's version at this index: its pointer goes into
    /// `bytes` ([`SPLICE_POINTER`]) once that record is appended.
    spliced_from: Option<usize>,
}

/// Packs a batch's versions in order, splicing each audit record (a fact,
/// `ResourceVersion::fact`) whose middle the batch's first fact under its id has too from that
/// version's record.
struct BatchPacker<'a> {
    packer: Packer,
    batch: &'a [&'a ResourceVersion],
    /// The first fact of the batch under each id: its index, and where its middle lies in its
    /// record. Keyed by the id (a middle holds it), not the fact's text: hashing that took half as
    /// long as compressing a record.
    first_with_id: foldhash::HashMap<&'a str, (usize, std::ops::Range<usize>)>,
}

impl<'a> BatchPacker<'a> {
    fn new(batch: &'a [&'a ResourceVersion]) -> BatchPacker<'a> {
        BatchPacker { packer: Packer::default(), batch, first_with_id: Default::default() }
    }

    /// The batch's version at `index`, packed: spliced from the batch's first fact under its id
    /// when that has the same middle.
    fn pack(&mut self, index: usize) -> Packed {
        let version = self.batch[index];
        if !version.fact {
            return Packed { bytes: self.packer.pack(version), spliced_from: None };
        }
        match self.first_with_id.get(version.id.as_str()) {
            Some((first, from)) if version.same_middle(self.batch[*first]) => {
                Packed { bytes: self.packer.pack_spliced(version, from.clone()), spliced_from: Some(*first) }
            }
            Some(_) => Packed { bytes: self.packer.pack(version), spliced_from: None },
            None => {
                let (bytes, middle) = self.packer.pack_locating_middle(version);
                self.first_with_id.insert(&version.id, (index, middle));
                Packed { bytes, spliced_from: None }
            }
        }
    }
}

/// The largest version record [`unpack`] accepts: far above the API's request limit, and it keeps a
/// damaged length from asking for gigabytes.
const MAX_RECORD_BYTES: usize = 256 << 20;

/// The record `stored` packs; `read` gives the packed record a pointer names (the one a spliced
/// record's middle comes from).
fn unpack(stored: &[u8], read: impl FnOnce(Pointer) -> Result<Vec<u8>>) -> Result<Vec<u8>> {
    let corrupt = |why: String| StoreError::Corrupt(format!("a version record does not decompress: {why}"));
    let (n, data) =
        lz4_flex::block::uncompressed_size(stored).map_err(|_| corrupt("it is shorter than its length".into()))?;
    if !is_spliced(stored) {
        return decompress(data, n).map_err(corrupt);
    }
    let n = n & !(SPLICED as usize);
    let (header, rest) =
        stored.split_at_checked(SPLICE_HEADER).ok_or_else(|| corrupt("it is shorter than its header".into()))?;
    let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes")) as usize;
    let (from, at, len) = (u32_at(SPLICE_POINTER.end), u32_at(SPLICE_POINTER.end + 4), u32_at(SPLICE_POINTER.end + 8));
    if rest.len().checked_add(len) != Some(n) || at > rest.len() {
        return Err(corrupt(format!("it claims {n} bytes, {} of them its own and {len} at {at}", rest.len())));
    }
    let other = unpack_whole(&read(Pointer::decode(&header[SPLICE_POINTER])?)?)
        .map_err(|e| corrupt(format!("the record it is spliced from: {e}")))?;
    let middle = from.checked_add(len).and_then(|end| other.get(from..end)).ok_or_else(|| {
        corrupt(format!("its middle lies past the end of the record it is in ({} bytes)", other.len()))
    })?;
    let mut record = Vec::with_capacity(n);
    record.extend_from_slice(&rest[..at]);
    record.extend_from_slice(middle);
    record.extend_from_slice(&rest[at..]);
    Ok(record)
}

/// The `n` bytes LZ4 `data` holds; why not, when it holds something else.
fn decompress(data: &[u8], n: usize) -> std::result::Result<Vec<u8>, String> {
    if n > MAX_RECORD_BYTES {
        return Err(format!("it claims {n} bytes"));
    }
    let record = lz4_flex::block::decompress(data, n).map_err(|e| e.to_string())?;
    // The decoder stops where the data ends; a damaged length would otherwise go unnoticed.
    if record.len() != n {
        return Err(format!("it claims {n} bytes and holds {}", record.len()));
    }
    Ok(record)
}

fn is_spliced(stored: &[u8]) -> bool {
    stored.first_chunk::<4>().is_some_and(|n| u32::from_le_bytes(*n) & SPLICED != 0)
}

/// [`unpack`] for a record that is packed whole: one a spliced record's middle comes from, which is
/// never spliced itself (so no chain of records needs reading, and none can loop).
fn unpack_whole(stored: &[u8]) -> Result<Vec<u8>> {
    unpack(stored, |_| Err(StoreError::Corrupt("it is spliced from another record itself".into())))
}

/// A batch at least this large is packed on a helper thread ([`with_packed`]).
const PACK_AHEAD_MIN: usize = 512;
const PACK_CHUNK: usize = 256;

/// Runs `write` with the batch's records encoded and packed, in order. A large batch (a projector
/// behind the log, a rebuild) is packed on a helper thread while `write` inserts what is ready: the
/// store writes on one core, and encoding and compressing took about a fifth of its time.
fn with_packed<R>(versions: &[&ResourceVersion], write: impl FnOnce(&mut dyn Iterator<Item = Packed>) -> R) -> R {
    if versions.len() < PACK_AHEAD_MIN {
        let mut packer = BatchPacker::new(versions);
        return write(&mut (0..versions.len()).map(|i| packer.pack(i)));
    }
    std::thread::scope(|scope| {
        let (ready, packed) = std::sync::mpsc::sync_channel::<Vec<Packed>>(16);
        scope.spawn(move || {
            let mut packer = BatchPacker::new(versions);
            for start in (0..versions.len()).step_by(PACK_CHUNK) {
                let chunk = (start..(start + PACK_CHUNK).min(versions.len())).map(|i| packer.pack(i)).collect();
                // A failed write stops reading; the helper stops with it.
                if ready.send(chunk).is_err() {
                    return;
                }
            }
        });
        write(&mut packed.into_iter().flatten())
    })
}

fn version_key(key: &str, version: u64) -> KeyBuf {
    KeyBuf::new().str(key).u64(version)
}

/// Every `versions` key of the resource `key` starts with this.
fn resource_prefix(key: &str) -> KeyBuf {
    KeyBuf::new().str(key)
}

/// The resource part of a `versions` key (its prefix, [`resource_prefix`]) and its version.
fn split_version_key(vkey: &[u8]) -> Result<(&[u8], u64)> {
    let (resource, version) = vkey.split_last_chunk::<8>().ok_or_else(|| corrupt(BadKey))?;
    Ok((resource, u64::from_be_bytes(*version)))
}

/// A `versions` row: where the version record lies in the value file, and whether the version is a
/// deletion, so that finding a type's current resources, or the index keys a new version replaces,
/// reads no record of a deleted one.
#[derive(Clone, Copy)]
struct VersionRow {
    pointer: Pointer,
    deleted: bool,
}

impl VersionRow {
    const BYTES: usize = Pointer::BYTES + 1;

    fn encode(&self) -> [u8; Self::BYTES] {
        let mut out = [0; Self::BYTES];
        out[..Pointer::BYTES].copy_from_slice(&self.pointer.encode());
        out[Pointer::BYTES] = u8::from(self.deleted);
        out
    }

    fn decode(bytes: &[u8]) -> Result<VersionRow> {
        let (pointer, flags) = match bytes {
            [pointer @ .., flags] if bytes.len() == Self::BYTES => (pointer, *flags),
            _ => {
                let detail = format!("a version row of {} bytes, not {}", bytes.len(), Self::BYTES);
                return Err(StoreError::Corrupt(detail));
            }
        };
        let deleted = match flags {
            0 | 1 => flags == 1,
            _ => return Err(StoreError::Corrupt(format!("a version row with flags {flags:#04x}"))),
        };
        Ok(VersionRow { pointer: Pointer::decode(pointer)?, deleted })
    }
}

/// Every `versions` key of one resource type starts with this.
fn type_prefix(resource_type: &str) -> KeyBuf {
    KeyBuf::new().str_prefix(&format!("{resource_type}/"))
}

fn corrupt(_: BadKey) -> StoreError {
    StoreError::Corrupt("a key does not decode".into())
}

pub struct EmbeddedStore {
    /// Always `Some` until [`Drop`] takes it: closed only once the value file is synced.
    db: Option<Database>,
    path: PathBuf,
    values: ValueFile,
    /// Where the next transaction appends to the value file: the end of what the last write
    /// transaction wrote there. Only `apply` changes it, before it commits; one `apply` runs at a
    /// time (it holds `rebuild`'s lock, and redb runs one write transaction at a time), so each
    /// sees the one before it.
    values_end: AtomicU64,
    /// A rebuild in progress: `apply` leaves the index tables alone and gathers the keys it would
    /// have put in and taken out; [`EmbeddedStore::build_indexes`] writes what is left, in key order.
    /// Every `apply` holds this lock for its whole transaction.
    rebuild: Mutex<Rebuild>,
    /// While a rebuild writes: its pages leave the page cache once on disk ([`DropBehind`]).
    drop_behind: Mutex<Option<DropBehind>>,
}

/// Bytes of index keys a rebuild sorts in memory per index, inserted and removed apart, before it
/// spills a sorted run beside the store file: about 200 MB for the keys inserted into the three
/// indexes (removed ones are few: those of resources changed or deleted later in the log).
const INDEX_SORT_BUDGET: usize = 64 << 20;

/// How often [`EmbeddedStore::with_early_writeback`] syncs the store file during an index build.
const EARLY_WRITEBACK_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// How often a rebuild drops its written pages from the page cache ([`DropBehind`]): about 250 MB
/// written in between at full speed.
const DROP_BEHIND_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// How far [`EmbeddedStore::build_indexes`] has come: index keys written, of how many.
#[derive(Debug, Clone, Copy)]
pub struct IndexProgress {
    pub written: u64,
    pub keys: u64,
}

/// Where a store is in a rebuild ([`EmbeddedStore::create_for_rebuild`]).
enum Rebuild {
    /// No rebuild: `apply` keeps the index tables up to date.
    None,
    /// `apply` gathers index keys.
    Gathering(Box<Gathered>),
    /// [`EmbeddedStore::build_indexes`] is writing them: no `apply` until it is done.
    Building,
    /// A write failed while gathering (the keys may include some of a transaction that did not
    /// commit), or the index build failed: the rebuild has to start again.
    Failed,
}

/// A rebuild's index keys as `apply` met them: per index, the keys it would have inserted and
/// removed (sorted runs spill to `scratch`, beside the store file).
struct Gathered {
    scratch: PathBuf,
    added: [KeySorter; 3],
    removed: [KeySorter; 3],
}

/// Where `apply` puts the index keys of the resources it makes current: the index tables of its
/// write transaction (in [`Index`] order), or during a rebuild the keys gathered for
/// [`EmbeddedStore::build_indexes`].
#[allow(clippy::large_enum_variant)] // one per transaction, on the stack
enum IndexSink<'tx, 'g> {
    Tables([redb::Table<'tx, &'static [u8], ()>; 3]),
    Gather(&'g mut Gathered),
}

#[derive(Clone, Copy)]
enum Index {
    Patient,
    PatientDate,
    Identifier,
}

impl Index {
    const ALL: [Index; 3] = [Index::Patient, Index::PatientDate, Index::Identifier];

    fn table(self) -> TableDefinition<'static, &'static [u8], ()> {
        match self {
            Index::Patient => BY_PATIENT,
            Index::PatientDate => BY_PATIENT_DATE,
            Index::Identifier => BY_IDENTIFIER,
        }
    }
}

/// What the indexes hold of a version, as [`index_keys`] reads it: borrowed from a version being
/// applied, or decoded from the record of the one it replaces (without its resource, which the
/// decoder skips over instead of copying).
#[derive(Deserialize)]
struct IndexValues<'a> {
    #[serde(borrow)]
    resource_type: Cow<'a, str>,
    #[serde(borrow)]
    id: Cow<'a, str>,
    deleted: bool,
    #[serde(default, borrow)]
    patient: Option<Cow<'a, str>>,
    #[serde(default)]
    date_key: Option<i64>,
    #[serde(default)]
    identifiers: Cow<'a, [String]>,
}

impl<'a> From<&'a ResourceVersion> for IndexValues<'a> {
    fn from(v: &'a ResourceVersion) -> Self {
        IndexValues {
            resource_type: Cow::Borrowed(&v.resource_type),
            id: Cow::Borrowed(&v.id),
            deleted: v.deleted,
            patient: v.patient.as_deref().map(Cow::Borrowed),
            date_key: v.date_key,
            identifiers: Cow::Borrowed(&v.identifiers),
        }
    }
}

/// The index keys of a version while it is its resource's current version (none for a deletion):
/// the one place that says what the indexes hold. A version in a patient's compartment goes to the
/// patient-date index when it has a date key and to the patient index otherwise: a compartment is
/// read from both, and a write's Observation and AuditEvent cost one key each, not two (a third of
/// a device upload's index keys: docs/performance.md, "Fewer index keys").
fn index_keys(v: IndexValues<'_>, mut key: impl FnMut(Index, KeyBuf) -> Result<()>) -> Result<()> {
    if v.deleted {
        return Ok(());
    }
    let (rtype, id) = (&*v.resource_type, &*v.id);
    if let Some(patient) = v.patient.as_deref() {
        match v.date_key {
            Some(d) => key(Index::PatientDate, KeyBuf::new().str(patient).str(rtype).i64(d).str(id))?,
            None => key(Index::Patient, KeyBuf::new().str(patient).str(rtype).str(id))?,
        }
    }
    for ident in v.identifiers.iter() {
        key(Index::Identifier, KeyBuf::new().str(rtype).str(ident).str(id))?;
    }
    Ok(())
}

impl<'tx> IndexSink<'tx, '_> {
    fn tables(tx: &'tx redb::WriteTransaction) -> std::result::Result<IndexSink<'tx, 'static>, redb::TableError> {
        let [p, d, i] = Index::ALL;
        Ok(IndexSink::Tables([tx.open_table(p.table())?, tx.open_table(d.table())?, tx.open_table(i.table())?]))
    }

    fn insert(&mut self, index: Index, key: &[u8]) -> std::result::Result<(), String> {
        match self {
            IndexSink::Tables(t) => t[index as usize].insert(key, ()).map(drop).map_err(|e| e.to_string()),
            IndexSink::Gather(g) => g.added[index as usize].push(key).map_err(|e| e.to_string()),
        }
    }

    fn remove(&mut self, index: Index, key: &[u8]) -> std::result::Result<(), String> {
        match self {
            IndexSink::Tables(t) => t[index as usize].remove(key).map(drop).map_err(|e| e.to_string()),
            IndexSink::Gather(g) => g.removed[index as usize].push(key).map_err(|e| e.to_string()),
        }
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // redb's drop commits durably, which makes the last non-durable transactions durable: their
        // records must be on disk first. If they cannot be synced, the database is not closed
        // properly, and its next opening falls back to its last durable transaction, whose records
        // were synced.
        let db = self.db.take();
        // A store dropped before its rebuild was finished is refused and built again whatever is
        // on disk: no sync of what may be gigabytes.
        if self.rebuilding() {
            drop(db);
            return;
        }
        match self.values.sync() {
            Ok(()) => drop(db),
            Err(e) => {
                tracing::error!(error = %e, "projection store: the value file cannot be synced; closed without a last commit");
                std::mem::forget(db);
            }
        }
    }
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
        Self::open_marked(path.as_ref(), cache_bytes, false)
    }

    /// Opens the store; a new file is marked an unfinished rebuild with `rebuild` (in the
    /// transaction that gives it its format, so no crash leaves a new file looking finished).
    fn open_marked(path: &Path, cache_bytes: usize, rebuild: bool) -> Result<EmbeddedStore> {
        let path = path.to_path_buf();
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| storage(&path, e))?;
        }
        let db = redb::Builder::new().set_cache_size(cache_bytes).create(&path).map_err(|e| storage(&path, e))?;
        let err = |e: &dyn std::fmt::Display| storage(&path, e);
        let tx = db.begin_write().map_err(|e| err(&e))?;
        let values_len = {
            let names: Vec<String> = tx.list_tables().map_err(|e| err(&e))?.map(|t| t.name().to_owned()).collect();
            let meta = |name: &str| -> Result<Option<u64>> {
                if !names.iter().any(|n| n == META.name()) {
                    return Ok(None);
                }
                let t = tx.open_table(META).map_err(|e| err(&e))?;
                Ok(t.get(name).map_err(|e| err(&e))?.map(|g| g.value()))
            };
            let (format, unfinished) = (meta("format")?, meta(INDEXES_PENDING)?.is_some());
            match format {
                Some(FORMAT) if unfinished => {
                    return Err(StoreError::Unfinished { path: path.display().to_string() });
                }
                Some(FORMAT) => {}
                // A file that holds tables but no format marker is the first layout.
                found if found.is_some() || !names.is_empty() => {
                    return Err(StoreError::OtherFormat {
                        path: path.display().to_string(),
                        found: found.unwrap_or(1),
                    });
                }
                _ => {
                    let mut meta = tx.open_table(META).map_err(|e| err(&e))?;
                    meta.insert("format", FORMAT).map_err(|e| err(&e))?;
                    if rebuild {
                        meta.insert(INDEXES_PENDING, 1).map_err(|e| err(&e))?;
                    }
                }
            }
            let values_len = meta(VALUES_LEN)?.unwrap_or(0);
            // Create every table up front so readers never meet a missing one.
            tx.open_table(VERSIONS).map_err(|e| err(&e))?;
            tx.open_table(BY_PATIENT).map_err(|e| err(&e))?;
            tx.open_table(BY_IDENTIFIER).map_err(|e| err(&e))?;
            tx.open_table(BY_PATIENT_DATE).map_err(|e| err(&e))?;
            tx.open_table(CHANGES).map_err(|e| err(&e))?;
            tx.open_table(CHECKPOINTS).map_err(|e| err(&e))?;
            values_len
        };
        tx.commit().map_err(|e| err(&e))?;
        let values = ValueFile::open(&crate::values::path_for(&path), values_len)?;
        Ok(EmbeddedStore {
            db: Some(db),
            path,
            values,
            values_end: AtomicU64::new(values_len),
            rebuild: Mutex::new(Rebuild::None),
            drop_behind: Mutex::new(None),
        })
    }

    /// Opens the store, or starts a rebuild ([`EmbeddedStore::create_for_rebuild`]) when there is
    /// none yet, or the file has another layout or is an unfinished rebuild (deleted with a warning:
    /// it is derived, and the projectors rebuild it from the log; their checkpoints went with it).
    /// After a rebuild starts ([`EmbeddedStore::rebuilding`]), the caller catches up from the log and
    /// calls [`EmbeddedStore::build_indexes`] before anything reads the store.
    pub fn open_or_rebuild(path: impl AsRef<Path>, cache_bytes: usize) -> Result<EmbeddedStore> {
        let path = path.as_ref();
        if !path.exists() {
            return Self::create_for_rebuild(path, cache_bytes);
        }
        match Self::open_with_cache(path, cache_bytes) {
            Err(e @ (StoreError::OtherFormat { .. } | StoreError::Unfinished { .. } | StoreError::Damaged { .. })) => {
                tracing::warn!(path = %path.display(), reason = %e, "rebuilding the projection store from the log");
                std::fs::remove_file(path).map_err(|e| storage(path, e))?;
                let values = crate::values::path_for(path);
                if values.exists() {
                    std::fs::remove_file(&values).map_err(|e| storage(&values, e))?;
                }
                Self::create_for_rebuild(path, cache_bytes)
            }
            other => other,
        }
    }

    /// Whether this store is a rebuild whose indexes are not built yet.
    pub fn rebuilding(&self) -> bool {
        !matches!(*self.rebuild_state(), Rebuild::None)
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        storage(&self.path, e)
    }

    /// The rebuild's state, locked. A write that panicked while holding it (its transaction was
    /// dropped, not committed) may have gathered keys of that transaction: a rebuild then fails,
    /// as after a write that returned an error, instead of every later write panicking too.
    fn rebuild_state(&self) -> std::sync::MutexGuard<'_, Rebuild> {
        self.rebuild.lock().unwrap_or_else(|poisoned| {
            self.rebuild.clear_poison();
            let mut state = poisoned.into_inner();
            if matches!(*state, Rebuild::Gathering(_) | Rebuild::Building) {
                *state = Rebuild::Failed;
            }
            state
        })
    }

    fn db(&self) -> &Database {
        self.db.as_ref().expect("the database is open until the store is dropped")
    }

    /// The version a `versions` row points to, read from the value file.
    fn read_version(&self, row: &[u8]) -> Result<ResourceVersion> {
        self.read_record(VersionRow::decode(row)?.pointer)
    }

    fn read_record(&self, pointer: Pointer) -> Result<ResourceVersion> {
        decode(&self.record_bytes(pointer)?)
    }

    /// The version record `pointer` names, as the digest covers it (unpacked JSON).
    fn record_bytes(&self, pointer: Pointer) -> Result<Vec<u8>> {
        unpack(&self.values.read(pointer)?, |other| self.values.read(other))
    }

    /// Creates a new store file for a rebuild from the log (`cairn replay`, a server whose store was
    /// deleted): [`ResourceStore::apply`] then fills the versions and the change list
    /// but leaves the index tables alone, gathering the keys it would have inserted and removed, and
    /// [`EmbeddedStore::build_indexes`] writes what is left of them once, in key order, at the end.
    /// Kept up to date one write at a time instead, the index by patient and date took about a
    /// quarter of a rebuild: its keys arrive in random order, and every transaction rewrote most of
    /// its pages. Until the indexes are built the store answers searches wrongly, so nothing may
    /// read it; a file whose rebuild never finished is refused on opening
    /// ([`StoreError::Unfinished`]), so nothing is synced before the build's last commit either.
    /// `path` must not exist yet.
    pub fn create_for_rebuild(path: impl AsRef<Path>, cache_bytes: usize) -> Result<EmbeddedStore> {
        Self::create_for_rebuild_sorting(path.as_ref(), cache_bytes, INDEX_SORT_BUDGET, DROP_BEHIND_EVERY)
    }

    /// [`EmbeddedStore::create_for_rebuild`], sorting up to `sort_budget` bytes of keys per index
    /// in memory before spilling a sorted run, and dropping written pages every `drop_every`.
    fn create_for_rebuild_sorting(
        path: &Path,
        cache_bytes: usize,
        sort_budget: usize,
        drop_every: std::time::Duration,
    ) -> Result<EmbeddedStore> {
        if path.exists() {
            return Err(storage(path, "a rebuild starts a new file, and this one exists"));
        }
        let store = Self::open_marked(path, cache_bytes, true)?;
        let scratch = path.with_extension("index-build");
        // What an interrupted rebuild left.
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).map_err(|e| storage(&scratch, e))?;
        let sorters = |kind: &str| {
            Index::ALL.map(|index| KeySorter::new(&scratch, &format!("{}.{kind}", index.table().name()), sort_budget))
        };
        let values = crate::values::path_for(path);
        *store.drop_behind.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(DropBehind::start(drop_every, &[path, &values], &scratch));
        let gathered = Gathered { added: sorters("added"), removed: sorters("removed"), scratch };
        *store.rebuild_state() = Rebuild::Gathering(Box::new(gathered));
        Ok(store)
    }

    /// Ends a rebuild begun with [`EmbeddedStore::create_for_rebuild`]: writes each index from the
    /// keys `apply` gathered (those it would have inserted, less those it would have removed), in
    /// key order. The last transaction is durable and clears the rebuild mark. `progress` is called
    /// now and then. A store that is no rebuild is left as it is.
    pub fn build_indexes(&self, progress: &mut dyn FnMut(IndexProgress)) -> Result<()> {
        let gathered = {
            let mut rebuild = self.rebuild_state();
            match std::mem::replace(&mut *rebuild, Rebuild::Building) {
                Rebuild::Gathering(gathered) => gathered,
                Rebuild::None => {
                    *rebuild = Rebuild::None;
                    return Ok(());
                }
                other => {
                    if matches!(other, Rebuild::Failed) {
                        self.stop_drop_behind();
                    }
                    *rebuild = other;
                    return Err(StoreError::Unfinished { path: self.path.display().to_string() });
                }
            }
        };
        let scratch = gathered.scratch.clone();
        let result = self.write_indexes(*gathered, progress);
        // What a live server reads next is what it writes next: its pages stay cached from now on.
        self.stop_drop_behind();
        let _ = std::fs::remove_dir_all(&scratch);
        *self.rebuild_state() = if result.is_ok() { Rebuild::None } else { Rebuild::Failed };
        result
    }

    /// Stops and joins the rebuild's [`DropBehind`] helper, if it runs: the rebuild has ended, built
    /// or failed.
    fn stop_drop_behind(&self) {
        // Taken out first: the helper is joined without the lock held.
        let helper = self.drop_behind.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(helper);
    }

    /// Runs `build` (writing the index tables) while a helper thread gets the page cache's
    /// writeback under way: it syncs the value file, which the build no longer writes, then the
    /// store file now and then. The build's last, durable commit, made after this returns, then
    /// waits for little more than the writeback of its own pages, not of everything the rebuild
    /// wrote (measured on a 750 k-event rebuild: about a second of its five). A sync of the store
    /// file between redb's own ones makes nothing durable that the kernel could not have written
    /// back on its own at any time. A sync that fails fails the build: on some kernels the error
    /// is reported once, to whichever sync meets it first, so redb's own might not hear of it.
    fn with_early_writeback(&self, build: impl FnOnce() -> Result<()>) -> Result<()> {
        let (done, stop) = std::sync::mpsc::channel::<()>();
        std::thread::scope(|scope| {
            let writeback = scope.spawn(move || -> Result<()> {
                self.values.sync()?;
                let store_file = std::fs::File::open(&self.path).map_err(|e| self.err(e))?;
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(EARLY_WRITEBACK_EVERY) {
                    store_file.sync_data().map_err(|e| self.err(format!("syncing the store file: {e}")))?;
                }
                Ok(())
            });
            let built = build();
            drop(done);
            let synced = writeback.join().unwrap_or_else(|_| Err(self.err("the writeback thread panicked")));
            built.and(synced)
        })
    }

    fn write_indexes(&self, gathered: Gathered, progress: &mut dyn FnMut(IndexProgress)) -> Result<()> {
        const REPORT_EVERY: u64 = 1 << 16;
        // Keys per write transaction: a bound on what one transaction holds in memory.
        const KEYS_PER_TRANSACTION: usize = 1 << 20;
        // Keys handed from the merge to the writer at a time.
        const KEYS_PER_CHUNK: usize = 4096;
        let added: u64 = gathered.added.iter().map(KeySorter::len).sum();
        let removed: u64 = gathered.removed.iter().map(KeySorter::len).sum();
        // Every key a rebuild removes it added before (it starts empty).
        let mut at = IndexProgress { written: 0, keys: added.saturating_sub(removed) };
        progress(at);
        let Gathered { added, removed, scratch } = gathered;
        self.with_early_writeback(|| {
            std::thread::scope(|scope| {
                // The keys, index after index, sorted and merged on a helper thread while this one
                // inserts them: merging many runs (a rebuild of millions of events spills dozens)
                // cost the single-threaded build a share of its time while the other core idled.
                let (send, received) = std::sync::mpsc::sync_channel::<(Index, Vec<Vec<u8>>)>(16);
                let merging = scope.spawn(move || -> std::io::Result<()> {
                    for ((index, added), removed) in Index::ALL.into_iter().zip(added).zip(removed) {
                        let mut keys = difference(added.finish()?, removed.finish()?);
                        loop {
                            let chunk = keys.by_ref().take(KEYS_PER_CHUNK).collect::<std::io::Result<Vec<_>>>()?;
                            if chunk.is_empty() {
                                break;
                            }
                            if send.send((index, chunk)).is_err() {
                                // The writer stopped: its error is the one reported.
                                return Ok(());
                            }
                        }
                    }
                    Ok(())
                });
                let mut keys = received
                    .into_iter()
                    .flat_map(|(index, chunk)| chunk.into_iter().map(move |k| (index, k)))
                    .peekable();
                let written = (|| {
                    while let Some(&(index, _)) = keys.peek() {
                        let mut tx = self.db().begin_write().map_err(|e| self.err(e))?;
                        // Not durable: the last transaction is, and until it commits the rebuild mark stays.
                        tx.set_durability(Durability::None).map_err(|e| self.err(e))?;
                        {
                            let mut table = tx.open_table(index.table()).map_err(|e| self.err(e))?;
                            // Ascending, and after every key the table holds (it started empty).
                            let batch = std::iter::from_fn(|| keys.next_if(|(i, _)| *i as usize == index as usize))
                                .take(KEYS_PER_TRANSACTION)
                                .map(|(_, key)| {
                                    at.written += 1;
                                    if at.written.is_multiple_of(REPORT_EVERY) {
                                        progress(at);
                                    }
                                    Ok(key)
                                });
                            self.insert_ascending(&mut table, batch)?;
                        }
                        tx.commit().map_err(|e| self.err(e))?;
                    }
                    Ok(())
                })();
                // A failed write stops the merge (its sends fail); a failed merge ends the keys
                // early, and its error fails the build before the rebuild mark is cleared.
                drop(keys);
                let merged = merging.join().unwrap_or_else(|_| Err(std::io::Error::other("the index merge panicked")));
                written.and(merged.map_err(|e| storage(&scratch, e)))
            })
        })?;
        let tx = self.db().begin_write().map_err(|e| self.err(e))?;
        tx.open_table(META).map_err(|e| self.err(e))?.remove(INDEXES_PENDING).map_err(|e| self.err(e))?;
        // Durable, so it makes every earlier transaction durable: their records first.
        self.values.sync()?;
        tx.commit().map_err(|e| self.err(e))?;
        progress(at);
        Ok(())
    }

    /// [`ResourceStore::apply`]: one write transaction, its index keys gathered into `rebuild`
    /// during a rebuild.
    fn write(
        &self,
        gathered: Option<&mut Gathered>,
        versions: &[ResourceVersion],
        checkpoints: &[Checkpoint],
        durable: bool,
    ) -> Result<()> {
        // After a failed sync nothing commits, not even checkpoints alone: they could move past
        // records that were lost.
        self.values.usable()?;
        let mut tx = self.db().begin_write().map_err(|e| self.err(e))?;
        tx.set_durability(if durable { Durability::Immediate } else { Durability::None }).map_err(|e| self.err(e))?;
        // The versions in key order: a resource's versions come together and oldest first, and the
        // `versions` table is written by a cursor moving forward ([`EmbeddedStore::walk_ascending`]).
        // Ids grow with time, so most versions of a batch go after the last row of their type. The
        // sort is stable: of a version twice in one batch, the first is stored.
        let mut ordered: Vec<(KeyBuf, &ResourceVersion)> =
            versions.iter().map(|v| (version_key(&v.key(), v.version_id), v)).collect();
        ordered.sort_by(|a, b| a.0.bytes().cmp(b.0.bytes()));
        let in_order: Vec<&ResourceVersion> = ordered.iter().map(|(_, v)| *v).collect();
        let values_end = with_packed(&in_order, |packed| -> Result<u64> {
            let mut versions_t = tx.open_table(VERSIONS).map_err(|e| self.err(e))?;
            let mut indexes = match gathered {
                Some(gathered) => IndexSink::Gather(gathered),
                None => IndexSink::tables(&tx).map_err(|e| self.err(e))?,
            };
            // The records this transaction appends to the value file, from its committed end.
            let mut appended = Appender::new(&self.values, self.values_end.load(Ordering::Relaxed));
            let mut changes = Vec::with_capacity(ordered.len());
            // Where this transaction appended each version's record, by its place in the batch, for
            // the records spliced from it. Only records packed whole are named here: the record a
            // middle is spliced from is always one.
            let mut appended_at: Vec<Option<Pointer>> = vec![None; ordered.len()];
            let mut packed = packed.enumerate();
            let keyed = ordered.iter().map(Ok);
            self.walk_ascending(
                &mut versions_t,
                keyed,
                |(vkey, _)| vkey.bytes(),
                |gap, after, (vkey, v)| {
                    let (vkey, v) = (vkey.bytes(), *v);
                    // Never short: the helper packs every version unless it panicked, which the scope
                    // passes on before this transaction could commit.
                    let (index, packed) = packed.next().ok_or_else(|| self.err("a version record was not packed"))?;
                    let (resource, _) = split_version_key(vkey)?;
                    // The rows beside the gap: this very version (applied before: replay is idempotent,
                    // and the version stored first stays, matching the indexes made with it; a
                    // projection is a pure function of its event), a newer version of the resource
                    // after it, or the version this one replaces before it.
                    let newer = match after {
                        Some(next) if next == vkey => return Ok(()),
                        Some(next) => split_version_key(next)?.0 == resource,
                        None => false,
                    };
                    let replaces = match gap.peek_prev().map_err(|e| self.err(e))? {
                        Some((prev, _)) if prev.value() == vkey => return Ok(()),
                        Some((prev, row)) if split_version_key(prev.value())?.0 == resource => {
                            Some(VersionRow::decode(row.value())?)
                        }
                        _ => None,
                    };
                    let packed = match packed.spliced_from.map(|from| appended_at[from]) {
                        None => packed.bytes,
                        Some(Some(from)) => {
                            let mut bytes = packed.bytes;
                            bytes[SPLICE_POINTER].copy_from_slice(&from.encode());
                            bytes
                        }
                        // The version its middle is in was stored before this batch (an event applied
                        // again): packed whole instead. Rare, so here rather than on the helper.
                        Some(None) => Packer::default().pack(v),
                    };
                    let row = VersionRow { pointer: appended.pointer_for(&packed), deleted: v.deleted };
                    gap.insert_before(vkey, row.encode().as_slice()).map_err(|e| self.err(e))?;
                    appended.append(&packed)?;
                    if !is_spliced(&packed) {
                        appended_at[index] = Some(row.pointer);
                    }
                    changes.push(KeyBuf::new().i64(v.last_updated_ms).encoded(resource).u64(v.version_id));
                    if newer {
                        // An older version arriving late: it never becomes current.
                        return Ok(());
                    }
                    // The replaced version's index keys go, unless it is a deletion (it has none). Its
                    // record may have been appended in this transaction.
                    if let Some(row) = replaces
                        && !row.deleted
                    {
                        let record = unpack(&appended.read(row.pointer)?, |other| appended.read(other))?;
                        index_keys(decode(&record)?, |index, k| {
                            indexes.remove(index, k.bytes()).map_err(|e| self.err(e))
                        })?;
                    }
                    index_keys(v.into(), |index, k| indexes.insert(index, k.bytes()).map_err(|e| self.err(e)))
                },
            )?;
            drop(versions_t);
            changes.sort_unstable_by(|a, b| a.bytes().cmp(b.bytes()));
            let mut changes_t = tx.open_table(CHANGES).map_err(|e| self.err(e))?;
            self.insert_ascending(&mut changes_t, changes.iter().map(|k| Ok(k.bytes())))?;
            drop(changes_t);
            let mut cps = tx.open_table(CHECKPOINTS).map_err(|e| self.err(e))?;
            for c in checkpoints {
                cps.insert((c.topic.as_str(), c.partition), c.next_offset).map_err(|e| self.err(e))?;
            }
            // The records go to the value file before the transaction that points at them commits,
            // and the transaction records the file's new end. A durable transaction makes the
            // earlier ones durable too: everything in the file is synced before it commits.
            let values_start = self.values_end.load(Ordering::Relaxed);
            let values_end = appended.finish()?;
            if values_end != values_start {
                tx.open_table(META)
                    .map_err(|e| self.err(e))?
                    .insert(VALUES_LEN, values_end)
                    .map_err(|e| self.err(e))?;
            }
            if durable {
                self.values.sync()?;
            }
            Ok(values_end)
        })?;
        // Moved on before the commit: the next writer must append after these records, however
        // the commit ends. Should it fail, they are bytes nothing points to, and the value file's
        // recorded end (`meta`) does not cover them until a later transaction writes beyond them.
        self.values_end.store(values_end, Ordering::Relaxed);
        tx.commit().map_err(|e| self.err(e))
    }

    /// The `versions` rows whose keys start with `prefix` (a resource's, [`resource_prefix`], or a
    /// type's, [`type_prefix`]), in key order: a resource's versions oldest first.
    fn rows_with_prefix<'t>(
        &self,
        versions: &'t impl ReadableTable<&'static [u8], &'static [u8]>,
        prefix: &KeyBuf,
    ) -> Result<redb::Range<'t, &'static [u8], &'static [u8]>> {
        let end = prefix_end(prefix.bytes());
        versions.range(prefix.bytes()..end.as_slice()).map_err(|e| self.err(e))
    }

    /// Calls `at_gap` for each of `items` (keys from `key_of`, never descending) with a cursor of
    /// `table` standing in the gap where the item's key belongs: after every row below it (and
    /// after an earlier item of the same key that was inserted), before any row at or above it,
    /// whose key `at_gap` is given (`None` at the table's end). The cursor moves forward only, and
    /// stays where it is while the keys go into the same gap: redb then splices a run of inserts
    /// into a leaf at once, about three times as fast as inserting each key (its changelog for
    /// 4.4), which makes sorted batches and appends at the end of a table cheap. `at_gap` inserts
    /// before the cursor, or not.
    #[allow(clippy::type_complexity)]
    fn walk_ascending<V: redb::Value + 'static, T>(
        &self,
        table: &mut redb::Table<'_, &'static [u8], V>,
        items: impl IntoIterator<Item = Result<T>>,
        key_of: impl Fn(&T) -> &[u8],
        mut at_gap: impl FnMut(&mut redb::CursorMut<'_, &'static [u8], V>, Option<&[u8]>, &T) -> Result<()>,
    ) -> Result<()> {
        let mut items = items.into_iter();
        // The item that moved the cursor on.
        let mut moved_by: Option<T> = None;
        loop {
            let first = match moved_by.take() {
                Some(item) => item,
                None => match items.next() {
                    Some(item) => item?,
                    None => return Ok(()),
                },
            };
            let mut gap = table.lower_bound_mut(Bound::Included(key_of(&first))).map_err(|e| self.err(e))?;
            // The row after the gap stays the same while inserts go before the cursor. Kept here:
            // with inserts pending, redb finds it by searching the tree from its root again.
            let after = gap.peek_next().map_err(|e| self.err(e))?.map(|(next, _)| next.value().to_vec());
            let after = after.as_deref();
            at_gap(&mut gap, after, &first)?;
            for item in items.by_ref() {
                let item = item?;
                // The gap stays while no row below the key lies after it.
                if after.is_some_and(|next| next < key_of(&item)) {
                    moved_by = Some(item);
                    break;
                }
                at_gap(&mut gap, after, &item)?;
            }
            gap.close().map_err(|e| self.err(e))?;
        }
    }

    /// Inserts `keys` (strictly ascending) into `table` through [`EmbeddedStore::walk_ascending`];
    /// a key already there is left as it is.
    fn insert_ascending<K: AsRef<[u8]>>(
        &self,
        table: &mut redb::Table<'_, &'static [u8], ()>,
        keys: impl IntoIterator<Item = Result<K>>,
    ) -> Result<()> {
        self.walk_ascending(
            table,
            keys,
            |k| k.as_ref(),
            |gap, after, key| {
                let key = key.as_ref();
                if after == Some(key) {
                    return Ok(());
                }
                gap.insert_before(key, ()).map_err(|e| self.err(e))
            },
        )
    }

    /// The newest version of `key` (possibly a deletion), through `versions` of a read transaction.
    fn current_version(&self, versions: &VersionsTable, key: &str) -> Result<Option<ResourceVersion>> {
        match self.rows_with_prefix(versions, &resource_prefix(key))?.next_back() {
            Some(item) => Ok(Some(self.read_version(item.map_err(|e| self.err(e))?.1.value())?)),
            None => Ok(None),
        }
    }

    /// Calls `visit` with the key and row of each resource's newest version among `rows` of
    /// `versions` (whole resources: a range bounded by key prefixes), in key order; `visit` returns
    /// false to stop.
    fn visit_newest(
        &self,
        rows: redb::Range<'_, &'static [u8], &'static [u8]>,
        mut visit: impl FnMut(&[u8], VersionRow) -> Result<bool>,
    ) -> Result<()> {
        // A row is its resource's newest when the next row belongs to another resource. The key
        // and row of the one before, if any (one buffer for them all).
        let mut pending: Option<VersionRow> = None;
        let mut pending_key = Vec::new();
        for item in rows {
            let (k, row) = item.map_err(|e| self.err(e))?;
            let (resource, _) = split_version_key(k.value())?;
            // The pending key split before: it is longer than its version.
            let same = pending.is_some() && pending_key[..pending_key.len() - 8] == *resource;
            if !same
                && let Some(previous) = pending.take()
                && !visit(&pending_key, previous)?
            {
                return Ok(());
            }
            pending = Some(VersionRow::decode(row.value())?);
            pending_key.clear();
            pending_key.extend_from_slice(k.value());
        }
        if let Some(last) = pending {
            visit(&pending_key, last)?;
        }
        Ok(())
    }

    /// The digest's first section, every version's record. One helper thread walks the `versions`
    /// table and hands out chunks of rows; two more read and decompress them, a chunk each in turn,
    /// while this one hashes them in order. Reading was the slower half (the digest of a 750
    /// k-event replay took as long as a third of the replay), and at ten million events most
    /// records come from the disk: two readers keep two reads in flight, and a spliced record
    /// (`Packer`) reads a second one.
    fn digest_versions(&self, versions: &VersionsTable, d: &mut StoreDigest) -> Result<()> {
        const CHUNK: usize = 512;
        const READERS: usize = 2;
        type Rows = Vec<(String, u64, Pointer)>;
        type Records = Vec<(String, u64, Vec<u8>)>;
        let rows = versions.iter().map_err(|e| self.err(e))?;
        std::thread::scope(|scope| {
            let mut to_readers = Vec::with_capacity(READERS);
            let mut from_readers = Vec::with_capacity(READERS);
            for _ in 0..READERS {
                let (send_rows, rows) = std::sync::mpsc::sync_channel::<Result<Rows>>(4);
                let (send_records, records) = std::sync::mpsc::sync_channel::<Result<Records>>(4);
                scope.spawn(move || {
                    for chunk in rows {
                        let read = chunk.and_then(|chunk| {
                            chunk
                                .into_iter()
                                .map(|(key, version, pointer)| Ok((key, version, self.record_bytes(pointer)?)))
                                .collect::<Result<Records>>()
                        });
                        // The hashing side stopped (an error): stop too.
                        if send_records.send(read).is_err() {
                            return;
                        }
                    }
                });
                to_readers.push(send_rows);
                from_readers.push(records);
            }
            scope.spawn(move || {
                let row = |item: std::result::Result<_, redb::StorageError>| -> Result<(String, u64, Pointer)> {
                    let (k, v): (redb::AccessGuard<&[u8]>, redb::AccessGuard<&[u8]>) = item.map_err(|e| self.err(e))?;
                    let mut r = KeyReader::new(k.value());
                    let (key, version) = (r.str().map_err(corrupt)?, r.u64().map_err(corrupt)?);
                    Ok((key, version, VersionRow::decode(v.value())?.pointer))
                };
                let mut rows = rows.map(row);
                // Chunks go to the readers in turn, the last one possibly short; an error goes
                // in its chunk's place and ends the walk.
                for reader in (0..READERS).cycle() {
                    let chunk = rows.by_ref().take(CHUNK).collect::<Result<Rows>>();
                    let last = chunk.as_ref().map_or(true, |c| c.len() < CHUNK);
                    if to_readers[reader].send(chunk).is_err() || last {
                        return;
                    }
                }
            });
            // In the order the chunks were handed out: each reader's next, in turn, until one has
            // no more (the walk ended there).
            for reader in (0..READERS).cycle() {
                let Ok(chunk) = from_readers[reader].recv() else { return Ok(()) };
                for (key, version, record) in chunk? {
                    d.version(&key, version, &record);
                }
            }
            Ok(())
        })
    }

    /// The digest's patient index (section 3, every resource in a compartment by patient, type and
    /// id) from the two tables that hold it here: `by_patient`, and the resources with a date key
    /// from `by_patient_date` (`index_keys`). Both are ordered by (patient, type) first; within one,
    /// the two sets of ids are merged in id order. Holds one compartment's ids of a type at a time.
    fn digest_compartments(
        &self,
        by_patient: &redb::ReadOnlyTable<&'static [u8], ()>,
        by_patient_date: &redb::ReadOnlyTable<&'static [u8], ()>,
        d: &mut StoreDigest,
    ) -> Result<()> {
        // Each row as ((patient, type) key prefix, patient, type, id).
        type Row = (Vec<u8>, String, String, String);
        let row = |key: &[u8], dated: bool| -> Result<Row> {
            let mut r = KeyReader::new(key);
            let (p, t) = (r.str().map_err(corrupt)?, r.str().map_err(corrupt)?);
            if dated {
                r.i64().map_err(corrupt)?;
            }
            let id = r.str().map_err(corrupt)?;
            Ok((KeyBuf::new().str(&p).str(&t).bytes().to_vec(), p, t, id))
        };
        let read =
            |item: std::result::Result<(redb::AccessGuard<&[u8]>, redb::AccessGuard<()>), redb::StorageError>,
             dated: bool| {
                let (k, _) = item.map_err(|e| self.err(e))?;
                row(k.value(), dated)
            };
        let mut undated = by_patient.iter().map_err(|e| self.err(e))?.map(|item| read(item, false)).peekable();
        let mut dated = by_patient_date.iter().map_err(|e| self.err(e))?.map(|item| read(item, true)).peekable();
        // Takes the rows of `group` at the head of `rows`, and an error there.
        fn take_group(
            rows: &mut std::iter::Peekable<impl Iterator<Item = Result<Row>>>,
            group: &[u8],
            names: &mut Option<(String, String)>,
            ids: &mut Vec<String>,
        ) -> Result<()> {
            while let Some(row) = rows.next_if(|r| r.as_ref().map_or(true, |r| r.0 == group)) {
                let (_, p, t, id) = row?;
                names.get_or_insert((p, t));
                ids.push(id);
            }
            Ok(())
        }
        // The next compartment and type: the smaller head (an error sorts first, and is taken).
        while let Some(next) = [undated.peek(), dated.peek()]
            .into_iter()
            .flatten()
            .map(|r| r.as_ref().map_or(Vec::new(), |r| r.0.clone()))
            .min()
        {
            let (mut names, mut ids) = (None, Vec::new());
            take_group(&mut undated, &next, &mut names, &mut ids)?;
            take_group(&mut dated, &next, &mut names, &mut ids)?;
            let Some((p, t)) = names else { continue };
            ids.sort_by_cached_key(|id| KeyBuf::new().str(id).bytes().to_vec());
            for id in &ids {
                d.by_patient(&p, &t, id);
            }
        }
        Ok(())
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
        let versions = tx.open_table(VERSIONS).map_err(|e| self.err(e))?;
        let t = tx.open_table(index).map_err(|e| self.err(e))?;
        for item in t.range(from..to).map_err(|e| self.err(e))? {
            let (k, _) = item.map_err(|e| self.err(e))?;
            let id = id_of(k.value()).map_err(corrupt)?;
            if let Some(v) = self.current_version(&versions, &format!("{resource_type}/{id}"))?
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

fn decode<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

#[async_trait::async_trait]
impl ResourceStore for EmbeddedStore {
    async fn apply(&self, versions: &[ResourceVersion], checkpoints: &[Checkpoint], durable: bool) -> Result<()> {
        let mut rebuild = self.rebuild_state();
        let gathered = match &mut *rebuild {
            Rebuild::None => None,
            Rebuild::Gathering(gathered) => Some(&mut **gathered),
            Rebuild::Building | Rebuild::Failed => {
                return Err(StoreError::Unfinished { path: self.path.display().to_string() });
            }
        };
        let gathering = gathered.is_some();
        // Nothing a rebuild writes before its indexes are built is worth syncing: should it stop
        // halfway, the file is refused as unfinished whatever was synced, and built again. Only
        // `build_indexes`' last commit is durable. (Synced once a second, the rebuild waited in
        // fsync for the page cache's writeback of everything written since.)
        let durable = durable && !gathering;
        let result = self.write(gathered, versions, checkpoints, durable);
        if result.is_err() && gathering {
            // The gathered keys may include some of the transaction that failed.
            *rebuild = Rebuild::Failed;
            self.stop_drop_behind();
        }
        result
    }

    async fn checkpoint(&self, topic: &str, partition: u32) -> Result<Option<u64>> {
        let tx = self.db().begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(CHECKPOINTS).map_err(|e| self.err(e))?;
        Ok(t.get((topic, partition)).map_err(|e| self.err(e))?.map(|g| g.value()))
    }

    async fn current(&self, resource_type: &str, id: &str) -> Result<Option<ResourceVersion>> {
        let tx = self.db().begin_read().map_err(|e| self.err(e))?;
        let versions = tx.open_table(VERSIONS).map_err(|e| self.err(e))?;
        self.current_version(&versions, &format!("{resource_type}/{id}"))
    }

    async fn version(&self, resource_type: &str, id: &str, version_id: u64) -> Result<Option<ResourceVersion>> {
        let key = format!("{resource_type}/{id}");
        let tx = self.db().begin_read().map_err(|e| self.err(e))?;
        let versions = tx.open_table(VERSIONS).map_err(|e| self.err(e))?;
        match versions.get(version_key(&key, version_id).bytes()).map_err(|e| self.err(e))? {
            Some(g) => Ok(Some(self.read_version(g.value())?)),
            None => Ok(None),
        }
    }

    async fn history(&self, resource_type: &str, id: &str) -> Result<Vec<ResourceVersion>> {
        let tx = self.db().begin_read().map_err(|e| self.err(e))?;
        let versions = tx.open_table(VERSIONS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for item in self.rows_with_prefix(&versions, &resource_prefix(&format!("{resource_type}/{id}")))?.rev() {
            let (_, v) = item.map_err(|e| self.err(e))?;
            out.push(self.read_version(v.value())?);
        }
        Ok(out)
    }

    async fn scan_current(
        &self,
        resource_type: &str,
        patient: Option<&str>,
        visit: &mut (dyn FnMut(ResourceVersion) -> bool + Send),
    ) -> Result<()> {
        let tx = self.db().begin_read().map_err(|e| self.err(e))?;
        match patient {
            Some(p) => {
                // The compartment's resources with a date key, then those without (`index_keys`).
                let from = KeyBuf::new().str(p).str(resource_type);
                let to = prefix_end(from.bytes());
                let bounds = (from.bytes(), to.as_slice());
                if self.visit_index(&tx, BY_PATIENT_DATE, resource_type, bounds, by_patient_date_id, visit)? {
                    self.visit_index(&tx, BY_PATIENT, resource_type, bounds, by_patient_id, visit)?;
                }
            }
            None => {
                let versions = tx.open_table(VERSIONS).map_err(|e| self.err(e))?;
                let rows = self.rows_with_prefix(&versions, &type_prefix(resource_type))?;
                self.visit_newest(rows, |_, row| Ok(row.deleted || visit(self.read_record(row.pointer)?)))?;
            }
        }
        Ok(())
    }

    async fn count_current(&self, resource_type: &str) -> Result<u64> {
        let tx = self.db().begin_read().map_err(|e| self.err(e))?;
        let versions = tx.open_table(VERSIONS).map_err(|e| self.err(e))?;
        let mut n = 0;
        let rows = self.rows_with_prefix(&versions, &type_prefix(resource_type))?;
        self.visit_newest(rows, |_, row| {
            n += u64::from(!row.deleted);
            Ok(true)
        })?;
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
        let tx = self.db().begin_read().map_err(|e| self.err(e))?;
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
        let tx = self.db().begin_read().map_err(|e| self.err(e))?;
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
                out.push(self.read_version(v.value())?);
            }
        }
        Ok(out)
    }

    async fn find_by_identifier(&self, resource_type: &str, identifier: &str) -> Result<Vec<String>> {
        let tx = self.db().begin_read().map_err(|e| self.err(e))?;
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
        let tx = self.db().begin_read().map_err(|e| self.err(e))?;
        let mut d = StoreDigest::new();
        let versions = tx.open_table(VERSIONS).map_err(|e| self.err(e))?;
        self.digest_versions(&versions, &mut d)?;
        self.visit_newest(versions.iter().map_err(|e| self.err(e))?, |k, row| {
            let mut r = KeyReader::new(k);
            d.current(&r.str().map_err(corrupt)?, r.u64().map_err(corrupt)?, row.deleted);
            Ok(true)
        })?;
        let by_patient = tx.open_table(BY_PATIENT).map_err(|e| self.err(e))?;
        let by_patient_date = tx.open_table(BY_PATIENT_DATE).map_err(|e| self.err(e))?;
        self.digest_compartments(&by_patient, &by_patient_date, &mut d)?;
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
    use std::io::Write;

    fn version(
        id: &str,
        version_id: u64,
        patient: Option<&str>,
        date_key: Option<i64>,
        identifiers: &[&str],
        deleted: bool,
    ) -> ResourceVersion {
        ResourceVersion {
            resource_type: "Observation".into(),
            id: id.into(),
            version_id,
            last_updated: format!("2026-11-29T10:00:{:02}.000Z", version_id),
            last_updated_ms: 1_796_000_000_000 + version_id as i64,
            deleted,
            resource: (!deleted).then(|| {
                serde_json::value::to_raw_value(&serde_json::json!({"resourceType": "Observation", "id": id})).unwrap()
            }),
            fact: false,
            patient: patient.map(str::to_owned),
            identifiers: identifiers.iter().map(|s| s.to_string()).collect(),
            date_key,
            parsed: None,
        }
    }

    impl EmbeddedStore {
        /// The `versions` row of `key` (`Type/id`) at `version_id`.
        fn version_row(&self, key: &str, version_id: u64) -> VersionRow {
            let tx = self.db().begin_read().unwrap();
            let versions = tx.open_table(VERSIONS).unwrap();
            let row = versions.get(version_key(key, version_id).bytes()).unwrap().unwrap();
            VersionRow::decode(row.value()).unwrap()
        }
    }

    /// A rebuild that writes its indexes at the end leaves the same store as one that kept them up
    /// to date write by write: through updates that move a resource to another patient, date and
    /// identifier, deletions, re-creations, versions arriving late and versions applied twice.
    #[test]
    fn a_rebuild_that_builds_its_indexes_at_the_end_equals_one_that_kept_them_up() {
        let batches = [
            vec![
                version("a", 1, Some("Patient/p1"), Some(10), &["s|x"], false),
                version("b", 1, Some("Patient/p1"), Some(20), &[], false),
                version("c", 1, Some("Patient/p2"), None, &["s|y", "s|z"], false),
                version("e", 1, Some("Patient/p1"), Some(5), &["s|e"], false),
                version("j", 3, Some("Patient/p11"), Some(90), &["s|j3"], false),
            ],
            vec![
                version("a", 2, Some("Patient/p2"), Some(30), &["s|x2"], false),
                version("b", 2, Some("Patient/p1"), None, &[], true),
                version("d", 1, Some("Patient/p3"), Some(40), &["s|d"], false),
                version("e", 2, Some("Patient/p1"), None, &[], true),
                version("e", 3, Some("Patient/p4"), Some(6), &["s|e"], false),
                version("i", 2, Some("Patient/p10"), Some(80), &["s|i2"], false),
            ],
            vec![
                version("a", 1, Some("Patient/p1"), Some(10), &["s|x"], false),
                version("c", 3, Some("Patient/p5"), Some(50), &["s|y"], false),
                version("c", 2, Some("Patient/p2"), Some(45), &["s|z"], false),
                version("d", 2, Some("Patient/p3"), Some(40), &["s|d"], false),
                version("f", 1, None, None, &[], false),
                // Twice in one transaction: the first is stored.
                version("f", 1, Some("Patient/p9"), None, &[], false),
                // Updated twice in one transaction: the second replaces index keys of a version
                // whose record is not in the value file yet.
                version("h", 1, Some("Patient/p6"), Some(70), &["s|h1"], false),
                version("h", 2, Some("Patient/p7"), Some(71), &["s|h2"], false),
                version("h", 3, Some("Patient/p8"), Some(72), &["s|h3"], false),
                // Late: older than a version stored by an earlier transaction (two of j at once,
                // while the cursor stays in one gap). They are kept for history, never current.
                version("i", 1, Some("Patient/p12"), Some(81), &["s|i1"], false),
                version("j", 1, Some("Patient/p13"), Some(91), &["s|j1"], false),
                version("j", 2, Some("Patient/p13"), Some(92), &["s|j2"], false),
            ],
        ];
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let kept_up = EmbeddedStore::open(dir.path().join("kept-up.redb")).unwrap();
        let rebuilt_path = dir.path().join("rebuilt.redb");
        // A small sort budget: the gathered keys spill to sorted runs.
        // Its written pages dropped from the cache all along: they read back the same.
        let every = std::time::Duration::from_millis(1);
        let rebuilt = EmbeddedStore::create_for_rebuild_sorting(&rebuilt_path, 1 << 20, 64, every).unwrap();
        let checkpoint = |n| vec![Checkpoint { topic: "t".into(), partition: 0, next_offset: n }];
        for (n, batch) in batches.iter().enumerate() {
            for store in [&kept_up, &rebuilt] {
                rt.block_on(store.apply(batch, &checkpoint(n as u64), false)).unwrap();
            }
        }
        let dropping = |store: &EmbeddedStore| store.drop_behind.lock().unwrap().is_some();
        assert!(dropping(&rebuilt) && !dropping(&kept_up), "only a rebuild's pages leave the cache");
        let mut reports = 0;
        rebuilt.build_indexes(&mut |_| reports += 1).unwrap();
        assert!(reports >= 2);
        assert!(!dropping(&rebuilt), "built, it is a live store, whose newest pages stay cached");
        assert_eq!(rt.block_on(rebuilt.digest()).unwrap(), rt.block_on(kept_up.digest()).unwrap());
        assert!(!rebuilt_path.with_extension("index-build").exists(), "the sort's scratch files are gone");
        // Built, the store keeps its indexes up write by write, like any other.
        assert!(!rebuilt.rebuilding());
        rebuilt.build_indexes(&mut |_| panic!("nothing to build twice")).unwrap();
        let later =
            [version("c", 4, Some("Patient/p2"), Some(60), &["s|w"], false), version("g", 1, None, None, &[], false)];
        rt.block_on(kept_up.apply(&later, &checkpoint(9), true)).unwrap();
        rt.block_on(rebuilt.apply(&later, &checkpoint(9), true)).unwrap();
        assert_eq!(rt.block_on(rebuilt.digest()).unwrap(), rt.block_on(kept_up.digest()).unwrap());
        let ids = |store: &EmbeddedStore, patient: &str| {
            let mut ids = Vec::new();
            rt.block_on(store.scan_patient_dates("Observation", patient, 0, 100, &mut |v| {
                ids.push(v.id);
                true
            }))
            .unwrap();
            ids
        };
        assert_eq!(ids(&rebuilt, "Patient/p5"), Vec::<String>::new(), "c moved on to p2");
        assert_eq!(ids(&rebuilt, "Patient/p2"), ["a", "c"]);
        assert_eq!(ids(&rebuilt, "Patient/p1"), Vec::<String>::new());
        assert_eq!(rt.block_on(rebuilt.find_by_identifier("Observation", "s|e")).unwrap(), ["e"]);
        for store in [&rebuilt, &kept_up] {
            assert_eq!(ids(store, "Patient/p6"), Vec::<String>::new(), "h moved on to p8");
            assert_eq!(ids(store, "Patient/p7"), Vec::<String>::new(), "h moved on to p8");
            assert_eq!(ids(store, "Patient/p8"), ["h"]);
            assert!(rt.block_on(store.find_by_identifier("Observation", "s|h1")).unwrap().is_empty());
            assert_eq!(rt.block_on(store.find_by_identifier("Observation", "s|h3")).unwrap(), ["h"]);
            let current = rt.block_on(store.current("Observation", "c")).unwrap().unwrap();
            assert_eq!(current.version_id, 4, "c's newest version is current");
            for (id, newest, patient, late_patient, late_identifier) in
                [("i", 2, "Patient/p10", "Patient/p12", "s|i1"), ("j", 3, "Patient/p11", "Patient/p13", "s|j1")]
            {
                let current = rt.block_on(store.current("Observation", id)).unwrap().unwrap();
                assert_eq!(current.version_id, newest, "a late version of {id} never became current");
                assert_eq!(ids(store, patient), [id]);
                assert_eq!(ids(store, late_patient), Vec::<String>::new(), "no index keys of {id}'s late versions");
                assert!(rt.block_on(store.find_by_identifier("Observation", late_identifier)).unwrap().is_empty());
                let history = rt.block_on(store.history("Observation", id)).unwrap();
                assert_eq!(history.len() as u64, newest, "late versions are kept for history");
            }
            assert!(rt.block_on(store.current("Observation", "b")).unwrap().unwrap().deleted);
            let f = rt.block_on(store.current("Observation", "f")).unwrap().unwrap();
            assert_eq!(f.patient, None, "of f/1 twice in one transaction, the first is stored");
            // a, c, d, e, f, h, i, j and the later g are current; b is deleted.
            assert_eq!(rt.block_on(store.count_current("Observation")).unwrap(), 9);
            let mut listed = Vec::new();
            rt.block_on(store.scan_current("Observation", None, &mut |v| {
                listed.push(format!("{}/{}", v.id, v.version_id));
                true
            }))
            .unwrap();
            assert_eq!(listed, ["a/2", "c/4", "d/2", "e/3", "f/1", "g/1", "h/3", "i/2", "j/3"]);
        }
        drop(rebuilt);
        EmbeddedStore::open(&rebuilt_path).expect("a finished rebuild opens");
        assert!(EmbeddedStore::create_for_rebuild(&rebuilt_path, 1 << 20).is_err(), "a rebuild starts a new file");
    }

    /// A compartment's resources with a date key are in the patient-date index only, the others in
    /// the patient index; the digest still lists the whole compartment by patient, type and id, as
    /// the CQL store's single patient index gives it (the cross-backend test compares the two).
    #[test]
    fn a_compartment_is_split_between_the_patient_indexes_and_digested_whole() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let store = EmbeddedStore::open(dir.path().join("s.redb")).unwrap();
        let device = |id: &str, patient: &str| ResourceVersion {
            resource_type: "Device".into(),
            ..version(id, 1, Some(patient), None, &[], false)
        };
        let batch = [
            version("o3", 1, Some("Patient/p1"), Some(10), &[], false),
            version("o1", 1, Some("Patient/p1"), Some(30), &[], false),
            version("o2", 1, Some("Patient/p1"), None, &[], false),
            version("o4", 1, Some("Patient/p2"), Some(20), &[], false),
            device("d1", "Patient/p1"),
            version("o5", 1, None, Some(20), &[], false),
        ];
        rt.block_on(store.apply(&batch, &[], false)).unwrap();
        let rows = |table: TableDefinition<&[u8], ()>| {
            let tx = store.db().begin_read().unwrap();
            let t = tx.open_table(table).unwrap();
            t.iter().unwrap().map(|item| item.unwrap().0.value().to_vec()).collect::<Vec<_>>()
        };
        let (undated, dated) = (rows(BY_PATIENT), rows(BY_PATIENT_DATE));
        let ids = |keys: &[Vec<u8>], id_of: fn(&[u8]) -> std::result::Result<String, BadKey>| {
            keys.iter().map(|k| id_of(k).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(ids(&undated, by_patient_id), ["d1", "o2"]);
        assert_eq!(ids(&dated, by_patient_date_id), ["o3", "o1", "o4"]);

        let tx = store.db().begin_read().unwrap();
        let mut ours = StoreDigest::new();
        store
            .digest_compartments(
                &tx.open_table(BY_PATIENT).unwrap(),
                &tx.open_table(BY_PATIENT_DATE).unwrap(),
                &mut ours,
            )
            .unwrap();
        let mut expected = StoreDigest::new();
        for (p, t, id) in [
            ("Patient/p1", "Device", "d1"),
            ("Patient/p1", "Observation", "o1"),
            ("Patient/p1", "Observation", "o2"),
            ("Patient/p1", "Observation", "o3"),
            ("Patient/p2", "Observation", "o4"),
        ] {
            expected.by_patient(p, t, id);
        }
        assert_eq!(ours.finish(), expected.finish());
    }

    /// Version records live in the value file: a store reopened reads them back, cuts off what no
    /// committed transaction wrote, and a version applied again does not add to the file.
    #[test]
    fn version_records_are_read_from_the_value_file_and_an_uncommitted_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resources.redb");
        let values = crate::values::path_for(&path);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let store = EmbeddedStore::open(&path).unwrap();
        let a = version("a", 1, Some("Patient/p1"), Some(1), &[], false);
        rt.block_on(store.apply(std::slice::from_ref(&a), &[], true)).unwrap();
        let len = std::fs::metadata(&values).unwrap().len();
        assert!(len > 0);
        rt.block_on(store.apply(std::slice::from_ref(&a), &[], true)).unwrap();
        assert_eq!(std::fs::metadata(&values).unwrap().len(), len, "applied again: nothing appended");
        let digest = rt.block_on(store.digest()).unwrap();
        drop(store);
        // Bytes after the committed end: a transaction that never committed.
        std::fs::OpenOptions::new().append(true).open(&values).unwrap().write_all(b"junk").unwrap();
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(std::fs::metadata(&values).unwrap().len(), len, "the uncommitted tail is cut");
        let read = rt.block_on(store.current("Observation", "a")).unwrap().unwrap();
        assert_eq!(read.encode(), a.encode());
        assert_eq!(rt.block_on(store.digest()).unwrap(), digest);
        // The next version lands where the junk was, and both read back.
        let b = version("a", 2, Some("Patient/p1"), Some(2), &[], false);
        rt.block_on(store.apply(std::slice::from_ref(&b), &[], false)).unwrap();
        let history = rt.block_on(store.history("Observation", "a")).unwrap();
        assert_eq!(history.iter().map(ResourceVersion::encode).collect::<Vec<_>>(), [b.encode(), a.encode()]);
        drop(store);
        // A value file that lost committed records is an error, not missing versions.
        std::fs::OpenOptions::new().write(true).open(&values).unwrap().set_len(len / 2).unwrap();
        let e = EmbeddedStore::open(&path).err().unwrap().to_string();
        assert!(e.contains("recorded") && e.contains("delete it and it is rebuilt"), "{e}");
        let store = EmbeddedStore::open_or_rebuild(&path, 1 << 20).unwrap();
        assert!(store.rebuilding(), "a damaged store is started again");
        assert!(rt.block_on(store.current("Observation", "a")).unwrap().is_none());
    }

    #[test]
    fn version_rows_round_trip_and_damage_is_an_error() {
        let row = VersionRow { pointer: Pointer { offset: 7, len: 9, crc: 11 }, deleted: true };
        let bytes = row.encode();
        let back = VersionRow::decode(&bytes).unwrap();
        assert_eq!((back.pointer, back.deleted), (row.pointer, true));
        let e = VersionRow::decode(&bytes[..16]).err().unwrap().to_string();
        assert!(e.contains("16 bytes, not 17"), "{e}");
        let mut flags = bytes;
        flags[16] = 2;
        let e = VersionRow::decode(&flags).err().unwrap().to_string();
        assert!(e.contains("flags 0x02"), "{e}");
    }

    /// The digest reads every record (on a helper thread, in chunks) in key order, whatever order
    /// they were written in, and a damaged record fails it.
    #[test]
    fn the_digest_covers_every_record_and_fails_on_a_damaged_one() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let versions: Vec<ResourceVersion> =
            (0..1500).map(|n| version(&format!("o{n:04}"), 1, Some("Patient/p"), Some(n), &[], false)).collect();
        let store = EmbeddedStore::open(dir.path().join("one.redb")).unwrap();
        rt.block_on(store.apply(&versions, &[], true)).unwrap();
        let other = EmbeddedStore::open(dir.path().join("other.redb")).unwrap();
        for batch in versions.rchunks(400) {
            rt.block_on(other.apply(batch, &[], true)).unwrap();
        }
        let digest = rt.block_on(store.digest()).unwrap();
        assert_eq!(rt.block_on(other.digest()).unwrap(), digest);
        // The last record written, "o1499", sorts last: its damage is met after several chunks.
        let values = crate::values::path_for(&dir.path().join("one.redb"));
        let len = std::fs::metadata(&values).unwrap().len();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&values).unwrap();
        let mut last = [0u8];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut last, len - 1).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[last[0] ^ 0xFF], len - 1).unwrap();
        let e = rt.block_on(store.digest()).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
    }

    /// The projectors of several topics write one store at once: each transaction's records land
    /// after the previous transaction's, never over them.
    #[test]
    fn concurrent_writers_never_overwrite_each_others_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(EmbeddedStore::open(dir.path().join("resources.redb")).unwrap());
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
                    for n in 0..300 {
                        let id = format!("w{w}-{n}");
                        let v = version(&id, 1, Some("Patient/p"), None, &[], false);
                        rt.block_on(store.apply(&[v], &[], false)).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        for w in 0..4 {
            for n in 0..300 {
                let id = format!("w{w}-{n}");
                let read = rt.block_on(store.current("Observation", &id)).unwrap().unwrap();
                assert_eq!(read.id, id);
            }
        }
    }

    #[test]
    fn a_rebuild_that_never_built_its_indexes_is_refused_and_started_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resources.redb");
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let store = EmbeddedStore::create_for_rebuild(&path, 1 << 20).unwrap();
        rt.block_on(store.apply(&[version("a", 1, Some("Patient/p1"), Some(1), &[], false)], &[], true)).unwrap();
        drop(store);
        match EmbeddedStore::open(&path) {
            Err(e @ StoreError::Unfinished { .. }) => assert!(e.to_string().contains("unfinished rebuild"), "{e}"),
            other => panic!("expected Unfinished, got {:?}", other.map(|_| ())),
        }
        let store = EmbeddedStore::open_or_rebuild(&path, 1 << 20).unwrap();
        assert!(store.rebuilding(), "the rebuild starts again");
        assert!(rt.block_on(store.current("Observation", "a")).unwrap().is_none(), "started again empty");
    }

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
        assert!(store.rebuilding());
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert!(rt.block_on(store.current("Observation", "a")).unwrap().is_none(), "started again empty");
        store.build_indexes(&mut |_| {}).unwrap();
        assert!(!store.rebuilding());
        drop(store);
        EmbeddedStore::open(&path).expect("the new file has this build's layout");
        assert!(!EmbeddedStore::open_or_rebuild(&path, 1 << 20).unwrap().rebuilding(), "an existing store is kept");
    }

    #[test]
    fn version_records_are_stored_compressed_and_damage_is_an_error() {
        // One packer for records of different sizes (its table and buffers carried over): each
        // one as LZ4 packs it alone, and each unpacks to its record.
        let mut packer = Packer::default();
        let mut big = version("big", 1, Some("Patient/p1"), Some(1), &["s|v"], false);
        let text = "glucose ".repeat(20_000);
        big.resource = Some(serde_json::value::to_raw_value(&serde_json::json!({"text": text})).unwrap());
        let versions = [version("a", 1, None, None, &[], false), big, version("b", 2, None, None, &[], true)];
        for v in &versions {
            let packed = packer.pack(v);
            assert_eq!(packed, lz4_flex::block::compress_prepend_size(&v.encode()));
            assert_eq!(unpack_whole(&packed).unwrap(), v.encode());
        }
        let record = versions[0].encode();
        let stored = packer.pack(&versions[0]);
        assert!(stored.len() < record.len(), "{} >= {}", stored.len(), record.len());

        let mut longer = stored.clone();
        longer[..4].copy_from_slice(&(record.len() as u32 + 1).to_le_bytes());
        let e = unpack_whole(&longer).unwrap_err().to_string();
        assert!(e.contains("holds"), "{e}");

        let mut huge = stored.clone();
        huge[..4].copy_from_slice(&(!SPLICED).to_le_bytes());
        let e = unpack_whole(&huge).unwrap_err().to_string();
        assert!(e.contains("does not decompress") && e.contains("claims"), "{e}");
        let e = unpack_whole(&stored[..2]).unwrap_err().to_string();
        assert!(e.contains("shorter than its length"), "{e}");
        let mut cut = stored.clone();
        cut.truncate(stored.len() - 3);
        assert!(matches!(unpack_whole(&cut), Err(StoreError::Corrupt(_))));
    }

    /// The digest reads the records in chunks, two threads taking them in turn: every record is
    /// hashed once, in order, whether the rows end inside a chunk, at its end, or there are none.
    #[test]
    fn the_digest_covers_every_row_whatever_the_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        for n in [0usize, 1, 511, 512, 513, 1024, 1025] {
            // Ids in key order, so the versions are listed as the table holds them.
            let versions: Vec<ResourceVersion> =
                (0..n).map(|i| version(&format!("o{i:05}"), 1, None, None, &[], false)).collect();
            let store = EmbeddedStore::open(dir.path().join(format!("{n}.redb"))).unwrap();
            rt.block_on(store.apply(&versions, &[], false)).unwrap();
            let mut expected = StoreDigest::new();
            for v in &versions {
                expected.version(&v.key(), v.version_id, &v.encode());
            }
            let tx = store.db().begin_read().unwrap();
            let mut digested = StoreDigest::new();
            store.digest_versions(&tx.open_table(VERSIONS).unwrap(), &mut digested).unwrap();
            assert_eq!(digested.finish(), expected.finish(), "{n} versions");
        }
    }

    /// A write's AuditEvent and Provenance in one batch: the Provenance is spliced from the
    /// AuditEvent's record; other records holding the same fact are not (their middles differ).
    /// Every version reads back as it was, the digest is the one of the same versions stored one
    /// per transaction (each packed whole), and damage to the record spliced from is an error.
    #[test]
    fn a_provenance_is_spliced_from_its_audit_events_record() {
        let fact = serde_json::value::to_raw_value(&serde_json::json!({
            "id": "e1", "actor": {"sub": "device-7", "client_id": "gateway"},
            // Text LZ4 does not shrink, as a fact's ids and hashes.
            "hashes": (0..80u64).map(|i| format!("{:016x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15))).collect::<Vec<_>>(),
        }))
        .unwrap();
        let record = |resource_type: &str, id: &str, version_id: u64| ResourceVersion {
            resource_type: resource_type.into(),
            fact: true,
            resource: Some(fact.clone()),
            date_key: (resource_type == "AuditEvent").then_some(1),
            ..version(id, version_id, Some("Patient/p1"), None, &[], false)
        };
        let (audit, provenance) = (record("AuditEvent", "e1", 1), record("Provenance", "e1", 1));
        // The same fact under another id, and in a second version of the Provenance (which
        // replaces the spliced one in the same transaction: its index keys are read back, with the
        // record it is spliced from, before anything is written out).
        let (other, provenance2) = (record("Device", "d9", 1), record("Provenance", "e1", 2));
        let batch = [provenance.clone(), other.clone(), audit.clone(), provenance2.clone()];
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let shared = EmbeddedStore::open(dir.path().join("shared.redb")).unwrap();
        rt.block_on(shared.apply(&batch, &[], true)).unwrap();
        let alone = EmbeddedStore::open(dir.path().join("alone.redb")).unwrap();
        for v in &batch {
            rt.block_on(alone.apply(std::slice::from_ref(v), &[], true)).unwrap();
        }
        let packed = |store: &EmbeddedStore, key: &str, version: u64| {
            store.values.read(store.version_row(key, version).pointer).unwrap()
        };
        let spliced = packed(&shared, "Provenance/e1", 1);
        assert!(is_spliced(&spliced));
        let audit_row = shared.version_row("AuditEvent/e1", 1);
        assert_eq!(Pointer::decode(&spliced[SPLICE_POINTER]).unwrap(), audit_row.pointer);
        assert!(spliced.len() < fact.get().len() / 4, "{} bytes", spliced.len());
        for (key, version) in [("AuditEvent/e1", 1), ("Device/d9", 1), ("Provenance/e1", 2)] {
            assert!(!is_spliced(&packed(&shared, key, version)), "{key}");
            assert_eq!(packed(&shared, key, version), packed(&alone, key, version), "{key}");
        }
        for store in [&shared, &alone] {
            for v in [&audit, &provenance, &other, &provenance2] {
                let read = rt.block_on(store.version(&v.resource_type, &v.id, v.version_id)).unwrap().unwrap();
                assert_eq!(read.encode(), v.encode());
            }
            let current = rt.block_on(store.current("Provenance", "e1")).unwrap().unwrap();
            assert_eq!(current.version_id, 2);
        }
        assert_eq!(rt.block_on(shared.digest()).unwrap(), rt.block_on(alone.digest()).unwrap());

        // Applied again, with every version already stored: nothing changes.
        let values_len = |s: &EmbeddedStore| s.values_end.load(Ordering::Relaxed);
        let before = values_len(&shared);
        rt.block_on(shared.apply(&batch, &[], true)).unwrap();
        assert_eq!(values_len(&shared), before);
        // A Provenance whose AuditEvent was stored by an earlier batch is packed whole.
        let (audit2, provenance_late) = (record("AuditEvent", "e2", 1), record("Provenance", "e2", 1));
        rt.block_on(shared.apply(std::slice::from_ref(&audit2), &[], true)).unwrap();
        rt.block_on(shared.apply(&[audit2.clone(), provenance_late.clone()], &[], true)).unwrap();
        assert!(!is_spliced(&packed(&shared, "Provenance/e2", 1)));
        let read = rt.block_on(shared.current("Provenance", "e2")).unwrap().unwrap();
        assert_eq!(read.encode(), provenance_late.encode());

        // A record spliced from one that is spliced itself is refused (no chains, no loops).
        let e = unpack(&spliced, |_| Ok(spliced.clone())).unwrap_err().to_string();
        assert!(e.contains("the record it is spliced from") && e.contains("spliced from another"), "{e}");
        // Lengths that do not add up.
        let mut longer = spliced.clone();
        longer[..4].copy_from_slice(&((spliced.len() as u32 + 9999) | SPLICED).to_le_bytes());
        let e = unpack(&longer, |p| shared.values.read(p)).unwrap_err().to_string();
        assert!(e.contains("claims"), "{e}");
        let e = unpack(&spliced[..SPLICE_HEADER - 1], |p| shared.values.read(p)).unwrap_err().to_string();
        assert!(e.contains("shorter than its header"), "{e}");
        // Damage to the AuditEvent's record fails its checksum, read through the Provenance.
        let path = crate::values::path_for(&dir.path().join("shared.redb"));
        let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(audit_row.pointer.offset + 6)).unwrap();
        file.write_all(b"\xff").unwrap();
        drop(file);
        let e = rt.block_on(shared.version("Provenance", "e1", 1)).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");

        // A batch large enough to be packed on the helper thread: every Provenance spliced, the
        // digest the same as with each record packed whole.
        let pairs: Vec<ResourceVersion> = (0..300)
            .flat_map(|n| [record("AuditEvent", &format!("w{n:03}"), 1), record("Provenance", &format!("w{n:03}"), 1)])
            .collect();
        assert!(pairs.len() >= PACK_AHEAD_MIN);
        let large = EmbeddedStore::open(dir.path().join("large.redb")).unwrap();
        rt.block_on(large.apply(&pairs, &[], true)).unwrap();
        let whole = EmbeddedStore::open(dir.path().join("whole.redb")).unwrap();
        for v in &pairs {
            rt.block_on(whole.apply(std::slice::from_ref(v), &[], false)).unwrap();
        }
        for n in [0, 150, 299] {
            assert!(is_spliced(&packed(&large, &format!("Provenance/w{n:03}"), 1)), "{n}");
            let read = rt.block_on(large.current("Provenance", &format!("w{n:03}"))).unwrap().unwrap();
            assert_eq!(read.encode(), pairs[2 * n + 1].encode());
        }
        assert_eq!(rt.block_on(large.digest()).unwrap(), rt.block_on(whole.digest()).unwrap());
    }
}
