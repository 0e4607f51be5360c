//! The FHIR interactions as plain async functions: validate, decide, append the event, answer.
//!
//! Every function takes the acting party as an explicit [`RequestContext`], so authentication plugs
//! in without touching the interactions. Writes return only once their event is durable in the log;
//! reads wait (with a bound) until the projection has caught up with the log as it was when the read
//! began, so a client always sees its own writes, and past the bound they fail with 503 rather than
//! answer with stale data. Nothing here knows HTTP: results and errors are FHIR values and statuses.

mod access;
mod bundle;
mod capability;
mod investigate;
mod reports;
mod transaction;

pub use access::{Access, Permit};
pub use cairn_auth::scope::Permission;
pub use capability::capability_statement;
pub use reports::{Report, ReportKind};

use cairn_events::{
    AccessRead, AccessSearch, Actor, Event, ResourceDeleted, ResourceWritten, Timestamp, VersionedRef, topics,
};
use cairn_fhir::outcome::{Issue, IssueCode};
use cairn_fhir::{index, resource, search};
use cairn_log::{EventLog, NewRecord};
use cairn_projector::Progress;
use cairn_store::{ResourceStore, ResourceVersion};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// Who is acting, on behalf of which request, with what authority (from the bearer token, or
/// unrestricted under `--insecure-no-auth`).
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub actor: Actor,
    pub request_id: String,
    pub access: Access,
    /// The Provenance the client sent with a write (`X-Provenance`, JSON text checked by the edge),
    /// recorded with every resource the request writes, each entry of a Bundle included.
    pub provenance: Option<String>,
}

/// A FHIR error: the HTTP status and the issues for its OperationOutcome.
#[derive(Debug, Clone)]
pub struct FhirError {
    pub status: u16,
    pub issues: Vec<Issue>,
    /// Answered as 404 to hide that a resource outside the token's reach exists; audited as 403.
    concealed: bool,
}

impl FhirError {
    pub fn new(status: u16, code: IssueCode, diagnostics: impl Into<String>) -> FhirError {
        FhirError { status, issues: vec![Issue::error(code, diagnostics)], concealed: false }
    }
    /// 400 with every issue found.
    pub fn invalid(issues: Vec<Issue>) -> FhirError {
        FhirError { status: 400, issues, concealed: false }
    }
    /// The status the audit trail records: the truth, even when the client is told less.
    pub fn audit_status(&self) -> u16 {
        if self.concealed { 403 } else { self.status }
    }
    fn unavailable(why: impl Into<String>) -> FhirError {
        FhirError::new(503, IssueCode::Transient, why)
    }
}

pub type FhirResult<T> = Result<T, FhirError>;

#[derive(Debug, Clone)]
pub struct Settings {
    /// The FHIR base URL clients use, e.g. `http://127.0.0.1:8080/fhir`.
    pub base_url: String,
    /// How long a read waits for the projection to reach the log before answering 503.
    pub read_wait: Duration,
    /// Largest accepted resource body (413 above it).
    pub max_resource_bytes: usize,
    /// Largest accepted batch or transaction Bundle.
    pub max_bundle_bytes: usize,
    /// Set when this service shows a replayed store read-only (`cairn serve --read-only`): what
    /// the replay shows, e.g. `replay until 2026-11-28T09:00:00Z`. Writes answer 405, reads do not
    /// wait for a projection (the store is complete as of its cut), and every access event names it.
    pub view: Option<String>,
}

/// What the answer to a write carries (`Prefer: return=`): the resource (the default), nothing, or
/// an OperationOutcome. In a batch or transaction it applies to each write entry's response; a
/// gateway that only needs the ids and versions saves both sides the bodies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReturnPreference {
    #[default]
    Representation,
    Minimal,
    OperationOutcome,
}

impl ReturnPreference {
    /// The `return=` value of a `Prefer` header; anything unknown is the default, as the header is
    /// only a preference (RFC 7240).
    pub fn from_prefer_return(value: Option<&str>) -> ReturnPreference {
        match value {
            Some("minimal") => ReturnPreference::Minimal,
            Some("OperationOutcome") => ReturnPreference::OperationOutcome,
            _ => ReturnPreference::Representation,
        }
    }
}

/// A resource at one version, as returned to clients.
#[derive(Debug, Clone)]
pub struct Versioned {
    pub resource: Value,
    pub id: String,
    pub version_id: u64,
    pub last_updated: String,
}

impl From<ResourceVersion> for Versioned {
    fn from(v: ResourceVersion) -> Self {
        Versioned {
            resource: v.resource_value().unwrap_or(Value::Null),
            id: v.id,
            version_id: v.version_id,
            last_updated: v.last_updated,
        }
    }
}

#[derive(Debug, Clone)]
pub enum WriteOutcome {
    /// 201: a new resource (or a new resource created by update).
    Created(Versioned),
    /// 200: an existing resource was updated.
    Updated(Versioned),
    /// 200: a conditional create found the resource already there; nothing was written.
    Existing(Versioned),
}

impl WriteOutcome {
    /// Whether the write created the resource (201) rather than updating or finding it (200).
    pub fn created(&self) -> bool {
        matches!(self, WriteOutcome::Created(_))
    }

