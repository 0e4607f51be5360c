//! Behaviour of the embedded log: durability, atomicity, corruption handling, verification.

use crate::embedded::{EmbeddedLog, EmbeddedOptions};
use crate::verify::verify_embedded;
use crate::{EventLog, LogError, NewRecord, Position, Tailed, chain, frame};
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

fn open(dir: &Path) -> EmbeddedLog {
    EmbeddedLog::open(dir, EmbeddedOptions::default()).unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn rec(topic: &str, key: &str, value: &str) -> NewRecord {
    NewRecord::new(topic, key.as_bytes(), value.as_bytes())
}

fn segment0(dir: &Path) -> PathBuf {
    dir.join("segments").join("0000000000.seg")
}

/// Tiny xorshift so tests need no RNG crate; seeded from the clock and printed on failure.
struct Rng(u64);
impl Rng {
    fn from_clock() -> Rng {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn appends_are_routed_by_key_and_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let log = open(tmp.path());
    rt().block_on(async {
        log.create_topic("fhir", 4).await.unwrap();
        let mut by_partition: BTreeMap<u32, Vec<(u64, String)>> = BTreeMap::new();
        for i in 0..40 {
            let key = format!("Patient/{}", i % 5);
            let value = format!("event-{i}");
            let pos = log.append(rec("fhir", &key, &value)).await.unwrap();
            assert_eq!(pos.partition, log.partition_for("fhir", key.as_bytes()).unwrap());
            by_partition.entry(pos.partition).or_default().push((pos.offset, value));
        }
        for (partition, written) in by_partition {
            let offsets: Vec<u64> = written.iter().map(|w| w.0).collect();
            assert_eq!(offsets, (0..offsets.len() as u64).collect::<Vec<_>>(), "dense offsets");
            assert_eq!(log.end_offset("fhir", partition).await.unwrap(), offsets.len() as u64);
            let read = log.read("fhir", partition, 0, 1000).await.unwrap();
            let values: Vec<String> = read.iter().map(|r| String::from_utf8(r.value.clone()).unwrap()).collect();
            assert_eq!(values, written.iter().map(|w| w.1.clone()).collect::<Vec<_>>());
            // Each record carries its chain link.
            let mut prev = chain::genesis("fhir", partition);
            for r in &read {
                assert_eq!(r.prev_hash, Some(prev));
                prev = chain::link(&prev, &r.value);
                assert_eq!(r.hash, Some(prev));
            }
            let tail = log.read("fhir", partition, 2, 2).await.unwrap();
            assert_eq!(tail.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![2, 3]);
        }
    });
}

#[test]
fn bad_requests_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let log = open(tmp.path());
    rt().block_on(async {
        assert!(matches!(log.append(rec("nope", "k", "v")).await, Err(LogError::UnknownTopic(_))));
        assert!(matches!(log.create_topic("bad topic", 1).await, Err(LogError::InvalidName(_))));
        assert!(matches!(log.create_topic("t", 0).await, Err(LogError::InvalidPartitionCount(0))));
        log.create_topic("t", 2).await.unwrap();
        log.create_topic("t", 2).await.unwrap();
        assert!(matches!(log.create_topic("t", 3).await, Err(LogError::TopicMismatch { .. })));
        assert!(matches!(log.append_batch(vec![]).await, Err(LogError::EmptyBatch)));
        let huge = NewRecord::new("t", b"k".to_vec(), vec![0u8; frame::MAX_BODY + 1]);
        assert!(matches!(log.append(huge).await, Err(LogError::TooLarge { .. })));
        assert!(matches!(log.read("t", 2, 0, 1).await, Err(LogError::UnknownPartition { .. })));
        assert_eq!(log.end_offset("t", 0).await.unwrap() + log.end_offset("t", 1).await.unwrap(), 0);
    });
}

#[test]
fn a_batch_spans_partitions_and_keeps_input_order() {
    let tmp = tempfile::tempdir().unwrap();
    let log = open(tmp.path());
    rt().block_on(async {
        log.create_topic("a", 3).await.unwrap();
        log.create_topic("b", 1).await.unwrap();
        let batch: Vec<NewRecord> =
            (0..30).map(|i| rec(if i % 2 == 0 { "a" } else { "b" }, &format!("k{i}"), &format!("v{i}"))).collect();
        let positions = log.append_batch(batch.clone()).await.unwrap();
        assert_eq!(positions.len(), 30);
        for (r, pos) in batch.iter().zip(&positions) {
            let got = log.read(&r.topic, pos.partition, pos.offset, 1).await.unwrap();
            assert_eq!(got[0].value, r.value);
            assert_eq!(got[0].key, r.key);
        }
    });
}

#[test]
fn reopening_continues_offsets_and_chains() {
    let tmp = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let log = open(tmp.path());
        log.create_topic("t", 1).await.unwrap();
        for i in 0..10 {
            log.append(rec("t", "k", &format!("v{i}"))).await.unwrap();
        }
        drop(log);
        let log = open(tmp.path());
        assert_eq!(log.open_report().records, 10);
        let pos = log.append(rec("t", "k", "v10")).await.unwrap();
        assert_eq!(pos, Position { partition: 0, offset: 10 });
        drop(log);
    });
    let report = verify_embedded(tmp.path(), |_, _| {}).unwrap();
    assert!(report.ok(), "{:?}", report.problem);
    assert_eq!(report.partitions[0].records, 11);
}

