//! The FHIR REST API (`{base}/fhir`): thin handlers over `cairn_service::FhirService`.
//!
//! Handlers extract the request context and the FHIR headers, call one service function, and map its
//! result to HTTP: `Location`, `ETag`, `Last-Modified`, `Prefer: return=`, and an OperationOutcome
//! for every error.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use cairn_fhir::outcome::{Issue, IssueCode, operation_outcome};
use cairn_service::{Access, FhirError, FhirService, RequestContext, ReturnPreference, Versioned, WriteOutcome};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// What the FHIR routes need.
#[derive(Clone)]
pub struct FhirApi {
    pub service: Arc<FhirService>,
    /// Verifies bearer tokens. `None` only with `--insecure-no-auth`.
    pub auth: Option<Arc<cairn_auth::AuthServer>>,
    /// `--insecure-no-auth`: accept requests without a token, as an anonymous actor (local development).
    pub allow_anonymous: bool,
    /// Whether this process also serves the authorization server's endpoints and pages (a
    /// read-only view of a replay only verifies the live server's tokens).
    pub authorization_server: bool,
}

pub fn routes(api: FhirApi) -> Router {
    Router::new()
        .route("/fhir", axum::routing::post(bundle))
        .route("/fhir/metadata", get(metadata))
        .route("/fhir/_history", get(history_system))
        .route("/fhir/AuditEvent/$report", get(audit_report))
        .route("/fhir/$seen", get(seen))
        .route("/fhir/{rtype}/{id}/$timeline", get(timeline))
        .route("/fhir/{rtype}", get(search).post(create))
        .route("/fhir/{rtype}/_history", get(history_type))
        .route("/fhir/{rtype}/{id}", get(read).put(update).delete(delete))
        .route("/fhir/{rtype}/{id}/_history", get(history_instance))
        .route("/fhir/{rtype}/{id}/_history/{vid}", get(vread))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(api)
}

/// An error as an OperationOutcome response, with its RFC 6750 challenge when it is about the token.
pub struct Outcome {
    error: FhirError,
    challenge: Option<String>,
}

impl From<FhirError> for Outcome {
    fn from(error: FhirError) -> Self {
        // Only the scope check (cairn-service's access.rs) answers 403 `forbidden`.
        let insufficient = error.status == 403 && error.issues.iter().any(|i| i.code == IssueCode::Forbidden);
        let challenge = insufficient.then(|| "Bearer realm=\"cairn\", error=\"insufficient_scope\"".to_owned());
        Outcome { error, challenge }
    }
}

impl IntoResponse for Outcome {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.error.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = fhir_json(status, &operation_outcome(&self.error.issues));
        let challenge = match (status, self.challenge) {
            (_, Some(c)) => Some(c),
            (StatusCode::UNAUTHORIZED, None) => Some("Bearer realm=\"cairn\"".to_owned()),
            _ => None,
        };
        if let Some(value) = challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, value);
        }
        r
    }
}

fn fhir_json(status: StatusCode, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).expect("JSON values serialize");
    let mut r = (status, bytes).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    r
}

fn error(status: u16, code: IssueCode, diagnostics: impl Into<String>) -> Outcome {
    Outcome::from(FhirError::new(status, code, diagnostics))
}

/// What a request set out to do, as far as its method and path tell: named in the record of a
/// refusal that happens before the service sees the request.
struct Target<'a> {
    interaction: &'static str,
    resource_type: Option<&'a str>,
    id: Option<&'a str>,
}

impl<'a> Target<'a> {
    fn new(interaction: &'static str, resource_type: Option<&'a str>, id: Option<&'a str>) -> Self {
        Target { interaction, resource_type, id }
    }
}

/// Records a refusal made here (a bad token, an unacceptable format or body) and returns it; a 503
/// instead if the log cannot take the record.
async fn refused(api: &FhirApi, ctx: &RequestContext, target: &Target<'_>, outcome: Outcome) -> Outcome {
    match api.service.record_refusal(ctx, target.interaction, target.resource_type, target.id, &outcome.error).await {
        Ok(()) => outcome,
        Err(e) => Outcome::from(e),
    }
}

