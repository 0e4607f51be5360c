//! Walks a log and proves its chains: every frame's checksum, every record's offset, chain link and
//! hash, and every key's partition. Stops at the first broken link and says where it is.

use crate::chain::{self, Hash};
use crate::segment::{self, ScanEnd};
use crate::{LogError, partition_for_key};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// One partition's chain as verified.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionSummary {
    pub topic: String,
    pub partition: u32,
    pub records: u64,
    /// Hex SHA-256 of the last record (the genesis hash for an empty partition).
    pub head_hash: String,
}

/// The first thing found wrong.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub topic: Option<String>,
    pub partition: Option<u32>,
    pub offset: Option<u64>,
    pub file: PathBuf,
    pub position: u64,
    pub what: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let (Some(t), Some(p), Some(o)) = (&self.topic, self.partition, self.offset) {
            write!(f, "topic {t} partition {p} offset {o}: ")?
        }
        write!(f, "{} ({} byte {})", self.what, self.file.display(), self.position)
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    pub partitions: Vec<PartitionSummary>,
    pub records: u64,
    pub bytes: u64,
    /// Bytes at the end of the last segment that do not form a valid frame. After a crash that the
    /// log has not been reopened since, this is the never-acknowledged append that was being written
    /// (the next open cuts it off into `quarantine/`); otherwise it is damage or tampering. Either way
    /// it makes the report not `ok`, so that no change to the log goes unreported.
    pub torn_tail: Option<String>,
    pub problem: Option<Problem>,
}

impl VerifyReport {
    /// Every chain intact and nothing unexplained at the end of the log.
    pub fn ok(&self) -> bool {
        self.problem.is_none() && self.torn_tail.is_none()
    }
}

/// Verifies the embedded log in `dir` without locking it, so it can run beside a live server.
/// `progress(bytes_done, bytes_total)` is called after each segment.
pub fn verify_embedded(dir: &Path, mut progress: impl FnMut(u64, u64)) -> Result<VerifyReport, LogError> {
    let format = dir.join("FORMAT");
    if !format.exists() {
        return Err(LogError::DataDir {
            path: dir.to_owned(),
            problem: "not a Cairn event log (no FORMAT file)".into(),
        });
    }
    let topics: BTreeMap<String, u32> = match std::fs::read(dir.join("topics.json")) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| LogError::DataDir {
            path: dir.join("topics.json"),
            problem: format!("unreadable topic list: {e}"),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => return Err(LogError::io(dir.join("topics.json"), e)),
    };
    let seg_dir = dir.join("segments");
    let mut report = VerifyReport::default();
    let paths = match segment::list_segments(&seg_dir) {
        Ok(p) => p,
        Err(LogError::Corrupt { path, position, detail }) => {
            report.problem =
                Some(Problem { topic: None, partition: None, offset: None, file: path, position, what: detail });
            return Ok(report);
        }
        Err(LogError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let total: u64 = paths.iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum();
    let mut heads: HashMap<(String, u32), (u64, Hash)> = HashMap::new();
    for (topic, &count) in &topics {
        for p in 0..count {
            heads.insert((topic.clone(), p), (0, chain::genesis(topic, p)));
        }
    }
    let mut done = 0u64;
    for (i, path) in paths.iter().enumerate() {
        let data = std::fs::read(path).map_err(|e| LogError::io(path, e))?;
        let is_last = i + 1 == paths.len();
        let mut found: Option<Problem> = None;
        let scanned = segment::scan(path, &data, 0, is_last, |_, records| {
            for (position, r) in records {
                let problem = |what: String| Problem {
                    topic: Some(r.topic.to_owned()),
                    partition: Some(r.partition),
                    offset: Some(r.offset),
                    file: path.clone(),
                    position: *position,
                    what,
                };
                let Some(&count) = topics.get(r.topic) else {
                    found = Some(problem("record of a topic that was never created".into()));
                    return Err(LogError::Closed);
                };
                if r.partition >= count || partition_for_key(r.key, count) != r.partition {
                    found = Some(problem("key does not route to this partition".into()));
                    return Err(LogError::Closed);
                }
                let head = heads.get_mut(&(r.topic.to_owned(), r.partition)).expect("all partitions seeded");
                if r.offset != head.0 {
                    found = Some(problem(format!("offset out of sequence (expected {})", head.0)));
                    return Err(LogError::Closed);
                }
                if r.prev_hash != head.1 {
                    found = Some(problem(
                        "prev_hash does not match the previous record's hash (record removed, reordered or altered)"
                            .into(),
                    ));
                    return Err(LogError::Closed);
                }
                let recomputed = chain::link(&r.prev_hash, r.value);
                if recomputed != r.hash {
                    found =
                        Some(problem("hash does not match SHA-256(prev_hash || value): the record was altered".into()));
                    return Err(LogError::Closed);
                }
                *head = (r.offset + 1, r.hash);
                report.records += 1;
            }
            Ok(())
        });
        match scanned {
            Ok(ScanEnd::Clean { .. }) => {}
            Ok(ScanEnd::Torn { position, len, reason }) => {
                let len = segment::trim_zeros(&data[position as usize..]).len().min(len as usize);
                report.torn_tail = Some(format!("{}: {len} bytes at {position} ({reason})", path.display()));
            }
            Err(LogError::Corrupt { path, position, detail }) => {
                report.problem =
                    Some(Problem { topic: None, partition: None, offset: None, file: path, position, what: detail });
                return Ok(report);
            }
            Err(LogError::Closed) => {
                report.problem = found;
                return Ok(report);
            }
            Err(e) => return Err(e),
        }
        done += data.len() as u64;
        report.bytes = done;
        progress(done, total);
    }
    let mut partitions: Vec<PartitionSummary> = heads
        .into_iter()
        .map(|((topic, partition), (records, head))| PartitionSummary {
            topic,
            partition,
            records,
            head_hash: hex::encode(head),
        })
        .collect();
    partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    report.partitions = partitions;
    Ok(report)
}