#[test]
fn segments_roll_and_stay_readable() {
    let tmp = tempfile::tempdir().unwrap();
    let options = EmbeddedOptions { segment_bytes: 4096, ..Default::default() };
    rt().block_on(async {
        let log = EmbeddedLog::open(tmp.path(), options.clone()).unwrap();
        log.create_topic("t", 2).await.unwrap();
        for i in 0..200 {
            log.append(rec("t", &format!("k{}", i % 7), &format!("{i:0>200}"))).await.unwrap();
        }
        drop(log);
        let log = EmbeddedLog::open(tmp.path(), options).unwrap();
        assert!(log.open_report().segments > 5, "{:?}", log.open_report());
        let mut total = 0;
        for p in 0..2 {
            let records = log.read("t", p, 0, 1000).await.unwrap();
            assert!(records.iter().enumerate().all(|(i, r)| r.offset == i as u64));
            total += records.len();
        }
        assert_eq!(total, 200);
    });
    assert!(verify_embedded(tmp.path(), |_, _| {}).unwrap().ok());
}

/// Many tasks appending at once: offsets dense and unique per partition, chain intact.
#[test]
fn concurrent_appenders_get_dense_unique_offsets() {
    let tmp = tempfile::tempdir().unwrap();
    let log = Arc::new(open(tmp.path()));
    rt().block_on(async {
        log.create_topic("t", 4).await.unwrap();
        let mut tasks = Vec::new();
        for task in 0..64 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..50 {
                    let r = if i % 10 == 0 {
                        log.append_batch(vec![rec("t", &format!("k{task}"), "x"), rec("t", &format!("j{i}"), "y")])
                            .await
                            .unwrap()
                    } else {
                        vec![log.append(rec("t", &format!("k{task}-{i}"), &format!("{task}-{i}"))).await.unwrap()]
                    };
                    got.extend(r);
                }
                got
            }));
        }
        let mut seen: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for t in tasks {
            for pos in t.await.unwrap() {
                seen.entry(pos.partition).or_default().push(pos.offset);
            }
        }
        let mut total = 0;
        for (p, mut offsets) in seen {
            offsets.sort();
            let n = offsets.len() as u64;
            assert_eq!(offsets, (0..n).collect::<Vec<_>>(), "partition {p}");
            assert_eq!(log.end_offset("t", p).await.unwrap(), n);
            total += n;
        }
        assert_eq!(total, 64 * 55);
    });
    let report = verify_embedded(tmp.path(), |_, _| {}).unwrap();
    assert!(report.ok(), "{:?}", report.problem);
    assert_eq!(report.records, 64 * 55);
}

#[test]
fn tail_waits_for_new_records() {
    let tmp = tempfile::tempdir().unwrap();
    let log = Arc::new(open(tmp.path()));
    rt().block_on(async {
        log.create_topic("t", 1).await.unwrap();
        log.append(rec("t", "k", "first")).await.unwrap();
        let mut stream = log.tail("t", 0, 0);
        let Tailed::Record(first) = stream.next().await.unwrap().unwrap() else { panic!("a record") };
        assert_eq!(first.value, b"first");
        let writer = log.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            writer.append(rec("t", "k", "second")).await.unwrap();
        });
        let next = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.expect("tail woke up");
        let Tailed::Record(r) = next.unwrap().unwrap() else { panic!("a record") };
        assert_eq!((r.offset, r.value.as_slice()), (1, b"second".as_slice()));
    });
}

