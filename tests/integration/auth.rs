//! The authorization server over HTTP, driven as its users drive it: a device gateway with SMART
//! Backend Services, a resource server introspecting, an administrator with `cairn admin`, and the
//! FHIR API refusing what the token does not allow. Every grant and refusal must be in the log, and
//! no secret anywhere else.

use aws_lc_rs::signature::{ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cairn_tests::{Backend, Deployment, Server};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

pub(crate) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// A device gateway's key pair (ES384) and its public JWK Set.
struct GatewayKey {
    encoding: EncodingKey,
    jwks: Value,
}

fn gateway_key() -> GatewayKey {
    let pair = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING).unwrap();
    let point = pair.public_key().as_ref().to_vec();
    GatewayKey {
        encoding: EncodingKey::from_ec_der(pair.to_pkcs8v1().unwrap().as_ref()),
        jwks: json!({"keys": [{"kty": "EC", "crv": "P-384", "kid": "gw-key-1", "alg": "ES384",
            "x": URL_SAFE_NO_PAD.encode(&point[1..49]), "y": URL_SAFE_NO_PAD.encode(&point[49..97])}]}),
    }
}

fn assertion(key: &GatewayKey, client_id: &str, token_url: &str) -> String {
    let mut header = Header::new(Algorithm::ES384);
    header.kid = Some("gw-key-1".into());
    let claims = json!({"iss": client_id, "sub": client_id, "aud": token_url, "exp": now() + 240,
        "jti": format!("{}-{}", now(), rand_suffix())});
    jsonwebtoken::encode(&header, &claims, &key.encoding).unwrap()
}

fn rand_suffix() -> String {
    let mut b = [0u8; 8];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    URL_SAFE_NO_PAD.encode(b)
}

pub(crate) struct Http {
    pub(crate) client: reqwest::Client,
    pub(crate) base: String,
}

impl Http {
    pub(crate) fn new(server: &Server) -> Http {
        Http { client: reqwest::Client::new(), base: server.base_url.clone() }
    }

