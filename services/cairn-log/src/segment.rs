//! Segment files and the scan that validates them.
//!
//! The embedded log is one journal of frames, split into numbered segment files
//! (`segments/0000000000.seg`, `0000000001.seg`, ...). A segment is sealed (fsynced, never written
//! again) before the next one is created, so only the last segment can end in a torn frame.
//!
//! Segments are zero-filled ahead of the data (see `embedded`): overwriting blocks that already exist
//! lets `fdatasync` skip the file-size journal commit, which halves its latency. So the data of a
//! segment ends where only zeros remain; a frame never starts with a zero byte (its magic is `CRN1`).

use crate::frame::{self, HEADER_LEN, Header, HeaderCheck, RecordRef};
use crate::{LogError, Result};
use std::path::{Path, PathBuf};

pub const SEGMENT_SUFFIX: &str = ".seg";

pub fn segment_name(index: u32) -> String {
    format!("{index:010}{SEGMENT_SUFFIX}")
}

/// The segment files of `dir`, in order. A gap in the numbering (a removed segment) is corruption.
pub fn list_segments(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| LogError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| LogError::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX) else { continue };
        let index: u32 = stem.parse().map_err(|_| LogError::DataDir {
            path: entry.path(),
            problem: "unexpected file among the segments".into(),
        })?;
        found.push((index, entry.path()));
    }
    found.sort();
    for (expected, (index, path)) in found.iter().enumerate() {
        if *index as usize != expected {
            let missing = dir.join(segment_name(expected as u32));
            return Err(LogError::Corrupt {
                path: missing,
                position: 0,
                detail: format!("segment {expected} is missing (next present: {})", path.display()),
            });
        }
    }
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// How a scan of one segment ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanEnd {
    /// Every byte up to `end` belongs to a valid frame; only zeros (preallocated space) follow.
    Clean { end: u64 },
    /// The last segment ends in a frame that was never completely written: the unacknowledged tail
    /// of a crash. Bytes from `position` to the end are not part of the log.
    Torn { position: u64, len: u64, reason: String },
}

/// Walks the frames of a segment's bytes from `start`, calling `visit(frame_position, records)` with
/// each record's absolute byte position. Any damage is corruption, except a torn frame at the very
/// end of the last segment (`is_last`), which ends the scan with [`ScanEnd::Torn`].
pub fn scan(
    path: &Path,
    data: &[u8],
    start: u64,
    is_last: bool,
    mut visit: impl FnMut(u64, &[(u64, RecordRef<'_>)]) -> Result<()>,
) -> Result<ScanEnd> {
    let mut pos = start as usize;
    let corrupt = |position: usize, detail: String| LogError::Corrupt {
        path: path.to_owned(),
        position: position as u64,
        detail,
    };
    while pos < data.len() {
        let rest = &data[pos..];
        // A tail is torn only if no valid frame follows it: damage with intact frames after it is
        // corruption in the middle (say, a flipped length byte), never a tail to cut off.
        let torn_or_corrupt = |reason: &str| {
            if is_last && !valid_frame_after(data, pos) {
                Ok(ScanEnd::Torn { position: pos as u64, len: rest.len() as u64, reason: reason.to_owned() })
            } else {
                Err(corrupt(pos, format!("{reason} with intact data after it")))
            }
        };
        let all_zero = rest.iter().all(|&b| b == 0);
        if all_zero {
            return Ok(ScanEnd::Clean { end: pos as u64 });
        }
        if rest.len() < HEADER_LEN {
            if is_last {
                return torn_or_corrupt("incomplete frame header");
            }
            return Err(corrupt(pos, "truncated frame header in a sealed segment".into()));
        }
        let header: &[u8; HEADER_LEN] = rest[..HEADER_LEN].try_into().unwrap();
        let Header { body_len, crc } = match frame::parse_header(header) {
            HeaderCheck::Ok(h) => h,
            HeaderCheck::BadMagic if is_last => return torn_or_corrupt("no frame starts here (bad magic)"),
            HeaderCheck::BadMagic => return Err(corrupt(pos, "no frame starts here (bad magic)".into())),
            HeaderCheck::BadLength(len) if is_last => {
                return torn_or_corrupt(&format!("impossible frame length {len}"));
            }
            HeaderCheck::BadLength(len) => {
                return Err(corrupt(pos, format!("impossible frame length {len}")));
            }
        };
        let end = pos + HEADER_LEN + body_len;
        if end > data.len() {
            if is_last {
                return torn_or_corrupt("frame runs past the end of the file");
            }
            return Err(corrupt(pos, "frame runs past the end of a sealed segment".into()));
        }
        let body = &data[pos + HEADER_LEN..end];
        if crc32c::crc32c(body) != crc {
            if is_last {
                return torn_or_corrupt("checksum mismatch in the final frame");
            }
            return Err(corrupt(pos, "checksum mismatch".into()));
        }
        let records = frame::decode_body(body).map_err(|e| corrupt(pos, e))?;
        let body_at = (pos + HEADER_LEN) as u64;
        let absolute: Vec<(u64, RecordRef<'_>)> =
            records.into_iter().map(|(rel, r)| (body_at + rel as u64, r)).collect();
        visit(pos as u64, &absolute)?;
        pos = end;
    }
    Ok(ScanEnd::Clean { end: pos as u64 })
}

/// The length of `bytes` without its trailing zeros.
pub fn trim_zeros(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    &bytes[..end]
}

/// Whether a complete, checksummed frame starts anywhere after `pos`.
fn valid_frame_after(data: &[u8], pos: usize) -> bool {
    let mut at = pos + 1;
    while at + HEADER_LEN <= data.len() {
        let Some(found) = data[at..].windows(4).position(|w| w == frame::MAGIC) else { return false };
        let start = at + found;
        if start + HEADER_LEN > data.len() {
            return false;
        }
        let header: &[u8; HEADER_LEN] = data[start..start + HEADER_LEN].try_into().unwrap();
        if let HeaderCheck::Ok(h) = frame::parse_header(header) {
            let end = start + HEADER_LEN + h.body_len;
            if end <= data.len() && crc32c::crc32c(&data[start + HEADER_LEN..end]) == h.crc {
                return true;
            }
        }
        at = start + 1;
    }
    false
}
