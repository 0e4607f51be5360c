//! Sign-in through upstream OpenID providers. Against the real, independent `oidc-provider` (npm,
//! OpenID Certified; `infra/oidc-provider` installs it): an admin-linked identity signs in, consents
//! and the app's token reads the patient's data, every record naming the upstream identity; an
//! unlinked identity and a replayed callback are refused and recorded. Against the in-process mock
//! provider (`mock_op`), which can misbehave: every forged or broken ID token, an upstream error, an
//! unreachable provider, key rotation, just-in-time provisioning.

use super::auth::{Http, hidden, reading, rt};
use super::mock_op::{Misbehaviour, MockOp};
use cairn_tests::{Backend, Deployment, Server};
use openidconnect::PkceCodeChallenge;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

const APP_REDIRECT: &str = "http://127.0.0.1:9/callback";
const APP_SCOPES: &str = "launch/patient openid fhirUser offline_access patient/Observation.rs";

/// The SMART app: a public client asking for the patient's Observations.
fn register_app(d: &Deployment) {
    d.admin(&[
        "client",
        "register",
        "--name",
        "Glucose diary",
        "--kind",
        "public",
        "--client-id",
        "diary",
        "--redirect-uri",
        APP_REDIRECT,
        "--scope",
        APP_SCOPES,
    ]);
}

/// The app's authorization request and its PKCE verifier.
fn app_request(base: &str) -> (String, String) {
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let url = reqwest::Url::parse_with_params(
        &format!("{base}/authorize"),
        &[
            ("response_type", "code"),
            ("client_id", "diary"),
            ("redirect_uri", APP_REDIRECT),
            ("scope", APP_SCOPES),
            ("state", "app-state-1"),
            ("aud", &format!("{base}/fhir")),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ],
    )
    .unwrap();
    (url.to_string(), verifier.secret().clone())
}

/// A browser: a cookie jar shared by a client that follows redirects and one that does not.
struct Browser {
    follow: reqwest::Client,
    step: reqwest::Client,
}

impl Browser {
    fn new() -> Browser {
        let jar = Arc::new(reqwest::cookie::Jar::default());
        let build = |policy| reqwest::Client::builder().cookie_provider(jar.clone()).redirect(policy).build().unwrap();
        Browser {
            follow: build(reqwest::redirect::Policy::limited(10)),
            step: build(reqwest::redirect::Policy::none()),
        }
    }

    /// Opens the app's request at Cairn and presses "Sign in with ..." for `idp`; follows every
    /// redirect; the final address, status and page.
    async fn sign_in_with(&self, base: &str, idp: &str) -> (String, u16, String) {
        let (at, status, page, _) = self.sign_in_for_app(base, idp).await;
        (at, status, page)
    }

    /// [`Browser::sign_in_with`], also giving the app's PKCE verifier.
    async fn sign_in_for_app(&self, base: &str, idp: &str) -> (String, u16, String, String) {
        let (resp, verifier) = self.press(&self.follow, base, idp).await;
        let at = resp.url().to_string();
        let status = resp.status().as_u16();
        (at, status, resp.text().await.unwrap(), verifier)
    }

    /// Opens the app's request at Cairn and presses "Sign in with ..." for `idp`, sending the form
    /// with `client` (`follow` to go all the way, `step` to stop at Cairn's redirect); the answer and
    /// the app's PKCE verifier.
    async fn press(&self, client: &reqwest::Client, base: &str, idp: &str) -> (reqwest::Response, String) {
        let (url, verifier) = app_request(base);
        let page = self.follow.get(&url).send().await.unwrap().text().await.unwrap();
        assert!(page.contains(&format!("action=\"/login/idp/{idp}\"")), "no button for {idp}: {page}");
        let resp = client
            .post(format!("{base}/login/idp/{idp}"))
            .form(&[("csrf", hidden(&page, "csrf")), ("authorize", hidden(&page, "authorize"))])
            .send()
            .await
            .unwrap();
        (resp, verifier)
    }

