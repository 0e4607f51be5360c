//! `cairn bench`: a load generator for any FHIR server (Cairn or a peer), so one run can measure
//! both. Drives realistic glucose readings (LOINC 2339-0 mg/dL and 15074-8 mmol/L, device and patient
//! references, identifiers) as single creates or batch Bundles, or a patient/code/date search, from N
//! concurrent connections for T seconds, then prints throughput and latency percentiles.

use crate::BenchArgs;
use anyhow::{Context, bail};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// POST one Observation per request.
    Create,
    /// POST a batch Bundle of `--batch-size` Observations per request.
    Batch,
    /// GET Observation?patient=..&code=..&date=ge..&date=le..
    Search,
}

/// A deterministic generator so runs are comparable.
struct Gen(u64);
impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn reading(g: &mut Gen, patients: u64, worker: usize, seq: u64) -> serde_json::Value {
    let patient = g.next() % patients;
    let minutes = g.next() % (60 * 24 * 365);
    let when = chrono::DateTime::<chrono::Utc>::from_timestamp(1_767_225_600 + (minutes * 60) as i64, 0)
        .expect("in range")
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let (code, display, value, unit) = if g.next().is_multiple_of(4) {
        ("15074-8", "Glucose [Moles/volume] in Blood", 3.5 + (g.next() % 100) as f64 / 10.0, "mmol/L")
    } else {
        ("2339-0", "Glucose [Mass/volume] in Blood", (60 + g.next() % 180) as f64, "mg/dL")
    };
    serde_json::json!({
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}]},
        "subject": {"reference": format!("Patient/bench-{patient}")},
        "device": {"reference": format!("Device/meter-{}", patient % 1000)},
        "identifier": [{"system": "urn:cairn:bench", "value": format!("{worker}-{seq}-{}", g.next())}],
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}
    })
}

struct Totals {
    ok: AtomicU64,
    errors: AtomicU64,
    resources: AtomicU64,
}

pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let base = args.base_url.trim_end_matches('/').to_owned();
    if !base.starts_with("http://") {
        bail!("--base-url {base}: only http:// URLs are supported by the load tool");
    }
    if args.connections == 0 || args.batch_size == 0 || args.patients == 0 {
        bail!("--connections, --batch-size and --patients must be at least 1");
    }
    let duration = Duration::from_secs_f64(args.seconds);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let client = reqwest::Client::builder().pool_max_idle_per_host(args.connections).build().context("HTTP client")?;
    let totals = Arc::new(Totals { ok: AtomicU64::new(0), errors: AtomicU64::new(0), resources: AtomicU64::new(0) });
    let started = Instant::now();
    let deadline = started + duration;
    let latencies: Vec<Vec<u32>> = runtime.block_on(async {
        let mut tasks = Vec::new();
        for worker in 0..args.connections {
            let client = client.clone();
            let base = base.clone();
            let token = args.token.clone();
            let totals = totals.clone();
            let (workload, batch_size, patients) = (args.workload, args.batch_size, args.patients);
            tasks.push(tokio::spawn(async move {
                let mut g = Gen(0x9e37_79b9_7f4a_7c15 ^ (worker as u64 + 1).wrapping_mul(0x1000_0000_01b3));
                let mut lat = Vec::new();
                let mut seq = 0u64;
                let mut first_error_shown = false;
                while Instant::now() < deadline {
                    let (req, resources) = match workload {
                        Workload::Create => {
                            seq += 1;
                            let body = serde_json::to_vec(&reading(&mut g, patients, worker, seq)).expect("json");
                            (client.post(format!("{base}/Observation")).header("content-type", "application/fhir+json").body(body), 1)
                        }
                        Workload::Batch => {
                            let entries: Vec<serde_json::Value> = (0..batch_size)
                                .map(|_| {
                                    seq += 1;
                                    serde_json::json!({"resource": reading(&mut g, patients, worker, seq), "request": {"method": "POST", "url": "Observation"}})
                                })
                                .collect();
                            let bundle = serde_json::json!({"resourceType": "Bundle", "type": "batch", "entry": entries});
                            let body = serde_json::to_vec(&bundle).expect("json");
                            (client.post(base.clone()).header("content-type", "application/fhir+json").body(body), batch_size as u64)
                        }
                        Workload::Search => {
                            let patient = g.next() % patients;
                            let month = 1 + g.next() % 11;
                            let url = format!(
                                "{base}/Observation?patient=Patient/bench-{patient}&code=http://loinc.org|2339-0&date=ge2026-{month:02}-01&date=le2026-{:02}-01",
                                month + 1
                            );
                            (client.get(url), 0)
                        }
                    };
                    let req = match &token {
                        Some(t) => req.bearer_auth(t),
                        None => req,
                    };
                    let t0 = Instant::now();
                    let outcome = req.send().await;
                    let ok = match outcome {
                        Ok(r) => {
                            let status = r.status();
                            let _ = r.bytes().await;
                            if !status.is_success() && !first_error_shown {
                                eprintln!("cairn bench: first error response: HTTP {status}");
                                first_error_shown = true;
                            }
                            status.is_success()
                        }
                        Err(e) => {
                            if !first_error_shown {
                                eprintln!("cairn bench: first transport error: {e}");
                                first_error_shown = true;
                            }
                            false
                        }
                    };
                    lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    if ok {
                        totals.ok.fetch_add(1, Ordering::Relaxed);
                        totals.resources.fetch_add(resources, Ordering::Relaxed);
                    } else {
                        totals.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                lat
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.push(t.await.expect("bench worker"));
        }
        all
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut lat: Vec<u32> = latencies.into_iter().flatten().collect();
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1] as f64 / 1000.0
    };
    let ok = totals.ok.load(Ordering::Relaxed);
    let errors = totals.errors.load(Ordering::Relaxed);
    let resources = totals.resources.load(Ordering::Relaxed);
    println!("workload {:?} against {base}: {} connections, {:.1} s", args.workload, args.connections, elapsed);
    println!("requests: {ok} ok, {errors} failed; {:.0} requests/s", ok as f64 / elapsed);
    if resources > 0 {
        println!("resources written: {resources}; {:.0} resources/s", resources as f64 / elapsed);
    }
    println!(
        "latency ms: p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}",
        pct(0.50),
        pct(0.95),
        pct(0.99),
        lat.last().map(|&m| m as f64 / 1000.0).unwrap_or(0.0)
    );
    Ok(if errors == 0 && ok > 0 { ExitCode::SUCCESS } else { ExitCode::from(3) })
}
