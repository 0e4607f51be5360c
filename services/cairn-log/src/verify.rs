//! Walks a log and proves its chains: every frame's checksum, every record's offset, chain link and
//! hash, and every key's partition. Stops at the first broken link and says where it is.

use crate::LogError;
use crate::chain::ChainHeads;
use crate::embedded::{check_format, read_topics};
use crate::segment::{self, ScanEnd};
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
    check_format(dir)?;
    let topics = read_topics(dir)?;
    let seg_dir = dir.join("segments");
    let mut report = VerifyReport::default();
    let location_only = |file: PathBuf, position: u64, what: String| Problem {
        topic: None,
        partition: None,
        offset: None,
        file,
        position,
        what,
    };
    let paths = match segment::list_segments(&seg_dir) {
        Ok(p) => p,
        Err(LogError::Corrupt { path, position, detail }) => {
            report.problem = Some(location_only(path, position, detail));
            return Ok(report);
        }
        Err(LogError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let total: u64 = paths.iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum();
    let mut chain = ChainHeads::new(&topics);
    let mut done = 0u64;
    for (i, path) in paths.iter().enumerate() {
        let data = std::fs::read(path).map_err(|e| LogError::io(path, e))?;
        let is_last = i + 1 == paths.len();
        // A broken link stops the scan; the record's coordinates are kept here.
        let mut found: Option<Problem> = None;
        let scanned = segment::scan(path, &data, 0, is_last, |_, records| {
            for (position, r) in records {
                if let Err(what) = chain.advance(r, true) {
                    found = Some(Problem {
                        topic: Some(r.topic.to_owned()),
                        partition: Some(r.partition),
                        offset: Some(r.offset),
                        file: path.clone(),
                        position: *position,
                        what: what.clone(),
                    });
                    return Err(LogError::Corrupt { path: path.clone(), position: *position, detail: what });
                }
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
                report.problem = Some(found.unwrap_or_else(|| location_only(path, position, detail)));
                return Ok(report);
            }
            Err(e) => return Err(e),
        }
        done += data.len() as u64;
        report.bytes = done;
        progress(done, total);
    }
    report.partitions = topics
        .iter()
        .flat_map(|(topic, &count)| (0..count).map(move |p| (topic, p)))
        .map(|(topic, partition)| {
            let (records, head) = chain.head(topic, partition);
            PartitionSummary { topic: topic.clone(), partition, records, head_hash: hex::encode(head) }
        })
        .collect();
    Ok(report)
}
