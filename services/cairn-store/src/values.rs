//! The embedded store's value file: every version record, packed, appended one after another; the
//! `versions` table holds a [`Pointer`] to each instead of the record.
//!
//! Why: version records are most of the bytes a rebuild writes. In the B-tree each one was copied
//! into a page, and every page a transaction touched was written again; appended here they are
//! written once, in order, and the B-tree rows stay small (decision 0010).
//!
//! Crash safety: records are written before the transaction that points to them commits, and the
//! file is synced before every durable redb commit (a durable commit makes the earlier non-durable
//! ones durable too; redb also commits durably when the database is closed, so the store closes it
//! only after syncing this file). The store records the file's committed length in the
//! same transaction, and on opening cuts off anything after it: bytes of transactions a crash undid,
//! which nothing points to. Version records are never removed, so the file never needs compacting.

use crate::{Result, StoreError};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Where a packed record lies in the value file, and its CRC-32C: 16 bytes in the `versions` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pointer {
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
}

impl Pointer {
    pub const BYTES: usize = 16;

    pub fn encode(&self) -> [u8; Self::BYTES] {
        let mut out = [0; Self::BYTES];
        out[..8].copy_from_slice(&self.offset.to_le_bytes());
        out[8..12].copy_from_slice(&self.len.to_le_bytes());
        out[12..].copy_from_slice(&self.crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Pointer> {
        let b: &[u8; Self::BYTES] = bytes
            .try_into()
            .map_err(|_| StoreError::Corrupt(format!("a version pointer of {} bytes, not 16", bytes.len())))?;
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        Ok(Pointer { offset: u64::from_le_bytes(b[..8].try_into().expect("8 bytes")), len: u32_at(8), crc: u32_at(12) })
    }
}

/// The value file beside a store file (`resources.redb` → `resources.values`).
pub fn path_for(store_file: &Path) -> PathBuf {
    store_file.with_extension("values")
}

pub struct ValueFile {
    file: File,
    path: PathBuf,
    /// A sync failed: what was written since the last good one may be lost, and a later sync that
    /// succeeds would not say so. Every later write and sync fails.
    sync_failed: AtomicBool,
}

impl ValueFile {
    /// Opens the value file and cuts it to `committed`, the length the store's last committed
    /// transaction recorded (creating it, with its directory entry synced, when that is 0). A file
    /// missing or shorter than that lost records: [`StoreError::Damaged`].
    pub fn open(path: &Path, committed: u64) -> Result<ValueFile> {
        let err = |e: std::io::Error| StoreError::Storage { path: path.display().to_string(), detail: e.to_string() };
        let damaged = |detail: String| StoreError::Damaged { path: path.display().to_string(), detail };
        let created = !std::fs::exists(path).map_err(err)?;
        if created && committed > 0 {
            return Err(damaged(format!("its value file is missing, and {committed} bytes were written to it")));
        }
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(err)?;
        if created {
            // Its directory entry too, so a crash does not lose the file while the store names it.
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
        }
        let len = file.metadata().map_err(err)?.len();
        if len < committed {
            return Err(damaged(format!(
                "its value file holds {len} bytes, and the last transaction recorded {committed}"
            )));
        }
        if len > committed {
            // Records of transactions that never committed (or that a crash undid).
            file.set_len(committed).map_err(err)?;
        }
        Ok(ValueFile { file, path: path.to_path_buf(), sync_failed: AtomicBool::new(false) })
    }

    fn err(&self, e: std::io::Error) -> StoreError {
        StoreError::Storage { path: self.path.display().to_string(), detail: e.to_string() }
    }

    /// An error once a sync has failed.
    pub fn usable(&self) -> Result<()> {
        if self.sync_failed.load(Ordering::Relaxed) {
            return Err(self.err(std::io::Error::other("an earlier sync failed; restart to check the store")));
        }
        Ok(())
    }

    /// Writes `bytes` at `offset`, past everything a committed transaction wrote, before the
    /// transaction pointing at them commits.
    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.usable()?;
        self.file.write_all_at(bytes, offset).map_err(|e| self.err(e))
    }

    /// Makes what was written durable: before a durable transaction commits, since it makes the
    /// earlier, non-durable ones durable too, and their records with them.
    pub fn sync(&self) -> Result<()> {
        self.usable()?;
        self.file.sync_data().map_err(|e| {
            self.sync_failed.store(true, Ordering::Relaxed);
            self.err(e)
        })
    }

    /// The packed record `pointer` names, checked against its CRC.
    pub fn read(&self, pointer: Pointer) -> Result<Vec<u8>> {
        let mut out = vec![0; pointer.len as usize];
        self.file.read_exact_at(&mut out, pointer.offset).map_err(|e| {
            StoreError::Corrupt(format!(
                "{}: the record at {} ({} bytes) cannot be read: {e}",
                self.path.display(),
                pointer.offset,
                pointer.len
            ))
        })?;
        self.check(pointer, &out)?;
        Ok(out)
    }

    fn check(&self, pointer: Pointer, record: &[u8]) -> Result<()> {
        if crc32c::crc32c(record) != pointer.crc {
            return Err(StoreError::Corrupt(format!(
                "{}: the record at {} ({} bytes) fails its checksum",
                self.path.display(),
                pointer.offset,
                pointer.len
            )));
        }
        Ok(())
    }
}

/// The pointer a record written at `offset` will have.
pub fn pointer(offset: u64, packed: &[u8]) -> Pointer {
    Pointer { offset, len: packed.len() as u32, crc: crc32c::crc32c(packed) }
}

/// One transaction's records, appended from `start` (the end of the previous transaction's) and
/// written out about a mebibyte at a time: a large batch does not pile up in one growing buffer.
pub struct Appender<'a> {
    file: &'a ValueFile,
    start: u64,
    written: u64,
    buf: Vec<u8>,
}

