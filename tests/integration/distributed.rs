//! Cairn on Kafka and Cassandra beyond the API suite: what happens when the servers misbehave.

use cairn_tests::{Backend, Deployment, exclusive_servers, infra};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn reading(n: usize) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
        "subject": {"reference": format!("Patient/restart-{}", n % 10)},
        "identifier": [{"system": "urn:example:restart", "value": format!("r-{n}")}],
        "effectiveDateTime": "2026-11-28T09:00:00Z",
        "valueQuantity": {"value": 100 + n % 50, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}
    })
}

/// POST of reading `n` to the FHIR base `base`.
fn post_reading(http: &reqwest::Client, base: &str, n: usize) -> reqwest::RequestBuilder {
    http.post(format!("{base}/Observation"))
        .header("content-type", "application/fhir+json")
        .body(serde_json::to_vec(&reading(n)).unwrap())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Restart the Kafka broker while clients write: every write that was acknowledged (201) is there
/// afterwards, writes during the outage fail with 503 (never a false 201), and writes succeed again
/// once the broker is back, without restarting Cairn.
#[test]
#[ignore = "needs Kafka and Cassandra, and restarts Kafka: run with infra/test"]
fn a_kafka_restart_loses_no_acknowledged_write() {
    let _alone = exclusive_servers();
    let d = Deployment::unguarded(Backend::KafkaCassandra);
    let s = d.start(&["--insecure-no-auth", "--read-wait-ms", "20000"]);
    let base = format!("{}/fhir", s.base_url);
    let rt = rt();
    let (acked, refused, acked_after_restart) = rt.block_on(async {
        // A write caught by the outage waits for its transaction's commit attempts (3 x 10 s), and for
        // the transaction queued before it: an answer (201 or 503) can take about 40 s.
        let http = reqwest::Client::builder().timeout(Duration::from_secs(90)).build().unwrap();
        let next = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let restarted = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for _ in 0..8 {
            let (http, base, next, stop, restarted) =
                (http.clone(), base.clone(), next.clone(), stop.clone(), restarted.clone());
            writers.push(tokio::spawn(async move {
                let (mut acked, mut refused, mut after) = (Vec::new(), 0usize, 0usize);
                while !stop.load(Ordering::Relaxed) {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let r = post_reading(&http, &base, n).send().await;
                    match r {
                        Ok(r) if r.status() == 201 => {
                            let body: Value = r.json().await.unwrap();
                            acked.push(body["id"].as_str().unwrap().to_owned());
                            if restarted.load(Ordering::Relaxed) {
                                after += 1;
                            }
                        }
                        Ok(r) => {
                            assert_eq!(r.status(), 503, "a failed write is a 503, nothing else");
                            refused += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => return Err(format!("{e:?}")),
                    }
                }
                Ok((acked, refused, after))
            }));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::task::spawn_blocking(|| {
            infra("down", &["kafka"]);
            infra("up", &["kafka"]);
        })
        .await
        .unwrap();
        restarted.store(true, Ordering::Relaxed);
        let back = Instant::now();
        // Keep writing until reads (which append their access event) go through again. Recovery took
        // 7 to 62 s on the 2-core CI machine (the transaction and group coordinators reload after the
        // restart, and the producer is replaced if its transaction broke): bounded at 150 s here; the
        // time is printed so a slow recovery shows.
        let deadline = Instant::now() + Duration::from_secs(150);
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let r = match http.get(format!("{base}/Observation?_summary=count")).send().await {
                Ok(r) => r,
                Err(e) => panic!("the server stopped answering ({e:?}); {}", last_words(&s)),
            };
            if r.status() == 200 {
                break;
            }
            let last = format!("{} {}", r.status(), r.text().await.unwrap_or_default());
            if Instant::now() >= deadline {
                panic!(
                    "reads never answered again after the broker came back (last answer: {last}); {}",
                    server_state(&http, &s, 40).await
                );
            }
        }
        eprintln!("kafka restart: reads answer again {} ms after the broker was back", back.elapsed().as_millis());
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::Relaxed);
        let (mut acked, mut refused, mut after) = (Vec::new(), 0, 0);
        for w in writers {
            let (a, r, x) = match w.await.unwrap() {
                Ok(counts) => counts,
                Err(e) => panic!("the server stopped answering a write ({e}); {}", last_words(&s)),
            };
            acked.extend(a);
            refused += r;
            after += x;
        }
        // Every acknowledged write is readable (each read waits for the projection).
        let checking = Instant::now();
        use futures_util::StreamExt;
        let statuses: Vec<(String, u16)> = futures_util::stream::iter(acked.clone())
            .map(|id| {
                let (http, base) = (http.clone(), base.clone());
                async move {
                    let status = http.get(format!("{base}/Observation/{id}")).send().await.unwrap().status().as_u16();
                    (id, status)
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let missing: Vec<(String, u16)> = statuses.into_iter().filter(|(_, status)| *status != 200).collect();
        if !missing.is_empty() {
            panic!("{}", explain_missing(&d, &s, &http, &base, &missing).await);
        }
        eprintln!("kafka restart: read back {} writes in {} ms", acked.len(), checking.elapsed().as_millis());
        (acked.len(), refused, after)
    });
    eprintln!(
        "{}",
        s.stderr()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Transactions librdkafka reported committed that did not read back committed: refused (503),
    // so the test holds, but each one is a commit the client or the broker lost (decision 0005).
    let contradicted = s.stderr().lines().filter(|l| l.contains("kafka reported a transaction committed")).count();
    if contradicted > 0 {
        eprintln!("kafka restart: a commit was contradicted; {}", keep_log(&s));
    }
    eprintln!(
        "kafka restart: {acked} writes acknowledged ({acked_after_restart} after the restart), {refused} refused with \
         503, {contradicted} commits contradicted by the read-back"
    );
    assert!(acked_after_restart > 0, "writes never resumed after the broker came back");
    assert!(acked > 0);
    let (status, _) = s.terminate();
    assert!(status.success());
}

/// Why acknowledged writes did not read back, in as much detail as the failure allows: each one read
/// again after a pause (late, or gone?), where the log holds its event committed (`cairn log tail`:
/// the acknowledgement was honest, and the projection or the read's wait is wrong), only uncommitted,
/// or nowhere (the acknowledgement was not), `/readyz`, and the server's newest warnings.
async fn explain_missing(
    d: &Deployment,
    s: &cairn_tests::Server,
    http: &reqwest::Client,
    base: &str,
    missing: &[(String, u16)],
) -> String {
    let first_answered = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut again = Vec::with_capacity(missing.len());
    for (id, _) in missing {
        again.push(http.get(format!("{base}/Observation/{id}")).send().await.map(|r| r.status().as_u16()));
    }
    let waited = first_answered.elapsed().as_secs();
    let (tail_status, tail, tail_err) =
        tokio::task::block_in_place(|| d.cairn(&["log", "tail", "--topic", "cairn.fhir"]));
    // Everything the partitions hold, aborted and open transactions included (Kafka's console consumer
    // reading uncommitted). An event there but not in the tail above never committed, or sits behind a
    // transaction still open (a read-committed read stops there).
    let uncommitted = tokio::task::block_in_place(|| {
        let tool = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/kafka-tool");
        std::process::Command::new(tool)
            .args(["consume", "--bootstrap-server", &cairn_tests::kafka_brokers(), "--topic"])
            .arg(d.kafka_topic("cairn.fhir"))
            .args([
                "--from-beginning",
                "--timeout-ms",
                "10000",
                "--command-property",
                "isolation.level=read_uncommitted",
            ])
            .args(["--formatter-property", "print.partition=true", "--formatter-property", "print.offset=true"])
            .output()
    });
    let (raw_out, raw_problem) = match uncommitted {
        Ok(o) => {
            let out = String::from_utf8_lossy(&o.stdout).into_owned();
            // The consumer exits non-zero when its timeout ends the read: only an empty read is suspect.
            let problem = out.trim().is_empty().then(|| {
                format!("kafka-tool consume printed nothing ({}): {}", o.status, String::from_utf8_lossy(&o.stderr))
            });
            (out, problem)
        }
        Err(e) => (String::new(), Some(format!("kafka-tool could not run: {e}"))),
    };
    let mut report = format!("{} acknowledged writes did not read back after the restart:\n", missing.len());
    for ((id, status), again) in missing.iter().zip(again) {
        let in_log: Vec<String> = tail
            .lines()
            .filter(|l| l.contains(id.as_str()))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|l| format!("partition {} offset {} {}", l["partition"], l["offset"], l["event"]["type"]))
            .collect();
        // Lines start "Partition:P<TAB>Offset:O<TAB>".
        let raw: Vec<String> = raw_out
            .lines()
            .filter(|l| l.contains(id.as_str()))
            .map(|l| l.split('\t').take(2).collect::<Vec<_>>().join(" "))
            .collect();
        report += &format!(
            "  Observation/{id}: {status}, {waited} s later {again:?}; committed in the log: {}; read uncommitted: {}\n",
            if in_log.is_empty() { "nowhere".to_owned() } else { in_log.join(", ") },
            if raw.is_empty() { "nowhere".to_owned() } else { raw.join(", ") }
        );
    }
    // Per partition, the last offset read committed and the last one read uncommitted: committed
    // records past a missing event mean its transaction was aborted, none past it that it is open.
    let last_offset = |lines: Vec<(u64, u64)>| {
        let mut last = std::collections::BTreeMap::new();
        for (p, o) in lines {
            let e = last.entry(p).or_insert(o);
            *e = (*e).max(o);
        }
        last
    };
    let committed = last_offset(
        tail.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|l| Some((l["partition"].as_u64()?, l["offset"].as_u64()?)))
            .collect(),
    );
    let everything = last_offset(raw_out.lines().filter_map(raw_position).collect());
    report += &format!("last offset per partition, committed: {committed:?}; uncommitted too: {everything:?}\n");
    // The writer's own account of its transactions (commit retries, failures, producer restarts).
    let log = s.stderr();
    let transactions: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("commit") || l.contains("transaction") || l.contains("producer"))
        .take(40)
        .collect();
    report += &format!("the server on its transactions (oldest first):\n{}\n", transactions.join("\n"));
    // What the broker's own files hold around the missing events: each batch's producer id and epoch,
    // and the transaction markers (COMMIT or ABORT) that decided them.
    let missing_at: Vec<(u64, u64)> = raw_out
        .lines()
        .filter(|l| missing.iter().any(|(id, _)| l.contains(id.as_str())))
        .filter_map(raw_position)
        .collect();
    report += &tokio::task::block_in_place(|| broker_batches(&d.kafka_topic("cairn.fhir"), &missing_at));
    // The whole server log (the failure message carries its warnings only).
    report += &format!("{}\n", keep_log(s));
    if !tail_status.success() || tail.is_empty() {
        report += &format!("cairn log tail is incomplete ({tail_status}): {tail_err}\n");
    }
    if let Some(problem) = raw_problem {
        report += &format!("{problem}\n");
    }
    report + &server_state(http, s, 30).await
}

/// The record batches of `topic`'s partitions from the broker's log segments (Kafka's
/// DumpLogSegments), around each (partition, offset) in `at`: producer id and epoch of each batch
/// and the end-transaction markers, which say whether the broker committed or aborted a transaction.
fn broker_batches(topic: &str, at: &[(u64, u64)]) -> String {
    if at.is_empty() {
        return "broker batches: the missing events are in no partition, not even read uncommitted\n".to_owned();
    }
    let run_dir = std::env::var("CAIRN_INFRA_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/infra"));
    let mut partitions: Vec<u64> = at.iter().map(|(p, _)| *p).collect();
    partitions.sort_unstable();
    partitions.dedup();
    let mut out = String::new();
    for p in partitions {
        let dir = run_dir.join("kafka/data").join(format!("{topic}-{p}"));
        let mut segments: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).filter(|f| f.extension().is_some_and(|x| x == "log")))
            .into_iter()
            .flatten()
            .collect();
        segments.sort();
        if segments.is_empty() {
            out += &format!("broker files of partition {p}: none in {}\n", dir.display());
            continue;
        }
        let files = segments.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(",");
        let tool = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/kafka-tool");
        let dump = std::process::Command::new(tool)
            .args(["org.apache.kafka.tools.DumpLogSegments", "--print-data-log", "--files", &files])
            .output();
        let text = match dump {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
            Ok(o) => {
                let err = String::from_utf8_lossy(&o.stderr);
                out += &format!("broker files of partition {p}: DumpLogSegments failed ({}): {err}\n", o.status);
                continue;
            }
            Err(e) => {
                out += &format!("broker files of partition {p}: DumpLogSegments could not run: {e}\n");
                continue;
            }
        };
        let offsets: Vec<u64> = at.iter().filter(|(q, _)| *q == p).map(|(_, o)| *o).collect();
        let (low, high) = (offsets.iter().min().unwrap().saturating_sub(4), offsets.iter().max().unwrap() + 12);
        let field =
            |l: &str, name: &str| -> Option<u64> { l.split(name).nth(1)?.split_whitespace().next()?.parse().ok() };
        out += &format!("broker batches of partition {p}, offsets {low}..{high}:\n");
        // Every batch from `low` to `high`, then the next five markers (the one that decided the
        // transaction can lie further on than a few offsets; each names its producer).
        let (mut in_range, mut markers_after) = (false, 0);
        for line in text.lines() {
            if let Some(base) = field(line, "baseOffset: ") {
                let last = field(line, "lastOffset: ").unwrap_or(base);
                let marker = line.contains("isControl: true");
                in_range = last >= low && (base <= high || (marker && markers_after < 5));
                if base > high && marker {
                    markers_after += 1;
                }
                if in_range {
                    // "name: value" pairs; keep the ones that tell whose batch it is and what it is.
                    let keep: Vec<String> = line
                        .split(' ')
                        .collect::<Vec<_>>()
                        .chunks(2)
                        .filter(|kv| {
                            matches!(
                                kv[0],
                                "baseOffset:"
                                    | "lastOffset:"
                                    | "producerId:"
                                    | "producerEpoch:"
                                    | "isTransactional:"
                                    | "isControl:"
                                    | "CreateTime:"
                                    | "LogAppendTime:"
                            )
                        })
                        .map(|kv| kv.join(" "))
                        .collect();
                    out += &format!("  {}\n", keep.join(" "));
                }
            } else if in_range && line.contains("endTxnMarker") {
                out += &format!("   {}\n", line.trim());
            }
        }
    }
    out
}