    /// Allows everything on the consent page (for `patient` when the user is not one) and
    /// exchanges the code; the token response.
    async fn consent_and_exchange(&self, base: &str, consent: &str, verifier: &str, patient: &str) -> Value {
        let mut form: Vec<(String, String)> = vec![
            ("csrf".into(), hidden(consent, "csrf")),
            ("authorize".into(), hidden(consent, "authorize")),
            ("decision".into(), "approve".into()),
            ("patient".into(), patient.into()),
        ];
        for s in APP_SCOPES.split(' ') {
            form.push(("scope".into(), s.into()));
        }
        let resp = self.step.post(format!("{base}/consent")).form(&form).send().await.unwrap();
        let back = super::auth::location(&resp);
        assert!(back.starts_with(APP_REDIRECT), "{back}");
        let code = super::auth::url_param(&back, "code").unwrap();
        let exchange = [
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", APP_REDIRECT),
            ("client_id", "diary"),
            ("code_verifier", verifier),
        ];
        let resp = self.step.post(format!("{base}/token")).form(&exchange).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }
}

/// Every AuditEvent, newest first, read through the API by an auditor client.
async fn audit_trail(http: &Http, auditor: &(String, String)) -> Vec<Value> {
    let grant = [("grant_type", "client_credentials"), ("scope", "system/AuditEvent.rs")];
    let (_, _, t) = http.form("/token", &grant, Some((&auditor.0, &auditor.1))).await;
    let token = t["access_token"].as_str().expect("an auditor token").to_owned();
    let (status, _, bundle) =
        http.fhir(reqwest::Method::GET, "/AuditEvent?_count=1000&_sort=-date", Some(&token), None).await;
    assert_eq!(status, 200, "{bundle}");
    bundle["entry"].as_array().into_iter().flatten().map(|e| e["resource"].clone()).collect()
}

fn refused_logins(trail: &[Value]) -> Vec<String> {
    trail
        .iter()
        .filter(|e| e["subtype"][0]["code"] == "110122" && e["outcome"] == "4")
        .filter_map(|e| e["outcomeDesc"].as_str().map(str::to_owned))
        .collect()
}

/// The agent naming the upstream identity (issuer as identifier system, subject as value).
fn upstream_agent<'a>(event: &'a Value, issuer: &str) -> Option<&'a Value> {
    event["agent"].as_array()?.iter().find(|a| a["who"]["identifier"]["system"] == issuer)
}

/// An EC P-256 private key as a PKCS#8 PEM file (mode 0600) and its public JWK.
fn assertion_key(dir: &std::path::Path) -> (String, Value) {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let der = pair.to_pkcs8v1().unwrap();
    let b64 = STANDARD.encode(der.as_ref());
    let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
    let pem = format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", lines.join("\n"));
    let point = pair.public_key().as_ref();
    let (x, y) = (URL_SAFE_NO_PAD.encode(&point[1..33]), URL_SAFE_NO_PAD.encode(&point[33..65]));
    // Cairn names its assertion key by its RFC 7638 thumbprint (`cairn admin idp add` prints it).
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    let kid =
        URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes()).as_ref());
    let jwk = json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid, "x": x, "y": y});
    (secret_file(dir, "cairn-assertion.pem", &pem), jwk)
}

pub(crate) fn secret_file(dir: &std::path::Path, name: &str, secret: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.display().to_string()
}