/// [`refused`] for the error of `result`, if it is one.
async fn checked<T>(
    api: &FhirApi,
    ctx: &RequestContext,
    target: &Target<'_>,
    result: Result<T, Outcome>,
) -> Result<T, Outcome> {
    match result {
        Ok(v) => Ok(v),
        Err(o) => Err(refused(api, ctx, target, o).await),
    }
}

/// The acting party, from the bearer token (RFC 6750), or anonymous and unrestricted under
/// `--insecure-no-auth`. A refused token is recorded (with the caller's address and user agent)
/// before the 401 is answered.
async fn context(
    api: &FhirApi,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    target: &Target<'_>,
) -> Result<RequestContext, Outcome> {
    let request_id = headers.get(crate::REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let mut actor = crate::oauth::request_actor(headers, peer);
    let auth = match (&api.auth, api.allow_anonymous) {
        (_, true) => return Ok(RequestContext { actor, request_id, access: Access::Unrestricted, provenance: None }),
        (Some(auth), false) => auth,
        (None, false) => return Err(error(503, IssueCode::Transient, "the authorization server is not running")),
    };
    let token = match crate::oauth::authenticate_bearer(auth, headers).await {
        Ok(token) => token,
        Err(crate::oauth::BearerFailure::Rejected(cairn_auth::TokenRejection::FeedBehind)) => {
            // Fail closed, and say it is ours: the token may be fine.
            let why = cairn_auth::TokenRejection::FeedBehind.to_string();
            return Err(Outcome { error: FhirError::new(503, IssueCode::Transient, why), challenge: None });
        }
        Err(failure) => {
            let (challenge, why) = failure.challenge();
            let outcome = Outcome { error: FhirError::new(401, IssueCode::Security, why), challenge: Some(challenge) };
            let anonymous = RequestContext {
                actor,
                request_id,
                access: Access::Smart { scopes: Default::default(), patient: None },
                provenance: None,
            };
            return Err(refused(api, &anonymous, target, outcome).await);
        }
    };
    let claims = &token.claims;
    actor.subject = Some(claims.sub.clone());
    actor.client_id = Some(claims.client_id.clone());
    actor.jti = Some(claims.jti.clone());
    actor.fhir_user = claims.fhir_user.clone();
    if let Some(family) = &claims.fam {
        actor.authenticator = auth.family_authenticator(family).await;
    }
    let access = Access::Smart { scopes: token.scopes.clone(), patient: claims.patient.clone() };
    Ok(RequestContext { actor, request_id, access, provenance: None })
}

/// [`context`] for a write: with the client's `X-Provenance`, checked (a bad one is a recorded 400).
async fn write_context(
    api: &FhirApi,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    target: &Target<'_>,
) -> Result<RequestContext, Outcome> {
    let mut ctx = context(api, headers, peer, target).await?;
    ctx.provenance = checked(api, &ctx, target, x_provenance(headers)).await?;
    Ok(ctx)
}

/// The `X-Provenance` header of a write, checked (cairn-fhir `parse_x_provenance`).
fn x_provenance(headers: &HeaderMap) -> Result<Option<String>, Outcome> {
    let Some(value) = headers.get("x-provenance") else { return Ok(None) };
    let text = value.to_str().map_err(|_| error(400, IssueCode::Structure, "X-Provenance is not valid UTF-8 JSON"))?;
    cairn_fhir::resource::parse_x_provenance(text).map(Some).map_err(|issues| Outcome::from(FhirError::invalid(issues)))
}

/// JSON only: `_format` and `Accept` must allow it.
fn negotiate(headers: &HeaderMap, query: &str) -> Result<(), Outcome> {
    for pair in query.split('&') {
        if let Some(f) = pair.strip_prefix("_format=") {
            let f = percent_encoding::percent_decode_str(f).decode_utf8_lossy();
            if !matches!(f.as_ref(), "json" | "application/json" | "application/fhir+json") {
                return Err(error(406, IssueCode::NotSupported, format!("_format={f}: this server speaks JSON only")));
            }
        }
    }
    if let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) {
        let ok = accept.split(',').any(|a| {
            let media = a.split(';').next().unwrap_or("").trim();
            matches!(media, "*/*" | "application/*" | "application/json" | "application/fhir+json" | "")
        });
        if !ok {
            return Err(error(
                406,
                IssueCode::NotSupported,
                format!("Accept: {accept}: this server answers application/fhir+json only"),
            ));
        }
    }
    Ok(())
}

