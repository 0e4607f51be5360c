//! The projection store on CQL: ScyllaDB in production, Apache Cassandra in our tests.
//! [`ScyllaStore`] implements [`cairn_store::ResourceStore`] with the `scylla` driver (token- and
//! shard-aware routing, prepared statements, `LOCAL_QUORUM` by default).
//!
//! The schema (`schemas/cql/`) has one table per query. CQL has no transactions across partitions,
//! so `apply` relies on order and idempotence instead:
//! - versions of one resource are applied in log order by one projector (a resource's events share
//!   a log partition, and a log partition has one projector at a time);
//! - for a newer version, the index entries are changed first and the version row written last: the
//!   version row is what makes it current, so a crash in between leaves the old version current and
//!   replay redoes the index changes (all upserts and deletes, safe to repeat);
//! - a version that is not newer than the current one changes no index (replay is a no-op);
//! - checkpoints are written after the data they cover: a crash replays a little, never skips.
//!
//! `durable` is ignored: every write is acknowledged by the replicas' commit logs at the configured
//! consistency.

use async_trait::async_trait;
use cairn_store::digest::StoreDigest;
use cairn_store::{Checkpoint, ResourceStore, ResourceVersion, Result, StoreError};
use futures_util::{StreamExt, TryStreamExt, stream};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::Consistency;
use scylla::statement::prepared::PreparedStatement;
use std::collections::{BTreeMap, BTreeSet};

/// The schema files, in order. Each is applied once and recorded in `schema_migrations`.
pub const MIGRATIONS: &[(&str, &str)] = &[
    ("001_resources", include_str!("../../../schemas/cql/001_resources.cql")),
    ("002_write_leases", include_str!("../../../schemas/cql/002_write_leases.cql")),
];

/// Buckets of `resources_by_type` (see the schema).
const TYPE_BUCKETS: i32 = 16;

/// How many resources are fetched at once when an index names them.
const FETCH_CONCURRENCY: usize = 32;

/// How many resources' versions `apply` writes at once.
const APPLY_CONCURRENCY: usize = 64;

#[derive(Debug, Clone)]
pub struct ScyllaSettings {
    /// Contact points, `host:port,host:port`.
    pub nodes: String,
    pub keyspace: String,
    /// Replicas per datacenter for a keyspace `cairn migrate` creates (3 in production).
    pub replication_factor: u32,
    /// `LOCAL_QUORUM` unless told otherwise.
    pub consistency: Consistency,
}

impl ScyllaSettings {
    pub fn new(nodes: impl Into<String>, keyspace: impl Into<String>) -> Self {
        ScyllaSettings {
            nodes: nodes.into(),
            keyspace: keyspace.into(),
            replication_factor: 1,
            consistency: Consistency::LocalQuorum,
        }
    }
}

fn cql_err(context: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage { path: format!("cql: {context}"), detail: e.to_string() }
}

/// Keyspace names are interpolated into CQL, so only plain identifiers pass.
fn check_keyspace(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 48
        && name.as_bytes()[0].is_ascii_alphabetic()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok { Ok(()) } else { Err(cql_err("keyspace", format!("`{name}`: use 1-48 letters, digits and _"))) }
}

async fn connect(settings: &ScyllaSettings) -> Result<Session> {
    let profile = ExecutionProfile::builder().consistency(settings.consistency).build().into_handle();
    SessionBuilder::new()
        .known_nodes(settings.nodes.split(',').map(str::trim).filter(|n| !n.is_empty()))
        .default_execution_profile_handle(profile)
        .build()
        .await
        .map_err(|e| cql_err(&format!("connecting to {}", settings.nodes), e))
}