#[test]
fn committed_offsets_survive_restart() {
    let tmp = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let log = open(tmp.path());
        log.create_topic("t", 2).await.unwrap();
        assert_eq!(log.committed_offset("g", "t", 1).await.unwrap(), None);
        log.commit_offset("g", "t", 1, 42).await.unwrap();
        log.commit_offset("g", "t", 0, 7).await.unwrap();
        log.commit_offset("other", "t", 0, 1).await.unwrap();
        drop(log);
        let log = open(tmp.path());
        assert_eq!(log.committed_offset("g", "t", 1).await.unwrap(), Some(42));
        assert_eq!(log.committed_offset("g", "t", 0).await.unwrap(), Some(7));
        assert_eq!(log.committed_offset("other", "t", 0).await.unwrap(), Some(1));
        assert!(matches!(log.commit_offset("g", "t", 5, 1).await, Err(LogError::UnknownPartition { .. })));
    });
}

#[test]
fn a_second_writer_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let _first = open(tmp.path());
    let err = EmbeddedLog::open(tmp.path(), EmbeddedOptions::default()).err().expect("second open refused");
    let text = err.to_string();
    assert!(matches!(err, LogError::Locked { .. }), "{text}");
    assert!(
        text.contains(&tmp.path().display().to_string()) && text.contains(&std::process::id().to_string()),
        "{text}"
    );
    // Read-only inspection is still allowed beside the writer.
    EmbeddedLog::open(tmp.path(), EmbeddedOptions { read_only: true, ..Default::default() }).unwrap();
}

#[test]
fn a_foreign_directory_is_left_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("precious.txt"), "do not touch").unwrap();
    let err = EmbeddedLog::open(tmp.path(), EmbeddedOptions::default()).err().unwrap();
    assert!(err.to_string().contains("not a Cairn event log"), "{err}");
    let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("precious.txt")]);
    std::fs::write(tmp.path().join("FORMAT"), "cairn-log 99\n").unwrap();
    let err = EmbeddedLog::open(tmp.path(), EmbeddedOptions::default()).err().unwrap();
    assert!(err.to_string().contains("unsupported log format"), "{err}");
}

fn write_some(dir: &Path, n: usize) {
    rt().block_on(async {
        let log = open(dir);
        log.create_topic("t", 1).await.unwrap();
        for i in 0..n {
            log.append(rec("t", "k", &format!("value number {i}"))).await.unwrap();
        }
    });
}

#[test]
fn a_flipped_byte_in_the_middle_is_reported_not_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    write_some(tmp.path(), 20);
    let seg = segment0(tmp.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let middle = crate::segment::trim_zeros(&bytes).len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();

    let err = EmbeddedLog::open(tmp.path(), EmbeddedOptions::default()).err().expect("open refused");
    match &err {
        LogError::Corrupt { path, position, .. } => {
            assert_eq!(path, &seg);
            assert!(*position <= middle as u64);
        }
        other => panic!("expected corruption, got {other}"),
    }
    assert_eq!(std::fs::read(&seg).unwrap(), bytes, "nothing was truncated or rewritten");
    let report = verify_embedded(tmp.path(), |_, _| {}).unwrap();
    assert!(!report.ok());
    let problem = report.problem.expect("corruption reported");
    assert_eq!(problem.file, seg);
    assert!(problem.position <= middle as u64, "{problem}");
}

