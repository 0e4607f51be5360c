//! The event log: Cairn's single source of truth.
//!
//! [`EventLog`] is shaped after Kafka's model so that the Kafka backend implements it without any
//! caller changing: named topics split into partitions, a record's partition chosen from its key
//! (Kafka's murmur2 partitioner, so both backends route a key to the same partition), dense
//! increasing offsets per partition, appends acknowledged only once durable, atomic batches, reads
//! from an offset, tailing, and committed offsets per consumer group.
//!
//! Every partition is a hash chain ([`chain`]): `hash = SHA-256(prev_hash || SHA-256(value))`, starting from
//! a genesis hash bound to the topic and partition, so altering, removing or reordering any record
//! is caught by [`verify`].
//!
//! The log moves opaque bytes; it knows nothing of FHIR or of the event envelope (`cairn-events`
//! encodes events into the values). The [`embedded`] backend keeps everything in segment files under
//! one directory.

pub mod chain;
pub mod embedded;
mod frame;
mod partitioner;
pub mod proof;
pub mod seal;
mod segment;
pub mod verify;

pub use chain::Hash;
pub use partitioner::partition_for_key;

use async_trait::async_trait;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use std::path::PathBuf;

/// Where an appended record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    pub partition: u32,
    pub offset: u64,
}

/// A record to append. Its partition is chosen from `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecord {
    pub topic: String,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

impl NewRecord {
    pub fn new(topic: impl Into<String>, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        NewRecord { topic: topic.into(), key: key.into(), value: value.into() }
    }
}

/// A record as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    /// When the log accepted the record (milliseconds since the Unix epoch). Events carry their own
    /// `occurred_at`; this is the log's clock.
    pub timestamp_ms: i64,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// The chain link before this record. Backends that chain at append (embedded) always set it.
    pub prev_hash: Option<Hash>,
    pub hash: Option<Hash>,
}

/// What a tail delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tailed {
    Record(Record),
    /// The reader has passed every offset below `next_offset` of `partition`. Kafka gives offsets to
    /// transaction markers that are never delivered as records; a reader learns it has passed them
    /// (and so is caught up with the partition's end offset) only from this. The embedded backend
    /// has no gaps and never sends it.
    Passed {
        partition: u32,
        next_offset: u64,
    },
}

/// A topic and its partition count.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TopicInfo {
    pub name: String,
    pub partitions: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("unknown topic `{0}`")]
    UnknownTopic(String),
    #[error("topic `{topic}` has {partitions} partitions; there is no partition {partition}")]
    UnknownPartition { topic: String, partition: u32, partitions: u32 },
    #[error("topic `{topic}` already exists with {existing} partitions (asked for {requested})")]
    TopicMismatch { topic: String, existing: u32, requested: u32 },
    #[error("invalid name `{0}`: use 1-249 characters of A-Z a-z 0-9 . _ -")]
    InvalidName(String),
    #[error("a topic needs between 1 and 1024 partitions, not {0}")]
    InvalidPartitionCount(u32),
    #[error("batch of {size} bytes exceeds the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("empty batch")]
    EmptyBatch,
    #[error("{path}: {problem}")]
    DataDir { path: PathBuf, problem: String },
    #[error("{path}: data directory is in use by another process ({holder})")]
    Locked { path: PathBuf, holder: String },
    #[error("{path}: corrupt log at byte {position}: {detail}")]
    Corrupt { path: PathBuf, position: u64, detail: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A write or fsync failed earlier. The log refuses every later append (fail closed) until the
    /// process restarts and re-validates the files.
    #[error("the event log failed and refuses appends until restart: {0}")]
    Failed(String),
    /// The log's backend is unreachable or failing for now (a Kafka broker away, a query that timed
    /// out): this call failed, later ones may succeed. Nothing of this call was stored.
    #[error("the event log is unavailable: {0}")]
    Unavailable(String),
    /// The append may or may not have become durable (a Kafka commit that did not answer in time and
    /// may still complete). The caller must not say "nothing was stored".
    #[error("the outcome of the append is unknown: {0}")]
    OutcomeUnknown(String),
    #[error("the event log is read-only")]
    ReadOnly,
    #[error("the event log is shut down")]
    Closed,
}

impl LogError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> LogError {
        LogError::Io { path: path.into(), source }
    }
}

pub type Result<T, E = LogError> = std::result::Result<T, E>;