/// (partition, offset) of a line of Kafka's console consumer, which starts "Partition:P<TAB>Offset:O<TAB>".
fn raw_position(line: &str) -> Option<(u64, u64)> {
    let mut f = line.split('\t');
    let p = f.next()?.strip_prefix("Partition:")?.parse().ok()?;
    let o = f.next()?.strip_prefix("Offset:")?.parse().ok()?;
    Some((p, o))
}

/// Writes the server's whole log to a file that outlives the test; says where (or why not).
fn keep_log(s: &cairn_tests::Server) -> String {
    let kept = std::env::temp_dir().join(format!("cairn-kafka-restart-{}.log", std::process::id()));
    match std::fs::write(&kept, s.stderr()) {
        Ok(()) => format!("the server's whole log: {}", kept.display()),
        Err(e) => format!("the server's log could not be kept in {}: {e}", kept.display()),
    }
}

/// The last lines a server wrote (a panic, a library's assertion), for when it stopped answering.
fn last_words(s: &cairn_tests::Server) -> String {
    let log = s.stderr();
    let lines: Vec<&str> = log.lines().filter(|l| !l.contains(" DEBUG ")).collect();
    format!("the server's last lines:\n{}", lines[lines.len().saturating_sub(40)..].join("\n"))
}

/// `/readyz` and the server's `newest` latest warnings and errors, for a failure message.
async fn server_state(http: &reqwest::Client, s: &cairn_tests::Server, newest: usize) -> String {
    let ready = match http.get(format!("{}/readyz", s.base_url)).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(e) => format!("{e}"),
    };
    let log = s.stderr();
    let problems: Vec<&str> =
        log.lines().filter(|l| l.contains("ERROR") || l.contains("WARN")).rev().take(newest).collect();
    format!("/readyz: {ready}\nserver said (newest first):\n{}", problems.join("\n"))
}

