//! The per-partition hash chain.
//!
//! `hash(n) = SHA-256(prev_hash || value(n))` with `prev_hash` the hash of record `n - 1`, and for the
//! first record of a partition the genesis hash `SHA-256("cairn-chain-v1\0" || topic || "\0" ||
//! partition as 4 big-endian bytes)`. Binding the genesis to the topic and partition means a whole
//! partition cannot be passed off as another. Altering a value changes its hash; removing or
//! reordering records breaks a `prev_hash` link.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

pub fn genesis(topic: &str, partition: u32) -> Hash {
    let mut h = Sha256::new();
    h.update(b"cairn-chain-v1\0");
    h.update(topic.as_bytes());
    h.update(b"\0");
    h.update(partition.to_be_bytes());
    h.finalize().into()
}

pub fn link(prev: &Hash, value: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(value);
    h.finalize().into()
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
    fn link_is_sha256_of_prev_then_value() {
        let prev = [7u8; 32];
        let mut buf = prev.to_vec();
        buf.extend_from_slice(b"value");
        let expected: Hash = Sha256::digest(&buf).into();
        assert_eq!(link(&prev, b"value"), expected);
    }
}