/// Creates the keyspace if needed and applies every schema file not yet applied. Returns the names of
/// the files applied now.
pub async fn migrate(settings: &ScyllaSettings) -> Result<Vec<String>> {
    check_keyspace(&settings.keyspace)?;
    let session = connect(settings).await?;
    let ks = &settings.keyspace;
    session
        .query_unpaged(
            format!(
                "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = \
                 {{'class': 'NetworkTopologyStrategy', 'replication_factor': {}}}",
                settings.replication_factor
            ),
            &[],
        )
        .await
        .map_err(|e| cql_err("creating the keyspace", e))?;
    session.use_keyspace(ks, false).await.map_err(|e| cql_err("using the keyspace", e))?;
    session
        .query_unpaged(
            "CREATE TABLE IF NOT EXISTS schema_migrations (name text PRIMARY KEY, applied_at timestamp)",
            &[],
        )
        .await
        .map_err(|e| cql_err("creating schema_migrations", e))?;
    let applied: BTreeSet<String> = session
        .query_unpaged("SELECT name FROM schema_migrations", &[])
        .await
        .map_err(|e| cql_err("reading schema_migrations", e))?
        .into_rows_result()
        .map_err(|e| cql_err("reading schema_migrations", e))?
        .rows::<(String,)>()
        .map_err(|e| cql_err("reading schema_migrations", e))?
        .map(|r| r.map(|(n,)| n))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| cql_err("reading schema_migrations", e))?;
    let mut now_applied = Vec::new();
    for (name, text) in MIGRATIONS {
        if applied.contains(*name) {
            continue;
        }
        for statement in statements(text) {
            session
                .query_unpaged(statement.clone(), &[])
                .await
                .map_err(|e| cql_err(&format!("{name}: {statement}"), e))?;
        }
        session.await_schema_agreement().await.map_err(|e| cql_err("waiting for schema agreement", e))?;
        session
            .query_unpaged(
                format!("INSERT INTO {ks}.schema_migrations (name, applied_at) VALUES (?, toTimestamp(now()))"),
                (name.to_string(),),
            )
            .await
            .map_err(|e| cql_err("recording the migration", e))?;
        now_applied.push(name.to_string());
    }
    Ok(now_applied)
}

/// The statements of a schema file: `;`-separated, `--` comments dropped.
fn statements(text: &str) -> Vec<String> {
    let without_comments: String =
        text.lines().map(|l| l.split("--").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    without_comments.split(';').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// `cql` with its table names qualified by `keyspace`.
fn qualify(cql: &str, keyspace: &str) -> String {
    cql.replacen(" FROM ", &format!(" FROM {keyspace}."), 1).replacen(
        "INSERT INTO ",
        &format!("INSERT INTO {keyspace}."),
        1,
    )
}

/// A stable bucket for an id (FNV-1a; Rust's hasher is randomised per process).
fn bucket(id: &str) -> i32 {
    let mut h: u32 = 0x811c9dc5;
    for b in id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x01000193);
    }
    (h % TYPE_BUCKETS as u32) as i32
}

const DAY_MS: i64 = 86_400_000;

fn day_of(ms: i64) -> i32 {
    ms.div_euclid(DAY_MS).clamp(i32::MIN as i64, i32::MAX as i64) as i32
}

struct Statements {
    insert_version: PreparedStatement,
    current: PreparedStatement,
    version: PreparedStatement,
    history: PreparedStatement,
    insert_type: PreparedStatement,
    delete_type: PreparedStatement,
    type_ids: PreparedStatement,
    type_count: PreparedStatement,
    insert_patient: PreparedStatement,
    delete_patient: PreparedStatement,
    patient_ids: PreparedStatement,
    insert_patient_date: PreparedStatement,
    delete_patient_date: PreparedStatement,
    patient_date_ids: PreparedStatement,
    insert_identifier: PreparedStatement,
    delete_identifier: PreparedStatement,
    identifier_ids: PreparedStatement,
    insert_change: PreparedStatement,
    insert_day: PreparedStatement,
    days: PreparedStatement,
    changes: PreparedStatement,
    insert_checkpoint: PreparedStatement,
    checkpoint: PreparedStatement,
    acquire_lease: PreparedStatement,
    release_lease: PreparedStatement,
}

