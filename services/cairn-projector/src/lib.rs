//! Projectors: turn the log into the stores the API reads.
//!
//! Each projection ([`Projection`]) is a pure function from an event to stored versions
//! ([`resources::project`] for the FHIR resources, [`audit::project`] for AuditEvent and Provenance) plus
//! a runner ([`Projector`]) that tails every partition of its topic, applies what is available in one
//! store transaction together with the new checkpoints, and publishes how far it got, so that readers
//! can wait for their own writes (read-your-writes).

pub mod audit;
pub mod resources;

use cairn_events::topics;
use cairn_store::ResourceVersion;

/// One projection: the topic it reads, the key its checkpoints are stored under (one per topic and
/// projection, so several projections of one topic share a store), the Kafka consumer group its
/// processes share partitions in, and the function from an event to versions.
pub struct Projection {
    pub name: &'static str,
    pub topic: &'static str,
    pub checkpoint_key: &'static str,
    pub group: &'static str,
    pub project: fn(cairn_events::Event) -> Vec<ResourceVersion>,
}

/// The FHIR resources (Observation, Patient, Device) from their write events, and with each write
/// its AuditEvent and Provenance: one store transaction for the three, so the audit trail of writes
/// costs ingestion no extra commit (measured: a separate projection of the same topic halved the
/// embedded create rate, docs/performance.md).
pub const RESOURCES: Projection = Projection {
    name: "resources",
    topic: topics::FHIR,
    // Named before there were other projections; kept so existing stores resume where they were.
    checkpoint_key: topics::FHIR,
    group: "cairn-projector-resources",
    project: |e| {
        let mut versions = audit::project(&e);
        versions.extend(resources::project(e));
        versions
    },
};

/// The rest of the audit trail: AuditEvents for every access and refusal (`cairn.access`) and every
/// authentication decision (`cairn.auth`), one projection per topic.
pub const AUDIT: [Projection; 2] = [
    Projection {
        name: "audit-access",
        topic: topics::ACCESS,
        checkpoint_key: "audit/cairn.access",
        group: "cairn-projector-audit-access",
        project: |e| audit::project(&e),
    },
    Projection {
        name: "audit-auth",
        topic: topics::AUTH,
        checkpoint_key: "audit/cairn.auth",
        group: "cairn-projector-audit-auth",
        project: |e| audit::project(&e),
    },
];

use cairn_log::{EventLog, Record, Tailed};
use cairn_store::{Checkpoint, ResourceStore};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How far a projector has applied each partition of its topic (next offset per partition).
#[derive(Clone)]
pub struct Progress {
    rx: watch::Receiver<Vec<u64>>,
}

impl Progress {
    /// Progress that is always complete: for a store no projector writes any more (a replay).
    pub fn complete(partitions: u32) -> Progress {
        let (tx, rx) = watch::channel(vec![u64::MAX; partitions as usize]);
        // Kept open for good, so waiting on it never sees a closed channel.
        std::mem::forget(tx);
        Progress { rx }
    }

    pub fn snapshot(&self) -> Vec<u64> {
        self.rx.borrow().clone()
    }

    /// Waits until every partition `p` has been applied up to `targets[p]` (exclusive). False on
    /// timeout or if the projector stopped.
    pub async fn wait_for(&self, targets: &[u64], timeout: Duration) -> bool {
        let mut rx = self.rx.clone();
        let reached = |v: &Vec<u64>| targets.iter().zip(v.iter()).all(|(t, have)| have >= t);
        matches!(tokio::time::timeout(timeout, rx.wait_for(reached)).await, Ok(Ok(_)))
    }
}

/// Runs one [`Projection`] until the log closes. Commits are made durable at most every
/// `durable_every`; in between they are atomic and visible, and a crash replays from the last
/// durable checkpoint.
pub struct Projector {
    log: Arc<dyn EventLog>,
    store: Arc<dyn ResourceStore>,
    projection: &'static Projection,
    progress: watch::Sender<Vec<u64>>,
    durable_every: Duration,
}

/// Registers the projectors' metrics with the installed recorder.
pub fn describe_metrics() {
    metrics::describe_histogram!(
        "cairn_projection_lag_seconds",
        metrics::Unit::Seconds,
        "Time from an event's append (the log's timestamp) to the start of its projection"
    );
    metrics::describe_histogram!(
        "cairn_projection_batch_records",
        metrics::Unit::Count,
        "Log records applied in one store transaction, at most 16384 (more per transaction: fewer commits per record; at the cap: the projection runs behind)"
    );
    for p in std::iter::once(&RESOURCES).chain(&AUDIT) {
        let _ = metrics::histogram!("cairn_projection_lag_seconds", "projection" => p.name);
        let _ = metrics::histogram!("cairn_projection_batch_records", "projection" => p.name);
    }
}

