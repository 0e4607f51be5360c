//! `cairn audit verify` and `cairn audit export`: the audit trail's evidence. Read-only, safe beside
//! a running server.

use crate::datadir::DataDir;
use crate::{AuditExportArgs, AuditVerifyArgs, VerifyArgs, config, logcmd, telemetry};
use anyhow::{Context, anyhow, bail};
use cairn_audit::export::{AuditSlice, FORMAT, records_about, render_proven, verify_slice};
use cairn_events::{Event, Timestamp};
use cairn_log::EventLog;
use cairn_log::embedded::EmbeddedOptions;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

pub fn verify(args: AuditVerifyArgs) -> anyhow::Result<ExitCode> {
    match &args.export {
        None => logcmd::verify(args.verify),
        Some(path) => verify_export(path, &args.verify),
    }
}

/// Checks a slice file on its own: no data directory, no server.
fn verify_export(path: &Path, args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    telemetry::init_cli();
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let slice: AuditSlice = serde_json::from_reader(std::io::BufReader::new(file))
        .map_err(|e| anyhow!("{}: not an audit slice: {e}", path.display()))?;
    let keys = logcmd::trusted_seal_keys(args)?;
    if keys.is_empty() {
        // Anyone can compute a chain and seal it; only the signatures tie a slice to the server.
        bail!(
            "give the seal keys you trust (--jwks with a JWKS you saved earlier, or --seal-public-key): without \
             them a slice proves nothing"
        );
    }
    let verdict = verify_slice(&slice, &keys);
    if args.json {
        let json = match &verdict {
            Ok(report) => {
                let mut json = serde_json::to_value(report)?;
                json["ok"] = true.into();
                json
            }
            Err(problem) => serde_json::json!({"ok": false, "problem": problem}),
        };
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        match &verdict {
            Ok(r) => {
                println!(
                    "ok: {} AuditEvents and {} Provenances about {}, built from {} log events proven against {} seals \
                     signed by key {}",
                    r.audit_events,
                    r.provenances,
                    r.patient,
                    r.events,
                    r.seals,
                    r.seal_key_ids.join(", ")
                );
                println!(
                    "note: each record is proven; the window ({} to {}) and that no record was left out are the \
                     exporter's word",
                    r.from, r.to
                );
            }
            Err(problem) => println!("BROKEN: {problem}"),
        }
    }
    Ok(if verdict.is_ok() { ExitCode::SUCCESS } else { ExitCode::from(2) })
}

