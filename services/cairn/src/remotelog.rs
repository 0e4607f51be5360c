//! The live server's event log, used from another process through its admin socket
//! (`run/admin.sock`). The embedded log has one writer: a second process on the same data
//! directory (`cairn serve --read-only`, which shows a replayed store) appends its access events
//! and follows `cairn.auth` through the process that holds the log. An append answers only once the
//! live server has made it durable, so the viewer's "audited before the answer" holds as it does
//! there.
//!
//! One JSON request per connection, `{"log": {...}}`, answered `{"ok": ...}` or `{"error": "..."}`
//! like every admin command. Appends are accepted for `cairn.access` only: the viewer records
//! accesses and nothing else.

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
    Read {
        topic: String,
        partition: u32,
        from: u64,
        max: usize,
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

/// The most records one read answers (a reply is one line in memory on both sides).
const MAX_READ: usize = 2000;
/// How often a tail asks for new records when it is caught up.
const TAIL_POLL: Duration = Duration::from_millis(200);

/// Answers a [`LogRequest`] from the admin socket with the server's own log.
pub async fn answer(log: &Arc<dyn EventLog>, issuer: &str, request: LogRequest) -> Result<Value, String> {
    let e = |e: LogError| e.to_string();
    Ok(match request {
        LogRequest::Describe => json!({"issuer": issuer, "topics": log.topics()}),
        LogRequest::Append { records } => {
            let mut batch = Vec::with_capacity(records.len());
            for r in records {
                if r.topic != cairn_events::topics::ACCESS {
                    return Err(format!(
                        "appends through the admin socket are for {} only",
                        cairn_events::topics::ACCESS
                    ));
                }
                let decode = |s: &str| STANDARD.decode(s).map_err(|_| "a record is not base64".to_owned());
                batch.push(NewRecord { topic: r.topic, key: decode(&r.key)?, value: decode(&r.value)? });
            }
            let positions = log.append_batch(batch).await.map_err(e)?;
            json!(positions.iter().map(|p| json!({"partition": p.partition, "offset": p.offset})).collect::<Vec<_>>())
        }
        LogRequest::Read { topic, partition, from, max } => {
            let records = log.read(&topic, partition, from, max.min(MAX_READ)).await.map_err(e)?;
            let wire: Vec<WireRecord> = records
                .into_iter()
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
    ) -> cairn_log::Result<Vec<Record>> {
        let request = LogRequest::Read { topic: topic.to_owned(), partition, from, max };
        let wire: Vec<WireRecord> = call(&inner.socket, &request).await.map_err(LogError::Unavailable)?;
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

/// One request, one answer.
async fn call<T: serde::de::DeserializeOwned>(socket: &Path, request: &LogRequest) -> Result<T, String> {
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| e.to_string())?;
        let mut line = serde_json::to_vec(&json!({"log": request})).map_err(|e| e.to_string())?;
        line.push(b'\n');
        stream.write_all(&line).await.map_err(|e| e.to_string())?;
        let mut reply = String::new();
        tokio::io::BufReader::new(stream).take(256 << 20).read_line(&mut reply).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(reply)
    };
    let reply = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| "the live server did not answer within 30 s".to_owned())??;
    let v: Value = serde_json::from_str(&reply).map_err(|_| "the live server's answer is not JSON".to_owned())?;
    match (v.get("ok"), v.get("error").and_then(Value::as_str)) {
        (Some(ok), _) => serde_json::from_value(ok.clone()).map_err(|e| format!("unexpected answer: {e}")),
        (None, Some(e)) => Err(e.to_owned()),
        _ => Err("the live server's answer has neither ok nor error".into()),
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
            call(&self.inner.socket, &LogRequest::Append { records: wire }).await.map_err(LogError::Unavailable)?;
        positions
            .iter()
            .map(|p| match (p["partition"].as_u64(), p["offset"].as_u64()) {
                (Some(partition), Some(offset)) => Ok(Position { partition: partition as u32, offset }),
                _ => Err(LogError::OutcomeUnknown("the live server's answer names no position".into())),
            })
            .collect()
    }

    async fn read(&self, topic: &str, partition: u32, from: u64, max: usize) -> cairn_log::Result<Vec<Record>> {
        Self::read_records(&self.inner, topic, partition, from, max).await
    }

    async fn end_offset(&self, topic: &str, partition: u32) -> cairn_log::Result<u64> {
        let request = LogRequest::End { topic: topic.to_owned(), partition };
        call(&self.inner.socket, &request).await.map_err(LogError::Unavailable)
    }

    fn tail(&self, topic: &str, partition: u32, from: u64) -> BoxStream<'static, cairn_log::Result<Tailed>> {
        let inner = self.inner.clone();
        let topic = topic.to_owned();
        // Polls: the socket has no push. Caught up, it asks again every TAIL_POLL.
        let stream = futures_util::stream::unfold(
            (inner, topic, from, std::collections::VecDeque::new()),
            move |(inner, topic, mut next, mut buffered)| async move {
                loop {
                    if let Some(r) = buffered.pop_front() {
                        return Some((Ok(Tailed::Record(r)), (inner, topic, next, buffered)));
                    }
                    match Self::read_records(&inner, &topic, partition, next, MAX_READ).await {
                        Ok(records) if records.is_empty() => tokio::time::sleep(TAIL_POLL).await,
                        Ok(records) => {
                            next = records.last().map_or(next, |r| r.offset + 1);
                            buffered.extend(records);
                        }
                        Err(e) => {
                            tokio::time::sleep(TAIL_POLL).await;
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