/// Two API processes and two projector processes on one Kafka and one Cassandra: writes through
/// either API are read back through the other; a projector killed with SIGKILL in the middle of the
/// stream hands its partitions to the survivor, and the result is complete and without duplicates.
#[test]
#[ignore = "needs Kafka and Cassandra: run with infra/test"]
fn split_roles_share_the_work_and_survive_a_dead_projector() {
    let d = Deployment::new(Backend::KafkaCassandra);
    let api = [
        d.start(&["--insecure-no-auth", "--roles", "fhir", "--read-wait-ms", "30000"]),
        d.start(&["--insecure-no-auth", "--roles", "fhir", "--read-wait-ms", "30000"]),
    ];
    let projector_a = d.start(&["--roles", "projector"]);
    let projector_b = d.start(&["--roles", "projector"]);
    let bases: Vec<String> = api.iter().map(|s| format!("{}/fhir", s.base_url)).collect();
    let rt = rt();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let write = |n: usize| {
        let (http, base) = (http.clone(), bases[n % 2].clone());
        async move {
            let r = post_reading(&http, &base, n).send().await.unwrap();
            assert_eq!(r.status(), 201);
            let body: Value = r.json().await.unwrap();
            (n, body["id"].as_str().unwrap().to_owned())
        }
    };
    let read_back = |written: Vec<(usize, String)>| {
        let (http, bases) = (http.clone(), bases.clone());
        async move {
            use futures_util::StreamExt;
            futures_util::stream::iter(written)
                .map(|(n, id)| {
                    // Read through the API that did not write it.
                    let (http, base) = (http.clone(), bases[(n + 1) % 2].clone());
                    async move {
                        let r = http.get(format!("{base}/Observation/{id}")).send().await.unwrap();
                        assert_eq!(r.status(), 200, "Observation/{id} written through the other API");
                        let body: Value = r.json().await.unwrap();
                        assert_eq!(body["identifier"][0]["value"], format!("r-{n}"));
                    }
                })
                .buffer_unordered(16)
                .collect::<Vec<()>>()
                .await;
        }
    };
    rt.block_on(async {
        use futures_util::StreamExt;
        let first: Vec<(usize, String)> =
            futures_util::stream::iter(0..200).map(write).buffer_unordered(16).collect().await;
        read_back(first).await;
    });
    // Kill one projector while writes continue; the survivor takes its partitions over.
    let assigned = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("partitions assigned"))
            .filter_map(|l| l.split("partitions=").nth(1).map(str::to_owned))
            .collect()
    };
    let b_held = assigned(&projector_b.stderr());
    assert!(
        b_held.last().is_some_and(|p| p.starts_with('[') && p.as_bytes().get(1).is_some_and(u8::is_ascii_digit)),
        "the second projector held partitions before it was killed: {b_held:?}"
    );
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        projector_b.kill();
    });
    rt.block_on(async {
        use futures_util::StreamExt;
        let second: Vec<(usize, String)> =
            futures_util::stream::iter(200..600).map(write).buffer_unordered(16).collect().await;
        killer.join().unwrap();
        read_back(second).await;
        // Complete and without duplicates: 600 Observations, each with exactly one version.
        for base in &bases {
            let count: Value =
                http.get(format!("{base}/Observation?_summary=count")).send().await.unwrap().json().await.unwrap();
            assert_eq!(count["total"], 600, "{count}");
        }
        let history: Value = http
            .get(format!("{}/Observation/_history?_count=1000", bases[0]))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(history["entry"].as_array().unwrap().len(), 600, "one version per Observation");
    });
    // The survivor was given every partition after the other one died (it had only some before).
    let a_held = assigned(&projector_a.stderr());
    assert_eq!(a_held.last().map(String::as_str), Some("[0, 1, 2, 3, 4, 5, 6, 7]"), "{a_held:?}");
    assert!(a_held.iter().any(|p| p != "[0, 1, 2, 3, 4, 5, 6, 7]"), "it shared the partitions before: {a_held:?}");
    for s in api {
        assert!(s.terminate().0.success());
    }
    assert!(projector_a.terminate().0.success());
}

