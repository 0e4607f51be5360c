//! Cairn's HTTP edge: the axum routers, request tracing and metrics, health and readiness.
//!
//! Handlers stay thin: they extract, call plain functions of the domain crates, and map results to
//! HTTP. This crate owns nothing but that mapping; it never names a storage or log backend. What it
//! needs from the rest of the platform arrives through [`Platform`].

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

pub mod fhir;
pub mod oauth;
pub mod pages;

/// The request header carrying the request id; set by us when the client did not send one.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// One readiness check: a component and whether it can serve.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// What the HTTP layer needs from the running platform.
#[async_trait::async_trait]
pub trait Platform: Send + Sync + 'static {
    /// Readiness checks: the log is open and accepting appends, projections are caught up within
    /// their bound. `/readyz` answers 200 only if every check is ok.
    async fn readiness(&self) -> Vec<Check>;

    /// Prometheus text exposition of every metric.
    fn render_metrics(&self) -> String;
}

type SharedPlatform = Arc<dyn Platform>;

/// The whole HTTP surface: operational endpoints and, when given, the FHIR API and the
/// authorization server.
pub fn router(platform: SharedPlatform, fhir: Option<fhir::FhirApi>) -> Router {
    let mut app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(platform);
    if let Some(api) = fhir {
        if let Some(auth) = api.auth.as_ref().filter(|_| api.authorization_server) {
            app = app.merge(oauth::routes(auth.clone())).merge(pages::routes(auth.clone()));
        }
        app = app.merge(fhir::routes(api));
    }
    app.layer(middleware::from_fn(observe))
        .layer(PropagateRequestIdLayer::new(header::HeaderName::from_static(REQUEST_ID_HEADER)))
        .layer(SetRequestIdLayer::new(header::HeaderName::from_static(REQUEST_ID_HEADER), MakeRequestUuid))
}

/// Process is up. Says nothing about whether it can serve (that is `/readyz`).
async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, Json(serde_json::json!({"status": "up"})))
}

async fn readyz(State(platform): State<SharedPlatform>) -> Response {
    let checks = platform.readiness().await;
    let ready = checks.iter().all(|c| c.ok);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(serde_json::json!({"ready": ready, "checks": checks}))).into_response()
}

async fn metrics_text(State(platform): State<SharedPlatform>) -> Response {
    let mut response = platform.render_metrics().into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    response
}

/// A span and metrics for every request. The span names the route template, never the raw URI: a
/// query string can carry patient identifiers, and logs must not.
async fn observe(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let request_id = request.headers().get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let span = tracing::info_span!("request", %method, route = %route, request_id = %request_id, status = tracing::field::Empty);
    let response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    let status = response.status().as_u16();
    span.record("status", status);
    let elapsed = started.elapsed().as_secs_f64();
    let labels = [("method", method.to_string()), ("route", route), ("status", status.to_string())];
    metrics::counter!("cairn_http_requests_total", &labels).increment(1);
    metrics::histogram!("cairn_http_request_duration_seconds", &labels[..2]).record(elapsed);
    tracing::debug!(parent: &span, status, elapsed_ms = elapsed * 1000.0, "request finished");
    response
}

/// Serves [`router`] on `listener` until `shutdown` completes, then finishes in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    platform: SharedPlatform,
    fhir: Option<fhir::FhirApi>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(platform, fhir).into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