/// How [`Projector::follow`] ended.
enum Follow {
    Reassigned,
    Ended,
}

/// Records taken into one store transaction at most. Only a projector behind the log fills a
/// transaction; one that keeps up takes what has arrived. Behind the log, larger transactions write
/// the pages shared by many records (each patient's place in the patient and date indexes, the ends
/// of the time-ordered tables) once per transaction rather than once per few records: with 1,000
/// patients a rebuild ran 12.2 k events/s at 2,048 and 16.2 k/s at 16,384, and a live projector
/// behind a batch load 8.2-8.6 k/s against 10-13 k/s (docs/performance.md, "Larger projector
/// transactions"). Memory bounds it: a transaction's records and versions take about 100 MB here,
/// and a catch-up also holds up to [`READ_AHEAD_RECORDS`] records per partition read ahead.
pub const BATCH_RECORDS: usize = 16384;

/// Records a catch-up reads from one partition at a time, ahead of merging the partitions.
const READ_AHEAD_RECORDS: usize = 2048;

impl Projector {
    pub async fn new(
        log: Arc<dyn EventLog>,
        store: Arc<dyn ResourceStore>,
        projection: &'static Projection,
    ) -> Result<(Self, Progress), ProjectorError> {
        let partitions = log.partitions(projection.topic)?;
        let mut start = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            start.push(store.checkpoint(projection.checkpoint_key, p).await?.unwrap_or(0));
        }
        let (tx, rx) = watch::channel(start);
        let projector = Projector { log, store, projection, progress: tx, durable_every: Duration::from_secs(1) };
        Ok((projector, Progress { rx }))
    }

    /// Applies everything already in the log, then returns (used by rebuilds and tests).
    pub async fn catch_up(&self) -> Result<(), ProjectorError> {
        self.catch_up_until(&|_| true, &mut |_| {}).await.map(|_| ())
    }

    /// Applies the log from the store's checkpoints up to a cut: in each partition, up to the first
    /// record `keep` refuses (a replay "as of" a moment, `cairn replay`). Calls `applied` with the
    /// number of records of each batch. Returns the next offset of every partition at the cut.
    ///
    /// The partitions are read ahead [`READ_AHEAD_RECORDS`] at a time and merged in log-time order,
    /// as the live projector meets them. Ids, dates and
    /// change entries grow with time, so the store then inserts near the end of each index; taking
    /// the partitions one after another made every partition after the first insert into the middle
    /// of everything the earlier ones had built (twice as slow, and 2.5 times the bytes written
    /// for the same store: docs/performance.md, "Rebuilds merge the partitions by log time").
    ///
    /// Two batches are in flight: while the store writes one (on a blocking thread), the next is read
    /// and projected, so a rebuild keeps both cores busy.
    pub async fn catch_up_until(
        &self,
        keep: &(dyn Fn(&Record) -> bool + Sync),
        applied: &mut (dyn FnMut(usize) + Send),
    ) -> Result<Vec<u64>, ProjectorError> {
        let mut cursor = self.progress.borrow().clone();
        let mut partitions: Vec<ReadAhead> = cursor
            .iter()
            .map(|&next| ReadAhead { records: VecDeque::new(), next_read: next, finished: false })
            .collect();
        let mut last_durable = Instant::now();
        let mut in_flight: Option<tokio::task::JoinHandle<Result<Batch, ProjectorError>>> = None;
        loop {
            let mut records = Vec::with_capacity(BATCH_RECORDS);
            while records.len() < BATCH_RECORDS {
                let next = next_in_log_time(&mut partitions, &*self.log, self.projection.topic, keep).await?;
                let Some(record) = next else { break };
                records.push(record);
            }
            if records.is_empty() {
                break;
            }
            let batch = self.prepare(&records, &[], &cursor);
            cursor.clone_from(&batch.next);
            if let Some(previous) = in_flight.take() {
                self.finish(previous, applied).await?;
            }
            let durable = last_durable.elapsed() >= self.durable_every;
            if durable {
                last_durable = Instant::now();
            }
            in_flight = Some(self.write(batch, durable));
        }
        if let Some(previous) = in_flight.take() {
            self.finish(previous, applied).await?;
        }
        self.apply(&[], true).await?;
        Ok(self.progress.borrow().clone())
    }

    /// Waits for a batch the store is writing, then publishes the progress it made.
    async fn finish(
        &self,
        writing: tokio::task::JoinHandle<Result<Batch, ProjectorError>>,
        applied: &mut (dyn FnMut(usize) + Send),
    ) -> Result<(), ProjectorError> {
        let batch = writing.await.map_err(|e| ProjectorError::Stopped(e.to_string()))??;
        self.progress.send_replace(batch.next);
        applied(batch.records);
        Ok(())
    }

    /// Tails the partitions the log assigns to this process (every partition, unless several
    /// projector processes share the topic through a Kafka consumer group) forever, applying in
    /// batches. When the assignment changes, tails restart from the store's checkpoints, so a
    /// partition taken over from a dead process resumes where that process's last write left it
    /// (re-applying a little is harmless: applying is idempotent).
    pub async fn run(self) -> Result<(), ProjectorError> {
        let (name, topic) = (self.projection.name, self.projection.topic);
        let mut assignments = self.log.assignments(self.projection.group, topic);
        let Some(first) = assignments.next().await else { return Ok(()) };
        let mut assigned = first?;
        let mut last_durable = Instant::now();
        let mut failures = 0u32;
        loop {
            match self.follow(&mut assignments, &mut assigned, &mut last_durable).await {
                Ok(Follow::Reassigned) => {
                    failures = 0;
                    tracing::info!(projection = name, topic, partitions = ?assigned, "projector: assignment changed");
                }
                Ok(Follow::Ended) => return Ok(()),
                // A store or log that fails (a database node restarting, a broker away) must not stop
                // the projection for good: wait, then start again from the store's checkpoints.
                // Applying is idempotent, so nothing is lost or doubled. Readers answer 503 meanwhile.
                Err(e) => {
                    failures += 1;
                    let wait = Duration::from_millis(100 * 2u64.pow(failures.min(6)));
                    tracing::error!(projection = name, error = %e, retry_in_ms = wait.as_millis() as u64, "projector: failed; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Tails the assigned partitions from the store's checkpoints until the assignment changes, the
    /// log ends, or something fails.
    async fn follow(
        &self,
        assignments: &mut BoxStream<'static, cairn_log::Result<Vec<u32>>>,
        assigned: &mut Vec<u32>,
        last_durable: &mut Instant,
    ) -> Result<Follow, ProjectorError> {
        let mut next = self.progress.borrow().clone();
        let mut from = Vec::with_capacity(assigned.len());
        for &p in assigned.iter() {
            let stored = self.store.checkpoint(self.projection.checkpoint_key, p).await?.unwrap_or(0);
            let slot = &mut next[p as usize];
            *slot = (*slot).max(stored);
            from.push((p, *slot));
        }
        self.progress.send_replace(next);
        let mut merged = self.log.tail_partitions(self.projection.topic, &from);
        loop {
            let first = tokio::select! {
                change = assignments.next() => match change {
                    Some(change) => {
                        *assigned = change?;
                        return Ok(Follow::Reassigned);
                    }
                    None => return Ok(Follow::Ended),
                },
                item = merged.next(), if !assigned.is_empty() => match item {
                    Some(item) => item?,
                    None => return Ok(Follow::Ended),
                },
            };
            let mut batch = vec![first];
            while batch.len() < BATCH_RECORDS {
                match futures_util::FutureExt::now_or_never(merged.next()) {
                    Some(Some(r)) => batch.push(r?),
                    _ => break,
                }
            }
            let mut records = Vec::with_capacity(batch.len());
            let mut passed = Vec::new();
            for item in batch {
                match item {
                    Tailed::Record(r) => records.push(r),
                    Tailed::Passed { partition, next_offset } => passed.push((partition, next_offset)),
                }
            }
            let durable = last_durable.elapsed() >= self.durable_every;
            self.apply_passing(&records, &passed, durable).await?;
            if durable {
                *last_durable = Instant::now();
            }
        }
    }

    async fn apply(&self, records: &[Record], durable: bool) -> Result<(), ProjectorError> {
        self.apply_passing(records, &[], durable).await
    }

    /// Applies `records`, then moves each partition in `passed` to at least its offset (the reader
    /// passed offsets that hold no record, such as Kafka's transaction markers).
    async fn apply_passing(
        &self,
        records: &[Record],
        passed: &[(u32, u64)],
        durable: bool,
    ) -> Result<(), ProjectorError> {
        let before = self.progress.borrow().clone();
        let batch = self.prepare(records, passed, &before);
        let batch = self.write(batch, durable).await.map_err(|e| ProjectorError::Stopped(e.to_string()))??;
        self.progress.send_replace(batch.next);
        Ok(())
    }

    /// Writes a batch to the store on a blocking thread. The embedded store writes synchronously,
    /// and a commit on one of the runtime's workers (two, on two cores) would hold up every request
    /// queued behind it.
    fn write(&self, batch: Batch, durable: bool) -> tokio::task::JoinHandle<Result<Batch, ProjectorError>> {
        // Commits that only move checkpoints (Kafka's transaction markers, the end of a catch-up)
        // are left out: the figure is about the records a commit carries.
        if batch.records > 0 {
            metrics::histogram!("cairn_projection_batch_records", "projection" => self.projection.name)
                .record(batch.records as f64);
        }
        let store = self.store.clone();
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            runtime.block_on(store.apply(&batch.versions, &batch.checkpoints, durable))?;
            Ok(batch)
        })
    }

    /// Projects `records` into what one store write takes: their versions, and the checkpoints of the
    /// partitions they (or `passed`) move beyond `before`.
    fn prepare(&self, records: &[Record], passed: &[(u32, u64)], before: &[u64]) -> Batch {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let lag = metrics::histogram!("cairn_projection_lag_seconds", "projection" => self.projection.name);
        for r in records {
            lag.record((now_ms - r.timestamp_ms).max(0) as f64 / 1000.0);
        }
        let mut versions = Vec::with_capacity(records.len());
        let mut next = before.to_vec();
        for r in records {
            match cairn_events::Event::from_canonical_bytes(&r.value) {
                Ok(event) => versions.extend((self.projection.project)(event)),
                // A record this build cannot read is skipped loudly, never silently: the checkpoint
                // still advances so one bad record cannot stall every reader.
                Err(e) => {
                    tracing::error!(projection = self.projection.name, topic = %r.topic, partition = r.partition, offset = r.offset, error = %e, "unreadable event skipped by the projector")
                }
            }
            let slot = &mut next[r.partition as usize];
            *slot = (*slot).max(r.offset + 1);
        }
        for &(partition, offset) in passed {
            let slot = &mut next[partition as usize];
            *slot = (*slot).max(offset);
        }
        // Only the partitions this batch moved: with several projector processes, writing the others'
        // partitions from this process's (stale) view would overwrite their newer checkpoints.
        let checkpoints: Vec<Checkpoint> = next
            .iter()
            .enumerate()
            .filter(|&(p, &o)| o != before[p])
            .map(|(p, &o)| Checkpoint {
                topic: self.projection.checkpoint_key.to_owned(),
                partition: p as u32,
                next_offset: o,
            })
            .collect();
        Batch { versions, checkpoints, next, records: records.len() }
    }
}

/// Records read from one partition ahead of a catch-up's merge.
struct ReadAhead {
    records: VecDeque<Record>,
    /// Where the next read of the partition starts.
    next_read: u64,
    /// Nothing more to read: the partition's end, or the cut.
    finished: bool,
}

/// The catch-up's next record in log-time order: refills each partition that ran dry, then takes
/// the earliest head. `None` once every partition is finished and drained.
async fn next_in_log_time(
    partitions: &mut [ReadAhead],
    log: &dyn EventLog,
    topic: &str,
    keep: &(dyn Fn(&Record) -> bool + Sync),
) -> Result<Option<Record>, ProjectorError> {
    for (p, ahead) in partitions.iter_mut().enumerate() {
        if ahead.records.is_empty() && !ahead.finished {
            ahead.refill(log, topic, p as u32, keep).await?;
        }
    }
    Ok(pop_earliest(partitions))
}

/// Takes the earliest record at the head of any partition (ties: the lower partition).
fn pop_earliest(partitions: &mut [ReadAhead]) -> Option<Record> {
    let (_, p) = partitions
        .iter()
        .enumerate()
        .filter_map(|(p, ahead)| ahead.records.front().map(|r| (r.timestamp_ms, p)))
        .min()?;
    partitions[p].records.pop_front()
}

impl ReadAhead {
    async fn refill(
        &mut self,
        log: &dyn EventLog,
        topic: &str,
        partition: u32,
        keep: &(dyn Fn(&Record) -> bool + Sync),
    ) -> Result<(), ProjectorError> {
        let records = log.read(topic, partition, self.next_read, READ_AHEAD_RECORDS).await?;
        let kept = records.iter().position(|r| !keep(r)).unwrap_or(records.len());
        self.finished = kept < records.len() || records.is_empty();
        if let Some(last) = records[..kept].last() {
            self.next_read = last.offset + 1;
        }
        self.records.extend(records.into_iter().take(kept));
        Ok(())
    }
}

/// One store write: the versions projected from some records, the checkpoints they move, and the
/// progress once written.
struct Batch {
    versions: Vec<ResourceVersion>,
    checkpoints: Vec<Checkpoint>,
    next: Vec<u64>,
    records: usize,
}

/// Progress as the store records it: each partition's checkpoint, whoever wrote it (this process's
/// projector, or projector processes elsewhere), merged with `local` progress when this process runs a
/// projector too. Polled every `every`; an API process without a projector waits on this for
/// read-your-writes.
pub fn follow_checkpoints(
    store: Arc<dyn ResourceStore>,
    projection: &'static Projection,
    partitions: u32,
    local: Option<Progress>,
    every: Duration,
) -> Progress {
    let (tx, rx) =
        watch::channel(local.as_ref().map(Progress::snapshot).unwrap_or_else(|| vec![0; partitions as usize]));
    let topic = projection.checkpoint_key;
    tokio::spawn(async move {
        let mut local_rx = local.map(|l| l.rx);
        let mut stored = vec![0u64; partitions as usize];
        let mut poll_store = true;
        loop {
            if poll_store {
                for p in 0..partitions {
                    match store.checkpoint(topic, p).await {
                        Ok(Some(o)) => stored[p as usize] = o,
                        Ok(None) => {}
                        Err(e) => tracing::warn!(error = %e, "reading projector checkpoints"),
                    }
                }
            }
            let local_now = local_rx.as_ref().map(|r| r.borrow().clone());
            // Never move backwards (a slower process may write an older checkpoint after a newer one).
            let current = tx.borrow().clone();
            let merged: Vec<u64> = (0..partitions as usize)
                .map(|p| current[p].max(stored[p]).max(local_now.as_ref().map_or(0, |l| l[p])))
                .collect();
            if merged != current {
                tx.send_replace(merged);
            }
            if tx.is_closed() {
                return;
            }
            let mut local_stopped = false;
            poll_store = match &mut local_rx {
                Some(r) => tokio::select! {
                    changed = r.changed() => {
                        local_stopped = changed.is_err();
                        local_stopped
                    }
                    _ = tokio::time::sleep(every) => true,
                },
                None => {
                    tokio::time::sleep(every).await;
                    true
                }
            };
            if local_stopped {
                local_rx = None;
            }
        }
    });
    Progress { rx }
}

/// Why a projector stopped: it could not read the log or could not write its store. Either way it
/// stops rather than skip ahead, and readers fail closed (503) once it falls behind.
#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error("reading the log: {0}")]
    Log(#[from] cairn_log::LogError),
    #[error("writing the store: {0}")]
    Store(#[from] cairn_store::StoreError),
    #[error("the store writer stopped: {0}")]
    Stopped(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(partition: u32, offset: u64, timestamp_ms: i64) -> Record {
        Record {
            topic: "t".into(),
            partition,
            offset,
            timestamp_ms,
            key: Vec::new(),
            value: Vec::new(),
            prev_hash: None,
            hash: None,
        }
    }

    fn ahead(records: Vec<Record>) -> ReadAhead {
        ReadAhead { records: records.into(), next_read: 0, finished: true }
    }

    /// A catch-up applies the partitions merged by log time, each partition in offset order.
    #[test]
    fn read_ahead_partitions_merge_in_log_time_order() {
        let mut partitions = vec![
            ahead(vec![record(0, 0, 10), record(0, 1, 30), record(0, 2, 30), record(0, 3, 50)]),
            ahead(vec![]),
            ahead(vec![record(2, 7, 5), record(2, 8, 30), record(2, 9, 40)]),
        ];
        let mut merged = Vec::new();
        while let Some(r) = pop_earliest(&mut partitions) {
            merged.push((r.partition, r.offset));
        }
        assert_eq!(merged, vec![(2, 7), (0, 0), (0, 1), (0, 2), (2, 8), (2, 9), (0, 3)]);
    }
}