impl Statements {
    /// Prepares every statement with fully qualified table names (`keyspace.table`): a session-wide
    /// `USE` is ambiguous for prepared statements, and ScyllaDB warns about it.
    async fn prepare(session: &Session, keyspace: &str) -> Result<Statements> {
        let p = |cql: &'static str| async move {
            let cql = qualify(cql, keyspace);
            let mut s = session.prepare(cql.as_str()).await.map_err(|e| cql_err(&format!("preparing {cql}"), e))?;
            // Every statement here is an upsert, a delete or a read: safe for the driver to retry.
            s.set_is_idempotent(true);
            Ok::<_, StoreError>(s)
        };
        Ok(Statements {
            insert_version: p("INSERT INTO resource_versions (resource_type, id, version_id, last_updated_ms, deleted, record) VALUES (?, ?, ?, ?, ?, ?) USING TIMESTAMP ?").await?,
            current: p("SELECT record FROM resource_versions WHERE resource_type = ? AND id = ? LIMIT 1").await?,
            version: p("SELECT record FROM resource_versions WHERE resource_type = ? AND id = ? AND version_id = ?").await?,
            history: p("SELECT record FROM resource_versions WHERE resource_type = ? AND id = ?").await?,
            insert_type: p("INSERT INTO resources_by_type (resource_type, bucket, id) VALUES (?, ?, ?) USING TIMESTAMP ?").await?,
            delete_type: p("DELETE FROM resources_by_type USING TIMESTAMP ? WHERE resource_type = ? AND bucket = ? AND id = ?").await?,
            type_ids: p("SELECT id FROM resources_by_type WHERE resource_type = ? AND bucket = ?").await?,
            type_count: p("SELECT COUNT(*) FROM resources_by_type WHERE resource_type = ? AND bucket = ?").await?,
            insert_patient: p("INSERT INTO resources_by_patient (patient, resource_type, id) VALUES (?, ?, ?) USING TIMESTAMP ?").await?,
            delete_patient: p("DELETE FROM resources_by_patient USING TIMESTAMP ? WHERE patient = ? AND resource_type = ? AND id = ?").await?,
            patient_ids: p("SELECT id FROM resources_by_patient WHERE patient = ? AND resource_type = ?").await?,
            insert_patient_date: p("INSERT INTO resources_by_patient_date (patient, resource_type, date_key, id) VALUES (?, ?, ?, ?) USING TIMESTAMP ?").await?,
            delete_patient_date: p("DELETE FROM resources_by_patient_date USING TIMESTAMP ? WHERE patient = ? AND resource_type = ? AND date_key = ? AND id = ?").await?,
            patient_date_ids: p("SELECT id FROM resources_by_patient_date WHERE patient = ? AND resource_type = ? AND date_key >= ? AND date_key < ?").await?,
            insert_identifier: p("INSERT INTO resources_by_identifier (resource_type, identifier, id) VALUES (?, ?, ?) USING TIMESTAMP ?").await?,
            delete_identifier: p("DELETE FROM resources_by_identifier USING TIMESTAMP ? WHERE resource_type = ? AND identifier = ? AND id = ?").await?,
            identifier_ids: p("SELECT id FROM resources_by_identifier WHERE resource_type = ? AND identifier = ?").await?,
            insert_change: p("INSERT INTO resource_changes (day, last_updated_ms, resource_key, version_id) VALUES (?, ?, ?, ?) USING TIMESTAMP ?").await?,
            insert_day: p("INSERT INTO resource_change_days (shard, day) VALUES (0, ?)").await?,
            days: p("SELECT day FROM resource_change_days WHERE shard = 0 AND day >= ? AND day <= ?").await?,
            changes: p("SELECT resource_key, version_id FROM resource_changes WHERE day = ? AND last_updated_ms >= ? AND last_updated_ms <= ?").await?,
            insert_checkpoint: p("INSERT INTO resource_checkpoints (topic, partition, next_offset) VALUES (?, ?, ?)").await?,
            checkpoint: p("SELECT next_offset FROM resource_checkpoints WHERE topic = ? AND partition = ?").await?,
            acquire_lease: p("INSERT INTO write_leases (name, holder) VALUES (?, ?) IF NOT EXISTS USING TTL ?").await?,
            release_lease: p("DELETE FROM write_leases WHERE name = ? IF holder = ?").await?,
        })
    }
}

pub struct ScyllaStore {
    session: Session,
    keyspace: String,
    st: Statements,
}

impl ScyllaStore {
    /// Connects to an existing, migrated keyspace. Fails with a clear message if `cairn migrate` has
    /// not been run.
    pub async fn connect(settings: &ScyllaSettings) -> Result<ScyllaStore> {
        check_keyspace(&settings.keyspace)?;
        let session = connect(settings).await?;
        let st = Statements::prepare(&session, &settings.keyspace).await.map_err(|e| match e {
            StoreError::Storage { path, detail } => {
                StoreError::Storage { path, detail: format!("{detail} (is the schema migrated? run `cairn migrate`)") }
            }
            other => other,
        })?;
        Ok(ScyllaStore { session, keyspace: settings.keyspace.clone(), st })
    }

