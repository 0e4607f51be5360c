//! Tracing, OpenTelemetry export and Prometheus metrics, set up once per process.
//!
//! Logs go to stderr as text. When `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans are also exported
//! over OTLP/HTTP (protobuf) with the standard `OTEL_*` variables honoured; otherwise nothing leaves
//! the process. Log lines never carry tokens, passwords or resource bodies: spans record route
//! templates and ids, not URIs or payloads.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub struct Telemetry {
    pub metrics: PrometheusHandle,
    tracer_provider: Option<SdkTracerProvider>,
}

/// Latency buckets in seconds: from 50 microseconds (an fsync on a fast disk) to 10 seconds.
const SECONDS_BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0];
/// Records per projector store transaction; a projector takes at most `BATCH_RECORDS` at once, so
/// samples in the last bucket mean it is running behind.
const PROJECTION_BATCH_BUCKETS: &[f64] = &[
    1.0,
    4.0,
    16.0,
    64.0,
    256.0,
    1024.0,
    4096.0,
    cairn_projector::BATCH_RECORDS as f64 - 1.0,
    cairn_projector::BATCH_RECORDS as f64,
];

/// Full set-up for `cairn serve`.
pub fn init_server() -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_env("CAIRN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    let tracer_provider = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => {
            let exporter = opentelemetry_otlp::SpanExporter::builder().with_http().build()?;
            let resource = opentelemetry_sdk::Resource::builder().with_service_name("cairn").build();
            Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
        }
        _ => None,
    };
    let otel = tracer_provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("cairn")));
    tracing_subscriber::registry().with(filter).with(fmt).with(otel).try_init()?;

    let metrics = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("cairn_log_fsync_batch_records".into()), BATCH_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("cairn_projection_batch_records".into()), PROJECTION_BATCH_BUCKETS)?
        .install_recorder()?;
    Ok(Telemetry { metrics, tracer_provider })
}

/// Warnings and errors to stderr, for the short-lived commands.
pub fn init_cli() {
    let filter = EnvFilter::try_from_env("CAIRN_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .try_init();
}

impl Telemetry {
    /// Flushes spans still buffered for export.
    pub fn shutdown(self) {
        if let Some(provider) = self.tracer_provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "OpenTelemetry export did not shut down cleanly");
        }
    }
}