    pub(crate) async fn form(
        &self,
        path: &str,
        form: &[(&str, &str)],
        basic: Option<(&str, &str)>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let body: String = form_body(form);
        let mut req = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        if let Some((id, secret)) = basic {
            req = req.basic_auth(id, Some(secret));
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        (status, headers, resp.json().await.unwrap_or(Value::Null))
    }

    pub(crate) async fn fhir(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut req = self.client.request(method, format!("{}/fhir{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/fhir+json").body(serde_json::to_vec(b).unwrap());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        (status, headers, resp.json().await.unwrap_or(Value::Null))
    }

    async fn get_json(&self, path: &str) -> (u16, reqwest::header::HeaderMap, Value) {
        let resp = self.client.get(format!("{}{path}", self.base)).send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        (status, headers, resp.json().await.unwrap_or(Value::Null))
    }
}

fn form_body(form: &[(&str, &str)]) -> String {
    form.iter().map(|(k, v)| format!("{}={}", k, percent_encode(v))).collect::<Vec<_>>().join("&")
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub(crate) fn reading(patient: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "effectiveDateTime": "2026-11-28T08:00:00Z",
        "valueQuantity": {"value": 104, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}
    })
}

fn header(h: &reqwest::header::HeaderMap, name: &str) -> String {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
}

/// A device gateway gets tokens with SMART Backend Services and uploads readings; a resource server
/// introspects; the gateway revokes its token; the log holds every step and no secret.
fn backend_services(backend: Backend) {
    let d = Deployment::new(backend);
    let server = d.start(&[]);
    let http = Http::new(&server);
    let token_url = format!("{}/token", server.base_url);
    let key = gateway_key();
    let jwks_file = d.data_dir().join("gateway.jwks.json");
    std::fs::write(&jwks_file, key.jwks.to_string()).unwrap();
    let gw = d.admin(&[
        "client",
        "register",
        "--name",
        "Glucose gateway",
        "--kind",
        "confidential-asymmetric",
        "--client-id",
        "gateway-7",
        "--scope",
        "system/Observation.crs system/Device.rs",
        "--jwks-file",
        jwks_file.to_str().unwrap(),
    ]);
    assert_eq!(gw["client_id"], "gateway-7");
    let (rs_id, rs_secret) = d.register_client("Resource server", "system/*.rs");

    rt().block_on(async {
        // Discovery: the documents agree with each other and with where we are.
        let (status, headers, smart) = http.get_json("/fhir/.well-known/smart-configuration").await;
        assert_eq!(status, 200);
        assert_eq!(header(&headers, "access-control-allow-origin"), "*");
        assert!(header(&headers, "content-type").starts_with("application/json"));
        assert_eq!(smart["token_endpoint"], token_url.as_str());
        assert_eq!(smart["issuer"], server.base_url.as_str());
        assert!(smart["capabilities"].as_array().unwrap().contains(&json!("client-confidential-asymmetric")));
        assert!(!smart["code_challenge_methods_supported"].as_array().unwrap().contains(&json!("plain")));
        let (_, _, oidc) = http.get_json("/.well-known/openid-configuration").await;
        let (_, _, rfc8414) = http.get_json("/.well-known/oauth-authorization-server").await;
        assert_eq!(oidc["issuer"], server.base_url.as_str());
        assert_eq!(oidc, rfc8414);
        assert!(oidc["token_endpoint_auth_signing_alg_values_supported"].as_array().unwrap().contains(&json!("ES384")));

        // No token: 401 with a bare challenge; metadata stays open.
        let (status, headers, body) = http.fhir(reqwest::Method::GET, "/Observation", None, None).await;
        assert_eq!(status, 401);
        assert_eq!(header(&headers, "www-authenticate"), "Bearer realm=\"cairn\"");
        assert_eq!(body["resourceType"], "OperationOutcome");
        assert_eq!(http.fhir(reqwest::Method::GET, "/metadata", None, None).await.0, 200);
        let (status, headers, _) = http.fhir(reqwest::Method::GET, "/Observation", Some("not-a-token"), None).await;
        assert_eq!(status, 401);
        assert!(header(&headers, "www-authenticate").contains("error=\"invalid_token\""));

        // The grant.
        let jwt = assertion(&key, "gateway-7", &token_url);
        let grant = [
            ("grant_type", "client_credentials"),
            ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
            ("client_assertion", jwt.as_str()),
            ("scope", "system/Observation.crs system/Observation.d"),
        ];
        let (status, headers, token) = http.form("/token", &grant, None).await;
        assert_eq!(status, 200, "{token}");
        assert_eq!(header(&headers, "cache-control"), "no-store");
        assert_eq!(header(&headers, "pragma"), "no-cache");
        assert_eq!(token["token_type"], "Bearer");
        assert_eq!(token["scope"], "system/Observation.crs", "the scope the client may not have is dropped");
        assert!(token["expires_in"].as_u64().unwrap() <= 300);
        let access = token["access_token"].as_str().unwrap().to_owned();
        let kid = jsonwebtoken::decode_header(&access).unwrap().kid.unwrap();
        let (_, _, jwks) = http.get_json("/jwks").await;
        assert!(jwks["keys"].as_array().unwrap().iter().any(|k| k["kid"] == kid.as_str() && k.get("d").is_none()));

        // The same assertion again is a replay.
        let (status, headers, err) = http.form("/token", &grant, None).await;
        assert_eq!((status, err["error"].as_str()), (401, Some("invalid_client")), "{err}");
        assert!(err["error_description"].as_str().unwrap().contains("already used"));
        assert_eq!(header(&headers, "cache-control"), "no-store");
        // A malformed request names its problem.
        let (status, _, err) = http.form("/token", &[("grant_type", "implicit")], None).await;
        assert_eq!((status, err["error"].as_str()), (400, Some("unsupported_grant_type")));

        // The token at work: create and read; delete is not in its scopes.
        let (status, _, created) =
            http.fhir(reqwest::Method::POST, "/Observation", Some(&access), Some(&reading("p-1"))).await;
        assert_eq!(status, 201, "{created}");
        let id = created["id"].as_str().unwrap().to_owned();
        let (status, _, _) = http.fhir(reqwest::Method::GET, &format!("/Observation/{id}"), Some(&access), None).await;
        assert_eq!(status, 200);
        let (status, headers, body) =
            http.fhir(reqwest::Method::DELETE, &format!("/Observation/{id}"), Some(&access), None).await;
        assert_eq!(status, 403, "{body}");
        assert!(header(&headers, "www-authenticate").contains("error=\"insufficient_scope\""));
        let (status, _, _) = http.fhir(reqwest::Method::GET, "/Patient?name=x", Some(&access), None).await;
        assert_eq!(status, 403, "no scope for Patient");

        // A resource server introspects it.
        let (status, _, info) = http.form("/introspect", &[("token", &access)], Some((&rs_id, &rs_secret))).await;
        assert_eq!(status, 200);
        assert_eq!((info["active"].as_bool(), info["client_id"].as_str()), (Some(true), Some("gateway-7")));
        let (status, _, _) = http.form("/introspect", &[("token", &access)], Some((&rs_id, "wrong secret"))).await;
        assert_eq!(status, 401);

        // The gateway revokes it; from then on the API refuses it and introspection says inactive.
        let revoke_jwt = assertion(&key, "gateway-7", &token_url);
        let revoke = [
            ("token", access.as_str()),
            ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
            ("client_assertion", revoke_jwt.as_str()),
        ];
        let (status, _, _) = http.form("/revoke", &revoke, None).await;
        assert_eq!(status, 200);
        let (status, headers, _) =
            http.fhir(reqwest::Method::GET, &format!("/Observation/{id}"), Some(&access), None).await;
        assert_eq!(status, 401);
        assert!(header(&headers, "www-authenticate").contains("revoked"));
        let (_, _, info) = http.form("/introspect", &[("token", &access)], Some((&rs_id, &rs_secret))).await;
        assert_eq!(info, json!({"active": false}));
    });
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");

    // Every step is an event; no secret, token or assertion is anywhere in the log or the server log.
    let (status, events, err) = d.cairn(&["log", "tail", "--topic", "cairn.auth"]);
    assert!(status.success(), "{err}");
    for t in [
        "auth.key.published",
        "auth.client.registered",
        "auth.token.issued",
        "auth.token.refused",
        "auth.token.introspected",
        "auth.token.revoked",
    ] {
        assert!(events.contains(&format!("\"type\":\"{t}\"")), "no {t} event in the log");
    }
    for (what, text) in [("the log", &events), ("the server's output", &stderr)] {
        assert!(!text.contains(&rs_secret), "a client secret in {what}");
        assert!(find_jwt(text).is_none(), "a JWT in {what}: {:?}", find_jwt(text));
    }
}

/// The first JWS compact serialization in `text` (`eyJ...` header, a dot, a payload, a dot). Not just
/// "eyJ": that also turns up by chance inside the base64url of a published public key.
fn find_jwt(text: &str) -> Option<&str> {
    let b64 = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
    let bytes = text.as_bytes();
    text.match_indices("eyJ").find_map(|(start, _)| {
        let mut i = start;
        for _ in 0..2 {
            let part = i;
            while i < bytes.len() && b64(bytes[i]) {
                i += 1;
            }
            if i == part || i >= bytes.len() || bytes[i] != b'.' {
                return None;
            }
            i += 1;
        }
        Some(&text[start..i])
    })
}

#[test]
fn a_jwt_is_told_from_base64_that_happens_to_start_like_one() {
    assert!(find_jwt(r#"{"n":"abceyJxyz","x":"eyJ0"}"#).is_none());
    let token = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln";
    assert_eq!(find_jwt(&format!("{{\"t\":\"{token}\"}}")), Some("eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0."));
}

/// `cairn admin` with the server stopped and running; passwords only on stdin and only hashed.
fn administration(backend: Backend) {
    let d = Deployment::new(backend);
    // Offline: the CLI writes to the log itself.
    let (status, out, err) = d.cairn_with_stdin(
        &["admin", "user", "add", "--username", "alice", "--password-stdin", "--fhir-user", "Patient/p-1"],
        "alice's long password\n",
    );
    assert!(status.success(), "{out}{err}");
    let (status, _, err) = d.cairn(&["admin", "user", "add", "--username", "bob"]);
    assert!(!status.success());
    assert!(err.contains("--password-stdin") && err.lines().count() == 1, "{err}");
    let server = d.start(&[]);
    // Online: through the server's socket; the server sees offline changes.
    let users = d.admin(&["user", "list"]);
    assert_eq!(users[0]["username"], "alice");
    assert_eq!(users[0]["fhir_user"], "Patient/p-1");
    let (status, _, err) =
        d.cairn_with_stdin(&["admin", "user", "add", "--username", "alice", "--password-stdin"], "another password\n");
    assert!(!status.success() && err.contains("already exists"), "{err}");
    let (id, secret) = d.register_client("Lab", "system/Observation.rs");
    let http = Http::new(&server);
    rt().block_on(async {
        let grant = [("grant_type", "client_credentials"), ("scope", "system/Observation.rs")];
        let (status, _, token) = http.form("/token", &grant, Some((&id, &secret))).await;
        assert_eq!(status, 200, "{token}");
        let access = token["access_token"].as_str().unwrap().to_owned();
        assert_eq!(http.fhir(reqwest::Method::GET, "/Observation", Some(&access), None).await.0, 200);
        // Revoking everything of the client kills the live token at once.
        let revoked = d.admin(&["revoke", "--client", &id]);
        assert_eq!(revoked["revoked"]["kind"], "client");
        assert_eq!(http.fhir(reqwest::Method::GET, "/Observation", Some(&access), None).await.0, 401);
        // A disabled client gets no new token.
        d.admin(&["client", "disable", "--client-id", &id]);
        let (status, _, err) = http.form("/token", &grant, Some((&id, &secret))).await;
        assert_eq!((status, err["error"].as_str()), (401, Some("invalid_client")));
        let clients = d.admin(&["client", "list"]);
        assert_eq!(clients[0]["disabled"], true);
    });
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");
    let (_, events, _) = d.cairn(&["log", "tail", "--topic", "cairn.auth"]);
    assert!(events.contains("$argon2id$"), "the password hash is recorded");
    assert!(!events.contains("alice's long password") && !stderr.contains("alice's long password"));
    assert!(!events.contains(&secret));
}

cairn_tests::on_every_backend!(backend_services, administration);

/// Two API processes on one Kafka log, each with its own signing key: a token the one issues is
/// accepted by the other at once (keys are published in the log before they sign, and an unknown
/// `kid` makes an instance catch up before refusing), and a revocation made at one is enforced by the
/// other.
#[test]
#[ignore = "needs Kafka and Cassandra: run with infra/test"]
fn a_token_issued_by_one_api_process_is_honoured_and_revoked_at_another() {
    let d = Deployment::new(Backend::KafkaCassandra);
    let other_keys = tempfile::tempdir().unwrap();
    // Behind one load balancer every instance has the same public URL: the issuer and audience.
    let a = d.start(&["--public-url", "https://cairn.test"]);
    let b = d.start(&[
        "--public-url",
        "https://cairn.test",
        "--roles",
        "fhir",
        "--token-key-dir",
        other_keys.path().to_str().unwrap(),
    ]);
    let (id, secret) = d.register_client("Lab", "system/Observation.crs");
    let (http_a, http_b) = (Http::new(&a), Http::new(&b));
    rt().block_on(async {
        let grant = [("grant_type", "client_credentials"), ("scope", "system/Observation.crs")];
        // The client was registered through A's socket; B learns it from the log.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let token = loop {
            let (status, _, token) = http_b.form("/token", &grant, Some((&id, &secret))).await;
            if status == 200 {
                break token["access_token"].as_str().unwrap().to_owned();
            }
            assert!(std::time::Instant::now() < deadline, "B never learned the client: {token}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        let kid_b = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
        let (_, _, jwks_a) = http_a.get_json("/jwks").await;
        let (status, _, body) =
            http_a.fhir(reqwest::Method::POST, "/Observation", Some(&token), Some(&reading("p-9"))).await;
        assert_eq!(status, 201, "A refused B's token: {body}");
        let (_, _, jwks_a_after) = http_a.get_json("/jwks").await;
        assert!(
            jwks_a_after["keys"].as_array().unwrap().iter().any(|k| k["kid"] == kid_b.as_str()),
            "{jwks_a} {jwks_a_after}"
        );
        // Revocations through A's revocation endpoint; B stops accepting each token. Repeated to give a
        // distribution of the propagation time (from A's answer to B's first refusal; B is polled every
        // 2 ms with a token it has already verified and cached).
        let mut propagation = Vec::new();
        let mut next = Some(token);
        for round in 0..25 {
            let token = match next.take() {
                Some(t) => t,
                None => {
                    let (_, _, t) = http_b.form("/token", &grant, Some((&id, &secret))).await;
                    t["access_token"].as_str().unwrap().to_owned()
                }
            };
            assert_eq!(
                http_b.fhir(reqwest::Method::GET, "/Observation?patient=p-9", Some(&token), None).await.0,
                200,
                "round {round}"
            );
            let (status, _, _) = http_a.form("/revoke", &[("token", &token)], Some((&id, &secret))).await;
            assert_eq!(status, 200);
            let revoked_at = std::time::Instant::now();
            loop {
                let (status, _, _) =
                    http_b.fhir(reqwest::Method::GET, "/Observation?patient=p-9", Some(&token), None).await;
                if status == 401 {
                    break;
                }
                assert_eq!(status, 200);
                assert!(revoked_at.elapsed() < std::time::Duration::from_secs(10), "B still accepts a revoked token");
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            propagation.push(revoked_at.elapsed());
        }
        propagation.sort();
        let pct =
            |p: f64| propagation[((propagation.len() as f64 * p).ceil() as usize).clamp(1, propagation.len()) - 1];
        eprintln!(
            "revocation through A enforced at B: p50 {} ms, p99 {} ms, max {} ms over {} revocations",
            pct(0.5).as_millis(),
            pct(0.99).as_millis(),
            propagation.last().unwrap().as_millis(),
            propagation.len()
        );
    });
}

// ---------------------------------------------------------------- SMART standalone launch

/// The relying party's HTTP client: reqwest behind openidconnect's client interface.
pub(crate) async fn rp_http(req: openidconnect::HttpRequest) -> Result<openidconnect::HttpResponse, reqwest::Error> {
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?;
    let (parts, body) = req.into_parts();
    let resp = client.request(parts.method, parts.uri.to_string()).headers(parts.headers).body(body).send().await?;
    let mut out = http::Response::builder().status(resp.status());
    for (k, v) in resp.headers() {
        out = out.header(k, v);
    }
    Ok(out.body(resp.bytes().await?.to_vec()).expect("a response"))
}

/// The value of a hidden form field in a page, unescaped.
pub(crate) fn hidden(page: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = page.find(&marker).unwrap_or_else(|| panic!("no {name} field in {page}")) + marker.len();
    let raw = &page[start..start + page[start..].find('"').unwrap()];
    raw.replace("&quot;", "\"").replace("&#39;", "'").replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
}

pub(crate) fn location(resp: &reqwest::Response) -> String {
    resp.headers().get("location").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
}

pub(crate) fn url_param(url: &str, name: &str) -> Option<String> {
    reqwest::Url::parse(url).ok()?.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// A patient signs in through the pages, consents, and an independent OpenID Connect relying party
/// (the `openidconnect` crate) discovers the server, exchanges the code with PKCE, validates the ID
/// token, reads userinfo and refreshes; the token reads the patient's own Observations and nothing
/// of anyone else's.
#[test]
fn smart_standalone_launch_with_an_independent_relying_party() {
    use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
    use openidconnect::{
        AuthorizationCode, ClientId, CsrfToken, IssuerUrl, Nonce, OAuth2TokenResponse, PkceCodeChallenge, RedirectUrl,
        Scope, TokenResponse,
    };
    let d = Deployment::new(Backend::Embedded);
    let server = d.start(&[]);
    let base = server.base_url.clone();
    let redirect = "http://127.0.0.1:9/callback";
    d.admin(&[
        "client",
        "register",
        "--name",
        "Glucose <b>diary</b>",
        "--kind",
        "public",
        "--client-id",
        "diary",
        "--redirect-uri",
        redirect,
        "--scope",
        "launch/patient openid fhirUser offline_access patient/Observation.crs patient/Patient.r",
    ]);
    let (feeder_id, feeder_secret) = d.register_client("Feeder", "system/*.cruds");
    let (status, out, err) = d.cairn_with_stdin(
        &["admin", "user", "add", "--username", "pat", "--password-stdin", "--fhir-user", "Patient/p-1"],
        "a long patient password\n",
    );
    assert!(status.success(), "{out}{err}");
    let http = Http::new(&server);
    rt().block_on(async {
        // Readings of two patients, written by a backend.
        let grant = [("grant_type", "client_credentials"), ("scope", "system/*.cruds")];
        let (_, _, t) = http.form("/token", &grant, Some((&feeder_id, &feeder_secret))).await;
        let system = t["access_token"].as_str().unwrap().to_owned();
        let mut ids = Vec::new();
        for p in ["p-1", "p-2"] {
            let (status, _, created) =
                http.fhir(reqwest::Method::POST, "/Observation", Some(&system), Some(&reading(p))).await;
            assert_eq!(status, 201);
            ids.push(created["id"].as_str().unwrap().to_owned());
        }

        // The relying party.
        let meta = CoreProviderMetadata::discover_async(IssuerUrl::new(base.clone()).unwrap(), &rp_http)
            .await
            .expect("discovery");
        let client = CoreClient::from_provider_metadata(meta, ClientId::new("diary".into()), None)
            .set_redirect_uri(RedirectUrl::new(redirect.into()).unwrap());
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request =
            client.authorize_url(CoreAuthenticationFlow::AuthorizationCode, CsrfToken::new_random, Nonce::new_random);
        for s in ["launch/patient", "fhirUser", "offline_access", "patient/Observation.crs", "patient/Patient.r"] {
            request = request.add_scope(Scope::new(s.into()));
        }
        let (auth_url, state, nonce) =
            request.add_extra_param("aud", format!("{base}/fhir")).set_pkce_challenge(challenge).url();

        // The browser.
        let browser =
            reqwest::Client::builder().cookie_store(true).redirect(reqwest::redirect::Policy::none()).build().unwrap();
        let resp = browser.get(auth_url.as_str()).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let page = resp.text().await.unwrap();
        assert!(
            page.contains("Glucose &lt;b&gt;diary&lt;/b&gt;") && !page.contains("<b>diary</b>"),
            "the client's name is escaped"
        );
        // Without the CSRF token the sign-in is refused (and recorded).
        let resp = browser
            .post(format!("{base}/login"))
            .form(&[
                ("username", "pat"),
                ("password", "a long patient password"),
                ("authorize", &hidden(&page, "authorize")),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403);
        let resp = browser
            .post(format!("{base}/login"))
            .form(&[
                ("csrf", hidden(&page, "csrf").as_str()),
                ("username", "pat"),
                ("password", "a long patient password"),
                ("authorize", &hidden(&page, "authorize")),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 303);
        let cookies: Vec<String> =
            resp.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap().to_owned()).collect();
        assert!(
            cookies
                .iter()
                .any(|c| c.starts_with("cairn_session=") && c.contains("HttpOnly") && c.contains("SameSite=Lax")),
            "{cookies:?}"
        );
        let resp = browser.get(format!("{base}{}", location(&resp))).send().await.unwrap();
        let consent = resp.text().await.unwrap();
        assert!(consent.contains("Allow access?") && consent.contains("patient/Observation.crs"), "{consent}");
        // The user withholds offline access.
        let mut form: Vec<(String, String)> = vec![
            ("csrf".into(), hidden(&consent, "csrf")),
            ("authorize".into(), hidden(&consent, "authorize")),
            ("decision".into(), "approve".into()),
        ];
        for s in ["openid", "launch/patient", "fhirUser", "patient/Observation.crs", "patient/Patient.r"] {
            form.push(("scope".into(), s.into()));
        }
        let resp = browser.post(format!("{base}/consent")).form(&form).send().await.unwrap();
        assert_eq!(resp.status(), 303);
        let back = location(&resp);
        assert!(back.starts_with(redirect), "{back}");
        assert_eq!(url_param(&back, "state").as_deref(), Some(state.secret().as_str()));
        assert_eq!(url_param(&back, "iss").as_deref(), Some(base.as_str()));
        let code = url_param(&back, "code").unwrap();

        // The exchange, validated by the relying party.
        let token = client
            .exchange_code(AuthorizationCode::new(code.clone()))
            .unwrap()
            .set_pkce_verifier(verifier)
            .request_async(&rp_http)
            .await
            .expect("code exchange");
        let id_token = token.id_token().expect("an ID token");
        let claims = id_token.claims(&client.id_token_verifier(), &nonce).expect("a valid ID token");
        let user_id = claims.subject().to_string();
        let scopes: Vec<String> = token.scopes().unwrap().iter().map(|s| s.to_string()).collect();
        assert!(
            !scopes.contains(&"offline_access".to_owned()) && token.refresh_token().is_none(),
            "offline access was withheld"
        );
        let access = token.access_token().secret().clone();
        let info: openidconnect::core::CoreUserInfoClaims = client
            .user_info(token.access_token().clone(), None)
            .unwrap()
            .request_async(&rp_http)
            .await
            .expect("userinfo");
        assert_eq!(info.subject().as_str(), user_id);

        // The SMART context in the raw token response, and the token at the FHIR API.
        let (status, _, introspected) =
            http.form("/introspect", &[("token", &access)], Some((&feeder_id, &feeder_secret))).await;
        assert_eq!((status, introspected["patient"].as_str()), (200, Some("p-1")));
        let (status, _, _) =
            http.fhir(reqwest::Method::GET, &format!("/Observation/{}", ids[0]), Some(&access), None).await;
        assert_eq!(status, 200, "the patient's own reading");
        let (status, _, body) =
            http.fhir(reqwest::Method::GET, &format!("/Observation/{}", ids[1]), Some(&access), None).await;
        assert_eq!(status, 404, "another patient's reading is not revealed: {body}");
        let (status, _, missing) =
            http.fhir(reqwest::Method::GET, "/Observation/does-not-exist", Some(&access), None).await;
        assert_eq!(
            (status, missing["issue"][0]["code"].clone()),
            (404, body["issue"][0]["code"].clone()),
            "indistinguishable from absent"
        );
        let (status, _, bundle) = http.fhir(reqwest::Method::GET, "/Observation", Some(&access), None).await;
        assert_eq!((status, bundle["total"].as_u64()), (200, Some(1)), "search sees only the compartment: {bundle}");
        let (status, _, bundle) =
            http.fhir(reqwest::Method::GET, "/Observation?patient=p-2", Some(&access), None).await;
        assert_eq!((status, bundle["total"].as_u64()), (200, Some(0)));
        let (status, _, _) =
            http.fhir(reqwest::Method::POST, "/Observation", Some(&access), Some(&reading("p-2"))).await;
        assert_eq!(status, 403, "writing into another patient's record");
        let (status, _, _) =
            http.fhir(reqwest::Method::POST, "/Observation", Some(&access), Some(&reading("p-1"))).await;
        assert_eq!(status, 201, "writing into one's own record");
        let (status, _, _) = http.fhir(reqwest::Method::GET, "/Patient/p-2", Some(&access), None).await;
        assert_eq!(status, 404);

        // The code cannot be used twice; doing so revokes the tokens it gave.
        let (status, _, err) = http
            .form(
                "/token",
                &[
                    ("grant_type", "authorization_code"),
                    ("code", &code),
                    ("redirect_uri", redirect),
                    ("client_id", "diary"),
                    ("code_verifier", &"x".repeat(43)),
                ],
                None,
            )
            .await;
        assert_eq!((status, err["error"].as_str()), (400, Some("invalid_grant")));
        let (status, _, _) =
            http.fhir(reqwest::Method::GET, &format!("/Observation/{}", ids[0]), Some(&access), None).await;
        assert_eq!(status, 401, "reuse of the code revoked its tokens");
        // The compliance officer's failed-login report counts the refused sign-in (CSRF) per
        // username and per address.
        let (auditor_id, auditor_secret) = d.register_client("Compliance", "system/AuditEvent.rs");
        let (id, secret) = (auditor_id.as_str(), auditor_secret.as_str());
        let grant = [("grant_type", "client_credentials"), ("scope", "system/AuditEvent.rs")];
        let (_, _, t) = http.form("/token", &grant, Some((id, secret))).await;
        let token = t["access_token"].as_str().unwrap();
        let (status, _, report) = http
            .fhir(
                reqwest::Method::GET,
                "/AuditEvent/$report?kind=failed-logins&from=2026-01-01&to=2100-01-01",
                Some(token),
                None,
            )
            .await;
        assert_eq!(status, 200, "{report}");
        let rows = report["rows"].as_array().unwrap();
        assert!(
            rows.iter()
                .any(|r| r[0] == "username" && r[1] == "pat" && r[2].as_str().unwrap().parse::<u32>().unwrap() >= 1),
            "{report}"
        );
        assert!(rows.iter().any(|r| r[0] == "address" && r[1] == "127.0.0.1"), "{report}");
    });
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");
    let (_, events, _) = d.cairn(&["log", "tail", "--topic", "cairn.auth"]);
    for t in
        ["auth.login.failed", "auth.login.succeeded", "auth.consent.recorded", "auth.code.issued", "auth.code.redeemed"]
    {
        assert!(events.contains(&format!("\"type\":\"{t}\"")), "no {t} event");
    }
    assert!(events.contains("csrf_mismatch") && events.contains("code_reuse"));
    assert!(!events.contains("a long patient password") && !stderr.contains("a long patient password"));
}

/// RFC 7591 registration with an initial access token, then a key rotation under live tokens: the
/// new key is in the JWKS before it signs, tokens signed by the old one keep working, and a restart
/// keeps signing with the new one.
#[test]
fn dynamic_registration_and_key_rotation() {
    let d = Deployment::new(Backend::Embedded);
    let server = d.start(&[]);
    let http = Http::new(&server);
    let token = d.admin(&["registration-token", "--expires-in-secs", "600"]);
    let initial = token["registration_token"].as_str().unwrap().to_owned();
    let register = |bearer: Option<String>, body: Value| {
        let client = reqwest::Client::new();
        let url = format!("{}/register", server.base_url);
        async move {
            let mut req = client.post(url).json(&body);
            if let Some(b) = bearer {
                req = req.bearer_auth(b);
            }
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    rt().block_on(async {
        let metadata = json!({"client_name": "Lab importer", "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": ["client_credentials"], "scope": "system/Observation.crs"});
        let (status, err) = register(None, metadata.clone()).await;
        assert_eq!((status, err["error"].as_str()), (401, Some("invalid_token")));
        let (status, err) = register(Some("made-up".into()), metadata.clone()).await;
        assert_eq!(status, 401, "{err}");
        let (status, err) = register(
            Some(initial.clone()),
            json!({"client_name": "App", "token_endpoint_auth_method": "none", "redirect_uris": ["http://evil.example/cb"], "scope": "openid"}),
        )
        .await;
        assert_eq!((status, err["error"].as_str()), (400, Some("invalid_redirect_uri")), "{err}");
        let (status, reg) = register(Some(initial.clone()), metadata).await;
        assert_eq!(status, 201, "{reg}");
        let (id, secret) = (reg["client_id"].as_str().unwrap().to_owned(), reg["client_secret"].as_str().unwrap().to_owned());
        let grant = [("grant_type", "client_credentials"), ("scope", "system/Observation.crs")];
        let (status, _, before) = http.form("/token", &grant, Some((&id, &secret))).await;
        assert_eq!(status, 200);
        let old_token = before["access_token"].as_str().unwrap().to_owned();
        let old_kid = jsonwebtoken::decode_header(&old_token).unwrap().kid.unwrap();

        let rotated = d.admin(&["keys", "rotate"]);
        let new_kid = rotated["rotated"][0]["new_kid"].as_str().unwrap().to_owned();
        assert_eq!(rotated["rotated"][0]["old_kid"], old_kid.as_str());
        let (_, _, jwks) = http.get_json("/jwks").await;
        let kids: Vec<&str> = jwks["keys"].as_array().unwrap().iter().filter_map(|k| k["kid"].as_str()).collect();
        assert!(kids.contains(&old_kid.as_str()) && kids.contains(&new_kid.as_str()), "{kids:?}");
        let (status, _, after) = http.form("/token", &grant, Some((&id, &secret))).await;
        assert_eq!(status, 200);
        let new_token = after["access_token"].as_str().unwrap().to_owned();
        assert_eq!(jsonwebtoken::decode_header(&new_token).unwrap().kid.unwrap(), new_kid);
        for t in [&old_token, &new_token] {
            assert_eq!(http.fhir(reqwest::Method::GET, "/Observation", Some(t), None).await.0, 200, "a token in flight fails after rotation");
        }
    });
    assert!(server.terminate().0.success());
    let server = d.start(&[]);
    let http = Http::new(&server);
    rt().block_on(async {
        let (_, _, jwks) = http.get_json("/jwks").await;
        let keys = jwks["keys"].as_array().unwrap();
        let token_keys = keys.iter().filter(|k| k["kty"] != "OKP").count();
        assert_eq!(token_keys, 4, "two purposes, old and new, still published: {jwks}");
        let seal_keys = keys.iter().filter(|k| k["kty"] == "OKP" && k["alg"] == "EdDSA").count();
        assert_eq!(seal_keys, 1, "the log's seal key, once, though published at each start: {jwks}");
    });
    let (status, out, err) = d.cairn(&["admin", "keys", "rotate"]);
    assert!(status.success(), "{out}{err}");
    assert!(server.terminate().0.success());
    // Offline there are no keys to rotate: one clear line.
    let (status, _, err) = d.cairn(&["admin", "keys", "rotate"]);
    assert!(!status.success() && err.contains("running server") && err.lines().count() == 1, "{err}");
}

/// `cairn serve --demo` seeds accounts that work, once, and keeps their credentials owner-only.
#[test]
fn demo_mode_seeds_working_accounts_once() {
    let d = Deployment::new(Backend::Embedded);
    let server = d.start(&["--demo"]);
    let file = d.data_dir().join("demo-credentials.json");
    let creds: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let http = Http::new(&server);
    rt().block_on(async {
        let secret = creds["device_client"]["client_secret"].as_str().unwrap();
        let (status, _, token) = http
            .form(
                "/token",
                &[("grant_type", "client_credentials"), ("scope", "system/Patient.rs")],
                Some(("demo-device", secret)),
            )
            .await;
        assert_eq!(status, 200, "{token}");
        let (status, _, patient) =
            http.fhir(reqwest::Method::GET, "/Patient/demo-patient", token["access_token"].as_str(), None).await;
        assert_eq!((status, patient["name"][0]["family"].as_str()), (200, Some("Demo")));
    });
    assert!(server.terminate().0.success());
    let server = d.start(&["--demo"]);
    let users = d.admin(&["user", "list"]);
    assert_eq!(users.as_array().unwrap().len(), 3, "seeded once: {users}");
    assert!(server.terminate().0.success());
}

/// A backend client that publishes its keys at a `jwks_uri`: the server fetches them (and refetches
/// when the client rotates to a key it has not seen).
#[test]
fn a_backend_client_with_a_jwks_uri() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let d = Deployment::new(Backend::Embedded);
    let server = d.start(&[]);
    let http = Http::new(&server);
    let token_url = format!("{}/token", server.base_url);
    rt().block_on(async {
        // The client's own key server; what it serves can change.
        let first = gateway_key();
        let served = std::sync::Arc::new(std::sync::Mutex::new(first.jwks.to_string()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let body = served.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else { return };
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let b = body.lock().unwrap().clone();
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncache-control: max-age=3600\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}",
                    b.len()
                );
                let _ = s.write_all(reply.as_bytes()).await;
            }
        });
        let uri = format!("http://127.0.0.1:{port}/jwks.json");
        d.admin(&[
            "client", "register", "--name", "Remote-keyed gateway", "--kind", "confidential-asymmetric", "--client-id", "remote-gw",
            "--scope", "system/Observation.crs", "--jwks-uri", &uri,
        ]);
        let http = &http;
        let grant = |jwt: String| async move {
            let form = [
                ("grant_type", "client_credentials".to_owned()),
                ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_owned()),
                ("client_assertion", jwt),
                ("scope", "system/Observation.crs".to_owned()),
            ];
            let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
            http.form("/token", &pairs, None).await
        };
        let (status, _, body) = grant(assertion(&first, "remote-gw", &token_url)).await;
        assert_eq!(status, 200, "{body}");
        // The client rotates: a new key under a new kid. The cached set lacks it, so it is refetched
        // (at most every 10 seconds).
        let mut second = gateway_key();
        second.jwks["keys"][0]["kid"] = "gw-key-2".into();
        *served.lock().unwrap() = second.jwks.to_string();
        tokio::time::sleep(std::time::Duration::from_secs(11)).await;
        let mut header = Header::new(Algorithm::ES384);
        header.kid = Some("gw-key-2".into());
        let claims = json!({"iss": "remote-gw", "sub": "remote-gw", "aud": token_url, "exp": now() + 120, "jti": rand_suffix()});
        let jwt = jsonwebtoken::encode(&header, &claims, &second.encoding).unwrap();
        let (status, _, body) = grant(jwt).await;
        assert_eq!(status, 200, "after the client's rotation: {body}");
        // A key set at a URL that is neither https nor loopback is refused at registration.
        let (status, _, err) = d.cairn(&[
            "admin", "client", "register", "--name", "x", "--kind", "confidential-asymmetric", "--scope", "system/Observation.r",
            "--jwks-uri", "http://keys.example/jwks.json",
        ]);
        assert!(!status.success() && err.contains("jwks_uri"), "{err}");
    });
    assert!(server.terminate().0.success());
}

/// Revocation during a steady stream of requests with the token: once `/revoke` has answered, no
/// request that starts afterwards is admitted; the time to the first refusal is reported.
fn revocation_under_a_steady_stream(backend: Backend) {
    let d = Deployment::new(backend);
    let server = d.start(&[]);
    let (id, secret) = d.register_client("Lab", "system/Observation.rs");
    let http = Http::new(&server);
    rt().block_on(async {
        let grant = [("grant_type", "client_credentials"), ("scope", "system/Observation.rs")];
        let (_, _, t) = http.form("/token", &grant, Some((&id, &secret))).await;
        let token = t["access_token"].as_str().unwrap().to_owned();
        let revoked_at: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>> = Default::default();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut streams = Vec::new();
        for _ in 0..4 {
            let (client, url, token, revoked_at, stop) = (
                http.client.clone(),
                format!("{}/fhir/Observation?_count=1", http.base),
                token.clone(),
                revoked_at.clone(),
                stop.clone(),
            );
            streams.push(tokio::spawn(async move {
                let (mut admitted_after, mut first_refusal) = (0, None::<std::time::Instant>);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let started = std::time::Instant::now();
                    let revoked_before_start = revoked_at.lock().unwrap().is_some_and(|r| r <= started);
                    let status = client.get(&url).bearer_auth(&token).send().await.unwrap().status().as_u16();
                    match status {
                        200 if revoked_before_start => admitted_after += 1,
                        200 => {}
                        401 => {
                            first_refusal.get_or_insert_with(std::time::Instant::now);
                        }
                        other => panic!("unexpected {other}"),
                    }
                }
                (admitted_after, first_refusal)
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let (status, _, _) = http.form("/revoke", &[("token", &token)], Some((&id, &secret))).await;
        assert_eq!(status, 200);
        let acknowledged = std::time::Instant::now();
        *revoked_at.lock().unwrap() = Some(acknowledged);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut first = None::<std::time::Instant>;
        for s in streams {
            let (admitted_after, refusal) = s.await.unwrap();
            assert_eq!(admitted_after, 0, "a request that started after the revocation was acknowledged was admitted");
            first = match (first, refusal) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        let first = first.expect("the revoked token was never refused");
        eprintln!(
            "revocation: first refusal {} us after /revoke answered ({backend:?})",
            first.saturating_duration_since(acknowledged).as_micros()
        );
    });
}

cairn_tests::on_every_backend!(revocation_under_a_steady_stream);

/// Revocations made while a server was down are enforced at its first request after the restart:
/// it rebuilds the revocation list from the log before it serves.
fn a_restarted_server_enforces_revocations_made_while_it_was_down(backend: Backend) {
    let d = Deployment::new(backend);
    // The issuer must not change with the port a restart happens to get.
    let server = d.start(&["--public-url", "http://cairn.test"]);
    let (id, secret) = d.register_client("Lab", "system/Observation.rs");
    let http = Http::new(&server);
    let (doomed, spared) = rt().block_on(async {
        let grant = [("grant_type", "client_credentials"), ("scope", "system/Observation.rs")];
        let mut tokens = Vec::new();
        for _ in 0..2 {
            let (_, _, t) = http.form("/token", &grant, Some((&id, &secret))).await;
            let token = t["access_token"].as_str().unwrap().to_owned();
            assert_eq!(http.fhir(reqwest::Method::GET, "/Observation", Some(&token), None).await.0, 200);
            tokens.push(token);
        }
        (tokens.remove(0), tokens.remove(0))
    });
    assert!(server.terminate().0.success());
    // While it is down, an administrator revokes one token by its jti (straight on the log).
    let claims: Value = jsonwebtoken::dangerous::insecure_decode(&doomed).unwrap().claims;
    let revoked = d.admin(&["revoke", "--jti", claims["jti"].as_str().unwrap()]);
    assert_eq!(revoked["revoked"]["kind"], "token");
    let server = d.start(&["--public-url", "http://cairn.test"]);
    let http = Http::new(&server);
    rt().block_on(async {
        let (status, headers, _) = http.fhir(reqwest::Method::GET, "/Observation", Some(&doomed), None).await;
        assert_eq!(status, 401, "the first request after the restart already knows the revocation");
        let challenge = header(&headers, "www-authenticate");
        assert!(challenge.contains("revoked"), "{challenge}");
        assert_eq!(http.fhir(reqwest::Method::GET, "/Observation", Some(&spared), None).await.0, 200);
    });
    assert!(server.terminate().0.success());
}

cairn_tests::on_every_backend!(a_restarted_server_enforces_revocations_made_while_it_was_down);

/// Thaws Kafka when dropped, so a failing test does not leave the broker frozen for the others.
struct FrozenKafka;

impl FrozenKafka {
    fn freeze() -> FrozenKafka {
        cairn_tests::infra("pause", &["kafka"]);
        FrozenKafka
    }
}

impl Drop for FrozenKafka {
    fn drop(&mut self) {
        cairn_tests::infra("pause", &["--resume", "kafka"]);
    }
}

/// Lag injection on a running server: the Kafka broker is frozen (SIGSTOP), so the revocation feed
/// cannot be shown current. Past the bound, bearer requests fail closed at once with 503 (not a hang,
/// not an admission), `/readyz` and the lag metric say why; once the broker is thawed the same token
/// is served again.
#[test]
#[ignore = "needs Kafka and Cassandra, and freezes Kafka: run with infra/test"]
fn a_stalled_revocation_feed_fails_closed_and_recovers() {
    let _alone = cairn_tests::exclusive_servers();
    let d = Deployment::unguarded(Backend::KafkaCassandra);
    let server = d.start(&["--revocation-lag-bound-ms", "2000"]);
    let (id, secret) = d.register_client("Lab", "system/Observation.rs");
    let http = Http {
        client: reqwest::Client::builder().timeout(std::time::Duration::from_secs(3)).build().unwrap(),
        base: server.base_url.clone(),
    };
    rt().block_on(async {
        let grant = [("grant_type", "client_credentials"), ("scope", "system/Observation.rs")];
        let (_, _, t) = http.form("/token", &grant, Some((&id, &secret))).await;
        let token = t["access_token"].as_str().unwrap().to_owned();
        let probe = |http: &Http| {
            let req = http.client.get(format!("{}/fhir/Observation?_count=1", http.base)).bearer_auth(&token);
            async move {
                match req.send().await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        (Some(status), r.json::<Value>().await.unwrap_or(Value::Null))
                    }
                    Err(_) => (None, Value::Null),
                }
            }
        };
        assert_eq!(probe(&http).await.0, Some(200));
        let frozen = FrozenKafka::freeze();
        let paused = std::time::Instant::now();
        let refused = loop {
            let asked = std::time::Instant::now();
            let (status, body) = probe(&http).await;
            assert_ne!(status, Some(200), "admitted while the log was frozen");
            if status == Some(503) && body.to_string().contains("revocation feed is behind") {
                assert!(asked.elapsed() < std::time::Duration::from_secs(1), "the refusal should not wait");
                break paused.elapsed();
            }
            assert!(paused.elapsed() < std::time::Duration::from_secs(20), "never failed closed: {status:?} {body}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        assert!(refused >= std::time::Duration::from_secs(2), "failed closed before the bound: {refused:?}");
        let asked = std::time::Instant::now();
        let (status, _, ready) = http.get_json("/readyz").await;
        assert!(asked.elapsed() < std::time::Duration::from_secs(3), "/readyz stalled with the broker");
        assert_eq!(status, 503, "{ready}");
        let feed = ready["checks"].as_array().unwrap().iter().find(|c| c["name"] == "auth-feed").unwrap().clone();
        assert_eq!(feed["ok"], false, "{ready}");
        assert!(feed["detail"].as_str().unwrap().contains("refusing bearer tokens"), "{ready}");
        let metrics = http.client.get(format!("{}/metrics", http.base)).send().await.unwrap().text().await.unwrap();
        let lag: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("cairn_auth_feed_lag_seconds "))
            .expect("the lag gauge is exported")
            .trim()
            .parse()
            .unwrap();
        assert!(lag >= 2.0, "lag gauge {lag}");
        drop(frozen);
        let thawed = std::time::Instant::now();
        loop {
            if probe(&http).await.0 == Some(200) {
                break;
            }
            assert!(thawed.elapsed() < std::time::Duration::from_secs(60), "never served again after the thaw");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        eprintln!(
            "stalled feed: failed closed {} ms after the freeze (bound 2000 ms), served again {} ms after the thaw",
            refused.as_millis(),
            thawed.elapsed().as_millis()
        );
        let (status, _, ready) = http.get_json("/readyz").await;
        assert_eq!(status, 200, "{ready}");
    });
    assert!(server.terminate().0.success());
}