    pub fn into_versioned(self) -> Versioned {
        match self {
            WriteOutcome::Created(v) | WriteOutcome::Updated(v) | WriteOutcome::Existing(v) => v,
        }
    }
}

/// Write serialisation: one of these shards is held while a resource's next version is decided, so
/// two writers of one resource never both take version n+1.
const LOCK_SHARDS: usize = 256;

/// How many versions type and system history with `_at` read back from the window's end to find the
/// ones still current during it. Versions current in the window but older than that many later changes
/// are not found: a bound on the work one request can cause (README, "The FHIR API").
const AT_SCAN: usize = 20_000;

/// How many versions of a type a search with `_asOf` reads back from that moment at most: the same
/// bound as history with `_at` (each is held in memory while the search runs).
const AS_OF_SCAN: usize = AT_SCAN;

/// How long a write lease lasts if its holder dies without giving it back. Longer than any write holds
/// it (a bounded wait for the projection plus an append with its retries).
const WRITE_LEASE_TTL: Duration = Duration::from_secs(60);

/// Write locks held (see [`FhirService::write_lock`]); the store's leases are given back when it is
/// dropped.
pub(crate) struct WriteGuard<'a> {
    _local: Vec<tokio::sync::MutexGuard<'a, ()>>,
    leases: Vec<String>,
    holder: String,
    store: Arc<dyn ResourceStore>,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        if self.leases.is_empty() {
            return;
        }
        let (store, holder, leases) = (self.store.clone(), self.holder.clone(), std::mem::take(&mut self.leases));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for lease in leases {
                    if let Err(e) = store.release_lease(&lease, &holder).await {
                        // It lapses after WRITE_LEASE_TTL anyway.
                        tracing::warn!(error = %e, "could not release a write lease");
                    }
                }
            });
        }
    }
}

pub struct FhirService {
    log: Arc<dyn EventLog>,
    store: Arc<dyn ResourceStore>,
    progress: Progress,
    /// The audit projections' progress, per topic they read.
    audit_progress: Vec<(&'static str, Progress)>,
    settings: Settings,
    locks: Vec<tokio::sync::Mutex<()>>,
    /// One investigation (`$timeline`, `$seen`: a pass over the whole log) at a time.
    investigations: tokio::sync::Semaphore,
}

impl FhirService {
    pub fn new(log: Arc<dyn EventLog>, store: Arc<dyn ResourceStore>, progress: Progress, settings: Settings) -> Self {
        FhirService {
            log,
            // The audit trail's records are stored as their facts; the API shows them rendered.
            store: cairn_projector::audit::Rendered::wrap(store),
            progress,
            audit_progress: Vec::new(),
            settings,
            locks: (0..LOCK_SHARDS).map(|_| tokio::sync::Mutex::new(())).collect(),
            investigations: tokio::sync::Semaphore::new(1),
        }
    }

    /// What reads of AuditEvent and Provenance wait on (read-your-writes for the audit trail).
    /// Without it they answer from the store as it is.
    pub fn with_audit_progress(mut self, progress: Vec<(&'static str, Progress)>) -> Self {
        self.audit_progress = progress;
        self
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn shard_of(&self, key: &str) -> usize {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        (h % LOCK_SHARDS as u64) as usize
    }

    /// Takes the write locks of `shards`, in order: this process's own, then (on a store shared by
    /// several API processes) the store's leases on the same shards, so that no two processes decide
    /// the next version of one resource, or run one conditional create, at the same time. Waits at most
    /// `read_wait` for a lease another process holds, then answers 409.
    async fn write_lock(&self, shards: impl IntoIterator<Item = usize>) -> FhirResult<WriteGuard<'_>> {
        let shards: std::collections::BTreeSet<usize> = shards.into_iter().collect();
        let mut guard = WriteGuard {
            _local: Vec::with_capacity(shards.len()),
            leases: Vec::new(),
            holder: uuid::Uuid::now_v7().to_string(),
            store: self.store.clone(),
        };
        for &s in &shards {
            guard._local.push(self.locks[s].lock().await);
        }
        let deadline = std::time::Instant::now() + self.settings.read_wait;
        for s in shards {
            let name = format!("fhir-write-{s}");
            loop {
                match self.store.acquire_lease(&name, &guard.holder, WRITE_LEASE_TTL).await {
                    Ok(true) => {
                        guard.leases.push(name);
                        break;
                    }
                    Ok(false) if std::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Ok(false) => {
                        return Err(FhirError::new(
                            409,
                            IssueCode::Conflict,
                            "another server is writing the same resources; retry the request",
                        ));
                    }
                    Err(e) => return Err(FhirError::unavailable(e.to_string())),
                }
            }
        }
        Ok(guard)
    }

    /// The write lock of the shard of `key` (a resource `Type/id`, or a conditional create's query).
    async fn write_lock_for(&self, key: &str) -> FhirResult<WriteGuard<'_>> {
        self.write_lock([self.shard_of(key)]).await
    }

    /// Writes are refused on a read-only view of a replayed store (405, recorded like any refusal).
    fn check_writable(&self) -> FhirResult<()> {
        match &self.settings.view {
            Some(view) => Err(FhirError::new(
                405,
                IssueCode::NotSupported,
                format!("this server shows a {view} and takes no writes"),
            )),
            None => Ok(()),
        }
    }

