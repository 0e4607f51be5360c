//! The pages a person sees: sign-in, consent, sign-out and errors. Plain HTML forms that work
//! without JavaScript; every value shown is escaped; every form carries a CSRF token (double submit:
//! a cookie and a hidden field that must match); session and CSRF cookies are HttpOnly, SameSite and,
//! behind https, Secure. The decisions are `cairn_auth`'s; this module only renders and parses.

use crate::fhir::Peer;
use crate::oauth::request_actor;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use cairn_auth::AuthServer;
use cairn_auth::flow::{AuthorizeError, AuthorizeRequest};
use cairn_auth::scope::{Context, Permission, Scope};
use cairn_events::LoginFailure;
use std::sync::Arc;
use subtle::ConstantTimeEq;

const SESSION_COOKIE: &str = "cairn_session";
const CSRF_COOKIE: &str = "cairn_csrf";
/// The longest app request carried through a sign-in at an upstream provider.
const MAX_CARRIED_REQUEST_BYTES: usize = 4096;
/// Binds a sign-in at an upstream provider to the browser that started it.
const FEDERATION_COOKIE: &str = "cairn_fed";

/// What the pages need: the authorization server's decisions and the relying party that speaks to
/// upstream providers.
pub struct Pages {
    auth: Arc<AuthServer>,
    federation: cairn_federation::Federation,
}

pub fn routes(auth: Arc<AuthServer>) -> Router {
    let federation = cairn_federation::Federation::new(&auth.settings().issuer);
    Router::new()
        .route("/authorize", get(authorize).post(authorize))
        .route("/login", axum::routing::post(login))
        .route("/login/idp/{idp_id}", axum::routing::post(login_upstream))
        .route("/login/idp/{idp_id}/callback", get(upstream_callback))
        .route("/consent", axum::routing::post(consent))
        .route("/logout", get(logout_page).post(logout))
        .route("/smart-style.json", get(smart_style))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .with_state(Arc::new(Pages { auth, federation }))
}

/// HTML-escapes text for element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name && !v.is_empty()).then(|| v.to_owned())
    })
}

fn secure(auth: &AuthServer) -> &'static str {
    if auth.settings().issuer.starts_with("https://") { "; Secure" } else { "" }
}

