//! The sign-in and consent pages in a real headless browser (Chromium through chromedriver, driven
//! with fantoccini): a full SMART standalone launch. The browser signs in, consents, is redirected to
//! the app with a code; the app exchanges it with PKCE and reads Observations.
//!
//! Needs Chromium and chromedriver (Debian packages `chromium`, `chromium-driver`); `infra/test`
//! installs them and sets `CAIRN_CHROMEDRIVER`. Without it this test fails, never passes silently.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cairn_tests::{Backend, Deployment};
use fantoccini::{ClientBuilder, Locator};
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Chromedriver {
    child: Child,
    url: String,
    /// chromedriver's and Chromium's temporary files (profile and scoped dirs): killed rather than
    /// quit, Chromium leaves them behind, and every run added some to /tmp. Deleted after the kill.
    _tmp: tempfile::TempDir,
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn start_chromedriver() -> Chromedriver {
    let path = std::env::var("CAIRN_CHROMEDRIVER").expect(
        "CAIRN_CHROMEDRIVER is not set: run the tests with infra/test, which installs Chromium and chromedriver",
    );
    let port = free_port();
    let tmp = tempfile::tempdir().unwrap();
    let child = Command::new(&path)
        .arg(format!("--port={port}"))
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {path}: {e}"));
    let driver = Chromedriver { child, url: format!("http://127.0.0.1:{port}"), _tmp: tmp };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = reqwest::get(format!("{}/status", driver.url)).await
            && r.status().is_success()
        {
            return driver;
        }
        assert!(Instant::now() < deadline, "chromedriver did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The app's redirect endpoint: answers one request and hands over its path and query.
async fn callback_listener() -> (u16, tokio::sync::oneshot::Receiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut tx = Some(tx);
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            let mut buf = vec![0u8; 8192];
            let n = stream.read(&mut buf).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]).into_owned();
            let target = head.split_whitespace().nth(1).unwrap_or_default().to_owned();
            let body = "<!doctype html><title>App</title><p>Back in the app.</p>";
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes()).await;
            if target.starts_with("/callback")
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(target);
            }
        }
    });
    (port, rx)
}

