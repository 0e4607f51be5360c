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
    /// GET AuditEvent?patient=..&date=ge..&date=le.. over the last day: the compliance officer's
    /// "who accessed this patient's data" (run a create workload first so there is a trail).
    AuditSearch,
    /// POST /token: client_credentials with private_key_jwt (ES384), as SMART Backend Services do.
    /// Registers its own client at /register (needs --registration-token); assertions are signed
    /// before the clock starts, so the figure is the server's.
    Grant,
    /// POST /token: client_credentials with client_secret_basic.
    GrantSecret,
    /// POST /introspect of a live token, authenticated with client_secret_basic.
    Introspect,
    /// Revocation propagation, one revocation at a time: a token is granted and used at
    /// `--check-url` (so that instance has verified and cached it), revoked at `--base-url`'s
    /// /revoke, then used at `--check-url` back to back until refused. Prints the distribution of the
    /// time from /revoke's answer (and from its sending) to the first refusal, and how many requests
    /// were admitted after the answer.
    Revocation,
}

/// Form requests the auth workloads send, prepared before the run.
struct AuthPlan {
    url: String,
    basic: Option<(String, String)>,
    /// One form body per request (each assertion is single use), or one body for every request.
    bodies: Vec<String>,
    next: AtomicU64,
}

impl AuthPlan {
    fn body(&self) -> Option<String> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        match self.bodies.len() {
            1 => Some(self.bodies[0].clone()),
            n if i < n => Some(self.bodies[i].clone()),
            _ => None,
        }
    }
}

fn form(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish()
}