#[test]
fn forged_and_broken_id_tokens_are_refused_and_recorded() {
    let d = Deployment::new(Backend::Embedded);
    let server = d.start(&[]);
    let base = server.base_url.clone();
    register_app(&d);
    let auditor = d.register_client("Compliance", "system/AuditEvent.rs");
    let http = Http::new(&server);
    let runtime = rt();
    // A secret with the characters HTTP Basic must form-encode (RFC 6749 2.3.1).
    let secret = "s:e+c/r&e%t=1";
    let op = runtime.block_on(MockOp::start("cairn-at-mock", secret));
    let secrets = tempfile::tempdir().unwrap();
    let file = secret_file(secrets.path(), "mock.secret", secret);
    let add_mock = || {
        d.admin(&[
            "idp",
            "add",
            "--id",
            "mock",
            "--name",
            "Mock <ID>",
            "--issuer",
            &op.issuer(),
            "--client-id",
            "cairn-at-mock",
            "--client-secret-file",
            &file,
            "--scope",
            "email",
            "--userinfo",
            "--provision-role",
            "patient",
        ])
    };
    let added = add_mock();
    assert_eq!(added["changed"], true, "{added}");
    let again = add_mock();
    assert_eq!(again["changed"], false, "the same configuration is not recorded twice: {again}");

    runtime.block_on(async {
        // The button is there, its name escaped.
        let browser = Browser::new();
        let (url, _) = app_request(&base);
        let page = browser.follow.get(&url).send().await.unwrap().text().await.unwrap();
        assert!(page.contains("Sign in with Mock &lt;ID&gt;") && !page.contains("Mock <ID>"), "{page}");

        // A good sign-in provisions a user just in time; the consent page follows.
        op.set_subject("mock-user-1");
        op.set_claims(json!({"acr": "urn:test:loa3", "amr": ["pwd", "otp"], "email": "x@example.org"}));
        let (at, status, page) = browser.sign_in_with(&base, "mock").await;
        assert_eq!(status, 200, "{at}: {page}");
        assert!(page.contains("Allow access?"), "{page}");
        let users = d.admin(&["user", "list"]);
        let provisioned: Vec<&Value> =
            users.as_array().unwrap().iter().filter(|u| u["username"].as_str().unwrap().starts_with("mock-")).collect();
        assert_eq!(provisioned.len(), 1, "{users}");
        assert_eq!(provisioned[0]["roles"], json!(["patient"]));
        assert_eq!(provisioned[0]["password"], false);
        assert_eq!(provisioned[0]["linked_identities"], 1);
        assert!(
            !provisioned[0]["username"].as_str().unwrap().contains("mock-user-1"),
            "the username does not carry the upstream subject"
        );
        // The same identity again: the same user, no second one.
        let (_, status, _) = Browser::new().sign_in_with(&base, "mock").await;
        assert_eq!(status, 200);
        let users = d.admin(&["user", "list"]);
        assert_eq!(
            users.as_array().unwrap().iter().filter(|u| u["username"].as_str().unwrap().starts_with("mock-")).count(),
            1
        );

        // Every way an ID token can be wrong: refused, no session, recorded with the reason.
        let cases = [
            (Misbehaviour::WrongAudience, "audience"),
            (Misbehaviour::Expired, "expired"),
            (Misbehaviour::WrongNonce, "nonce"),
            (Misbehaviour::WrongIssuer, "another issuer"),
            (Misbehaviour::ForeignKey, "signature does not verify"),
            (Misbehaviour::UnknownKid, "key the provider does not publish"),
            (Misbehaviour::AlgNone, "is not signed"),
            (Misbehaviour::Hs256WithPublicKey, "HS256"),
        ];
        for (i, (m, why)) in cases.into_iter().enumerate() {
            let label = format!("{m:?}");
            op.set_misbehaviour(m);
            let browser = Browser::new();
            let (at, status, page) = browser.sign_in_with(&base, "mock").await;
            assert_eq!(status, 401, "{label}: {at}: {page}");
            assert!(page.contains("could not be verified") && page.contains("Sign in"), "{label}: {page}");
            let trail = audit_trail(&http, &auditor).await;
            let refused = refused_logins(&trail);
            assert_eq!(
                refused.iter().filter(|r| r.contains("invalid_id_token")).count(),
                i + 1,
                "{label}: {refused:?}"
            );
            let newest = &refused[0];
            assert!(
                newest.contains("invalid_id_token")
                    && newest.contains("(identity provider mock)")
                    && newest.contains(why),
                "{label}: the newest refusal does not say `{why}`: {newest}"
            );
        }

        // The provider refuses, or its token endpoint is down.
        op.set_misbehaviour(Misbehaviour::ErrorAtAuthorize);
        let (_, status, page) = Browser::new().sign_in_with(&base, "mock").await;
        assert_eq!(status, 401, "{page}");
        assert!(page.contains("did not complete the sign-in"), "{page}");
        op.set_misbehaviour(Misbehaviour::TokenEndpointDown);
        let (_, status, page) = Browser::new().sign_in_with(&base, "mock").await;
        assert_eq!(status, 502, "{page}");
        assert!(page.contains("did not answer as expected") && !page.contains("<html>down"), "{page}");
        let refused = refused_logins(&audit_trail(&http, &auditor).await);
        assert!(refused.iter().any(|r| r.contains("upstream_rejected") && r.contains("access_denied")), "{refused:?}");
        assert!(refused.iter().any(|r| r.contains("upstream_error") && r.contains("token endpoint")), "{refused:?}");

        // The provider rotates its keys: Cairn fetches the new JWKS once and signs the user in.
        op.set_misbehaviour(Misbehaviour::None);
        let fetches = op.jwks_fetches();
        op.rotate_key();
        let (_, status, page) = Browser::new().sign_in_with(&base, "mock").await;
        assert_eq!(status, 200, "after a key rotation: {page}");
        assert_eq!(op.jwks_fetches(), fetches + 1, "one JWKS refresh for the new kid");

        // The answer brought to another browser (no binding cookie): refused, recorded.
        let victim = Browser::new();
        let (resp, _) = victim.press(&victim.step, &base, "mock").await;
        assert_eq!(resp.status(), 303);
        let to_provider = super::auth::location(&resp);
        assert!(to_provider.starts_with(&op.issuer()), "{to_provider}");
        let back = victim.step.get(&to_provider).send().await.unwrap();
        let callback = super::auth::location(&back);
        assert!(callback.starts_with(&format!("{base}/login/idp/mock/callback?")), "{callback}");
        let attacker = Browser::new();
        let resp = attacker.follow.get(&callback).send().await.unwrap();
        assert_eq!(resp.status(), 400);
        assert!(resp.text().await.unwrap().contains("expired or was started in another browser"));
        // ... and the state is spent: the right browser cannot use it afterwards either.
        let resp = victim.follow.get(&callback).send().await.unwrap();
        assert_eq!(resp.status(), 400);
        let refused = refused_logins(&audit_trail(&http, &auditor).await);
        assert!(refused.iter().any(|r| r.contains("state_mismatch") && r.contains("another browser")), "{refused:?}");
        assert!(refused.iter().any(|r| r.contains("state_mismatch") && r.contains("already used")), "{refused:?}");

        // An answer naming another issuer (RFC 9207 mix-up): refused.
        let browser = Browser::new();
        let (resp, _) = browser.press(&browser.step, &base, "mock").await;
        let back = browser.step.get(super::auth::location(&resp)).send().await.unwrap();
        let mut callback = reqwest::Url::parse(&super::auth::location(&back)).unwrap();
        let pairs: Vec<(String, String)> = callback
            .query_pairs()
            .map(|(k, v)| {
                if k == "iss" {
                    (k.into_owned(), "http://evil.example".into())
                } else {
                    (k.into_owned(), v.into_owned())
                }
            })
            .collect();
        callback.query_pairs_mut().clear().extend_pairs(pairs);
        let resp = browser.follow.get(callback).send().await.unwrap();
        assert_eq!(resp.status(), 401);
        let refused = refused_logins(&audit_trail(&http, &auditor).await);
        assert!(refused[0].contains("upstream_rejected") && refused[0].contains("names another issuer"), "{refused:?}");

        // A provider nobody can reach: `idp add` says so (and records it only when told to).
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let gone = format!("http://127.0.0.1:{closed}");
        let (status, _, err) = d.cairn(&[
            "admin",
            "idp",
            "add",
            "--id",
            "gone",
            "--name",
            "Gone",
            "--issuer",
            &gone,
            "--client-id",
            "x",
            "--client-secret-file",
            &file,
        ]);
        assert!(!status.success() && err.contains("discovery") && err.contains("--no-check"), "{err}");
        d.admin(&[
            "idp",
            "add",
            "--id",
            "gone",
            "--name",
            "Gone",
            "--issuer",
            &gone,
            "--client-id",
            "x",
            "--client-secret-file",
            &file,
            "--no-check",
        ]);
        let (_, status, page) = Browser::new().sign_in_with(&base, "gone").await;
        assert_eq!(status, 502, "{page}");
        assert!(page.contains("We could not complete the sign-in with Gone"), "{page}");
        let refused = refused_logins(&audit_trail(&http, &auditor).await);
        assert!(
            refused.iter().any(|r| r.contains("upstream_error") && r.contains("(identity provider gone)")),
            "{refused:?}"
        );

        // Disabled: no button, and a sign-in in flight is refused.
        d.admin(&["idp", "disable", "--id", "gone"]);
        let (url, _) = app_request(&base);
        let page = Browser::new().follow.get(&url).send().await.unwrap().text().await.unwrap();
        assert!(!page.contains("/login/idp/gone") && page.contains("/login/idp/mock"), "{page}");

        // The sign-ins that succeeded are recorded with the upstream identity and its acr/amr.
        let trail = audit_trail(&http, &auditor).await;
        let logins: Vec<&Value> =
            trail.iter().filter(|e| e["subtype"][0]["code"] == "110122" && e["outcome"] == "0").collect();
        assert_eq!(logins.len(), 3, "three successful sign-ins");
        let first = logins.last().unwrap();
        let agent = upstream_agent(first, &op.issuer()).expect("the login names the upstream identity");
        assert_eq!(agent["who"]["identifier"]["value"], "mock-user-1");
        assert_eq!(agent["policy"], json!(["acr:urn:test:loa3", "amr:pwd", "amr:otp"]));
        let config = trail
            .iter()
            .find(|e| e["entity"][0]["what"]["identifier"]["value"] == "mock")
            .expect("the provider's registration is in the trail");
        assert!(config["entity"][0]["description"].as_str().unwrap().contains("provisioning with role patient"));

        // Disabling a provider ends what it vouched for: a sign-in in flight, the session, the
        // access and refresh tokens.
        let browser = Browser::new();
        let (_, status, consent, verifier) = browser.sign_in_for_app(&base, "mock").await;
        assert_eq!(status, 200, "{consent}");
        let tokens = browser.consent_and_exchange(&base, &consent, &verifier, "p-1").await;
        let access = tokens["access_token"].as_str().unwrap().to_owned();
        let refresh = tokens["refresh_token"].as_str().expect("offline access").to_owned();
        let (status, _, _) = http.fhir(reqwest::Method::GET, "/Observation?patient=p-1", Some(&access), None).await;
        assert_eq!(status, 200);
        let in_flight = Browser::new();
        let (resp, _) = in_flight.press(&in_flight.step, &base, "mock").await;
        let back = in_flight.step.get(super::auth::location(&resp)).send().await.unwrap();
        let callback = super::auth::location(&back);
        d.admin(&["idp", "disable", "--id", "mock"]);
        let resp = in_flight.follow.get(&callback).send().await.unwrap();
        assert_eq!(resp.status(), 404);
        assert!(resp.text().await.unwrap().contains("not available"));
        let (status, _, _) = http.fhir(reqwest::Method::GET, "/Observation?patient=p-1", Some(&access), None).await;
        assert_eq!(status, 401, "an access token from the disabled provider's sign-in");
        let again = [("grant_type", "refresh_token"), ("refresh_token", refresh.as_str()), ("client_id", "diary")];
        let (status, _, answer) = http.form("/token", &again, None).await;
        assert_eq!((status, answer["error"].as_str()), (400, Some("invalid_grant")), "{answer}");
        let (url, _) = app_request(&base);
        let page = browser.follow.get(&url).send().await.unwrap().text().await.unwrap();
        assert!(page.contains("<h1>Sign in</h1>") && !page.contains("/login/idp/mock"), "the session ended: {page}");
    });
    let (_, log) = server.terminate();
    assert!(!log.contains(secret), "the upstream client secret is never logged");
}