    /// A type clients may write.
    fn check_type(resource_type: &str) -> FhirResult<()> {
        if resource::is_read_only_type(resource_type) {
            return Err(FhirError::new(
                405,
                IssueCode::NotSupported,
                format!("{resource_type} is read-only: the server writes the audit trail from its log"),
            ));
        }
        Self::check_readable_type(resource_type)
    }

    /// A type clients may read and search: the writable ones and the audit trail's.
    fn check_readable_type(resource_type: &str) -> FhirResult<()> {
        if resource::is_readable_type(resource_type) {
            Ok(())
        } else {
            Err(FhirError::new(
                404,
                IssueCode::NotSupported,
                format!("resource type `{resource_type}` is not supported by this server"),
            ))
        }
    }

    fn check_id(id: &str) -> FhirResult<()> {
        if resource::is_valid_id(id) {
            Ok(())
        } else {
            Err(FhirError::new(400, IssueCode::Value, format!("`{id}` is not a valid FHIR id")))
        }
    }

    fn parse_body(&self, resource_type: &str, body: &[u8]) -> FhirResult<Value> {
        if body.len() > self.settings.max_resource_bytes {
            return Err(FhirError::new(
                413,
                IssueCode::TooLong,
                format!("the resource is {} bytes; the limit is {}", body.len(), self.settings.max_resource_bytes),
            ));
        }
        resource::parse(body, resource_type).map_err(FhirError::invalid)
    }

    /// Whether `progress` reaches, within the read bound, everything `topic` held when this was
    /// called: in every partition, or in the one partition of `key`.
    async fn reached(&self, topic: &str, progress: &Progress, key: Option<&str>) -> FhirResult<bool> {
        let unavailable = |e: cairn_log::LogError| FhirError::unavailable(e.to_string());
        let partitions = self.log.partitions(topic).map_err(unavailable)?;
        let mut targets = vec![0u64; partitions as usize];
        let only = key.map(|k| cairn_log::partition_for_key(k.as_bytes(), partitions));
        for p in 0..partitions {
            if only.is_none_or(|o| o == p) {
                targets[p as usize] = self.log.end_offset(topic, p).await.map_err(unavailable)?;
            }
        }
        Ok(progress.wait_for(&targets, self.settings.read_wait).await)
    }

    /// Waits until the resource projection has applied everything the log held when this was called:
    /// in every partition, or in the one partition of `key`.
    async fn caught_up(&self, key: Option<&str>) -> FhirResult<()> {
        if self.settings.view.is_some() {
            return Ok(());
        }
        if self.reached(topics::FHIR, &self.progress, key).await? {
            Ok(())
        } else {
            Err(FhirError::unavailable(format!(
                "the resource store is more than {} ms behind the log; try again shortly",
                self.settings.read_wait.as_millis()
            )))
        }
    }

    /// Like [`Self::caught_up`] for reads of `resource_type`: the audit trail's types wait for the
    /// audit projections to reach the end of every topic they read (as it was when this was called).
    async fn caught_up_for(&self, resource_type: &str, key: Option<&str>) -> FhirResult<()> {
        if !resource::is_read_only_type(resource_type) || self.settings.view.is_some() {
            return self.caught_up(key).await;
        }
        for (topic, progress) in &self.audit_progress {
            if !self.reached(topic, progress, None).await? {
                return Err(FhirError::unavailable(format!(
                    "the audit trail is more than {} ms behind the log; try again shortly",
                    self.settings.read_wait.as_millis()
                )));
            }
        }
        Ok(())
    }

    async fn append(&self, event: Event) -> FhirResult<()> {
        let record = NewRecord::new(event.topic(), event.partition_key(), event.canonical_bytes());
        self.log.append(record).await.map_err(|e| {
            tracing::error!(error = %e, "append refused: failing closed");
            append_failed(&e)
        })?;
        Ok(())
    }

    fn written_event(
        ctx: &RequestContext,
        resource_type: &str,
        id: &str,
        version_id: u64,
        resource: &Value,
        created: bool,
    ) -> Event {
        let written =
            ResourceWritten::new(resource_type, id, version_id, resource).with_provenance(ctx.provenance.clone());
        let payload = if created {
            cairn_events::Payload::ResourceCreated(written)
        } else {
            cairn_events::Payload::ResourceUpdated(written)
        };
        let mut e = Event::new(payload).with_actor(ctx.actor.clone()).with_request_id(ctx.request_id.clone());
        if let Some(p) = index::patient_of(resource_type, id, resource) {
            e = e.with_patient(p);
        }
        e
    }

