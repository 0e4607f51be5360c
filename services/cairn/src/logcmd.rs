//! `cairn log tail` and `cairn log verify`: read-only, safe beside a running server.

use crate::datadir::DataDir;
use crate::{TailArgs, VerifyArgs, config, telemetry};
use anyhow::Context;
use cairn_events::Event;
use cairn_log::EventLog;
use cairn_log::embedded::EmbeddedOptions;
use serde_json::Value;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Instant;

pub fn tail(args: TailArgs) -> anyhow::Result<ExitCode> {
    telemetry::init_cli();
    let backends = config::backends(&args.common)?;
    let data = DataDir::open_existing(&config::data_dir(&args.common)?)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    rt.block_on(async {
        let log =
            crate::backends::open_log(&backends, &data, EmbeddedOptions { read_only: true, ..Default::default() })
                .await?
                .as_dyn();
        let topics: Vec<_> = match &args.topic {
            Some(t) => vec![cairn_log::TopicInfo { name: t.clone(), partitions: log.partitions(t)? }],
            None => log.topics(),
        };
        for topic in topics {
            let partitions: Vec<u32> = match args.partition {
                Some(p) => vec![p],
                None => (0..topic.partitions).collect(),
            };
            for partition in partitions {
                let mut next = args.from;
                let mut printed = 0usize;
                loop {
                    let want = args.limit.map(|l| l - printed).unwrap_or(usize::MAX).min(1024);
                    if want == 0 {
                        break;
                    }
                    let records = log.read(&topic.name, partition, next, want).await?;
                    if records.is_empty() {
                        break;
                    }
                    for r in &records {
                        let mut line = serde_json::json!({
                            "topic": r.topic,
                            "partition": r.partition,
                            "offset": r.offset,
                            "key": String::from_utf8_lossy(&r.key),
                        });
                        match Event::from_canonical_bytes(&r.value) {
                            Ok(mut event) => {
                                event.prev_hash = r.prev_hash.map(cairn_events::ChainHash);
                                event.hash = r.hash.map(cairn_events::ChainHash);
                                line["event"] = event.to_json_with_chain();
                            }
                            Err(e) => {
                                line["error"] = format!("not a Cairn event: {e}").into();
                                line["value_bytes"] = r.value.len().into();
                            }
                        }
                        serde_json::to_writer(&mut out, &line)?;
                        out.write_all(b"\n")?;
                    }
                    printed += records.len();
                    next = records.last().map(|r| r.offset + 1).unwrap_or(next);
                }
            }
        }
        out.flush()?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    telemetry::init_cli();
    let backends = config::backends(&args.common)?;
    if let crate::config::LogBackend::Kafka(_) = backends.log {
        let data = DataDir::open_existing(&config::data_dir(&args.common)?)?;
        let rt = runtime()?;
        let log = rt
            .block_on(crate::backends::open_log(
                &backends,
                &data,
                EmbeddedOptions { read_only: true, ..Default::default() },
            ))?
            .as_dyn();
        let (ok, report) = verify_sealed(&args, &rt, log.as_ref())?;
        if args.json {
            print_json_report(&report, ok)?;
        }
        return Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(2) });
    }
    let data = DataDir::open_existing(&config::data_dir(&args.common)?)?;
    let started = Instant::now();
    let show_progress = std::io::stderr().is_terminal();
    let report = cairn_log::verify::verify_embedded(&data.log_dir(), |done, total| {
        if show_progress && total > 0 {
            eprint!("\rverifying: {:>5.1}% of {} MiB", done as f64 * 100.0 / total as f64, total >> 20);
        }
    })
    .context("verify")?;
    if show_progress {
        eprintln!();
    }
    let elapsed = started.elapsed().as_secs_f64();
    if !args.json {
        for p in &report.partitions {
            println!("{}/{}: {} events, head {}", p.topic, p.partition, p.records, p.head_hash);
        }
        if let Some(problem) = &report.problem {
            println!("BROKEN: {problem}");
        }
        if let Some(torn) = &report.torn_tail {
            println!(
                "UNVERIFIED TAIL: {torn}: not a complete frame. After a crash this is the append that was \
                 never acknowledged (the next `cairn serve` moves it to quarantine/); otherwise the log was damaged."
            );
        }
    }
    // The frames and their chains are sound; the seals (signed checkpoints, when the server made any)
    // say whether these are the chains the server signed.
    let (seals_ok, seals) = if report.ok() {
        // One read-only open of the log for every seal check (a log written before seals has none).
        let log = cairn_log::embedded::EmbeddedLog::open(
            data.log_dir(),
            EmbeddedOptions { read_only: true, ..Default::default() },
        )?;
        if log.partitions(cairn_log::seal::SEAL_TOPIC).is_ok() {
            verify_sealed(&args, &runtime()?, &log)?
        } else {
            (true, Value::Null)
        }
    } else {
        (true, Value::Null)
    };
    if args.json {
        let mut json = serde_json::to_value(&report)?;
        json["seals"] = seals;
        print_json_report(&json, report.ok() && seals_ok)?;
    } else if report.ok() && seals_ok {
        println!(
            "ok: {} events in {} partitions verified ({} bytes, {:.0} events/s)",
            report.records,
            report.partitions.len(),
            report.bytes,
            report.records as f64 / elapsed.max(1e-9)
        );
    }
    Ok(if report.ok() && seals_ok { ExitCode::SUCCESS } else { ExitCode::from(2) })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// Recomputes every partition's chain and checks it against the seals (signed checkpoints), printing
/// a line per partition unless `--json`; returns the verdict and the report as JSON.
fn verify_sealed(args: &VerifyArgs, rt: &tokio::runtime::Runtime, log: &dyn EventLog) -> anyhow::Result<(bool, Value)> {
    let started = Instant::now();
    let show_progress = std::io::stderr().is_terminal();
    let trusted = trusted_seal_keys(args)?;
    let report = rt.block_on(cairn_log::seal::verify_sealed(log, &trusted, |done| {
        if show_progress && done % 10_000 == 0 {
            eprint!("\rverifying: {done} events");
        }
    }))?;
    if show_progress {
        eprintln!();
    }
    let elapsed = started.elapsed().as_secs_f64();
    if !args.json {
        for p in &report.partitions {
            println!(
                "{}/{}: {} events, {} seals checked, {} after the last seal, head {}",
                p.topic, p.partition, p.records, p.seals_checked, p.unsealed_records, p.head_hash
            );
        }
        if let Some(problem) = &report.problem {
            println!("BROKEN: {problem}");
        } else {
            if !report.signatures_checked {
                println!(
                    "warning: seal signatures not checked (give --seal-public-key): a forger who rewrote both the \
                     records and the seals would pass"
                );
            }
            let unsealed: u64 = report.partitions.iter().map(|p| p.unsealed_records).sum();
            println!(
                "ok: {} events in {} partitions match {} seals ({} not sealed yet; {:.0} events/s)",
                report.records,
                report.partitions.len(),
                report.seals_checked,
                unsealed,
                report.records as f64 / elapsed.max(1e-9)
            );
        }
    }
    Ok((report.ok(), serde_json::to_value(&report)?))
}

/// The seal keys the verifier trusts: `--seal-public-key`s and the Ed25519 keys of `--jwks`.
pub(crate) fn trusted_seal_keys(args: &VerifyArgs) -> anyhow::Result<Vec<ed25519_dalek::VerifyingKey>> {
    let mut keys: Vec<_> =
        args.seal_public_key.iter().map(|k| crate::keys::read_public_key(k)).collect::<anyhow::Result<_>>()?;
    if let Some(path) = &args.jwks {
        let text = std::fs::read(path).with_context(|| format!("--jwks {}", path.display()))?;
        let jwks: Value =
            serde_json::from_slice(&text).map_err(|e| anyhow::anyhow!("--jwks {}: not JSON: {e}", path.display()))?;
        keys.extend(
            cairn_log::seal::seal_keys_of_jwks(&jwks).map_err(|e| anyhow::anyhow!("--jwks {}: {e}", path.display()))?,
        );
    }
    Ok(keys)
}

/// A verify report as one JSON object with its verdict in `ok`.
fn print_json_report(report: &impl serde::Serialize, ok: bool) -> anyhow::Result<()> {
    let mut json = serde_json::to_value(report)?;
    json["ok"] = ok.into();
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}