/// On Kafka the chain is anchored by seals: `cairn log verify` checks every partition against them,
/// and finds records removed from a partition (Kafka's DeleteRecords, which anyone with admin rights on
/// the cluster can run).
#[test]
#[ignore = "needs Kafka and Cassandra: run with infra/test"]
fn log_verify_on_kafka_checks_the_seals_and_finds_removed_records() {
    let d = Deployment::new(Backend::KafkaCassandra);
    let s = d.start(&["--insecure-no-auth"]);
    let base = format!("{}/fhir", s.base_url);
    let rt = rt();
    rt.block_on(async {
        let http = reqwest::Client::new();
        for n in 0..40 {
            let r = post_reading(&http, &base, n).send().await.unwrap();
            assert_eq!(r.status(), 201);
        }
        // Seals are made about once a second.
        tokio::time::sleep(cairn_log::seal::SEAL_EVERY * 3).await;
    });
    assert!(s.terminate().0.success());
    let (status, out, err) = d.cairn(&["log", "verify"]);
    assert!(status.success(), "{out}{err}");
    // 40 readings, the two signing keys the authorization server published and the seal key.
    assert!(out.contains("ok: 43 events") && out.contains("(0 not sealed yet"), "{out}");
    assert!(out.contains("warning: seal signatures not checked"), "{out}");
    // The seals are signed with the key the server created; its public key verifies them ...
    let public = d.data_dir().join("keys/seal-ed25519.key.pub");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.data_dir().join("keys/seal-ed25519.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the signing key is readable by its owner only");
    }
    let (status, out, err) = d.cairn(&["log", "verify", "--seal-public-key", public.to_str().unwrap()]);
    assert!(status.success() && !out.contains("warning"), "{out}{err}");
    // ... and another key does not.
    let stranger = cairn_log::seal::SealSigner::generate().public_key_hex();
    let (status, out, _) = d.cairn(&["log", "verify", "--seal-public-key", &stranger]);
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("not signed by a trusted key"), "{out}");

    // Remove the first two records of a cairn.fhir partition that has at least three.
    let (_, tail, _) = d.cairn(&["log", "tail", "--topic", "cairn.fhir"]);
    let mut per_partition = std::collections::BTreeMap::<u64, usize>::new();
    for line in tail.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        *per_partition.entry(v["partition"].as_u64().unwrap()).or_default() += 1;
    }
    let (&partition, _) = per_partition.iter().find(|(_, n)| **n >= 3).expect("a partition with 3 records");
    rt.block_on(async {
        use rdkafka::admin::{AdminClient, AdminOptions};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            rdkafka::ClientConfig::new().set("bootstrap.servers", cairn_tests::kafka_brokers()).create().unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(&d.kafka_topic("cairn.fhir"), partition as i32, rdkafka::Offset::Offset(2)).unwrap();
        admin.delete_records(&tpl, &AdminOptions::new()).await.unwrap();
    });
    let (status, out, _) = d.cairn(&["log", "verify"]);
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains(&format!("BROKEN: cairn.fhir/{partition}")), "{out}");
}