    /// Records a refused request (`fhir.request.refused`) before the refusal is answered. Only
    /// refusals (4xx) are recorded this way: a 5xx means the server could not act (often because the
    /// log is down), and nothing was disclosed or changed. If the log cannot take the record, the
    /// refusal becomes a 503: no answer leaves unaudited.
    pub async fn record_refusal(
        &self,
        ctx: &RequestContext,
        interaction: &str,
        resource_type: Option<&str>,
        id: Option<&str>,
        error: &FhirError,
    ) -> FhirResult<()> {
        let status = error.audit_status();
        if !(400..500).contains(&status) {
            return Ok(());
        }
        let payload = cairn_events::RequestRefused {
            interaction: interaction.to_owned(),
            resource_type: resource_type.map(str::to_owned),
            id: id.map(|i| i.chars().take(200).collect()),
            status,
            code: error.issues.first().map(|i| i.code.as_str().to_owned()).unwrap_or_else(|| "exception".into()),
            reason: error.issues.iter().map(|i| i.diagnostics.as_str()).collect::<Vec<_>>().join("; "),
            view: None,
        };
        self.append_access(ctx, payload.into(), None).await
    }

    /// Passes `result` through, recording it first if it is a refusal.
    async fn audited<T>(
        &self,
        ctx: &RequestContext,
        interaction: &str,
        resource_type: Option<&str>,
        id: Option<&str>,
        result: FhirResult<T>,
    ) -> FhirResult<T> {
        if let Err(e) = &result {
            self.record_refusal(ctx, interaction, resource_type, id, e).await?;
        }
        result
    }

    /// create, and conditional create when `if_none_exist` holds a search query. A refusal is
    /// recorded before it is answered.
    pub async fn create(
        &self,
        ctx: &RequestContext,
        resource_type: &str,
        body: &[u8],
        if_none_exist: Option<&str>,
    ) -> FhirResult<WriteOutcome> {
        let result = self.create_unaudited(ctx, resource_type, body, if_none_exist).await;
        self.audited(ctx, "create", Some(resource_type), None, result).await
    }

    async fn create_unaudited(
        &self,
        ctx: &RequestContext,
        resource_type: &str,
        body: &[u8],
        if_none_exist: Option<&str>,
    ) -> FhirResult<WriteOutcome> {
        self.check_writable()?;
        Self::check_type(resource_type)?;
        let permit = ctx.access.permit(Permission::Create, resource_type)?;
        let mut resource = self.parse_body(resource_type, body)?;
        let new_id = new_resource_id();
        if !permit.admits(
            resource_type,
            index::patient_of(resource_type, &new_id, &resource).as_deref(),
            Some(&resource),
        ) {
            return Err(FhirError::outside_compartment("the resource"));
        }
        let _guard;
        if let Some(query) = if_none_exist {
            let (parsed, _) = search::parse_query(resource_type, query, false)
                .map_err(|e| FhirError::new(400, IssueCode::Invalid, format!("If-None-Exist: {e}")))?;
            // Identical conditional creates queue on one lock and see each other's result.
            _guard = Some(self.write_lock_for(&format!("{resource_type}?{query}")).await?);
            self.caught_up(None).await?;
            let mut found = Vec::new();
            self.scan(resource_type, &parsed, &mut |v, _| {
                found.push(v);
                found.len() < 2
            })
            .await?;
            match found.len() {
                0 => {}
                1 => {
                    // The answer discloses the resource that was found: audited like the search it is.
                    let existing = found.pop().expect("one");
                    if !ctx.access.permit(Permission::Read, resource_type)?.admits_version(&existing) {
                        return Err(FhirError::outside_compartment("the resource If-None-Exist matched"));
                    }
                    let payload = AccessSearch {
                        interaction: "search-type".into(),
                        resource_type: Some(resource_type.to_owned()),
                        query: query.to_owned(),
                        status: 200,
                        returned: vec![bundle::version_ref(&existing)],
                        total: Some(1),
                        view: None,
                    };
                    self.append_access(ctx, payload.into(), existing.patient.clone()).await?;
                    return Ok(WriteOutcome::Existing(existing.into()));
                }
                _ => {
                    return Err(FhirError::new(
                        412,
                        IssueCode::Duplicate,
                        "If-None-Exist matches more than one resource",
                    ));
                }
            }
        }
        let id = new_id;
        let now = Timestamp::now().to_rfc3339();
        resource::stamp(&mut resource, &id, 1, &now);
        self.append(Self::written_event(ctx, resource_type, &id, 1, &resource, true)).await?;
        Ok(WriteOutcome::Created(Versioned { resource, id, version_id: 1, last_updated: now }))
    }

    /// update (and create-on-update with a client id). `if_match` is the ETag the client sent.
    pub async fn update(
        &self,
        ctx: &RequestContext,
        resource_type: &str,
        id: &str,
        body: &[u8],
        if_match: Option<&str>,
    ) -> FhirResult<WriteOutcome> {
        let result = self.update_unaudited(ctx, resource_type, id, body, if_match).await;
        self.audited(ctx, "update", Some(resource_type), Some(id), result).await
    }