/// The durable, partitioned, chained event log.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Creates a topic; succeeds without change if it already exists with the same partition count.
    async fn create_topic(&self, topic: &str, partitions: u32) -> Result<()>;

    fn topics(&self) -> Vec<TopicInfo>;

    fn partitions(&self, topic: &str) -> Result<u32>;

    /// The partition a key is routed to.
    fn partition_for(&self, topic: &str, key: &[u8]) -> Result<u32> {
        Ok(partition_for_key(key, self.partitions(topic)?))
    }

    /// Appends one record; returns only once it is durable.
    async fn append(&self, record: NewRecord) -> Result<Position> {
        let mut positions = self.append_batch(vec![record]).await?;
        Ok(positions.pop().expect("one record in, one position out"))
    }

    /// Appends records atomically: after a crash either all of them are in the log or none is. The
    /// records may span topics and partitions. Returns positions in input order, once durable.
    async fn append_batch(&self, records: Vec<NewRecord>) -> Result<Vec<Position>>;

    /// Up to `max` durable records of one partition, starting at `from` (fewer at the end).
    async fn read(&self, topic: &str, partition: u32, from: u64, max: usize) -> Result<Vec<Record>>;

    /// The offset the next record of the partition will get (Kafka's high watermark): every offset
    /// below it is durable, and a reader that has passed it has read every record acknowledged before
    /// the call. Offsets may have gaps (Kafka's transaction markers), so compare it with positions a
    /// reader reports ([`Tailed::Passed`]), not with a count of records.
    async fn end_offset(&self, topic: &str, partition: u32) -> Result<u64>;

    /// Every record of the partition from `from` on, waiting for new ones forever.
    fn tail(&self, topic: &str, partition: u32, from: u64) -> BoxStream<'static, Result<Tailed>>;

    /// Several partitions of one topic tailed at once, each from its own offset, merged (each
    /// partition's records stay in order). Kafka serves them with one consumer instead of one per
    /// partition; the default merges single-partition tails.
    fn tail_partitions(&self, topic: &str, from: &[(u32, u64)]) -> BoxStream<'static, Result<Tailed>> {
        Box::pin(futures_util::stream::select_all(from.iter().map(|&(p, offset)| self.tail(topic, p, offset))))
    }

    /// The partitions of `topic` this process should work on as a member of consumer group `group`,
    /// each time they change (the first item is the first assignment). Kafka shares a topic's
    /// partitions among the group's live members and moves a member's partitions to the others when it
    /// dies; the embedded log serves one process, which gets every partition once. Dropping the stream
    /// leaves the group.
    fn assignments(&self, group: &str, topic: &str) -> BoxStream<'static, Result<Vec<u32>>> {
        let all = validate_name(group).and_then(|()| self.partitions(topic)).map(|n| (0..n).collect());
        Box::pin(futures_util::stream::once(async move { all }).chain(futures_util::stream::pending()))
    }

    /// Durably records that `group` has processed the partition up to (not including) `next_offset`.
    async fn commit_offset(&self, group: &str, topic: &str, partition: u32, next_offset: u64) -> Result<()>;

    async fn committed_offset(&self, group: &str, topic: &str, partition: u32) -> Result<Option<u64>>;
}

/// Registers the log's metrics with the installed recorder, so they are exported (at zero) before
/// the first append.
pub fn describe_metrics() {
    metrics::describe_histogram!(
        "cairn_log_append_seconds",
        metrics::Unit::Seconds,
        "Append latency, request to durable acknowledgement"
    );
    metrics::describe_histogram!(
        "cairn_log_fsync_seconds",
        metrics::Unit::Seconds,
        "Duration of one group commit (write and fdatasync)"
    );
    metrics::describe_histogram!(
        "cairn_log_fsync_batch_records",
        metrics::Unit::Count,
        "Records made durable by one fdatasync"
    );
    metrics::describe_counter!("cairn_log_appended_records_total", metrics::Unit::Count, "Records appended");
    let _ = metrics::histogram!("cairn_log_append_seconds");
    let _ = metrics::histogram!("cairn_log_fsync_seconds");
    let _ = metrics::histogram!("cairn_log_fsync_batch_records");
    let _ = metrics::counter!("cairn_log_appended_records_total");
}

/// Topic and consumer-group names follow Kafka's rules, so a name valid here is valid there.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(LogError::InvalidName(name.to_owned())) }
}

#[cfg(test)]
mod tests;