const APPEND_PIECE: usize = 1 << 20;

impl<'a> Appender<'a> {
    pub fn new(file: &'a ValueFile, start: u64) -> Appender<'a> {
        Appender { file, start, written: 0, buf: Vec::with_capacity(APPEND_PIECE + (64 << 10)) }
    }

    /// Where `packed` will be if it is appended next.
    pub fn pointer_for(&self, packed: &[u8]) -> Pointer {
        pointer(self.end(), packed)
    }

    pub fn append(&mut self, packed: &[u8]) -> Result<()> {
        self.buf.extend_from_slice(packed);
        if self.buf.len() >= APPEND_PIECE {
            self.write_out()?;
        }
        Ok(())
    }

    fn write_out(&mut self) -> Result<()> {
        self.file.write_at(self.start + self.written, &self.buf)?;
        self.written += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// The packed record `pointer` names, which this transaction may have appended (and not yet
    /// written out): a resource updated twice in one transaction.
    pub fn read(&self, pointer: Pointer) -> Result<Vec<u8>> {
        let buffered = self.start + self.written;
        // A record is appended whole, and written out whole with the rest of the buffer.
        match pointer.offset.checked_sub(buffered) {
            Some(at) => {
                let record = usize::try_from(at)
                    .ok()
                    .and_then(|at| self.buf.get(at..at.checked_add(pointer.len as usize)?))
                    .ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "{}: the record at {} ({} bytes) lies past the end of what was appended",
                            self.file.path.display(),
                            pointer.offset,
                            pointer.len
                        ))
                    })?;
                self.file.check(pointer, record)?;
                Ok(record.to_vec())
            }
            None => self.file.read(pointer),
        }
    }

    /// The end of what was appended.
    pub fn end(&self) -> u64 {
        self.start + self.written + self.buf.len() as u64
    }

    /// Writes out the rest; the new end of the file.
    pub fn finish(mut self) -> Result<u64> {
        if !self.buf.is_empty() {
            self.write_out()?;
        }
        Ok(self.end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_damage_is_found_and_an_uncommitted_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resources.values");
        let file = ValueFile::open(&path, 0).unwrap();
        let (a, b) = (b"first record".to_vec(), b"second".to_vec());
        let (pa, pb) = (pointer(0, &a), pointer(a.len() as u64, &b));
        let mut both = a.clone();
        both.extend_from_slice(&b);
        file.write_at(0, &both).unwrap();
        file.sync().unwrap();
        assert_eq!(file.read(pa).unwrap(), a);
        assert_eq!(file.read(pb).unwrap(), b);
        assert_eq!(Pointer::decode(&pb.encode()).unwrap(), pb);
        assert!(Pointer::decode(&[0; 15]).is_err());

        // A flipped byte, a pointer past the end.
        let e = file.read(Pointer { crc: pa.crc ^ 1, ..pa }).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        let e = file.read(Pointer { offset: 1000, ..pa }).unwrap_err().to_string();
        assert!(e.contains("cannot be read"), "{e}");
        drop(file);

        // Reopened at the committed length of the first record only: the second is cut off.
        let file = ValueFile::open(&path, a.len() as u64).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), a.len() as u64);
        assert_eq!(file.read(pa).unwrap(), a);
        drop(file);
        // Records appended in pieces land back to back from the committed end.
        let file = ValueFile::open(&path, a.len() as u64).unwrap();
        let big = vec![7u8; APPEND_PIECE + 10];
        let mut appender = Appender::new(&file, a.len() as u64);
        let pointers: Vec<Pointer> = [&big, &b, &big, &b]
            .into_iter()
            .map(|r| {
                let p = appender.pointer_for(r);
                appender.append(r).unwrap();
                p
            })
            .collect();
        // Before the transaction ends, its records read back from the file (written out) or from
        // the appender's buffer (not yet), and a pointer past what was appended is refused.
        assert_eq!(appender.read(pointers[0]).unwrap(), big);
        assert_eq!(appender.read(pointers[1]).unwrap(), b);
        assert_eq!(appender.read(pointers[2]).unwrap(), big);
        assert_eq!(appender.end() - appender.start - appender.written, b.len() as u64, "the last is buffered");
        assert_eq!(appender.read(pointers[3]).unwrap(), b);
        assert_eq!(appender.read(pa).unwrap(), a);
        for damaged in [pointers[2], pointers[3]] {
            let e = appender.read(Pointer { crc: damaged.crc ^ 1, ..damaged }).unwrap_err().to_string();
            assert!(e.contains("checksum"), "{e}");
        }
        let e = appender.read(Pointer { offset: appender.end(), ..pointers[1] }).unwrap_err().to_string();
        assert!(e.contains("past the end"), "{e}");
        let end = appender.finish().unwrap();
        assert_eq!(end, a.len() as u64 + 2 * big.len() as u64 + 2 * b.len() as u64);
        assert_eq!(file.read(pointers[3]).unwrap(), b);
        assert_eq!(file.read(pointers[1]).unwrap(), b);
        assert_eq!(file.read(pointers[2]).unwrap(), big);
        assert_eq!(file.read(pa).unwrap(), a);
        drop(file);
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(a.len() as u64).unwrap();
        // A file shorter than what was committed, or missing, lost records.
        let e = ValueFile::open(&path, 100).err().unwrap().to_string();
        assert!(e.contains("damaged") && e.contains("recorded 100"), "{e}");
        std::fs::remove_file(&path).unwrap();
        let e = ValueFile::open(&path, 100).err().unwrap().to_string();
        assert!(e.contains("missing"), "{e}");
        assert!(!path.exists(), "not created empty");
    }
}