fn check_content_type(headers: &HeaderMap) -> Result<(), Outcome> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let media = ct.split(';').next().unwrap_or("").trim();
    if matches!(media, "application/fhir+json" | "application/json") {
        Ok(())
    } else {
        Err(error(415, IssueCode::NotSupported, format!("Content-Type `{ct}`: send application/fhir+json")))
    }
}

async fn body_bytes(api: &FhirApi, body: Body) -> Result<Bytes, Outcome> {
    let limit = api.service.settings().max_resource_bytes;
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| error(413, IssueCode::TooLong, format!("the request body exceeds the {limit}-byte limit")))
}

fn http_date(last_updated: &str) -> Option<HeaderValue> {
    let t = chrono::DateTime::parse_from_rfc3339(last_updated).ok()?;
    HeaderValue::from_str(&t.with_timezone(&chrono::Utc).format("%a, %d %b %Y %H:%M:%S GMT").to_string()).ok()
}

fn resource_response(
    status: StatusCode,
    v: &Versioned,
    base: &str,
    rtype: &str,
    ret: ReturnPreference,
    location: bool,
) -> Response {
    let mut r = match ret {
        ReturnPreference::Minimal => status.into_response(),
        ReturnPreference::OperationOutcome => {
            let issue = Issue::information(format!("{rtype}/{} version {}", v.id, v.version_id));
            fhir_json(status, &operation_outcome(&[issue]))
        }
        ReturnPreference::Representation => fhir_json(status, &v.resource),
    };
    let h = r.headers_mut();
    if let Ok(etag) = HeaderValue::from_str(&format!("W/\"{}\"", v.version_id)) {
        h.insert(header::ETAG, etag);
    }
    if let Some(lm) = http_date(&v.last_updated) {
        h.insert(header::LAST_MODIFIED, lm);
    }
    if location && let Ok(loc) = HeaderValue::from_str(&format!("{base}/{rtype}/{}/_history/{}", v.id, v.version_id)) {
        h.insert(header::LOCATION, loc);
    }
    r
}

/// The `return=` preference of the `Prefer` header (RFC 7240; the default when absent or unknown).
fn prefer_return(headers: &HeaderMap) -> ReturnPreference {
    let value = headers
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .and_then(|prefer| prefer.split(',').find_map(|p| p.trim().strip_prefix("return=").map(str::to_owned)));
    ReturnPreference::from_prefer_return(value.as_deref())
}

fn lenient(headers: &HeaderMap) -> bool {
    headers
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.split(',').any(|x| x.trim() == "handling=lenient"))
}

/// The client's address, when the server was started with connect info.
pub struct Peer(pub Option<SocketAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0)))
    }
}

async fn metadata(State(api): State<FhirApi>, headers: HeaderMap, RawQuery(q): RawQuery) -> Result<Response, Outcome> {
    negotiate(&headers, q.as_deref().unwrap_or(""))?;
    let settings = api.service.settings();
    let cs =
        cairn_service::capability_statement(&settings.base_url, env!("CARGO_PKG_VERSION"), settings.view.as_deref());
    Ok(fhir_json(StatusCode::OK, &cs))
}

async fn create(
    State(api): State<FhirApi>,
    Path(rtype): Path<String>,
    peer: Peer,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
    request: Request,
) -> Result<Response, Outcome> {
    let target = Target::new("create", Some(&rtype), None);
    let ctx = write_context(&api, &headers, peer.0, &target).await?;
    let acceptable = negotiate(&headers, q.as_deref().unwrap_or("")).and_then(|()| check_content_type(&headers));
    checked(&api, &ctx, &target, acceptable).await?;
    let body = checked(&api, &ctx, &target, body_bytes(&api, request.into_body()).await).await?;
    let if_none_exist = headers.get("if-none-exist").and_then(|v| v.to_str().ok());
    let outcome = api.service.create(&ctx, &rtype, &body, if_none_exist).await?;
    Ok(write_response(&api, &headers, &rtype, outcome))
}