    /// [`migrate`], then [`ScyllaStore::connect`].
    pub async fn connect_and_migrate(settings: &ScyllaSettings) -> Result<ScyllaStore> {
        migrate(settings).await?;
        Self::connect(settings).await
    }

    /// Drops the whole keyspace (tests; `cairn` never calls it).
    pub async fn drop_keyspace(&self) -> Result<()> {
        self.session
            .query_unpaged(format!("DROP KEYSPACE IF EXISTS {}", self.keyspace), &[])
            .await
            .map_err(|e| cql_err("dropping the keyspace", e))?;
        Ok(())
    }

    async fn exec(&self, st: &PreparedStatement, values: impl scylla::serialize::row::SerializeRow) -> Result<()> {
        self.session.execute_unpaged(st, values).await.map_err(|e| cql_err("write", e))?;
        Ok(())
    }

    /// Reads every row of a query, all pages.
    async fn rows<R>(&self, st: &PreparedStatement, values: impl scylla::serialize::row::SerializeRow) -> Result<Vec<R>>
    where
        R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm> + Send + 'static,
    {
        self.session
            .execute_iter(st.clone(), values)
            .await
            .map_err(|e| cql_err("read", e))?
            .rows_stream::<R>()
            .map_err(|e| cql_err("read", e))?
            .try_collect()
            .await
            .map_err(|e| cql_err("read", e))
    }

    async fn current_version(&self, resource_type: &str, id: &str) -> Result<Option<ResourceVersion>> {
        let rows: Vec<(String,)> = self.rows(&self.st.current, (resource_type, id)).await?;
        rows.into_iter().next().map(|(r,)| decode(&r)).transpose()
    }