// ---------------------------------------------------------------- the real provider

/// The test OpenID Provider (`infra/oidc/provider.mjs`, npm `oidc-provider`), on a free port.
pub(crate) struct UpstreamProvider {
    child: Child,
    pub(crate) issuer: String,
    /// Its log (one line per request), kept out of the test output.
    _log: tempfile::NamedTempFile,
}

impl Drop for UpstreamProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl UpstreamProvider {
    pub(crate) fn start(clients: Value) -> UpstreamProvider {
        let script = std::env::var("CAIRN_OIDC_PROVIDER").expect(
            "CAIRN_OIDC_PROVIDER is not set: run the tests with infra/test, which installs the test OpenID provider",
        );
        let accounts = json!([
            {"sub": "upstream-alice", "login": "alice", "password": "alice upstream password", "name": "Alice Upstream", "email": "alice@example.org", "email_verified": true},
            {"sub": "upstream-bob", "login": "bob", "password": "bob upstream password", "name": "Bob Upstream", "email": "alice@example.org", "email_verified": true}
        ]);
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new("node")
            .arg(&script)
            .env("PORT", "0")
            .env("OIDC_CLIENTS", clients.to_string())
            .env("OIDC_ACCOUNTS", accounts.to_string())
            .stdout(Stdio::piped())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start node {script}: {e}"));
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let Some(issuer) = line.trim().strip_prefix("listening ").map(str::to_owned) else {
            panic!("the provider did not start: {line:?} {}", std::fs::read_to_string(log.path()).unwrap_or_default())
        };
        UpstreamProvider { child, issuer, _log: log }
    }
}