#[test]
fn a_torn_tail_is_cut_off_and_kept_in_quarantine() {
    let tmp = tempfile::tempdir().unwrap();
    write_some(tmp.path(), 10);
    let seg = segment0(tmp.path());
    let file = std::fs::read(&seg).unwrap();
    let intact = crate::segment::trim_zeros(&file).to_vec();
    // A frame that was being written when the power went: header and half a body.
    let mut frame_bytes = Vec::new();
    let mut w = frame::FrameWriter::begin(&mut frame_bytes);
    w.push(&frame::RecordRef {
        topic: "t",
        partition: 0,
        offset: 10,
        timestamp_ms: 0,
        key: b"k",
        value: b"never acknowledged",
        prev_hash: [0; 32],
        hash: [0; 32],
    });
    w.finish();
    let mut torn = file.clone();
    let half = &frame_bytes[..frame_bytes.len() / 2];
    torn[intact.len()..intact.len() + half.len()].copy_from_slice(half);
    std::fs::write(&seg, &torn).unwrap();

    let report = verify_embedded(tmp.path(), |_, _| {}).unwrap();
    assert!(report.problem.is_none(), "the chains up to the tail are intact");
    assert!(report.torn_tail.is_some() && !report.ok(), "but the torn tail is reported");

    rt().block_on(async {
        let log = open(tmp.path());
        assert!(log.open_report().torn_tail.is_some());
        assert_eq!(log.end_offset("t", 0).await.unwrap(), 10);
        let pos = log.append(rec("t", "k", "after")).await.unwrap();
        assert_eq!(pos.offset, 10);
    });
    let quarantined: Vec<_> = std::fs::read_dir(tmp.path().join("quarantine")).unwrap().collect();
    assert_eq!(quarantined.len(), 1);
    let kept = std::fs::read(quarantined[0].as_ref().unwrap().path()).unwrap();
    assert_eq!(kept, frame_bytes[..frame_bytes.len() / 2]);
    assert!(verify_embedded(tmp.path(), |_, _| {}).unwrap().ok());
}

/// Rewrites one frame's body with `edit` and fixes its checksum, as a forger would.
fn forge(seg: &Path, frame_index: usize, edit: impl FnOnce(&mut Vec<u8>)) {
    let bytes = std::fs::read(seg).unwrap();
    let mut frames = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() && bytes[pos..pos + 4] == frame::MAGIC {
        let len = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().unwrap()) as usize;
        frames.push(bytes[pos + 12..pos + 12 + len].to_vec());
        pos += 12 + len;
    }
    edit(&mut frames[frame_index]);
    let mut out = Vec::new();
    for (i, body) in frames.iter().enumerate() {
        if i == frame_index && body.is_empty() {
            continue; // the edit removed the frame
        }
        out.extend_from_slice(&frame::MAGIC);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
        out.extend_from_slice(body);
    }
    std::fs::write(seg, out).unwrap();
}

#[test]
fn verify_catches_a_forged_value_with_a_valid_checksum() {
    let tmp = tempfile::tempdir().unwrap();
    write_some(tmp.path(), 10);
    forge(&segment0(tmp.path()), 4, |body| {
        let at = body.windows(6).position(|w| w == b"number").unwrap();
        body[at] = b'N';
    });
    let report = verify_embedded(tmp.path(), |_, _| {}).unwrap();
    let problem = report.problem.expect("forgery found");
    assert_eq!((problem.partition, problem.offset), (Some(0), Some(4)));
    assert!(problem.what.contains("altered"), "{problem}");
}

#[test]
fn verify_catches_a_removed_record() {
    let tmp = tempfile::tempdir().unwrap();
    write_some(tmp.path(), 10);
    forge(&segment0(tmp.path()), 6, |body| body.clear());
    let problem = verify_embedded(tmp.path(), |_, _| {}).unwrap().problem.expect("removal found");
    assert_eq!(problem.offset, Some(7));
    assert!(problem.what.contains("out of sequence"), "{problem}");
}

#[test]
fn verify_catches_a_removed_record_with_renumbered_offsets() {
    // A careful forger renumbers the later offsets too; the chain link still breaks.
    let tmp = tempfile::tempdir().unwrap();
    write_some(tmp.path(), 10);
    let seg = segment0(tmp.path());
    forge(&seg, 6, |body| body.clear());
    for i in 6..9 {
        forge(&seg, i, |body| {
            let at = 4 + 2 + 1 + 4; // count, topic_len, "t", partition
            let offset = u64::from_le_bytes(body[at..at + 8].try_into().unwrap());
            body[at..at + 8].copy_from_slice(&(offset - 1).to_le_bytes());
        });
    }
    let problem = verify_embedded(tmp.path(), |_, _| {}).unwrap().problem.expect("removal found");
    assert_eq!(problem.offset, Some(6));
    assert!(problem.what.contains("prev_hash"), "{problem}");
}

