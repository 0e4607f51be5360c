//! The live server's event log, used from another process through its admin socket
//! (`run/admin.sock`). The embedded log has one writer: a second process on the same data
//! directory (`cairn serve --read-only`, which shows a replayed store) appends its access events
//! and follows `cairn.auth` through the process that holds the log. An append answers only once the
//! live server has made it durable, so the viewer's "audited before the answer" holds as it does
//! there.
//!
//! One JSON request per connection, `{"log": {...}}`, answered `{"ok": ...}` or `{"error": "..."}`
//! like every admin command. Appends are accepted only as access events of a view: each record must
//! decode as `fhir.access.*` or `fhir.request.refused` naming its replay (`view`), with the topic and
//! key the event itself routes to and a time near now.

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use cairn_log::{EventLog, LogError, NewRecord, Position, Record, Tailed, TopicInfo};
use futures_util::stream::BoxStream;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// A request about the log on the admin socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum LogRequest {
    /// The log's topics and the server's token issuer.
    Describe,
    Append {
        records: Vec<WireNewRecord>,
    },
    /// With `wait_ms`, a read that finds nothing waits (at most that long) for the next record:
    /// a long poll, so a view learns of a revocation as soon as the live server has it.
    Read {
        topic: String,
        partition: u32,
        from: u64,
        max: usize,
        #[serde(default)]
        wait_ms: u64,
    },
    End {
        topic: String,
        partition: u32,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WireNewRecord {
    topic: String,
    /// base64
    key: String,
    /// base64
    value: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WireRecord {
    topic: String,
    partition: u32,
    offset: u64,
    timestamp_ms: i64,
    key: String,
    value: String,
}

/// The most records one read answers, and about the most bytes (a reply is one line in memory on
/// both sides; at least one record is always sent).
const MAX_READ: usize = 2000;
const MAX_READ_BYTES: usize = 16 << 20;
/// How far an appended access event's time may be from the server's clock.
const MAX_SKEW_MS: i64 = 5 * 60 * 1000;
/// How long a caught-up tail's read waits at the live server for the next record (a long poll), and
/// the longest wait the server grants.
const TAIL_WAIT_MS: u64 = 1000;
const MAX_WAIT_MS: u64 = 5000;
/// How long a tail waits after a failed read before it tries again.
const TAIL_RETRY: Duration = Duration::from_millis(200);

/// Answers a [`LogRequest`] from the admin socket with the server's own log.
pub async fn answer(log: &Arc<dyn EventLog>, issuer: &str, request: LogRequest) -> Result<Value, String> {
    let e = |e: LogError| e.to_string();
    Ok(match request {
        LogRequest::Describe => json!({"issuer": issuer, "topics": log.topics()}),
        LogRequest::Append { records } => {
            let mut batch = Vec::with_capacity(records.len());
            for r in records {
                let decode = |s: &str| STANDARD.decode(s).map_err(|_| "a record is not base64".to_owned());
                let record = NewRecord { topic: r.topic, key: decode(&r.key)?, value: decode(&r.value)? };
                check_view_access(&record)?;
                batch.push(record);
            }
            let positions = log.append_batch(batch).await.map_err(e)?;
            json!(positions.iter().map(|p| json!({"partition": p.partition, "offset": p.offset})).collect::<Vec<_>>())
        }
        LogRequest::Read { topic, partition, from, max, wait_ms } => {
            let mut records = log.read(&topic, partition, from, max.min(MAX_READ)).await.map_err(e)?;
            if records.is_empty() && wait_ms > 0 {
                let wait = Duration::from_millis(wait_ms.min(MAX_WAIT_MS));
                let mut tail = log.tail(&topic, partition, from);
                if let Ok(Some(Ok(_))) = tokio::time::timeout(wait, futures_util::StreamExt::next(&mut tail)).await {
                    records = log.read(&topic, partition, from, max.min(MAX_READ)).await.map_err(e)?;
                }
            }
            let mut bytes = 0;
            let wire: Vec<WireRecord> = records
                .into_iter()
                .take_while(|r| {
                    let first = bytes == 0;
                    bytes += r.value.len() + r.key.len() + 64;
                    first || bytes <= MAX_READ_BYTES
                })
                .map(|r| WireRecord {
                    topic: r.topic,
                    partition: r.partition,
                    offset: r.offset,
                    timestamp_ms: r.timestamp_ms,
                    key: STANDARD.encode(&r.key),
                    value: STANDARD.encode(&r.value),
                })
                .collect();
            json!(wire)
        }
        LogRequest::End { topic, partition } => json!(log.end_offset(&topic, partition).await.map_err(e)?),
    })
}

/// What a view may append: its own access events, as they would be routed, recorded now.
pub(crate) fn check_view_access(record: &NewRecord) -> Result<(), String> {
    let event = cairn_events::Event::from_canonical_bytes(&record.value)
        .map_err(|e| format!("not an event this server writes: {e}"))?;
    let view = match &event.payload {
        cairn_events::Payload::AccessRead(a) => &a.view,
        cairn_events::Payload::AccessSearch(a) => &a.view,
        cairn_events::Payload::RequestRefused(r) => &r.view,
        _ => return Err(format!("{} is not an access event", event.event_type())),
    };
    if view.is_none() {
        return Err("an access event appended through the admin socket must name its view".into());
    }
    if record.topic != event.topic() || record.key != event.partition_key().as_bytes() {
        return Err("the record's topic or key is not the event's own".into());
    }
    if (event.occurred_at.as_millis() - cairn_events::Timestamp::now().as_millis()).abs() > MAX_SKEW_MS {
        return Err("the event's time is not now".into());
    }
    Ok(())
}

struct Inner {
    socket: PathBuf,
    topics: Vec<TopicInfo>,
}

/// The live server's log, through its admin socket.
#[derive(Clone)]
pub struct RemoteLog {
    inner: Arc<Inner>,
    /// The live server's token issuer (its public URL).
    pub issuer: String,
}

#[derive(Deserialize)]
struct Described {
    issuer: String,
    topics: Vec<TopicInfo>,
}

impl RemoteLog {
    /// Connects to the server answering on `socket`; an error if none does.
    pub async fn connect(socket: &Path) -> anyhow::Result<RemoteLog> {
        let described: Described = call(socket, &LogRequest::Describe).await.map_err(|e| {
            anyhow::anyhow!(
                "the live server's admin socket {}: {e} (cairn serve --read-only records its accesses in the live log through the running server: start it first)",
                socket.display()
            )
        })?;
        Ok(RemoteLog {
            inner: Arc::new(Inner { socket: socket.to_owned(), topics: described.topics }),
            issuer: described.issuer,
        })
    }

    async fn read_records(
        inner: &Inner,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
        wait_ms: u64,
    ) -> cairn_log::Result<Vec<Record>> {
        let request = LogRequest::Read { topic: topic.to_owned(), partition, from, max, wait_ms };
        let wire: Vec<WireRecord> =
            call(&inner.socket, &request).await.map_err(|e| LogError::Unavailable(e.message))?;
        wire.into_iter()
            .map(|w| {
                let decode =
                    |s: &str| STANDARD.decode(s).map_err(|_| LogError::Unavailable("a record is not base64".into()));
                Ok(Record {
                    key: decode(&w.key)?,
                    value: decode(&w.value)?,
                    topic: w.topic,
                    partition: w.partition,
                    offset: w.offset,
                    timestamp_ms: w.timestamp_ms,
                    prev_hash: None,
                    hash: None,
                })
            })
            .collect()
    }
}

/// Why a call failed, and whether the request had reached the server (then an append may have been
/// made durable although no answer came back).
#[derive(Debug)]
struct CallError {
    sent: bool,
    message: String,
}

impl CallError {
    fn before(message: impl Into<String>) -> CallError {
        CallError { sent: false, message: message.into() }
    }
    fn after(message: impl Into<String>) -> CallError {
        CallError { sent: true, message: message.into() }
    }
    /// The log error to report: an append that may have happened is not "nothing stored".
    fn into_log_error(self) -> LogError {
        if self.sent { LogError::OutcomeUnknown(self.message) } else { LogError::Unavailable(self.message) }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The largest answer read (a read answers about 16 MiB at most).
const MAX_REPLY_BYTES: u64 = 256 << 20;

#[derive(Deserialize)]
struct Reply<T> {
    ok: Option<T>,
    error: Option<String>,
}

/// One request, one answer.
async fn call<T: serde::de::DeserializeOwned>(socket: &Path, request: &LogRequest) -> Result<T, CallError> {
    let sent = std::sync::atomic::AtomicBool::new(false);
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| CallError::before(e.to_string()))?;
        let mut line = serde_json::to_vec(&json!({"log": request})).map_err(|e| CallError::before(e.to_string()))?;
        line.push(b'\n');
        sent.store(true, std::sync::atomic::Ordering::Relaxed);
        stream.write_all(&line).await.map_err(|e| CallError::after(e.to_string()))?;
        let mut reply = String::new();
        tokio::io::BufReader::new(stream)
            .take(MAX_REPLY_BYTES)
            .read_line(&mut reply)
            .await
            .map_err(|e| CallError::after(e.to_string()))?;
        if !reply.ends_with('\n') {
            return Err(CallError::after("the live server's answer was cut off"));
        }
        Ok::<_, CallError>(reply)
    };
    let reply = match tokio::time::timeout(Duration::from_secs(30), exchange).await {
        Ok(r) => r?,
        Err(_) => {
            let message = "the live server did not answer within 30 s";
            return Err(if sent.load(std::sync::atomic::Ordering::Relaxed) {
                CallError::after(message)
            } else {
                CallError::before(message)
            });
        }
    };
    let reply: Reply<T> = serde_json::from_str(&reply)
        .map_err(|e| CallError::after(format!("unexpected answer from the live server: {e}")))?;
    match (reply.ok, reply.error) {
        (Some(ok), _) => Ok(ok),
        // The server answered that it failed: nothing of this request was stored.
        (None, Some(e)) => Err(CallError::before(e)),
        _ => Err(CallError::after("the live server's answer has neither ok nor error")),
    }
}

#[async_trait]
impl EventLog for RemoteLog {
    async fn create_topic(&self, topic: &str, partitions: u32) -> cairn_log::Result<()> {
        match self.partitions(topic) {
            Ok(n) if n == partitions => Ok(()),
            _ => Err(LogError::ReadOnly),
        }
    }

    fn topics(&self) -> Vec<TopicInfo> {
        self.inner.topics.clone()
    }

    fn partitions(&self, topic: &str) -> cairn_log::Result<u32> {
        self.inner
            .topics
            .iter()
            .find(|t| t.name == topic)
            .map(|t| t.partitions)
            .ok_or_else(|| LogError::UnknownTopic(topic.to_owned()))
    }

    async fn append_batch(&self, records: Vec<NewRecord>) -> cairn_log::Result<Vec<Position>> {
        if records.is_empty() {
            return Err(LogError::EmptyBatch);
        }
        let wire = records
            .into_iter()
            .map(|r| WireNewRecord { topic: r.topic, key: STANDARD.encode(&r.key), value: STANDARD.encode(&r.value) })
            .collect();
        let positions: Vec<Value> =
            call(&self.inner.socket, &LogRequest::Append { records: wire }).await.map_err(CallError::into_log_error)?;
        positions
            .iter()
            .map(|p| match (p["partition"].as_u64(), p["offset"].as_u64()) {
                (Some(partition), Some(offset)) => Ok(Position { partition: partition as u32, offset }),
                _ => Err(LogError::OutcomeUnknown("the live server's answer names no position".into())),
            })
            .collect()
    }

    async fn read(&self, topic: &str, partition: u32, from: u64, max: usize) -> cairn_log::Result<Vec<Record>> {
        Self::read_records(&self.inner, topic, partition, from, max, 0).await
    }

    async fn end_offset(&self, topic: &str, partition: u32) -> cairn_log::Result<u64> {
        let request = LogRequest::End { topic: topic.to_owned(), partition };
        call(&self.inner.socket, &request).await.map_err(|e| LogError::Unavailable(e.message))
    }

    fn tail(&self, topic: &str, partition: u32, from: u64) -> BoxStream<'static, cairn_log::Result<Tailed>> {
        let inner = self.inner.clone();
        let topic = topic.to_owned();
        // The socket has no push: a caught-up read waits at the server for the next record.
        let stream = futures_util::stream::unfold(
            (inner, topic, from, std::collections::VecDeque::new()),
            move |(inner, topic, mut next, mut buffered)| async move {
                loop {
                    if let Some(r) = buffered.pop_front() {
                        return Some((Ok(Tailed::Record(r)), (inner, topic, next, buffered)));
                    }
                    match Self::read_records(&inner, &topic, partition, next, MAX_READ, TAIL_WAIT_MS).await {
                        Ok(records) if records.is_empty() => {}
                        Ok(records) => {
                            next = records.last().map_or(next, |r| r.offset + 1);
                            buffered.extend(records);
                        }
                        Err(e) => {
                            tokio::time::sleep(TAIL_RETRY).await;
                            return Some((Err(e), (inner, topic, next, buffered)));
                        }
                    }
                }
            },
        );
        Box::pin(stream)
    }

    async fn commit_offset(&self, _: &str, _: &str, _: u32, _: u64) -> cairn_log::Result<()> {
        Err(LogError::ReadOnly)
    }

    async fn committed_offset(&self, _: &str, _: &str, _: u32) -> cairn_log::Result<Option<u64>> {
        Ok(None)
    }
}

/// The live log as a view on Kafka uses it directly: every read, and appends of its own access
/// events only (the check the live server's socket makes on the embedded log), so a view can never
/// write anything else, whatever a bug above it would try.
pub struct ViewLog(pub Arc<dyn EventLog>);

#[async_trait]
impl EventLog for ViewLog {
    async fn create_topic(&self, topic: &str, partitions: u32) -> cairn_log::Result<()> {
        match self.0.partitions(topic) {
            Ok(n) if n == partitions => Ok(()),
            _ => Err(LogError::ReadOnly),
        }
    }

    fn topics(&self) -> Vec<TopicInfo> {
        self.0.topics()
    }

    fn partitions(&self, topic: &str) -> cairn_log::Result<u32> {
        self.0.partitions(topic)
    }

    async fn append_batch(&self, records: Vec<NewRecord>) -> cairn_log::Result<Vec<Position>> {
        for r in &records {
            if let Err(why) = check_view_access(r) {
                tracing::error!(why, "a view tried to append something other than its access events");
                return Err(LogError::ReadOnly);
            }
        }
        self.0.append_batch(records).await
    }

    async fn read(&self, topic: &str, partition: u32, from: u64, max: usize) -> cairn_log::Result<Vec<Record>> {
        self.0.read(topic, partition, from, max).await
    }

    async fn end_offset(&self, topic: &str, partition: u32) -> cairn_log::Result<u64> {
        self.0.end_offset(topic, partition).await
    }

    fn tail(&self, topic: &str, partition: u32, from: u64) -> BoxStream<'static, cairn_log::Result<Tailed>> {
        self.0.tail(topic, partition, from)
    }

    fn tail_partitions(&self, topic: &str, from: &[(u32, u64)]) -> BoxStream<'static, cairn_log::Result<Tailed>> {
        self.0.tail_partitions(topic, from)
    }

    async fn commit_offset(&self, _: &str, _: &str, _: u32, _: u64) -> cairn_log::Result<()> {
        Err(LogError::ReadOnly)
    }

    async fn committed_offset(&self, group: &str, topic: &str, partition: u32) -> cairn_log::Result<Option<u64>> {
        self.0.committed_offset(group, topic, partition).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_events::{Event, EventType, Payload, Timestamp, sample_event};

    fn record_of(event: &Event) -> NewRecord {
        NewRecord::new(event.topic(), event.partition_key(), event.canonical_bytes())
    }

    fn now(mut e: Event) -> Event {
        e.occurred_at = Timestamp::now();
        e
    }

    #[test]
    fn a_view_appends_its_own_access_events_and_nothing_else() {
        let read = now(sample_event(EventType::FhirAccessRead));
        assert_eq!(check_view_access(&record_of(&read)), Ok(()));
        // Without its view, from another time, under another key, or not an access event: refused.
        let mut unnamed = read.clone();
        if let Payload::AccessRead(a) = &mut unnamed.payload {
            a.view = None;
        }
        assert!(check_view_access(&record_of(&unnamed)).unwrap_err().contains("view"));
        let old = sample_event(EventType::FhirAccessRead);
        assert!(check_view_access(&record_of(&old)).unwrap_err().contains("time"));
        let mut moved = record_of(&read);
        moved.key = b"Patient/someone-else".to_vec();
        assert!(check_view_access(&moved).unwrap_err().contains("key"));
        let user = now(sample_event(EventType::AuthUserCreated));
        let mut disguised = record_of(&user);
        disguised.topic = cairn_events::topics::ACCESS.into();
        assert!(check_view_access(&disguised).unwrap_err().contains("not an access event"));
        let garbage = NewRecord::new(cairn_events::topics::ACCESS, "k", "{}");
        assert!(check_view_access(&garbage).is_err());
    }
}
