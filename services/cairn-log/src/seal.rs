//! Seals: the chain anchored outside the partitions it covers, for logs that cannot chain at append.
//!
//! On Kafka several processes write one partition and no producer knows the previous record's hash,
//! so records carry no chain (decision 0005). A **sealer** follows every partition in order, computes
//! the same chain as the embedded log (`hash(n) = SHA-256(hash(n-1) || SHA-256(value(n)))` from the genesis of
//! the topic and partition), and appends, about once a second per busy partition, a [`Seal`] to
//! [`SEAL_TOPIC`]: "the first `records` records of this partition end at offset `next_offset` with
//! chain hash `hash`". [`verify_sealed`] recomputes every partition's chain from its first record and
//! checks each seal: a record altered, removed or inserted before a seal changes the hash or the count
//! at that seal. Records after the last seal are reported as unsealed, not as verified.
//!
//! Seals are signed with an Ed25519 key ([`SealSigner`]) when the sealer has one: whoever can rewrite
//! the log's records and recompute their chain still cannot make seals that verify against the public
//! key an auditor holds (`cairn log verify --seal-public-key`).

use crate::chain::{self, Hash};
use crate::{EventLog, LogError, NewRecord, Result, Tailed};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where seals go: one partition, so every seal is in one ordered stream.
pub const SEAL_TOPIC: &str = "cairn.chain";

/// The consumer group in which sealer processes share the partitions they seal.
pub const SEALER_GROUP: &str = "cairn-sealer";

/// How often a sealer seals a partition that received records.
pub const SEAL_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    pub topic: String,
    pub partition: u32,
    /// How many records of the partition the chain covers ...
    pub records: u64,
    /// ... the offset after the last of them ...
    pub next_offset: u64,
    /// ... and the chain hash after the last of them (hex).
    pub hash: String,
    /// When the seal was made (ms since the epoch).
    pub sealed_at_ms: i64,
    /// Ed25519 signature (hex) over [`Seal::signed_bytes`], by the key named in `key_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// The signing key's id: the first 16 hex digits of SHA-256 of its public key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

impl Seal {
    fn key(&self) -> String {
        format!("{}/{}", self.topic, self.partition)
    }

    /// What a signature covers: every field but the signature itself, unambiguously delimited.
    pub fn signed_bytes(&self) -> Vec<u8> {
        format!(
            "cairn-seal-v1\0{}\0{}\0{}\0{}\0{}\0{}",
            self.topic, self.partition, self.records, self.next_offset, self.hash, self.sealed_at_ms
        )
        .into_bytes()
    }
}

/// The key a sealer signs its seals with.
pub struct SealSigner {
    key: ed25519_dalek::SigningKey,
}

impl SealSigner {
    pub fn generate() -> SealSigner {
        SealSigner { key: ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng) }
    }

    pub fn from_secret(secret: &[u8; 32]) -> SealSigner {
        SealSigner { key: ed25519_dalek::SigningKey::from_bytes(secret) }
    }

    pub fn secret(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The public key, hex: what verifiers are given.
    pub fn public_key_hex(&self) -> String {
        hex::encode(self.key.verifying_key().to_bytes())
    }

    /// The key id seals carry: the first 16 hex digits of SHA-256 of the public key.
    pub fn key_id(&self) -> String {
        key_id(&self.key.verifying_key())
    }

    /// The public key as a JWK (RFC 8037: `OKP`, `Ed25519`), for the JWKS.
    pub fn public_jwk(&self) -> serde_json::Value {
        use base64::Engine;
        serde_json::json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.key.verifying_key().to_bytes()),
            "kid": self.key_id(),
            "alg": "EdDSA",
            "use": "sig",
        })
    }

    pub(crate) fn sign(&self, seal: &mut Seal) {
        use ed25519_dalek::Signer;
        seal.key_id = Some(key_id(&self.key.verifying_key()));
        seal.signature = Some(hex::encode(self.key.sign(&seal.signed_bytes()).to_bytes()));
    }
}

