//! Which resources a rebuild has met so far, as a Bloom filter: "certainly not" or "perhaps".
//!
//! Why: a rebuild starts from an empty store, so a version of a resource it has not met yet is the
//! resource's only version: it is current, and it replaces no index keys. Finding that out from the
//! `versions` table took a B-tree range lookup per version, about a fifth of the time a rebuild
//! spent applying events; most versions of a device-ingestion log (new readings, and every write's
//! AuditEvent and Provenance) are such first versions. A "perhaps" falls back to the lookup, so a
//! false positive costs time, never correctness.

use std::hash::{Hash, Hasher};

/// A Bloom filter over resource keys, blocked: a key's [`PROBES`] bits all lie in one 64-bit word,
/// so a key costs one cache miss, not one per probe (the filter is far larger than the caches).
pub struct SeenResources {
    words: Vec<u64>,
    /// The number of words less one (a power of two less one).
    mask: u64,
}

/// Bits set per key: with 2^28 bits and 30 M resources (a 10 M-event log), a few per cent false
/// positives.
const PROBES: u32 = 4;

impl SeenResources {
    /// A filter of `2^log2_bits` bits (64 to 2^34).
    pub fn new(log2_bits: u32) -> SeenResources {
        let words = 1usize << (log2_bits.clamp(6, 34) - 6);
        SeenResources { words: vec![0; words], mask: words as u64 - 1 }
    }

    /// Adds `key`; whether it was certainly not there before.
    pub fn insert(&mut self, key: &str) -> bool {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        let hash = h.finish();
        // The low bits choose the word, the high bits six bits at a time the bits in it.
        let word = &mut self.words[(hash & self.mask) as usize];
        let bits = (0..PROBES).fold(0u64, |bits, i| bits | 1 << ((hash >> (64 - 6 * (i + 1))) & 63));
        let new = *word & bits != bits;
        *word |= bits;
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_met_before_is_never_new_and_most_others_are() {
        let mut seen = SeenResources::new(20);
        let keys: Vec<String> = (0..10_000).map(|n| format!("Observation/{n}")).collect();
        let first = keys.iter().filter(|k| seen.insert(k)).count();
        assert!(first > 9_900, "{first} of 10,000 new keys recognised as new");
        for k in &keys {
            assert!(!seen.insert(k), "{k} was met");
        }
        let others = (0..10_000).filter(|n| seen.insert(&format!("AuditEvent/{n}"))).count();
        assert!(others > 9_900, "{others} of 10,000 others recognised as new");
        // A filter too small for its keys says "perhaps" to everything, and is still never wrong.
        let mut tiny = SeenResources::new(6);
        for k in &keys {
            tiny.insert(k);
        }
        assert!(keys.iter().all(|k| !tiny.insert(k)));
        assert!(!tiny.insert("Patient/never-added"));
    }
}