/// Every single-byte change anywhere in a segment is caught by verify (checksum or chain).
#[test]
fn verify_catches_every_single_byte_change() {
    let tmp = tempfile::tempdir().unwrap();
    write_some(tmp.path(), 3);
    let seg = segment0(tmp.path());
    // Every byte of the data, and some of the zero-filled space after it (the rest of the
    // preallocated space is cut off to keep the test fast).
    let mut original = std::fs::read(&seg).unwrap();
    let data_len = crate::segment::trim_zeros(&original).len();
    original.truncate(data_len + 64);
    for i in 0..original.len() {
        let mut bytes = original.clone();
        bytes[i] ^= 0x01;
        std::fs::write(&seg, &bytes).unwrap();
        let report = verify_embedded(tmp.path(), |_, _| {}).unwrap();
        // A change in the final frame may look like a torn write: reported too, never `ok`.
        assert!(!report.ok(), "byte {i} changed without detection");
    }
}

/// The crash-safety test's child: appends forever and prints every acknowledged position.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os("CAIRN_CRASH_CHILD_DIR") else { return };
    rt().block_on(async move {
        let log = Arc::new(open(Path::new(&dir)));
        log.create_topic("crash", 4).await.unwrap();
        let mut tasks = Vec::new();
        for task in 0..8 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0u64.. {
                    let value = format!("{task}:{i}:{}", "x".repeat(200 + (i as usize % 800)));
                    let digest = hex::encode(chain::link(&[0; 32], value.as_bytes()));
                    let records = if i % 5 == 0 {
                        vec![
                            NewRecord::new("crash", format!("b{task}-{i}"), value.clone()),
                            NewRecord::new("crash", format!("c{i}"), value),
                        ]
                    } else {
                        vec![NewRecord::new("crash", format!("k{task}-{i}"), value)]
                    };
                    let positions = log.append_batch(records).await.unwrap();
                    let mut out = std::io::stdout().lock();
                    for p in positions {
                        use std::io::Write;
                        writeln!(out, "ack {} {} {}", p.partition, p.offset, digest).unwrap();
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

/// SIGKILL a writer at random moments; every acknowledged record must survive, intact.
#[test]
fn acknowledged_appends_survive_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = Rng::from_clock();
    let seed = rng.0;
    let mut acked: BTreeMap<(u32, u64), String> = BTreeMap::new();
    for round in 0..20 {
        let mut child = std::process::Command::new(&exe)
            .args(["--exact", "tests::crash_child", "--nocapture", "--test-threads=1"])
            .env("CAIRN_CRASH_CHILD_DIR", tmp.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if l.starts_with("ack ") {
                            let _ = first_tx.send(());
                        }
                        lines.push(l)
                    }
                    Err(_) => break,
                }
            }
            lines
        });
        // Kill at a random moment once the child is appending (its start-up time varies).
        first_rx.recv_timeout(Duration::from_secs(60)).expect("the child started appending");
        std::thread::sleep(Duration::from_millis(rng.below(300)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        let before = acked.len();
        for line in lines {
            let parts: Vec<&str> = line.split(' ').collect();
            // A line cut by the kill is not an acknowledgement we can rely on having seen whole.
            if parts.len() == 4 && parts[0] == "ack" && parts[3].len() == 64 {
                acked.insert((parts[1].parse().unwrap(), parts[2].parse().unwrap()), parts[3].to_owned());
            }
        }
        assert!(acked.len() > before, "round {round}: the child acknowledged nothing (seed {seed})");

        let log = open(tmp.path());
        rt().block_on(async {
            for p in 0..4u32 {
                let end = log.end_offset("crash", p).await.unwrap();
                let records = log.read("crash", p, 0, usize::MAX).await.unwrap();
                assert_eq!(records.len() as u64, end);
                let present: HashSet<u64> = records.iter().map(|r| r.offset).collect();
                for ((ap, offset), digest) in acked.range((p, 0)..(p + 1, 0)) {
                    assert_eq!(*ap, p);
                    assert!(present.contains(offset), "round {round}: acknowledged {p}/{offset} lost (seed {seed})");
                    let r = &records[*offset as usize];
                    assert_eq!(
                        &hex::encode(chain::link(&[0; 32], &r.value)),
                        digest,
                        "round {round}: {p}/{offset} altered"
                    );
                }
            }
        });
        drop(log);
        let report = verify_embedded(tmp.path(), |_, _| {}).unwrap();
        assert!(report.ok(), "round {round}: {:?} (seed {seed})", report.problem);
    }
}