pub fn export(args: AuditExportArgs) -> anyhow::Result<ExitCode> {
    telemetry::init_cli();
    let (id, patient, from, to) = patient_and_window(&args.window)?;
    let id = id.as_str();
    let backends = config::backends(&args.common)?;
    let data = DataDir::open_existing(&config::data_dir(&args.common)?)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let open = || async {
        anyhow::Ok(
            crate::backends::open_log(&backends, &data, EmbeddedOptions { read_only: true, ..Default::default() })
                .await?
                .as_dyn(),
        )
    };
    let slice = rt.block_on(async {
        let log = open().await?;
        let (chosen, scanned) = scan(log.as_ref(), id, &patient, from, to).await?;
        // The newest events may wait for their seal (made about once a second by a running server).
        let deadline = Instant::now() + Duration::from_secs(args.seal_wait_secs);
        let mut log = log;
        let proof = loop {
            let seals = cairn_log::seal::read_seals(log.as_ref()).await?;
            let proof = cairn_log::proof::prove(log.as_ref(), &seals, &chosen).await?;
            if proof.unsealed.is_empty() {
                break proof;
            }
            if Instant::now() >= deadline {
                let (t, p, o) = proof.unsealed.last().expect("not empty");
                bail!(
                    "{} of the slice's {} events are not sealed yet (the newest: {t}/{p} offset {o}); seals are made \
                     about once a second by a running server: start it and export again",
                    proof.unsealed.len(),
                    chosen.values().map(BTreeSet::len).sum::<usize>()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            // A read-only embedded log sees what was appended before it was opened: open it again.
            log = open().await?;
        };
        // The records are rendered from the proven bytes, the way `audit verify --export` renders them
        // (held once: a long patient's records are most of the memory an export takes).
        let proven = cairn_log::proof::verify_spans(&proof.spans, &[])
            .map_err(|e| anyhow!("the proof does not verify (nothing written): {e}"))?;
        let records = render_proven(proven, &patient, from, to).map_err(|e| anyhow!("nothing written: {e}"))?;
        let events: usize = chosen.values().map(BTreeSet::len).sum();
        eprintln!(
            "{events} events about {patient} in the window ({scanned} events scanned), proven by {} spans",
            proof.spans.len()
        );
        let count = |t: &str| records.iter().filter(|r| r.resource_type == t).count();
        let counts = (count("AuditEvent"), count("Provenance"));
        let slice = AuditSlice {
            format: FORMAT.into(),
            patient: patient.clone(),
            from,
            to,
            exported_at: Timestamp::now(),
            records: records.into_iter().map(|r| r.json).collect(),
            proof: proof.spans,
        };
        anyhow::Ok((slice, counts))
    })?;
    let (slice, (audit_events, provenances)) = slice;
    match &args.out {
        Some(path) => {
            // Written beside, then renamed: a reader never finds half a file.
            let partial = path.with_extension("partial");
            let file = std::fs::File::create(&partial).with_context(|| format!("writing {}", partial.display()))?;
            let mut out = std::io::BufWriter::new(file);
            serde_json::to_writer_pretty(&mut out, &slice)?;
            out.into_inner()
                .map_err(|e| e.into_error())
                .and_then(|f| f.sync_all())
                .with_context(|| format!("writing {}", partial.display()))?;
            std::fs::rename(&partial, path).with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "wrote {}: {audit_events} AuditEvents and {provenances} Provenances; check it with `cairn audit verify \
                 --export {} --jwks <the JWKS you saved at setup>`",
                path.display(),
                path.display()
            );
        }
        None => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            serde_json::to_writer_pretty(&mut out, &slice)?;
            out.write_all(b"\n")?;
            out.flush()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--patient` (an id or `Patient/<id>`), `--from` and `--to` (RFC 3339), checked: the id, the
/// reference and the window.
pub(crate) fn patient_and_window(
    args: &crate::PatientWindowArgs,
) -> anyhow::Result<(String, String, Timestamp, Timestamp)> {
    let (patient, from, to) = (&args.patient, &args.window.from, &args.window.to);
    let id = patient.strip_prefix("Patient/").unwrap_or(patient);
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') {
        bail!("--patient {patient}: not a FHIR id (1-64 of A-Z a-z 0-9 - .), nor Patient/<id>");
    }
    let (from, to) = window(from, to)?;
    Ok((id.to_owned(), format!("Patient/{id}"), from, to))
}

/// `--from` and `--to` (RFC 3339), in order.
pub(crate) fn window(from: &str, to: &str) -> anyhow::Result<(Timestamp, Timestamp)> {
    let from: Timestamp = from.parse().map_err(|e| anyhow!("--from: {e}"))?;
    let to: Timestamp = to.parse().map_err(|e| anyhow!("--to: {e}"))?;
    if from > to {
        bail!("--from {from} is after --to {to}");
    }
    Ok((from, to))
}

type Chosen = BTreeMap<(String, u32), BTreeSet<u64>>;

/// Reads every event topic and finds the events that give a record about `patient` in the window.
async fn scan(
    log: &dyn EventLog,
    id: &str,
    patient: &str,
    from: Timestamp,
    to: Timestamp,
) -> anyhow::Result<(Chosen, u64)> {
    let mut chosen = Chosen::new();
    let scanned = scan_log(log, &format!("about {patient}"), &mut |r| {
        // An event about the patient names its id; most do not, and skip the parse.
        if !cairn_audit::scan::contains(&r.value, id.as_bytes()) {
            return false;
        }
        let Ok(event) = Event::from_canonical_bytes(&r.value) else { return false };
        if records_about(&event, patient, from, to).is_empty() {
            return false;
        }
        chosen.entry((r.topic.clone(), r.partition)).or_default().insert(r.offset);
        true
    })
    .await?;
    Ok((chosen, scanned))
}

/// A progress line on stderr while the log is read (when it is a terminal): events read, per second,
/// and how many were kept. Call it with `u64::MAX` at the end to finish the line.
pub(crate) fn progress_line(kept_label: String) -> impl FnMut(u64, u64) + Send {
    let show = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut last_shown = Instant::now();
    let mut shown = false;
    move |scanned, kept| {
        if !show {
            return;
        }
        if scanned == u64::MAX {
            if shown {
                eprintln!();
            }
            return;
        }
        if last_shown.elapsed() >= Duration::from_millis(500) {
            last_shown = Instant::now();
            shown = true;
            eprint!(
                "\rscanning the log: {scanned} events ({:.0}/s), {kept} {kept_label}",
                scanned as f64 / started.elapsed().as_secs_f64().max(1e-9)
            );
        }
    }
}

/// Reads every record of every event topic in order (`cairn_audit::scan::scan_log`) with a progress
/// line. Returns how many records were read.
pub(crate) async fn scan_log(
    log: &dyn EventLog,
    kept_label: &str,
    visit: &mut (dyn FnMut(&cairn_log::Record) -> bool + Send),
) -> anyhow::Result<u64> {
    let mut progress = progress_line(kept_label.to_owned());
    let scanned = cairn_audit::scan::scan_log(log, visit, &mut progress).await?;
    progress(u64::MAX, 0);
    Ok(scanned)
}

/// `cairn audit report`: asks the running server, which runs the report and records it in the trail.
pub fn report(args: crate::AuditReportArgs) -> anyhow::Result<ExitCode> {
    let data_dir = config::data_dir(&args.common)?;
    let socket = crate::admin::socket_path(&data_dir);
    let request = serde_json::json!({"audit_report": crate::admin::AuditReportRequest {
        kind: args.kind,
        patient: args.patient,
        user: args.user,
        from: args.from,
        to: args.to,
        format: args.format,
    }});
    let Some(answer) = crate::admin::send_to_server(&socket, &request)? else {
        bail!(
            "no server answers on {}: a report reads the trail from the running server's store and is itself \
             recorded in its log; start `cairn serve`, or ask its API (GET [base]/AuditEvent/$report)",
            socket.display()
        );
    };
    let answer = answer.map_err(|e| anyhow!("report refused: {e}"))?;
    match answer {
        serde_json::Value::String(csv) => print!("{csv}"),
        json => println!("{}", serde_json::to_string_pretty(&json)?),
    }
    Ok(ExitCode::SUCCESS)
}
