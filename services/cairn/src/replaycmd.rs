//! `cairn replay --until <moment> --into DIR`: the projections as they stood at a past moment, rebuilt
//! from the log into a separate store while the live system keeps serving (the log is only read).
//!
//! "As they stood at T" means: every record the log had accepted by T (the log's own timestamp of
//! each record), partition by partition up to the first record accepted later. With
//! `topic:partition:offset`, that partition ends with that record and the others at its time.
//! Everything the projections store (ids, times, versions) comes from the events, so two replays to
//! the same moment give the same store, byte for byte (`cairn store digest` compares them).
//! `auth-state.json` beside it holds the users, clients, keys and revocation list as they stood.

use crate::datadir::DataDir;
use crate::{ReplayArgs, config, telemetry};
use anyhow::{Context, anyhow, bail};
use cairn_events::Timestamp;
use cairn_log::Record;
use cairn_log::embedded::EmbeddedOptions;
use cairn_projector::{AUDIT, Projector, RESOURCES};
use cairn_store::embedded::{EmbeddedStore, IndexProgress};
use serde_json::json;
use sha2::Digest;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where a replay stops.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Until {
    Time(Timestamp),
    Position { topic: String, partition: u32, offset: u64 },
}

fn parse_until(text: &str) -> anyhow::Result<Until> {
    if let Ok(t) = text.parse::<Timestamp>() {
        return Ok(Until::Time(t));
    }
    let parts: Vec<&str> = text.rsplitn(3, ':').collect();
    if let [offset, partition, topic] = parts[..]
        && let (Ok(partition), Ok(offset)) = (partition.parse(), offset.parse())
    {
        return Ok(Until::Position { topic: topic.to_owned(), partition, offset });
    }
    bail!(
        "--until {text}: neither an RFC 3339 time (2026-11-28T09:00:00Z) nor topic:partition:offset (cairn.fhir:3:1200)"
    )
}

