//! The `cairn` binary as an operator uses it: serve, health, metrics, shutdown, log tail and verify,
//! and clear one-line errors for bad input.

use cairn_events::{EventType, sample_event};
use cairn_log::EventLog;
use cairn_log::embedded::{EmbeddedLog, EmbeddedOptions};
use cairn_tests::{Server, run_cairn};
use std::path::Path;

fn get(url: &str) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let r = reqwest::get(url).await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    })
}

#[test]
fn serve_answers_health_readiness_and_metrics_then_stops_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data, &[]);
    let (status, body) = get(&format!("{}/healthz", server.base_url));
    assert_eq!(status, 200, "{body}");
    let (status, body) = get(&format!("{}/readyz", server.base_url));
    assert_eq!(status, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["ready"], true);
    assert!(ready["checks"].as_array().unwrap().iter().any(|c| c["name"] == "event-log" && c["ok"] == true));

    let (status, metrics) = get(&format!("{}/metrics", server.base_url));
    assert_eq!(status, 200);
    assert!(
        metrics.contains("cairn_http_requests_total{method=\"GET\",route=\"/readyz\",status=\"200\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE cairn_http_request_duration_seconds histogram"), "{metrics}");
    for log_metric in ["cairn_log_append_seconds", "cairn_log_fsync_seconds", "cairn_log_fsync_batch_records"] {
        assert!(metrics.contains(&format!("# TYPE {log_metric} histogram")), "{log_metric} missing: {metrics}");
    }

    let (status, stderr) = server.terminate();
    assert!(status.success(), "exit {status:?}: {stderr}");
    assert!(stderr.contains("stopped cleanly"), "{stderr}");
    // The data directory was laid out and the log verifies.
    assert!(data.join("CAIRN_DATA_DIR").exists());
    let (status, out, err) = run_cairn(&["log", "verify", "--data-dir", data.to_str().unwrap()]);
    assert!(status.success(), "{out}{err}");
    // Nothing but the keys published on the first start: the authorization server's two signing keys
    // and the log's seal key.
    assert!(out.contains("ok: 3 events in 24 partitions"), "{out}");
}

#[test]
fn a_data_directory_in_use_is_refused_with_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path(), &[]);
    let (status, out, err) =
        run_cairn(&["serve", "--data-dir", tmp.path().to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert_eq!(status.code(), Some(1), "{out}{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("in use by another process") && err.contains(&format!("pid {}", server.pid())), "{err}");
    assert!(err.contains(tmp.path().to_str().unwrap()), "{err}");
}

#[test]
fn bad_input_gets_a_clear_error_and_touches_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let foreign = tmp.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let (status, _, err) = run_cairn(&["serve", "--data-dir", foreign.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("not a Cairn data directory") && !err.contains("notes"), "{err}");
    assert_eq!(std::fs::read_dir(&foreign).unwrap().count(), 1, "nothing written into a foreign directory");

    let (status, _, err) = run_cairn(&["serve", "--no-such-flag"]);
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("--no-such-flag"), "{err}");

    let (status, _, err) = run_cairn(&["log", "verify", "--data-dir", tmp.path().join("absent").to_str().unwrap()]);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("does not exist"), "{err}");
    assert!(!tmp.path().join("absent").exists(), "verify never creates a directory");

    let config = tmp.path().join("cairn.toml");
    std::fs::write(&config, "listen = 5\n").unwrap();
    let (status, _, err) = run_cairn(&["serve", "--config", config.to_str().unwrap()]);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("cairn.toml line 1"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // A data directory of the earlier format (hash chain v1) is refused by name, not as tampered.
    let old = tmp.path().join("old");
    std::fs::create_dir(&old).unwrap();
    std::fs::write(old.join("CAIRN_DATA_DIR"), "cairn data directory, format 1\n").unwrap();
    let (status, _, err) = run_cairn(&["log", "verify", "--data-dir", old.to_str().unwrap()]);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("written by an earlier Cairn (format 1") && err.lines().count() == 1, "{err}");

    // The audit commands: a report needs the running server; a bad window, a bad patient id and a
    // file that is not a slice are refused in one line each.
    let data = tmp.path().join("data");
    let (status, _, err) = run_cairn(&[
        "audit",
        "report",
        "--data-dir",
        data.to_str().unwrap(),
        "--kind",
        "failed-logins",
        "--from",
        "2026-01-01",
        "--to",
        "2026-02-01",
    ]);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("no server answers") && err.lines().count() == 1, "{err}");
    for (flags, expected) in [
        (["--patient", "p1", "--from", "yesterday", "--to", "2026-02-01T00:00:00Z"], "--from"),
        (["--patient", "p 1", "--from", "2026-01-01T00:00:00Z", "--to", "2026-02-01T00:00:00Z"], "not a FHIR id"),
        (["--patient", "p1", "--from", "2026-03-01T00:00:00Z", "--to", "2026-02-01T00:00:00Z"], "is after --to"),
    ] {
        let mut args = vec!["audit", "export", "--data-dir", data.to_str().unwrap()];
        args.extend_from_slice(&flags);
        let (status, _, err) = run_cairn(&args);
        assert_eq!(status.code(), Some(1), "{flags:?}");
        assert!(err.contains(expected) && err.lines().count() == 1, "{flags:?}: {err}");
    }
    let (status, _, err) = run_cairn(&["audit", "verify", "--export", config.to_str().unwrap()]);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("not an audit slice") && err.lines().count() == 1, "{err}");
}