/// Two API processes writing the same resources at the same moment: every update gets a version of its
/// own (no two acknowledged writes share one), and resent readings with the same identifier, sent
/// through both APIs at once, are stored once.
#[test]
#[ignore = "needs Kafka and Cassandra: run with infra/test"]
fn two_apis_never_give_two_writes_the_same_version() {
    let d = Deployment::new(Backend::KafkaCassandra);
    let api = [d.start(&["--insecure-no-auth"]), d.start(&["--insecure-no-auth", "--roles", "fhir"])];
    let bases: Vec<String> = api.iter().map(|s| format!("{}/fhir", s.base_url)).collect();
    let rt = rt();
    rt.block_on(async {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        let created: Value = post_reading(&http, &bases[0], 1).send().await.unwrap().json().await.unwrap();
        let id = created["id"].as_str().unwrap().to_owned();
        // 20 unconditional updates, alternating APIs, all at once.
        let mut updates = Vec::new();
        for n in 0..20 {
            let (http, base, id) = (http.clone(), bases[n % 2].clone(), id.clone());
            let mut body = reading(n);
            body["id"] = json!(id);
            updates.push(tokio::spawn(async move {
                let r = http
                    .put(format!("{base}/Observation/{id}"))
                    .header("content-type", "application/fhir+json")
                    .body(serde_json::to_vec(&body).unwrap())
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let etag = r.headers().get("etag").map(|v| v.to_str().unwrap().to_owned());
                (status, etag)
            }));
        }
        let mut versions = Vec::new();
        for u in updates {
            let (status, etag) = u.await.unwrap();
            assert!(status == 200 || status == 409, "update answered {status}");
            if status == 200 {
                versions.push(etag.unwrap());
            }
        }
        let acknowledged = versions.len();
        versions.sort();
        versions.dedup();
        assert_eq!(versions.len(), acknowledged, "two acknowledged updates share a version: {versions:?}");
        let history: Value = http
            .get(format!("{}/Observation/{id}/_history?_count=100", bases[1]))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(history["entry"].as_array().unwrap().len(), acknowledged + 1, "{history}");

        // Ten resends of one reading, through both APIs at once: one resource.
        let mut resends = Vec::new();
        for n in 0..10 {
            let (http, base) = (http.clone(), bases[n % 2].clone());
            resends.push(tokio::spawn(async move {
                post_reading(&http, &base, 777)
                    .header("if-none-exist", "identifier=urn:example:restart|r-777")
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }));
        }
        let mut statuses = Vec::new();
        for r in resends {
            statuses.push(r.await.unwrap());
        }
        assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1, "{statuses:?}");
        let found: Value = http
            .get(format!("{}/Observation?identifier=urn:example:restart|r-777", bases[0]))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(found["total"], 1);
    });
    for s in api {
        assert!(s.terminate().0.success());
    }
}

