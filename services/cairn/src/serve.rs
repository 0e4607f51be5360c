//! `cairn serve`: the whole platform in one process.

use crate::ServeArgs;
use crate::backends::{self, OpenLog};
use crate::config::{self, Settings};
use crate::datadir::DataDir;
use crate::telemetry::{self, Telemetry};
use anyhow::Context;
use cairn_http::{Check, Platform};
use cairn_log::embedded::EmbeddedOptions;
use cairn_projector::{AUDIT, Progress, Projection, Projector, RESOURCES};
use cairn_service::FhirService;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let settings = config::resolve_serve(&args)?;
    let telemetry = telemetry::init_server()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("cairn").build()?;
    let result = runtime.block_on(serve(settings, &telemetry));
    telemetry.shutdown();
    result.map(|()| ExitCode::SUCCESS)
}

/// What the HTTP layer sees of the running platform.
struct RunningPlatform {
    log: OpenLog,
    resources: Progress,
    auth: Option<Arc<cairn_auth::AuthServer>>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    draining: AtomicBool,
}

/// How often a process on a shared store reads the projector checkpoints (read-your-writes waits on
/// them when another process projects).
const CHECKPOINT_POLL: Duration = Duration::from_millis(10);

/// A projection counts as caught up if it reaches the log's current end within this bound.
const READINESS_LAG_BOUND: Duration = Duration::from_secs(1);

/// How long a clean stop waits for this process's projections to reach the log's end.
const FINISH_PROJECTIONS: Duration = Duration::from_secs(10);

#[async_trait::async_trait]
impl Platform for RunningPlatform {
    async fn readiness(&self) -> Vec<Check> {
        let log = match self.log.failure() {
            None => Check {
                name: "event-log".into(),
                ok: true,
                detail: format!("{}: open, accepting appends", self.log.describe()),
            },
            Some(why) => Check { name: "event-log".into(), ok: false, detail: format!("failed: {why}") },
        };
        let log_handle = self.log.as_dyn();
        let draining = self.draining.load(Ordering::Relaxed);
        let serving = Check {
            name: "serving".into(),
            ok: !draining,
            detail: if draining { "shutting down".into() } else { "accepting requests".into() },
        };
        // A stalled broker must not stall the probe: the log's end is read with the same bound.
        let read_ends = async {
            let mut ends = Vec::new();
            for p in 0..log_handle.partitions(cairn_events::topics::FHIR).unwrap_or(0) {
                ends.push(log_handle.end_offset(cairn_events::topics::FHIR, p).await.unwrap_or(0));
            }
            ends
        };
        let started = std::time::Instant::now();
        let projection = match tokio::time::timeout(READINESS_LAG_BOUND, read_ends).await {
            Ok(ends) => {
                let left = READINESS_LAG_BOUND.saturating_sub(started.elapsed());
                let caught_up = self.resources.wait_for(&ends, left).await;
                let behind: u64 = ends.iter().zip(self.resources.snapshot()).map(|(e, h)| e.saturating_sub(h)).sum();
                Check {
                    name: "projection:resources".into(),
                    ok: caught_up,
                    detail: if caught_up {
                        "caught up with the log".into()
                    } else {
                        format!("{behind} events behind the log after {} ms", READINESS_LAG_BOUND.as_millis())
                    },
                }
            }
            Err(_) => Check {
                name: "projection:resources".into(),
                ok: false,
                detail: format!("the log did not tell its end within {} ms", READINESS_LAG_BOUND.as_millis()),
            },
        };
        let mut checks = vec![log, projection, serving];
        if let Some(auth) = &self.auth {
            let lag = auth.feed_lag();
            let bound = auth.settings().feed_lag_bound;
            checks.push(Check {
                name: "auth-feed".into(),
                ok: lag <= bound,
                detail: if lag <= bound {
                    format!("revocations current within {} ms", lag.as_millis())
                } else {
                    format!(
                        "{} ms behind the log (bound {} ms): refusing bearer tokens",
                        lag.as_millis(),
                        bound.as_millis()
                    )
                },
            });
        }
        checks
    }

    fn render_metrics(&self) -> String {
        self.metrics.render()
    }
}