#[test]
fn help_documents_every_setting() {
    let (status, out, _) = run_cairn(&["serve", "--help"]);
    assert!(status.success());
    for needle in
        ["--data-dir", "CAIRN_DATA_DIR", "--listen", "CAIRN_LISTEN", "--public-url", "--config", "--partitions"]
    {
        assert!(out.contains(needle), "`{needle}` missing from serve --help:\n{out}");
    }
}

/// Writes real events to a data directory with the library, as the server would.
fn write_events(data: &Path, per_type: usize) {
    std::fs::create_dir_all(data).unwrap();
    std::fs::write(data.join("CAIRN_DATA_DIR"), "cairn data directory, format 2\n").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let log = EmbeddedLog::open(data.join("log"), EmbeddedOptions::default()).unwrap();
        for topic in cairn_events::topics::ALL {
            log.create_topic(topic, 2).await.unwrap();
        }
        for _ in 0..per_type {
            for t in EventType::ALL {
                let e = sample_event(t);
                log.append(cairn_log::NewRecord::new(e.topic(), e.partition_key(), e.canonical_bytes())).await.unwrap();
            }
        }
    });
}

#[test]
fn log_tail_prints_every_event_with_its_chain_position() {
    let tmp = tempfile::tempdir().unwrap();
    write_events(tmp.path(), 3);
    let (status, out, err) = run_cairn(&["log", "tail", "--data-dir", tmp.path().to_str().unwrap()]);
    assert!(status.success(), "{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3 * EventType::ALL.len());
    for line in &lines {
        let event = &line["event"];
        assert_eq!(event["hash"].as_str().unwrap().len(), 64, "{line}");
        assert_eq!(event["prev_hash"].as_str().unwrap().len(), 64, "{line}");
        // Parses back into a typed event.
        cairn_events::Event::from_canonical_bytes(serde_json::to_string(event).unwrap().as_bytes()).unwrap();
    }
    let (_, out, _) = run_cairn(&["log", "tail", "--data-dir", tmp.path().to_str().unwrap(), "--topic", "cairn.fhir"]);
    assert_eq!(out.lines().count(), 3 * 3, "three fhir.resource.* types, three times");
    let (status, _, err) = run_cairn(&["log", "tail", "--data-dir", tmp.path().to_str().unwrap(), "--topic", "nope"]);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("unknown topic `nope`"), "{err}");
}