    /// Visits the current, non-deleted version of each id, in order, fetching several at once;
    /// stops when `visit` returns false.
    async fn visit_ids(
        &self,
        resource_type: &str,
        ids: Vec<String>,
        visit: &mut (dyn FnMut(ResourceVersion) -> bool + Send),
    ) -> Result<bool> {
        let mut fetched = stream::iter(ids)
            .map(|id| async move { self.current_version(resource_type, &id).await })
            .buffered(FETCH_CONCURRENCY);
        while let Some(v) = fetched.next().await {
            if let Some(v) = v?
                && !v.deleted
                && !visit(v)
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Applies the versions of one resource, in order (see the module comment).
    async fn apply_resource(&self, versions: &[&ResourceVersion]) -> Result<()> {
        let first = versions[0];
        let mut current = self.current_version(&first.resource_type, &first.id).await?;
        for v in versions {
            let newer = current.as_ref().is_none_or(|c| v.version_id > c.version_id);
            if newer {
                self.move_indexes(current.as_ref(), v).await?;
            }
            let day = day_of(v.last_updated_ms);
            self.exec(&self.st.insert_day, (day,)).await?;
            let at = write_time(v.version_id, Step::Version);
            self.exec(&self.st.insert_change, (day, v.last_updated_ms, v.key(), v.version_id as i64, at)).await?;
            let record = String::from_utf8(v.encode()).expect("JSON is UTF-8");
            self.exec(
                &self.st.insert_version,
                (&v.resource_type, &v.id, v.version_id as i64, v.last_updated_ms, v.deleted, record, at),
            )
            .await?;
            if newer {
                current = Some((*v).clone());
            }
        }
        Ok(())
    }

    /// Removes the index entries of `old` that `new` does not have, and adds those of `new`.
    async fn move_indexes(&self, old: Option<&ResourceVersion>, new: &ResourceVersion) -> Result<()> {
        let entries = |v: Option<&ResourceVersion>| -> Vec<IndexEntry> {
            match v {
                Some(v) if !v.deleted => index_entries(v),
                _ => Vec::new(),
            }
        };
        let (before, after) = (entries(old), entries(Some(new)));
        let (t, id) = (new.resource_type.as_str(), new.id.as_str());
        let (del, ins) = (write_time(new.version_id, Step::RemoveIndex), write_time(new.version_id, Step::AddIndex));
        for e in before.iter().filter(|e| !after.contains(e)) {
            match e {
                IndexEntry::Type => self.exec(&self.st.delete_type, (del, t, bucket(id), id)).await?,
                IndexEntry::Patient(p) => self.exec(&self.st.delete_patient, (del, p, t, id)).await?,
                IndexEntry::PatientDate(p, d) => self.exec(&self.st.delete_patient_date, (del, p, t, *d, id)).await?,
                IndexEntry::Identifier(i) => self.exec(&self.st.delete_identifier, (del, t, i, id)).await?,
            }
        }
        for e in after.iter().filter(|e| !before.contains(e)) {
            match e {
                IndexEntry::Type => self.exec(&self.st.insert_type, (t, bucket(id), id, ins)).await?,
                IndexEntry::Patient(p) => self.exec(&self.st.insert_patient, (p, t, id, ins)).await?,
                IndexEntry::PatientDate(p, d) => self.exec(&self.st.insert_patient_date, (p, t, *d, id, ins)).await?,
                IndexEntry::Identifier(i) => self.exec(&self.st.insert_identifier, (t, i, id, ins)).await?,
            }
        }
        Ok(())
    }
}

/// The step of applying a version that a write belongs to, in the order they must win.
#[derive(Clone, Copy)]
enum Step {
    RemoveIndex = 0,
    AddIndex = 1,
    Version = 2,
}

/// The CQL write timestamp of a step of applying `version`: derived from the event, never from a
/// clock. With server-side timestamps, two coordinators' clocks decide which of "remove this index row
/// (version 2)" and "add it back (version 3)" wins, and a replay would not repair a wrong outcome; with
/// these, a later version always wins and replays or concurrent appliers write identical cells.
fn write_time(version: u64, step: Step) -> i64 {
    (version as i64).saturating_mul(4).saturating_add(step as i64)
}

/// The index rows a current, non-deleted version puts in place.
#[derive(Debug, PartialEq, Eq)]
enum IndexEntry {
    Type,
    Patient(String),
    PatientDate(String, i64),
    Identifier(String),
}

fn index_entries(v: &ResourceVersion) -> Vec<IndexEntry> {
    let mut out = vec![IndexEntry::Type];
    if let Some(p) = &v.patient {
        out.push(IndexEntry::Patient(p.clone()));
        if let Some(d) = v.date_key {
            out.push(IndexEntry::PatientDate(p.clone(), d));
        }
    }
    out.extend(v.identifiers.iter().map(|i| IndexEntry::Identifier(i.clone())));
    out
}

/// Whether a lightweight transaction applied: the first column of its one row, `[applied]`.
fn lwt_applied(result: scylla::response::query_result::QueryResult) -> Result<bool> {
    let rows = result.into_rows_result().map_err(|e| cql_err("lightweight transaction", e))?;
    let row: scylla::value::Row = rows.first_row().map_err(|e| cql_err("lightweight transaction", e))?;
    match row.columns.first() {
        Some(Some(scylla::value::CqlValue::Boolean(applied))) => Ok(*applied),
        other => Err(cql_err("lightweight transaction", format!("unexpected [applied] column: {other:?}"))),
    }
}

fn decode(record: &str) -> Result<ResourceVersion> {
    serde_json::from_str(record).map_err(|e| StoreError::Corrupt(e.to_string()))
}

#[async_trait]
impl ResourceStore for ScyllaStore {
    async fn apply(&self, versions: &[ResourceVersion], checkpoints: &[Checkpoint], _durable: bool) -> Result<()> {
        // Group by resource, keeping log order within each; resources are independent.
        // (Indices rather than references: a closure over borrowed items is not `Send` enough for
        // async_trait's boxed future.)
        let mut by_resource: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
        for (i, v) in versions.iter().enumerate() {
            by_resource.entry((&v.resource_type, &v.id)).or_default().push(i);
        }
        let groups: Vec<Vec<usize>> = by_resource.into_values().collect();
        stream::iter(groups)
            .map(|group| async move {
                let vs: Vec<&ResourceVersion> = group.iter().map(|&i| &versions[i]).collect();
                self.apply_resource(&vs).await
            })
            .buffer_unordered(APPLY_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        for c in checkpoints {
            self.exec(&self.st.insert_checkpoint, (&c.topic, c.partition as i32, c.next_offset as i64)).await?;
        }
        Ok(())
    }

    async fn checkpoint(&self, topic: &str, partition: u32) -> Result<Option<u64>> {
        let rows: Vec<(i64,)> = self.rows(&self.st.checkpoint, (topic, partition as i32)).await?;
        Ok(rows.first().map(|(o,)| *o as u64))
    }

    async fn current(&self, resource_type: &str, id: &str) -> Result<Option<ResourceVersion>> {
        self.current_version(resource_type, id).await
    }

    async fn version(&self, resource_type: &str, id: &str, version_id: u64) -> Result<Option<ResourceVersion>> {
        let rows: Vec<(String,)> = self.rows(&self.st.version, (resource_type, id, version_id as i64)).await?;
        rows.into_iter().next().map(|(r,)| decode(&r)).transpose()
    }

    async fn history(&self, resource_type: &str, id: &str) -> Result<Vec<ResourceVersion>> {
        let rows: Vec<(String,)> = self.rows(&self.st.history, (resource_type, id)).await?;
        rows.iter().map(|(r,)| decode(r)).collect()
    }

    async fn scan_current(
        &self,
        resource_type: &str,
        patient: Option<&str>,
        visit: &mut (dyn FnMut(ResourceVersion) -> bool + Send),
    ) -> Result<()> {
        match patient {
            Some(p) => {
                let ids: Vec<(String,)> = self.rows(&self.st.patient_ids, (p, resource_type)).await?;
                self.visit_ids(resource_type, ids.into_iter().map(|(i,)| i).collect(), visit).await?;
            }
            None => {
                // Bucket by bucket, in id order across buckets (as the embedded store lists them).
                let mut ids = Vec::new();
                for b in 0..TYPE_BUCKETS {
                    let rows: Vec<(String,)> = self.rows(&self.st.type_ids, (resource_type, b)).await?;
                    ids.extend(rows.into_iter().map(|(i,)| i));
                }
                ids.sort_unstable();
                self.visit_ids(resource_type, ids, visit).await?;
            }
        }
        Ok(())
    }

    async fn scan_patient_dates(
        &self,
        resource_type: &str,
        patient: &str,
        from: i64,
        to: i64,
        visit: &mut (dyn FnMut(ResourceVersion) -> bool + Send),
    ) -> Result<()> {
        let ranges = [(i64::MIN, i64::MIN.saturating_add(1)), (from.max(i64::MIN + 1), to)];
        for (lo, hi) in ranges {
            if lo >= hi {
                continue;
            }
            let ids: Vec<(String,)> = self.rows(&self.st.patient_date_ids, (patient, resource_type, lo, hi)).await?;
            if !self.visit_ids(resource_type, ids.into_iter().map(|(i,)| i).collect(), visit).await? {
                return Ok(());
            }
        }
        Ok(())
    }

    async fn count_current(&self, resource_type: &str) -> Result<u64> {
        let mut n = 0u64;
        for b in 0..TYPE_BUCKETS {
            let rows: Vec<(i64,)> = self.rows(&self.st.type_count, (resource_type, b)).await?;
            n += rows.first().map_or(0, |(c,)| *c as u64);
        }
        Ok(n)
    }

    async fn changes(
        &self,
        resource_type: Option<&str>,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<ResourceVersion>> {
        let days: Vec<(i32,)> = self.rows(&self.st.days, (day_of(from_ms), day_of(to_ms))).await?;
        let mut out = Vec::new();
        // Days newest first, and within a day newest first (the clustering order).
        for (day,) in days {
            let rows: Vec<(String, i64)> = self.rows(&self.st.changes, (day, from_ms, to_ms)).await?;
            for (key, version) in rows {
                if out.len() >= limit {
                    return Ok(out);
                }
                if !cairn_store::key_has_type(&key, resource_type) {
                    continue;
                }
                let Some((t, id)) = key.split_once('/') else { continue };
                if let Some(v) = self.version(t, id, version as u64).await? {
                    out.push(v);
                }
            }
        }
        Ok(out)
    }

    async fn acquire_lease(&self, name: &str, holder: &str, ttl: std::time::Duration) -> Result<bool> {
        let ttl = ttl.as_secs().clamp(1, 3600) as i32;
        let result = self
            .session
            .execute_unpaged(&self.st.acquire_lease, (name, holder, ttl))
            .await
            .map_err(|e| cql_err("acquiring a write lease", e))?;
        lwt_applied(result)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        let result = self
            .session
            .execute_unpaged(&self.st.release_lease, (name, holder))
            .await
            .map_err(|e| cql_err("releasing a write lease", e))?;
        lwt_applied(result).map(|_| ())
    }

    async fn find_by_identifier(&self, resource_type: &str, identifier: &str) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = self.rows(&self.st.identifier_ids, (resource_type, identifier)).await?;
        Ok(rows.into_iter().map(|(i,)| i).collect())
    }

    /// Reads every table whole and sorts it in memory: meant for tests and rebuild checks, not for a
    /// production-sized keyspace.
    async fn digest(&self) -> Result<String> {
        let q = |cql: String| async move {
            let mut st = self.session.prepare(qualify(&cql, &self.keyspace)).await.map_err(|e| cql_err("digest", e))?;
            st.set_page_size(5000);
            Ok::<_, StoreError>(st)
        };
        let mut versions: Vec<(String, String, i64, bool, String)> = self
            .rows(&q("SELECT resource_type, id, version_id, deleted, record FROM resource_versions".into()).await?, ())
            .await?;
        versions.sort_by(|a, b| (format!("{}/{}", a.0, a.1), a.2).cmp(&(format!("{}/{}", b.0, b.1), b.2)));
        let mut d = StoreDigest::new();
        let mut current: BTreeMap<String, (u64, bool)> = BTreeMap::new();
        for (t, id, v, deleted, record) in &versions {
            let key = format!("{t}/{id}");
            d.version(&key, *v as u64, record.as_bytes());
            current.insert(key, (*v as u64, *deleted));
        }
        for (key, (v, deleted)) in &current {
            d.current(key, *v, *deleted);
        }
        let mut patient: Vec<(String, String, String)> =
            self.rows(&q("SELECT patient, resource_type, id FROM resources_by_patient".into()).await?, ()).await?;
        patient.sort();
        for (p, t, id) in &patient {
            d.by_patient(p, t, id);
        }
        let mut dates: Vec<(String, String, i64, String)> = self
            .rows(&q("SELECT patient, resource_type, date_key, id FROM resources_by_patient_date".into()).await?, ())
            .await?;
        dates.sort();
        for (p, t, date, id) in &dates {
            d.by_patient_date(p, t, *date, id);
        }
        let mut identifiers: Vec<(String, String, String)> = self
            .rows(&q("SELECT resource_type, identifier, id FROM resources_by_identifier".into()).await?, ())
            .await?;
        identifiers.sort();
        for (t, i, id) in &identifiers {
            d.by_identifier(t, i, id);
        }
        Ok(d.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_files_split_into_statements() {
        let s = statements(MIGRATIONS[0].1);
        assert_eq!(s.len(), 8, "{s:#?}");
        assert_eq!(statements(MIGRATIONS[1].1).len(), 1);
        assert!(s.iter().all(|s| s.starts_with("CREATE TABLE IF NOT EXISTS")));
    }

    #[test]
    fn later_versions_always_win() {
        // Adding a row back at version 3 beats removing it at version 2, which beats adding it at 1.
        assert!(write_time(3, Step::AddIndex) > write_time(2, Step::RemoveIndex));
        assert!(write_time(2, Step::RemoveIndex) > write_time(1, Step::AddIndex));
        assert!(write_time(1, Step::Version) > write_time(1, Step::AddIndex));
        assert_eq!(write_time(7, Step::Version), write_time(7, Step::Version), "replays write identical cells");
    }

    #[test]
    fn statements_name_their_keyspace() {
        assert_eq!(qualify("SELECT a FROM t WHERE b = ?", "ks"), "SELECT a FROM ks.t WHERE b = ?");
        assert_eq!(qualify("DELETE FROM t WHERE b = ?", "ks"), "DELETE FROM ks.t WHERE b = ?");
        assert_eq!(qualify("INSERT INTO t (a) VALUES (?)", "ks"), "INSERT INTO ks.t (a) VALUES (?)");
    }

    #[test]
    fn keyspace_names_are_plain_identifiers() {
        assert!(check_keyspace("cairn").is_ok());
        assert!(check_keyspace("cairn_test_1").is_ok());
        for bad in ["", "1cairn", "cairn; DROP", "a-b", &"x".repeat(49)] {
            assert!(check_keyspace(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn buckets_are_stable_and_spread() {
        assert_eq!(bucket("a"), bucket("a"));
        let used: BTreeSet<i32> = (0..1000).map(|i| bucket(&format!("id-{i}"))).collect();
        assert_eq!(used.len(), TYPE_BUCKETS as usize);
    }
}
