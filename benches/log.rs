//! Event-log benchmarks: durable append throughput of 1 KiB events (every append fsynced, group
//! committed) and chain verification speed.
//!
//! `cargo bench -p cairn-benches --bench log`. Under `cargo test` each benchmark runs once, as a
//! smoke test, with a small data set.

use cairn_log::embedded::{EmbeddedLog, EmbeddedOptions};
use cairn_log::{EventLog, NewRecord};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::sync::Arc;
use std::time::{Duration, Instant};

const EVENT_BYTES: usize = 1024;

fn benchmarking() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn record(i: u64) -> NewRecord {
    let mut value = format!("{{\"n\":{i},\"pad\":\"").into_bytes();
    value.resize(EVENT_BYTES - 2, b'x');
    value.extend_from_slice(b"\"}");
    NewRecord::new("bench", format!("Patient/{}", i % 1000), value)
}

fn open_log(dir: &std::path::Path, rt: &tokio::runtime::Runtime) -> Arc<EmbeddedLog> {
    let log = Arc::new(EmbeddedLog::open(dir, EmbeddedOptions::default()).unwrap());
    rt.block_on(log.create_topic("bench", 8)).unwrap();
    log
}

/// One appender, one batch per append call: the cost of a durable batch of 1, 64 and 1024 events.
fn append_batches(c: &mut Criterion) {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let log = open_log(tmp.path(), &rt);
    let mut group = c.benchmark_group("append_1KiB_batch");
    group.sample_size(10).measurement_time(Duration::from_secs(5));
    for batch in [1usize, 64, 1024] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &batch| {
            let mut i = 0u64;
            b.to_async(&rt).iter(|| {
                let records: Vec<NewRecord> = (0..batch as u64).map(|k| record(i + k)).collect();
                i += batch as u64;
                let log = log.clone();
                async move { log.append_batch(records).await.unwrap() }
            });
        });
    }
    group.finish();
}

/// 64 concurrent appenders of single 1 KiB events, each append durable: group commit at work.
/// One iteration is one append by each of the 64 appenders.
fn append_concurrent(c: &mut Criterion) {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let log = open_log(tmp.path(), &rt);
    let mut group = c.benchmark_group("append_1KiB_concurrent");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    const APPENDERS: u64 = 64;
    group.throughput(Throughput::Elements(APPENDERS));
    group.bench_function(BenchmarkId::from_parameter(APPENDERS), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                let tasks: Vec<_> = (0..APPENDERS)
                    .map(|a| {
                        let log = log.clone();
                        tokio::spawn(async move {
                            for i in 0..iters {
                                log.append(record(a * 1_000_000 + i)).await.unwrap();
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                started.elapsed()
            })
        });
    });
    group.finish();
}

/// Chain verification of a log of 1 KiB events, on one thread.
fn verify(c: &mut Criterion) {
    let events: u64 = if benchmarking() { 200_000 } else { 2_000 };
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    {
        let log = open_log(tmp.path(), &rt);
        rt.block_on(async {
            for chunk in 0..events / 1000 {
                let records: Vec<NewRecord> = (0..1000).map(|k| record(chunk * 1000 + k)).collect();
                log.append_batch(records).await.unwrap();
            }
        });
    }
    let mut group = c.benchmark_group("verify_1KiB");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(events));
    group.bench_function(BenchmarkId::from_parameter(events), |b| {
        b.iter(|| {
            let report = cairn_log::verify::verify_embedded(tmp.path(), |_, _| {}).unwrap();
            assert!(report.ok());
            assert_eq!(report.records, events);
        });
    });
    group.finish();
}

criterion_group!(benches, append_batches, append_concurrent, verify);
criterion_main!(benches);
