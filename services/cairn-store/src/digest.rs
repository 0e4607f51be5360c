//! The store digest: one SHA-256 over everything a projection holds, in a canonical order, so that a
//! rebuild can be proven identical, and so that the embedded and CQL backends, given the same
//! events, give the same digest. Each backend feeds the sections in this order, each sorted as
//! noted (byte order of strings, numeric order of numbers).

use sha2::{Digest, Sha256};

#[derive(Default)]
pub struct StoreDigest {
    h: Sha256,
}

impl StoreDigest {
    pub fn new() -> Self {
        Self::default()
    }

    /// 1. Every version, sorted by (`Type/id`, version); `record` is the version's JSON encoding.
    pub fn version(&mut self, key: &str, version_id: u64, record: &[u8]) {
        self.h.update(b"V");
        self.h.update(key.as_bytes());
        self.h.update(b"\0");
        self.h.update(version_id.to_be_bytes());
        self.h.update((record.len() as u64).to_be_bytes());
        self.h.update(record);
    }

    /// 2. The current version of every resource, sorted by key.
    pub fn current(&mut self, key: &str, version_id: u64, deleted: bool) {
        self.h.update(format!("C{key}\0{version_id}\0{}\0", u8::from(deleted)).as_bytes());
    }

    /// 3. The patient index, sorted by (patient, type, id).
    pub fn by_patient(&mut self, patient: &str, resource_type: &str, id: &str) {
        self.h.update(format!("P{patient}\0{resource_type}\0{id}\0").as_bytes());
    }

    /// 4. The patient-date index, sorted by (patient, type, date key, id).
    pub fn by_patient_date(&mut self, patient: &str, resource_type: &str, date_key: i64, id: &str) {
        self.h.update(format!("D{patient}\0{resource_type}\0{date_key}\0{id}\0").as_bytes());
    }

    /// 5. The identifier index, sorted by (type, identifier, id).
    pub fn by_identifier(&mut self, resource_type: &str, identifier: &str, id: &str) {
        self.h.update(format!("I{resource_type}\0{identifier}\0{id}\0").as_bytes());
    }

    pub fn finish(self) -> String {
        hex::encode(self.h.finalize())
    }
}