async fn bundle(
    State(api): State<FhirApi>,
    peer: Peer,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
    request: Request,
) -> Result<Response, Outcome> {
    let target = Target::new("batch", None, None);
    let ctx = write_context(&api, &headers, peer.0, &target).await?;
    let acceptable = negotiate(&headers, q.as_deref().unwrap_or("")).and_then(|()| check_content_type(&headers));
    checked(&api, &ctx, &target, acceptable).await?;
    let limit = api.service.settings().max_bundle_bytes;
    let body = axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|_| error(413, IssueCode::TooLong, format!("the Bundle exceeds the {limit}-byte limit")));
    let body = checked(&api, &ctx, &target, body).await?;
    let response = api.service.bundle(&ctx, &body, prefer_return(&headers)).await?;
    Ok(fhir_json(StatusCode::OK, &response))
}

async fn update(
    State(api): State<FhirApi>,
    Path((rtype, id)): Path<(String, String)>,
    peer: Peer,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
    request: Request,
) -> Result<Response, Outcome> {
    let target = Target::new("update", Some(&rtype), Some(&id));
    let ctx = write_context(&api, &headers, peer.0, &target).await?;
    let acceptable = negotiate(&headers, q.as_deref().unwrap_or("")).and_then(|()| check_content_type(&headers));
    checked(&api, &ctx, &target, acceptable).await?;
    let body = checked(&api, &ctx, &target, body_bytes(&api, request.into_body()).await).await?;
    let if_match = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok());
    let outcome = api.service.update(&ctx, &rtype, &id, &body, if_match).await?;
    Ok(write_response(&api, &headers, &rtype, outcome))
}

/// A read's answer: the resource, with its ETag and Last-Modified.
fn read_response(api: &FhirApi, rtype: &str, v: &Versioned) -> Response {
    resource_response(
        StatusCode::OK,
        v,
        &api.service.settings().base_url,
        rtype,
        ReturnPreference::Representation,
        false,
    )
}

/// 201 for a creation, 200 otherwise, with Location and the body `Prefer: return=` asks for.
fn write_response(api: &FhirApi, headers: &HeaderMap, rtype: &str, outcome: WriteOutcome) -> Response {
    let status = if outcome.created() { StatusCode::CREATED } else { StatusCode::OK };
    let base = &api.service.settings().base_url;
    resource_response(status, &outcome.into_versioned(), base, rtype, prefer_return(headers), true)
}

async fn delete(
    State(api): State<FhirApi>,
    Path((rtype, id)): Path<(String, String)>,
    peer: Peer,
    headers: HeaderMap,
) -> Result<Response, Outcome> {
    let target = Target::new("delete", Some(&rtype), Some(&id));
    let ctx = write_context(&api, &headers, peer.0, &target).await?;
    let deleted = api.service.delete(&ctx, &rtype, &id).await?;
    let mut r = StatusCode::NO_CONTENT.into_response();
    if let Some(v) = deleted
        && let Ok(etag) = HeaderValue::from_str(&format!("W/\"{v}\""))
    {
        r.headers_mut().insert(header::ETAG, etag);
    }
    Ok(r)
}