#[test]
fn log_verify_reports_the_first_broken_link_and_exits_non_zero() {
    let tmp = tempfile::tempdir().unwrap();
    write_events(tmp.path(), 5);
    let dir = tmp.path().to_str().unwrap();
    let (status, out, _) = run_cairn(&["log", "verify", "--data-dir", dir]);
    assert!(status.success(), "{out}");
    assert!(out.contains(&format!("ok: {} events", 5 * EventType::ALL.len())), "{out}");

    // Change one byte of one stored event's value (the glucose reading 104 -> 105).
    let seg = tmp.path().join("log/segments/0000000000.seg");
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.windows(11).position(|w| w == b"\"value\":104").expect("reading present") + 10;
    bytes[at] = b'5';
    std::fs::write(&seg, &bytes).unwrap();
    let (status, out, _) = run_cairn(&["log", "verify", "--data-dir", dir]);
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("BROKEN:") && out.contains("checksum"), "{out}");

    let (status, out, _) = run_cairn(&["log", "verify", "--data-dir", dir, "--json"]);
    assert_eq!(status.code(), Some(2));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["ok"], false);
    assert!(json["problem"]["position"].as_u64().is_some());
}

/// With `OTEL_EXPORTER_OTLP_ENDPOINT` set, request spans reach an OTLP/HTTP collector; the test plays
/// the collector. Without it nothing is sent (the other tests run without it).
#[test]
fn spans_are_exported_over_otlp_when_an_endpoint_is_set() {
    use std::io::{Read, Write};
    let collector = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", collector.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel::<(String, usize)>();
    std::thread::spawn(move || {
        for stream in collector.incoming() {
            let Ok(mut stream) = stream else { break };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            // Read the head, then the body by Content-Length.
            let (head, body_len) = loop {
                let n = stream.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break (String::new(), 0);
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    while buf.len() < end + 4 + len {
                        let n = stream.read(&mut chunk).unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    break (head, len);
                }
            };
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n");
            let _ = tx.send((head.lines().next().unwrap_or_default().to_owned(), body_len));
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with_env(tmp.path(), &[], &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)]);
    let (status, _) = get(&format!("{}/healthz", server.base_url));
    assert_eq!(status, 200);
    let (status, stderr) = server.terminate(); // shutdown flushes the batch exporter
    assert!(status.success(), "{stderr}");
    let (request_line, body_len) = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("an OTLP export arrived");
    assert_eq!(request_line, "POST /v1/traces HTTP/1.1");
    assert!(body_len > 0, "the export carries spans");
}

/// The embedded server signs its chain heads (seals in `cairn.chain`, about once a second) with the
/// installation's Ed25519 key; `log verify` checks every seal against the recomputed chains, and with
/// `--seal-public-key` that each seal is signed by that key.
#[test]
fn embedded_log_heads_are_signed_and_verified() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let s = Server::start(tmp.path(), &["--insecure-no-auth"]);
    let base = s.base_url.clone();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let client = reqwest::Client::new();
        for i in 0..10 {
            let reading = serde_json::json!({"resourceType": "Observation", "status": "final", "code": {"text": "glucose"},
                "subject": {"reference": format!("Patient/p{}", i % 3)}});
            let r = client
                .post(format!("{base}/fhir/Observation"))
                .header("content-type", "application/fhir+json")
                .json(&reading)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 201);
        }
        tokio::time::sleep(cairn_log::seal::SEAL_EVERY * 3).await;
    });
    assert!(s.terminate().0.success());
    let public = tmp.path().join("keys/seal-ed25519.key.pub");
    let (status, out, err) =
        run_cairn(&["log", "verify", "--data-dir", dir, "--seal-public-key", public.to_str().unwrap()]);
    assert!(status.success(), "{out}{err}");
    let sealed = out.lines().find(|l| l.contains("partitions match")).unwrap_or_else(|| panic!("{out}"));
    assert!(!sealed.contains("match 0 seals") && sealed.contains("(0 not sealed yet"), "{sealed}");
    assert!(!out.contains("warning"), "{out}");
    let stranger = cairn_log::seal::SealSigner::generate().public_key_hex();
    let (status, out, _) = run_cairn(&["log", "verify", "--data-dir", dir, "--seal-public-key", &stranger]);
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("not signed by a trusted key"), "{out}");
    let (status, out, _) = run_cairn(&["log", "verify", "--data-dir", dir, "--json"]);
    assert!(status.success());
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(json["seals"]["seals_checked"].as_u64().is_some_and(|n| n > 0), "{json}");
}