/// Signs in at the provider's own login page (after Cairn sent the browser there); the final page.
async fn provider_login(
    browser: &Browser,
    provider_page: reqwest::Response,
    login: &str,
    password: &str,
) -> reqwest::Response {
    let at = provider_page.url().clone();
    let page = provider_page.text().await.unwrap();
    provider_login_on(browser, &at, &page, login, password).await
}

async fn provider_login_on(
    browser: &Browser,
    at: &reqwest::Url,
    page: &str,
    login: &str,
    password: &str,
) -> reqwest::Response {
    let action = page
        .split("action=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_else(|| panic!("no login form at {at}: {page}"))
        .replace("&amp;", "&");
    let target = at.join(&action).unwrap();
    browser.follow.post(target).form(&[("login", login), ("password", password)]).send().await.unwrap()
}

#[test]
fn an_upstream_identity_signs_in_and_its_accesses_name_it() {
    let d = Deployment::new(Backend::Embedded);
    let server: Server = d.start(&[]);
    let base = server.base_url.clone();
    register_app(&d);
    let auditor = d.register_client("Compliance", "system/AuditEvent.rs");
    let (feeder_id, feeder_secret) = d.register_client("Feeder", "system/Observation.cruds");
    let (status, out, err) = d.cairn_with_stdin(
        &["admin", "user", "add", "--username", "alice", "--password-stdin", "--fhir-user", "Patient/p-1"],
        "a local password nobody uses\n",
    );
    assert!(status.success(), "{out}{err}");
    let secret = "upstream-client-secret-0123456789";
    let secrets = tempfile::tempdir().unwrap();
    // Cairn's key for private_key_jwt at the provider: a PKCS#8 PEM file, its public half registered there.
    let (key_file, public_jwk) = assertion_key(secrets.path());
    let provider = UpstreamProvider::start(json!([
        {
            "client_id": "cairn", "client_secret": secret,
            "redirect_uris": [format!("{base}/login/idp/hospital/callback")],
            "token_endpoint_auth_method": "client_secret_basic",
        },
        {
            "client_id": "cairn-with-key",
            "redirect_uris": [format!("{base}/login/idp/hospital-key/callback")],
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": [public_jwk]},
        }
    ]));
    let file = secret_file(secrets.path(), "hospital.secret", secret);
    d.admin(&[
        "idp",
        "add",
        "--id",
        "hospital",
        "--name",
        "Hospital ID",
        "--issuer",
        &provider.issuer,
        "--client-id",
        "cairn",
        "--client-secret-file",
        &file,
        "--scope",
        "profile",
        "--userinfo",
    ]);
    let with_key = d.admin(&[
        "idp",
        "add",
        "--id",
        "hospital-key",
        "--name",
        "Hospital ID (key)",
        "--issuer",
        &provider.issuer,
        "--client-id",
        "cairn-with-key",
        "--client-auth-method",
        "private_key_jwt",
        "--private-key-file",
        &key_file,
    ]);
    assert_eq!(with_key["public_jwk"], public_jwk, "the key to register at the provider");
    // Linked by an administrator, never by the (here shared) email claim.
    let linked = d.admin(&["user", "link", "--username", "alice", "--idp", "hospital", "--subject", "upstream-alice"]);
    assert_eq!(linked["issuer"], provider.issuer.as_str());
    let (status, _, err) =
        d.cairn(&["admin", "user", "link", "--username", "alice", "--idp", "hospital", "--subject", "upstream-alice"]);
    assert!(!status.success() && err.contains("already linked"), "{err}");
    let http = Http::new(&server);

    rt().block_on(async {
        let grant = [("grant_type", "client_credentials"), ("scope", "system/Observation.cruds")];
        let (_, _, t) = http.form("/token", &grant, Some((&feeder_id, &feeder_secret))).await;
        let system = t["access_token"].as_str().unwrap().to_owned();
        let (status, _, created) =
            http.fhir(reqwest::Method::POST, "/Observation", Some(&system), Some(&reading("p-1"))).await;
        assert_eq!(status, 201);
        let reading_id = created["id"].as_str().unwrap().to_owned();

        // Alice: Cairn's sign-in page, the provider's login, back to Cairn's consent.
        let browser = Browser::new();
        let (at_provider, verifier) = browser.press(&browser.follow, &base, "hospital").await;
        assert!(at_provider.url().as_str().starts_with(&provider.issuer), "{}", at_provider.url());
        // A wrong password stays at the provider.
        let wrong = provider_login(&browser, at_provider, "alice", "not her password").await;
        assert_eq!(wrong.status(), 401);
        let at = wrong.url().clone();
        let again = wrong.text().await.unwrap();
        assert!(again.contains("Invalid login or password"), "{again}");
        let consent = provider_login_on(&browser, &at, &again, "alice", "alice upstream password").await;
        assert_eq!(consent.status(), 200, "{}", consent.url());
        assert!(consent.url().as_str().starts_with(&format!("{base}/authorize?")), "{}", consent.url());
        let consent = consent.text().await.unwrap();
        assert!(
            consent.contains("Allow access?") && consent.contains("Signed in as <strong>alice</strong>"),
            "{consent}"
        );
        let form: Vec<(String, String)> = [
            ("csrf", hidden(&consent, "csrf")),
            ("authorize", hidden(&consent, "authorize")),
            ("decision", "approve".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .chain(APP_SCOPES.split(' ').map(|s| ("scope".into(), s.into())))
        .collect();
        let resp = browser.step.post(format!("{base}/consent")).form(&form).send().await.unwrap();
        let back = super::auth::location(&resp);
        assert!(back.starts_with(APP_REDIRECT), "{back}");
        let code = super::auth::url_param(&back, "code").unwrap();
        let token_request = [
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", APP_REDIRECT),
            ("client_id", "diary"),
            ("code_verifier", verifier.as_str()),
        ];
        let (status, _, tokens) = http.form("/token", &token_request, None).await;
        assert_eq!(status, 200, "{tokens}");
        let access = tokens["access_token"].as_str().unwrap();
        assert_eq!(tokens["patient"], "p-1");
        let (status, _, _) =
            http.fhir(reqwest::Method::GET, &format!("/Observation/{reading_id}"), Some(access), None).await;
        assert_eq!(status, 200);
        // A refreshed token still names who vouched for her.
        let refresh = tokens["refresh_token"].as_str().expect("offline access granted");
        let again = [("grant_type", "refresh_token"), ("refresh_token", refresh), ("client_id", "diary")];
        let (status, _, refreshed) = http.form("/token", &again, None).await;
        assert_eq!(status, 200, "{refreshed}");
        let (status, _, _) = http
            .fhir(reqwest::Method::GET, &format!("/Observation/{reading_id}"), refreshed["access_token"].as_str(), None)
            .await;
        assert_eq!(status, 200);

        // The same person through the client that authenticates with a signed assertion (RFC 7523):
        // the identity (issuer, subject) is the same, so is the link.
        let browser = Browser::new();
        let (at_provider, _) = browser.press(&browser.follow, &base, "hospital-key").await;
        let consent = provider_login(&browser, at_provider, "alice", "alice upstream password").await;
        assert_eq!(consent.status(), 200, "{}", consent.url());
        assert!(consent.text().await.unwrap().contains("Signed in as <strong>alice</strong>"));

        // Bob exists at the provider but not here: refused, and told how to get linked.
        let browser = Browser::new();
        let (at_provider, _) = browser.press(&browser.follow, &base, "hospital").await;
        let refused = provider_login(&browser, at_provider, "bob", "bob upstream password").await;
        assert_eq!(refused.status(), 403);
        let page = refused.text().await.unwrap();
        assert!(page.contains("not linked to a Cairn account") && page.contains("upstream-bob"), "{page}");

        // The trail: alice's sign-in, her token grant and her read all name the upstream identity.
        let trail = audit_trail(&http, &auditor).await;
        let names_alice = |e: &&Value| {
            upstream_agent(e, &provider.issuer).is_some_and(|a| a["who"]["identifier"]["value"] == "upstream-alice")
        };
        let login = trail
            .iter()
            .find(|e| e["subtype"][0]["code"] == "110122" && e["outcome"] == "0")
            .expect("the sign-in is recorded");
        assert!(names_alice(&login), "{login}");
        let amr = &upstream_agent(login, &provider.issuer).unwrap()["policy"];
        assert!(amr.as_array().unwrap().contains(&json!("amr:pwd")), "{amr}");
        let grant = trail
            .iter()
            .find(|e| e["subtype"][0]["code"] == "ITI-71" && e["agent"].to_string().contains("diary"))
            .expect("the token grant is recorded");
        assert!(names_alice(&grant), "{grant}");
        let reads: Vec<&Value> = trail
            .iter()
            .filter(|e| e["subtype"][0]["code"] == "read" && e["entity"].to_string().contains(&reading_id))
            .collect();
        assert_eq!(reads.len(), 2, "the read with the first token and with the refreshed one");
        assert!(reads.iter().all(names_alice), "{reads:?}");
        let refusal = refused_logins(&trail);
        assert!(refusal.iter().any(|r| r.contains("unlinked_identity")), "{refusal:?}");
        let bob = trail
            .iter()
            .find(|e| e["outcome"] == "4" && e["outcomeDesc"].as_str().is_some_and(|d| d.contains("unlinked_identity")))
            .unwrap();
        assert!(
            upstream_agent(bob, &provider.issuer).is_some_and(|a| a["who"]["identifier"]["value"] == "upstream-bob")
        );
    });
    let (_, log) = server.terminate();
    assert!(!log.contains(secret), "the upstream client secret is never logged");
}

#[test]
fn providers_from_the_config_file_and_password_sign_in_switched_off() {
    let d = Deployment::new(Backend::Embedded);
    let runtime = rt();
    let op = runtime.block_on(MockOp::start("cairn-cfg", "cfg-secret"));
    let config_dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(config_dir.path().join("secrets")).unwrap();
    secret_file(&config_dir.path().join("secrets"), "mock.secret", "cfg-secret");
    let config = config_dir.path().join("cairn.toml");
    let write_config = |issuer: &str| {
        std::fs::write(
            &config,
            format!(
                "password_login = false\n\n[[idp]]\nidp_id = \"mock\"\ndisplay_name = \"Mock ID\"\nissuer = \"{issuer}\"\nclient_id = \"cairn-cfg\"\nclient_secret_file = \"secrets/mock.secret\"\nprovision_role = \"patient\"\n"
            ),
        )
        .unwrap();
    };
    write_config(&op.issuer());
    let config_arg = config.display().to_string();
    let server = d.start(&["--config", &config_arg]);
    let base = server.base_url.clone();
    register_app(&d);
    let auditor = d.register_client("Compliance", "system/AuditEvent.rs");
    let listed = d.admin(&["idp", "list"]);
    assert_eq!(listed[0]["registered_by"], "config", "{listed}");
    assert_eq!(listed[0]["provision_role"], "patient");
    let http = Http::new(&server);
    runtime.block_on(async {
        let browser = Browser::new();
        let (url, _) = app_request(&base);
        let page = browser.follow.get(&url).send().await.unwrap().text().await.unwrap();
        assert!(page.contains("/login/idp/mock") && !page.contains("name=\"password\""), "{page}");
        // The password form is gone, and so is the endpoint behind it (recorded).
        let resp = browser
            .follow
            .post(format!("{base}/login"))
            .form(&[
                ("csrf", hidden(&page, "csrf")),
                ("authorize", hidden(&page, "authorize")),
                ("username", "x".into()),
                ("password", "y".into()),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        assert!(resp.text().await.unwrap().contains("switched off"));
        let (_, status, page) = browser.sign_in_with(&base, "mock").await;
        assert_eq!(status, 200, "{page}");
    });
    drop(server);
    // Started again with the same file: nothing new to record.
    let server = d.start(&["--config", &config_arg]);
    let http_again = Http::new(&server);
    runtime.block_on(async {
        let trail = audit_trail(&http_again, &auditor).await;
        let registrations = trail
            .iter()
            .filter(|e| e["entity"][0]["what"]["identifier"]["system"] == "urn:cairn:identity-provider")
            .count();
        assert_eq!(registrations, 1, "the config file's provider is recorded once");
        let refused = refused_logins(&trail);
        assert!(refused.iter().any(|r| r.contains("password sign-in is switched off")), "{refused:?}");
    });
    drop(http);
    drop(server);
    // A bad provider in the file: the server refuses to start, saying which and why.
    write_config("http://idp.example.org");
    let (status, _, err) = d.cairn(&["serve", "--config", &config_arg, "--listen", "127.0.0.1:0"]);
    assert!(!status.success());
    assert!(err.contains("idp `mock`") && err.contains("https URL"), "{err}");
    // Disabled by an admin: the file does not enable it again at the next start.
    write_config(&op.issuer());
    let server = d.start(&["--config", &config_arg]);
    d.admin(&["idp", "disable", "--id", "mock"]);
    drop(server);
    let _server = d.start(&["--config", &config_arg]);
    assert_eq!(d.admin(&["idp", "list"])[0]["disabled"], true);
}
