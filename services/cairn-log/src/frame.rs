//! The on-disk frame: the unit of atomicity of the embedded log.
//!
//! ```text
//! frame  = magic "CRN1" (4) | body_len u32 LE (4) | crc32c(body) u32 LE (4) | body
//! body   = record_count u32 LE | record*
//! record = topic_len u16 | topic | partition u32 | offset u64 | timestamp_ms i64
//!          | key_len u32 | key | value_len u32 | value | prev_hash (32) | hash (32)
//! ```
//! (all integers little-endian). One append batch is one frame, so a batch is either entirely in
//! the file with a valid checksum or recognisably torn.

use crate::chain::Hash;

pub const MAGIC: [u8; 4] = *b"CRN1";
pub const HEADER_LEN: usize = 12;
/// Upper bound of one frame body; larger batches are refused before anything is written.
pub const MAX_BODY: usize = 64 << 20;
/// Fixed bytes of a record besides topic, key and value.
pub(crate) const RECORD_FIXED: usize = 2 + 4 + 8 + 8 + 4 + 4 + 32 + 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub topic: &'a str,
    pub partition: u32,
    pub offset: u64,
    pub timestamp_ms: i64,
    pub key: &'a [u8],
    pub value: &'a [u8],
    pub prev_hash: Hash,
    pub hash: Hash,
}

impl RecordRef<'_> {
    pub fn encoded_len(&self) -> usize {
        RECORD_FIXED + self.topic.len() + self.key.len() + self.value.len()
    }

    pub fn to_record(self) -> crate::Record {
        crate::Record {
            topic: self.topic.to_owned(),
            partition: self.partition,
            offset: self.offset,
            timestamp_ms: self.timestamp_ms,
            key: self.key.to_vec(),
            value: self.value.to_vec(),
            prev_hash: Some(self.prev_hash),
            hash: Some(self.hash),
        }
    }
}

/// Writes frames into a buffer. Returns, for each record, its byte position relative to the start
/// of the buffer, so the caller can index it.
pub struct FrameWriter<'b> {
    out: &'b mut Vec<u8>,
    start: usize,
    count: u32,
}

impl<'b> FrameWriter<'b> {
    pub fn begin(out: &'b mut Vec<u8>) -> Self {
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&[0; 8]); // len and crc, filled in by `finish`
        out.extend_from_slice(&[0; 4]); // record count
        FrameWriter { out, start, count: 0 }
    }

    /// Appends a record; returns its position relative to the buffer start.
    pub fn push(&mut self, r: &RecordRef<'_>) -> usize {
        let pos = self.out.len();
        let o = &mut *self.out;
        o.extend_from_slice(&(r.topic.len() as u16).to_le_bytes());
        o.extend_from_slice(r.topic.as_bytes());
        o.extend_from_slice(&r.partition.to_le_bytes());
        o.extend_from_slice(&r.offset.to_le_bytes());
        o.extend_from_slice(&r.timestamp_ms.to_le_bytes());
        o.extend_from_slice(&(r.key.len() as u32).to_le_bytes());
        o.extend_from_slice(r.key);
        o.extend_from_slice(&(r.value.len() as u32).to_le_bytes());
        o.extend_from_slice(r.value);
        o.extend_from_slice(&r.prev_hash);
        o.extend_from_slice(&r.hash);
        self.count += 1;
        pos
    }

    pub fn finish(self) {
        let body_start = self.start + HEADER_LEN;
        self.out[body_start..body_start + 4].copy_from_slice(&self.count.to_le_bytes());
        let body_len = (self.out.len() - body_start) as u32;
        let crc = crc32c::crc32c(&self.out[body_start..]);
        self.out[self.start + 4..self.start + 8].copy_from_slice(&body_len.to_le_bytes());
        self.out[self.start + 8..self.start + 12].copy_from_slice(&crc.to_le_bytes());
    }
}

/// A frame header as read from disk.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub body_len: usize,
    pub crc: u32,
}

pub enum HeaderCheck {
    Ok(Header),
    BadMagic,
    BadLength(usize),
}

pub fn parse_header(buf: &[u8; HEADER_LEN]) -> HeaderCheck {
    if buf[0..4] != MAGIC {
        return HeaderCheck::BadMagic;
    }
    let body_len = u32::from_le_bytes(buf[4..8].try_into().unwrap()) as usize;
    if !(4..=MAX_BODY).contains(&body_len) {
        return HeaderCheck::BadLength(body_len);
    }
    HeaderCheck::Ok(Header { body_len, crc: u32::from_le_bytes(buf[8..12].try_into().unwrap()) })
}