/// A public key given as 64 hex digits.
pub fn parse_public_key(text: &str) -> std::result::Result<ed25519_dalek::VerifyingKey, String> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut bytes).map_err(|_| "a seal public key is 64 hex digits".to_owned())?;
    ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not an Ed25519 public key: {e}"))
}

/// The log seal keys of a JWKS (`/jwks`): its `OKP` `Ed25519` keys. Token keys are skipped.
pub fn seal_keys_of_jwks(jwks: &serde_json::Value) -> std::result::Result<Vec<ed25519_dalek::VerifyingKey>, String> {
    use base64::Engine;
    let keys = jwks["keys"].as_array().ok_or("not a JWKS: no \"keys\" array")?;
    let mut found = Vec::new();
    for k in keys.iter().filter(|k| k["kty"] == "OKP" && k["crv"] == "Ed25519") {
        let x = k["x"].as_str().ok_or("an Ed25519 key without \"x\"")?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(x)
            .map_err(|_| "an Ed25519 key whose \"x\" is not base64url".to_owned())?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| "an Ed25519 key whose \"x\" is not 32 bytes".to_owned())?;
        found.push(ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not an Ed25519 key: {e}"))?);
    }
    if found.is_empty() {
        return Err("the JWKS has no log seal key (OKP, Ed25519)".into());
    }
    Ok(found)
}

fn key_id(key: &ed25519_dalek::VerifyingKey) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(key.to_bytes())[..8])
}