    async fn update_unaudited(
        &self,
        ctx: &RequestContext,
        resource_type: &str,
        id: &str,
        body: &[u8],
        if_match: Option<&str>,
    ) -> FhirResult<WriteOutcome> {
        self.check_writable()?;
        Self::check_type(resource_type)?;
        Self::check_id(id)?;
        let permit = ctx.access.permit(Permission::Update, resource_type)?;
        let mut resource = self.parse_body(resource_type, body)?;
        match resource.get("id").and_then(Value::as_str) {
            Some(body_id) if body_id == id => {}
            Some(body_id) => {
                return Err(FhirError::new(
                    400,
                    IssueCode::Invalid,
                    format!("the body's id `{body_id}` does not match the URL's `{id}`"),
                ));
            }
            None => {
                return Err(FhirError::new(
                    400,
                    IssueCode::Required,
                    "an update must carry the resource id in the body",
                ));
            }
        }
        let expected = match if_match {
            Some(tag) => Some(parse_etag(tag).ok_or_else(|| {
                FhirError::new(400, IssueCode::Invalid, format!("If-Match `{tag}` is not an ETag like W/\"3\""))
            })?),
            None => None,
        };
        let key = format!("{resource_type}/{id}");
        let _guard = self.write_lock_for(&key).await?;
        self.caught_up(Some(&key)).await?;
        let current = self.store.current(resource_type, id).await.map_err(|e| FhirError::unavailable(e.to_string()))?;
        match &current {
            Some(c) if !permit.admits_version(c) => return Err(FhirError::concealed(resource_type, id)),
            None => {
                ctx.access.permit(Permission::Create, resource_type)?;
            }
            _ => {}
        }
        if !permit.admits(resource_type, index::patient_of(resource_type, id, &resource).as_deref(), Some(&resource)) {
            return Err(FhirError::outside_compartment("the new content"));
        }
        let current_version = current.as_ref().map(|c| c.version_id);
        if let Some(expected) = expected
            && current_version != Some(expected)
        {
            return Err(FhirError::new(
                412,
                IssueCode::Conflict,
                format!(
                    "If-Match W/\"{expected}\" but the current version is {}",
                    current_version.map_or("none".into(), |v| v.to_string())
                ),
            ));
        }
        let version_id = current_version.unwrap_or(0) + 1;
        let created = current.as_ref().is_none_or(|c| c.deleted);
        let now = Timestamp::now().to_rfc3339();
        resource::stamp(&mut resource, id, version_id, &now);
        self.append(Self::written_event(ctx, resource_type, id, version_id, &resource, current.is_none())).await?;
        let v = Versioned { resource, id: id.to_owned(), version_id, last_updated: now };
        Ok(if created { WriteOutcome::Created(v) } else { WriteOutcome::Updated(v) })
    }

    /// delete: a new version marked deleted; history keeps the rest. Deleting what is absent or
    /// already deleted succeeds without writing.
    pub async fn delete(&self, ctx: &RequestContext, resource_type: &str, id: &str) -> FhirResult<Option<u64>> {
        let result = self.delete_unaudited(ctx, resource_type, id).await;
        self.audited(ctx, "delete", Some(resource_type), Some(id), result).await
    }

    async fn delete_unaudited(&self, ctx: &RequestContext, resource_type: &str, id: &str) -> FhirResult<Option<u64>> {
        self.check_writable()?;
        Self::check_type(resource_type)?;
        Self::check_id(id)?;
        let permit = ctx.access.permit(Permission::Delete, resource_type)?;
        let key = format!("{resource_type}/{id}");
        let _guard = self.write_lock_for(&key).await?;
        self.caught_up(Some(&key)).await?;
        let current = self.store.current(resource_type, id).await.map_err(|e| FhirError::unavailable(e.to_string()))?;
        if let Some(c) = &current
            && !permit.admits_version(c)
        {
            return Err(FhirError::concealed(resource_type, id));
        }
        let Some(current) = current.filter(|c| !c.deleted) else { return Ok(None) };
        let version_id = current.version_id + 1;
        let mut e = Event::new(ResourceDeleted {
            resource_type: resource_type.to_owned(),
            id: id.to_owned(),
            version_id,
            provenance: ctx.provenance.clone(),
        })
        .with_actor(ctx.actor.clone())
        .with_request_id(ctx.request_id.clone());
        if let Some(p) = current.patient {
            e = e.with_patient(p);
        }
        self.append(e).await?;
        Ok(Some(version_id))
    }

    /// read. Audited: the access event is durable before the resource is returned.
    pub async fn read(&self, ctx: &RequestContext, resource_type: &str, id: &str) -> FhirResult<Versioned> {
        let result = self.read_unaudited(ctx, resource_type, id, None).await;
        self.audit_read(ctx, "read", resource_type, id, result).await
    }

    /// vread. Audited like read.
    pub async fn vread(
        &self,
        ctx: &RequestContext,
        resource_type: &str,
        id: &str,
        version: &str,
    ) -> FhirResult<Versioned> {
        let result = match version.parse::<u64>() {
            Ok(v) => self.read_unaudited(ctx, resource_type, id, Some(v)).await,
            Err(_) => Err(FhirError::new(400, IssueCode::Value, format!("`{version}` is not a version number"))),
        };
        self.audit_read(ctx, "vread", resource_type, id, result).await
    }

