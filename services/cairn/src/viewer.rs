//! `cairn serve --read-only --store-dir DIR`: the FHIR API over a store `cairn replay` rebuilt, so an
//! investigator reads the past with ordinary FHIR clients.
//!
//! The store is the replay's and nothing writes to it: writes answer 405, reads never wait for a
//! projection. Everything else is the live system's: bearer tokens are the live server's (verified
//! against its published keys and revocations, followed from `cairn.auth`), and every access
//! (refusals included) is appended to the live log before the answer leaves, naming the replay
//! (`view` in the access event, an entity in its AuditEvent). On the embedded log the live server
//! holds the log, so this process reads and appends through its admin socket (`remotelog.rs`); on
//! Kafka it uses the log directly.

use crate::backends::{self, OpenLog};
use crate::config::{LogBackend, Settings};
use crate::datadir::DataDir;
use crate::remotelog::RemoteLog;
use crate::telemetry::Telemetry;
use anyhow::{Context, bail};
use cairn_http::{Check, Platform};
use cairn_log::EventLog;
use cairn_log::embedded::EmbeddedOptions;
use cairn_service::FhirService;
use std::sync::Arc;
use std::time::Duration;

/// What `/readyz` says of a view.
struct ViewPlatform {
    log: Arc<dyn EventLog>,
    auth: Arc<cairn_auth::AuthServer>,
    view: String,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
}

#[async_trait::async_trait]
impl Platform for ViewPlatform {
    async fn readiness(&self) -> Vec<Check> {
        // Accesses cannot be recorded without the live log: then nothing is served.
        let reachable =
            tokio::time::timeout(Duration::from_secs(1), self.log.end_offset(cairn_events::topics::ACCESS, 0)).await;
        let log = match reachable {
            Ok(Ok(_)) => Check { name: "live-log".into(), ok: true, detail: "reachable: accesses are recorded".into() },
            Ok(Err(e)) => Check { name: "live-log".into(), ok: false, detail: format!("unavailable: {e}") },
            Err(_) => Check { name: "live-log".into(), ok: false, detail: "did not answer within 1 s".into() },
        };
        let lag = self.auth.feed_lag();
        let bound = self.auth.settings().feed_lag_bound;
        vec![
            log,
            Check { name: "view".into(), ok: true, detail: format!("read-only {}", self.view) },
            Check {
                name: "auth-feed".into(),
                ok: lag <= bound,
                detail: format!("revocations {} ms behind the log (bound {} ms)", lag.as_millis(), bound.as_millis()),
            },
        ]
    }

    fn render_metrics(&self) -> String {
        self.metrics.render()
    }
}

/// What the replay in `dir` shows, from its `replay.json`.
fn describe_replay(dir: &std::path::Path) -> anyhow::Result<String> {
    let path = dir.join("replay.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "--store-dir {}: not a replay (no replay.json); make one with `cairn replay --until T --into DIR`",
            dir.display()
        )
    })?;
    let replay: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let until = replay["until"].as_str().with_context(|| format!("{}: no `until`", path.display()))?;
    // Shown in pages and recorded in every access event: a plain, bounded description.
    let until: String = until.chars().filter(|c| !c.is_control()).take(120).collect();
    Ok(format!("replay until {until}"))
}

/// Serves the replay in `dir` (`--store-dir`).
pub async fn serve_view(dir: &std::path::Path, mut settings: Settings, telemetry: &Telemetry) -> anyhow::Result<()> {
    let view = describe_replay(dir)?;
    let store_file = dir.join("store").join("resources.redb");
    if !store_file.exists() {
        bail!("--store-dir {}: no store/resources.redb; is it a finished replay?", dir.display());
    }
    let store: Arc<dyn cairn_store::ResourceStore> =
        match cairn_store::embedded::EmbeddedStore::open_with_cache(&store_file, settings.store_cache_bytes) {
            Ok(store) => Arc::new(store),
            Err(cairn_store::StoreError::OtherFormat { found, .. }) => bail!(
                "--store-dir {}: this replay was made by another Cairn build (store format {found}, this build \
                 reads {}); replay again with this build",
                dir.display(),
                cairn_store::embedded::FORMAT
            ),
            Err(e) => return Err(e).with_context(|| format!("--store-dir {}", dir.display())),
        };
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let bound = listener.local_addr()?;
    if !settings.public_url_explicit {
        settings.public_url = format!("http://{bound}");
    }
    // The live log: through the live server on the embedded log, directly on Kafka.
    let (log, issuer, open_log): (Arc<dyn EventLog>, String, Option<OpenLog>) = match &settings.backends.log {
        LogBackend::Embedded => {
            let remote = RemoteLog::connect(&crate::admin::socket_path(&settings.data_dir)).await?;
            let issuer = settings.token_issuer.clone().unwrap_or_else(|| remote.issuer.clone());
            (Arc::new(remote), issuer, None)
        }
        LogBackend::Kafka(_) => {
            let issuer = settings
                .token_issuer
                .clone()
                .context("--read-only on Kafka needs --token-issuer: the live server's public URL")?;
            let data = DataDir::open_or_create(&settings.data_dir)?;
            let open = backends::open_log(&settings.backends, &data, EmbeddedOptions::default()).await?;
            (Arc::new(crate::remotelog::ViewLog(open.as_dyn())), issuer, Some(open))
        }
    };
    let auth_settings = cairn_auth::AuthSettings {
        feed_lag_bound: settings.revocation_lag_bound,
        password_login: false,
        ..cairn_auth::AuthSettings::new(issuer.clone())
    };
    // No signing keys: this process issues nothing; it verifies the live server's tokens.
    let auth = cairn_auth::AuthServer::start(log.clone(), None, auth_settings)
        .await
        .map_err(|e| anyhow::anyhow!("following the live authorization state: {e}"))?;
    let partitions = log.partitions(cairn_events::topics::FHIR).unwrap_or(1);
    let service = Arc::new(FhirService::new(
        log.clone(),
        store,
        cairn_projector::Progress::complete(partitions),
        cairn_service::Settings {
            base_url: format!("{}/fhir", settings.public_url),
            read_wait: settings.read_wait,
            max_resource_bytes: settings.max_resource_bytes,
            max_bundle_bytes: settings.max_bundle_bytes,
            view: Some(view.clone()),
        },
    ));
    if settings.insecure_no_auth {
        let banner = "WARNING: --insecure-no-auth: the replay is served WITHOUT AUTHENTICATION. Local use only.";
        eprintln!("\n{}\n{banner}\n{}\n", "!".repeat(banner.len()), "!".repeat(banner.len()));
    }
    let api = cairn_http::fhir::FhirApi {
        service,
        auth: Some(auth.clone()),
        allow_anonymous: settings.insecure_no_auth,
        authorization_server: false,
    };
    let platform = Arc::new(ViewPlatform { log, auth, view: view.clone(), metrics: telemetry.metrics.clone() });
    let shutdown = crate::serve::shutdown_signal()?;
    tracing::info!(listen = %bound, public_url = %settings.public_url, token_issuer = %issuer, view = %view, "cairn is serving a read-only view");
    println!("cairn: listening on http://{bound} (public URL {}, read-only {view})", settings.public_url);
    cairn_http::serve(listener, platform, Some(api), shutdown).await.context("HTTP server")?;
    if let Some(open) = open_log {
        open.close();
    }
    tracing::info!("stopped cleanly");
    Ok(())
}
