//! `cairn serve`: the whole platform in one process.

use crate::config::{self, Settings};
use crate::datadir::DataDir;
use crate::telemetry::{self, Telemetry};
use crate::ServeArgs;
use anyhow::Context;
use cairn_http::{Check, Platform};
use cairn_log::EventLog;
use cairn_log::embedded::{EmbeddedLog, EmbeddedOptions};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
    log: Arc<EmbeddedLog>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    draining: AtomicBool,
}

impl Platform for RunningPlatform {
    fn readiness(&self) -> Vec<Check> {
        let log = match self.log.failure() {
            None => Check { name: "event-log".into(), ok: true, detail: "open, accepting appends".into() },
            Some(why) => Check { name: "event-log".into(), ok: false, detail: format!("failed: {why}") },
        };
        let draining = self.draining.load(Ordering::Relaxed);
        let serving = Check {
            name: "serving".into(),
            ok: !draining,
            detail: if draining { "shutting down".into() } else { "accepting requests".into() },
        };
        vec![log, serving]
    }

    fn render_metrics(&self) -> String {
        self.metrics.render()
    }
}

async fn serve(settings: Settings, telemetry: &Telemetry) -> anyhow::Result<()> {
    cairn_log::describe_metrics();
    let data = DataDir::open_or_create(&settings.data_dir)?;
    let log = EmbeddedLog::open(
        data.log_dir(),
        EmbeddedOptions { segment_bytes: settings.segment_bytes, ..Default::default() },
    )?;
    let report = log.open_report().clone();
    if let Some((segment, position, len, reason)) = &report.torn_tail {
        tracing::warn!(
            segment = %segment.display(), position, len, %reason,
            "cut off a torn, never-acknowledged tail of the log (kept in log/quarantine/)"
        );
    }
    let log = Arc::new(log);
    for topic in cairn_events::topics::ALL {
        // An existing topic keeps its partition count: changing it would re-route keys.
        if log.partitions(topic).is_err() {
            log.create_topic(topic, settings.partitions).await?;
        }
    }
    let platform = Arc::new(RunningPlatform {
        log: log.clone(),
        metrics: telemetry.metrics.clone(),
        draining: AtomicBool::new(false),
    });
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let bound = listener.local_addr()?;
    tracing::info!(
        listen = %bound,
        public_url = %settings.public_url,
        data_dir = %settings.data_dir.display(),
        records = report.records,
        "cairn is serving"
    );
    // Machine- and human-readable: tests and scripts read the bound address from this line.
    println!("cairn: listening on http://{bound} (public URL {})", settings.public_url);
    let drain = platform.clone();
    cairn_http::serve(listener, platform, async move {
        shutdown_signal().await;
        drain.draining.store(true, Ordering::Relaxed);
        tracing::info!("shutting down: finishing in-flight requests");
    })
    .await
    .context("HTTP server")?;
    // Every acknowledged append is already durable; close lets queued appends finish.
    log.close();
    tracing::info!("stopped cleanly");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