async fn serve(mut settings: Settings, telemetry: &Telemetry) -> anyhow::Result<()> {
    cairn_log::describe_metrics();
    cairn_projector::describe_metrics();
    if let Some(dir) = settings.view_of.clone() {
        return crate::viewer::serve_view(&dir, settings, telemetry).await;
    }
    let data = DataDir::open_or_create(&settings.data_dir)?;
    // Bind first: with port 0 the public URL (the token issuer and audience) is the bound address.
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let bound = listener.local_addr()?;
    if !settings.public_url_explicit {
        settings.public_url = format!("http://{bound}");
    }
    let open_log = backends::open_log(
        &settings.backends,
        &data,
        EmbeddedOptions { segment_bytes: settings.segment_bytes, ..Default::default() },
    )
    .await?;
    let log = open_log.as_dyn();
    for topic in cairn_events::topics::ALL {
        // An existing topic keeps its partition count: changing it would re-route keys.
        if log.partitions(topic).is_err() {
            log.create_topic(topic, settings.partitions).await?;
        }
    }
    // Signed checkpoints ("seals", cairn_log::seal): each partition's chain head, signed with this
    // installation's Ed25519 key and appended to `cairn.chain` about once a second, so `cairn audit
    // verify` can prove the log unaltered. On Kafka the sealer also computes the chain (Kafka cannot
    // chain at append); on the embedded log the chain is made at append and the seals anchor it. It
    // runs with the projector role, once its key is published (below).
    if log.partitions(cairn_log::seal::SEAL_TOPIC).is_err() {
        log.create_topic(cairn_log::seal::SEAL_TOPIC, 1).await?;
    }
    let seal_signer = if settings.roles.projector {
        let signer = Arc::new(crate::keys::load_or_create_seal_key(&settings.seal_key_file)?);
        // Not a secret: verifiers need it (`cairn audit verify --seal-public-key`, or the JWKS).
        tracing::info!(public_key = %signer.public_key_hex(), "log sealer signs seals with this key");
        Some(signer)
    } else {
        None
    };
    let backends::OpenStore { store, rebuilding } =
        backends::open_store(&settings.backends, &data, settings.store_cache_bytes, backends::OtherLayout::Rebuild)
            .await?;
    let dyn_log = log.clone();
    let mut projectors = Vec::new();
    let progress = start_projection(&RESOURCES, &settings, &open_log, &store, &mut projectors).await?;
    // The audit trail of writes is projected with the resources (one transaction); the rest by AUDIT.
    let mut audit_progress = vec![(RESOURCES.topic, progress.clone())];
    for projection in &AUDIT {
        let progress = start_projection(projection, &settings, &open_log, &store, &mut projectors).await?;
        audit_progress.push((projection.topic, progress));
    }
    if let Some(rebuilt) = rebuilding {
        // A new store, caught up from the log: its indexes, left alone while it caught up, are
        // written now, before any projector follows the log and anything reads the store.
        build_indexes(rebuilt).await?;
    }
    let projector_tasks: Vec<_> = projectors
        .into_iter()
        .map(|(projector, name)| {
            tokio::spawn(async move {
                if let Err(e) = projector.run().await {
                    tracing::error!(projection = name, error = %e, "projector stopped");
                }
            })
        })
        .collect();
    // What a clean stop lets this process's projectors finish (every topic they read).
    let finishing = if settings.roles.projector { audit_progress.clone() } else { Vec::new() };
    let mut admin_task = None;
    let fhir = if settings.roles.fhir {
        // The authorization server: its state is rebuilt from the log before anything is served.
        let auth_settings = cairn_auth::AuthSettings {
            backend_token_lifetime: settings.backend_token_lifetime,
            access_token_lifetime: settings.access_token_lifetime,
            offline_refresh_lifetime: settings.offline_refresh_lifetime,
            feed_lag_bound: settings.revocation_lag_bound,
            password_login: settings.password_login,
            ..cairn_auth::AuthSettings::new(settings.public_url.clone())
        };
        let started = std::time::Instant::now();
        let auth = cairn_auth::AuthServer::start(dyn_log.clone(), Some(&settings.token_key_dir), auth_settings)
            .await
            .map_err(|e| anyhow::anyhow!("authorization server: {e}"))?;
        tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "authorization state rebuilt from the log");
        auth.set_jwks_fetcher(Arc::new(crate::jwks::HttpJwksFetcher::new()?));
        for idp in &settings.idps {
            // Recorded in the log (and so audited) the first time, and again only when changed.
            if auth
                .register_idp(idp, "config")
                .await
                .map_err(|e| anyhow::anyhow!("config file, idp `{}`: {e}", idp.idp_id))?
            {
                tracing::info!(idp = %idp.idp_id, "identity provider from the config file recorded");
            }
        }
        let service = Arc::new(
            FhirService::new(
                dyn_log,
                store,
                progress.clone(),
                cairn_service::Settings {
                    base_url: format!("{}/fhir", settings.public_url),
                    read_wait: settings.read_wait,
                    max_resource_bytes: settings.max_resource_bytes,
                    max_bundle_bytes: settings.max_bundle_bytes,
                    view: None,
                },
            )
            .with_audit_progress(audit_progress),
        );
        admin_task = crate::admin::serve_socket(
            crate::admin::socket_path(&settings.data_dir),
            auth.clone(),
            service.clone(),
            log.clone(),
        )
        .await?;
        if settings.demo {
            crate::demo::seed(&settings.data_dir, &settings.public_url, &auth, &service).await?;
        }
        if settings.insecure_no_auth {
            let banner = "WARNING: --insecure-no-auth: the FHIR API accepts requests WITHOUT AUTHENTICATION. Local development only.";
            eprintln!("\n{}\n{banner}\n{}\n", "!".repeat(banner.len()), "!".repeat(banner.len()));
            tracing::warn!("{banner}");
        }
        Some(cairn_http::fhir::FhirApi {
            service,
            auth: Some(auth),
            allow_anonymous: settings.insecure_no_auth,
            authorization_server: true,
        })
    } else {
        None
    };
    let mut sealer_task = None;
    if let Some(signer) = seal_signer {
        publish_seal_key(&log, fhir.as_ref().and_then(|f| f.auth.as_deref()), &signer).await?;
        let topics = cairn_events::topics::ALL.iter().map(|t| t.to_string()).collect();
        let log = log.clone();
        sealer_task = Some(tokio::spawn(async move {
            if let Err(e) = cairn_log::seal::run_sealer(log, topics, Some(signer)).await {
                tracing::error!(error = %e, "log sealer stopped");
            }
        }));
    }
    let platform = Arc::new(RunningPlatform {
        log: open_log.clone(),
        resources: progress,
        auth: fhir.as_ref().and_then(|f| f.auth.clone()),
        metrics: telemetry.metrics.clone(),
        draining: AtomicBool::new(false),
    });
    // The signal handlers are in place before the server says it is listening: a SIGTERM sent right
    // after that line must stop it cleanly, not kill it with the default disposition.
    let shutdown = shutdown_signal()?;
    tracing::info!(
        listen = %bound,
        public_url = %settings.public_url,
        data_dir = %settings.data_dir.display(),
        log = %open_log.describe(),
        roles = %settings.roles,
        "cairn is serving"
    );
    // Machine- and human-readable: tests and scripts read the bound address from this line.
    println!("cairn: listening on http://{bound} (public URL {})", settings.public_url);
    let drain = platform.clone();
    cairn_http::serve(listener, platform, fhir, async move {
        shutdown.await;
        drain.draining.store(true, Ordering::Relaxed);
        tracing::info!("shutting down: finishing in-flight requests");
    })
    .await
    .context("HTTP server")?;
    // Projections are derived and a later start catches up anyway, but a clean stop leaves them
    // caught up with the log (bounded), so `cairn store digest` after a stop describes the whole log.
    finish_projections(&log, &finishing).await;
    if sealer_task.is_some() && matches!(open_log, OpenLog::Embedded(_)) {
        finish_seals(&log).await;
    }
    // Every acknowledged append is already durable; close lets queued appends finish.
    let owns_socket = admin_task.is_some();
    for task in projector_tasks.into_iter().chain(sealer_task).chain(admin_task) {
        task.abort();
    }
    if owns_socket {
        let _ = std::fs::remove_file(crate::admin::socket_path(&settings.data_dir));
    }
    open_log.close();
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Writes the indexes of a rebuilt embedded store (`EmbeddedStore::build_indexes`), saying how far
/// it got every five seconds.
async fn build_indexes(store: Arc<cairn_store::embedded::EmbeddedStore>) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    tokio::task::spawn_blocking(move || {
        let mut reported = std::time::Instant::now();
        store.build_indexes(&mut |at| {
            if reported.elapsed() >= std::time::Duration::from_secs(5) {
                reported = std::time::Instant::now();
                tracing::info!(index_keys_written = at.written, index_keys = at.keys, "building the store's indexes");
            }
        })
    })
    .await??;
    tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "the store's indexes are built");
    Ok(())
}