/// Whether `seal` carries a valid signature by one of `keys`; the error says what is wrong.
pub(crate) fn check_signature(seal: &Seal, keys: &[ed25519_dalek::VerifyingKey]) -> std::result::Result<(), String> {
    use ed25519_dalek::Verifier;
    let Some(signature) = &seal.signature else { return Err("is not signed".into()) };
    let mut bytes = [0u8; 64];
    hex::decode_to_slice(signature, &mut bytes).map_err(|_| "has a malformed signature".to_owned())?;
    let signature = ed25519_dalek::Signature::from_bytes(&bytes);
    if keys.iter().any(|k| k.verify(&seal.signed_bytes(), &signature).is_ok()) {
        Ok(())
    } else {
        Err(format!("is not signed by a trusted key (key id {})", seal.key_id.as_deref().unwrap_or("none")))
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Every seal in the log, per (topic, partition), by the number of records it covers.
pub async fn read_seals(log: &dyn EventLog) -> Result<BTreeMap<(String, u32), Vec<Seal>>> {
    let mut seals: BTreeMap<(String, u32), Vec<Seal>> = BTreeMap::new();
    let Ok(partitions) = log.partitions(SEAL_TOPIC) else { return Ok(seals) };
    for p in 0..partitions {
        let mut from = 0;
        loop {
            let records = log.read(SEAL_TOPIC, p, from, 4096).await?;
            let Some(last) = records.last() else { break };
            from = last.offset + 1;
            for r in records {
                let seal: Seal = serde_json::from_slice(&r.value).map_err(|e| LogError::Corrupt {
                    path: format!("{SEAL_TOPIC}/{p}").into(),
                    position: r.offset,
                    detail: format!("not a seal: {e}"),
                })?;
                seals.entry((seal.topic.clone(), seal.partition)).or_default().push(seal);
            }
        }
    }
    // Two sealers may overlap during a reassignment and seal out of order; each seal is checked at
    // its own count.
    for list in seals.values_mut() {
        list.sort_by_key(|s| s.records);
    }
    Ok(seals)
}

/// Whether the newest seal of every partition of `topics` ends at the partition's end offset. Exact
/// on the embedded log (dense offsets); on Kafka, transaction markers after a partition's last record
/// can keep this false.
pub async fn sealed_to_end(log: &dyn EventLog, topics: &[&str]) -> Result<bool> {
    let seals = read_seals(log).await?;
    for topic in topics {
        for p in 0..log.partitions(topic)? {
            let end = log.end_offset(topic, p).await?;
            let sealed = seals.get(&(topic.to_string(), p)).and_then(|v| v.last()).map_or(0, |s| s.next_offset);
            if sealed < end {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Seals the partitions of `topics` that the log assigns to this process, forever. Each partition
/// resumes from its latest seal. A failure (a broker away, a seal that cannot be appended) is logged
/// and the topic's sealing starts again after a pause: it never stops for good.
pub async fn run_sealer(log: Arc<dyn EventLog>, topics: Vec<String>, signer: Option<Arc<SealSigner>>) -> Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for topic in topics {
        let (log, signer) = (log.clone(), signer.clone());
        tasks.spawn(async move {
            let mut failures = 0u32;
            loop {
                let result = match read_seals(log.as_ref()).await {
                    Ok(seals) => seal_topic(log.clone(), topic.clone(), Arc::new(seals), signer.clone()).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => return,
                    Err(e) => {
                        failures += 1;
                        let wait = Duration::from_millis(200 * 2u64.pow(failures.min(5)));
                        tracing::error!(topic = %topic, error = %e, retry_in_ms = wait.as_millis() as u64, "log sealer failed; retrying");
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| LogError::Failed(format!("sealer task: {e}")))?;
    }
    Ok(())
}

async fn seal_topic(
    log: Arc<dyn EventLog>,
    topic: String,
    seals: Arc<BTreeMap<(String, u32), Vec<Seal>>>,
    signer: Option<Arc<SealSigner>>,
) -> Result<()> {
    let mut assignments = log.assignments(&format!("{SEALER_GROUP}.{topic}"), &topic);
    // Chain heads survive reassignment within this process: (records, next offset, hash).
    let mut heads: BTreeMap<u32, (u64, u64, Hash)> = BTreeMap::new();
    let mut sealed: BTreeMap<u32, u64> = BTreeMap::new();
    let Some(first) = assignments.next().await else { return Ok(()) };
    let mut assigned = first?;
    loop {
        let mut from = Vec::new();
        for &p in &assigned {
            // Resume from the newest seal: ours from before a reassignment, or the one in the log.
            let from_log = seals.get(&(topic.clone(), p)).and_then(|v| v.last()).map(|s| {
                let mut hash = [0u8; 32];
                hex::decode_to_slice(&s.hash, &mut hash).ok()?;
                Some((s.records, s.next_offset, hash))
            });
            let head = match (heads.get(&p), from_log.flatten()) {
                (Some(&mine), Some(theirs)) if theirs.0 > mine.0 => theirs,
                (Some(&mine), _) => mine,
                (None, Some(theirs)) => theirs,
                (None, None) => (0, 0, chain::genesis(&topic, p)),
            };
            heads.insert(p, head);
            sealed.entry(p).or_insert(head.0);
            from.push((p, head.1));
        }
        let mut merged = log.tail_partitions(&topic, &from);
        let mut tick = tokio::time::interval(SEAL_EVERY);
        loop {
            tokio::select! {
                change = assignments.next() => match change {
                    Some(change) => { assigned = change?; break; }
                    None => return Ok(()),
                },
                item = merged.next(), if !assigned.is_empty() => match item {
                    Some(Ok(Tailed::Record(r))) => {
                        let head = heads.get_mut(&r.partition).expect("a tailed partition has a head");
                        head.2 = chain::link(&head.2, &r.value);
                        head.0 += 1;
                        head.1 = r.offset + 1;
                    }
                    Some(Ok(Tailed::Passed { partition, next_offset })) => {
                        let head = heads.get_mut(&partition).expect("a tailed partition has a head");
                        head.1 = head.1.max(next_offset);
                    }
                    Some(Err(e)) => return Err(e),
                    None => return Ok(()),
                },
                _ = tick.tick() => {
                    for &p in &assigned {
                        let (records, next_offset, hash) = heads[&p];
                        if sealed.get(&p).is_some_and(|&s| s >= records) {
                            continue;
                        }
                        let mut seal = Seal {
                            topic: topic.clone(),
                            partition: p,
                            records,
                            next_offset,
                            hash: hex::encode(hash),
                            sealed_at_ms: now_ms(),
                            signature: None,
                            key_id: None,
                        };
                        if let Some(signer) = &signer {
                            signer.sign(&mut seal);
                        }
                        let value = serde_json::to_vec(&seal).expect("a seal serializes");
                        log.append(NewRecord::new(SEAL_TOPIC, seal.key(), value)).await?;
                        sealed.insert(p, records);
                    }
                }
            }
        }
    }
}

/// What [`verify_sealed`] found in one partition.
#[derive(Debug, Clone, Serialize)]
pub struct SealedPartition {
    pub topic: String,
    pub partition: u32,
    pub records: u64,
    pub seals_checked: usize,
    /// Records after the newest seal: read and chained, but nothing vouches for them yet.
    pub unsealed_records: u64,
    pub head_hash: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SealReport {
    pub partitions: Vec<SealedPartition>,
    pub records: u64,
    pub seals_checked: usize,
    /// Whether every seal's signature was checked against trusted keys.
    pub signatures_checked: bool,
    /// The first problem found, if any.
    pub problem: Option<String>,
}

impl SealReport {
    pub fn ok(&self) -> bool {
        self.problem.is_none()
    }
}

/// Recomputes every partition's chain (except the seal topic's) and checks it against every seal.
/// `progress(records_done)` is called as it goes.
/// With `trusted_keys`, every seal must also carry a valid signature by one of them.
pub async fn verify_sealed(
    log: &dyn EventLog,
    trusted_keys: &[ed25519_dalek::VerifyingKey],
    mut progress: impl FnMut(u64),
) -> Result<SealReport> {
    let seals = read_seals(log).await?;
    let mut report = SealReport {
        partitions: Vec::new(),
        records: 0,
        seals_checked: 0,
        signatures_checked: !trusted_keys.is_empty(),
        problem: None,
    };
    if !trusted_keys.is_empty() {
        for list in seals.values() {
            for seal in list {
                if let Err(why) = check_signature(seal, trusted_keys) {
                    report.problem = Some(format!(
                        "the seal of {}/{} at {} records {why}: the seals were forged or made by an unknown key",
                        seal.topic, seal.partition, seal.records
                    ));
                    return Ok(report);
                }
            }
        }
    }
    let mut unknown: Vec<&(String, u32)> =
        seals.keys().filter(|(t, p)| log.partitions(t).map_or(true, |n| *p >= n)).collect();
    if let Some((t, p)) = unknown.pop() {
        report.problem =
            Some(format!("seals name {t}/{p}, which the log does not have (a topic or partition removed)"));
        return Ok(report);
    }
    for info in log.topics() {
        if info.name == SEAL_TOPIC {
            continue;
        }
        for p in 0..info.partitions {
            let expected = seals.get(&(info.name.clone(), p)).map(Vec::as_slice).unwrap_or(&[]);
            let (part, problem) = verify_partition(log, &info.name, p, expected, &mut |n| {
                progress(report.records + n);
            })
            .await?;
            report.records += part.records;
            report.seals_checked += part.seals_checked;
            report.partitions.push(part);
            if problem.is_some() {
                report.problem = problem;
                return Ok(report);
            }
        }
    }
    Ok(report)
}

async fn verify_partition(
    log: &dyn EventLog,
    topic: &str,
    partition: u32,
    seals: &[Seal],
    progress: &mut impl FnMut(u64),
) -> Result<(SealedPartition, Option<String>)> {
    let mut hash = chain::genesis(topic, partition);
    let mut count = 0u64;
    let mut next_seal = 0;
    let mut from = 0u64;
    let mut last_offset: Option<u64> = None;
    let started = Instant::now();
    let mut problem = None;
    'read: loop {
        let records = log.read(topic, partition, from, 4096).await?;
        let Some(last) = records.last() else { break };
        from = last.offset + 1;
        for r in &records {
            // A seal covering `count` records must end after the last of them and not after this one.
            while let Some(s) = seals.get(next_seal).filter(|s| s.records == count) {
                if let Some(p) = check_seal(s, count, &hash, last_offset, Some(r.offset)) {
                    problem = Some(p);
                    break 'read;
                }
                next_seal += 1;
            }
            hash = chain::link(&hash, &r.value);
            count += 1;
            last_offset = Some(r.offset);
        }
        progress(count);
    }
    if problem.is_none() {
        while let Some(s) = seals.get(next_seal).filter(|s| s.records == count) {
            if let Some(p) = check_seal(s, count, &hash, last_offset, None) {
                problem = Some(p);
                break;
            }
            next_seal += 1;
        }
    }
    if problem.is_none()
        && let Some(s) = seals.get(next_seal)
    {
        problem = Some(if s.records > count {
            format!(
                "{topic}/{partition}: a seal covers {} records but the partition has only {count}: records were removed",
                s.records
            )
        } else {
            format!("{topic}/{partition}: seals out of order at {} records", s.records)
        });
    }
    tracing::debug!(
        topic,
        partition,
        records = count,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "partition verified"
    );
    let unsealed = count - seals.get(next_seal.wrapping_sub(1)).filter(|_| next_seal > 0).map_or(0, |s| s.records);
    let part = SealedPartition {
        topic: topic.to_owned(),
        partition,
        records: count,
        seals_checked: next_seal,
        unsealed_records: unsealed,
        head_hash: hex::encode(hash),
    };
    Ok((part, problem))
}

/// Checks one seal against the chain after `count` records; the error names what is wrong.
fn check_seal(s: &Seal, count: u64, hash: &Hash, last_offset: Option<u64>, next_offset: Option<u64>) -> Option<String> {
    let at = format!("{}/{} after {count} records", s.topic, s.partition);
    if s.hash != hex::encode(hash) {
        return Some(format!(
            "{at}: chain hash differs from the seal made at {} ms: a record was altered, removed or inserted",
            s.sealed_at_ms
        ));
    }
    if last_offset.is_some_and(|o| s.next_offset <= o) || next_offset.is_some_and(|o| s.next_offset > o) {
        return Some(format!(
            "{at}: the seal ends at offset {} but the records do not: records were moved",
            s.next_offset
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedded::{EmbeddedLog, EmbeddedOptions};

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    }

    async fn log_with_records(dir: &std::path::Path) -> Arc<dyn EventLog> {
        let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(dir, EmbeddedOptions::default()).unwrap());
        log.create_topic("t", 2).await.unwrap();
        log.create_topic(SEAL_TOPIC, 1).await.unwrap();
        for i in 0..50 {
            log.append(NewRecord::new("t", format!("k{}", i % 5), format!("v{i}"))).await.unwrap();
        }
        log
    }

    async fn seal(log: &dyn EventLog, topic: &str, partition: u32, records: u64, next_offset: u64, hash: &str) {
        let s = Seal {
            topic: topic.into(),
            partition,
            records,
            next_offset,
            hash: hash.into(),
            sealed_at_ms: 1,
            signature: None,
            key_id: None,
        };
        log.append(NewRecord::new(SEAL_TOPIC, s.key(), serde_json::to_vec(&s).unwrap())).await.unwrap();
    }

    #[test]
    fn the_sealer_seals_what_verify_then_checks() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let log = log_with_records(dir.path()).await;
            let signer = Arc::new(SealSigner::generate());
            let sealer = tokio::spawn(run_sealer(log.clone(), vec!["t".into()], Some(signer.clone())));
            tokio::time::sleep(SEAL_EVERY * 2 + Duration::from_millis(300)).await;
            sealer.abort();
            let trusted = [parse_public_key(&signer.public_key_hex()).unwrap()];
            let report = verify_sealed(log.as_ref(), &trusted, |_| {}).await.unwrap();
            assert!(report.ok(), "{:?}", report.problem);
            assert!(report.signatures_checked);
            assert_eq!(report.records, 50);
            // Another key's public key: every seal is refused.
            let stranger = [parse_public_key(&SealSigner::generate().public_key_hex()).unwrap()];
            let refused = verify_sealed(log.as_ref(), &stranger, |_| {}).await.unwrap();
            assert!(refused.problem.as_deref().unwrap().contains("not signed by a trusted key"), "{refused:?}");
            assert!(report.seals_checked >= 2, "at least one seal per partition that has records");
            assert!(report.partitions.iter().all(|p| p.unsealed_records == 0));
            // The sealer computes the same chain the embedded log keeps.
            for part in &report.partitions {
                let records = log.read("t", part.partition, 0, 1000).await.unwrap();
                assert_eq!(hex::encode(records.last().unwrap().hash.unwrap()), part.head_hash);
            }
            // Records after the last seal are reported as unsealed, not verified.
            log.append(NewRecord::new("t", "k0", "late")).await.unwrap();
            let report = verify_sealed(log.as_ref(), &[], |_| {}).await.unwrap();
            assert!(report.ok());
            assert_eq!(report.partitions.iter().map(|p| p.unsealed_records).sum::<u64>(), 1);
        });
    }

    #[test]
    fn a_signature_covers_every_field() {
        let signer = SealSigner::generate();
        let trusted = [parse_public_key(&signer.public_key_hex()).unwrap()];
        let mut s = Seal {
            topic: "t".into(),
            partition: 1,
            records: 10,
            next_offset: 11,
            hash: "ab".repeat(32),
            sealed_at_ms: 5,
            signature: None,
            key_id: None,
        };
        assert!(check_signature(&s, &trusted).unwrap_err().contains("not signed"));
        signer.sign(&mut s);
        assert!(check_signature(&s, &trusted).is_ok());
        let restored = SealSigner::from_secret(&signer.secret());
        assert_eq!(restored.public_key_hex(), signer.public_key_hex());
        for tamper in [
            |s: &mut Seal| s.records += 1,
            |s: &mut Seal| s.next_offset += 1,
            |s: &mut Seal| s.partition += 1,
            |s: &mut Seal| s.hash = "cd".repeat(32),
            |s: &mut Seal| s.sealed_at_ms += 1,
            |s: &mut Seal| s.topic = "u".into(),
        ] {
            let mut forged = s.clone();
            tamper(&mut forged);
            assert!(check_signature(&forged, &trusted).is_err(), "{forged:?}");
        }
        assert!(parse_public_key("zz").is_err());
    }

    #[test]
    fn a_seal_that_does_not_match_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let log = log_with_records(dir.path()).await;
            let records = log.read("t", 0, 0, 1000).await.unwrap();
            let n = records.len() as u64;
            let good = hex::encode(records.last().unwrap().hash.unwrap());
            seal(log.as_ref(), "t", 0, n, n, &good).await;
            assert!(verify_sealed(log.as_ref(), &[], |_| {}).await.unwrap().ok());

            // A seal whose hash differs: what an altered record looks like.
            seal(log.as_ref(), "t", 0, 3, 3, &"00".repeat(32)).await;
            let report = verify_sealed(log.as_ref(), &[], |_| {}).await.unwrap();
            assert!(
                report.problem.as_deref().unwrap().contains("t/0 after 3 records: chain hash differs"),
                "{report:?}"
            );
        });
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let log = log_with_records(dir.path()).await;
            // A seal covering more records than the partition has: records were removed.
            seal(log.as_ref(), "t", 1, 10_000, 10_000, &"00".repeat(32)).await;
            let report = verify_sealed(log.as_ref(), &[], |_| {}).await.unwrap();
            assert!(report.problem.as_deref().unwrap().contains("records were removed"), "{report:?}");
            // A seal naming a partition the log does not have.
            seal(log.as_ref(), "t", 7, 1, 1, &"00".repeat(32)).await;
            let report = verify_sealed(log.as_ref(), &[], |_| {}).await.unwrap();
            assert!(report.problem.as_deref().unwrap().contains("t/7"), "{report:?}");
        });
    }
}