/// Decodes every record of a checksummed frame body, with each record's position relative to the
/// body start.
pub fn decode_body(body: &[u8]) -> Result<Vec<(usize, RecordRef<'_>)>, String> {
    if body.len() < 4 {
        return Err("frame body shorter than its record count".into());
    }
    let count = u32::from_le_bytes(body[0..4].try_into().unwrap()) as usize;
    if count == 0 {
        return Err("frame holds no records".into());
    }
    let mut out = Vec::with_capacity(count.min(body.len() / RECORD_FIXED));
    let mut pos = 4;
    for i in 0..count {
        let (r, used) = decode_record(&body[pos..])
            .map_err(|e| format!("record {i} of {count}: {e}"))?
            .ok_or_else(|| format!("record {i} of {count} runs past the frame"))?;
        out.push((pos, r));
        pos += used;
    }
    if pos != body.len() {
        return Err(format!("{} stray bytes after the last record", body.len() - pos));
    }
    Ok(out)
}

/// How many bytes the record starting at `buf` occupies, or `None` if `buf` is too short to tell.
pub fn record_len(buf: &[u8]) -> Option<usize> {
    let topic_len = u16::from_le_bytes(buf.get(0..2)?.try_into().unwrap()) as usize;
    let key_at = 2 + topic_len + 4 + 8 + 8;
    let key_len = u32::from_le_bytes(buf.get(key_at..key_at + 4)?.try_into().unwrap()) as usize;
    let value_at = key_at + 4 + key_len;
    let value_len = u32::from_le_bytes(buf.get(value_at..value_at + 4)?.try_into().unwrap()) as usize;
    Some(value_at + 4 + value_len + 64)
}

/// Decodes one record; `Ok(None)` if `buf` holds only part of it.
pub fn decode_record(buf: &[u8]) -> Result<Option<(RecordRef<'_>, usize)>, String> {
    let Some(len) = record_len(buf) else { return Ok(None) };
    if buf.len() < len {
        return Ok(None);
    }
    let u32_at = |at: usize| u32::from_le_bytes(buf[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().unwrap());
    let topic_len = u16::from_le_bytes(buf[0..2].try_into().unwrap()) as usize;
    let topic = std::str::from_utf8(&buf[2..2 + topic_len]).map_err(|_| "topic is not UTF-8".to_owned())?;
    let mut at = 2 + topic_len;
    let partition = u32_at(at);
    let offset = u64_at(at + 4);
    let timestamp_ms = u64_at(at + 12) as i64;
    at += 20;
    let key_len = u32_at(at) as usize;
    let key = &buf[at + 4..at + 4 + key_len];
    at += 4 + key_len;
    let value_len = u32_at(at) as usize;
    let value = &buf[at + 4..at + 4 + value_len];
    at += 4 + value_len;
    let prev_hash: Hash = buf[at..at + 32].try_into().unwrap();
    let hash: Hash = buf[at + 32..at + 64].try_into().unwrap();
    Ok(Some((RecordRef { topic, partition, offset, timestamp_ms, key, value, prev_hash, hash }, len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(offset: u64, value: &[u8]) -> RecordRef<'_> {
        RecordRef {
            topic: "t",
            partition: 3,
            offset,
            timestamp_ms: -5,
            key: b"k",
            value,
            prev_hash: [1; 32],
            hash: [2; 32],
        }
    }

    #[test]
    fn frames_round_trip() {
        let mut buf = vec![9, 9]; // frames start anywhere in a buffer
        let mut w = FrameWriter::begin(&mut buf);
        let p0 = w.push(&rec(0, b"hello"));
        let p1 = w.push(&rec(1, b""));
        w.finish();
        let header: [u8; HEADER_LEN] = buf[2..14].try_into().unwrap();
        let HeaderCheck::Ok(h) = parse_header(&header) else { panic!("bad header") };
        let body = &buf[14..14 + h.body_len];
        assert_eq!(crc32c::crc32c(body), h.crc);
        let records = decode_body(body).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].1, rec(0, b"hello"));
        assert_eq!(records[1].1, rec(1, b""));
        assert_eq!(records[0].0 + 14, p0);
        assert_eq!(records[1].0 + 14, p1);
        assert_eq!(decode_record(&buf[p1..]).unwrap().unwrap().0, rec(1, b""));
        assert_eq!(decode_record(&buf[p0..p0 + 10]).unwrap(), None);
    }
}