/// Registers a client for the auth workloads and prepares their requests.
async fn auth_plan(client: &reqwest::Client, args: &BenchArgs, base: &str) -> anyhow::Result<AuthPlan> {
    let server = base.trim_end_matches("/fhir").to_owned();
    let Some(reg_token) = &args.registration_token else {
        bail!(
            "--workload {:?} registers its own client: give --registration-token (cairn admin registration-token)",
            args.workload
        );
    };
    let scope = "system/Observation.crs";
    let (metadata, key) = match args.workload {
        Workload::Grant => {
            use aws_lc_rs::signature::{ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
            use base64::Engine;
            let pair = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING)
                .map_err(|_| anyhow::anyhow!("key generation"))?;
            let point = pair.public_key().as_ref().to_vec();
            let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
            let jwk = serde_json::json!({"kty": "EC", "crv": "P-384", "kid": "bench-1", "alg": "ES384", "x": b64(&point[1..49]), "y": b64(&point[49..97])});
            let der = pair.to_pkcs8v1().map_err(|_| anyhow::anyhow!("key encoding"))?;
            let metadata = serde_json::json!({"client_name": "cairn bench", "token_endpoint_auth_method": "private_key_jwt",
                "grant_types": ["client_credentials"], "scope": scope, "jwks": {"keys": [jwk]}});
            (metadata, Some(jsonwebtoken::EncodingKey::from_ec_der(der.as_ref())))
        }
        _ => (
            serde_json::json!({"client_name": "cairn bench", "token_endpoint_auth_method": "client_secret_basic",
                "grant_types": ["client_credentials"], "scope": scope}),
            None,
        ),
    };
    let resp = client.post(format!("{server}/register")).bearer_auth(reg_token).json(&metadata).send().await?;
    let status = resp.status();
    let reg: serde_json::Value = resp.json().await.unwrap_or_default();
    if status.as_u16() != 201 {
        bail!("registering the bench client at {server}/register: HTTP {status}: {reg}");
    }
    let id = reg["client_id"].as_str().unwrap_or_default().to_owned();
    let secret = reg["client_secret"].as_str().map(str::to_owned);
    let token_url = format!("{server}/token");
    Ok(match args.workload {
        Workload::Grant => {
            let key = key.expect("made above");
            let n = args.assertions;
            eprintln!("cairn bench: signing {n} client assertions before the run");
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
            let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES384);
            header.kid = Some("bench-1".into());
            let mut bodies = Vec::with_capacity(n);
            for i in 0..n {
                let claims = serde_json::json!({"iss": id, "sub": id, "aud": token_url, "exp": now + 290, "jti": format!("bench-{now}-{i}")});
                let jwt = jsonwebtoken::encode(&header, &claims, &key)?;
                bodies.push(form(&[
                    ("grant_type", "client_credentials"),
                    ("scope", scope),
                    ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
                    ("client_assertion", &jwt),
                ]));
            }
            AuthPlan { url: token_url, basic: None, bodies, next: AtomicU64::new(0) }
        }
        Workload::GrantSecret | Workload::Revocation => AuthPlan {
            url: token_url,
            basic: Some((id, secret.unwrap_or_default())),
            bodies: vec![form(&[("grant_type", "client_credentials"), ("scope", scope)])],
            next: AtomicU64::new(0),
        },
        _ => {
            let secret = secret.unwrap_or_default();
            let t: serde_json::Value = client
                .post(&token_url)
                .basic_auth(&id, Some(&secret))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form(&[("grant_type", "client_credentials"), ("scope", scope)]))
                .send()
                .await?
                .json()
                .await?;
            let token = t["access_token"].as_str().context("no token for the introspection workload")?.to_owned();
            AuthPlan {
                url: format!("{server}/introspect"),
                basic: Some((id, secret)),
                bodies: vec![form(&[("token", &token)])],
                next: AtomicU64::new(0),
            }
        }
    })
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
    if args.workload == Workload::Revocation {
        let plan = runtime.block_on(auth_plan(&client, &args, &base))?;
        return runtime.block_on(revocation(&client, &args, &base, &plan, duration));
    }
    let plan = match args.workload {
        Workload::Grant | Workload::GrantSecret | Workload::Introspect => {
            Some(Arc::new(runtime.block_on(auth_plan(&client, &args, &base))?))
        }
        _ => None,
    };
    let started = Instant::now();
    let deadline = started + duration;
    let latencies: Vec<Vec<u32>> = runtime.block_on(async {
        let mut tasks = Vec::new();
        for worker in 0..args.connections {
            let client = client.clone();
            let base = base.clone();
            let token = args.token.clone();
            let totals = totals.clone();
            let plan = plan.clone();
            let (workload, batch_size, patients) = (args.workload, args.batch_size, args.patients);
            let prefer = args.prefer.as_ref().map(|p| format!("return={p}"));
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
                        Workload::AuditSearch => {
                            let patient = g.next() % patients;
                            let now = chrono::Utc::now();
                            let from = (now - chrono::Duration::days(1)).format("%Y-%m-%dT%H:%M:%SZ");
                            let to = now.format("%Y-%m-%dT%H:%M:%SZ");
                            (client.get(format!("{base}/AuditEvent?patient=Patient/bench-{patient}&date=ge{from}&date=le{to}")), 0)
                        }
                        Workload::Revocation => unreachable!("run apart"),
                        Workload::Grant | Workload::GrantSecret | Workload::Introspect => {
                            let plan = plan.as_ref().expect("prepared");
                            let Some(body) = plan.body() else {
                                eprintln!("cairn bench: out of pre-signed assertions; raise --assertions");
                                break;
                            };
                            let req = client.post(&plan.url).header("content-type", "application/x-www-form-urlencoded").body(body);
                            let req = match &plan.basic {
                                Some((id, secret)) => req.basic_auth(id, Some(secret)),
                                None => req,
                            };
                            (req, 0)
                        }
                    };
                    let req = match (&prefer, workload) {
                        (Some(p), Workload::Create | Workload::Batch) => req.header("prefer", p),
                        _ => req,
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
    let ok = totals.ok.load(Ordering::Relaxed);
    let errors = totals.errors.load(Ordering::Relaxed);
    let resources = totals.resources.load(Ordering::Relaxed);
    println!("workload {:?} against {base}: {} connections, {:.1} s", args.workload, args.connections, elapsed);
    println!("requests: {ok} ok, {errors} failed; {:.0} requests/s", ok as f64 / elapsed);
    if resources > 0 {
        println!("resources written: {resources}; {:.0} resources/s", resources as f64 / elapsed);
    }
    println!("latency ms: {}", distribution(&lat));
    if resources > 0 {
        println!("{}", runtime.block_on(settle(&client, &base, args.token.as_deref())));
    }
    Ok(if errors == 0 && ok > 0 { ExitCode::SUCCESS } else { ExitCode::from(3) })
}

/// How long after the last write a read saw every write: one `_summary=count` search, which on Cairn
/// waits for the projection to reach the log's end (answering 503 past the server's read bound) and
/// elsewhere answers at once. Shows whether the store kept up with the writes, not only the log.
async fn settle(client: &reqwest::Client, base: &str, token: Option<&str>) -> String {
    let started = Instant::now();
    loop {
        let req = client.get(format!("{base}/Observation?_summary=count"));
        let req = match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        match req.send().await {
            Ok(r) if r.status().is_success() => {
                return format!("reads current again {} ms after the last write", started.elapsed().as_millis());
            }
            Ok(r) if r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE && started.elapsed() < SETTLE_LIMIT => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(r) => return format!("a read after the run answered HTTP {}", r.status()),
            Err(e) => return format!("a read after the run failed: {e}"),
        }
    }
}

/// How long the load tool waits for reads to be current after a run.
const SETTLE_LIMIT: Duration = Duration::from_secs(300);

/// The `p`-quantile of sorted microsecond samples, in milliseconds.
fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    sorted_us[((sorted_us.len() as f64 * p).ceil() as usize).clamp(1, sorted_us.len()) - 1] as f64 / 1000.0
}

fn distribution(sorted_us: &[u32]) -> String {
    format!(
        "p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}",
        percentile_ms(sorted_us, 0.50),
        percentile_ms(sorted_us, 0.95),
        percentile_ms(sorted_us, 0.99),
        percentile_ms(sorted_us, 1.0)
    )
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

/// The revocation workload (see [`Workload::Revocation`]).
async fn revocation(
    client: &reqwest::Client,
    args: &BenchArgs,
    base: &str,
    plan: &AuthPlan,
    duration: Duration,
) -> anyhow::Result<ExitCode> {
    let check = args.check_url.as_deref().unwrap_or(base).trim_end_matches('/').to_owned();
    let server = base.trim_end_matches("/fhir").to_owned();
    let (id, secret) = plan.basic.clone().context("the revocation workload authenticates with a client secret")?;
    let probe = format!("{check}/Observation?_count=1");
    let give_up = Duration::from_secs(30);
    let (mut from_answer, mut from_sending) = (Vec::new(), Vec::new());
    let (mut admitted_after_answer, mut probes) = (0u64, 0u64);
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        let body = plan.body().context("no grant request")?;
        let resp = client
            .post(&plan.url)
            .basic_auth(&id, Some(&secret))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await?;
        let grant: serde_json::Value = resp.json().await?;
        let token = grant["access_token"].as_str().with_context(|| format!("no token granted: {grant}"))?.to_owned();
        // Until the checking instance knows the client and has verified the token once.
        let known_by = Instant::now() + give_up;
        loop {
            let status = client.get(&probe).bearer_auth(&token).send().await?.status();
            if status.is_success() {
                break;
            }
            if Instant::now() > known_by {
                bail!("{check} never accepted a fresh token (last answer HTTP {status})");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let sent = Instant::now();
        let resp = client
            .post(format!("{server}/revoke"))
            .basic_auth(&id, Some(&secret))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form(&[("token", &token)]))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("POST {server}/revoke: HTTP {}", resp.status());
        }
        let answered = Instant::now();
        loop {
            probes += 1;
            let status = client.get(&probe).bearer_auth(&token).send().await?.status().as_u16();
            match status {
                401 => break,
                200 => admitted_after_answer += 1,
                other => bail!("GET {probe}: HTTP {other} while waiting for the revocation"),
            }
            if answered.elapsed() > give_up {
                bail!("{check} still accepted a token {} s after its revocation", give_up.as_secs());
            }
        }
        from_answer.push(micros(answered.elapsed()));
        from_sending.push(micros(sent.elapsed()));
    }
    from_answer.sort_unstable();
    from_sending.sort_unstable();
    println!("workload Revocation: revoked at {server}, enforced at {check}: {} revocations", from_answer.len());
    println!("first refusal after /revoke answered, ms: {}", distribution(&from_answer));
    println!("first refusal after /revoke was sent, ms: {}", distribution(&from_sending));
    println!("requests admitted after /revoke answered: {admitted_after_answer} of {probes}");
    Ok(if from_answer.is_empty() { ExitCode::from(3) } else { ExitCode::SUCCESS })
}