/// Readies `projection` in this process when it has the projector role (`projectors` gets it, to
/// run once every projection is ready), and returns what readers wait
/// on for read-your-writes: this process's progress, or on a shared store the checkpoints every
/// projector process writes. On the embedded log the projection catches up before serving, so the
/// first reads are not held back by a long replay (on Kafka the consumer group decides who projects
/// what).
async fn start_projection(
    projection: &'static Projection,
    settings: &Settings,
    open_log: &OpenLog,
    store: &Arc<dyn cairn_store::ResourceStore>,
    projectors: &mut Vec<(Projector, &'static str)>,
) -> anyhow::Result<Progress> {
    let log = open_log.as_dyn();
    let local = if settings.roles.projector {
        let (projector, progress) = Projector::new(log.clone(), store.clone(), projection).await?;
        if let OpenLog::Embedded(_) = open_log {
            let started = std::time::Instant::now();
            // A long catch-up (a deleted store, a changed store layout) says how far it got.
            let (mut applied, mut reported) = (0u64, std::time::Instant::now());
            let mut report = |n: usize| {
                applied += n as u64;
                if reported.elapsed() >= std::time::Duration::from_secs(5) {
                    reported = std::time::Instant::now();
                    let rate = applied as f64 / started.elapsed().as_secs_f64().max(0.001);
                    tracing::info!(
                        projection = projection.name,
                        applied,
                        events_per_s = rate as u64,
                        "projection catching up"
                    );
                }
            };
            projector
                .catch_up_until(&|_| true, &mut report)
                .await
                .map_err(|e| anyhow::anyhow!("{} projection: {e}", projection.name))?;
            tracing::info!(
                projection = projection.name,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "projection caught up"
            );
        }
        projectors.push((projector, projection.name));
        Some(progress)
    } else {
        None
    };
    Ok(match (&settings.backends.store, local) {
        // One process owns the embedded store: its own projector's progress is the truth.
        (config::StoreBackend::Embedded, Some(local)) => local,
        (config::StoreBackend::Embedded, None) => {
            anyhow::bail!("--roles without projector needs a store shared with a projector process (--store scylla)")
        }
        // A shared store: other processes may project too; follow the checkpoints they all write.
        (config::StoreBackend::Scylla(_), local) => cairn_projector::follow_checkpoints(
            store.clone(),
            projection,
            log.partitions(projection.topic)?,
            local,
            CHECKPOINT_POLL,
        ),
    })
}

/// Publishes the seal key (`auth.key.published`, purpose `log_seal`) before it signs a seal, so every
/// process's `/jwks` names it. With the authorization server here, only if the log lacks it; a
/// projector-only process publishes at each start (the authorization state ignores repeats).
async fn publish_seal_key(
    log: &Arc<dyn cairn_log::EventLog>,
    auth: Option<&cairn_auth::AuthServer>,
    signer: &cairn_log::seal::SealSigner,
) -> anyhow::Result<()> {
    let (kid, jwk) = (signer.key_id(), signer.public_jwk());
    if let Some(auth) = auth {
        return auth.publish_seal_key(&kid, jwk).await.map_err(|e| anyhow::anyhow!("publishing the seal key: {e}"));
    }
    let event = cairn_events::Event::new(cairn_events::Payload::from(cairn_events::KeyPublished {
        kid,
        alg: "EdDSA".into(),
        purpose: cairn_events::KeyPurpose::LogSeal,
        jwk,
        replaces: None,
    }));
    let record = cairn_log::NewRecord::new(event.topic(), event.partition_key(), event.canonical_bytes());
    log.append(record).await.context("publishing the seal key")?;
    Ok(())
}

/// Waits (at most `FINISH_SEALS`) until the sealer has sealed every event topic up to its end, so the
/// log of a stopped server is sealed to its last record (an audit export needs its events sealed).
async fn finish_seals(log: &Arc<dyn cairn_log::EventLog>) {
    let deadline = std::time::Instant::now() + FINISH_SEALS;
    loop {
        match cairn_log::seal::sealed_to_end(log.as_ref(), &cairn_events::topics::ALL).await {
            Ok(true) => return,
            Ok(false) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await
            }
            _ => {
                tracing::warn!("stopping before the newest events were sealed; the next start seals them");
                return;
            }
        }
    }
}

/// How long a clean stop waits for the last seals (the sealer seals about once a second).
const FINISH_SEALS: std::time::Duration = std::time::Duration::from_secs(3);

/// Waits (at most `FINISH_PROJECTIONS`) until each projection has applied the log as it is now.
async fn finish_projections(log: &Arc<dyn cairn_log::EventLog>, projections: &[(&'static str, Progress)]) {
    let deadline = std::time::Instant::now() + FINISH_PROJECTIONS;
    for (topic, progress) in projections {
        let mut ends = Vec::new();
        for p in 0..log.partitions(topic).unwrap_or(0) {
            ends.push(log.end_offset(topic, p).await.unwrap_or(0));
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if !progress.wait_for(&ends, left).await {
            tracing::warn!(topic, "stopping with the projection behind the log; the next start catches up");
        }
    }
}

/// Registers the SIGTERM and SIGINT handlers now; the returned future completes at the first signal.
pub(crate) fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