pub fn run(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    telemetry::init_cli();
    let until = parse_until(&args.until)?;
    if !(16..=1 << 20).contains(&args.store_cache_mb) {
        bail!("--store-cache-mb {}: out of range (16 to 1048576)", args.store_cache_mb);
    }
    let backends = config::backends(&args.common)?;
    let source = DataDir::open_existing(&config::data_dir(&args.common)?)?;
    if args.into.join("store").exists() || args.into.join("log").exists() {
        bail!("--into {}: already holds a store or a log; replay into a new or empty directory", args.into.display());
    }
    let created = !args.into.exists();
    let was_empty = !created && std::fs::read_dir(&args.into).is_ok_and(|mut d| d.next().is_none());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let result = rt.block_on(replay(&args, &backends, &source, &until));
    if result.is_err() {
        // Nothing half-written is left behind: what this run created goes. (An interrupted replay
        // leaves its partial store; the next replay into that directory refuses it.)
        if created {
            let _ = std::fs::remove_dir_all(&args.into);
        } else {
            let _ = std::fs::remove_dir_all(args.into.join("store"));
            let _ = std::fs::remove_file(args.into.join("auth-state.json"));
            if was_empty {
                let _ = std::fs::remove_file(args.into.join("CAIRN_DATA_DIR"));
            }
        }
    }
    let manifest = result?;
    let path = args.into.join("replay.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest)?).with_context(|| format!("{}", path.display()))?;
    println!(
        "replayed {} events up to {} into {} in {:.1} s ({} events/s; the indexes took {:.1} s of it); store digest {}",
        manifest["events"],
        manifest["until_log_time"].as_str().unwrap_or_default(),
        args.into.display(),
        manifest["elapsed_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
        manifest["events_per_second"],
        manifest["index_build_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
        manifest["store_digest"].as_str().unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

/// Rebuilds the projections up to `until` into `args.into`; returns the manifest.
async fn replay(
    args: &ReplayArgs,
    backends: &config::Backends,
    source: &DataDir,
    until: &Until,
) -> anyhow::Result<serde_json::Value> {
    {
        let log =
            crate::backends::open_log(backends, source, EmbeddedOptions { read_only: true, ..Default::default() })
                .await?
                .as_dyn();
        let (until_ms, exact) = match until {
            Until::Time(t) => (t.as_millis(), None),
            Until::Position { topic, partition, offset } => {
                log.partitions(topic).map_err(|e| anyhow!("--until: {e}"))?;
                let record = log.read(topic, *partition, *offset, 1).await?.into_iter().next();
                let Some(record) = record.filter(|r| r.offset == *offset) else {
                    bail!("--until: {topic} partition {partition} has no record at offset {offset}");
                };
                (record.timestamp_ms, Some((topic.clone(), *partition, *offset)))
            }
        };
        let keep = move |r: &Record| {
            r.timestamp_ms <= until_ms
                && match &exact {
                    Some((topic, partition, offset)) if r.topic == *topic && r.partition == *partition => {
                        r.offset <= *offset
                    }
                    _ => true,
                }
        };
        let store_file = DataDir::open_or_create(&args.into)?.store_dir().join("resources.redb");
        std::fs::create_dir_all(store_file.parent().expect("a parent"))
            .with_context(|| format!("--into {}", args.into.display()))?;
        // A rebuild: the indexes are written once at the end, in key order (`build_indexes`).
        let rebuilt = Arc::new(EmbeddedStore::create_for_rebuild(&store_file, args.store_cache_mb << 20)?);
        let store: Arc<dyn cairn_store::ResourceStore> = rebuilt.clone();
        let projections: Vec<&'static cairn_projector::Projection> =
            std::iter::once(&RESOURCES).chain(&AUDIT).collect();
        // The records there are now: an upper bound for the progress line.
        let mut total = 0u64;
        for p in &projections {
            for partition in 0..log.partitions(p.topic)? {
                total += log.end_offset(p.topic, partition).await?;
            }
        }
        let started = Instant::now();
        let mut progress = ProgressLine::new(total);
        let mut cut: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for projection in projections {
            let (projector, _) = Projector::new(log.clone(), store.clone(), projection).await?;
            let ends = projector
                .catch_up_until(&keep, &mut |n| progress.add(n as u64))
                .await
                .map_err(|e| anyhow!("{} projection: {e}", projection.name))?;
            cut.insert(projection.topic, ends);
        }
        // Users, clients, keys and the revocation list as they stood: the authorization state rebuilt
        // from the same cut of `cairn.auth`, partition by partition.
        let mut auth = cairn_auth::state::AuthState::default();
        for partition in 0..log.partitions(cairn_events::topics::AUTH)? {
            let mut next = 0;
            'partition: loop {
                let records = log.read(cairn_events::topics::AUTH, partition, next, 4096).await?;
                let Some(last) = records.last() else { break };
                next = last.offset + 1;
                for r in &records {
                    if !keep(r) {
                        break 'partition;
                    }
                    if let Ok(event) = cairn_events::Event::from_canonical_bytes(&r.value) {
                        auth.apply(&event);
                    }
                }
            }
        }
        let auth_state = serde_json::to_vec_pretty(&auth.snapshot())?;
        std::fs::write(args.into.join("auth-state.json"), &auth_state)
            .with_context(|| format!("--into {}", args.into.display()))?;
        let indexes = rebuilt.clone();
        let mut shown = progress.index_line();
        let building = Instant::now();
        tokio::task::spawn_blocking(move || indexes.build_indexes(&mut |at| shown.indexes(at))).await??;
        let index_build = building.elapsed();
        progress.finish();
        let elapsed = started.elapsed();
        let digest = store.digest().await?;
        anyhow::Ok(json!({
            "until": args.until,
            "until_log_time": Timestamp::from_millis(until_ms).to_rfc3339(),
            "source": source_description(backends, &config::data_dir(&args.common)?),
            "cut": cut,
            "events": progress.done,
            "elapsed_ms": elapsed.as_millis() as u64,
            "index_build_ms": index_build.as_millis() as u64,
            "events_per_second": (progress.done as f64 / elapsed.as_secs_f64().max(1e-9)).round(),
            "store_digest": digest,
            "auth_state_sha256": hex::encode(sha2::Sha256::digest(&auth_state)),
        }))
    }
}

fn source_description(backends: &config::Backends, data_dir: &std::path::Path) -> String {
    match &backends.log {
        config::LogBackend::Embedded => format!("embedded log in {}", data_dir.display()),
        config::LogBackend::Kafka(k) => format!("Kafka at {} (topic prefix `{}`)", k.brokers, k.topic_prefix),
    }
}

/// Events done, events per second and the time left, on one line of stderr (when it is a terminal).
struct ProgressLine {
    total: u64,
    done: u64,
    started: Instant,
    shown: Instant,
    visible: bool,
}

impl ProgressLine {
    fn new(total: u64) -> ProgressLine {
        let now = Instant::now();
        ProgressLine { total, done: 0, started: now, shown: now, visible: std::io::stderr().is_terminal() }
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        if self.visible && self.shown.elapsed() >= Duration::from_millis(250) {
            self.shown = Instant::now();
            let rate = self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
            let left = self.total.saturating_sub(self.done) as f64 / rate.max(1.0);
            eprint!(
                "\rreplaying: {} of at most {} events ({:.0}/s, at most {:.0} s left)   ",
                self.done, self.total, rate, left
            );
        }
    }

    /// A line of its own for the index build that follows the events (it runs on another
    /// thread), shown where this one is.
    fn index_line(&self) -> ProgressLine {
        ProgressLine { total: 0, done: 0, started: Instant::now(), shown: Instant::now(), visible: self.visible }
    }

    fn indexes(&mut self, at: IndexProgress) {
        if self.visible && self.shown.elapsed() >= Duration::from_millis(250) {
            self.shown = Instant::now();
            eprint!(
                "\rbuilding indexes: {} of {} index keys written ({:.0} s)                    ",
                at.written,
                at.keys,
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    fn finish(&self) {
        if self.visible {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn until_is_a_time_or_a_position() {
        assert_eq!(parse_until("2026-11-28T09:00:00Z").unwrap(), Until::Time("2026-11-28T09:00:00Z".parse().unwrap()));
        assert_eq!(
            parse_until("cairn.fhir:3:1200").unwrap(),
            Until::Position { topic: "cairn.fhir".into(), partition: 3, offset: 1200 }
        );
        assert!(parse_until("yesterday").unwrap_err().to_string().contains("neither"));
        assert!(parse_until("cairn.fhir:x:1").is_err());
    }
}
