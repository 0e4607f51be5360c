//! The per-partition hash chain.
//!
//! `hash(n) = SHA-256(prev_hash || SHA-256(value(n)))` with `prev_hash` the hash of record `n - 1`,
//! and for the first record of a partition the genesis hash `SHA-256("cairn-chain-v2\0" || topic ||
//! "\0" || partition as 4 big-endian bytes)`. Binding the genesis to the topic and partition means a
//! whole partition cannot be passed off as another. Altering a value changes its hash; removing or
//! reordering records breaks a `prev_hash` link.
//!
//! The chain links each record's *digest*, not its bytes, so a proof about some records (an audit
//! export, `cairn audit export`) carries the other records of the stretch as 32-byte digests: the
//! verifier recomputes the chain without seeing anyone else's data. (v1 linked the value itself;
//! logs written before v2 do not verify.)

use crate::frame::RecordRef;
use crate::partition_for_key;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};

pub type Hash = [u8; 32];

pub fn genesis(topic: &str, partition: u32) -> Hash {
    let mut h = Sha256::new();
    h.update(b"cairn-chain-v2\0");
    h.update(topic.as_bytes());
    h.update(b"\0");
    h.update(partition.to_be_bytes());
    h.finalize().into()
}

/// The next chain hash after a record with this value.
pub fn link(prev: &Hash, value: &[u8]) -> Hash {
    link_digest(prev, &digest(value))
}

/// A record's digest: what the chain links, and what stands for a record a proof leaves out.
pub fn digest(value: &[u8]) -> Hash {
    Sha256::digest(value).into()
}

/// The next chain hash after a record with this digest.
pub fn link_digest(prev: &Hash, digest: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(digest);
    h.finalize().into()
}

/// Every partition's chain head (next offset, last hash) while a log is read in order: the one place
/// that decides whether a record is the next link of its chain, for the open-time scan and `verify`.
pub(crate) struct ChainHeads<'t> {
    topics: &'t BTreeMap<String, u32>,
    heads: HashMap<(String, u32), (u64, Hash)>,
}

impl<'t> ChainHeads<'t> {
    pub(crate) fn new(topics: &'t BTreeMap<String, u32>) -> Self {
        ChainHeads { topics, heads: HashMap::new() }
    }

    /// Checks that `r` continues its partition's chain (a created topic and partition, the next
    /// offset, `prev_hash` equal to the head) and advances the head. With `recompute` it also checks
    /// that the key routes to the partition and recomputes the hash: what `verify` adds to the cheaper
    /// open-time check. The error says what is wrong.
    pub(crate) fn advance(&mut self, r: &RecordRef<'_>, recompute: bool) -> Result<(), String> {
        let Some(&count) = self.topics.get(r.topic) else {
            return Err("record of a topic that was never created".into());
        };
        if r.partition >= count {
            return Err(format!("partition {} out of range ({count} partitions)", r.partition));
        }
        if recompute && partition_for_key(r.key, count) != r.partition {
            return Err("key does not route to this partition".into());
        }
        let head =
            self.heads.entry((r.topic.to_owned(), r.partition)).or_insert_with(|| (0, genesis(r.topic, r.partition)));
        if r.offset != head.0 {
            return Err(format!("offset out of sequence (expected {})", head.0));
        }
        if r.prev_hash != head.1 {
            return Err(
                "prev_hash does not match the previous record's hash (record removed, reordered or altered)".into()
            );
        }
        if recompute && link(&r.prev_hash, r.value) != r.hash {
            return Err("hash does not match SHA-256(prev_hash || SHA-256(value)): the record was altered".into());
        }
        *head = (r.offset + 1, r.hash);
        Ok(())
    }

    /// (next offset, head hash) of a partition; the genesis hash if it has no record yet.
    pub(crate) fn head(&self, topic: &str, partition: u32) -> (u64, Hash) {
        self.heads.get(&(topic.to_owned(), partition)).copied().unwrap_or_else(|| (0, genesis(topic, partition)))
    }

    pub(crate) fn into_heads(self) -> HashMap<(String, u32), (u64, Hash)> {
        self.heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn genesis_differs_per_partition_and_topic() {
        assert_ne!(genesis("a", 0), genesis("a", 1));
        assert_ne!(genesis("a", 0), genesis("b", 0));
        assert_ne!(genesis("ab", 0), genesis("a", 0));
    }

    #[test]
    fn link_is_sha256_of_prev_then_the_value_digest() {
        let prev = [7u8; 32];
        let mut buf = prev.to_vec();
        buf.extend_from_slice(&Sha256::digest(b"value"));
        let expected: Hash = Sha256::digest(&buf).into();
        assert_eq!(link(&prev, b"value"), expected);
    }
}