async fn read(
    State(api): State<FhirApi>,
    Path((rtype, id)): Path<(String, String)>,
    peer: Peer,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, Outcome> {
    let target = Target::new("read", Some(&rtype), Some(&id));
    let ctx = context(&api, &headers, peer.0, &target).await?;
    checked(&api, &ctx, &target, negotiate(&headers, q.as_deref().unwrap_or(""))).await?;
    let v = api.service.read(&ctx, &rtype, &id).await?;
    Ok(read_response(&api, &rtype, &v))
}

async fn vread(
    State(api): State<FhirApi>,
    Path((rtype, id, vid)): Path<(String, String, String)>,
    peer: Peer,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, Outcome> {
    let target = Target::new("vread", Some(&rtype), Some(&id));
    let ctx = context(&api, &headers, peer.0, &target).await?;
    checked(&api, &ctx, &target, negotiate(&headers, q.as_deref().unwrap_or(""))).await?;
    let v = api.service.vread(&ctx, &rtype, &id, &vid).await?;
    Ok(read_response(&api, &rtype, &v))
}

async fn search(
    State(api): State<FhirApi>,
    Path(rtype): Path<String>,
    peer: Peer,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, Outcome> {
    let target = Target::new("search-type", Some(&rtype), None);
    let ctx = context(&api, &headers, peer.0, &target).await?;
    let q = q.unwrap_or_default();
    checked(&api, &ctx, &target, negotiate(&headers, &q)).await?;
    let bundle = api.service.search(&ctx, &rtype, &q, lenient(&headers)).await?;
    Ok(fhir_json(StatusCode::OK, &bundle))
}

async fn history_instance(
    State(api): State<FhirApi>,
    Path((rtype, id)): Path<(String, String)>,
    peer: Peer,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, Outcome> {
    history(api, Some(rtype), Some(id), peer, headers, q).await
}

async fn history_type(
    State(api): State<FhirApi>,
    Path(rtype): Path<String>,
    peer: Peer,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, Outcome> {
    history(api, Some(rtype), None, peer, headers, q).await
}

async fn history_system(
    State(api): State<FhirApi>,
    peer: Peer,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, Outcome> {
    history(api, None, None, peer, headers, q).await
}

async fn history(
    api: FhirApi,
    rtype: Option<String>,
    id: Option<String>,
    peer: Peer,
    headers: HeaderMap,
    q: Option<String>,
) -> Result<Response, Outcome> {
    let interaction = match (&rtype, &id) {
        (Some(_), Some(_)) => "history-instance",
        (Some(_), None) => "history-type",
        _ => "history-system",
    };
    let target = Target::new(interaction, rtype.as_deref(), id.as_deref());
    let ctx = context(&api, &headers, peer.0, &target).await?;
    let q = q.unwrap_or_default();
    checked(&api, &ctx, &target, negotiate(&headers, &q)).await?;
    let bundle = api.service.history(&ctx, rtype.as_deref(), id.as_deref(), &q).await?;
    Ok(fhir_json(StatusCode::OK, &bundle))
}

/// `GET /fhir/AuditEvent/$report?kind=...&from=...&to=...[&patient=...|&user=...][&_format=csv]`:
/// a compliance report (cairn-service `reports.rs`) as JSON, or as CSV with `_format=csv` or
/// `Accept: text/csv`.
async fn audit_report(
    State(api): State<FhirApi>,
    peer: Peer,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, Outcome> {
    let target = Target::new("operation", Some("AuditEvent"), None);
    let ctx = context(&api, &headers, peer.0, &target).await?;
    let q = q.unwrap_or_default();
    let params: std::collections::HashMap<String, String> = form_urlencoded::parse(q.as_bytes()).into_owned().collect();
    let csv = wants_csv(&params, &headers);
    let parsed = (|| {
        let kind = cairn_service::ReportKind::parse(
            params.get("kind").map(String::as_str).unwrap_or_default(),
            params.get("patient").map(String::as_str),
            params.get("user").map(String::as_str),
        )?;
        let window = |name: &str| {
            params.get(name).cloned().ok_or_else(|| {
                FhirError::new(400, IssueCode::Required, format!("`{name}` is required (a FHIR date or instant)"))
            })
        };
        Ok::<_, FhirError>((kind, window("from")?, window("to")?))
    })()
    .map_err(Outcome::from);
    let (kind, from, to) = checked(&api, &ctx, &target, parsed).await?;
    let report = api.service.audit_report(&ctx, &kind, &from, &to).await?;
    let json = serde_json::to_value(&report).expect("reports serialize");
    Ok(table_answer(csv.then(|| report.to_csv()), json))
}

/// Whether the client asked for CSV (`_format=csv` or `Accept: text/csv`).
fn wants_csv(params: &std::collections::HashMap<String, String>, headers: &HeaderMap) -> bool {
    params.get("_format").is_some_and(|f| f == "csv" || f == "text/csv")
        || headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("text/csv"))
}

/// A report's or an investigation's answer: JSON or CSV, never cached (it names patients and users).
fn table_answer(csv: Option<String>, json: serde_json::Value) -> Response {
    let mut r = match csv {
        Some(text) => {
            let mut r = (StatusCode::OK, text).into_response();
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
            r
        }
        None => {
            let mut r = (StatusCode::OK, serde_json::to_vec(&json).expect("JSON")).into_response();
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
    };
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `GET /fhir/Patient/{id}/$timeline?from=&to=[&_format=csv]`: everything that touched the patient
/// in the window, oldest first (cairn-service `investigate.rs`).
async fn timeline(
    State(api): State<FhirApi>,
    Path((rtype, id)): Path<(String, String)>,
    peer: Peer,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, Outcome> {
    let target = Target::new("operation", Some(&rtype), Some(&id));
    let ctx = context(&api, &headers, peer.0, &target).await?;
    if rtype != "Patient" {
        let unknown =
            FhirError::new(404, IssueCode::NotSupported, format!("$timeline is defined on Patient, not {rtype}"));
        return Err(refused(&api, &ctx, &target, unknown.into()).await);
    }
    let q = q.unwrap_or_default();
    let params: std::collections::HashMap<String, String> = form_urlencoded::parse(q.as_bytes()).into_owned().collect();
    let get = |k: &str| params.get(k).map(String::as_str);
    let entries = api.service.timeline(&ctx, &id, get("from"), get("to")).await?;
    let csv = wants_csv(&params, &headers).then(|| cairn_audit::timeline::to_csv(&entries));
    let json = serde_json::json!({"patient": format!("Patient/{id}"), "from": get("from"), "to": get("to"), "entries": entries});
    Ok(table_answer(csv, json))
}

/// `GET /fhir/$seen?user=|client=&from=&to=[&_format=csv]`: what a user or client was sent.
async fn seen(
    State(api): State<FhirApi>,
    peer: Peer,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, Outcome> {
    let target = Target::new("operation", None, None);
    let ctx = context(&api, &headers, peer.0, &target).await?;
    let q = q.unwrap_or_default();
    let params: std::collections::HashMap<String, String> = form_urlencoded::parse(q.as_bytes()).into_owned().collect();
    let get = |k: &str| params.get(k).map(String::as_str);
    let accesses = api.service.seen(&ctx, get("user"), get("client"), get("from"), get("to")).await?;
    let csv = wants_csv(&params, &headers).then(|| cairn_audit::seen::to_csv(&accesses));
    let json = serde_json::json!({"user": get("user"), "client": get("client"), "from": get("from"), "to": get("to"), "accesses": accesses});
    Ok(table_answer(csv, json))
}

async fn unknown_route(
    State(api): State<FhirApi>,
    peer: Peer,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Outcome {
    let outcome = error(
        404,
        IssueCode::NotSupported,
        format!("{method} {} is not a FHIR interaction this server supports", uri.path()),
    );
    refused_route(&api, peer, &method, uri.path(), &headers, outcome).await
}

async fn method_not_allowed(
    State(api): State<FhirApi>,
    peer: Peer,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Outcome {
    let outcome = error(405, IssueCode::NotSupported, format!("{method} is not allowed on {}", uri.path()));
    refused_route(&api, peer, &method, uri.path(), &headers, outcome).await
}

/// A request no route takes is a refusal like any other: under `/fhir` it is recorded (after the
/// token is checked, which records a bad one) before it is answered. Other paths are not the FHIR
/// API's and are only answered.
async fn refused_route(
    api: &FhirApi,
    peer: Peer,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    outcome: Outcome,
) -> Outcome {
    if !path.starts_with("/fhir") {
        return outcome;
    }
    let interaction = match *method {
        Method::GET | Method::HEAD => "read",
        Method::POST => "create",
        Method::PUT | Method::PATCH => "update",
        Method::DELETE => "delete",
        _ => "unknown",
    };
    let target = Target::new(interaction, None, None);
    match context(api, headers, peer.0, &target).await {
        Ok(ctx) => refused(api, &ctx, &target, outcome).await,
        Err(refusal) => refusal,
    }
}