    async fn read_unaudited(
        &self,
        ctx: &RequestContext,
        resource_type: &str,
        id: &str,
        version_id: Option<u64>,
    ) -> FhirResult<ResourceVersion> {
        Self::check_readable_type(resource_type)?;
        Self::check_id(id)?;
        let permit = ctx.access.permit(Permission::Read, resource_type)?;
        self.caught_up_for(resource_type, Some(&format!("{resource_type}/{id}"))).await?;
        let found = match version_id {
            None => self.store.current(resource_type, id).await,
            Some(v) => self.store.version(resource_type, id, v).await,
        }
        .map_err(|e| FhirError::unavailable(e.to_string()))?;
        if let Some(v) = &found
            && !permit.admits_version(v)
        {
            return Err(FhirError::concealed(resource_type, id));
        }
        match (found, version_id) {
            (None, None) => {
                Err(FhirError::new(404, IssueCode::NotFound, format!("{resource_type}/{id} does not exist")))
            }
            (None, Some(v)) => {
                Err(FhirError::new(404, IssueCode::NotFound, format!("{resource_type}/{id} has no version {v}")))
            }
            (Some(v), None) if v.deleted => Err(FhirError::new(
                410,
                IssueCode::Deleted,
                format!("{resource_type}/{id} was deleted (version {})", v.version_id),
            )),
            (Some(v), Some(n)) if v.deleted => Err(FhirError::new(
                410,
                IssueCode::Deleted,
                format!("version {n} of {resource_type}/{id} is a deletion"),
            )),
            (Some(v), _) => Ok(v),
        }
    }

    /// Appends the `fhir.access.read` event for a read's outcome (success or refusal) and only then
    /// lets the result go. If the log cannot take it, nothing is disclosed: 503.
    async fn audit_read(
        &self,
        ctx: &RequestContext,
        interaction: &str,
        resource_type: &str,
        id: &str,
        result: FhirResult<ResourceVersion>,
    ) -> FhirResult<Versioned> {
        let (status, returned, patient) = match &result {
            Ok(v) => (200, vec![bundle::version_ref(v)], v.patient.clone()),
            Err(e) => (e.audit_status(), Vec::new(), None),
        };
        let payload = AccessRead {
            interaction: interaction.to_owned(),
            resource_type: resource_type.to_owned(),
            id: id.to_owned(),
            status,
            returned,
            view: None,
        };
        self.append_access(ctx, payload.into(), patient).await?;
        result.map(Versioned::from)
    }

    async fn append_access(
        &self,
        ctx: &RequestContext,
        mut payload: cairn_events::Payload,
        patient: Option<String>,
    ) -> FhirResult<()> {
        if let Some(view) = &self.settings.view {
            match &mut payload {
                cairn_events::Payload::AccessRead(a) => a.view = Some(view.clone()),
                cairn_events::Payload::AccessSearch(a) => a.view = Some(view.clone()),
                cairn_events::Payload::RequestRefused(r) => r.view = Some(view.clone()),
                _ => {}
            }
        }
        let mut e = Event::new(payload).with_actor(ctx.actor.clone()).with_request_id(ctx.request_id.clone());
        if let Some(p) = patient {
            e = e.with_patient(p);
        }
        self.append(e).await
    }

    /// Current resources matching `query`, via the patient index when the query names one patient.
    /// With one patient and a bounded `date`, only that patient's readings in the time window are
    /// read (the `by_patient_date` index); every candidate is still matched exactly.
    async fn scan(
        &self,
        resource_type: &str,
        query: &search::SearchQuery,
        visit: &mut (dyn FnMut(ResourceVersion, &Value) -> bool + Send),
    ) -> FhirResult<()> {
        if let Some(as_of) = query.as_of {
            return self.scan_as_of(resource_type, query, as_of.timestamp_millis(), visit).await;
        }
        let patient = single_patient(resource_type, query);
        let mut filter = |mut v: ResourceVersion| match v.take_resource_value() {
            Some(r) if search::matches(&r, query) => visit(v, &r),
            _ => true,
        };
        let result = match (patient.as_deref(), index::date_bounds(query)) {
            (Some(p), Some((from, to))) if index::has_patient_date_index(resource_type) => {
                self.store.scan_patient_dates(resource_type, p, from, to, &mut filter).await
            }
            (p, _) => self.store.scan_current(resource_type, p, &mut filter).await,
        };
        result.map_err(|e| FhirError::unavailable(e.to_string()))
    }

    /// Resources matching `query` as they were at `as_of_ms` (`_asOf`): for each resource, the newest
    /// version written at or before then, unless that version is a deletion. Reads the type's versions
    /// back from that moment, at most [`AS_OF_SCAN`] of them; past that it refuses rather than answer
    /// from part of the history.
    async fn scan_as_of(
        &self,
        resource_type: &str,
        query: &search::SearchQuery,
        as_of_ms: i64,
        visit: &mut (dyn FnMut(ResourceVersion, &Value) -> bool + Send),
    ) -> FhirResult<()> {
        let versions = self
            .store
            .changes(Some(resource_type), i64::MIN, as_of_ms, AS_OF_SCAN + 1)
            .await
            .map_err(|e| FhirError::unavailable(e.to_string()))?;
        if versions.len() > AS_OF_SCAN {
            return Err(FhirError::new(
                422,
                IssueCode::TooCostly,
                format!(
                    "_asOf: more than {AS_OF_SCAN} {resource_type} versions were written by then, more than one search \
                     reads; ask `cairn replay --until` for a store as of that moment, and search it"
                ),
            ));
        }
        let patient = single_patient(resource_type, query);
        let mut seen = std::collections::HashSet::new();
        for v in versions {
            // Newest first: the first version of each resource is the one current at `as_of`.
            if !seen.insert(v.id.clone()) || v.deleted {
                continue;
            }
            if patient.is_some() && v.patient != patient {
                continue;
            }
            if let Some(r) = v.resource_value()
                && search::matches(&r, query)
                && !visit(v, &r)
            {
                break;
            }
        }
        Ok(())
    }

