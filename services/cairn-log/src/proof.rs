//! Proofs that chosen records are in the sealed log, unaltered, without handing over the rest of it.
//!
//! A [`Span`] is the stretch of one partition between two consecutive seals (or from the partition's
//! start to its first seal) that holds a chosen record. It carries the chosen records whole and every
//! other record of the stretch as its digest (the chain links digests, [`crate::chain`]), with the two
//! seals. [`verify_spans`] recomputes the chain across each span from the first seal's hash to the
//! second's and checks both signatures: a chosen record altered, or a record of the stretch added,
//! removed or reordered, breaks the chain at the closing seal. Nothing outside the spans is needed,
//! so an audit slice for one patient reveals no one else's data, only the digests of their records.
//!
//! What a span does not prove: that every record the slice should hold was chosen. The slice is as
//! complete as the tool that chose its records; what it holds is genuine.

use crate::chain::{self, Hash};
use crate::seal::{Seal, check_signature};
use crate::{EventLog, LogError, Result};
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A stretch of one partition between two seals, proving the chosen records in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub topic: String,
    pub partition: u32,
    /// The seal the stretch continues from; none when it starts at the partition's first record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Seal>,
    /// The seal that closes the stretch: its hash covers the stretch's last record.
    pub until: Seal,
    /// Every record of the stretch in order: the chosen ones whole, the others as digests.
    pub records: Vec<SpanRecord>,
}

/// One record of a span.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpanRecord {
    pub offset: u64,
    /// The record's value, base64 (a chosen record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// SHA-256 of the value, hex (any other record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// The spans proving a set of records, and the chosen records no seal covers yet.
#[derive(Debug, Default)]
pub struct Proof {
    pub spans: Vec<Span>,
    /// (topic, partition, offset) of chosen records after the last seal of their partition.
    pub unsealed: Vec<(String, u32, u64)>,
}

/// Builds the spans that prove the `chosen` offsets of each (topic, partition) against `seals` (as
/// [`crate::seal::read_seals`] returns them).
pub async fn prove(
    log: &dyn EventLog,
    seals: &BTreeMap<(String, u32), Vec<Seal>>,
    chosen: &BTreeMap<(String, u32), BTreeSet<u64>>,
) -> Result<Proof> {
    let mut proof = Proof::default();
    for ((topic, partition), offsets) in chosen {
        let sealed = seals.get(&(topic.clone(), *partition)).map(Vec::as_slice).unwrap_or(&[]);
        // Chosen offsets grouped by the seal that closes their stretch.
        let mut by_closing: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for &offset in offsets {
            match sealed.iter().position(|s| s.next_offset > offset) {
                Some(i) => by_closing.entry(i).or_default().push(offset),
                None => proof.unsealed.push((topic.clone(), *partition, offset)),
            }
        }
        for (closing, wanted) in by_closing {
            let until = &sealed[closing];
            // The latest earlier seal that ends before the stretch (two sealers may overlap and
            // seal the same count twice).
            let after =
                sealed[..closing].iter().rev().find(|s| s.records < until.records && s.next_offset <= wanted[0]);
            let from = after.map_or(0, |s| s.next_offset);
            let span = read_span(log, topic, *partition, from, until, &wanted).await?;
            let expected = until.records - after.map_or(0, |s| s.records);
            if span.len() as u64 != expected {
                return Err(LogError::Corrupt {
                    path: format!("{topic}/{partition}").into(),
                    position: from,
                    detail: format!(
                        "{} records between the seals, which cover {expected}: the log no longer matches its seals \
                         (run `cairn audit verify`)",
                        span.len()
                    ),
                });
            }
            proof.spans.push(Span {
                topic: topic.clone(),
                partition: *partition,
                after: after.cloned(),
                until: until.clone(),
                records: span,
            });
        }
    }
    Ok(proof)
}

/// The records of `topic`/`partition` from offset `from` up to the closing seal, `wanted` ones whole.
async fn read_span(
    log: &dyn EventLog,
    topic: &str,
    partition: u32,
    from: u64,
    until: &Seal,
    wanted: &[u64],
) -> Result<Vec<SpanRecord>> {
    let wanted: BTreeSet<u64> = wanted.iter().copied().collect();
    let mut out = Vec::new();
    let mut next = from;
    'read: loop {
        let records = log.read(topic, partition, next, 4096).await?;
        let Some(last) = records.last() else { break };
        next = last.offset + 1;
        for r in records {
            if r.offset >= until.next_offset {
                break 'read;
            }
            out.push(if wanted.contains(&r.offset) {
                SpanRecord {
                    offset: r.offset,
                    value: Some(base64::engine::general_purpose::STANDARD.encode(&r.value)),
                    digest: None,
                }
            } else {
                SpanRecord { offset: r.offset, value: None, digest: Some(hex::encode(chain::digest(&r.value))) }
            });
        }
        if next >= until.next_offset {
            break;
        }
    }
    Ok(out)
}