fn param(target: &str, name: &str) -> Option<String> {
    reqwest::Url::parse(&format!("http://x{target}"))
        .ok()?
        .query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// How the person signs in on Cairn's page.
enum SignIn {
    /// With a Cairn username and password.
    Password,
    /// Through the upstream OpenID provider `hospital` (a real `oidc-provider`), as `alice` there.
    Upstream,
}

#[test]
#[ignore = "needs Chromium and chromedriver: run with infra/test (it installs them)"]
fn a_patient_signs_in_and_consents_in_a_real_browser() {
    smart_launch_in_a_browser(SignIn::Password);
}

#[test]
#[ignore = "needs Chromium, chromedriver and the test OpenID provider: run with infra/test"]
fn a_patient_signs_in_through_an_upstream_provider_in_a_real_browser() {
    smart_launch_in_a_browser(SignIn::Upstream);
}

fn smart_launch_in_a_browser(sign_in: SignIn) {
    let d = Deployment::new(Backend::Embedded);
    let server = d.start(&[]);
    let base = server.base_url.clone();
    let _provider = match sign_in {
        SignIn::Password => None,
        SignIn::Upstream => {
            let secret = "browser-test-upstream-secret";
            let provider = crate::federation::UpstreamProvider::start(json!([{
                "client_id": "cairn", "client_secret": secret,
                "redirect_uris": [format!("{base}/login/idp/hospital/callback")],
            }]));
            let dir = tempfile::tempdir().unwrap();
            let file = crate::federation::secret_file(dir.path(), "hospital.secret", secret);
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
            ]);
            Some((provider, dir))
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let driver = start_chromedriver().await;
        let (cb_port, callback) = callback_listener().await;
        let redirect = format!("http://127.0.0.1:{cb_port}/callback");
        d.admin(&[
            "client", "register", "--name", "Glucose diary", "--kind", "public", "--client-id", "diary", "--redirect-uri", &redirect,
            "--scope", "launch/patient openid fhirUser patient/Observation.rs",
        ]);
        let feeder = d.admin(&["client", "register", "--name", "Feeder", "--kind", "confidential-symmetric", "--scope", "system/Observation.c"]);
        let (status, out, err) = d.cairn_with_stdin(
            &["admin", "user", "add", "--username", "pat", "--password-stdin", "--fhir-user", "Patient/p-1"],
            "a long patient password\n",
        );
        assert!(status.success(), "{out}{err}");
        if let SignIn::Upstream = sign_in {
            d.admin(&["user", "link", "--username", "pat", "--idp", "hospital", "--subject", "upstream-alice"]);
        }
        let http = reqwest::Client::new();
        let system: Value = http
            .post(format!("{base}/token"))
            .basic_auth(feeder["client_id"].as_str().unwrap(), feeder["client_secret"].as_str())
            .form(&[("grant_type", "client_credentials"), ("scope", "system/Observation.c")])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for patient in ["p-1", "p-2"] {
            let reading = json!({"resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
                "subject": {"reference": format!("Patient/{patient}")}, "effectiveDateTime": "2026-11-28T08:00:00Z",
                "valueQuantity": {"value": 99, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}});
            let r = http
                .post(format!("{base}/fhir/Observation"))
                .bearer_auth(system["access_token"].as_str().unwrap())
                .header("content-type", "application/fhir+json")
                .body(reading.to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
        }

        // The app sends the browser to /authorize with PKCE.
        let mut raw = [0u8; 32];
        aws_lc_rs::rand::fill(&mut raw).unwrap();
        let verifier = URL_SAFE_NO_PAD.encode(raw);
        let challenge = {
            let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes());
            URL_SAFE_NO_PAD.encode(digest.as_ref())
        };
        let authorize = reqwest::Url::parse_with_params(
            &format!("{base}/authorize"),
            &[
                ("response_type", "code"),
                ("client_id", "diary"),
                ("redirect_uri", redirect.as_str()),
                ("scope", "launch/patient openid fhirUser patient/Observation.rs"),
                ("state", "browser-state-1"),
                ("aud", &format!("{base}/fhir")),
                ("code_challenge", &challenge),
                ("code_challenge_method", "S256"),
            ],
        )
        .unwrap();

        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,900"]}),
        );
        let browser = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&driver.url)
            .await
            .expect("a browser session");
        browser.goto(authorize.as_str()).await.unwrap();
        assert_eq!(browser.title().await.unwrap(), "Sign in · Cairn");
        match sign_in {
            SignIn::Password => {
                browser.find(Locator::Id("username")).await.unwrap().send_keys("pat").await.unwrap();
                browser.find(Locator::Id("password")).await.unwrap().send_keys("a long patient password").await.unwrap();
                browser.find(Locator::Css("button[type=submit]:not(.secondary)")).await.unwrap().click().await.unwrap();
            }
            SignIn::Upstream => {
                browser.find(Locator::Id("idp-hospital")).await.unwrap().click().await.unwrap();
                // The provider's own sign-in page, on its own origin.
                let login = browser.wait().at_most(Duration::from_secs(30)).for_element(Locator::Id("login")).await;
                if login.is_err() {
                    panic!("no provider login page; the browser shows: {}", browser.source().await.unwrap_or_default());
                }
                login.unwrap().send_keys("alice").await.unwrap();
                browser.find(Locator::Id("password")).await.unwrap().send_keys("alice upstream password").await.unwrap();
                browser.find(Locator::Id("sign-in")).await.unwrap().click().await.unwrap();
            }
        }
        // A click does not wait for the navigation it starts: wait for the consent page.
        let consent = browser.wait().at_most(Duration::from_secs(30)).for_element(Locator::Css("button[value=approve]")).await;
        if consent.is_err() {
            panic!("no consent page after signing in; the browser shows: {}", browser.source().await.unwrap_or_default());
        }
        assert_eq!(browser.title().await.unwrap(), "Allow access · Cairn");
        let listed = browser.find_all(Locator::Css("input[name=scope]")).await.unwrap().len();
        assert_eq!(listed, 4, "every scope asked for is offered");
        browser.find(Locator::Css("button[value=approve]")).await.unwrap().click().await.unwrap();
        let target = tokio::time::timeout(Duration::from_secs(30), callback).await.expect("the browser reached the app").unwrap();
        let _ = browser.close().await;
        assert_eq!(param(&target, "state").as_deref(), Some("browser-state-1"));
        let code = param(&target, "code").expect("a code");

        // The app exchanges the code and reads the patient's readings.
        let token: Value = http
            .post(format!("{base}/token"))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
                ("redirect_uri", redirect.as_str()),
                ("client_id", "diary"),
                ("code_verifier", verifier.as_str()),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(token["patient"], "p-1", "{token}");
        let bundle: Value = http
            .get(format!("{base}/fhir/Observation"))
            .bearer_auth(token["access_token"].as_str().unwrap())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(bundle["total"], 1, "only the patient's own reading: {bundle}");
        assert_eq!(bundle["entry"][0]["resource"]["subject"]["reference"], "Patient/p-1");
    });
}