    /// Type-level search; returns a searchset Bundle. Audited: the `fhir.access.search` event, naming
    /// every resource version on the page, is durable before the Bundle is returned.
    pub async fn search(
        &self,
        ctx: &RequestContext,
        resource_type: &str,
        raw_query: &str,
        lenient: bool,
    ) -> FhirResult<Value> {
        let mut patient = None;
        let result = self.search_unaudited(ctx, resource_type, raw_query, lenient, &mut patient).await;
        let (status, returned, total) = match &result {
            Ok((bundle, returned)) => (200, returned.clone(), bundle["total"].as_u64()),
            Err(e) => (e.audit_status(), Vec::new(), None),
        };
        let payload = AccessSearch {
            interaction: "search-type".into(),
            resource_type: Some(resource_type.to_owned()),
            query: raw_query.to_owned(),
            status,
            returned,
            total,
            view: None,
        };
        self.append_access(ctx, payload.into(), patient).await?;
        result.map(|(bundle, _)| bundle)
    }

    async fn search_unaudited(
        &self,
        ctx: &RequestContext,
        resource_type: &str,
        raw_query: &str,
        lenient: bool,
        patient: &mut Option<String>,
    ) -> FhirResult<(Value, Vec<VersionedRef>)> {
        Self::check_readable_type(resource_type)?;
        let permit = ctx.access.permit(Permission::Search, resource_type)?;
        let (mut query, ignored) = search::parse_query(resource_type, raw_query, lenient)
            .map_err(|e| FhirError::new(400, IssueCode::Invalid, e.to_string()))?;
        // A token confined to one patient's compartment searches through that patient's index.
        if let Some(compartment) = permit.sole_compartment()
            && index::has_patient_date_index(resource_type)
            && single_patient(resource_type, &query).is_none()
        {
            let (with_patient, _) = search::parse_query(resource_type, &format!("patient={compartment}"), false)
                .map_err(|e| FhirError::new(500, IssueCode::Exception, e.to_string()))?;
            query.params.extend(with_patient.params);
        }
        *patient = single_patient(resource_type, &query);
        self.caught_up_for(resource_type, None).await?;
        if query.summary_count && query.params.is_empty() && query.as_of.is_none() && permit.is_unrestricted() {
            // A plain count needs no resource read.
            let total =
                self.store.count_current(resource_type).await.map_err(|e| FhirError::unavailable(e.to_string()))?;
            return Ok(bundle::searchset(
                &self.settings.base_url,
                resource_type,
                raw_query,
                &query,
                total as usize,
                0,
                Vec::new(),
                &ignored,
            ));
        }
        let keys = bundle::sort_keys(&query);
        let mut hits = Vec::new();
        self.scan(resource_type, &query, &mut |v, r| {
            if permit.is_unrestricted() || permit.admits(&v.resource_type, v.patient.as_deref(), Some(r)) {
                hits.push(bundle::hit(&v, r, &keys));
            }
            true
        })
        .await?;
        let (start, end) = bundle::page(&mut hits, &keys, &query);
        let mut page = Vec::with_capacity(end - start);
        for h in &hits[start..end] {
            // The version that matched; it is immutable, so it is still there.
            if let Some(v) = self
                .store
                .version(resource_type, &h.id, h.version_id)
                .await
                .map_err(|e| FhirError::unavailable(e.to_string()))?
            {
                page.push(v);
            }
        }
        Ok(bundle::searchset(
            &self.settings.base_url,
            resource_type,
            raw_query,
            &query,
            hits.len(),
            start,
            page,
            &ignored,
        ))
    }

    /// Instance, type or system history (`resource_type`/`id` narrow it). Audited like search.
    pub async fn history(
        &self,
        ctx: &RequestContext,
        resource_type: Option<&str>,
        id: Option<&str>,
        raw_query: &str,
    ) -> FhirResult<Value> {
        let result = self.history_unaudited(ctx, resource_type, id, raw_query).await;
        let (status, returned) = match &result {
            Ok((_, versions)) => (200, versions.iter().map(bundle::version_ref).collect()),
            Err(e) => (e.audit_status(), Vec::new()),
        };
        let patient = match &result {
            Ok((_, versions)) if id.is_some() => versions.iter().find_map(|v| v.patient.clone()),
            _ => None,
        };
        let payload: cairn_events::Payload = match (resource_type, id) {
            (Some(t), Some(id)) => AccessRead {
                interaction: "history-instance".into(),
                resource_type: t.to_owned(),
                id: id.to_owned(),
                status,
                returned,
                view: None,
            }
            .into(),
            (t, _) => AccessSearch {
                interaction: if t.is_some() { "history-type".into() } else { "history-system".into() },
                resource_type: t.map(str::to_owned),
                query: raw_query.to_owned(),
                status,
                total: Some(returned.len() as u64),
                returned,
                view: None,
            }
            .into(),
        };
        self.append_access(ctx, payload, patient).await?;
        result.map(|(bundle, _)| bundle)
    }