/// A record a span proved, with its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proven {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub value: Vec<u8>,
}

/// Checks every span (its chain from the opening seal's hash, or the partition's genesis, to the
/// closing seal's, and both seals' signatures by one of `keys`; with no keys the signatures are not
/// checked, which the caller must say), and that no two spans of a partition cover the same records
/// (a repeated span would prove its records twice). Returns the proven records; the error names the
/// first span that fails and why.
pub fn verify_spans(spans: &[Span], keys: &[ed25519_dalek::VerifyingKey]) -> std::result::Result<Vec<Proven>, String> {
    // The records each span covers, by seal counts: (after, until]. Disjoint per partition.
    let mut covered: BTreeMap<(&str, u32), Vec<(u64, u64)>> = BTreeMap::new();
    for span in spans {
        let from = span.after.as_ref().map_or(0, |s| s.records);
        if from >= span.until.records {
            return Err(format!(
                "{}/{}: a span from {from} to {} records covers nothing",
                span.topic, span.partition, span.until.records
            ));
        }
        covered.entry((span.topic.as_str(), span.partition)).or_default().push((from, span.until.records));
    }
    for ((topic, partition), ranges) in &mut covered {
        ranges.sort_unstable();
        if let Some(w) = ranges.windows(2).find(|w| w[1].0 < w[0].1) {
            return Err(format!(
                "{topic}/{partition}: two spans cover the same records ({}..{} and {}..{}): a record would be \
                 proven twice",
                w[0].0, w[0].1, w[1].0, w[1].1
            ));
        }
    }
    let mut proven = Vec::new();
    for span in spans {
        let at = format!("{}/{} before offset {}", span.topic, span.partition, span.until.next_offset);
        for seal in span.after.iter().chain(std::iter::once(&span.until)) {
            if seal.topic != span.topic || seal.partition != span.partition {
                return Err(format!("{at}: a seal of {}/{} closes it", seal.topic, seal.partition));
            }
            if !keys.is_empty() {
                check_signature(seal, keys)
                    .map_err(|e| format!("{at}: the seal after {} records {e}", seal.records))?;
            }
        }
        let (mut count, mut hash, mut min_offset) = match &span.after {
            Some(s) => (s.records, parse_hash(&s.hash).map_err(|e| format!("{at}: opening seal: {e}"))?, s.next_offset),
            None => (0, chain::genesis(&span.topic, span.partition), 0),
        };
        for r in &span.records {
            if r.offset < min_offset || r.offset >= span.until.next_offset {
                return Err(format!("{at}: offset {} is out of order or outside its seals", r.offset));
            }
            min_offset = r.offset + 1;
            let digest = match (&r.value, &r.digest) {
                (Some(value), None) => {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(value)
                        .map_err(|_| format!("{at}: offset {}: the value is not base64", r.offset))?;
                    let digest = chain::digest(&bytes);
                    proven.push(Proven {
                        topic: span.topic.clone(),
                        partition: span.partition,
                        offset: r.offset,
                        value: bytes,
                    });
                    digest
                }
                (None, Some(digest)) => parse_hash(digest).map_err(|e| format!("{at}: offset {}: {e}", r.offset))?,
                _ => return Err(format!("{at}: offset {} has neither a value nor a digest (or both)", r.offset)),
            };
            hash = chain::link_digest(&hash, &digest);
            count += 1;
        }
        if count != span.until.records || hex::encode(hash) != span.until.hash {
            return Err(format!(
                "{at}: the chain does not reach the closing seal ({count} records, seal says {}): a record was \
                 altered, added or removed",
                span.until.records
            ));
        }
    }
    Ok(proven)
}