/// With no projector running, the store falls behind the log: writes are still acknowledged (they are
/// in the log), reads wait `--read-wait-ms` and then answer 503 rather than stale data, and `/readyz`
/// says the projection is behind. Once a projector runs, the same reads succeed.
#[test]
#[ignore = "needs Kafka and Cassandra: run with infra/test"]
fn reads_fail_closed_while_the_projection_lags() {
    let d = Deployment::new(Backend::KafkaCassandra);
    let api = d.start(&["--insecure-no-auth", "--roles", "fhir", "--read-wait-ms", "300"]);
    let base = format!("{}/fhir", api.base_url);
    let rt = rt();
    let http = reqwest::Client::new();
    let id = rt.block_on(async {
        let r = post_reading(&http, &base, 1).send().await.unwrap();
        assert_eq!(r.status(), 201, "the write is in the log");
        let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
        let started = Instant::now();
        let read = http.get(format!("{base}/Observation/{id}")).send().await.unwrap();
        assert_eq!(read.status(), 503);
        assert!(started.elapsed() >= Duration::from_millis(300), "it waited the bound first");
        let body: Value = read.json().await.unwrap();
        assert_eq!(body["resourceType"], "OperationOutcome");
        assert!(body.to_string().contains("behind the log"), "{body}");
        let search = http.get(format!("{base}/Observation?patient=restart-1")).send().await.unwrap();
        assert_eq!(search.status(), 503);
        let ready: Value = http.get(format!("{}/readyz", api.base_url)).send().await.unwrap().json().await.unwrap();
        assert_eq!(ready["ready"], false, "{ready}");
        id
    });
    let projector = d.start(&["--roles", "projector"]);
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = http.get(format!("{base}/Observation/{id}")).send().await.unwrap().status();
            if status == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "reads never recovered: {status}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    assert!(api.terminate().0.success());
    assert!(projector.terminate().0.success());
}
