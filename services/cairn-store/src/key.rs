//! Order-preserving byte keys for the embedded store: a tuple of strings and integers encoded so that
//! comparing the bytes (`memcmp`) orders keys as comparing the tuples would.
//!
//! Why not redb's tuple keys: comparing them decodes every element's length and checks every string
//! for UTF-8 on each comparison; measured, that was an eighth of a projection rebuild's time.
//!
//! Encoding: a string is its bytes with each 0x00 written as 0x00 0xFF, then 0x00 0x00 (so a string
//! sorts before any longer string it is a prefix of, and one string's end is never mistaken for a
//! byte inside another); an `i64` is 8 big-endian bytes with the sign bit flipped; a `u64` is 8
//! big-endian bytes.

/// Builds a key element by element.
#[derive(Default)]
pub struct KeyBuf(Vec<u8>);

impl KeyBuf {
    pub fn new() -> KeyBuf {
        KeyBuf(Vec::with_capacity(96))
    }

    pub fn str(self, s: &str) -> KeyBuf {
        let mut key = self.str_prefix(s);
        key.0.extend_from_slice(&[0, 0]);
        key
    }

    /// A string's bytes without the terminator: a prefix of every key whose next string starts
    /// with `s` (for ranges over `Type/`).
    pub fn str_prefix(mut self, s: &str) -> KeyBuf {
        // Strings with a 0x00 in them are rare: the rest are copied whole.
        if !s.as_bytes().contains(&0) {
            self.0.extend_from_slice(s.as_bytes());
            return self;
        }
        for &b in s.as_bytes() {
            self.0.push(b);
            if b == 0 {
                self.0.push(0xFF);
            }
        }
        self
    }

    /// Elements already encoded: a part of another key (a `versions` key's resource in a
    /// change entry).
    pub fn encoded(mut self, elements: &[u8]) -> KeyBuf {
        self.0.extend_from_slice(elements);
        self
    }

    pub fn i64(mut self, n: i64) -> KeyBuf {
        self.0.extend_from_slice(&((n as u64) ^ (1 << 63)).to_be_bytes());
        self
    }

    pub fn u64(mut self, n: u64) -> KeyBuf {
        self.0.extend_from_slice(&n.to_be_bytes());
        self
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Reads a key's elements back in order.
pub struct KeyReader<'a>(&'a [u8]);

/// A key that does not decode as the table's tuple: the store file is damaged.
#[derive(Debug)]
pub struct BadKey;

impl<'a> KeyReader<'a> {
    pub fn new(key: &'a [u8]) -> KeyReader<'a> {
        KeyReader(key)
    }

    pub fn str(&mut self) -> Result<String, BadKey> {
        let (escaped, rest) = self.split_str()?;
        self.0 = rest;
        // Strings with a 0x00 in them are rare: the rest are copied whole.
        if !escaped.contains(&0) {
            return std::str::from_utf8(escaped).map(str::to_owned).map_err(|_| BadKey);
        }
        let mut out = Vec::with_capacity(escaped.len());
        let mut bytes = escaped.iter();
        while let Some(&b) = bytes.next() {
            out.push(b);
            if b == 0 {
                bytes.next(); // the 0xFF that escapes it
            }
        }
        String::from_utf8(out).map_err(|_| BadKey)
    }

    /// Skips a string without decoding it.
    pub fn skip_str(&mut self) -> Result<(), BadKey> {
        self.0 = self.split_str()?.1;
        Ok(())
    }

    /// The next string as stored (escaped, without its terminator), and what follows it.
    fn split_str(&self) -> Result<(&'a [u8], &'a [u8]), BadKey> {
        let mut from = 0;
        loop {
            // Every 0x00 starts a terminator (0x00 0x00) or an escape (0x00 0xFF).
            let zero = from + self.0[from..].iter().position(|&b| b == 0).ok_or(BadKey)?;
            match self.0.get(zero + 1) {
                Some(0) => return Ok((&self.0[..zero], &self.0[zero + 2..])),
                Some(0xFF) => from = zero + 2,
                _ => return Err(BadKey),
            }
        }
    }

    pub fn i64(&mut self) -> Result<i64, BadKey> {
        Ok((self.u64()? ^ (1 << 63)) as i64)
    }

    pub fn u64(&mut self) -> Result<u64, BadKey> {
        let (head, rest) = self.0.split_first_chunk::<8>().ok_or(BadKey)?;
        self.0 = rest;
        Ok(u64::from_be_bytes(*head))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str, n: i64, t: &str) -> Vec<u8> {
        KeyBuf::new().str(s).i64(n).str(t).bytes().to_vec()
    }

    #[test]
    fn byte_order_is_tuple_order_and_keys_decode_back() {
        let strings = ["", "a", "a\0", "a\0b", "a\u{1}", "ab", "b", "\0", "é", "Patient/1", "Patient/10"];
        let numbers = [i64::MIN, i64::MIN + 1, -5, -1, 0, 1, 7, i64::MAX];
        let mut tuples = Vec::new();
        for s in strings {
            for n in numbers {
                for t in ["", "x", "x\0"] {
                    tuples.push((s.to_owned(), n, t.to_owned()));
                }
            }
        }
        for a in &tuples {
            let ka = key(&a.0, a.1, &a.2);
            let mut r = KeyReader::new(&ka);
            assert_eq!((r.str().unwrap(), r.i64().unwrap(), r.str().unwrap()), a.clone());
            for b in &tuples {
                assert_eq!(ka.cmp(&key(&b.0, b.1, &b.2)), a.cmp(b), "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn damaged_strings_do_not_decode() {
        assert_eq!(KeyReader::new(b"a\0\xFFb\0\0").str().unwrap(), "a\0b");
        for damaged in [&b"abc"[..], b"a\0", b"a\0\x01", b"a\0\xFF", b"\xFF\0\0"] {
            assert!(KeyReader::new(damaged).str().is_err(), "{damaged:?}");
        }
        let mut r = KeyReader::new(b"a\0\0b");
        r.skip_str().unwrap();
        assert!(r.skip_str().is_err(), "no terminator");
    }

    #[test]
    fn a_type_prefix_covers_exactly_that_type() {
        let prefix = KeyBuf::new().str_prefix("Observation/").bytes().to_vec();
        assert!(KeyBuf::new().str("Observation/abc").bytes().starts_with(&prefix));
        assert!(!KeyBuf::new().str("ObservationX/abc").bytes().starts_with(&prefix));
        assert!(KeyReader::new(&[b'a', 0]).str().is_err(), "a truncated key is refused");
    }
}