fn parse_hash(text: &str) -> std::result::Result<Hash, String> {
    let mut hash = [0u8; 32];
    hex::decode_to_slice(text, &mut hash).map_err(|_| "a hash is 64 hex digits".to_owned())?;
    Ok(hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NewRecord;
    use crate::embedded::{EmbeddedLog, EmbeddedOptions};
    use crate::seal::{SEAL_TOPIC, SealSigner};
    use std::sync::Arc;

    /// A log of 40 records on 2 partitions, sealed by a real sealer after every 10 appends.
    async fn sealed_log(dir: &std::path::Path, signer: Arc<SealSigner>) -> Arc<dyn EventLog> {
        let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(dir, EmbeddedOptions::default()).unwrap());
        log.create_topic("t", 2).await.unwrap();
        log.create_topic(SEAL_TOPIC, 1).await.unwrap();
        let sealer = tokio::spawn(crate::seal::run_sealer(log.clone(), vec!["t".into()], Some(signer)));
        for round in 0..4 {
            for i in 0..10 {
                log.append(NewRecord::new("t", format!("k{}", i % 3), format!("v{round}-{i}"))).await.unwrap();
            }
            // Wait for the seals of this round (the sealer seals about once a second).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let seals = crate::seal::read_seals(log.as_ref()).await.unwrap();
                let covered: u64 = seals.values().map(|s| s.last().map_or(0, |s| s.records)).sum();
                if covered == (round + 1) * 10 {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "the sealer did not seal round {round}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        sealer.abort();
        log
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    }

    #[test]
    fn a_proof_shows_the_chosen_records_and_catches_any_change() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let signer = Arc::new(SealSigner::generate());
            let key = parse(&signer.public_key_hex());
            let log = sealed_log(dir.path(), signer).await;
            let seals = crate::seal::read_seals(log.as_ref()).await.unwrap();
            let p = crate::partition_for_key(b"k1", 2);
            let all = log.read("t", p, 0, 100).await.unwrap();
            let chosen_records: Vec<_> = all.iter().filter(|r| r.key == b"k1").collect();
            let chosen = BTreeMap::from([(("t".to_owned(), p), chosen_records.iter().map(|r| r.offset).collect())]);
            let proof = prove(log.as_ref(), &seals, &chosen).await.unwrap();
            assert!(proof.unsealed.is_empty());
            let proven = verify_spans(&proof.spans, &[key]).unwrap();
            let values: Vec<&[u8]> = proven.iter().map(|r| r.value.as_slice()).collect();
            let expected: Vec<&[u8]> = chosen_records.iter().map(|r| r.value.as_slice()).collect();
            assert_eq!(values, expected, "exactly the chosen records, in order");
            // Nobody else's values are in the proof.
            let text = serde_json::to_string(&proof.spans).unwrap();
            for r in all.iter().filter(|r| r.key != b"k1") {
                assert!(!text.contains(&base64::engine::general_purpose::STANDARD.encode(&r.value)));
            }

            // A chosen value altered.
            let mut altered = proof.spans.clone();
            let r = altered[0].records.iter_mut().find(|r| r.value.is_some()).unwrap();
            r.value = Some(base64::engine::general_purpose::STANDARD.encode(b"v9-9"));
            assert!(verify_spans(&altered, &[key]).unwrap_err().contains("does not reach the closing seal"));
            // Another record left out.
            let mut removed = proof.spans.clone();
            let i = removed[0].records.iter().position(|r| r.digest.is_some()).unwrap();
            removed[0].records.remove(i);
            assert!(verify_spans(&removed, &[key]).is_err());
            // A seal re-signed by someone else's key.
            let forger = SealSigner::generate();
            let mut forged = proof.spans.clone();
            forger.sign(&mut forged[0].until);
            assert!(verify_spans(&forged, &[key]).unwrap_err().contains("not signed by a trusted key"));
            // The whole proof moved to another partition.
            let mut moved = proof.spans.clone();
            moved[0].partition = 1 - p;
            assert!(verify_spans(&moved, &[key]).is_err());
            // A span repeated (its records would count twice), and a span that covers nothing.
            let mut repeated = proof.spans.clone();
            repeated.push(proof.spans[0].clone());
            assert!(verify_spans(&repeated, &[key]).unwrap_err().contains("two spans cover the same records"));
            let mut empty = proof.spans[0].clone();
            empty.after = Some(empty.until.clone());
            empty.records.clear();
            assert!(verify_spans(&[empty], &[key]).unwrap_err().contains("covers nothing"));
            // A span from the partition's first record moved to another partition: the genesis differs.
            let first = proof.spans.iter().find(|s| s.after.is_none()).expect("a span from the start").clone();
            let mut moved = first.clone();
            moved.partition = 1 - p;
            moved.until.partition = 1 - p;
            let err = verify_spans(&[moved], &[]).unwrap_err();
            assert!(err.contains("does not reach the closing seal"), "{err}");
            // A chosen record dropped, and two records swapped.
            let mut dropped = first.clone();
            let i = dropped.records.iter().position(|r| r.value.is_some()).unwrap();
            dropped.records.remove(i);
            assert!(verify_spans(&[dropped], &[key]).is_err());
            let mut swapped = first.clone();
            if swapped.records.len() >= 2 {
                let (a, b) = (swapped.records[0].clone(), swapped.records[1].clone());
                swapped.records[0] = SpanRecord { offset: a.offset, ..b };
                swapped.records[1] = SpanRecord { offset: b.offset, ..a };
                assert!(verify_spans(&[swapped], &[key]).is_err());
            }
        });
    }

    fn parse(hex_key: &str) -> ed25519_dalek::VerifyingKey {
        crate::seal::parse_public_key(hex_key).unwrap()
    }
}