    async fn history_unaudited(
        &self,
        ctx: &RequestContext,
        resource_type: Option<&str>,
        id: Option<&str>,
        raw_query: &str,
    ) -> FhirResult<(Value, Vec<ResourceVersion>)> {
        if let Some(t) = resource_type {
            Self::check_readable_type(t)?;
        }
        // Instance history is a read; type and system history are searches. A version is shown
        // only if the token admits it (system history: per type).
        let permission = if id.is_some() { Permission::Read } else { Permission::Search };
        let restricted = match resource_type {
            Some(t) => !ctx.access.permit(permission, t)?.is_unrestricted(),
            None => !matches!(ctx.access, Access::Unrestricted),
        };
        let mut permits: std::collections::HashMap<String, Option<Permit>> = std::collections::HashMap::new();
        let mut admitted = |v: &ResourceVersion| {
            permits
                .entry(v.resource_type.clone())
                .or_insert_with(|| ctx.access.permit(permission, &v.resource_type).ok())
                .as_ref()
                .is_some_and(|p| p.admits_version(v))
        };
        let params = bundle::HistoryParams::parse(raw_query)?;
        let versions = match (resource_type, id) {
            (Some(t), Some(id)) => {
                Self::check_id(id)?;
                self.caught_up_for(t, Some(&format!("{t}/{id}"))).await?;
                let all = self.store.history(t, id).await.map_err(|e| FhirError::unavailable(e.to_string()))?;
                if all.is_empty() {
                    return Err(FhirError::new(404, IssueCode::NotFound, format!("{t}/{id} does not exist")));
                }
                if !all.iter().any(&mut admitted) {
                    return Err(FhirError::concealed(t, id));
                }
                let all: Vec<ResourceVersion> = all.into_iter().filter(|v| admitted(v)).collect();
                let during = match params.at {
                    Some(at) => bundle::current_during(all, at),
                    None => all,
                };
                during
                    .into_iter()
                    .filter(|v| params.since_ms.is_none_or(|s| v.last_updated_ms >= s))
                    .take(params.count)
                    .collect::<Vec<_>>()
            }
            _ => {
                match resource_type {
                    Some(t) => self.caught_up_for(t, None).await?,
                    None => self.caught_up(None).await?,
                }
                let (from, to) = params.window();
                match params.at {
                    // A token that sees only part of the data reads further and filters.
                    None => self
                        .store
                        .changes(resource_type, from, to, if restricted { AT_SCAN } else { params.count })
                        .await
                        .map_err(|e| FhirError::unavailable(e.to_string()))?
                        .into_iter()
                        .filter(|v| admitted(v))
                        .take(params.count)
                        .collect(),
                    // Versions current during the window include ones that started long before it:
                    // read further back (up to AT_SCAN versions) and keep those still current then.
                    Some(at) => {
                        let read = self
                            .store
                            .changes(resource_type, from, to, AT_SCAN)
                            .await
                            .map_err(|e| FhirError::unavailable(e.to_string()))?;
                        bundle::current_during(read, at)
                            .into_iter()
                            .filter(|v| params.since_ms.is_none_or(|s| v.last_updated_ms >= s))
                            .filter(|v| admitted(v))
                            .take(params.count)
                            .collect()
                    }
                }
            }
        };
        Ok((bundle::history(&self.settings.base_url, &versions), versions))
    }
}

/// A new server-assigned id: a UUIDv7, so ids of new resources sort by creation time and the store's
/// B-trees grow at their right edge instead of being rewritten all over (measured: the projector's
/// rebuild rate depends on it).
pub(crate) fn new_resource_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// `W/"3"` or `"3"` -> 3.
pub fn parse_etag(tag: &str) -> Option<u64> {
    let t = tag.trim();
    let t = t.strip_prefix("W/").unwrap_or(t);
    t.strip_prefix('"')?.strip_suffix('"')?.parse().ok()
}

/// The answer to a write whose event the log did not take: 503 (fail closed), saying whether anything
/// may have been stored.
pub(crate) fn append_failed(e: &cairn_log::LogError) -> FhirError {
    match e {
        cairn_log::LogError::OutcomeUnknown(_) => FhirError::unavailable(
            "the event log did not confirm the write in time: it may or may not have been stored; \
             read the resource (or use a conditional create) before sending it again",
        ),
        _ => FhirError::unavailable("the event log cannot accept writes right now; nothing was stored"),
    }
}

/// The one patient a query is confined to, if it names exactly one (`patient=` or `subject=Patient/`).
fn single_patient(resource_type: &str, query: &search::SearchQuery) -> Option<String> {
    if resource_type == "Patient" {
        return None;
    }
    query.params.iter().find_map(|p| {
        if p.modifier.is_some() || p.values.len() != 1 || !(p.name == "patient" || p.name == "subject") {
            return None;
        }
        match &p.values[0] {
            search::SearchValue::Reference { resource_type: t, id } => match (p.name.as_str(), t.as_deref()) {
                ("patient", None | Some("Patient")) | ("subject", Some("Patient")) => Some(format!("Patient/{id}")),
                _ => None,
            },
            _ => None,
        }
    })
}