/// A page with the headers every page gets: no caching, no framing, no scripts.
fn html(status: StatusCode, title: &str, body: &str, cookies: &[String]) -> Response {
    let doc = format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · Cairn</title>
<style>
body{{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;background:#f6f7f9;color:#1f2328;margin:0}}
main{{max-width:26rem;margin:3rem auto;background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:1.5rem 2rem}}
h1{{font-size:1.3rem;margin:0 0 .25rem}} p.sub{{color:#59636e;margin:0 0 1.25rem}}
label{{display:block;font-weight:600;margin:.75rem 0 .25rem}}
input[type=text],input[type=password]{{width:100%;box-sizing:border-box;padding:.5rem;border:1px solid #d0d7de;border-radius:6px;font:inherit}}
button{{font:inherit;padding:.5rem 1rem;border-radius:6px;border:1px solid #1f6feb;background:#1f6feb;color:#fff;cursor:pointer;margin-top:1rem}}
button.secondary{{background:#fff;color:#1f2328;border-color:#d0d7de}}
button.wide{{width:100%;margin-top:.5rem}} p.or{{text-align:center;color:#59636e;margin:1rem 0 0}}
.error{{background:#ffebe9;border:1px solid #ff8182;border-radius:6px;padding:.5rem .75rem;margin-bottom:1rem}}
ul.scopes{{list-style:none;padding:0}} ul.scopes li{{margin:.4rem 0}} ul.scopes code{{color:#59636e;font-size:.8rem}}
footer{{color:#59636e;font-size:.8rem;margin-top:1.5rem}}
</style></head>
<body><main>{body}<footer>Cairn · every sign-in and consent is recorded in the audit trail</footer></main></body></html>"#,
        title = esc(title),
    );
    let mut r = (status, doc).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(c) {
            h.append(header::SET_COOKIE, v);
        }
    }
    r
}

fn error_page(status: StatusCode, message: &str) -> Response {
    html(status, "Cannot continue", &format!("<h1>Cannot continue</h1><p class=\"error\">{}</p>", esc(message)), &[])
}

fn see_other(location: &str, cookies: &[String]) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(c) {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    r
}

/// The CSRF token for a form: the browser's cookie if it has a good one, else a new one (and the
/// cookie to set).
fn csrf_token(auth: &AuthServer, headers: &HeaderMap) -> (String, Vec<String>) {
    match cookie(headers, CSRF_COOKIE).filter(|c| c.len() == 43) {
        Some(t) => (t, Vec::new()),
        None => {
            let t = cairn_auth::random_token(32);
            let set = format!("{CSRF_COOKIE}={t}; Path=/; HttpOnly; SameSite=Strict{}", secure(auth));
            (t, vec![set])
        }
    }
}

fn csrf_ok(headers: &HeaderMap, form: &Form) -> bool {
    match (cookie(headers, CSRF_COOKIE), form.one("csrf")) {
        (Some(c), Some(f)) => bool::from(c.as_bytes().ct_eq(f.as_bytes())),
        _ => false,
    }
}

/// A parsed form body.
struct Form(Vec<(String, String)>);

impl Form {
    fn parse(body: &[u8]) -> Form {
        Form(form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect())
    }
    fn one(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    fn all(&self, name: &str) -> Vec<String> {
        self.0.iter().filter(|(k, _)| k == name).map(|(_, v)| v.clone()).collect()
    }
    /// The authorization request carried through the forms.
    fn authorize_params(&self) -> Vec<(String, String)> {
        Form::parse(self.one("authorize").unwrap_or("").as_bytes()).0
    }
}

fn encode_params(params: &[(String, String)]) -> String {
    form_urlencoded::Serializer::new(String::new()).extend_pairs(params).finish()
}

/// The app's authorization request a form carries through the sign-in, validated again (none when
/// the person signs in without an app).
fn carried_request(auth: &AuthServer, form: &Form) -> Result<Option<AuthorizeRequest>, AuthorizeError> {
    let params = form.authorize_params();
    if params.is_empty() { Ok(None) } else { auth.authorize_request(&params).map(Some) }
}

/// What to answer when an authorization request cannot go on: an error page when the client or its
/// redirect URI is not trusted, else a redirect to the client with the error.
fn refusal(e: AuthorizeError) -> Response {
    match e {
        AuthorizeError::Page(m) => error_page(StatusCode::BAD_REQUEST, &m),
        AuthorizeError::Redirect(url) => see_other(&url, &[]),
    }
}

async fn authorize(
    State(pages): State<Arc<Pages>>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let auth = &pages.auth;
    let params =
        if method == Method::POST { Form::parse(&body).0 } else { Form::parse(query.unwrap_or_default().as_bytes()).0 };
    let req = match auth.authorize_request(&params) {
        Ok(r) => r,
        Err(e) => return refusal(e),
    };
    match cookie(&headers, SESSION_COOKIE).and_then(|c| auth.session_user(&c)) {
        Some(user) => consent_page(auth, &headers, &req, &user, None),
        None => login_page(auth, &headers, Some(&req), "", None, StatusCode::OK),
    }
}

fn login_page(
    auth: &AuthServer,
    headers: &HeaderMap,
    req: Option<&AuthorizeRequest>,
    username: &str,
    error: Option<&str>,
    status: StatusCode,
) -> Response {
    let (csrf, cookies) = csrf_token(auth, headers);
    let who = match req {
        Some(r) => {
            format!("<p class=\"sub\"><strong>{}</strong> asks to use your Cairn account.</p>", esc(&r.client_name))
        }
        None => "<p class=\"sub\">Sign in to your Cairn account.</p>".to_owned(),
    };
    let error = error.map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", esc(e))).unwrap_or_default();
    let carried = req.map(|r| encode_params(&r.params)).unwrap_or_default();
    // One button per enabled upstream provider: a form, so the CSRF token guards the start too.
    let upstream: String = auth
        .enabled_idps()
        .iter()
        .map(|i| {
            format!(
                r#"<form method="post" action="/login/idp/{id}"><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="authorize" value="{carried}"><button type="submit" class="secondary wide" id="idp-{id}">Sign in with {name}</button></form>"#,
                id = esc(&i.registration.idp_id),
                csrf = esc(&csrf),
                carried = esc(&carried),
                name = esc(&i.registration.display_name),
            )
        })
        .collect();
    let password = if auth.settings().password_login {
        format!(
            r#"<form method="post" action="/login">
<input type="hidden" name="csrf" value="{csrf}">
<input type="hidden" name="authorize" value="{carried}">
<label for="username">Username</label><input type="text" id="username" name="username" value="{username}" autocomplete="username" required autofocus>
<label for="password">Password</label><input type="password" id="password" name="password" autocomplete="current-password" required>
<button type="submit">Sign in</button>
</form>"#,
            csrf = esc(&csrf),
            carried = esc(&carried),
            username = esc(username),
        )
    } else {
        String::new()
    };
    let between = if !upstream.is_empty() && !password.is_empty() { "<p class=\"or\">or</p>" } else { "" };
    let nothing = if upstream.is_empty() && password.is_empty() {
        "<p class=\"error\">No way to sign in is configured on this server. Ask an administrator.</p>"
    } else {
        ""
    };
    let body = format!("<h1>Sign in</h1>{who}{error}{upstream}{between}{password}{nothing}");
    html(status, "Sign in", &body, &cookies)
}

/// What a scope lets the app do, in words.
fn describe(scope: &Scope) -> String {
    match scope {
        Scope::OpenId => "Know who you are (your Cairn account id)".into(),
        Scope::FhirUser => "Know which patient or practitioner record is yours".into(),
        Scope::LaunchPatient => "Know which patient's record it is working with".into(),
        Scope::Launch => "Join the current session".into(),
        Scope::OfflineAccess => "Keep access after you close the app (until you revoke it)".into(),
        Scope::OnlineAccess => "Keep access while you are signed in".into(),
        Scope::Resource(r) => {
            let verbs: Vec<&str> = [
                (Permission::Create, "create"),
                (Permission::Read, "read"),
                (Permission::Update, "update"),
                (Permission::Delete, "delete"),
                (Permission::Search, "search"),
            ]
            .iter()
            .filter(|(p, _)| r.permissions.contains(*p))
            .map(|(_, v)| *v)
            .collect();
            let what = r.resource_type.clone().map(|t| format!("{t} records")).unwrap_or_else(|| "all records".into());
            let whose = match r.context {
                Context::Patient => "of the patient in context",
                Context::User => "you have access to",
                Context::System => "on the whole server",
            };
            let narrowed = if r.query.is_some() { " (only those matching a filter)" } else { "" };
            let mut text = format!("{} {what} {whose}{narrowed}", verbs.join(", "));
            text[..1].make_ascii_uppercase();
            text
        }
    }
}

fn consent_page(
    auth: &AuthServer,
    headers: &HeaderMap,
    req: &AuthorizeRequest,
    user: &cairn_auth::state::User,
    error: Option<&str>,
) -> Response {
    let (csrf, cookies) = csrf_token(auth, headers);
    let items: String = req
        .scopes
        .iter()
        .map(|s| {
            let v = s.to_string();
            format!(
                "<li><label style=\"font-weight:400\"><input type=\"checkbox\" name=\"scope\" value=\"{v}\" checked> {d} <code>{v}</code></label></li>",
                v = esc(&v),
                d = esc(&describe(s))
            )
        })
        .collect();
    let is_patient = user.account.fhir_user.as_deref().is_some_and(|f| f.starts_with("Patient/"));
    let patient_field = if req.needs_patient(&req.scopes) && !is_patient {
        r#"<label for="patient">Patient id</label><input type="text" id="patient" name="patient" placeholder="e.g. 123" required>"#
    } else {
        ""
    };
    let error = error.map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", esc(e))).unwrap_or_default();
    let body = format!(
        r#"<h1>Allow access?</h1><p class="sub"><strong>{client}</strong> would like to:</p>{error}
<form method="post" action="/consent">
<input type="hidden" name="csrf" value="{csrf}">
<input type="hidden" name="authorize" value="{carried}">
<ul class="scopes">{items}</ul>{patient_field}
<p>Untick anything you do not want to allow. You can revoke access later.</p>
<button type="submit" name="decision" value="approve">Allow</button>
<button type="submit" name="decision" value="deny" class="secondary" formnovalidate>Deny</button>
</form>
<p style="margin-top:1rem">Signed in as <strong>{username}</strong>. <a href="/logout">Not you?</a></p>"#,
        client = esc(&req.client_name),
        csrf = esc(&csrf),
        carried = esc(&encode_params(&req.params)),
        username = esc(&user.account.username),
    );
    html(StatusCode::OK, "Allow access", &body, &cookies)
}

async fn login(State(pages): State<Arc<Pages>>, peer: Peer, headers: HeaderMap, body: Bytes) -> Response {
    let auth = &pages.auth;
    let form = Form::parse(&body);
    let actor = request_actor(&headers, peer.0);
    let req = match carried_request(auth, &form) {
        Ok(r) => r,
        Err(e) => return refusal(e),
    };
    let username = form.one("username").unwrap_or("").trim().to_owned();
    if !csrf_ok(&headers, &form) {
        let recorded = auth
            .login_refused(
                Some(&username).filter(|u| !u.is_empty()).map(|u| u.as_str()),
                LoginFailure::CsrfMismatch,
                &actor,
            )
            .await;
        if recorded.is_err() {
            return sign_in_unavailable();
        }
        return login_page(
            auth,
            &headers,
            req.as_ref(),
            &username,
            Some("Your sign-in form expired. Please try again."),
            StatusCode::FORBIDDEN,
        );
    }
    match auth.login(&username, form.one("password").unwrap_or(""), &actor).await {
        Ok(signed_in) => signed_in_page(auth, &signed_in, req.as_ref(), None),
        Err(refusal) => {
            let status = if refusal.0.starts_with("Too many") {
                StatusCode::TOO_MANY_REQUESTS
            } else {
                StatusCode::UNAUTHORIZED
            };
            login_page(auth, &headers, req.as_ref(), &username, Some(&refusal.0), status)
        }
    }
}

/// The answer when the audit log cannot record a sign-in step: nothing goes on unrecorded.
fn sign_in_unavailable() -> Response {
    error_page(StatusCode::SERVICE_UNAVAILABLE, "sign-in is unavailable right now; try again shortly")
}

/// `page` with one more cookie set.
fn with_cookie(mut page: Response, cookie: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(cookie) {
        page.headers_mut().append(header::SET_COOKIE, v);
    }
    page
}

/// After a sign-in (with a password or upstream): the session cookie, then the app's request again
/// (its consent page), or a plain "signed in" page. `also` is one more cookie to set.
fn signed_in_page(
    auth: &AuthServer,
    signed_in: &cairn_auth::flow::SignedIn,
    req: Option<&AuthorizeRequest>,
    also: Option<String>,
) -> Response {
    let lifetime = auth.settings().session_lifetime.as_secs();
    let session = format!(
        "{SESSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Lax; Max-Age={lifetime}{}",
        signed_in.cookie,
        secure(auth)
    );
    let cookies: Vec<String> = std::iter::once(session).chain(also).collect();
    match req {
        Some(r) => see_other(&format!("/authorize?{}", encode_params(&r.params)), &cookies),
        None => html(StatusCode::OK, "Signed in", "<h1>Signed in</h1><p>You are signed in to Cairn.</p>", &cookies),
    }
}

/// What the person reads when a sign-in through an upstream provider failed (the audit record has
/// the detail).
fn upstream_failure_message(reason: LoginFailure, provider: &str) -> (StatusCode, String) {
    match reason {
        LoginFailure::UpstreamError => (
            StatusCode::BAD_GATEWAY,
            format!(
                "We could not complete the sign-in with {provider}: it did not answer as expected. Try again in a moment, or sign in another way."
            ),
        ),
        LoginFailure::UpstreamRejected => (
            StatusCode::UNAUTHORIZED,
            format!("{provider} did not complete the sign-in. Try again, or sign in another way."),
        ),
        LoginFailure::StateMismatch => (
            StatusCode::BAD_REQUEST,
            "This sign-in attempt expired or was started in another browser window. Please start again.".into(),
        ),
        LoginFailure::InvalidIdToken => (
            StatusCode::UNAUTHORIZED,
            format!(
                "The answer from {provider} could not be verified, so you were not signed in. Please try again; if it keeps happening, tell an administrator."
            ),
        ),
        LoginFailure::UnknownProvider => {
            (StatusCode::NOT_FOUND, "Sign-in through this provider is not available.".into())
        }
        _ => (StatusCode::UNAUTHORIZED, "The sign-in did not succeed.".into()),
    }
}

fn display_name(auth: &AuthServer, idp_id: &str) -> String {
    auth.enabled_idp(idp_id).map(|i| i.registration.display_name).unwrap_or_else(|| "the identity provider".into())
}

/// `POST /login/idp/{idp_id}`: the person chose an upstream provider; send the browser there.
async fn login_upstream(
    State(pages): State<Arc<Pages>>,
    axum::extract::Path(idp_id): axum::extract::Path<String>,
    peer: Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let auth = &pages.auth;
    let form = Form::parse(&body);
    let actor = request_actor(&headers, peer.0);
    let req = match carried_request(auth, &form) {
        Ok(r) => r,
        Err(e) => return refusal(e),
    };
    if !csrf_ok(&headers, &form) {
        if auth.login_refused(None, LoginFailure::CsrfMismatch, &actor).await.is_err() {
            return sign_in_unavailable();
        }
        let again = "Your sign-in form expired. Please try again.";
        return login_page(auth, &headers, req.as_ref(), "", Some(again), StatusCode::FORBIDDEN);
    }
    // Only the validated app request travels with the sign-in, and only a sane amount of it: the
    // sign-in in progress is kept in this process's memory.
    let carried = req.as_ref().map(|r| r.params.clone()).unwrap_or_default();
    if encode_params(&carried).len() > MAX_CARRIED_REQUEST_BYTES {
        return error_page(StatusCode::BAD_REQUEST, "the app's authorization request is too long");
    }
    let started = match auth.enabled_idp(&idp_id) {
        Some(idp) => pages.federation.begin(&idp.registration, carried, actor.source_address.as_deref()).await,
        None => Err(cairn_federation::NotStarted::Failed(cairn_auth::federation::FederatedFailure {
            reason: LoginFailure::UnknownProvider,
            detail: "the provider is disabled or not configured".into(),
            authenticator: None,
        })),
    };
    let started = match started {
        Err(cairn_federation::NotStarted::Busy) => {
            return error_page(
                StatusCode::TOO_MANY_REQUESTS,
                "too many sign-ins are in progress from your address; finish one or try again in a few minutes",
            );
        }
        Err(cairn_federation::NotStarted::Failed(f)) => Err(f),
        Ok(s) => Ok(s),
    };
    match started {
        Ok(started) => {
            let binding = format!(
                "{FEDERATION_COOKIE}={}; Path=/login/idp; HttpOnly; SameSite=Lax; Max-Age=600{}",
                started.binding_cookie,
                secure(auth)
            );
            see_other(&started.redirect_to, &[binding])
        }
        Err(failure) => {
            if auth.federated_login_failed(Some(&idp_id), &failure, &actor).await.is_err() {
                return sign_in_unavailable();
            }
            let (status, message) = upstream_failure_message(failure.reason, &display_name(auth, &idp_id));
            login_page(auth, &headers, req.as_ref(), "", Some(&message), status)
        }
    }
}

/// `GET /login/idp/{idp_id}/callback`: the browser is back from the provider.
async fn upstream_callback(
    State(pages): State<Arc<Pages>>,
    axum::extract::Path(idp_id): axum::extract::Path<String>,
    peer: Peer,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let auth = &pages.auth;
    let actor = request_actor(&headers, peer.0);
    let query = Form::parse(query.unwrap_or_default().as_bytes()).0;
    let idp = auth.enabled_idp(&idp_id).map(|i| i.registration);
    let binding = cookie(&headers, FEDERATION_COOKIE);
    let finished = pages.federation.finish(&idp_id, idp.as_ref(), &query, binding.as_deref()).await;
    let clear = format!("{FEDERATION_COOKIE}=; Path=/login/idp; HttpOnly; SameSite=Lax; Max-Age=0{}", secure(auth));
    let app_request = |params: &[(String, String)]| {
        if params.is_empty() { None } else { auth.authorize_request(params).ok() }
    };
    let finished = match finished {
        Ok(f) => f,
        Err(failed) => {
            if auth.federated_login_failed(Some(&idp_id), &failed.failure, &actor).await.is_err() {
                return sign_in_unavailable();
            }
            let (status, message) = upstream_failure_message(failed.failure.reason, &display_name(auth, &idp_id));
            let req = failed.authorize.as_deref().and_then(app_request);
            return with_cookie(login_page(auth, &headers, req.as_ref(), "", Some(&message), status), &clear);
        }
    };
    let req = app_request(&finished.authorize);
    match auth.federated_login(&idp_id, finished.identity, &actor).await {
        Ok(signed_in) => signed_in_page(auth, &signed_in, req.as_ref(), Some(clear)),
        Err(refusal) => {
            with_cookie(login_page(auth, &headers, req.as_ref(), "", Some(&refusal.0), StatusCode::FORBIDDEN), &clear)
        }
    }
}

async fn consent(State(pages): State<Arc<Pages>>, peer: Peer, headers: HeaderMap, body: Bytes) -> Response {
    let auth = &pages.auth;
    let form = Form::parse(&body);
    let actor = request_actor(&headers, peer.0);
    let req = match auth.authorize_request(&form.authorize_params()) {
        Ok(r) => r,
        Err(e) => return refusal(e),
    };
    let session = cookie(&headers, SESSION_COOKIE);
    let Some((cookie_value, user)) = session.and_then(|c| auth.session_user(&c).map(|u| (c, u))) else {
        return login_page(auth, &headers, Some(&req), "", Some("Please sign in again."), StatusCode::UNAUTHORIZED);
    };
    if !csrf_ok(&headers, &form) {
        if auth.login_refused(Some(&user.account.username), LoginFailure::CsrfMismatch, &actor).await.is_err() {
            return error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "the audit log cannot record this right now; try again shortly",
            );
        }
        return consent_page(auth, &headers, &req, &user, Some("The form expired. Please decide again."));
    }
    let chosen = form.all("scope");
    let decision = match form.one("decision") {
        Some("approve") => Some(chosen.as_slice()),
        _ => None,
    };
    match auth.decide(&req, &user, &cookie_value, decision, form.one("patient"), &actor).await {
        Ok(url) => see_other(&url, &[]),
        Err(AuthorizeError::Redirect(url)) => see_other(&url, &[]),
        Err(AuthorizeError::Page(m)) => consent_page(auth, &headers, &req, &user, Some(&m)),
    }
}

async fn logout_page(State(pages): State<Arc<Pages>>, headers: HeaderMap) -> Response {
    let auth = &pages.auth;
    let (csrf, cookies) = csrf_token(auth, &headers);
    let body = format!(
        r#"<h1>Sign out</h1><p class="sub">End your Cairn session in this browser.</p>
<form method="post" action="/logout"><input type="hidden" name="csrf" value="{}"><button type="submit">Sign out</button></form>"#,
        esc(&csrf)
    );
    html(StatusCode::OK, "Sign out", &body, &cookies)
}

async fn logout(State(pages): State<Arc<Pages>>, peer: Peer, headers: HeaderMap, body: Bytes) -> Response {
    let auth = &pages.auth;
    let form = Form::parse(&body);
    if !csrf_ok(&headers, &form) {
        return error_page(StatusCode::FORBIDDEN, "the sign-out form expired; open the sign-out page again");
    }
    if let Some(c) = cookie(&headers, SESSION_COOKIE)
        && auth.logout(&c, &request_actor(&headers, peer.0)).await.is_err()
    {
        return error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "the audit log cannot record this right now; try again shortly",
        );
    }
    let clear = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0{}", secure(auth));
    html(StatusCode::OK, "Signed out", "<h1>Signed out</h1><p>You are signed out of Cairn.</p>", &[clear])
}

async fn smart_style(State(pages): State<Arc<Pages>>) -> Response {
    let auth = &pages.auth;
    let mut r = axum::Json(auth.smart_style()).into_response();
    r.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            esc(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
    }

    #[test]
    fn scopes_read_as_sentences() {
        assert_eq!(
            describe(&Scope::parse("patient/Observation.rs").unwrap()),
            "Read, search Observation records of the patient in context"
        );
        assert_eq!(
            describe(&Scope::parse("user/*.cruds").unwrap()),
            "Create, read, update, delete, search all records you have access to"
        );
    }
}
